"""Tampered artifacts, one test per case of issue 16: each is refused with ArtifactError (one line,
exit code 2 on the command line), in bounded time and memory, and no code the manifest names runs
without consent. A planted module writes a marker file whenever it is imported or called; every test
checks the marker was never written, through st.load and through every `shrink` verb.
"""

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
import torch

import shrinktunnel as st
from conftest import FACTORIES, state_dicts_equal, run_cli
from shrinktunnel.core import artifact as A
from shrinktunnel.core.refs import load_model
from shrinktunnel.errors import ArtifactError, UntrustedCodeError

MLP = f"{FACTORIES}:mlp"




def one_line_exit_2(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A marker-writing file module and an importable package: running either appends to the marker."""
    marker = tmp_path / "MARKER"
    body = textwrap.dedent(f"""
        open({str(marker)!r}, "a").write("imported\\n")
        def make():
            open({str(marker)!r}, "a").write("called\\n")
            import torch
            return torch.nn.Linear(6, 3)
    """)
    evil = tmp_path / "evil.py"
    evil.write_text(body)
    pkg = f"evil_pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / "site" / pkg).mkdir(parents=True)
    (tmp_path / "site" / pkg / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return {"marker": marker, "file_ref": f"{evil}:make", "module_ref": f"{pkg}:make"}


@pytest.fixture
def art(tmp_path):
    """A quantized MLP artifact (file-factory reference), its model and data."""
    model = load_model(MLP)
    data = [torch.randn(8, 6)]
    q = st.quantize(model, data=data, progress=False)
    return st.save(q, tmp_path / "art"), q, data


def edit(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def data_file(tmp_path):
    x = torch.randn(16, 6)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=np.zeros(16, np.int64))
    return tmp_path / "d.npz"


def every_verb(path, tmp_path):
    """Each `shrink` verb that reads an artifact, run on `path` with no consent given."""
    d = data_file(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - quantize: {}\n")
    return {
        "inspect": ("inspect", path),
        "export": ("export", path, "--onnx", tmp_path / "o.onnx"),
        "eval": ("eval", path, "--data", d),
        "compress": ("compress", path, "--recipe", recipe, "--data", d, "--out", tmp_path / "c"),
        "analyze": ("analyze", path, "--data", d, "--out", tmp_path / "a", "--no-cache"),
        "auto": ("auto", path, "--data", d, "--max-drop", "1%", "--out", tmp_path / "u"),
    }


# -- 1. no code runs without consent ------------------------------------------------------------------
@pytest.mark.parametrize("which", ["file_ref", "module_ref", "os:abort", "sys:exit", "builtins:breakpoint", "builtins:input"])
def test_code_named_by_the_manifest_never_runs_without_consent(art, planted, tmp_path, which):
    path, q, _ = art
    ref = planted.get(which, which)
    edit(path, lambda m: m["model"].update(ref=ref, ref_sha256=None) or m["model"].pop("ref_sha256"))
    with pytest.raises(UntrustedCodeError) as info:
        st.load(path)
    msg = str(info.value)
    assert ref in msg and "model=" in msg and "trust_code=True" in msg and "\n" not in msg
    for verb, args in every_verb(path, tmp_path).items():
        code, out, err = run_cli(*args)
        if verb == "inspect":  # reads, rebuilds nothing: runs no code, and says where the model comes from
            assert code == 0, err
            assert ref in out
            continue
        one_line_exit_2(code, err, ref, "--model", "--trust-model-code")
    assert not planted["marker"].exists()
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "c").exists() and not (tmp_path / "u").exists()


def test_consent_runs_it_and_model_overrides_it(art, planted, tmp_path):
    path, q, data = art
    # The original model passed in: nothing the manifest names runs, even with a hostile ref.
    edit(path, lambda m: m["model"].update(ref=planted["module_ref"]))
    loaded = st.load(path, model=load_model(MLP))
    assert state_dicts_equal(loaded, q)
    code, _, err = run_cli("export", path, "--onnx", tmp_path / "m.onnx", "--model", MLP)
    assert code == 0, err
    assert not planted["marker"].exists()
    # trust_code=True: the caller's consent, so it runs (and the tensors then do not fit a Linear).
    with pytest.raises(ArtifactError, match="do not fit|replay"):
        st.load(path, trust_code=True)
    assert planted["marker"].read_text().count("called") == 1


def test_project_assets_and_artifact_refs_need_no_consent(tmp_path):
    from shrinktunnel.core.rebuild import is_builtin_ref

    assert is_builtin_ref("shrinktunnel.assets:mnist_cnn") and is_builtin_ref("shrinktunnel.assets:minilm")
    for ref in ("shrinktunnel.assets:Path", "shrinktunnel.assets:_model_path", "shrinktunnel.assets:os",
                "shrinktunnel.cli:main", "shrinktunnel.assets", "os:system"):
        assert not is_builtin_ref(ref), ref


def test_hugging_face_model_rebuilds_from_its_config_without_its_factory(tmp_path):
    """A transformers model is rebuilt through transformers' auto mappings from config.json's content:
    its factory (which writes a marker here) never runs on load."""
    marker = tmp_path / "MARKER"
    factory = tmp_path / "hf.py"
    factory.write_text(textwrap.dedent(f"""
        import torch, transformers
        def make():
            open({str(marker)!r}, "a").write("called\\n")
            torch.manual_seed(0)
            cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=24, max_position_embeddings=32)
            return transformers.BertModel(cfg).eval()
        def make_without_pooler():  # a constructor argument the config does not hold: no declarative rebuild
            cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=24, max_position_embeddings=32)
            return transformers.BertModel(cfg, add_pooling_layer=False).eval()
    """))
    assert "transformers" not in A.build_manifest(load_model(f"{factory}:make_without_pooler"))["model"]
    model = load_model(f"{factory}:make")
    ids = torch.randint(0, 50, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    q = st.quantize(model, data=[batch], progress=False)
    path = st.save(q, tmp_path / "art")
    assert marker.read_text().count("called") == 1
    hf = A.read_manifest(path)["model"]["transformers"]
    assert hf["architecture"] == "BertModel" and hf["config"]["model_type"] == "bert"
    loaded = st.load(path)  # no model=, no trust_code: the config, not the factory
    assert marker.read_text().count("called") == 1
    assert state_dicts_equal(loaded, q)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, q(**batch).last_hidden_state)
    # An architecture the auto mappings do not list for that model_type is refused, never imported.
    for arch in ("os.system", "AutoModel", "GPT2Model", "__class__"):
        edit(path, lambda m: m["model"]["transformers"].update(architecture=arch))
        with pytest.raises(ArtifactError, match="auto mappings|names code"):
            st.load(path)
    assert marker.read_text().count("called") == 1


# -- 2. reads nothing outside the artifact ------------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside.safetensors", "..", ".", "/etc/passwd", "sub/model.safetensors",
                                  "..\\model.safetensors", "", "C:model.safetensors"])
def test_tensors_file_must_be_a_plain_name_inside(art, tmp_path, name):
    path, q, _ = art
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((path / "model.safetensors").read_bytes())  # a valid file, with the right checksum
    (path / "sub").mkdir()
    (path / "sub" / "model.safetensors").write_bytes(outside.read_bytes())
    edit(path, lambda m: m["tensors"].update(file=name))
    with pytest.raises(ArtifactError, match="plain file name|not a regular file"):
        st.load(path, model=load_model(MLP))
    code, _, err = run_cli("inspect", path)
    one_line_exit_2(code, err)


def test_tensors_file_that_is_a_symlink_is_refused(art, tmp_path):
    path, _, _ = art
    outside = tmp_path / "outside.safetensors"
    os.replace(path / "model.safetensors", outside)
    os.symlink(outside, path / "model.safetensors")
    with pytest.raises(ArtifactError, match="symbolic link"):
        st.load(path, model=load_model(MLP))
    code, _, err = run_cli("inspect", path)
    one_line_exit_2(code, err, "symbolic link")


def test_manifest_that_is_a_symlink_is_refused(art, tmp_path):
    path, _, _ = art
    os.replace(path / "manifest.json", tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", path / "manifest.json")
    with pytest.raises(ArtifactError, match="symbolic link"):
        A.read_manifest(path)


# -- 3. allocates only what it holds, in bounded time --------------------------------------------------
BOUNDED = """
import resource, sys, time, json
import torch, shrinktunnel as st
from shrinktunnel.core.refs import load_model
from shrinktunnel.errors import ArtifactError
base = load_model(sys.argv[2])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # at most 1 GiB more
t = time.perf_counter()
try:
    st.load(sys.argv[1], model=base)
    outcome = "loaded"
