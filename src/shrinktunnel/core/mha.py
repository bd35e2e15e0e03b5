"""`nn.MultiheadAttention` as four canonical Linears, so every method reaches its weights.

torch's module keeps q, k and v in one `in_proj_weight` (3E, E) and hands it, with `out_proj.weight`,
to one fused function: no layer is ever called, so no method can replace one. `Attention` computes
the same thing from `q_proj`, `k_proj`, `v_proj` and `out_proj` (nn.Linear each), with the same
signature, masks and return values; canonicalization (core/layers.py) swaps it in, values copied.

Attributes that `nn.TransformerEncoderLayer` reads to decide on its fused fast path are there and
say "no" (`in_proj_bias = None`, `_qkv_same_embed_dim = False`), so the layer takes its ordinary
path, which calls this module. Not handled (refused with the reason): `add_bias_kv`, `add_zero_attn`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "unsupported_reason"]


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    if mha.bias_k is not None:
        return "nn.MultiheadAttention with add_bias_kv is not rewritten into Linears; kept as it is"
    if mha.add_zero_attn:
        return "nn.MultiheadAttention with add_zero_attn is not rewritten into Linears; kept as it is"
    return None


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: not attended) as 0 / -inf, a float mask as it is, in `dtype`."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class Attention(nn.Module):
    """Multi-head attention with q / k / v / out projections as nn.Linear: nn.MultiheadAttention's
    function (`forward` takes and returns what it does)."""

    in_proj_weight = None  # nn.TransformerEncoderLayer checks these before its fused fast path
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool, out_bias: bool,
                 batch_first: bool, dropout: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first, self.dropout = embed_dim, num_heads, batch_first, dropout
        self.kdim, self.vdim = kdim, vdim
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, dtype=dtype)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias, dtype=dtype)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_bias, dtype=dtype)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "Attention":
        """The same function as `mha`, values copied."""
        w = mha.in_proj_weight
        dtype = (w if w is not None else mha.q_proj_weight).dtype
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, mha.in_proj_bias is not None,
                  mha.out_proj.bias is not None, mha.batch_first, mha.dropout, dtype)
        e = mha.embed_dim
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                ws = mha.in_proj_weight.detach().split(e)  # (3E, E) -> 3 x (E, E)
            else:
                ws = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
            for proj, wi in zip((new.q_proj, new.k_proj, new.v_proj), ws):
                proj.weight.copy_(wi)
            if mha.in_proj_bias is not None:
                for proj, bi in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.detach().split(e)):
                    proj.bias.copy_(bi)
            new.out_proj.weight.copy_(mha.out_proj.weight.detach())
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias.detach())
        new.train(mha.training)
        return new

    def _mask(self, attn_mask, key_padding_mask, b: int, lq: int, s: int, dtype) -> torch.Tensor | None:
        """One additive float mask, broadcastable to (B, H, L, S)."""
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            mask = m.view(b, self.num_heads, lq, s) if m.dim() == 3 else m  # (B*H, L, S) or (L, S)
        if key_padding_mask is not None:
            k = _additive(key_padding_mask, dtype).view(b, 1, 1, s)
            mask = k if mask is None else mask + k
        return mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, _ = query.shape
        s = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(b, lq, h, d).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(key).view(b, s, h, d).transpose(1, 2)  # (B, H, S, D)
        v = self.v_proj(value).view(b, s, h, d).transpose(1, 2)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(lq, s, dtype=torch.bool, device=query.device).triu(1)
        mask = self._mask(attn_mask, key_padding_mask, b, lq, s, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # (B, H, L, S)
            if mask is not None:
                scores = scores + mask
            attn = F.softmax(scores, dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            out = F.dropout(attn, p) @ v if p > 0 else attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))  # (B, L, E)
        if unbatched:
            out = out.squeeze(0)
            weights = weights.squeeze(0) if weights is not None else None
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
