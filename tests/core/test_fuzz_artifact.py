"""The fuzz suite in CI (issue 16): benchmarks/fuzz_artifact.py run for a few seconds per target --
the manifest, the safetensors header, and the bitpack, Huffman and sparse-index streams -- in a
subprocess under a memory limit (RLIMIT_AS 1 GiB above its baseline). No crash (an exception other
than ArtifactError, or the process dying), no execution of the planted module, every target tried.
The published figures (docs/benchmarks.md) come from the same script with a larger budget."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_artifact.py"
TARGETS = {"manifest", "safetensors header", "codec/bitpack", "codec/huffman", "codec/sparse"}


def test_fuzzing_the_reader_finds_no_crash_and_runs_no_code(tmp_path):
    out = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seconds", "2", "--memory-mib", "1024", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode in (0, 1), f"the fuzz process died (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["crashes"] == 0, json.dumps(report["crash_examples"], indent=1)
    assert report["code_executions"] == 0
    assert proc.returncode == 0
    assert set(report["targets"]) == TARGETS
    for name, t in report["targets"].items():
        assert t["cases"] > 0 and t["refused"] > 0, (name, t)  # tried, and the forged inputs were refused
    assert len(report["fixtures"]) == 8  # every method's replay is fuzzed
