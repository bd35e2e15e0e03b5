"""`shrink analyze`: tables printed, JSON and HTML written, the cache used on the second run, bad
input as exit code 2 with one line."""

from __future__ import annotations

import json

import numpy as np

from conftest import FACTORIES, run_cli

MLP = f"{FACTORIES}:mlp"




def test_analyze_writes_json_and_html_and_reuses_its_cache(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=rng.integers(0, 3, 32))
    args = ["analyze", MLP, "--data", data, "--eval-data", data, "--actions", "quant8,quant2", "--out", tmp_path / "out",
            "--cache-dir", tmp_path / "cache", "--batch-size", 16]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "body.0" in out and "body.2" in out and "4 evaluations run, 0 read from the cache" in out
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert report["metric"]["name"] == "eval_fn" and set(report["results"]) == {"body.0", "body.2"}
    assert [a["name"] for a in report["actions"]] == ["quant8", "quant2"]
    assert (tmp_path / "out" / "analysis.html").read_text().count("<svg") >= 4
    code, out, _ = run_cli(*args, "--force")  # replacing the earlier analysis at --out needs --force
    assert code == 0 and "0 evaluations run, 4 read from the cache" in out


def test_analyze_bad_action_is_one_line_exit_2(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 6), np.float32))
    code, out, err = run_cli("analyze", MLP, "--data", tmp_path / "d.npz", "--actions", "quant9", "--no-cache",
                             "--out", tmp_path / "out")
    assert code == 2 and "unknown action 'quant9'" in err and "known actions" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_auto_writes_an_artifact_with_its_report(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 6)).astype(np.float32))
    code, out, err = run_cli("auto", MLP, "--data", tmp_path / "d.npz", "--max-drop", "1%", "--actions", "quant8",
                             "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--max-evaluations", 3)
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "auto.json").read_text())
    assert saved["max_drop"] == 0.01 and saved["objective"] == "size" and saved["fits"]
    assert (tmp_path / "out" / "manifest.json").is_file() and (tmp_path / "out" / "auto.html").is_file()
    code, _, err = run_cli("auto", MLP, "--data", tmp_path / "d.npz", "--max-drop", "1%", "--objective", "speed",
                           "--out", tmp_path / "out2")
    assert code == 2 and "unknown objective 'speed'" in err


def test_auto_checks_held_out_data_and_takes_workers_margin_and_seed(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 6)).astype(np.float32))
    np.savez(tmp_path / "v.npz", x=rng.standard_normal((32, 6)).astype(np.float32))
    code, out, err = run_cli("auto", MLP, "--data", tmp_path / "d.npz", "--verify-data", tmp_path / "v.npz",
                             "--max-drop", "1%", "--margin", "0.001", "--seed", 3, "--actions", "quant8",
                             "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--max-evaluations", 3)
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "auto.json").read_text())
    assert saved["fits"] and not any("no held-out check" in w for w in saved["warnings"])


def test_an_artifact_directory_is_a_model_too(tmp_path):
    # One run's output is the next one's input (as MiniLM's attention is fused before `shrink auto`).
    import warnings

    import shrinktunnel as st
    from shrinktunnel.core.refs import load_model

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 6)).astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuse_ops: nothing to fuse in this MLP; the stage is recorded all the same
        fused = st.compress(load_model(MLP), [{"fuse_ops": {}}], progress=False)
    artifact = fused.save(tmp_path / "fused")
    code, out, err = run_cli("analyze", artifact, "--data", tmp_path / "d.npz", "--actions", "quant4h", "--no-cache",
                             "--out", tmp_path / "out", "--model", MLP)  # the artifact's own ref is code: consent
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert set(report["results"]) == {"body.0", "body.2"}
    code, out, err = run_cli("analyze", tmp_path, "--data", tmp_path / "d.npz", "--no-cache", "--out", tmp_path / "o2")
    assert code == 2 and "is a directory but not an artifact" in err and len(err.strip().splitlines()) == 1


def test_auto_reads_a_yaml_config_and_flags_override_it(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((32, 6)).astype(np.float32))
    (tmp_path / "auto.yaml").write_text("max_drop: 0.5\nobjective: macs\nactions: [quant8]\nmax_evaluations: 2\n"
                                        "verify_runtime: false\nparallel: {workers: 1}\n")
    code, out, err = run_cli("auto", MLP, "--data", tmp_path / "d.npz", "--config", tmp_path / "auto.yaml",
                             "--max-drop", "1%", "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "auto.json").read_text())
    assert saved["max_drop"] == 0.01 and saved["objective"] == "macs"  # the flag won, the file gave the rest
    assert len(saved["candidates"]) <= 3
    (tmp_path / "bad.yaml").write_text("max_drop: 0.01\nmax_evaluation: 3\n")
    code, _, err = run_cli("auto", MLP, "--data", tmp_path / "d.npz", "--config", tmp_path / "bad.yaml",
                           "--out", tmp_path / "out2")
    assert code == 2 and "unknown key 'max_evaluation'" in err and "max_evaluations" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


def test_auto_bad_combinations_are_one_line_exit_2(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32))
    base = ["auto", MLP, "--data", tmp_path / "d.npz", "--max-drop", "1%", "--actions", "quant8",
            "--cache-dir", tmp_path / "cache"]
    for extra, says in ((["--objective", "latency", "--min-speedup", 2], "min_speedup (--min-speedup)"),
                        (["--time-budget", "ten minutes"], "not a duration"),
                        (["--time-budget", "0.000001"], "shorter than one evaluation"),
                        (["--ray-address", "auto"], "set backend: ray")):
        code, _, err = run_cli(*base, *extra, "--out", tmp_path / "out")
        assert code == 2 and says in err.strip().splitlines()[-1], (extra, err)  # one line (after progress bars)
        assert not (tmp_path / "out").exists()


def test_the_analysis_table_fits_80_columns_without_a_terminal(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 3, 32))
    actions = "quant8,quant6,quant4,quant2,quant8h,quant6h,quant5h,quant4h,quant3h,prune25,prune50,prune75"
    code, out, err = run_cli("analyze", MLP, "--data", tmp_path / "d.npz", "--eval-data", tmp_path / "d.npz",
                             "--actions", actions, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80  # redirected stdout: no terminal, rich's 80 columns
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    for name in actions.split(","):  # every column is printed, none squeezed to nothing
        assert any(f" {name} " in line for line in lines), name
        drop = report["results"]["body.0"][name]
        if drop["status"] == "ok":
            assert f"{drop['drop']:+.4f}" in out
    assert "all of it in one" in out and "analysis.html" in out
