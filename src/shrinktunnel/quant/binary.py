"""Binary and ternary weights, binary activations.

- Binary weights (BinaryConnect, Courbariaux et al. 2015; XNOR-Net, Rastegari et al. 2016):
  W ~ alpha * sign(W), sign(0) = +1, with alpha = mean |W| per output channel (or per tensor), the
  alpha that minimises ||W - alpha * sign(W)||^2. Stored at 1 bit per weight (bit 1: +1, 0: -1).
- Ternary weights (TWN, Li et al. 2016): threshold delta = 0.7 * mean |W| per channel (the paper's
  approximation of the optimal threshold for Gaussian / uniform weights), q = sign(W) where |W| > delta
  else 0, alpha = mean of |W| over the weights above delta. Stored as 2-bit integers in [-1, 1].
- Stochastic binary weights (BinaryConnect's stochastic form, Courbariaux et al. 2015, eq. 2-3): during
  training each weight becomes +H with probability p = hard_sigmoid(w / H) = clip((w / H + 1) / 2, 0, 1),
  else -H, so E[level] = w wherever |w| <= H: the binary weight is an unbiased sample of the real one.
  BinaryConnect's H is the magnitude of its binary levels; here H = alpha = mean |w| of the channel (or
  tensor), the level magnitude of the deterministic form, so both forms share one scale. (H = max |w|
  leaves p near 1/2 for most weights of a trained layer: measured 15 points worse, docs/benchmarks.md.)
  Inference (eval mode, conversion) uses the deterministic sign: the paper's test-time choice for binary
  weights. The gradient is the clipped identity's, as for sign.
- Binary activations (BNN, Hubara et al. 2016): two levels, offset +- scale: x_b = offset + scale *
  sign((x - offset) / scale). Symmetric: offset 0, i.e. scale * sign(x), BNN's sign with XNOR-Net's
  scale K = mean |x|. Asymmetric (the default): the threshold is learned too, which post-ReLU inputs
  need (they are >= 0, so sign(x) alone would be constant). Applied to a layer's input.

Both weight kinds convert to an ordinary `QuantizedLayer` (q, per-channel scale, zero point 0), so the
artifact, `st.load` and the ONNX export (int8 DequantizeLinear of the +-1 / 0 integers) are those of
integer weights; training them is `qat`'s (latent float weights, clipped-identity gradient).
"""

from __future__ import annotations

from typing import Any

import torch

from .fake_quant import sign_pm, sign_ste, ternary_levels, ternary_ste

__all__ = ["TWN_THRESHOLD", "weight_meta", "binary_weight_params", "quantize_binary_weight",
           "fake_binary_weight", "stochastic_levels", "BinaryActivation", "binarize_activation"]

TWN_THRESHOLD = 0.7  # delta = 0.7 * mean|W|: TWN's closed-form approximation of the optimal threshold
_EPS = torch.finfo(torch.float32).tiny  # a scale is never zero


def weight_meta(fmt: str, granularity: str) -> dict[str, Any]:
    """The spec's `weight` entry of a binary or ternary layer (docs/artifact-format.md)."""
    bits = {"binary": 1, "ternary": 2}[fmt]
    return {"bits": bits, "dtype": "int8", "qmin": -1, "qmax": 1, "granularity": granularity,
            "symmetric": True, "group_size": None, "packed": True, "zero_point_dtype": "int32", "format": fmt}


