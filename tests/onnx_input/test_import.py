"""load_onnx: an ONNX graph as a PyTorch module that computes what ONNX Runtime computes on the original,
with its weight layers as real torch layers; bad files refused with a typed error (exit 2 on the CLI)."""

import io
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.cli import main
from shrinktunnel.core.history import get_record
from shrinktunnel.core.refs import load_model
from shrinktunnel.onnx_input import OnnxFileError, UnsupportedOpError, load_onnx

import graphs

RNG = np.random.default_rng(1)


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("opset", range(11, 22))
def test_opsets_11_to_21_match_onnx_runtime(tmp_path, opset):
    for model, shape in ((graphs.cnn(opset), (3, 3, 16, 16)), (graphs.cnn(opset, nhwc=True), (3, 16, 16, 3)),
                         (graphs.misc(opset), (2, 3, 6, 5))):
        x = RNG.standard_normal(shape).astype(np.float32)
        m = load_onnx(_save(model, tmp_path / "m.onnx"))
        with torch.no_grad():
            got = m(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, _ort(model, {"x": x})[0], rtol=0, atol=1e-5)


def test_weight_layers_are_torch_layers_and_every_method_sees_them(tmp_path):
    m = load_onnx(_save(graphs.cnn(17), tmp_path / "cnn.onnx"))
    layers = {n: type(mod) for n, mod in m.named_modules() if n}
    assert layers == {"conv1": nn.Conv2d, "dw": nn.Conv2d, "fc": nn.Linear}  # BN folded into conv1; dw's pads stay outside
    x = torch.randn(16, 3, 16, 16)
    q = st.quantize(m, st.QuantConfig(), data=[x[:8], x[8:]])
    cov = get_record(q)["stages"][-1]["coverage"]
    assert cov["done_layers"] == cov["eligible_layers"] == 3
    with torch.no_grad():
        ref, out = m(x), q(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert sqnr > 20, sqnr


def test_multiple_inputs_outputs_and_matmul_bias_as_one_linear(tmp_path):
    model = graphs.two_in_two_out(20)
    m = load_onnx(_save(model, tmp_path / "enc.onnx"))
    assert isinstance(m.proj, nn.Linear) and m.proj.bias is not None  # MatMul + Add(bias) -> one Linear
    ids = RNG.integers(0, 50, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 4:] = 0
    ref = _ort(model, {"ids": ids, "mask": mask})
    with torch.no_grad():
        by_name = m(ids=torch.from_numpy(ids), mask=torch.from_numpy(mask))
        by_position = m(torch.from_numpy(ids), torch.from_numpy(mask))
    for r, a, b in zip(ref, by_name, by_position):
        np.testing.assert_allclose(a.numpy(), r, rtol=0, atol=1e-5)
        assert torch.equal(a, b)
    with pytest.raises(st.DataError, match="needs inputs"):
        m(torch.from_numpy(ids))


def test_external_data_is_read_from_the_model_directory_only(tmp_path):
    model = graphs.cnn(17)
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.bin", size_threshold=0)
    x = RNG.standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        got = load_onnx(tmp_path / "ext.onnx")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(graphs.cnn(17), {"x": x})[0], rtol=0, atol=1e-5)

    outside = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    for t in outside.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../ext.bin"
    (tmp_path / "sub").mkdir()
    onnx.save(outside, str(tmp_path / "sub" / "escape.onnx"))
    with pytest.raises(OnnxFileError, match="outside the model's directory"):
        load_onnx(tmp_path / "sub" / "escape.onnx")

    data = (tmp_path / "ext.bin").read_bytes()
    (tmp_path / "ext.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxFileError, match="truncated"):
        load_onnx(tmp_path / "ext.onnx")


def _bad_files(tmp_path) -> dict[str, tuple]:
    good = graphs.cnn(17).SerializeToString()
    (tmp_path / "text.onnx").write_text("def f():\n    return 1\n")
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    old = graphs.cnn(13)
    old.opset_import[0].version = 10
    new = graphs.cnn(13)
    new.opset_import[0].version = 22
    _save(old, tmp_path / "op10.onnx")
    _save(new, tmp_path / "op22.onnx")
    return {"text.onnx": "not an ONNX model", "cut.onnx": "truncated", "op10.onnx": "opset 10; supported are 11..21",
            "op22.onnx": "opset 22; supported are 11..21", "missing.onnx": "does not exist"}


def test_bad_files_raise_a_typed_error_naming_the_problem(tmp_path):
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(OnnxFileError, match=words):
            load_onnx(tmp_path / name)
        with pytest.raises(st.ModelError, match=words):  # the CLI's MODEL loader: the same error
            load_model(str(tmp_path / name))


def test_cli_exits_2_with_one_line_on_bad_onnx(tmp_path):
    files = _bad_files(tmp_path)
    for name, words in files.items():
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exc:
            main(["analyze", str(tmp_path / name), "--data", "x.npz"])
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert exc.value.code == 2, err.getvalue()
        assert len(lines) == 1 and words.split(";")[0] in lines[0], lines
        assert "Traceback" not in err.getvalue()


@pytest.mark.parametrize("op,domain,named", [("If", "", "If"), ("LinearClassifier", "ai.onnx.ml", "ai.onnx.ml.LinearClassifier"),
                                             ("NoSuchOp", "", "NoSuchOp")])
def test_unsupported_operator_is_named(tmp_path, op, domain, named):
    with pytest.raises(UnsupportedOpError, match=named) as exc:
        load_onnx(_save(graphs.with_op(op, domain), tmp_path / "u.onnx"))
    assert exc.value.ops == [named]
    assert "quantize_onnx" in str(exc.value)  # the way that still works


def test_loading_runs_no_code_and_records_the_file(tmp_path):
    path = _save(graphs.cnn(17), tmp_path / "m.onnx")
    record = get_record(load_onnx(path))
    assert record["model_ref"] == str((tmp_path / "m.onnx").resolve())
    assert len(record["ref_sha256"]) == 64
    with pytest.raises(OnnxFileError, match="changed since"):
        load_onnx(path, expect_sha256="0" * 64)
