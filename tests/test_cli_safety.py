"""The CLI keeps its promise (issue 16, point 4 and 5): every bad input is one line and exit code 2
before any work, `shrink auto` exits 3 when nothing meets the budget, outputs are never overwritten
without --force, and a second identical `shrink analyze` on a `file.py:factory` model reads every
evaluation from the cache, in a new process.
"""

import json
import os
import re
import subprocess
import time

import numpy as np
import pytest
import torch

from conftest import FACTORIES, VENV_BIN, dir_bytes
from shrinktunnel.cli_commands import EXIT_NO_CANDIDATE
from shrinktunnel.core.refs import load_model
from test_cli import assert_one_line_error, run_cli

MLP = f"{FACTORIES}:mlp"


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("safety")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g)
    with torch.no_grad():
        y = load_model(MLP)(x).argmax(dim=1)
    np.savez(d / "good.npz", x=x.numpy(), y=y.numpy())
    np.savez(d / "wrong.npz", x=torch.randn(32, 5, generator=g).numpy(), y=y.numpy())
    np.savez(d / "bad_labels.npz", x=x.numpy(), y=np.full(32, 99, np.int64))
    np.savez(d / "float_labels.npz", x=x.numpy(), y=np.zeros(32, np.float32))
    np.savez(d / "unlabelled.npz", x=x.numpy())
    (d / "recipe.yaml").write_text("stages:\n  - quantize: {}\n")
    return d


def compress_args(d, out, *extra):
    return ("compress", MLP, "--recipe", d / "recipe.yaml", "--data", d / "good.npz", "--out", out, *extra)


@pytest.mark.parametrize("verb", ["compress", "analyze", "auto"])
@pytest.mark.parametrize("option, fixture, fragment", [
    ("--eval-data", "wrong.npz", "(32, 5)"),
    ("--eval-data", "unlabelled.npz", "no labels"),
    ("--eval-data", "float_labels.npz", "integer class indices"),
    ("--data", "wrong.npz", "(32, 5)"),
])
def test_every_data_argument_is_checked_before_the_work(d, tmp_path, monkeypatch, verb, option, fixture, fragment):
    import shrinktunnel.cli_commands as C
    import shrinktunnel.search as S

    def no_work(*a, **k):
        raise AssertionError("the work started before the data was checked")

    monkeypatch.setattr(C, "compress", no_work)
    monkeypatch.setattr(S, "analyze", no_work)
    monkeypatch.setattr(S, "auto", no_work)
    out = tmp_path / "out"
    data = d / (fixture if option == "--data" else "good.npz")
    args = {"compress": ("compress", MLP, "--recipe", d / "recipe.yaml"), "analyze": ("analyze", MLP, "--no-cache"),
            "auto": ("auto", MLP, "--max-drop", "1%")}[verb]
    extra = (option, d / fixture) if option != "--data" else ()
    code, _, err = run_cli(*args, "--data", data, "--out", out, *extra)
    assert_one_line_error(code, err, option, fragment)
    assert not out.exists()


@pytest.mark.parametrize("option", ["--verify-data", "--train-data"])
def test_auto_checks_verify_and_train_data_first(d, tmp_path, option):
    out = tmp_path / "out"
    code, _, err = run_cli("auto", MLP, "--data", d / "good.npz", "--max-drop", "1%", "--out", out, option, d / "wrong.npz")
    assert_one_line_error(code, err, option, "(32, 5)")
    assert not out.exists()


