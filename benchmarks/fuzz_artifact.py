"""Fuzz the artifact reader (issue 16): the manifest, the safetensors header and every codec stream,
with hypothesis, under a memory limit, for a time budget per target. Reports cases tried, crashes
(any exception other than ArtifactError, or a process that dies), code executions (a planted module
that appends to a marker file whenever it is imported or called; its references are among the values
the fuzzer writes into manifests) and peak memory.

    .venv/bin/python benchmarks/fuzz_artifact.py   # 60 s per target, 1 GiB above the baseline: writes
                                                   # benchmarks/results/fuzz_artifact.{json,md} (run_all.py
                                                   # pastes the table into docs/benchmarks.md)
    .venv/bin/python benchmarks/fuzz_artifact.py --seconds 2 --json out.json   # tests/core/test_fuzz_artifact.py:
                                                   # the figures go to out.json only

The memory limit is RLIMIT_AS set after torch and the fixtures are loaded: every allocation of a
case counts against it, so an allocation sized by a forged number fails the run (MemoryError is a
crash here, not a refusal). Exit status 0 only when there were no crashes and no code executions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import resource
import sys
import tempfile
import textwrap
import time
import traceback
import uuid
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as hs
from torch import nn

import shrinktunnel as st
from shrinktunnel.cli import main as cli_main
from shrinktunnel.codec import bitpack, huffman, sparse
from shrinktunnel.core import artifact as A
from shrinktunnel.errors import ArtifactError


class Net(nn.Module):
    """Linear, Conv2d and Embedding: the layer kinds each method's replay rebuilds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(8 + 4 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):  # x: (B, 1, 4, 4) float; token = first pixel bucketed
        tok = (x[:, 0, 0, 0].abs() * 3).long().clamp(0, 11)
        h = torch.cat([self.emb(tok), torch.relu(self.conv(x)).flatten(1)], dim=1)
        return self.fc2(torch.relu(self.fc1(h)))


