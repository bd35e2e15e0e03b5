"""`st.auto(..., runtime=...)` / `shrink auto --runtime`: candidates are timed and the chosen one checked in
the runtime named (ONNX Runtime, OpenVINO, ExecuTorch), and the result says which; a runtime whose package
is missing is a ConfigError naming it (exit code 2 on the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_cli, runtime_installed
from shrinktunnel.errors import ConfigError, ExportError
from shrinktunnel.export import runtimes as R
from shrinktunnel.search import auto


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


def tiny_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 8, 8, generator=g) for _ in range(2)]


@pytest.fixture
def sessions(monkeypatch):
    """Every runtime session the search opens, as (runtime, file suffix)."""
    opened: list[tuple[str, str]] = []
    real = R.session

    def spy(path_or_model, runtime="ort", **kwargs):
        opened.append((runtime, Path(path_or_model).suffix))
        return real(path_or_model, runtime, **kwargs)

    monkeypatch.setattr(R, "session", spy)
    return opened


def _search(runtime: str, **extra):
    return auto(tiny_cnn(), tiny_data(), max_drop=0.05, min_speedup=0.01, actions=["quant8"], progress=False,
                max_evaluations=1, uniform=True, runtime=runtime, **extra)


def _check_timed_in(r, runtime: str, sessions: list[tuple[str, str]], suffix: str) -> None:
    c = r.candidates[r.chosen]
    assert r.fits and c["plan"], r.message
    assert r.runtime == runtime and r.to_dict()["runtime"] == runtime
    timed = [x for x in r.candidates if "latency_ms" in x]
    assert len(timed) >= 2 and all(x["runtime"] == runtime for x in timed)  # the original and the candidate
    assert c["runtime"] == runtime and c["runtime_latency_ms"] > 0 and c["runtime_metric"] >= r.baseline - 0.05
    # every session the search opened (timing, paired timing, the check of the chosen one) was this runtime's
    assert sessions and set(sessions) == {(runtime, suffix)}
    assert R.NAMES[runtime] in r.message


def test_auto_times_and_checks_in_onnx_runtime_by_default(sessions):
    r = auto(tiny_cnn(), tiny_data(), max_drop=0.05, min_speedup=0.01, actions=["quant8"], progress=False,
             max_evaluations=1)
    _check_timed_in(r, "ort", sessions, ".onnx")


@pytest.mark.skipif(not runtime_installed("openvino"), reason="openvino not installed (scripts/install.sh installs it)")
def test_auto_times_and_checks_candidates_in_openvino(sessions):
    r = _search("openvino")
    _check_timed_in(r, "openvino", sessions, ".onnx")  # OpenVINO reads the exported ONNX file itself


@pytest.mark.slow  # every candidate is lowered to XNNPACK: 20 s and more each here
@pytest.mark.skipif(not runtime_installed("executorch"), reason="executorch not installed (scripts/install.sh)")
def test_auto_times_and_checks_candidates_in_executorch(sessions):
    r = _search("executorch")
    _check_timed_in(r, "executorch", sessions, ".pte")


def test_an_unknown_or_missing_runtime_is_a_config_error(without_openvino, tmp_path):
    with pytest.raises(ConfigError, match="unknown runtime 'tflite'.*ort, openvino, executorch"):
        _search("tflite")
    with pytest.raises(ConfigError, match="'openvino'.*pip install openvino"):
        _search("openvino")
    code, _, err = run_cli("auto", "shrinktunnel.assets:mnist_cnn", "--data", tmp_path / "none.npz", "--max-drop",
                           "0.01", "--runtime", "openvino", "--out", tmp_path / "out")
    assert code == 2 and "pip install openvino" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the search on a real model and data through the command line
@pytest.mark.skipif(not runtime_installed("openvino"), reason="openvino not installed")
def test_cli_auto_runtime_openvino_records_it(tmp_path):
    x = torch.cat(tiny_data()).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(len(x), dtype=np.int64))
    code, _, err = run_cli("auto", f"{Path(__file__)}:tiny_cnn", "--data", tmp_path / "d.npz", "--batch-size", 8,
                           "--max-drop", "0.05", "--min-speedup", "0.01", "--actions", "quant8", "--runtime",
                           "openvino", "--max-evaluations", 1, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "auto.json").read_text())["runtime"] == "openvino"


def test_executorch_session_runs_other_batch_sizes_in_program_slices():
    """A .pte program has static shapes: a batch of another size runs in slices of the program's batch,
    the last padded, and only the batch's outputs come back; other dims differing is an ExportError."""
    calls: list[tuple[int, ...]] = []

    def execute(feed):
        calls.append(feed[0].shape)
        return [feed[0].reshape(feed[0].shape[0], -1).sum(1, keepdims=True) * 2]

    x = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    out = R._in_program_batches(execute, [x], [(4, 3)], Path("m.pte"))
    np.testing.assert_array_equal(out[0], x.sum(1, keepdims=True) * 2)
    assert calls == [(4, 3)] * 3  # 4 + 4 + 2 padded to 4
    with pytest.raises(ExportError, match=r"static.*only the batch dimension may differ"):
        R._in_program_batches(execute, [np.zeros((4, 5), np.float32)], [(4, 3)], Path("m.pte"))
