"""Attention fusion: a transformer's attention core as ONE ONNX Runtime kernel.

Exported op by op, the core of every attention layer (split into heads, Q K^T, scale, bias, mask,
softmax, times V, merge the heads) is a dozen nodes per layer, a third of them Transposes; on
all-MiniLM-L6-v2 int8 that glue costs more than the int8 matmuls themselves (docs/fusion.md). ONNX
Runtime has a fused kernel for it, `com.microsoft.MultiHeadAttention`, which reads q, k and v as
(batch, tokens, hidden), a (batch, tokens) padding mask and an additive attention bias of shape
(batch or 1, heads or 1, tokens, kv tokens). Its transformer optimizer finds that pattern only in the
graphs of the exporters it knows, so the fusion is made here, at the source:

- `mha`, a PyTorch operator `shrinktunnel::mha(q, k, v, mask?, bias?, num_heads, scale)` with an eager
  implementation (scaled_dot_product_attention) and an ONNX translation to MultiHeadAttention;
- `ATTENTION`, an attention implementation registered with transformers' AttentionInterface (and its
  mask interface: the 2D padding mask as it is), which calls `mha`. Switching a Hugging Face model to
  it (`set_attn_implementation`) changes the graph, not the function: the projections, their
  quantization and everything else stay where they are. A relative position bias (T5's
  `position_bias`) or a 4D additive mask (Swin's windows) becomes the kernel's attention bias;
- families whose attention does not go through that interface (MPNet: its own eager attention, with
  a relative position bias) get their self-attention module's class switched to a subclass whose
  forward calls `mha` with the same projections (`_ADAPTERS`).

`fuse_attention(model, example)` switches every Hugging Face encoder it finds and checks each switch
on `example` (or the sub-model's own dummy inputs): a switch that changes the outputs, fails, or
never reaches the kernel is undone, with the reason. One warning per reason.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import register_onnx_translations

__all__ = ["ATTENTION", "mha", "fuse_attention", "unfuse_attention", "onnx_translations", "register_with_transformers",
           "FUSED_TOLERANCE"]

ATTENTION = "shrinktunnel_mha"  # the name transformers knows the implementation by
FUSED_TOLERANCE = 1e-4  # fused vs unfused outputs, max abs difference relative to max(1, max |output|):
# measured 1e-6 on the encoders of the zoo (the kernel sums in another order); a wrong bias or mask
# moves outputs by 1e-1 and more


@torch.library.custom_op("shrinktunnel::mha", mutates_args=())
def mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
        bias: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    """Multi-head attention on (batch, tokens, heads x head_size) tensors. `mask` (batch, kv tokens),
    nonzero where a key may be attended, or None; `bias` additive, (batch or 1, heads or 1, tokens,
    kv tokens), or None. Returns (batch, tokens, heads x head_size)."""
    b, s, hidden = query.shape
    kv = key.shape[1]
    d = hidden // num_heads
    q = query.reshape(b, s, num_heads, d).transpose(1, 2)
    k = key.reshape(b, kv, num_heads, d).transpose(1, 2)
    v = value.reshape(b, kv, num_heads, d).transpose(1, 2)
    attn = None if bias is None else bias.to(q.dtype)
    if mask is not None:
        keep = (mask != 0)[:, None, None, :]
        attn = keep if attn is None else torch.where(keep, attn, torch.finfo(q.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, scale=scale)
    return out.transpose(1, 2).reshape(b, s, hidden).contiguous()


@mha.register_fake
def _(query, key, value, mask, bias, num_heads, scale):
    return torch.empty_like(query)


_CALLS = [0]  # eager calls of the kernel through the interface / adapters: a switch the model never uses does nothing


def _mask_and_bias(attention_mask: torch.Tensor | None, position_bias: torch.Tensor | None, b: int, h: int, s: int,
                   kv: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The kernel's (batch, kv) padding mask and (batch or 1, heads or 1, s, kv) additive bias from what
    transformers passes: a 2D padding mask (our mask interface), a 4D additive or boolean mask (models
    that build their own: Swin's windows, extended masks), and a relative position bias."""
    mask = bias = None
    if attention_mask is not None:
        if attention_mask.dim() == 2 and attention_mask.shape[-1] == kv:
            mask = attention_mask.to(torch.int32)
        elif attention_mask.dim() == 4:
            bias = attention_mask if attention_mask.dtype.is_floating_point else \
                torch.where(attention_mask.bool(), 0.0, torch.finfo(torch.float32).min)
        else:
            raise RuntimeError(f"attention {ATTENTION!r} takes a (batch, tokens) padding mask or a 4D additive mask, "
                               f"got shape {tuple(attention_mask.shape)}")
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    if bias is not None:
        if bias.dim() != 4 or bias.shape[0] not in (1, b) or bias.shape[1] not in (1, h):
            raise RuntimeError(f"attention {ATTENTION!r}: an attention bias of shape {tuple(bias.shape)} does not "
                               f"broadcast to (batch {b}, heads {h}, {s}, {kv})")
        bias = bias.expand(bias.shape[0], bias.shape[1], s, kv)  # the kernel broadcasts batch and heads only
    return mask, bias


