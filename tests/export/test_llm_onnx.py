"""export_llm: a causal LM as an ONNX decoder with a KV cache, weight-only layers as MatMulNBits (issue 20).
Tiny random-weight Llama / Qwen2 configs; ONNX Runtime against PyTorch."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shrinktunnel as st
from shrinktunnel.errors import ModelError
from shrinktunnel.export.llm import export_llm, generate, llm_session


def tiny(kind: str = "llama"):
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=True)
    if kind == "qwen2":  # q / k / v biases, untied head
        return T.Qwen2ForCausalLM(T.Qwen2Config(**{**common, "tie_word_embeddings": False})).eval()
    return T.LlamaForCausalLM(T.LlamaConfig(**common)).eval()


def _empty_past(session, batch=1):
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_")}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.numpy()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_float_graph_matches_pytorch_and_the_cache_continues_exactly(tmp_path, kind):
    model = tiny(kind)
    info = export_llm(model, tmp_path / "m.onnx")
    assert info["notes"] == [] and "MatMulNBits" not in info["nodes"]
    s = llm_session(tmp_path / "m.onnx")
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    out = s.run(None, {"input_ids": ids[:, :5].numpy(), **_empty_past(s, 2)})
    np.testing.assert_allclose(out[0], _logits(model, ids[:, :5]), atol=1e-4, rtol=1e-4)
    past = {i.name: o for i, o in zip([i for i in s.get_inputs() if i.name.startswith("past_")], out[1:])}
    assert past["past_key_0"].shape == (2, 2, 5, 16)
    step = s.run(["logits"], {"input_ids": ids[:, 5:].numpy(), **past})[0]
    np.testing.assert_allclose(step, _logits(model, ids)[:, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, symmetric, granularity", [(4, True, "per_group"), (4, False, "per_group"),
                                                          (3, False, "per_group"), (8, True, "per_group"),
                                                          (4, True, "per_channel")])
def test_weight_only_layers_run_as_matmul_nbits_with_the_same_numbers(tmp_path, bits, symmetric, granularity):
    model = tiny()
    w = {"bits": bits, "symmetric": symmetric, "granularity": granularity}
    if granularity == "per_group":
        w["group_size"] = 16
    q = st.quantize(model, {"weights": w, "activations": None}, progress=False)
    info = export_llm(q, tmp_path / "q.onnx")
    # 7 Linears a block; the tied head too at 8 bits (tied: auto quantizes it from 8 bits up).
    assert info["nodes"]["MatMulNBits"] == 14 + (bits == 8) and info["notes"] == []
    s = llm_session(tmp_path / "q.onnx")
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    out = s.run(["logits"], {"input_ids": ids.numpy(), **_empty_past(s)})[0]
    np.testing.assert_allclose(out, _logits(q, ids), atol=1e-4, rtol=1e-4)


def test_int4_greedy_tokens_in_onnx_runtime_match_pytorch_greedy(tmp_path):
    model = tiny()
    cal = [torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    q = st.quantize(model, {"weights": {"bits": 4, "symmetric": False, "granularity": "per_group", "group_size": 16},
                            "activations": None, "awq": True}, data=cal, progress=False)
    info = export_llm(q, tmp_path / "q.onnx")
    assert info["nodes"]["MatMulNBits"] == 14 and info["nodes"]["Mul"] > 14  # AWQ's 1/s: one Mul a smoothed layer
    s = llm_session(tmp_path / "q.onnx")
    for seed in range(2):
        ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(10 + seed))
        got = generate(s, ids, 8)
        with torch.no_grad():
            ref = q.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[:, 6:]
        assert got["tokens"].tolist() == ref.tolist()
        assert len(set(got["tokens"][0].tolist())) > 1  # not a degenerate repeat that any graph would give


def test_unsupported_model_is_refused_and_nothing_is_written(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ModelError, match="model_type 'gpt2'.*llama"):
        export_llm(model, tmp_path / "g.onnx")
    assert list(tmp_path.iterdir()) == []
