"""Unstructured pruning (the `prune` method): which weights go, how many, storage and replay."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from conftest import CASES, SUPPORTED_CASES
from shrinktunnel.api import run_stage
from shrinktunnel.core.registry import Context
from shrinktunnel.errors import ArtifactError, ConfigError, DataError
from shrinktunnel.measure import artifact_bytes, float_safetensors_bytes
from shrinktunnel.pruning import PruneConfig, SparseLayer, prune_context


def prune(model, config=None, **kw):
    """The `prune` method with a quiet context (st.prune dispatches to it for a PruneConfig)."""
    return run_stage(model, "prune", config, prune_context(progress=False, **kw))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLayer))}


# -- which weights, how many --------------------------------------------------------------------------

def test_layer_scope_prunes_the_smallest_of_each_layer_exactly():
    model = _mlp()
    pruned = prune(model, {"sparsity": 0.7})
    for name, w in _weights(pruned).items():
        orig = model.get_submodule(name).weight.detach()
        n = orig.numel()
        kept = w != 0
        assert int(kept.sum()) == n - round(0.7 * n)
        assert torch.equal(w[kept], orig[kept])  # kept weights are untouched, bit for bit
        assert orig[kept].abs().min() >= orig[~kept].abs().max()  # and they are the largest
        assert isinstance(pruned.get_submodule(name), SparseLayer)
    assert isinstance(model[0], nn.Linear) and int((model[0].weight == 0).sum()) == 0  # input untouched


def test_global_scope_uses_one_threshold():
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(3)  # the classifier's weights are larger: a global threshold spares them
    pruned = prune(model, {"sparsity": 0.6, "scope": "global"})
    orig = torch.cat([w.reshape(-1) for w in _weights(model).values()])
    new = torch.cat([w.reshape(-1) for w in _weights(pruned).values()])
    kept = new != 0
    assert int(kept.sum()) == orig.numel() - round(0.6 * orig.numel())
    assert orig[kept].abs().min() >= orig[~kept].abs().max()
    assert float((pruned[4].weight != 0).float().mean()) > 0.5  # per-layer sparsities differ


def test_overrides_last_match_wins_and_zero_leaves_a_layer_dense():
    model = _mlp()
    pruned = prune(model, {"sparsity": 0.5, "overrides": [{"pattern": "*", "sparsity": 0.9},
                                                          {"pattern": "4", "sparsity": 0.0}]})
    assert isinstance(pruned[0], SparseLayer) and int((pruned[0].weight != 0).sum()) == 1280 - round(0.9 * 1280)
    assert isinstance(pruned[4], nn.Linear) and torch.equal(pruned[4].weight, model[4].weight)


def test_random_is_seeded_exact_and_not_magnitude():
    model = _mlp()
    a, b = prune(model, {"sparsity": 0.6, "criterion": "random"}), prune(model, {"sparsity": 0.6, "criterion": "random"})
    c = prune(model, {"sparsity": 0.6, "criterion": "random", "seed": 1})
    mag = prune(model, {"sparsity": 0.6})
    wa, wb, wc, wm = (_weights(m)["0"] for m in (a, b, c, mag))
    assert torch.equal(wa, wb) and not torch.equal(wa != 0, wc != 0) and not torch.equal(wa != 0, wm != 0)
    assert int((wa != 0).sum()) == 1280 - round(0.6 * 1280)


# -- storage, replay, export --------------------------------------------------------------------------

@pytest.mark.parametrize("name", SUPPORTED_CASES)
def test_round_trip_on_awkward_nets_is_bit_exact(name, tmp_path):
    case = CASES[name]
    model, x = case.model(), case.batches(1, batch=3)[0]
    pruned = prune(model, {"sparsity": 0.8})
    assert all(isinstance(pruned.get_submodule(n), SparseLayer) for n in case.quantized)
    again = st.load(st.save(pruned, tmp_path / "a"), model=model)
    assert torch.equal(again(x), pruned(x))
    for n in case.quantized:
        assert torch.equal(again.get_submodule(n).weight, pruned.get_submodule(n).weight)


@pytest.mark.parametrize("name", ["grouped_conv", "attention"])
def test_exports_to_onnx_runtime(name, tmp_path):
    from shrinktunnel.export import OrtModel

    case = CASES[name]
    model, x = case.model(), case.batches(1, batch=3)[0]
    pruned = st.load(st.save(prune(model, {"sparsity": 0.75}), tmp_path / "a"), model=model)
    got = OrtModel(st.export_onnx(pruned, tmp_path / "m.onnx", example_inputs=x))(x)
    assert torch.allclose(got, pruned(x), atol=1e-4, rtol=0)


def test_artifact_holds_only_kept_weights_and_index(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    pruned = prune(model, {"sparsity": 0.9})
    path = st.save(pruned, tmp_path / "a")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert set(stored) == {"0.values", "0.index", "0.bias", "2.values", "2.index", "2.bias"}
    assert stored["0.values"].numel() == 65536 - round(0.9 * 65536) and stored["0.index"].dtype == torch.uint8
    # Kept values plus an index of a few bits per kept weight: well under 16 % of the dense file.
    payload = sum(t.numel() * t.element_size() for t in stored.values())
    assert payload < 0.13 * float_safetensors_bytes(model)
    assert artifact_bytes(path) < 0.16 * float_safetensors_bytes(model)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["stages"][0]["replay"]["layers"]["0"]["sparse"]["encoding"] in ("bitmask", "relative")


@pytest.mark.parametrize("encoding,bits", [("bitmask", None), ("relative", 3), ("relative", None)])
def test_forced_encodings_round_trip(encoding, bits, tmp_path):
    model, x = _mlp(), torch.randn(4, 20)
    pruned = prune(model, {"sparsity": 0.85, "encoding": encoding, "index_bits": bits})
    spec = pruned[0].sparse_spec
    assert spec["encoding"] == encoding and (bits is None or spec["index_bits"] == bits)
    again = st.load(st.save(pruned, tmp_path / "a"), model=model)
    assert torch.equal(again(x), pruned(x)) and torch.equal(again[0].mask(), pruned[0].weight != 0)


def test_low_sparsity_stays_dense_with_a_warning():
    model = _mlp()
    with pytest.warns(UserWarning, match="stored dense"):
        pruned = prune(model, {"sparsity": 0.02})  # an index would cost more than 2 % of zeros save
    assert isinstance(pruned[0], nn.Linear) and int((pruned[0].weight == 0).sum()) == round(0.02 * 1280)


def test_shared_module_is_pruned_once_and_stored_once(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(3, 16)
    pruned = prune(model, {"sparsity": 0.75})
    assert pruned.a is pruned.b and isinstance(pruned.a, SparseLayer)
    again = st.load(st.save(pruned, tmp_path / "a"), model=model)
    assert again.a is again.b and torch.equal(again(x), pruned(x))


def test_corrupt_index_in_artifact_is_an_artifact_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _mlp()
    path = st.save(prune(model, {"sparsity": 0.9, "encoding": "bitmask"}), tmp_path / "a")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["0.index"][0] ^= 0xFF  # flips 8 mask bits: the kept count no longer matches the values
    save_file(tensors, str(path / "model.safetensors"))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tensors"]["sha256"] = None  # get past the checksum, to reach the decoder
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="bitmask marks"):
        st.load(path, model=model)


# -- recipes --------------------------------------------------------------------------------------------

def test_prune_runs_as_a_recipe_stage(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(8, 128)
    result = st.compress(model, "- prune:\n    sparsity: 0.9\n    encoding: relative\n", example_inputs=x, progress=False)
    assert result.metrics["after"]["bytes"] < 0.3 * result.metrics["before"]["bytes"]
    again = st.load(result.save(tmp_path / "a"), model=model)
    assert torch.equal(again(x), result.model(x))


# -- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_ratio_outside_unit_interval_is_refused(value):
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        PruneConfig(sparsity=value)
    with pytest.raises(ConfigError, match=r"overrides\.0\.sparsity.*outside \[0, 1\)"):
        PruneConfig(overrides=[{"pattern": "fc*", "sparsity": value}])


def test_inconsistent_configs_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        PruneConfig(steps=10, epochs=1)
    with pytest.raises(ConfigError, match="global threshold"):
        PruneConfig(scope="global", overrides=[{"pattern": "x", "sparsity": 0.5}])
    with pytest.raises(ConfigError, match="unknown key 'sparsty'.*did you mean 'sparsity'"):
        PruneConfig.parse({"sparsty": 0.5})


def test_pattern_matching_no_layer_warns_with_the_closest_names():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 8))
    model.add_module("fc2", nn.Linear(8, 2))
    ctx = prune_context(progress=False)
    with pytest.warns(UserWarning, match="matches no module"):
        run_stage(model, "prune", {"sparsity": 0.5, "skip": ["fc_2"], "layers": ["fc*", "conv*"]}, ctx)
    notes = [w for w in ctx.warnings if "matches no module" in w]
    assert any("'fc_2'" in w and "closest names: fc2" in w for w in notes)
    assert any("'conv*'" in w and "fc1" in w for w in notes)


def test_removing_every_weight_of_a_layer_is_refused_with_the_layer_named():
    model = nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 8))  # layer 0 has 2 weights, layer 1 has 8
    with pytest.raises(ConfigError, match=r"every one of the 2 weights of layer '0'.*skip"):
        prune(model, {"sparsity": 0.8})  # round(0.8 * 2) = 2 of 2
    big = _mlp()
    with torch.no_grad():
        big[4].weight.mul_(1e-6)  # a global threshold would empty the classifier
    with pytest.raises(ConfigError, match=r"global threshold.*weights of layer '4'"):
        prune(big, {"sparsity": 0.5, "scope": "global"})


def test_the_awkward_layers_are_pruned_the_lstm_as_its_matrices():
    case = CASES["unsupported"]
    ctx = prune_context(progress=False)
    pruned = run_stage(case.model(), "prune", {"sparsity": 0.5}, ctx)
    assert ctx.warnings == []  # nothing left: the LSTM's matrices are Linears to prune (core/recurrent.py)
    assert all(isinstance(m, SparseLayer) for m in pruned.lstm.matrices.values())
    assert isinstance(pruned.head, SparseLayer) and pruned.head.sparse_spec["kept"] == 12
    assert isinstance(pruned.emb, SparseLayer) and pruned.emb.kind == "embedding" and pruned.emb.sparse_spec["kept"] == 80


def test_nan_weights_and_missing_data_fail_clearly():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        prune(model, {"sparsity": 0.5})
    with pytest.raises(DataError, match="needs data"):
        prune(_mlp(), {"sparsity": 0.5, "steps": 5})
    with pytest.raises(DataError, match="labelled"):
        prune(_mlp(), {"sparsity": 0.5, "steps": 5}, data=[torch.randn(4, 20)])


def test_st_prune_dispatches_a_prune_config_here():
    model = _mlp()
    for config in (st.PruneConfig(sparsity=0.5), {"sparsity": 0.5}):
        pruned = st.prune(model, config, progress=False)
        assert isinstance(pruned[0], SparseLayer) and pruned[0].sparse_spec["kept"] == 640


def test_st_prune_takes_a_train_step_and_quantize_warns_on_pruned_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    data = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    calls = []
    pruned = st.prune(model, {"sparsity": 0.5, "steps": 5}, data=data, progress=False,
                      train_step=lambda m, batch: calls.append(batch))
    assert len(calls) == 5 and isinstance(pruned[0], SparseLayer)
    with pytest.warns(UserWarning, match="0 is a pruned sparse layer"):
        still_sparse = st.quantize(pruned, {"activations": None}, progress=False)
    assert isinstance(still_sparse[0], SparseLayer)
