"""fuse.attention: the attention core as one ONNX Runtime MultiHeadAttention kernel, same function."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import shrinktunnel as st
from shrinktunnel.export import ort_session
from shrinktunnel.fusion.attention import ATTENTION, fuse_attention, mha, unfuse_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _bert(layers=2, decoder=False):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, is_decoder=decoder)
    return BertModel(config, add_pooling_layer=False).eval()


class _Encoder(torch.nn.Module):
    """last_hidden_state of a BertModel, as the toolkit's models return one tensor."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _batch(b=3, t=10):
    torch.manual_seed(1)
    ids = torch.randint(1, 120, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # padded rows: the mask must reach the kernel
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_mha_is_scaled_dot_product_attention_over_heads():
    torch.manual_seed(0)
    b, s, h, d = 2, 5, 3, 4
    q, k, v = (torch.randn(b, s, h * d) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.int32)
    split = lambda x: x.reshape(b, s, h, d).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask.bool()[:, None, None, :], scale=0.3)
    got = mha(q, k, v, mask, None, h, 0.3)
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(b, s, h * d))


def test_fused_bert_computes_the_same_function_with_padding():
    model = _Encoder(_bert())
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch)
        assert fuse_attention(model) == ["bert"]
        assert model.bert.config._attn_implementation == ATTENTION
        got = model(**batch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    unfuse_attention(model)
    assert model.bert.config._attn_implementation == "sdpa"


def test_fused_export_runs_one_kernel_per_layer_in_onnx_runtime(tmp_path):
    model = _Encoder(_bert(layers=3))
    batch = _batch()
    plain_path = st.export_onnx(model, tmp_path / "plain.onnx", batch)
    fuse_attention(model)
    path = st.export_onnx(model, tmp_path / "fused.onnx", batch)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MultiHeadAttention") == 3 and "Softmax" not in ops
    ort_session(path, threads=1, optimized_model_path=tmp_path / "run.onnx")
    ort_session(plain_path, threads=1, optimized_model_path=tmp_path / "plain_run.onnx")
    run_ops = [n.op_type for n in onnx.load(str(tmp_path / "run.onnx")).graph.node]
    plain_ops = [n.op_type for n in onnx.load(str(tmp_path / "plain_run.onnx")).graph.node]
    assert run_ops.count("Transpose") == 0 < plain_ops.count("Transpose")  # the head split/merge transposes cancel
    assert len(run_ops) < len(plain_ops)
    session = ort_session(path, threads=1)
    for b, t in ((3, 10), (5, 10)):  # the batch is dynamic in the export
        x = _batch(b, t)
        got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(**x).numpy(), rtol=1e-4, atol=1e-4)


def test_decoders_and_other_models_are_left_alone():
    assert fuse_attention(torch.nn.Linear(3, 3)) == []
    decoder = _bert(decoder=True)
    assert fuse_attention(decoder) == []
    assert decoder.config._attn_implementation != ATTENTION


def test_fuse_ops_attention_round_trips_through_the_artifact(tmp_path):
    model = _Encoder(_bert())
    batch = _batch()
    fused = st.compress(model, [{"fuse_ops": {"bn": False, "linear": "never", "attention": True}}],
                        example_inputs=batch, progress=False).model
    assert fused.bert.config._attn_implementation == ATTENTION
    assert model.bert.config._attn_implementation != ATTENTION  # a copy was fused, not the original
    st.save(fused, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=_Encoder(_bert()))
    assert loaded.bert.config._attn_implementation == ATTENTION
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), fused(**batch), atol=0, rtol=0)


def test_fuse_ops_attention_on_a_model_without_an_encoder_warns():
    with pytest.warns(UserWarning, match="no Hugging Face encoder"):
        st.compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), [{"fuse_ops": {"bn": False, "linear": "never",
                                                                                "attention": True}}], progress=False)


def test_minilm_fused_and_int8_keeps_its_embeddings_and_runs_one_kernel_per_layer(tmp_path):
    from shrinktunnel import assets

    batch = assets.tweet_batches(8, 0, 8, 16)[0]
    assert bool((batch["attention_mask"] == 0).any())  # padded rows: the mask reaches the kernel
    model = assets.minilm()
    fused = st.compress(model, [{"fuse_ops": {"bn": False, "linear": "never", "attention": True}}], progress=False).model
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch), model(**batch), rtol=1e-5, atol=1e-5)
    outputs = {}
    for name, m in (("fused", fused), ("plain", model)):
        q = st.quantize(m, {"activations": {"dynamic": True, "per_token": False}}, progress=False)
        path = st.export_onnx(q, tmp_path / f"{name}.onnx", batch)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert ops.count("MultiHeadAttention") == (6 if name == "fused" else 0)
        session = ort_session(path, threads=1)
        names = {i.name for i in session.get_inputs()}
        outputs[name] = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0])
    # The runtime computes what it computed unfused, up to the float summation order of the attention
    # kernel, which can flip a rounding of the next dynamic quantization (max abs 0.003 seen; the int8
    # model itself is 0.995 per row from its PyTorch simulation, fused or not).
    assert float(F.cosine_similarity(outputs["fused"], outputs["plain"]).min()) > 0.999
    with torch.no_grad():
        assert float(F.cosine_similarity(outputs["fused"], model(**batch)).mean()) > 0.98


# -- every encoder family ---------------------------------------------------------------------------
def _zoo(name):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    import zoo_models

    return zoo_models


ENCODERS = ["bert", "roberta", "distilbert", "electra", "mpnet", "vit", "t5"]


