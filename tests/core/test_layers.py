"""The one layer model (core/layers.py): layers found by what they compute, for every method.

The awkward kinds users bring: a Conv2d subclass that pads in its own forward (timm's Conv2dSame),
Hugging Face GPT-2's Conv1D (transposed weight, torch.addmm), a custom module calling F.linear on
its own parameter, one that transforms its weight first (weight standardization: refused with the
reason), nn.MultiheadAttention (its fused op reads the weights: refused with the reason)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.coverage import stage_coverage, summary_line
from shrinktunnel.core.layers import Wrapped, canonicalize, classify, visible_modules

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from the input size in forward (timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class ScaledLinear(nn.Module):
    """A custom layer: F.linear on its own parameter, with a learned output scale around it."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.scale = nn.Parameter(torch.full((n_out,), 1.5))

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


class StdConv2d(nn.Conv2d):
    """Weight standardization: the forward transforms the weight before convolving."""

    def forward(self, x):
        w = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / (self.weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def same_padding_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        Conv2dSame(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        Conv2dSame(16, 16, 3, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        Conv2dSame(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _warm_bn(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, 17, 17))
    return model.eval()


@pytest.fixture(scope="module")
def cnn():
    return _warm_bn(same_padding_cnn())


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return [torch.randn(8, 3, 17, 17) for _ in range(4)]


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_canonicalize_is_exact_and_leaves_the_model_alone(cnn, images):
    canonical, record, skipped = canonicalize(cnn)
    assert canonical is not cnn and not skipped
    assert [e["name"] for e in record["layers"]] == ["6", "3", "0"]  # deepest (here: last) first
    assert all(isinstance(canonical.get_submodule(n), Wrapped) for n in ("0", "3", "6"))
    assert type(canonical.get_submodule("0.compute")) is nn.Conv2d
    assert canonical.get_submodule("0.compute").padding == (0, 0)  # the call's geometry, not the module's
    # the inner module keeps its forward but no weight of its own (nothing stored twice)
    assert "weight" not in dict(canonical.get_submodule("0.inner").named_parameters())
    assert "0.inner" not in dict(visible_modules(canonical))
    for x in images:
        assert torch.equal(canonical(x), cnn(x))
    assert isinstance(cnn[0], Conv2dSame)  # the caller's model is untouched


@pytest.mark.parametrize("method", ["quantize", "prune", "cluster", "decompose", "cast"])
def test_every_method_reaches_a_conv_subclass_that_pads_in_forward(cnn, images, method):
    run = {
        "quantize": lambda: st.quantize(cnn, data=images, progress=False),
        "prune": lambda: st.prune(cnn, {"sparsity": 0.5}, progress=False),
        "cluster": lambda: st.cluster(cnn, {"bits": 4}, progress=False),
        "decompose": lambda: st.decompose(cnn, {"ratio": 0.5, "keep_if_slower": False}, progress=False),
        "cast": lambda: st.cast(cnn, {"format": "float16"}),
    }[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run()
    (cov,) = stage_coverage(out)
    if method == "decompose":  # a depthwise conv is already factorised: left whole, with that reason
        assert cov.skipped == {"3.compute": cov.skipped["3.compute"]} and "depthwise" in cov.skipped["3.compute"]
    else:
        assert cov.share == 1.0 and cov.done_layers == 4, summary_line(cov)
    x = images[0]
    floor = {"quantize": 25, "prune": 3, "cluster": 15, "decompose": 3, "cast": 50}[method]
    assert _sqnr(cnn(x), out(x)) > floor


def test_wrapped_layer_computes_what_its_own_forward_gives_with_the_new_weight(cnn, images):
    """Pruned: the compressed layer inside the wrapper equals the user's own Conv2dSame forward run
    with the pruned weight (same padding, same stride), bit for bit."""
    pruned = st.prune(cnn, {"sparsity": 0.5}, progress=False)
    layer = pruned[0].compute
    dense = layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight
    own = Conv2dSame(3, 16, 3, stride=2).eval()
    own.weight.data = dense.detach().clone()
    own.bias.data = cnn[0].bias.detach().clone()
    x = torch.randn(2, 3, 20, 23)  # odd and even sizes: the padding differs per side
    assert torch.equal(pruned[0](x), own(x))


def test_static_quantization_folds_batchnorm_and_exports_qlinearconv_graph(cnn, images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = st.quantize(cnn, data=images, progress=False)
    assert isinstance(q[1], nn.Identity) and isinstance(q[4], nn.Identity)
    assert any("folded" in str(w.message) for w in caught)
    path = tmp_path / "q.onnx"
    st.export_onnx(q, path, example_inputs=images[0])
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 3
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images[1]
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - q(x).detach().numpy()).max() < 1e-4
    # round trip: the artifact replays the wrapping and the folding
    q.eval()
    st.save(q, tmp_path / "art")
    back = st.load(tmp_path / "art", model=cnn)
    assert torch.equal(back(x), q(x))


def test_structured_pruning_shrinks_a_wrapped_conv_and_replays(cnn, images, tmp_path):
    pruned = st.prune(cnn, st.ChannelPruneConfig(ratio=0.5), example_inputs=images[0], data=images, progress=False)
    assert pruned[0].compute.out_channels < 16 and pruned[6].compute.in_channels == pruned[0].compute.out_channels
    st.save(pruned, tmp_path / "art")
    back = st.load(tmp_path / "art", model=cnn)
    assert torch.equal(back(images[0]), pruned(images[0]))


def test_custom_module_calling_f_linear_is_wrapped_and_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    data = [torch.randn(8, 16) for _ in range(4)]
    q = st.quantize(model, data=data, progress=False)
    assert isinstance(q[0], Wrapped) and type(q[0].compute).__name__ == "QuantizedLayer"
    assert any(n == "0.inner.scale" for n, _ in q.named_parameters())  # the module's own parameter stays
    (cov,) = stage_coverage(q)
    assert cov.share == 1.0
    assert _sqnr(model(data[0]), q(data[0])) > 25


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_becomes_four_linears_with_the_same_function(batch_first, tmp_path):
    from shrinktunnel.core.mha import Attention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    att = Attention.from_mha(mha)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[:, -2:] = True
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": torch.randn(7, 7), "need_weights": False},
                   {"attn_mask": torch.rand(7, 7) > 0.7, "key_padding_mask": pad, "average_attn_weights": False},
                   {"attn_mask": torch.ones(7, 7, dtype=torch.bool).triu(1), "is_causal": True}):
        (a, wa), (b, wb) = mha(x, x, x, **kwargs), att(x, x, x, **kwargs)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        if wa is not None:
            torch.testing.assert_close(wb, wa, atol=1e-6, rtol=1e-5)
    # a torch transformer: every projection reachable, quantized dynamically, saved and reloaded exactly
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(32, 3)).eval()
    canonical, record, skipped = canonicalize(model)
    assert not skipped and {e["replace"] for e in record["layers"]} == {"mha"}
    torch.testing.assert_close(canonical(x), model(x), atol=1e-5, rtol=1e-5)
    data = [torch.randn(*x.shape) for _ in range(3)]
    q = st.quantize(model, {"activations": {"dynamic": True}}, data=data, progress=False)
    (cov,) = stage_coverage(q)
    assert cov.share == 1.0 and cov.done_layers == 13
    assert _sqnr(model(x), q(x)) > 25
    st.save(q, tmp_path / "art")
    assert torch.equal(st.load(tmp_path / "art", model=model)(x), q(x))


def test_weight_transforming_forward_and_multihead_attention_are_refused_with_a_reason():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = StdConv2d(3, 8, 3, padding=1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.conv(x).flatten(2).transpose(1, 2)  # (B, HW, 8)
            h, _ = self.attn(h, h, h)
            return self.head(h.mean(1))

    model = Net().eval()
    plan = classify(model)
    assert plan["conv"][0] == "skip" and "transforms the weight" in plan["conv"][1]
    assert plan["attn"][0] == "skip" and "add_bias_kv" in plan["attn"][1]
    assert plan["attn.out_proj"][0] == "skip"  # read by its parent's fused op, never called
    data = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = st.quantize(model, data=data, progress=False)
    (cov,) = stage_coverage(q)
    assert set(cov.skipped) == {"conv", "attn", "attn.out_proj"}
    assert cov.done_layers == 1  # head
    messages = [str(w.message) for w in caught if str(w.message).startswith("quantize: ")]
    for reason in set(cov.skipped.values()):  # one warning per reason, not per layer
        assert sum(reason in m for m in messages) == 1, reason
    assert torch.isfinite(q(data[0])).all()  # the forward still runs


def test_gpt2_conv1d_is_a_linear_for_every_method():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    canonical, record, _ = canonicalize(model)
    assert {e["replace"] for e in record["layers"]} == {"addmm"}
    assert type(canonical.h[0].attn.c_attn) is nn.Linear
    ref = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(canonical(input_ids=ids).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    data = [{"input_ids": torch.randint(0, 100, (2, 12))} for _ in range(3)]
    q = st.quantize(model, {"activations": {"dynamic": True}}, data=data, progress=False)
    (cov,) = stage_coverage(q)
    assert not any("Conv1D" in r for r in cov.skipped.values())
    assert cov.done_layers >= 4 and cov.share > 0.95
    c = st.cluster(model, {"bits": 4}, progress=False)
    assert stage_coverage(c)[0].share > 0.95


def test_a_weight_norm_conv_is_an_exact_canonical_conv(tmp_path):
    """wav2vec2's positional conv: weight_norm parametrizes the weight; at inference the conv computes with
    the weight it produces, so every method reaches it through an exact canonical copy."""
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1, groups=2), name="weight", dim=2)
    model = nn.Sequential(conv, nn.GELU(), nn.Conv1d(4, 2, 1)).eval()
    x = torch.randn(2, 4, 10)
    canonical, record, skipped = canonicalize(model)
    assert record["layers"] == [{"name": "0", "replace": "Conv1d"}] and not skipped
    assert torch.equal(canonical(x), model(x))
    q = st.quantize(model, data=[x, x], progress=False)
    assert stage_coverage(q)[0].share == 1.0
    st.save(q, tmp_path / "a")
    assert torch.equal(st.load(tmp_path / "a", model=model)(x), q(x))
