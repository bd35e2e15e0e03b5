"""core/recurrent.py: LSTM / GRU matrices stored int8 per row or float16, expanded per forward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shrinktunnel.core.recurrent import RecurrentWeightOnly


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = float(((ref - got) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(("storage", "floor", "bytes_per"), [("int8", 30, 1), ("float16", 60, 2)])
def test_recurrent_weights_stored_narrow_keep_the_outputs(cls, storage, floor, bytes_per):
    torch.manual_seed(0)
    rnn = cls(8, 16, num_layers=2, batch_first=True, bidirectional=True).eval()
    layer = RecurrentWeightOnly.from_module(rnn, storage).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert _sqnr(rnn(x)[0], layer(x)[0]) > floor
    sd = layer.state_dict()
    matrices = [k for k in sd if k.endswith("_stored")]
    assert len(matrices) == 8 and all(sd[k].element_size() == bytes_per for k in matrices)
    assert not any(k.startswith("rnn.weight") for k in sd)  # nothing stored twice; biases stay float32
    assert layer.hidden_size == 16 and layer.weight_hh_l0.dtype == torch.float32
    again = RecurrentWeightOnly(layer.spec())
    again.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], layer(x)[0])


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="newer shrinktunnel"):
        RecurrentWeightOnly({"kind": "lstm", "storage": "int3", "config": {}, "matrices": []})


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens):
        h, _ = self.gru(self.emb(tokens))
        return self.head(h)


@pytest.mark.parametrize("how", ["quantize", "cast"])
def test_quantize_and_cast_store_a_recurrent_layer_weight_only(how, tmp_path):
    import shrinktunnel as st
    from shrinktunnel.core.coverage import stage_coverage
    from shrinktunnel.export import OrtModel

    torch.manual_seed(0)
    model, x = _Tagger().eval(), torch.randint(0, 20, (4, 7))
    if how == "quantize":
        result = st.compress(model, [{"quantize": {"activations": {"dynamic": True}}}], data=[x], progress=False)
    else:
        result = st.compress(model, [{"cast": {"format": "bfloat16"}}], progress=False)
    out = result.model
    assert type(out.gru) is RecurrentWeightOnly
    assert out.gru.weight_hh_l0_stored.dtype == (torch.int8 if how == "quantize" else torch.bfloat16)
    (cov,) = stage_coverage(out)
    assert cov.share == 1.0 and not cov.skipped  # the GRU counts as done, with no reason left behind
    assert [w for w in result.warnings if "gru" in w] == [w for w in result.warnings if "weight-only" in w]
    with torch.no_grad():
        assert _sqnr(model(x), out(x)) > 25
        loaded = st.load(st.save(out, tmp_path / "a"), model=_Tagger())
        assert torch.equal(loaded(x), out(x))
    if how == "quantize":  # the recurrent op with expanded matrices exports as any float one (one export: seconds)
        got = OrtModel(st.export_onnx(out, tmp_path / "m.onnx", x))(x)
        assert (got - out(x)).abs().max() <= 0.02 * out(x).abs().max()


class _Encoder(nn.Module):
    """A two-layer bidirectional LSTM between two Linears: 90 % of the weights are recurrent matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.lstm = nn.LSTM(24, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h, _ = self.lstm(self.inp(x))
        return self.head(h[:, -1])


RUNS = {  # method -> (run, the layer kind each matrix becomes, SQNR floor of the outputs, ONNX tolerance)
    "prune": (lambda st, m, x: st.prune(m, {"sparsity": 0.5}, progress=False), "SparseLayer", None, 1e-5),
    "cluster": (lambda st, m, x: st.cluster(m, {"bits": 5}, progress=False), "ClusteredLayer", 25, 1e-5),
    "qat": (lambda st, m, x: st.qat(m, {"loss": "mse_to_float", "steps": 2, "lr": 1e-4}, data=[x], progress=False),
            "QuantizedLayer", 25, 2e-2),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_prune_cluster_and_qat_take_recurrent_matrices_as_linears(method, tmp_path):
    import warnings

    import shrinktunnel as st
    from shrinktunnel.core.coverage import stage_coverage
    from shrinktunnel.core.recurrent import RecurrentLinears
    from shrinktunnel.export import OrtModel

    torch.manual_seed(0)
    model, x = _Encoder().eval(), torch.randn(4, 6, 8)
    run, kind, floor, tol = RUNS[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = run(st, model, x)
    assert type(out.lstm) is RecurrentLinears
    assert {type(m).__name__ for m in out.lstm.matrices.values()} == {kind}
    assert len(out.lstm.matrices) == 8  # 2 layers x 2 directions x (ih, hh)
    (cov,) = stage_coverage(out)
    assert cov.share == 1.0 and not cov.skipped, cov  # was 10 %: the LSTM left float with a reason
    if method == "qat":  # never called, so weight-only: said once, naming the matrices
        said = [str(w.message) for w in caught if "recurrent matrices" in str(w.message)]
        assert len(said) == 1 and "lstm.matrices.weight_hh_l1_reverse" in said[0]
    with torch.no_grad():
        got = out(x)
        if method == "prune":  # the kept weights are the original ones, and the LSTM computes with exactly them
            ref = _Encoder().eval()
            for name, p in model.lstm.named_parameters():
                kept = getattr(out.lstm, name)
                if p.dim() == 2:
                    assert 0.3 <= float((kept == 0).float().mean()) <= 0.7
                    assert torch.equal(kept, torch.where(kept != 0, p, torch.zeros_like(p)))
                getattr(ref.lstm, name).copy_(kept)
            for lin in ("inp", "head"):
                getattr(ref, lin).weight.copy_(getattr(out, lin).weight)
                getattr(ref, lin).bias.copy_(getattr(out, lin).bias)
            assert (ref(x) - got).abs().max() <= 1e-6
        else:
            assert _sqnr(model(x), got) > floor
        loaded = st.load(st.save(out, tmp_path / "a"), model=_Encoder())
        assert torch.equal(loaded(x), got)  # the artifact rebuilds the matrices as Linears (canonical record)
    onnx = OrtModel(st.export_onnx(loaded, tmp_path / "m.onnx", x))(x)
    assert (torch.as_tensor(onnx) - got).abs().max() <= tol * max(1.0, float(got.abs().max()))


def test_a_pattern_naming_the_recurrent_layer_reaches_its_matrices():
    import shrinktunnel as st
    from shrinktunnel.core.coverage import stage_coverage

    torch.manual_seed(0)
    out = st.prune(_Encoder().eval(), {"sparsity": 0.5, "skip": ["lstm"]}, progress=False)
    assert all(type(m) is nn.Linear for m in out.lstm.matrices.values())  # skipped by its own name
    (cov,) = stage_coverage(out)
    assert cov.share < 0.2