@pytest.mark.parametrize("name", ENCODERS)
def test_every_encoder_family_fuses_and_runs_one_kernel_per_layer_in_onnx_runtime(name, tmp_path):
    """Same outputs in PyTorch, then in ONNX Runtime with one MultiHeadAttention per layer (MPNet and T5:
    their relative position bias is the kernel's attention bias; T5 does not scale by 1/sqrt(d))."""
    from shrinktunnel.core import data as D
    from shrinktunnel.export import OrtModel

    Z = _zoo(name)
    model, x = Z.ZOO[name]()
    (args, kwargs), _ = D.split(x)
    with torch.no_grad():
        ref = model(*args, **kwargs)
    messages = []
    assert fuse_attention(model, x, warn=messages.append) == ["model"] and messages == []
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kwargs), ref, rtol=1e-5, atol=1e-5)
    path = st.export_onnx(model, tmp_path / f"{name}.onnx", x)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MultiHeadAttention") == 2 and "Softmax" not in ops  # two layers, no attention left unfused
    batches = [x] + ([Z._text_batch(3, 30, seed=4)] if name in Z.TEXT else [])  # any sequence length too
    for batch in batches:
        (args, kwargs), _ = D.split(batch)
        with torch.no_grad():
            want = model(*args, **kwargs)
        np.testing.assert_allclose(OrtModel(path, threads=1)(*args, **kwargs).numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_the_relative_position_bias_is_not_lost():
    """Without T5's position bias the outputs differ: the check that guards every switch would see it."""
    from shrinktunnel.fusion import attention as A

    Z = _zoo("t5")
    model, x = Z.ZOO["t5"]()
    with torch.no_grad():
        ref = model(**x)
    original = A._mask_and_bias
    A._mask_and_bias = lambda mask, bias, *a: original(mask, None, *a)  # drop the bias
    try:
        messages = []
        assert fuse_attention(model, x, warn=messages.append) == []
    finally:
        A._mask_and_bias = original
    assert len(messages) == 1 and "differs from the unfused one" in messages[0]
    assert model.model.config._attn_implementation != ATTENTION  # restored
    with torch.no_grad():
        torch.testing.assert_close(model(**x), ref, rtol=0, atol=0)


def test_a_switch_that_breaks_the_forward_is_undone_with_one_warning_per_reason(monkeypatch):
    """The fused kernel failing inside the forward: the switch is undone, one warning names it, and
    the model computes exactly what it did before."""
    from shrinktunnel.fusion import attention as A

    Z = _zoo("bert")
    model, x = Z.ZOO["bert"]()
    with torch.no_grad():
        ref = model(**x)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(A, "mha", broken)
    messages = []
    assert fuse_attention(model, x, warn=messages.append) == []
    assert len(messages) == 1 and "the fused forward fails" in messages[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**x), ref, rtol=0, atol=0)


def test_mpnet_without_its_adapter_is_left_unfused_and_unchanged():
    """MPNet's own attention does not go through transformers' attention interface (only its config
    switched, it failed with the shape error of issue 15): without the adapter nothing reaches the
    kernel, the model is left as it was, with the reason."""
    from shrinktunnel.fusion import attention as A

    Z = _zoo("mpnet")
    model, x = Z.ZOO["mpnet"]()
    with torch.no_grad():
        ref = model(**x)
    adapters = dict(A._ADAPTERS)
    A._ADAPTERS.clear()
    try:
        messages = []
        assert fuse_attention(model, x, warn=messages.append) == []
    finally:
        A._ADAPTERS.update(adapters)
    assert len(messages) == 1 and "left unfused" in messages[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**x), ref, rtol=0, atol=0)


def test_decoders_and_models_without_attention_are_refused_with_one_warning_each():
    Z = _zoo("gpt2")
    messages = []
    for name in ("gpt2", "llama"):
        model, x = Z.ZOO[name]()
        assert fuse_attention(model, x, warn=messages.append) == []
    model, x = Z.ZOO["resnet"]()
    assert fuse_attention(model, x, warn=messages.append) == []
    assert len(messages) == 3
    assert "causal" in messages[0] and "causal" in messages[1] and "no attention reached the kernel" in messages[2]


def test_fused_mpnet_round_trips_through_the_artifact(tmp_path):
    """fuse_ops checks on the example; st.load switches the same sub-model again (adapter included)."""
    Z = _zoo("mpnet")
    mpnet, x = Z.ZOO["mpnet"]()
    fused = st.compress(mpnet, [{"fuse_ops": {"bn": False, "linear": "never", "attention": True}}], example_inputs=x,
                        progress=False).model
    assert type(fused.model.encoder.layer[0].attention.attn).__name__ == "FusedMPNetSelfAttention"
    assert type(mpnet.model.encoder.layer[0].attention.attn).__name__ == "MPNetSelfAttention"  # a copy was fused
    with torch.no_grad():
        torch.testing.assert_close(fused(**x), mpnet(**x), rtol=1e-5, atol=1e-5)
    st.save(fused, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=Z.ZOO["mpnet"]()[0])
    assert type(loaded.model.encoder.layer[0].attention.attn).__name__ == "FusedMPNetSelfAttention"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), fused(**x), rtol=0, atol=0)
    unfuse_attention(loaded)
    assert type(loaded.model.encoder.layer[0].attention.attn).__name__ == "MPNetSelfAttention"


def test_an_example_the_model_cannot_run_fuses_nothing_with_a_warning():
    model = _Encoder(_bert())
    messages = []
    assert fuse_attention(model, {"input_ids": torch.zeros(2, 3, 4, dtype=torch.long)}, warn=messages.append) == []
    assert len(messages) == 1 and "unfused model fails on the example" in messages[0]
    assert model.bert.config._attn_implementation != ATTENTION
