"""export/runtimes.py: the same int8 model in ONNX Runtime, OpenVINO and ExecuTorch (XNNPACK), against
PyTorch; the CLI's --openvino / --executorch / eval --backend; a missing runtime names its package."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import FACTORIES, run_cli, runtime_installed
from shrinktunnel.export import runtimes as R


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.pool, self.fc = nn.Conv2d(1, 6, 3), nn.MaxPool2d(2), nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def int8():
    torch.manual_seed(1)
    x = torch.randn(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = st.quantize(_Net().eval(), {}, data=[torch.randn(16, 1, 8, 8)], progress=False).eval()
    with torch.no_grad():
        return q, x, q(x)


openvino = pytest.mark.skipif(not runtime_installed("openvino"), reason="openvino not installed (scripts/install.sh installs it)")
executorch = pytest.mark.skipif(not runtime_installed("executorch"), reason="executorch not installed (scripts/install.sh "
                                "installs it into .venv/executorch-extra)")


def test_ort_session_matches_pytorch(int8, tmp_path):
    q, x, want = int8
    s = R.session(q, "ort", example_inputs=x, work_dir=tmp_path)
    step = q.fc.output_quant.scale  # an output may land one step away where it lies on a rounding boundary
    np.testing.assert_allclose(s(x).numpy(), want.numpy(), rtol=0, atol=1.01 * step)
    assert s.latency(x, warmup=1, runs=2).median_ms > 0


@openvino
def test_openvino_runs_the_int8_export_and_its_ir_round_trips(int8, tmp_path):
    q, x, want = int8
    s = R.session(q, "openvino", example_inputs=x, work_dir=tmp_path, precision="f32")
    got = s(x)
    # OpenVINO's int8 kernels requantize in their own order: within 2 % of the output range, same top-1
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
    assert torch.equal(got.argmax(1), want.argmax(1))
    xml = R.export(q, tmp_path / "ir" / "m.xml", "openvino", x)
    assert sorted(p.name for p in xml.parent.iterdir()) == ["m.bin", "m.xml"]  # no temporary left
    np.testing.assert_allclose(R.session(xml, "openvino", precision="f32")(x).numpy(), got.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # lowering takes 20 s and more here; benchmarks/runtimes.py runs it on the MNIST CNN and MiniLM
@executorch
def test_executorch_lowers_our_static_int8_layers_exactly(int8, tmp_path):
    q, x, want = int8
    s = R.session(q, "executorch", example_inputs=x, work_dir=tmp_path)
    assert s.input_names == ["input_0"]
    # the project's own scales and integers in XNNPACK's kernels: the same outputs, up to one output step
    # where a float result lies on a rounding boundary
    got = s(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1.01 * q.fc.output_quant.scale)
    assert float((got - want).abs().gt(1e-6).float().mean()) <= 0.1


def test_a_missing_runtime_names_its_package(without_openvino, tmp_path):
    with pytest.raises(R.RuntimeMissingError, match="pip install openvino"):
        R.session(tmp_path / "m.onnx", "openvino")
    with pytest.raises(st.errors.ExportError, match="unknown runtime 'tflite'"):
        R.require("tflite")
    code, err = _cli("export", tmp_path / "nowhere", "--openvino", tmp_path / "m.xml")
    assert code == 2 and "openvino" in err and "pip install openvino" in err and "Traceback" not in err
    assert not (tmp_path / "m.xml").exists()


def _cli(*args) -> tuple[int, str]:
    code, _, err = run_cli(*args)
    return code, err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from shrinktunnel.core.refs import load_model

    d = tmp_path_factory.mktemp("rt-cli")
    model = load_model(f"{FACTORIES}:mlp")
    x = torch.randn(32, 6)
    st.compress(model, [st.QuantConfig()], data=[x], example_inputs=x, progress=False).save(d / "a")
    np.savez(d / "data.npz", x=x.numpy(), y=np.zeros(32, dtype=np.int64))
    return d


@pytest.mark.slow  # two exports; the default suite checks the IR round trip above
@openvino
def test_cli_export_writes_openvino_ir(artifact, tmp_path):
    code, err = _cli("export", artifact / "a", "--openvino", tmp_path / "m.xml", "--model", f"{FACTORIES}:mlp")
    assert code == 0, err
    assert (tmp_path / "m.xml").is_file() and (tmp_path / "m.bin").is_file()
    code, err = _cli("export", artifact / "a", "--openvino", tmp_path / "other.bin", "--model", f"{FACTORIES}:mlp")
    assert code == 2 and "--openvino" in err and ".xml" in err


def test_cli_export_needs_an_output_and_eval_names_an_unknown_backend(artifact):
    code, err = _cli("export", artifact / "a", "--model", f"{FACTORIES}:mlp")
    assert code == 2 and "--onnx" in err and "--executorch" in err
    code, err = _cli("eval", artifact / "a", "--data", artifact / "data.npz", "--backend", "tensorrt",
                     "--model", f"{FACTORIES}:mlp")
    assert code == 2 and "tensorrt" in err and "inductor" in err
