"""The artifact: exact round trips, manifest contents, aliases, atomic writes, refusal to clobber,
corruption detection, and loading without pickle (docs/artifact-format.md)."""

import hashlib
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from conftest import CASES, FACTORIES, dir_bytes, hidden_entries, quantized_layers, state_dicts_equal
from shrinktunnel.core import artifact as A
from shrinktunnel.core import atomic
from shrinktunnel.core.history import set_model_ref
from shrinktunnel.core.refs import load_model
from shrinktunnel.errors import ArtifactError

pytestmark = pytest.mark.filterwarnings("ignore:quantize:UserWarning")


def _run(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture
def residual_q():
    """A quantized residual net that knows its factory (so it loads without model=), and its data."""
    case = CASES["residual"]
    model = load_model(f"{FACTORIES}:residual")
    data = case.batches()
    return st.quantize(model, data=data, progress=False), data


@pytest.fixture
def saved(residual_q, tmp_path):
    q, data = residual_q
    return st.save(q, tmp_path / "art"), q, data


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_with_model_is_bit_identical(case, tmp_path):
    model, data = case.model(), case.batches()
    q = st.quantize(model, data=data, progress=False)
    path = st.save(q, tmp_path / "a")
    other = case.model(seed=5)  # same architecture, different weights: the artifact's tensors win
    before = {k: v.clone() for k, v in other.state_dict().items()}
    loaded = st.load(path, model=other)
    assert state_dicts_equal(loaded, q)
    for x in data:
        assert torch.equal(_run(loaded, x), _run(q, x))
    assert sorted(quantized_layers(loaded)) == sorted(case.quantized)
    assert state_dicts_equal(other, before)  # the model passed in is copied, never changed
    assert not loaded.training


def test_round_trip_through_a_file_factory_reference(saved):
    path, q, data = saved
    loaded = st.load(path, trust_code=True)  # no model: rebuilt from "tests/helpers/factories.py:residual"
    assert state_dicts_equal(loaded, q)
    assert all(torch.equal(_run(loaded, x), _run(q, x)) for x in data)


def test_factory_weights_are_replaced_by_the_artifact_tensors(tmp_path):
    model = load_model(f"{FACTORIES}:mlp")
    data = [torch.randn(8, 6)]
    result = st.compress(model, [st.QuantConfig()], data=data, model_ref=f"{FACTORIES}:mlp_other_weights", progress=False)
    path = result.save(tmp_path / "a")
    loaded = st.load(path, trust_code=True)
    assert torch.equal(_run(loaded, data[0]), _run(result.model, data[0]))


def test_loaded_artifact_saves_again_to_identical_tensors(saved, tmp_path):
    path, q, _ = saved
    again = st.save(st.load(path, trust_code=True), tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    m1, m2 = A.read_manifest(path), A.read_manifest(again)
    assert m1["stages"] == m2["stages"] and m1["model"] == m2["model"] and m1["inputs"] == m2["inputs"]


def test_saving_twice_gives_identical_tensor_bytes(residual_q, tmp_path):
    q, _ = residual_q
    a, b = st.save(q, tmp_path / "a"), st.save(q, tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_float_model_without_stages_round_trips(tmp_path):
    model = CASES["attention"].model()
    path = st.save(model, tmp_path / "f")
    assert A.read_manifest(path)["stages"] == []
    loaded = st.load(path, model=CASES["attention"].model(seed=9))
    assert state_dicts_equal(loaded, model)


def test_empty_state_dict_is_a_valid_artifact(tmp_path):
    path = st.save(nn.ReLU(), tmp_path / "e")
    loaded = st.load(path, model=nn.ReLU())
    assert loaded.state_dict() == {} and isinstance(loaded, nn.ReLU)


def test_model_with_nothing_quantized_is_a_valid_artifact(tmp_path):
    model = CASES["flatten"].model()
    result = st.compress(model, [st.QuantConfig(layers=["no_such_layer"])], data=CASES["flatten"].batches(), progress=False)
    assert any("matches no module" in w for w in result.warnings)
    path = result.save(tmp_path / "n")
    manifest = A.read_manifest(path)
    assert manifest["stages"][0]["replay"]["layers"] == {}
    assert any("no_such_layer" in w for w in manifest["warnings"])
    assert state_dicts_equal(st.load(path, model=model), model)


# -- manifest -------------------------------------------------------------------------------------
def test_manifest_contents(saved):
    path, q, data = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "shrinktunnel-artifact"
    assert manifest["format_version"] == 1 == A.FORMAT_VERSION
    assert manifest["toolkit"]["name"] == "shrinktunnel"
    assert manifest["toolkit"]["version"] == st.__version__
    assert manifest["toolkit"]["torch"] == torch.__version__.split("+")[0]
    factory_file = str(FACTORIES)
    digest = hashlib.sha256(open(factory_file, "rb").read()).hexdigest()
    # a file reference is stored resolved, with the digest of the code that ran (docs/artifact-format.md)
    assert manifest["model"] == {"ref": f"{os.path.realpath(factory_file)}:residual", "class": "Residual",
                                 "ref_sha256": digest}
    assert manifest["inputs"] == {"args": [{"shape": [None, 3, 8, 8], "dtype": "float32"}], "kwargs": {}}
    (stage,) = manifest["stages"]
    assert stage["method"] == "quantize"
    assert stage["config"] == st.QuantConfig().to_dict()
    assert sorted(stage["replay"]["layers"]) == ["conv1", "conv2"]
    assert stage["replay"]["fused"] == []  # the ReLU module is not inside a Sequential
    spec = stage["replay"]["layers"]["conv1"]
    assert spec["kind"] == "conv2d" and spec["weight_shape"] == [3, 3, 3, 3] and spec["bias"] is True
    assert spec["weight"]["dtype"] == "int8" and (spec["weight"]["qmin"], spec["weight"]["qmax"]) == (-127, 127)
    assert spec["input"]["scale"] == q.conv1.input_quant.scale  # exact: float32 written with all digits
    assert spec["output"]["zero_point"] == q.conv1.output_quant.zero_point
    tensors = manifest["tensors"]
    raw = (path / "model.safetensors").read_bytes()
    assert tensors["file"] == "model.safetensors"
    assert tensors["sha256"] == hashlib.sha256(raw).hexdigest()
    assert tensors["bytes"] == len(raw)
    assert tensors["aliases"] == {}
    assert manifest["warnings"] == [] and manifest["metrics"] == {}


def test_stored_tensors_have_the_documented_dtypes(saved):
    path, q, _ = saved
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(q.state_dict())
        assert f.get_tensor("conv1.qweight").dtype == torch.int8
        assert f.get_tensor("conv1.weight_scale").dtype == torch.float32
        assert f.get_tensor("conv1.weight_zero_point").dtype == torch.int32
        assert f.get_tensor("conv1.bias").dtype == torch.float32


def test_result_save_writes_metrics_and_warnings(tmp_path):
    case = CASES["unsupported"]
    model, data = case.model(), case.batches()
    result = st.compress(model, [st.QuantConfig()], data=data, progress=False)
    path = result.save(tmp_path / "r")
    manifest = A.read_manifest(path)
    assert manifest["warnings"] == result.warnings and len(result.warnings) == 1  # the LSTM
    assert manifest["metrics"]["after"]["weights"] == result.metrics["after"]["weights"]
    assert result.manifest["warnings"] == result.warnings  # what save writes, before saving
    assert st.save(result, tmp_path / "r2").is_dir()  # st.save takes a Result too


def test_non_finite_metrics_are_written_as_strings(tmp_path):
    path = A.save_artifact(nn.Linear(2, 2), tmp_path / "m", metrics={"a": float("nan"), "b": float("inf"), "c": -float("inf")})
    text = (path / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["metrics"] == {"a": "nan", "b": "inf", "c": "-inf"}


def test_readers_ignore_unknown_fields_and_files(saved):
    path, q, data = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["from_the_future"] = {"anything": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "report.md").write_text("# extra file\n")
    assert torch.equal(_run(st.load(path, trust_code=True), data[0]), _run(q, data[0]))


# -- tied / shared weights ------------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding and output head share one weight; the head is skipped so it stays tied."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.mix(self.emb(tokens))))


def test_tied_weights_are_stored_once_and_restored_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM().eval()
    data = [torch.randint(0, 11, (4, 5))]
    q = st.quantize(model, st.QuantConfig(skip=["head"]), data=data, progress=False)
    assert q.head.weight is q.emb.weight  # still tied after quantization (copy preserves it)
    path = st.save(q, tmp_path / "t")
    manifest = A.read_manifest(path)
    assert manifest["tensors"]["aliases"] == {"head.weight": "emb.weight"}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "emb.weight" in f.keys() and "head.weight" not in f.keys()
    q.head.weight = nn.Parameter(q.emb.weight.detach().clone())  # untie a copy's worth of bytes
    untied = st.save(q, tmp_path / "untied")
    assert A.read_manifest(untied)["tensors"]["bytes"] - manifest["tensors"]["bytes"] >= 11 * 6 * 4
    q.head.weight = q.emb.weight
    torch.manual_seed(1)
    loaded = st.load(path, model=TiedLM().eval())
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, q.emb.weight)
    assert torch.equal(_run(loaded, data[0]), _run(q, data[0]))


class TransposedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))
        self.register_buffer("wt", self.w.detach().t())  # same storage, same shape, other strides

    def forward(self, x):
        return x @ self.w + x @ self.wt


def test_views_with_other_strides_are_not_aliases(tmp_path):
    torch.manual_seed(0)
    model = TransposedBuffer()
    path = st.save(model, tmp_path / "v")
    loaded = st.load(path, model=TransposedBuffer())
    assert torch.equal(loaded.wt, model.wt)


# -- atomic writes --------------------------------------------------------------------------------
def _failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half of a safetensors file")
    raise OSError("disk full (simulated)")


def test_failed_save_leaves_nothing(residual_q, tmp_path, monkeypatch):
    q, _ = residual_q
    monkeypatch.setattr(A, "save_file", _failing_save_file)
    target = tmp_path / "out" / "art"
    with pytest.raises(OSError, match="disk full"):
        st.save(q, target)
    assert not target.exists()
    assert hidden_entries(target.parent) == []  # no .art.tmp-* left behind


def test_existing_artifact_survives_a_failed_overwrite(saved, monkeypatch):
    path, q, data = saved
    before = dir_bytes(path)
    monkeypatch.setattr(A, "save_file", _failing_save_file)
    with pytest.raises(OSError) as info:
        st.save(q, path, overwrite=True)
    assert not isinstance(info.value, ArtifactError)  # the simulated write failure, not a refusal
    assert dir_bytes(path) == before
    assert hidden_entries(path.parent) == []
    monkeypatch.undo()
    assert torch.equal(_run(st.load(path, trust_code=True), data[0]), _run(q, data[0]))


def test_existing_artifact_survives_a_failed_swap(saved, monkeypatch):
    """The new directory cannot be renamed into place: the old one is put back."""
    path, q, _ = saved
    before = dir_bytes(path)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError("rename failed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        st.save(q, path, overwrite=True)
    monkeypatch.undo()
    assert dir_bytes(path) == before
    assert hidden_entries(path.parent) == []


def test_overwrite_replaces_an_earlier_artifact(saved):
    path, _, _ = saved
    model = CASES["flatten"].model()
    st.save(model, path, overwrite=True)
    assert A.read_manifest(path)["model"]["class"] == "FlattenNet"
    assert hidden_entries(path.parent) == []


@pytest.mark.parametrize("kw", [{}, {"overwrite": False}])
def test_an_existing_artifact_is_refused_by_default(saved, kw):
    """docs/artifact-format.md: a writer SHOULD refuse to replace an artifact unless asked; st.save and
    Result.save agree (default overwrite=False)."""
    path, q, _ = saved
    before = dir_bytes(path)
    with pytest.raises(ArtifactError, match="already exists"):
        st.save(q, path, **kw)
    with pytest.raises(ArtifactError, match="already exists"):
        st.Result(q).save(path, **kw)
    assert dir_bytes(path) == before


def test_refuses_a_non_empty_directory_that_is_not_an_artifact(residual_q, tmp_path):
    q, _ = residual_q
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError) as info:
        st.save(q, target)
    assert "not an earlier shrinktunnel output" in str(info.value)
    assert dir_bytes(target) == {"thesis.tex": b"precious"}


def test_refuses_a_file_at_the_target(residual_q, tmp_path):
    q, _ = residual_q
    target = tmp_path / "file"
    target.write_text("precious")
    with pytest.raises(ArtifactError):
        st.save(q, target)
    assert target.read_text() == "precious"


def test_an_empty_directory_is_replaced(residual_q, tmp_path):
    q, _ = residual_q
    target = tmp_path / "empty"
    target.mkdir()
    st.save(q, target, overwrite=False)
    assert (target / "manifest.json").is_file()


# -- corrupted or unreadable artifacts --------------------------------------------------------------
def test_flipped_byte_fails_the_checksum(saved):
    path, _, _ = saved
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as info:
        st.load(path, trust_code=True)
    assert "checksum" in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        st.load(tmp_path / "nothing")


def test_missing_manifest(saved):
    path, _, _ = saved
    (path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        st.load(path, trust_code=True)


def test_invalid_json_manifest(saved):
    path, _, _ = saved
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        st.load(path, trust_code=True)


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_future_format_version_says_upgrade(saved):
    path, _, _ = saved
    _edit_manifest(path, format_version=A.FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError) as info:
        st.load(path, trust_code=True)
    assert "format version 2" in str(info.value) and "upgrade" in str(info.value)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"format": "something-else"}, "is not a shrinktunnel-artifact manifest"),
        ({"format_version": 0}, "not supported"),
        ({"format_version": "1"}, "not supported"),
        ({"stages": {"not": "a list"}}, "'stages' is missing or not an array"),
        ({"tensors": None}, "'tensors' is missing or not an object"),
    ],
)
def test_malformed_manifest_fields(saved, changes, fragment):
    path, _, _ = saved
    _edit_manifest(path, **changes)
    with pytest.raises(ArtifactError, match=fragment):
        st.load(path, trust_code=True)