except ArtifactError as exc:
    outcome = "ArtifactError: " + str(exc)
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - t,
                  "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0}))
"""


def load_bounded(path):
    proc = subprocess.run([sys.executable, "-c", BOUNDED, str(path), MLP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", [[10**9, 4], [4, 10**9], [2**40, 2**40], [16, 6, 10**6]])
def test_huge_replay_shape_is_refused_before_allocating(art, shape):
    path, _, _ = art
    edit(path, lambda m: m["stages"][0]["replay"]["layers"]["body.0"].update(weight_shape=shape))
    assert (path / "manifest.json").stat().st_size < 8000
    got = load_bounded(path)
    assert got["outcome"].startswith("ArtifactError"), got
    assert got["seconds"] < 10 and got["grew_kib"] < 200 * 1024, got


def test_huge_safetensors_header_claims_are_refused(art):
    path, _, _ = art
    raw = bytearray((path / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [10**9, 4]
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    (path / "model.safetensors").write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])
    edit(path, lambda m: m["tensors"].update(sha256=None, bytes=(path / "model.safetensors").stat().st_size))
    got = load_bounded(path)
    assert got["outcome"].startswith("ArtifactError") and "takes" in got["outcome"], got
    # a header length beyond the file
    (path / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + raw[8:])
    edit(path, lambda m: m["tensors"].pop("bytes"))
    with pytest.raises(ArtifactError, match="header claims"):
        st.load(path, model=load_model(MLP))


def test_oversized_manifest_is_refused_without_reading_it(art):
    path, _, _ = art
    with open(path / "manifest.json", "r+b") as f:
        f.truncate(200 * 10**6)  # 200 MB (sparse): refused by its size, never parsed
    t = time.perf_counter()
    with pytest.raises(ArtifactError, match="limit"):
        A.read_manifest(path)
    assert time.perf_counter() - t < 2


def test_deeply_nested_manifest_is_one_line(art, tmp_path):
    path, _, _ = art
    (path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested deeper"):
        A.read_manifest(path)
    code, _, err = run_cli("inspect", path)
    one_line_exit_2(code, err, "nested deeper")


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.update(stages=["x"]), "stages[0]"),
    (lambda m: m.update(stages=[{"method": "quantize", "config": {}, "replay": []}]), "stages[0].replay"),
    (lambda m: m["stages"][0].update(replay={"layers": {"body.0": "x"}}), "replay"),
    (lambda m: m["stages"][0].update(method="no_such_method"), "no_such_method"),
    (lambda m: m.update(inputs={"args": [{"shape": [None, 10**6, 10**6], "dtype": "float32"}]}), "elements"),
    (lambda m: m.update(inputs={"args": [{"shape": [None, 6], "dtype": "object"}]}), "dtype"),
    (lambda m: m.update(warnings=[1, 2]), "warnings"),
    (lambda m: m.update(metrics={"before": {"bytes": "x"}}), "metrics.before"),
    (lambda m: m["tensors"].update(aliases={"a": "nope"}), "aliases"),
    (lambda m: m["tensors"].update(bytes=-1), "tensors.bytes"),
    (lambda m: m["model"].update(ref=123), "model.ref"),
    (lambda m: m.update(format_version=True), "format version"),
])
def test_malformed_manifest_is_artifact_error_and_one_line(art, tmp_path, change, fragment):
    path, _, _ = art
    edit(path, change)
    with pytest.raises(ArtifactError) as info:
        st.load(path, model=load_model(MLP))
    assert fragment in str(info.value) and "\n" not in str(info.value)
    code, _, err = run_cli("export", path, "--onnx", tmp_path / "m.onnx", "--model", MLP)
    one_line_exit_2(code, err)


def test_model_ref_that_refers_to_the_artifact_itself(art, tmp_path):
    path, _, _ = art
    edit(path, lambda m: m["model"].update(ref=str(path)))
    with pytest.raises(UntrustedCodeError):  # a directory outside the artifact is not read without consent
        st.load(path)
    with pytest.raises(ArtifactError, match="refer to itself"):
        st.load(path, trust_code=True)
    other = st.save(load_model(MLP), tmp_path / "other")  # a cycle of two
    edit(other, lambda m: m["model"].update(ref=str(path)))
    edit(path, lambda m: m["model"].update(ref=str(other)))
    with pytest.raises(ArtifactError, match="refer to itself"):
        st.load(path, trust_code=True)
    code, _, err = run_cli("export", path, "--onnx", tmp_path / "m.onnx", "--trust-model-code")
    one_line_exit_2(code, err, "refer to itself")
    # the chain ends at an artifact that names no model: the usual error, not a loop
    edit(other, lambda m: m["model"].update(ref=None))
    with pytest.raises(ArtifactError, match="no model reference"):
        st.load(path, trust_code=True)


# -- 4. inspect verifies ------------------------------------------------------------------------------
def test_inspect_verifies_the_checksum_and_says_so(art):
    path, _, _ = art
    code, out, err = run_cli("inspect", path)
    assert code == 0 and "sha256 verified" in out, err
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[:-10])
    code, _, err = run_cli("inspect", path)
    one_line_exit_2(code, err, "checksum", "truncated")
    edit(path, lambda m: m["tensors"].pop("sha256"))  # no checksum: the header's ranges no longer fit the file
    code, _, err = run_cli("inspect", path)
    one_line_exit_2(code, err, "data_offsets")
    code, out, err = run_cli("inspect", path.parent / "nothing-here")
    assert code == 2


def test_inspect_of_a_file_says_it_is_a_file(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    code, _, err = run_cli("inspect", f)
    one_line_exit_2(code, err, "is a file, not an artifact directory")


# -- 5. portable, digest-checked file references ----------------------------------------------------
def test_file_reference_is_stored_resolved_and_checked(tmp_path, monkeypatch):
    src = tmp_path / "proj"
    src.mkdir()
    (src / "mymodel.py").write_text((FACTORIES).read_text())
    monkeypatch.chdir(src)
    model = load_model("mymodel.py:mlp")  # relative, as a user types it
    q = st.quantize(model, data=[torch.randn(4, 6)], progress=False)
    path = st.save(q, tmp_path / "art")
    entry = A.read_manifest(path)["model"]
    assert entry["ref"] == f"{src / 'mymodel.py'}:mlp"
    import hashlib

    assert entry["ref_sha256"] == hashlib.sha256((src / "mymodel.py").read_bytes()).hexdigest()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert state_dicts_equal(st.load(path, trust_code=True), q)  # found again from another directory
    (src / "mymodel.py").write_text((FACTORIES).read_text() + "\n# edited\n")
    with pytest.raises(ArtifactError, match="changed since the artifact was made"):
        st.load(path, trust_code=True)
    code, _, err = run_cli("export", path, "--onnx", elsewhere / "m.onnx", "--trust-model-code")
    one_line_exit_2(code, err, "changed since", "--model")
    code, _, err = run_cli("export", path, "--onnx", elsewhere / "m.onnx", "--model", f"{src / 'mymodel.py'}:mlp")
    assert code == 0, err


def test_replay_that_cannot_run_on_meta_is_bounded_by_the_file(tmp_path):
    """prune_channels' replay computes with index tensors, so it cannot be dry-run on the meta device:
    its numbers are bounded by what the file and the original model hold, and the rebuilt module is
    checked against the file before any tensor is loaded."""
    from torch import nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()

    x = torch.randn(4, 1, 4, 4)
    r = st.compress(net(), [("prune_channels", {"ratio": 0.5})], data=[x], example_inputs=x, progress=False)
    path = r.save(tmp_path / "art")
    assert state_dicts_equal(st.load(path, model=net()), r.model)
    edit(path, lambda m: m["stages"][0]["replay"]["layers"]["0"].update(out=[2, 3, 4, 10**15]))
    with pytest.raises(ArtifactError, match="beyond anything"):
        st.load(path, model=net())
    edit(path, lambda m: m["stages"][0]["replay"]["layers"]["0"].update(out=[2, 3, 4]))  # fewer channels than stored
    with pytest.raises(ArtifactError, match="do not fit|replay"):
        st.load(path, model=net())
