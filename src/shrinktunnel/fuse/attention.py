"""Attention fusion: a transformer's attention core as ONE ONNX Runtime kernel.

Exported op by op, the core of every attention layer (split into heads, Q K^T, scale, mask, softmax,
times V, merge the heads) is a dozen nodes per layer, a third of them Transposes; on all-MiniLM-L6-v2
int8 that glue costs more than the int8 matmuls themselves (docs/fusion.md). ONNX Runtime has a fused
kernel for it, `com.microsoft.MultiHeadAttention`, which reads q, k and v as (batch, tokens, hidden)
and a (batch, tokens) padding mask. Its transformer optimizer finds that pattern only in the graphs of
the exporters it knows, so the fusion is made here, at the source:

- `mha`, a PyTorch operator `shrinktunnel::mha(q, k, v, mask, num_heads, scale)` with an eager
  implementation (scaled_dot_product_attention) and an ONNX translation to MultiHeadAttention;
- `ATTENTION`, an attention implementation registered with transformers' AttentionInterface (and its
  mask interface: the 2D padding mask as it is), which calls `mha`. Setting a Hugging Face model's
  `config._attn_implementation` to it changes the graph, not the function: the projections, their
  quantization and everything else stay where they are.

`fuse_attention(model)` switches every Hugging Face sub-model it finds (PreTrainedModel with a config)
and returns their names; models of other kinds are left as they are (the caller warns).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ATTENTION", "mha", "fuse_attention", "unfuse_attention", "onnx_translations", "register_with_transformers"]

ATTENTION = "shrinktunnel_mha"  # the name transformers knows the implementation by


@torch.library.custom_op("shrinktunnel::mha", mutates_args=())
def mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, num_heads: int,
        scale: float) -> torch.Tensor:
    """Multi-head attention on (batch, tokens, heads x head_size) tensors; `mask` (batch, kv tokens),
    nonzero where a key may be attended. Returns (batch, tokens, heads x head_size)."""
    b, s, hidden = query.shape
    kv = key.shape[1]
    d = hidden // num_heads
    q = query.reshape(b, s, num_heads, d).transpose(1, 2)
    k = key.reshape(b, kv, num_heads, d).transpose(1, 2)
    v = value.reshape(b, kv, num_heads, d).transpose(1, 2)
    keep = (mask != 0)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return out.transpose(1, 2).reshape(b, s, hidden).contiguous()


@mha.register_fake
def _(query, key, value, mask, num_heads, scale):
    return torch.empty_like(query)


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q, k, v (batch, heads, tokens, head_size) in, (batch, tokens,
    heads, head_size) out. The transposes around `mha` cancel in ONNX Runtime's graph optimizer."""
    if dropout and module.training:
        raise RuntimeError(f"attention {ATTENTION!r} is for inference; train with another attn_implementation")
    if getattr(module, "is_causal", False):
        raise RuntimeError(f"attention {ATTENTION!r} implements bidirectional (encoder) attention only")
    b, h, s, d = query.shape
    kv = key.shape[2]
    mask = (torch.ones(b, kv, dtype=torch.int32, device=query.device) if attention_mask is None
            else _padding_mask(attention_mask, b, kv))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    out = mha(query.transpose(1, 2).reshape(b, s, h * d), key.transpose(1, 2).reshape(b, kv, h * d),
              value.transpose(1, 2).reshape(b, kv, h * d), mask, h, scale)
    return out.reshape(b, s, h, d), None


def _padding_mask(mask: torch.Tensor, batch: int, kv: int) -> torch.Tensor:
    if mask.dim() != 2 or mask.shape[-1] != kv:
        raise RuntimeError(f"attention {ATTENTION!r} takes a (batch, tokens) padding mask, got shape "
                           f"{tuple(mask.shape)}; causal or 4D masks need another attn_implementation")
    return mask.to(torch.int32)


def _mask_2d(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """transformers' mask interface: the (batch, tokens) padding mask as given (never dropped when it
    is all ones: that would be a data-dependent branch in an exported graph)."""
    return attention_mask


def register_with_transformers() -> bool:
    """Make ATTENTION known to transformers (idempotent); False when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION, _attention_forward)
    AttentionMaskInterface.register(ATTENTION, _mask_2d)
    return True


def _hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def fuse_attention(model: nn.Module) -> list[str]:
    """Switch every Hugging Face model inside `model` (in place) to ATTENTION; the names switched
    (outermost ones; "" for the model itself). Models whose attention is causal or not an encoder's are
    left alone: the names returned are the ones that changed."""
    if not register_with_transformers():
        return []
    switched = []
    for name, m in _hf_models(model):
        if any(s == "" or name.startswith(f"{s}.") for s in switched):
            continue  # a sub-model of one already switched shares its config
        config = m.config
        if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
            continue
        config._attn_implementation = ATTENTION
        for sub in m.modules():  # sub-configs some models keep per layer
            sub_cfg = getattr(sub, "config", None)
            if sub_cfg is not None and sub_cfg is not config and hasattr(sub_cfg, "_attn_implementation"):
                sub_cfg._attn_implementation = ATTENTION
        switched.append(name)
    return switched


def unfuse_attention(model: nn.Module, implementation: str = "sdpa") -> None:
    """Back to `implementation` (for training: the fused kernel is inference only)."""
    for _, m in _hf_models(model):
        m.config._attn_implementation = implementation


def onnx_translations() -> dict:
    """{torch op: onnxscript function}: `mha` as com.microsoft.MultiHeadAttention."""
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op
    from onnxscript import values

    # onnx ships no schema for ONNX Runtime's contrib operators: the part of MultiHeadAttention's used
    # here (q, k, v as (batch, tokens, hidden), no bias, an int32 key padding mask).
    P = OpSchema.FormalParameter
    schema = OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T"), P("value", "T"), P("bias", "T"), P("key_padding_mask", "M")],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")],
    )
    mha_op = values.Op(values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def _mha(query, key, value, mask, num_heads: int, scale: float):
        return mha_op(query, key, value, None, op.Cast(mask, to=6), num_heads=num_heads, scale=scale)

    return {torch.ops.shrinktunnel.mha.default: _mha}