def test_missing_tensors_file(saved):
    path, _, _ = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        st.load(path, trust_code=True)


def test_unknown_method_in_stages_is_named(saved):
    path, _, _ = saved
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["stages"][0]["method"] = "prune"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="'prune'"):
        st.load(path, trust_code=True)


def test_tensors_that_do_not_fit_the_model(saved):
    path, _, _ = saved
    with pytest.raises(ArtifactError, match="do not fit"):
        st.load(path, model=CASES["flatten"].model())


def test_no_reference_and_no_model_says_pass_model(tmp_path):
    model = CASES["flatten"].model()  # built here: no model reference recorded
    q = st.quantize(model, data=CASES["flatten"].batches(), progress=False)
    path = st.save(q, tmp_path / "noref")
    assert A.read_manifest(path)["model"]["ref"] is None
    with pytest.raises(ArtifactError, match="model="):
        st.load(path, trust_code=True)


def test_reference_that_cannot_be_loaded(tmp_path):
    model = set_model_ref(nn.Linear(6, 3), f"{FACTORIES}:raising_factory")
    path = st.save(model, tmp_path / "badref")
    with pytest.raises(ArtifactError) as info:
        st.load(path, trust_code=True)
    assert "cannot rebuild the original model" in str(info.value) and "model=" in str(info.value)


# -- no pickle ----------------------------------------------------------------------------------
def _forbidden(*args, **kwargs):
    raise AssertionError("unpickling was attempted while loading an artifact")


class _ForbiddenUnpickler:
    def __init__(self, *args, **kwargs):
        _forbidden()


def test_loading_never_unpickles(saved, monkeypatch):
    path, q, data = saved
    monkeypatch.setattr(pickle, "load", _forbidden)
    monkeypatch.setattr(pickle, "loads", _forbidden)
    monkeypatch.setattr(pickle, "Unpickler", _ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", _forbidden)
    with pytest.raises(AssertionError):  # the trap is armed
        torch.load(path / "model.safetensors")
    via_ref = st.load(path, trust_code=True)
    via_model = st.load(path, model=CASES["residual"].model())
    for loaded in (via_ref, via_model):
        assert torch.equal(_run(loaded, data[0]), _run(q, data[0]))


def test_artifact_directory_holds_no_pickle(saved):
    path, _, _ = saved
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    assert not (path / "model.safetensors").read_bytes().startswith(b"\x80")  # no pickle protocol header