def _attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       position_bias: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q, k, v (batch, heads, tokens, head_size) in, (batch, tokens,
    heads, head_size) out. The transposes around `mha` cancel in ONNX Runtime's graph optimizer."""
    if dropout and module.training:
        raise RuntimeError(f"attention {ATTENTION!r} is for inference; train with another attn_implementation")
    if getattr(module, "is_causal", False):
        raise RuntimeError(f"attention {ATTENTION!r} implements bidirectional (encoder) attention only")
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"attention {ATTENTION!r} has no {name}")
    b, h, s, d = query.shape
    kv = key.shape[2]
    if key.shape[1] != h:
        raise RuntimeError(f"attention {ATTENTION!r}: {key.shape[1]} key heads for {h} query heads (grouped-query "
                           "attention) is not supported")
    mask, bias = _mask_and_bias(attention_mask, position_bias, b, h, s, kv)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(d)
    _CALLS[0] += 1
    out = mha(query.transpose(1, 2).reshape(b, s, h * d), key.transpose(1, 2).reshape(b, kv, h * d),
              value.transpose(1, 2).reshape(b, kv, h * d), mask, bias, h, scale)
    return out.reshape(b, s, h, d), None


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


# -- families with their own attention code ---------------------------------------------------------
def _mpnet_self_attention(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False,
                          **kwargs):
    """MPNetSelfAttention.forward with the core as `mha`: scores / sqrt(d) + relative position bias
    (batch, heads, s, s) + padding mask, softmax, times v. The projections are the module's own."""
    if output_attentions:
        raise RuntimeError(f"attention {ATTENTION!r} returns no attention probabilities")
    b, s, _ = hidden_states.shape
    h = self.num_attention_heads
    mask, bias = _mask_and_bias(attention_mask, position_bias, b, h, s, s)
    _CALLS[0] += 1
    c = mha(self.q(hidden_states), self.k(hidden_states), self.v(hidden_states), mask, bias, h,
            1.0 / math.sqrt(self.attention_head_size))
    return (self.o(c),)


_ADAPTERS: dict[str, Callable] = {"MPNetSelfAttention": _mpnet_self_attention}  # class name -> fused forward
_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _ADAPTERS[cls.__name__],
                                                                  "_shrinktunnel_fused": True})
    return _FUSED_CLASSES[cls]


# -- switching, checked -----------------------------------------------------------------------------
def _hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]


def _why_not(m: nn.Module) -> str | None:
    if any(getattr(sub, "is_causal", False) is True for sub in m.modules()):
        return "causal (decoder) attention; the kernel here is bidirectional"
    if getattr(m.config, "is_decoder", False):
        return "a decoder (config.is_decoder)"
    return None


def _switch(m: nn.Module) -> list[tuple[Any, Any, Any]]:
    """Switch `m` (a transformers PreTrainedModel) to ATTENTION in place, through its public
    `set_attn_implementation` (sub-models and sub-configs follow); returns what undoes it."""
    undo: list[tuple[Any, Any, Any]] = [(m, _IMPLEMENTATION, m.config._attn_implementation)]
    m.set_attn_implementation(ATTENTION)
    for sub in m.modules():
        if type(sub).__name__ in _ADAPTERS and not getattr(sub, "_shrinktunnel_fused", False):
            undo.append((sub, "__class__", type(sub)))
            sub.__class__ = _fused_class(type(sub))
    return undo


_IMPLEMENTATION = object()  # an undo entry's "attribute" meaning: call set_attn_implementation(old)


def _undo(undo: list[tuple[Any, Any, Any]]) -> None:
    for obj, attr, old in reversed(undo):
        if attr is _IMPLEMENTATION:
            obj.set_attn_implementation(old)
        else:
            setattr(obj, attr, old)


