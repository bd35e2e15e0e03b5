"""Self-attention relation distillation (MiniLM; Wang et al. 2020, "MiniLM: Deep Self-Attention
Distillation for Task-Agnostic Compression of Pre-Trained Transformers", and MiniLMv2, 2021).

A transformer block's attention is what it mixes tokens by. The student's attention block learns the
teacher's *relations*: for projections a, b of the block input (queries, keys, values), split into
heads, the distribution softmax(a_h b_h^T / sqrt(d_h)) over the tokens, compared with the teacher's
by KL(teacher || student). "qk" is the attention distribution itself (MiniLM's first term), "vv" the
value relation (its second), "qq" / "kk" MiniLMv2's query and key relations. The distributions
depend on neither model's width (only the number of tokens), so no adapter is needed, and the
padding keys are masked exactly as the attention masks them.

The projections are captured with forward hooks on the attention module's children: `query` / `key`
/ `value` (BERT and its kin in Hugging Face), `q_proj` / `k_proj` / `v_proj` (most others) or
`q` / `k` / `v`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError

__all__ = ["PROJECTION_NAMES", "projection_names", "relation_logits", "relation_loss"]

PROJECTION_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
_INDEX = {"q": 0, "k": 1, "v": 2}


def projection_names(model: nn.Module, name: str, who: str) -> tuple[str, str, str]:
    """The dotted names of the query, key and value projections inside attention module `name`."""
    modules = dict(model.named_modules())
    if name not in modules:
        near = [n for n in modules if n and (name in n or n in name)][:5]
        raise ConfigError(f"distill: relations name {who} module {name!r}, which does not exist"
                          + (f"; similar names: {', '.join(near)}" if near else "")
                          + f"; give the attention module (e.g. encoder.layer.0.attention.self in BERT)")
    children = dict(modules[name].named_children())
    for names in PROJECTION_NAMES:
        if all(isinstance(children.get(n), nn.Linear) for n in names):
            return tuple(f"{name}.{n}" for n in names)  # type: ignore[return-value]
    raise ConfigError(f"distill: {who} module {name!r} ({type(modules[name]).__name__}) has no query / key / value "
                      f"projections among its children ({', '.join(children) or 'none'}); relations need an attention "
                      "module with Linear children named query/key/value, q_proj/k_proj/v_proj or q/k/v")


def relation_logits(qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], kind: str, heads: int,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(a_h b_h^T / sqrt(d_h)) over the keys: (B, heads, T, T); padding keys masked out."""
    a, b = qkv[_INDEX[kind[0]]].float(), qkv[_INDEX[kind[1]]].float()
    if a.dim() != 3 or a.shape[-1] % heads:
        raise ModelError(f"distill: relation {kind}: projections of shape {tuple(a.shape)} do not split into {heads} "
                         "heads of (batch, tokens, features); set heads to a divisor of the width")
    B, T, D = a.shape
    d = D // heads
    a = a.view(B, T, heads, d).transpose(1, 2)  # (B, H, T, d)
    b = b.view(B, b.shape[1], heads, d).transpose(1, 2)
    scores = a @ b.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    if mask is not None and tuple(mask.shape) == (B, T):
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def relation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher || student) of (B, H, T, T) log-distributions, summed over the keys and averaged
    over the heads and the real query tokens (padding queries left out)."""
    if student.shape != teacher.shape:
        raise ModelError(f"distill: relation distributions of shapes {tuple(student.shape)} (student) and "
                         f"{tuple(teacher.shape)} (teacher) differ: give both the same number of relation heads")
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # (B, H, T); masked keys have p = 0
    B, H, T = kl.shape
    if mask is not None and tuple(mask.shape) == (B, T):
        m = mask.float()[:, None, :].expand(B, H, T)
        return (kl * m).sum() / m.sum().clamp_min(1.0)
    return kl.mean()