def chan_net() -> nn.Module:
    """prune_channels' fixture: a plain conv stack (its dependency graph on Net's concatenation of an
    embedding with a flattened conv fails in torch-pruning, a separate matter)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()


RECIPES = {
    "int8": [("quantize", {})],
    "int4-group-packed": [("quantize", {"weights": {"bits": 4, "granularity": "per_group", "group_size": 8},
                                            "activations": None, "layers": ["fc1", "fc2"]})],
    "int6-huffman": [("quantize", {"weights": {"bits": 6, "coding": "huffman"}, "activations": None})],
    "pruned-sparse": [("prune", {"sparsity": 0.8})],
    "clustered": [("cluster", {"bits": 3})],
    "pruned+clustered": [("prune", {"sparsity": 0.7}), ("cluster", {"bits": 2})],
    "lowrank": [("decompose", {})],
    "channels": [("prune_channels", {"ratio": 0.5})],  # its replay needs values: the bounded real replay, not meta
}


def build_fixtures(root: Path) -> tuple[dict[str, nn.Module], dict[str, Path]]:
    torch.manual_seed(0)
    net = Net().eval()
    data = [torch.randn(16, 1, 4, 4) for _ in range(2)]
    arts, bases = {}, {}
    for name, recipe in RECIPES.items():
        bases[name] = chan_net() if name == "channels" else net
        try:
            result = st.compress(bases[name], recipe, data=data, example_inputs=data[0], progress=False)
        except Exception as exc:  # a method's config changed: fuzz the others, say so
            print(f"fixture {name} skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        arts[name] = result.save(root / name)
    return bases, arts


def plant(root: Path) -> tuple[Path, list[str]]:
    """A file module and an importable package that append to a marker when imported or called."""
    marker = root / "MARKER"
    body = textwrap.dedent(f"""
        open({str(marker)!r}, "a").write("imported\\n")
        def make():
            open({str(marker)!r}, "a").write("called\\n")
            import torch
            return torch.nn.Linear(2, 2)
    """)
    (root / "evil.py").write_text(body)
    pkg = f"evil_pkg_{uuid.uuid4().hex[:8]}"
    (root / "site" / pkg).mkdir(parents=True)
    (root / "site" / pkg / "__init__.py").write_text(body)
    sys.path.insert(0, str(root / "site"))
    refs = [f"{root / 'evil.py'}:make", f"{pkg}:make", "os:abort", "sys:exit", "builtins:breakpoint", "builtins:input",
            "subprocess:getoutput", "shutil:rmtree", f"{root / 'evil.py'}", str(root), "shrinktunnel.assets:_model_path"]
    return marker, refs


# -- strategies -------------------------------------------------------------------------------------
KEYS = ["kind", "weight_shape", "weight", "bits", "dtype", "qmin", "qmax", "packed", "coding", "code_bytes", "granularity",
        "group_size", "layers", "fused", "shared", "ref", "file", "shape", "kept", "encoding", "index_bits", "scale",
        "zero_point", "input", "output", "bias", "format", "method", "replay", "config", "aliases", "sha256", "bytes"]


def json_values(refs: list[str]):
    big = hs.sampled_from([0, 1, -1, 2, 3, 7, 8, 16, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53, 2**63, 10**9, 10**12, 10**30, -(2**63)])
    special = hs.sampled_from(refs + ["..", "../..", "/etc/passwd", "model.safetensors", "manifest.json", "quantize", "prune",
                                      "cluster", "decompose", "huffman", "plain", "per_group", "int8", "uint8", "F32",
                                      "linear", "conv2d", "embedding", "nan", "inf", "", "\u0000", "a" * 300])
    shapes = hs.lists(hs.one_of(big, hs.integers(0, 64)), max_size=5)
    leaves = (hs.none() | hs.booleans() | hs.integers(-(2**70), 2**70) | big | hs.floats(allow_nan=False, allow_infinity=False)
              | hs.text(max_size=12) | special | shapes)
    return hs.recursive(leaves, lambda kids: hs.lists(kids, max_size=4)
                        | hs.dictionaries(hs.sampled_from(KEYS) | hs.text(max_size=6), kids, max_size=4), max_leaves=16)


def paths(obj, prefix=(), out=None, limit=400):
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    out.append(prefix)
    if isinstance(obj, dict):
        for k, v in obj.items():
            paths(v, prefix + (k,), out, limit)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            paths(v, prefix + (i,), out, limit)
    return out


def set_at(obj, path, value, delete=False):
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value
    return obj


# -- the run -----------------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.cases, self.refused, self.loaded, self.crashes = {}, {}, {}, []

    def outcome(self, target: str, fn) -> None:
        self.cases[target] = self.cases.get(target, 0) + 1
        try:
            fn()
            self.loaded[target] = self.loaded.get(target, 0) + 1
        except ArtifactError as exc:
            if "\n" in str(exc):
                self.crashes.append((target, "ArtifactError of several lines", str(exc)[:300]))
            self.refused[target] = self.refused.get(target, 0) + 1
        except BaseException as exc:  # MemoryError, SystemExit, RecursionError, anything: a crash
            self.crashes.append((target, type(exc).__name__, str(exc)[:300] + " | " + traceback.format_exc(limit=-3)[-600:]))


def run_cli(*args) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli_main([str(a) for a in args])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time budget per target")
    ap.add_argument("--memory-mib", type=int, default=1024, help="address space allowed above the baseline")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="shrink-fuzz-"))
    bases, arts = build_fixtures(work / "arts")
    marker, refs = plant(work)
    pristine = {n: ((p / "manifest.json").read_bytes(), (p / "model.safetensors").read_bytes()) for n, p in arts.items()}
    case_dir = work / "case"
    stats = Stats()

    def lay(name: str, manifest: bytes, tensors: bytes) -> Path:
        if case_dir.exists():
            for f in case_dir.iterdir():
                f.unlink() if f.is_file() or f.is_symlink() else None
        case_dir.mkdir(exist_ok=True)
        (case_dir / "manifest.json").write_bytes(manifest)
        (case_dir / "model.safetensors").write_bytes(tensors)
        return case_dir

    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = vm + (args.memory_mib << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    common = settings(max_examples=25, database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=False)
    names = sorted(arts)
    values = json_values(refs)

    @common
    @given(data=hs.data())
    def manifest_case(data):
        name = data.draw(hs.sampled_from(names))
        m = json.loads(pristine[name][0])
        for _ in range(data.draw(hs.integers(1, 3))):
            p = data.draw(hs.sampled_from(paths(m)))
            m = set_at(m, p, data.draw(values), delete=data.draw(hs.booleans()) and bool(p))
        text = json.dumps(m).encode()
        if data.draw(hs.integers(0, 9)) == 0:  # raw byte damage too
            i = data.draw(hs.integers(0, max(len(text) - 1, 0)))
            text = text[:i] + data.draw(hs.binary(max_size=4)) + text[i + data.draw(hs.integers(0, 4)):]
        path = lay(name, text, pristine[name][1])
        how = data.draw(hs.sampled_from(["model", "no-model", "inspect"]))
        if how == "model":
            stats.outcome("manifest", lambda: st.load(path, model=bases[name]))
        elif how == "no-model":
            stats.outcome("manifest", lambda: st.load(path))
        else:
            def inspect():
                code = run_cli("inspect", path)
                if code not in (0, 2):
                    raise RuntimeError(f"shrink inspect exited {code}")
            stats.outcome("manifest", inspect)

    @common
    @given(data=hs.data())
    def header_case(data):
        name = data.draw(hs.sampled_from(names))
        raw = pristine[name][1]
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        body = raw[8 + n :]
        for _ in range(data.draw(hs.integers(1, 3))):
            p = data.draw(hs.sampled_from(paths(header)))
            header = set_at(header, p, data.draw(values), delete=data.draw(hs.booleans()) and bool(p))
        hb = json.dumps(header).encode()
        length = data.draw(hs.one_of(hs.just(len(hb)), hs.integers(0, 2**64 - 1)))
        body = body[: data.draw(hs.integers(0, len(body)))] if data.draw(hs.booleans()) else body
        tensors = length.to_bytes(8, "little") + hb + body
        m = json.loads(pristine[name][0])
        # the checksum and size made to match, so the header itself is what is read
        import hashlib

        m["tensors"].update(sha256=hashlib.sha256(tensors).hexdigest(), bytes=len(tensors))
        path = lay(name, json.dumps(m).encode(), tensors)
        stats.outcome("safetensors header", lambda: st.load(path, model=bases[name]))

    counts = hs.one_of(hs.integers(0, 4096), hs.sampled_from([2**31, 2**40, 2**62, 10**12]))

    @common
    @given(stream=hs.binary(max_size=256), bits=hs.integers(1, 16), signed=hs.booleans(), count=counts)
    def bitpack_case(stream, bits, signed, count):
        t = torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else torch.empty(0, dtype=torch.uint8)
        stats.outcome("codec/bitpack", lambda: bitpack.unpack(t, bits, signed, count))

    @common
    @given(stream=hs.binary(max_size=256), table=hs.binary(min_size=1, max_size=256), count=counts)
    def huffman_case(stream, table, count):
        s = torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else torch.empty(0, dtype=torch.uint8)
        lens = torch.frombuffer(bytearray(table), dtype=torch.uint8)
        stats.outcome("codec/huffman", lambda: huffman.decode(s, lens, count))

    spec_values = hs.one_of(counts, hs.sampled_from(["bitmask", "relative", "x", None]), hs.lists(counts, max_size=3))

    @common
    @given(index=hs.binary(max_size=128), nvalues=hs.integers(0, 300), bits=hs.integers(-1, 20), n=counts,
           spec=hs.dictionaries(hs.sampled_from(["shape", "kept", "encoding", "index_bits", "bits"]), spec_values, max_size=5))
    def sparse_case(index, nvalues, bits, n, spec):
        idx = torch.frombuffer(bytearray(index), dtype=torch.uint8) if index else torch.empty(0, dtype=torch.uint8)
        vals = torch.randn(nvalues)
        stats.outcome("codec/sparse", lambda: sparse.decode_sparse(vals, idx, spec))
        stats.outcome("codec/sparse", lambda: sparse.decode_relative(idx, n, bits))

    targets = [("manifest", manifest_case), ("safetensors header", header_case), ("codec/bitpack", bitpack_case),
               ("codec/huffman", huffman_case), ("codec/sparse", sparse_case)]
    seconds = {}
    for label, fn in targets:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            fn()
        seconds[label] = round(time.perf_counter() - t0, 1)

    executions = marker.read_text().count("\n") if marker.exists() else 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    command = ".venv/bin/python benchmarks/fuzz_artifact.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    report = {
        "date": today(),
        "machine": machine_info(threads=1),
        "git": git_state(),
        "command": command.strip(),
        "seconds_per_target": args.seconds,
        "fixtures": sorted(arts),
        "memory_limit_mib_above_baseline": args.memory_mib,
        "targets": {label: {"cases": stats.cases.get(label, 0), "refused": stats.refused.get(label, 0),
                            "accepted": stats.loaded.get(label, 0), "seconds": seconds[label]} for label, _ in targets},
        "cases": sum(stats.cases.values()),
        "crashes": len(stats.crashes),
        "crash_examples": stats.crashes[:5],
        "code_executions": executions,
        "peak_rss_mib": round(peak / 1024, 1),
        "peak_rss_growth_mib": round((peak - rss_before) / 1024, 1),
    }
    ok = not stats.crashes and not executions
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    else:
        write_results(RESULTS_DIR / "fuzz_artifact.json", report, markdown(report, ok))
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


def markdown(r: dict, ok: bool) -> str:
    m = r["machine"]
    lines = [f"Measured {r['date']} on {m['cpu']} ({m['cores']} cores, 1 thread), Python {m['python']}, torch "
             f"{m['torch']}; commit {str(r['git']['commit'])[:10]}. Reproduce with `{r['command']}` (or "
             "`.venv/bin/python benchmarks/run_all.py`).", "",
             f"{r['seconds_per_target']:g} s per target under RLIMIT_AS = baseline + {r['memory_limit_mib_above_baseline']} MiB; "
             f"manifests and headers mutated from {len(r['fixtures'])} artifacts ({', '.join(r['fixtures'])}).", "",
             "| target | cases | refused (ArtifactError) | accepted | seconds |", "|---|---:|---:|---:|---:|"]
    for name, t in r["targets"].items():
        lines.append(f"| {name} | {t['cases']:,} | {t['refused']:,} | {t['accepted']:,} | {t['seconds']:g} |")
    lines += ["", "| figure | value |", "|---|---:|", f"| cases tried | {r['cases']:,} |", f"| crashes | {r['crashes']} |",
              f"| code executions (planted module) | {r['code_executions']} |",
              f"| peak memory (RSS) | {r['peak_rss_mib']:,} MiB ({r['peak_rss_growth_mib']:+,} MiB while fuzzing) |", "",
              "| target | result |", "|---|---|", f"| no crash, no code execution | {'pass' if ok else 'FAIL'} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