@pytest.mark.parametrize("verb", ["compress", "analyze", "auto"])
def test_unwritable_out_is_refused_before_the_work(d, tmp_path, verb):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "sub" / "out"  # its parent is a regular file: nothing can be written there
    args = {"compress": ("compress", MLP, "--recipe", d / "recipe.yaml"), "analyze": ("analyze", MLP, "--no-cache"),
            "auto": ("auto", MLP, "--max-drop", "1%")}[verb]
    t = time.perf_counter()
    code, _, err = run_cli(*args, "--data", d / "good.npz", "--out", out)
    assert_one_line_error(code, err, "cannot be written", "a-file")
    assert time.perf_counter() - t < 5
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_out_parent_is_refused(d, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run_cli(*compress_args(d, ro / "out"))
        assert_one_line_error(code, err, "cannot be written")
    finally:
        ro.chmod(0o755)


def test_auto_exits_3_when_no_candidate_meets_the_budget(d, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli("auto", f"{FACTORIES}:wide_mlp", "--data", d / "good.npz", "--max-drop", "0",
                                "--actions", "quant2", "--out", out, "--cache-dir", tmp_path / "cache")
    assert code == EXIT_NO_CANDIDATE == 3, err
    assert "no candidate meets the budget" in err.strip().splitlines()[-1]
    assert json.loads((out / "auto.json").read_text())["fits"] is False  # complete, marked, never half-written
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()


def test_auto_keeps_the_original_when_no_action_makes_a_layer_smaller(d, tmp_path):
    # SmallMLP's 96- and 48-weight layers: 2-bit codes plus their scales and manifest keys cost more bytes
    code, stdout, err = run_cli("auto", MLP, "--data", d / "good.npz", "--max-drop", "0", "--actions", "quant2",
                                "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "no action makes any layer cheaper" in stdout + err


def test_export_refuses_to_overwrite_without_force(d, tmp_path):
    art = tmp_path / "art"
    assert run_cli(*compress_args(d, art))[0] == 0
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"precious")
    code, _, err = run_cli("export", art, "--onnx", onnx, "--model", MLP)
    assert_one_line_error(code, err, "already exists", "--force")
    assert onnx.read_bytes() == b"precious"
    code, _, err = run_cli("export", art, "--onnx", onnx, "--model", MLP, "--force")
    assert code == 0, err
    assert onnx.read_bytes() != b"precious"
    code, _, err = run_cli("export", art, "--onnx", tmp_path, "--model", MLP, "--force")
    assert_one_line_error(code, err, "is a directory")


def test_analyze_refuses_a_foreign_directory_and_needs_force_to_replace(d, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    base = ("analyze", MLP, "--data", d / "good.npz", "--actions", "quant8", "--no-cache")
    code, _, err = run_cli(*base, "--out", precious, "--force")
    assert_one_line_error(code, err, "not an earlier shrinktunnel output")
    assert dir_bytes(precious) == {"notes.txt": b"keep"}
    out = tmp_path / "analysis"
    assert run_cli(*base, "--out", out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["analysis.html", "analysis.json"]
    before = dir_bytes(out)
    code, _, err = run_cli(*base, "--out", out)
    assert_one_line_error(code, err, "already exists", "--force")
    assert dir_bytes(out) == before
    code, _, err = run_cli(*base, "--out", out, "--force")
    assert code == 0, err


def test_labels_outside_the_models_classes_warn(d, tmp_path):
    code, out, err = run_cli(*compress_args(d, tmp_path / "a", "--eval-data", d / "bad_labels.npz"))
    assert code == 0, err
    warning = next(line for line in out.splitlines() if "labels span" in line)
    assert "[99, 99]" in warning and "3 classes" in warning
    code, out, err = run_cli(*compress_args(d, tmp_path / "b", "--eval-data", d / "good.npz"))
    assert code == 0 and "labels span" not in out


def test_inspect_of_an_existing_file(tmp_path):
    f = tmp_path / "x.onnx"
    f.write_bytes(b"x")
    code, _, err = run_cli("inspect", f)
    assert_one_line_error(code, err, "is a file, not an artifact directory")
    code, _, err = run_cli("inspect", tmp_path / "missing")
    assert_one_line_error(code, err, "does not exist")


def test_second_analyze_of_a_file_factory_reads_every_evaluation_from_the_cache(d, tmp_path):
    """Two processes (string hashes are salted per process): the module a file reference is loaded
    as is named by the file's content digest, so the cache key of the model is the same."""
    model = tmp_path / "mymodel.py"
    model.write_text(FACTORIES.read_text())
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        proc = subprocess.run([str(VENV_BIN / "shrink"), "analyze", "mymodel.py:mlp", "--data", str(d / "good.npz"),
                               "--eval-data", str(d / "good.npz"), "--actions", "quant8,prune50", "--cache-dir", "cache",
                               "--out", f"a{seed}", "--threads", "1"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(tuple(map(int, re.search(r"(\d+) evaluations run, (\d+) read from the cache", proc.stdout).groups())))
    (ran1, hit1), (ran2, hit2) = runs
    assert ran1 > 0 and hit1 == 0
    assert ran2 == 0 and hit2 == ran1


def test_eval_checks_labels_when_there_are_some(d, tmp_path):
    art = tmp_path / "art"
    assert run_cli(*compress_args(d, art))[0] == 0
    code, out, err = run_cli("eval", art, "--data", d / "float_labels.npz", "--model", MLP, "--threads", "1")
    assert_one_line_error(code, err, "--data", "integer class indices")
    code, out, err = run_cli("eval", art, "--data", d / "bad_labels.npz", "--model", MLP, "--threads", "1")
    assert code == 0, err
    assert "labels span [99, 99]" in out
    code, out, err = run_cli("eval", art, "--data", d / "unlabelled.npz", "--model", MLP, "--threads", "1")
    assert code == 0, err  # no labels: latency and size only, as before
    assert "latency, ONNX Runtime" in out and "accuracy" not in out
