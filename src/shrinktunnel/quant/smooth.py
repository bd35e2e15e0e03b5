"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights before quantizing.

A transformer's Linear inputs have a few channels tens of times larger than the rest (LayerNorm
outputs, post-GELU activations); one activation scale for a whole tensor is stretched by them and the
other channels are left a handful of levels. For each input channel j a factor s_j rescales

    y = x W^T = (x / s) (W * s)^T               exactly, in float

so that the smoothed input x / s is flat enough for one scale per tensor, while the weight, quantized per
output channel, absorbs the spread. The paper's factor is s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha).

Here alpha is chosen per layer (`smooth: auto`) from a grid, by the layer's own output error when both
its input and weight are quantized as the config says, measured on a sample of its real calibration
inputs; "no smoothing" is one of the candidates, so a layer that does not gain is left alone. A fixed
alpha (`smooth: 0.8`) applies the paper's formula everywhere instead.

The quantized layer keeps 1 / s as a buffer and multiplies its input by it (one elementwise Mul in ONNX);
its weight is quantized from W * s. Statistics need one pass over the calibration data before the
activation ranges are observed (the ranges are those of the smoothed inputs).
"""

from __future__ import annotations

import torch

from .config import ActivationQuant, WeightQuant
from .ops import dequantize_weight, qrange, quantize_weight, weight_qparams, weight_qrange

__all__ = ["SmoothObserver", "InputIdentity", "ALPHAS", "choose_smoothing", "observe_inputs"]

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # the grid `smooth: auto` searches
SAMPLE_ROWS = 2048  # input rows kept per layer to score each alpha: 2048 x in_features floats
_EPS = 1e-5


class SmoothObserver:
    """Streams the per-channel max |x| of a Linear's inputs and keeps an evenly strided sample of rows
    (every `stride`-th, at most SAMPLE_ROWS) to score smoothing factors on. Memory is bounded by the
    sample, whatever the amount of data."""

    def __init__(self, keep_rows: int = SAMPLE_ROWS) -> None:
        self.absmax: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.keep_rows = keep_rows
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        a = x.abs().amax(dim=0)
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        kept = sum(r.shape[0] for r in self.rows)
        if kept < self.keep_rows:
            stride = max(1, x.shape[0] // 64)  # spread the sample over many inputs, not the first few
            self.rows.append(x[::stride][: self.keep_rows - kept].clone())
        self.count += x.shape[0]

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.zeros(0)


class InputIdentity:
    """Which layers read the very same input tensor (a transformer's q, k and v read one hidden state):
    they get one smoothing factor, so the exported graph divides that tensor once and quantizes it once.
    Per batch, each layer's input is numbered by first appearance; the tensors are kept alive for the
    batch, so no id is reused within it. Layers whose numbers agree on every batch share their input."""

    def __init__(self) -> None:
        self._alive: dict[int, tuple[int, torch.Tensor]] = {}
        self._seen: dict[str, list[int]] = {}

    def see(self, name: str, x: torch.Tensor) -> None:
        number, _ = self._alive.setdefault(id(x), (len(self._alive), x))
        self._seen.setdefault(name, []).append(number)

    def next_batch(self) -> None:
        self._alive = {}
        for seen in self._seen.values():
            seen.append(-1)  # a batch separator, so sequences of different lengths never agree

    def groups(self, names: list[str]) -> list[list[str]]:
        """`names` partitioned into groups that share their input, in order of first member."""
        out: dict[tuple[int, ...], list[str]] = {}
        for name in names:
            seen = tuple(self._seen.get(name, ()))
            out.setdefault(seen if seen and any(n >= 0 for n in seen) else (id(name),), []).append(name)
        return list(out.values())


def smoothing_factors(absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha), guarded against dead channels (factor 1 there)."""
    wmax = weight.detach().float().abs().amax(dim=0)
    s = absmax.clamp(min=_EPS) ** alpha / wmax.clamp(min=_EPS) ** (1 - alpha)
    dead = (absmax <= _EPS) | (wmax <= _EPS)
    return torch.where(dead | ~torch.isfinite(s), torch.ones_like(s), s).clamp(min=_EPS)


def _fake_quant_input(x: torch.Tensor, aq: ActivationQuant) -> torch.Tensor:
    """The input as the layer will see it: per token or per tensor, asymmetric unless configured."""
    signed = aq.symmetric and not aq.dynamic
    qmin, qmax = qrange(aq.bits, signed=signed)
    per_row = aq.dynamic and aq.per_token
    lo = x.amin(dim=-1, keepdim=True) if per_row else x.min()
    hi = x.amax(dim=-1, keepdim=True) if per_row else x.max()
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if signed:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=_EPS)
        zp = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)
        zp = torch.round(qmin - lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def _fake_quant_weight(w: torch.Tensor, wq: WeightQuant) -> torch.Tensor:
    qmin, qmax = weight_qrange(wq.bits - 1 if wq.reduce_range else wq.bits, wq.symmetric)
    group = wq.group_size if str(wq.granularity) == "per_group" else None
    scale, zp = weight_qparams(w, qmin, qmax, wq.symmetric, str(wq.granularity), group)
    q = quantize_weight(w, scale, zp, qmin, qmax, torch.int8 if wq.symmetric else torch.uint8)
    return dequantize_weight(q, scale, zp, qmin, qmax)


def choose_smoothing(obs: SmoothObserver, weights: torch.Tensor | list[torch.Tensor], wq: WeightQuant,
                     aq: ActivationQuant, alpha: float | str) -> tuple[torch.Tensor | None, dict]:
    """(s or None for no smoothing, a record {alpha, error, error_unsmoothed}) for one Linear layer, or
    for several that read the same input (`weights` a list: q, k and v), which then share s: the
    paper's factor over their stacked weights, scored by the sum of their relative output errors.
    `alpha` is a number (that alpha, always applied) or "auto" (the grid, unsmoothed included)."""
    x = obs.sample()
    ws = [w.detach().float() for w in (weights if isinstance(weights, (list, tuple)) else [weights])]
    if obs.absmax is None or x.numel() == 0:
        return None, {"alpha": None, "reason": "never ran on the calibration data"}
    stacked = torch.cat(ws)
    references = [x @ w.t() for w in ws]
    norms = [r.pow(2).mean().clamp(min=1e-30) for r in references]

    def error(s: torch.Tensor | None) -> float:
        xq = _fake_quant_input(x if s is None else x / s, aq)
        total = 0.0
        for w, ref, norm in zip(ws, references, norms):
            got = xq @ _fake_quant_weight(w if s is None else w * s, wq).t()
            total += float((got - ref).pow(2).mean() / norm)
        return total

    plain = error(None)
    if alpha != "auto":
        s = smoothing_factors(obs.absmax, stacked, float(alpha))
        return s, {"alpha": float(alpha), "error": error(s), "error_unsmoothed": plain}
    best_s, best = None, {"alpha": None, "error": plain, "error_unsmoothed": plain}
    for a in ALPHAS:
        s = smoothing_factors(obs.absmax, stacked, a)
        e = error(s)
        if e < best["error"]:
            best_s, best = s, {"alpha": a, "error": e, "error_unsmoothed": plain}
    return best_s, best


def observe_inputs(model, plans, batches, label: str | None = None) -> tuple[dict, list[list[str]]]:
    """One pass over `batches`: ({layer: SmoothObserver of its raw input}, [names reading the very same
    tensor]) for the layers of `plans`; a progress bar when `label` is given."""
    from ..core import data as D
    from ..core.progress import track

    observers = {p.name: SmoothObserver() for p in plans}
    reads = InputIdentity()

    def record(name: str, x: torch.Tensor) -> None:  # a forward hook must return None
        observers[name].update(x)
        reads.see(name, x)

    hooks = [p.module.register_forward_hook(lambda m, i, o, name=p.name: record(name, i[0])) for p in plans]
    try:
        with torch.no_grad():
            for batch in track(list(batches), label or "", enabled=label is not None):
                reads.next_batch()
                D.forward(model, D.split(batch)[0])
    finally:
        for h in hooks:
            h.remove()
        reads.next_batch()
    return observers, reads.groups([p.name for p in plans])