def _run(model: nn.Module, example: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    from ..core import data as D

    with torch.no_grad():
        out = D.forward(model, D.split(example)[0])
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _difference(reference: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    if len(reference) != len(got):
        return f"returns {len(got)} tensors where the unfused model returns {len(reference)}"
    for i, (a, b) in enumerate(zip(reference, got)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)}, unfused {tuple(a.shape)}"
        err = float((a - b).abs().max()) if a.numel() else 0.0
        limit = FUSED_TOLERANCE * max(1.0, float(a.abs().max()) if a.numel() else 0.0)
        if not err <= limit:
            return f"output {i} differs from the unfused one by {err:.3g} (allowed {limit:.3g})"
    return None


def _check(model: nn.Module, example: Any, reference: list[torch.Tensor]) -> str | None:
    """None when the switched model computes what it did (the reason otherwise)."""
    before = _CALLS[0]
    try:
        got = _run(model, example)
    except Exception as exc:  # noqa: BLE001 - any failure of the fused forward is a refusal, with its reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the fused forward fails ({type(exc).__name__}: {first[:160]})"
    if _CALLS[0] == before:
        return ("no attention reached the kernel (the model has none, or its attention does not go through "
                "transformers' attention interface)")
    return _difference(reference, got)


def _dummy_example(m: nn.Module) -> Any:
    dummy = getattr(m, "dummy_inputs", None)
    return dict(dummy) if isinstance(dummy, dict) and dummy else None


def fuse_attention(model: nn.Module, example: Any = None, *, warn: Callable[[str], None] | None = None,
                   check: bool = True) -> list[str]:
    """Switch every Hugging Face encoder inside `model` (in place) to ATTENTION; the names switched
    (outermost ones; "" for the model itself).

    Each switch is checked: on `example` (one batch for `model`, in the data convention) when given,
    else on the sub-model's own `dummy_inputs`; a switch whose outputs differ from the unfused ones by
    more than FUSED_TOLERANCE, whose forward fails, or whose forward never reaches the kernel is undone.
    `check=False` switches without checking (replay: the artifact records what was checked when it
    was made). Decoders (causal attention) are left alone. Every sub-model left alone is reported through `warn`
    (default: warnings.warn), one message per reason."""
    if not register_with_transformers():
        return []
    warn = warn or (lambda msg: warnings.warn(msg, UserWarning, stacklevel=3))
    refused: dict[str, list[str]] = {}
    switched: list[str] = []
    reference = None
    if example is not None:
        model_was_training = model.training
        model.eval()
        try:
            reference = _run(model, example)
        except Exception as exc:  # noqa: BLE001 - nothing to compare with: fuse nothing, say why
            model.train(model_was_training)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warn(f"fuse_ops: attention: nothing fused: the unfused model fails on the example "
                 f"({type(exc).__name__}: {first[:160]})")
            return []
    for name, m in _hf_models(model):
        if any(s == "" or name.startswith(f"{s}.") for s in switched):
            continue  # a sub-model of one already switched shares its config
        label = name or type(m).__name__
        why = _why_not(m)
        if why is None and not check:
            _switch(m)
        elif why is None:
            target, batch = (model, example) if example is not None else (m, _dummy_example(m))
            if batch is None:
                why = "no example to check the fused forward on (pass example_inputs or data)"
            else:
                ref = reference
                if ref is None:
                    try:
                        ref = _run(m.eval(), batch)
                    except Exception:  # noqa: BLE001 - the dummy inputs do not fit this model
                        ref = None
                        why = "no example to check the fused forward on (pass example_inputs or data)"
                if ref is not None:
                    undo = _switch(m)
                    why = _check(target, batch, ref)
                    if why is not None:
                        _undo(undo)
        if why is None:
            switched.append(name)
        elif not any(label == s or label.startswith(f"{s}.") for s in refused.get(why, [])):
            refused.setdefault(why, []).append(label)
    if example is not None and model_was_training:
        model.train()
    for why, names in refused.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warn(f"fuse_ops: attention: {shown} left unfused: {why}")
    return switched


def unfuse_attention(model: nn.Module, implementation: str = "sdpa") -> None:
    """Back to `implementation` (for training: the fused kernel is inference only)."""
    for _, m in _hf_models(model):
        if m.config._attn_implementation == ATTENTION:
            m.set_attn_implementation(implementation)
        for sub in m.modules():
            if getattr(type(sub), "_shrinktunnel_fused", False):
                sub.__class__ = type(sub).__bases__[0]


@register_onnx_translations
def onnx_translations() -> dict:
    """{torch op: onnxscript function}: `mha` as com.microsoft.MultiHeadAttention."""
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op
    from onnxscript import values

    # onnx ships no schema for ONNX Runtime's contrib operators: the part of MultiHeadAttention's used
    # here (q, k, v as (batch, tokens, hidden), no bias, an int32 key padding mask, an attention bias).
    P = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[P("query", "T"), P("key", "T"), P("value", "T"), P("bias", "T", "", param_option=optional),
                P("key_padding_mask", "M", "", param_option=optional),
                P("attention_bias", "T", "", param_option=optional)],
        outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")],
    )
    mha_op = values.Op(values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def _mha(query, key, value, mask, bias, num_heads: int, scale: float):
        padding = None if mask is None else op.Cast(mask, to=6)
        if bias is None:
            return mha_op(query, key, value, None, padding, num_heads=num_heads, scale=scale)
        return mha_op(query, key, value, None, padding, bias, num_heads=num_heads, scale=scale)

    return {torch.ops.shrinktunnel.mha.default: _mha}