def _per_channel(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t.view((-1,) + (1,) * (w.dim() - 1))


def binary_weight_params(w: torch.Tensor, fmt: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(alpha of shape (out,), float32; the ternary threshold broadcastable to w, or None for binary),
    computed from the (detached) weight. An all-zero channel gets alpha = tiny (binary: it cannot be
    zero, and tiny * +-1 is as good as zero) or 1 (ternary: every q is 0 there anyway)."""
    w = w.detach().float()
    a = w.abs()
    flat = a.reshape(1, -1) if granularity == "per_tensor" else a.reshape(w.shape[0], -1)  # (1 or out, K)
    mean = flat.mean(dim=1)
    if fmt == "binary":
        alpha = mean.clamp_min(_EPS)
        threshold = None
    else:
        delta = TWN_THRESHOLD * mean  # (1 or out,)
        above = flat > delta.unsqueeze(1)
        count = above.sum(dim=1)
        alpha = torch.where(count > 0, (flat * above).sum(dim=1) / count.clamp_min(1), torch.ones_like(mean))
        alpha = alpha.clamp_min(_EPS)
        threshold = _per_channel(delta.expand(w.shape[0]) if granularity == "per_tensor" else delta, w)
    alpha = alpha.expand(w.shape[0]).contiguous() if granularity == "per_tensor" else alpha
    return alpha, threshold


def quantize_binary_weight(w: torch.Tensor, fmt: str, granularity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 in {-1, +1} or {-1, 0, +1}, scale (out,) float32, zero point (out,) int32 zeros):
    what `QuantizedLayer.set_weight` stores."""
    alpha, threshold = binary_weight_params(w, fmt, granularity)
    w = w.detach().float()
    levels = sign_pm(w) if fmt == "binary" else ternary_levels(w, threshold)
    return levels.to(torch.int8), alpha, torch.zeros(alpha.shape, dtype=torch.int32)


def fake_binary_weight(w: torch.Tensor, fmt: str, granularity: str, stochastic: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """alpha * sign(w) (or alpha * ternary(w)): bit-identical to the converted layer's dequantized
    weight. The gradient reaches the latent weight through the clipped identity (1 where |w| <= 1),
    times alpha, which is treated as a constant (as most XNOR-Net implementations do). `stochastic`
    (binary, training only): alpha * b with b sampled by `stochastic_levels`, the same gradient."""
    alpha, threshold = binary_weight_params(w, fmt, granularity)
    levels = sign_ste(w) if fmt == "binary" else ternary_ste(w, threshold)
    if stochastic:
        if fmt != "binary":
            raise ValueError(f"stochastic binarization applies to binary weights, not {fmt}")
        levels = levels + (stochastic_levels(w, granularity, generator) - levels).detach()
    return levels * _per_channel(alpha, w)


def stochastic_levels(w: torch.Tensor, granularity: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """+1 with probability hard_sigmoid(w / H), else -1; H = alpha = mean |w| per output channel (or
    tensor), so E[alpha * level] = w where |w| <= alpha."""
    w = w.detach().float()
    h, _ = binary_weight_params(w, "binary", granularity)  # alpha, (out,)
    p = ((w / _per_channel(h, w) + 1) / 2).clamp(0, 1)
    u = torch.rand(w.shape, generator=generator, dtype=w.dtype, device=w.device)
    return torch.where(u < p, torch.ones_like(w), -torch.ones_like(w))


def binarize_activation(x: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, ste: bool = False) -> torch.Tensor:
    """offset + scale * sign((x - offset) / scale), sign(0) = +1. With `ste`, the gradient is the
    clipped identity's in the scaled domain: 1 to x where |x - offset| <= scale, and to scale and
    offset what autograd derives from that (an LSQ-like step gradient)."""
    u = (x - offset) / scale
    return offset + scale * (sign_ste(u) if ste else sign_pm(u))


class BinaryActivation:
    """Inference-time binary activation of a converted layer: two levels, offset +- scale (plain
    Python numbers: JSON numbers in the manifest, constants in the exported graph)."""

    __slots__ = ("scale", "offset")

    def __init__(self, scale: float, offset: float) -> None:
        self.scale, self.offset = float(scale), float(offset)

    @property
    def zero_point(self) -> float:  # what QuantizedLayer.extra_repr prints beside the scale
        return self.offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # 0-d float32 tensors: the very values, and the same arithmetic, as the trained layer's.
        o = torch.tensor(self.offset, dtype=torch.float32)
        s = torch.tensor(self.scale, dtype=torch.float32)
        return binarize_activation(x, o, s)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "binary", "scale": self.scale, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BinaryActivation":
        unknown = set(d) - {"format", "scale", "offset"}
        if unknown or not (isinstance(d.get("scale"), (int, float)) and d["scale"] > 0):
            raise ValueError(f"unsupported binary activation {d!r}: needs a positive scale and an offset")
        return cls(d["scale"], d.get("offset", 0.0))
