"""The `shrink` command line: the good path end to end, and every bad input as exit code 2 with one
line on stderr, no traceback, and nothing written at --out.

Most calls go through `shrinktunnel.cli.main` in-process (the exact function behind the console
script, fast); a few run the installed `shrink` executable to check what a user's terminal shows.
"""

import json
import os
import subprocess

import numpy as np
import onnx
import pytest
import torch

import shrinktunnel as st
from conftest import FACTORIES, VENV_BIN, dir_bytes, hidden_entries, state_dicts_equal, run_cli
from shrinktunnel.core.refs import load_data, load_model
from shrinktunnel.measure import accuracy
from shrinktunnel.report import fmt_pct

SHRINK = VENV_BIN / "shrink"
MLP = f"{FACTORIES}:mlp"




def run_shrink(*args, cwd, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([str(SHRINK), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-files")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    with torch.no_grad():
        y = load_model(MLP)(x).argmax(dim=1)  # labels = the float model's own predictions
    np.savez(d / "good.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "wrong.npz", x=torch.randn(40, 5, generator=g).numpy(), y=y.numpy())
    np.savez(d / "empty.npz", x=np.zeros((0, 6), np.float32))
    np.savez(d / "no_x.npz", a=np.zeros((3, 6), np.float32))
    (d / "recipe.yaml").write_text("stages:\n  - quantize: {}\n")
    (d / "typo.yaml").write_text("stages:\n  - quantize: {weightz: {bits: 8}}\n")
    (d / "invalid.yaml").write_text("stages:\n  - quantize: {a: [1, 2\n")
    return d


@pytest.fixture(scope="module")
def artifact(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-out") / "mlp-int8"
    code, stdout, err = run_cli("compress", MLP, "--recipe", files / "recipe.yaml", "--data", files / "good.npz",
                                "--eval-data", files / "good.npz", "--out", out)
    assert code == 0, err
    assert "artifact written to" in stdout
    return out


# -- good path ----------------------------------------------------------------------------------------
def test_compress_writes_the_artifact_and_reports(artifact, files):
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.safetensors", "report.json", "report.md"]
    assert hidden_entries(artifact.parent) == []
    report = json.loads((artifact / "report.json").read_text())
    assert report["model"]["ref"] == MLP and report["format"] == "shrinktunnel-artifact"
    assert report["stages"][0]["method"] == "quantize"
    assert report["metrics"]["before"]["metric"] == 1.0  # labels are the float model's predictions
    assert report["metrics"]["after"]["metric"] >= 0.9
    assert "before / after" in (artifact / "report.md").read_text()


def test_compress_gives_what_the_python_api_gives(artifact, files):
    loaded = st.load(artifact, trust_code=True)  # rebuilt from the recorded file reference, no model passed
    expected = st.quantize(load_model(MLP), data=load_data(str(files / "good.npz")), progress=False)
    assert state_dicts_equal(loaded, expected)


def test_inspect(artifact):
    code, out, err = run_cli("inspect", artifact)
    assert code == 0, err
    assert "shrinktunnel artifact v1" in out and "quantize" in out
    assert "linear" in out and "16x6" in out and "3x16" in out
    assert str(len((artifact / "model.safetensors").read_bytes()) + len((artifact / "manifest.json").read_bytes())) \
        in out.replace(",", "")  # the artifact's size in bytes


def test_export(artifact, tmp_path, files):
    onnx_path = tmp_path / "deep" / "mlp.onnx"
    code, out, err = run_cli("export", artifact, "--onnx", onnx_path, "--model", MLP)  # consent: the original model
    assert code == 0, err
    graph = onnx.load(str(onnx_path))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    from shrinktunnel.export import OrtModel

    x = load_data(str(files / "good.npz"))[0][0][:3]
    got = OrtModel(onnx_path)(x)
    assert got.shape == (3, 3)  # exported from zeros of batch 2, run at batch 3


def test_eval(artifact, files):
    code, out, err = run_cli("eval", artifact, "--data", files / "good.npz", "--threads", "1", "--trust-model-code")
    assert code == 0, err
    expected = accuracy(st.load(artifact, trust_code=True), load_data(str(files / "good.npz")))
    row = next(line for line in out.splitlines() if "accuracy, PyTorch" in line)
    assert fmt_pct(expected) in row
    assert any("accuracy, ONNX Runtime" in line for line in out.splitlines())
    assert "latency, ONNX Runtime" in out


def test_existing_artifact_needs_force(artifact, files):
    before = dir_bytes(artifact)
    args = ("compress", MLP, "--recipe", files / "recipe.yaml", "--data", files / "good.npz", "--out", artifact)
    code, _, err = run_cli(*args)
    assert_one_line_error(code, err, "already exists", "--force")
    assert dir_bytes(artifact) == before
    code, _, err = run_cli(*args, "--force")
    assert code == 0, err
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.safetensors", "report.json", "report.md"]


# -- bad input ------------------------------------------------------------------------------------------
BAD_COMPRESS = [
    pytest.param(lambda f: ("missing_model.py:make", f / "recipe.yaml", f / "good.npz"), ["missing_model.py", "does not exist"], id="missing-model-file"),
    pytest.param(lambda f: (f"{FACTORIES}:no_such_factory", f / "recipe.yaml", f / "good.npz"), ["no callable 'no_such_factory'"], id="missing-factory"),
    pytest.param(lambda f: (f"{FACTORIES}:raising_factory", f / "recipe.yaml", f / "good.npz"), ["the factory failed"], id="factory-raises"),
    pytest.param(lambda f: (MLP, f / "typo.yaml", f / "good.npz"), ["'weightz'", "did you mean 'weights'?"], id="unknown-recipe-key"),
    pytest.param(lambda f: (MLP, f / "nope.yaml", f / "good.npz"), ["nope.yaml", "does not exist"], id="missing-recipe-file"),
    pytest.param(lambda f: (f"{FACTORIES}:broken_forward", f / "recipe.yaml", f / "good.npz"), ["forward failed", "(40, 6)"], id="forward-fails"),
    pytest.param(lambda f: (MLP, f / "recipe.yaml", f / "wrong.npz"), ["forward failed", "(40, 5)"], id="wrong-data-shape"),
    pytest.param(lambda f: (MLP, f / "recipe.yaml", f / "empty.npz"), ["empty.npz", "empty"], id="empty-data"),
    pytest.param(lambda f: (MLP, f / "recipe.yaml", f / "no_x.npz"), ["'x'"], id="data-without-x"),
    pytest.param(lambda f: (MLP, f / "recipe.yaml", f / "missing.npz"), ["missing.npz", "does not exist"], id="missing-data-file"),
    pytest.param(lambda f: (MLP, f / "invalid.yaml", f / "good.npz"), ["not valid YAML"], id="invalid-yaml"),
    pytest.param(lambda f: (f"{FACTORIES}:raising_factory_multiline", f / "recipe.yaml", f / "good.npz"), ["first line"],
                 id="factory-raises-multiline"),
]


@pytest.mark.parametrize("make_args, fragments", BAD_COMPRESS)
def test_bad_compress_input_is_one_line_exit_2_and_writes_nothing(files, tmp_path, make_args, fragments):
    model, recipe, data = make_args(files)
    out = tmp_path / "out" / "artifact"
    code, _, err = run_cli("compress", model, "--recipe", recipe, "--data", data, "--out", out)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists() and not out.parent.exists()


def test_out_that_is_someone_elses_directory_is_refused(files, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli("compress", MLP, "--recipe", files / "recipe.yaml", "--data", files / "good.npz", "--out", out)
    assert_one_line_error(code, err, "not an earlier shrinktunnel output")
    assert dir_bytes(out) == {"notes.txt": b"keep me"}


@pytest.mark.parametrize("verb", ["inspect", "export", "eval"])
def test_nonexistent_artifact(verb, tmp_path, files):
    missing = tmp_path / "no-artifact"
    extra = {"inspect": (), "export": ("--onnx", tmp_path / "m.onnx"), "eval": ("--data", files / "good.npz")}[verb]
    code, _, err = run_cli(verb, missing, *extra)
    assert_one_line_error(code, err, "no-artifact", "does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["inspect", "export", "eval"])
def test_directory_that_is_not_an_artifact(verb, tmp_path, files):
    d = tmp_path / "plain"
    d.mkdir()
    extra = {"inspect": (), "export": ("--onnx", tmp_path / "m.onnx"), "eval": ("--data", files / "good.npz")}[verb]
    code, _, err = run_cli(verb, d, *extra)
    assert_one_line_error(code, err, "has no manifest.json")
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_an_artifact_without_input_signature(tmp_path):
    path = st.save(load_model(MLP), tmp_path / "float")  # saved directly: no inputs recorded
    code, _, err = run_cli("export", path, "--onnx", tmp_path / "m.onnx", "--model", MLP)
    assert_one_line_error(code, err, "records no input signature")
    assert not (tmp_path / "m.onnx").exists()


def test_debug_shows_the_traceback(files, tmp_path):
    code, _, err = run_cli("--debug", "compress", MLP, "--recipe", files / "typo.yaml", "--data", files / "good.npz",
                           "--out", tmp_path / "o")
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_usage_errors_exit_2():
    code, _, err = run_cli("compress")
    assert code == 2 and "Missing argument" in err


# -- the installed executable ---------------------------------------------------------------------------
def test_executable_bad_input_prints_one_line(files, tmp_path):
    proc = run_shrink("compress", "missing_model.py:make", "--recipe", files / "recipe.yaml", "--data", files / "good.npz",
                      "--out", tmp_path / "out", cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "missing_model.py", "does not exist")
    assert sorted(os.listdir(tmp_path)) == []


def test_executable_debug_prints_the_traceback(files, tmp_path):
    proc = run_shrink("--debug", "inspect", tmp_path / "nothing", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ArtifactError" in proc.stderr


def test_executable_eval_with_wrong_data_shape_prints_one_line(artifact, files, tmp_path):
    proc = run_shrink("eval", artifact, "--data", files / "wrong.npz", "--model", MLP, cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "(40, 5)")
