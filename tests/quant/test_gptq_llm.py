"""GPTQ as published on a tiny Llama: act-order with static groups, true-sequential calibration over the
blocks, the tied lm_head default (issue 20)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shrinktunnel as st
from shrinktunnel.core.tied import TiedEmbedding
from shrinktunnel.quant.gptq import find_blocks, gptq_quantize, sequential_round
from shrinktunnel.quant.modules import QuantizedLayer
from shrinktunnel.quant.ops import quantize_weight, weight_qparams, weight_qrange


def tiny_llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def calib():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 96, (2, 16), generator=g) for _ in range(3)]


W4G16 = {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16}, "activations": None}


def test_act_order_static_groups_keep_the_original_scales():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 64)
    h = 2 * x.double().t() @ x.double() / 200
    qmin, qmax = weight_qrange(4, True)
    q, scale, zp = gptq_quantize(w, h, qmin, qmax, True, "per_group", 16, act_order=True)
    ref_scale, ref_zp = weight_qparams(w, qmin, qmax, True, "per_group", 16)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    # uncorrelated inputs: act-order is still exactly round-to-nearest
    q_eye, _, _ = gptq_quantize(w, torch.diag(torch.linspace(3, 1, 64)), qmin, qmax, True, "per_group", 16, act_order=True)
    assert torch.equal(q_eye.to(torch.int8), quantize_weight(w, ref_scale, ref_zp, qmin, qmax, torch.int8))
    # and on correlated inputs GPTQ's output error is below round-to-nearest's
    deq = lambda qq: (qq.reshape(8, 4, 16) * scale.unsqueeze(2)).reshape(8, 64)  # noqa: E731
    err_gptq = float(((x @ (deq(q) - w).t()) ** 2).mean())
    err_rtn = float(((x @ (deq(q_eye) - w).t()) ** 2).mean())
    assert err_gptq < err_rtn


def test_true_sequential_rounds_block_by_block_on_rounded_inputs():
    model = tiny_llama()
    blocks = find_blocks(model, [model.model.layers[1].mlp.down_proj])
    assert blocks is not None and blocks[0] == "model.layers"

    class P:
        def __init__(self, name, module):
            self.name, self.module = name, module

    plans = [P(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    order, seen_q1 = [], []
    before = {p.name: p.module.weight.detach().clone() for p in plans}

    def round_group(group, rows):
        order.append([p.name for p in group])
        if group[0].name == "model.layers.1.self_attn.q_proj":
            seen_q1.append(torch.cat(rows[group[0].name]))
        return {p.name: torch.zeros_like(p.module.weight) for p in group}  # "rounded" to zero

    handled = sequential_round(model, plans, [((b,), {}) for b in calib()], lambda m, i: m(*i[0], **i[1]), round_group)
    assert handled == {p.name for p in plans}
    assert order[:4] == [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
                         ["model.layers.0.self_attn.o_proj"], ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                         ["model.layers.0.mlp.down_proj"]]
    assert order[-1] == ["lm_head"]
    for p in plans:  # every weight restored
        assert torch.equal(p.module.weight, before[p.name])
    # block 1 was calibrated on block 0's output with block 0 "rounded" (to zero: the block is the identity
    # plus zero attention and MLP, so block 1's normalised input is the normalised embedding)
    with torch.no_grad():
        emb = model.model.embed_tokens(torch.cat([b.reshape(-1) for b in calib()]))
        expect = model.model.layers[1].input_layernorm(emb)
    torch.testing.assert_close(seen_q1[0], expect, rtol=1e-5, atol=1e-5)


def test_tied_head_default_float_below_8_bits_quantized_once_at_8():
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q4 = st.quantize(model, W4G16, progress=False)
    assert type(q4.lm_head) is torch.nn.Linear and q4.lm_head.weight is q4.model.embed_tokens.weight
    assert any("tied: auto keeps a tied output head float" in str(w.message) for w in caught)
    q4t = st.quantize(model, {**W4G16, "tied": "quantize"}, progress=False)
    assert isinstance(q4t.lm_head, QuantizedLayer) and isinstance(q4t.model.embed_tokens, TiedEmbedding)
    q8 = st.quantize(model, {"activations": None}, progress=False)
    assert isinstance(q8.lm_head, QuantizedLayer) and q8.model.embed_tokens.layer is q8.lm_head
    q8f = st.quantize(model, {"activations": None, "tied": "float"}, progress=False)
    assert type(q8f.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_on_a_tiny_llama_saves_and_reloads(act_order, tmp_path):
    model = tiny_llama()
    q = st.quantize(model, {**W4G16, "rounding": "gptq", "gptq_act_order": act_order}, data=calib(), progress=False)
    assert isinstance(q.model.layers[1].mlp.down_proj, QuantizedLayer)
    ids = calib()[0]
    path = tmp_path / "art"
    st.save(q, path)
    back = st.load(path, model=tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, q(ids).logits, rtol=0, atol=0)
        ref = model(ids).logits
        cos = torch.nn.functional.cosine_similarity(q(ids).logits.flatten(), ref.flatten(), dim=0)
    assert cos > 0.98, cos
