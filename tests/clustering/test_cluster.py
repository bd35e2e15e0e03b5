"""The `cluster` method on the tiny awkward nets: shared weights decoded exactly, artifacts that reload
bit-identically, pruned layers kept sparse, bad input handled, ONNX export."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_
from safetensors.torch import load_file, save_file
from torch import nn

import shrinktunnel as st
from conftest import CASES, SUPPORTED_CASES, snapshot, state_dicts_equal
from shrinktunnel.clustering import ClusteredLayer
from shrinktunnel.errors import ArtifactError, ConfigError, DataError


def clustered_layers(model: nn.Module) -> dict[str, ClusteredLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ClusteredLayer)}


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()))


def quiet_cluster(model, config=None, data=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.cluster(model, config, data=data, progress=False)


# -- every tiny net --------------------------------------------------------------------------------

@pytest.mark.parametrize("coding", ["huffman", "packed"])
def test_every_tiny_net_round_trips_bit_exactly(case, coding, tmp_path):
    model = case.model()
    before = snapshot(model)
    x = case.batches(1)[0]
    clustered = quiet_cluster(model, {"bits": 4, "coding": coding})
    assert state_dicts_equal(model, before)  # the input model is not changed
    layers = clustered_layers(clustered)
    assert layers, "something must be clustered"
    for layer in layers.values():
        assert layer.codebook.numel() <= 16
        w = layer.dense_weight()
        assert torch.equal(w.reshape(-1), layer.codebook[layer.indices])  # every weight is a centroid
    with torch.no_grad():
        y_ref, y = model(x), clustered(x)
    assert cos(y_ref, y) > 0.97
    st.save(clustered, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=case.model())
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in clustered.named_modules()}
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_packed_and_huffman_store_the_same_weights(tmp_path):
    model = CASES["attention"].model()
    a = quiet_cluster(model, {"bits": 3, "coding": "packed"})
    b = quiet_cluster(model, {"bits": 3, "coding": "huffman"})
    for (na, la), (nb, lb) in zip(clustered_layers(a).items(), clustered_layers(b).items()):
        assert na == nb and torch.equal(la.dense_weight(), lb.dense_weight())
    for la, lb in zip(clustered_layers(a).values(), clustered_layers(b).values()):
        # 256 near-uniform indices: Huffman beats 3-bit packing by nothing, and pays a 16-bit chunk table.
        sa, sb = la.storage()["stream_bits_per_weight"], lb.storage()["stream_bits_per_weight"]
        assert sb <= sa + 16 / 256 + 1e-9


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bits=st_.integers(1, 8), sparsity=st_.sampled_from([0.0, 0.3, 0.7, 0.95]), coding=st_.sampled_from(["huffman", "packed"]),
       position_bits=st_.sampled_from([None, 1, 3, 8]), shape=st_.sampled_from([(40, 37), (7, 300), (64, 64)]),
       seed=st_.integers(0, 10_000))
def test_decoding_gives_back_exactly_the_shared_weights(bits, sparsity, coding, position_bits, shape, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g))
        lin.weight[torch.rand(shape, generator=g) < sparsity] = 0
    model = nn.Sequential(lin)
    cfg = {"bits": bits, "coding": coding, "position_bits": position_bits}
    out = quiet_cluster(model, cfg)
    layer = out[0]
    if not isinstance(layer, ClusteredLayer):  # too small to pay for its codebook: kept, and said so
        assert (1 << bits) * 32 + bits * int((lin.weight != 0).sum()) >= 32 * int((lin.weight != 0).sum())
        return
    w = layer.dense_weight()
    # Zeros of a pruned layer stay exactly zero, and nothing else becomes zero unless a centroid is 0.
    if layer.sparse:
        assert torch.equal(w == 0, lin.weight == 0) or bool((layer.codebook == 0).any())
        assert bool((w[lin.weight == 0] == 0).all())
    # A fresh layer built from the stored tensors alone decodes the same weights, bit for bit.
    fresh = ClusteredLayer.from_spec(layer.spec())
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dense_weight(), w)
    assert torch.equal(fresh.indices, layer.indices)


# -- pruned layers ---------------------------------------------------------------------------------

def test_pruned_layers_are_stored_sparse_with_their_zeros(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 300), nn.ReLU(), nn.Linear(300, 10))
    x = torch.randn(16, 100)
    from shrinktunnel.pruning import PruneConfig

    pruned = st.prune(model, PruneConfig(sparsity=0.9), progress=False)
    clustered = quiet_cluster(pruned, {"bits": 5})
    layer = clustered[0]
    assert isinstance(layer, ClusteredLayer) and layer.sparse
    assert torch.equal(layer.dense_weight() != 0, pruned[0].weight != 0)
    report = layer.storage()
    assert report["streams"]["positions"]["symbols"] >= report["kept"]
    # Far below 5 bits per weight: only a tenth of the weights carry an index.
    assert report["bits_per_weight"] < 1.5
    st.save(clustered, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=model)
    with torch.no_grad():
        assert torch.equal(loaded(x), clustered(x))


def test_sparse_dense_choice():
    model = nn.Sequential(nn.Linear(50, 60))
    with torch.no_grad():
        model[0].weight[:, :10] = 0  # a sixth zeros: above sparse_from=0.1
    assert quiet_cluster(model, {"bits": 3})[0].sparse
    assert not quiet_cluster(model, {"bits": 3, "sparse": "dense"})[0].sparse
    assert not quiet_cluster(model, {"bits": 3, "sparse_from": 0.5})[0].sparse
    dense = nn.Sequential(nn.Linear(50, 60))
    assert quiet_cluster(dense, {"bits": 3, "sparse": "sparse"})[0].sparse


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"bits": 0}, {"bits": 9}, {"bits": 2.5}, {"position_bits": 9}, {"sparse_from": 0},
                                 {"iterations": -1}, {"init": "kmeans"}, {"overrides": [{"pattern": "x", "bits": 12}]},
                                 {"tune": {"lr": 0}}, {"bitz": 3}])
def test_bad_configs_are_config_errors(bad):
    with pytest.raises(ConfigError):
        st.cluster(CASES["functional_relu"].model(), bad, progress=False)


def test_too_small_and_unsupported_layers_are_skipped_and_listed():
    model = CASES["unsupported"].model()  # Embedding(20, 8), LSTM, Linear(8, 3)
    result = st.compress(model, [st.ClusterConfig(bits=8)], progress=False)
    assert not any("no method rewrites it" in w for w in result.warnings)  # its matrices are Linears to share
    assert all(isinstance(m, ClusteredLayer) for m in result.model.lstm.matrices.values())
    # 24 weights: a 256-entry codebook saves nothing; the largest that does (4-bit: 512 + 96 bits < 768) is used
    assert any("head (4-bit)" in w and "too small" in w for w in result.warnings)
    assert isinstance(result.model.head, ClusteredLayer) and result.model.head.spec()["bits"] == 4
    small = st.compress(model, [st.ClusterConfig(bits=2)], progress=False).model
    assert isinstance(small.emb, ClusteredLayer) and isinstance(small.head, ClusteredLayer)


def test_fewer_distinct_weights_than_clusters():
    model = nn.Sequential(nn.Linear(30, 40))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([-0.5, 0.25, 1.0])[torch.randint(0, 3, (40, 30))])
    with pytest.warns(UserWarning, match="only 3 distinct"):
        out = st.cluster(model, {"bits": 6}, progress=False)
    assert out[0].codebook.numel() == 3 and torch.equal(out[0].dense_weight(), model[0].weight)


def test_nan_weights_are_a_data_error():
    model = nn.Sequential(nn.Linear(30, 40))
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        st.cluster(model, progress=False)


def _corrupt(path, key, fn):
    tensors = load_file(str(path / "model.safetensors"))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "shrinktunnel-artifact"})
    import hashlib, json  # noqa: E401

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("key,fn", [
    ("0.index_code", lambda t: t[:-3].clone()),  # truncated (and the wrong shape)
    ("0.index_code", lambda t: torch.zeros_like(t)),  # chunk table says 0 bits
    ("0.index_lengths", lambda t: torch.full_like(t, 1)),  # not a prefix code
    ("0.position_code", lambda t: torch.full_like(t, 0xFF)),  # every code a filler: runs past the end
])
def test_corrupt_artifact_streams_fail_with_artifact_error(tmp_path, key, fn):
    model = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight[torch.rand(64, 64) < 0.6] = 0
    st.save(quiet_cluster(model, {"bits": 4}), tmp_path / "a")
    _corrupt(tmp_path / "a", key, fn)
    with pytest.raises(ArtifactError):
        st.load(tmp_path / "a", model=model)


# -- export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flatten", "attention"])
def test_onnx_export_holds_dense_weights_and_matches(name, tmp_path):
    import onnx
    from onnx import numpy_helper

    from shrinktunnel.export import OrtModel

    case = CASES[name]
    clustered = quiet_cluster(case.model(), {"bits": 4})
    x = case.batches(1, batch=3)[0]
    path = st.export_onnx(clustered, tmp_path / "m.onnx", example_inputs=x)
    inits = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    for layer in clustered_layers(clustered).values():  # each weight is a dense float initializer, no gather
        w = layer.dense_weight().detach().numpy()
        assert any((a.shape == w.shape and (a == w).all()) or (a.shape == w.T.shape and (a == w.T).all())
                   for a in inits if a.dtype == w.dtype)
    with torch.no_grad():
        ref = clustered(x)
    assert torch.allclose(torch.as_tensor(OrtModel(path)(x)), ref, atol=1e-4, rtol=0)


# -- recipes and the report ------------------------------------------------------------------------

def test_recipe_stage_and_report_in_metrics():
    case = CASES["residual"]
    result = st.compress(case.model(), [{"cluster": {"bits": 3}}], data=case.batches(2), progress=False)
    sharing = result.metrics["after"]["weight_sharing"]
    assert set(sharing["layers"]) == {"conv1", "conv2"}
    for layer in sharing["layers"].values():
        idx = layer["streams"]["indices"]
        # Huffman is within a bit of the entropy bound, never under it.
        assert idx["entropy_bits_per_symbol"] <= idx["bits_per_symbol"] < idx["entropy_bits_per_symbol"] + 1 + 0.1
    assert sharing["total"]["entropy_bits_per_weight"] <= sharing["total"]["stream_bits_per_weight"]
    assert result.manifest["stages"][0]["method"] == "cluster"


def test_overrides_set_bits_per_layer():
    model = CASES["residual"].model()
    out = quiet_cluster(model, {"bits": 2, "overrides": [{"pattern": "conv2", "bits": 5}]})
    assert out.conv1.codebook.numel() <= 4 and 4 < out.conv2.codebook.numel() <= 32


def test_manifest_lengths_are_checked_before_allocating(tmp_path):
    import json

    model = nn.Sequential(nn.Linear(64, 64))
    st.save(quiet_cluster(model, {"bits": 4}), tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["stages"][0]["replay"]["layers"]["0"]["index_bytes"] = 2**60  # would be an exabyte buffer
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="index_bytes"):
        st.load(tmp_path / "a", model=model)


def test_storage_table_lists_every_layer_and_the_total():
    from shrinktunnel.clustering import storage_report, storage_table

    out = quiet_cluster(CASES["attention"].model(), {"bits": 3})
    text = storage_table(storage_report(out)).to_markdown()
    for name in ("| q |", "| k |", "| v |", "| o |", "| total |"):
        assert name in text


def test_a_layer_too_small_for_the_codebook_gets_the_largest_one_that_saves_space():
    # 36 weights: 32 float32 centroids + 5-bit indices (1,204 bits) cost more than the floats (1,152); 16
    # centroids + 4-bit indices (656) do not. A single weight: no codebook saves space, kept with the reason.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 1, bias=False)).eval()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].weight[0, 0] = 0.5
    result = st.compress(model, [{"cluster": {"bits": 5}}], progress=False)
    out = result.model
    assert isinstance(out[0], ClusteredLayer) and out[0].spec()["bits"] == 4
    assert out[0].codebook.numel() <= 16 and torch.unique(out[0].weight).numel() <= 16
    assert any("0 (4-bit)" in w and "largest codebook" in w for w in result.warnings)
    assert isinstance(out[2], nn.Linear)  # one non-zero weight
    assert any("too few weights (1)" in w for w in result.warnings)
