"""GPTQ (Frantar et al., ICLR 2023), as published: weights rounded one input column at a time, each
rounding error spread over the columns not yet rounded, weighted by the inverse Hessian of the layer's
squared output error, H = 2 X^T X over the calibration inputs X (tokens x in_features).

- Lazy batch updates: columns are rounded in blocks of 128; inside a block the error is propagated
  column by column, to the rest of the matrix once per block (one matmul).
- Dampening: lambda = damp x mean(diag H) added to the diagonal (damp 0.01).
- Cholesky form: the upper Cholesky factor of H^-1 holds, row by row, the update coefficients.
- Act-order (`act_order`): columns in decreasing diag(H) order (the inputs with the most energy first,
  while many columns remain to absorb their error). With groups, static groups (the reference code's
  `static_groups`): each group's scale is computed from the original weights of its natural (not
  permuted) columns, before any update, so groups stay contiguous in storage and the ONNX Runtime
  MatMulNBits layout is unchanged.
- True-sequential (`sequential_rounding`): a model with a stack of transformer blocks (an nn.ModuleList of
  blocks) is calibrated block by block: each block's Linears are rounded in the order the block calls
  them (q/k/v together, then o, then gate/up, then down), each group on inputs computed by the
  already-rounded layers before it; the block's outputs, computed with its rounded weights, are the next
  block's inputs. Memory: the calibration activations of one block plus one group's Hessians, never a
  Hessian per layer of the whole model.

Per-group scales without act-order are computed when the first column of a group is reached, from the
weights as the earlier corrections left them (the paper's grouping).

Only Linear layers: the Hessian here is over in_features (a convolution would need unfolded inputs).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from .ops import weight_qparams

__all__ = ["HessianObserver", "gptq_quantize", "find_blocks", "sequential_round", "ROUND_THREADS"]

ROUND_THREADS = 1  # threads for the column loop: thousands of (out,)-sized ops, for which a second thread
# only adds synchronisation, and on a loaded machine every extra thread waits for a core (issue 20:
# 49 s quiet, 1,134 s loaded with the default thread count). The per-block matmuls use the default.


class HessianObserver:
    """Streams H = 2/n sum x x^T over every row x (the last dimension) of a layer's inputs; memory is
    in_features^2 floats whatever the amount of data."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        n = x.shape[0]
        total = self.count + n
        self.h.mul_(self.count / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.count = total


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integers in [qmin, qmax] (float tensor, weight's shape), scale, zero_point) of a Linear weight
    (out, in); scale and zero point shaped as `ops.weight_qparams` gives them."""
    w = weight.detach().float().clone()
    out, k = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    per_group = granularity == "per_group"
    static = None
    if not per_group:
        scale, zero_point = weight_qparams(w, qmin, qmax, symmetric, granularity)
    elif act_order:  # static groups: scales from the original weights, natural column order
        scale, zero_point = weight_qparams(w, qmin, qmax, symmetric, granularity, group_size)
        static = (scale.double(), zero_point.double())
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diag(h).mean())
    # The upper Cholesky factor of H^-1 (the paper's reformulation: numerically stable, no per-column
    # inverse updates); computed in float64, used in float32 as the reference implementation does.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    if per_group and not act_order:
        block = max(group_size, block // group_size * group_size)  # groups never straddle two blocks
        scales, zps = [], []
    cols = perm.tolist() if perm is not None else range(k)
    if not per_group:
        col_scale, col_zp = scale.float().unsqueeze(1), zero_point.float().unsqueeze(1)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _threads(ROUND_THREADS):
            for i in range(i2 - i1):
                if static is not None:
                    g = cols[i1 + i] // group_size
                    col_scale = static[0][:, g:g + 1].float()
                    col_zp = static[1][:, g:g + 1].float()
                elif per_group and (i1 + i) % group_size == 0:
                    s, z = weight_qparams(w1[:, i:i + group_size], qmin, qmax, symmetric, "per_channel")
                    scales.append(s)
                    zps.append(z)
                    col_scale, col_zp = s.float().unsqueeze(1), z.float().unsqueeze(1)
                x = w1[:, i:i + 1]
                qi = torch.clamp(torch.round(x / col_scale) + col_zp, qmin, qmax)  # round half to even
                q1[:, i:i + 1] = qi
                err = (x - (qi - col_zp) * col_scale) / hinv1[i, i]
                w1[:, i + 1:].sub_(err @ hinv1[i:i + 1, i + 1:])
                err1[:, i:i + 1] = err
        q[:, i1:i2] = q1
        if i2 < k:  # the lazy batch update: the block's errors reach the remaining columns at once
            w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    if static is not None:
        scale, zero_point = static[0].float(), static[1].to(torch.int32)
    elif per_group:
        scale, zero_point = torch.stack(scales, dim=1), torch.stack(zps, dim=1)
    return q, scale, zero_point


# -- true-sequential calibration over a stack of blocks ------------------------------------------------


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module, linears: list[nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The nn.ModuleList of >= 2 blocks (a transformer's layers) holding the most of `linears`, if any."""
    wanted = {id(m) for m in linears}
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            n = sum(1 for blk in mod for m in blk.modules() if id(m) in wanted)
            if n > best_n:
                best, best_n = (name, mod), n
    return best


def _block_inputs(model: nn.Module, first: nn.Module, batches: list, forward: Callable) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives on each calibration batch (the model stops there)."""
    seen: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        for key in ("past_key_values", "past_key_value", "layer_past"):
            kwargs.pop(key, None)  # no cache: a block is run several times on the same inputs
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        seen.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        raise _Stop

    hook = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                forward(model, batch)
    finally:
        hook.remove()
    return seen


def _hidden(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    return [_hidden(block(*args, **kwargs)) for args, kwargs in inputs]


def _call_groups(block: nn.Module, names: dict[int, str], inputs: list[tuple[tuple, dict]]) -> list[list[str]]:
    """The block's selected Linears in call order, those reading the same input tensor grouped together."""
    order: list[tuple[str, int]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: order.append((n, id(a[0]))))
             for m in block.modules() if id(m) in names for n in [names[id(m)]]]
    try:
        _run_block(block, inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    done = set()
    for name, x in order:
        if name in done:
            continue
        if x == last_input and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        done.add(name)
        last_input = x
    return groups


def sequential_round(model: nn.Module, plans: list, batches: list, forward: Callable,
                     round_group: Callable[[list, dict[str, list[torch.Tensor]]], dict[str, torch.Tensor]],
                     progress: Callable[[Any], Any] = lambda it: it) -> set[str]:
    """True-sequential calibration. `plans` (ptq.LayerPlan: .name, .module) are the Linears to round.
    For each group of Linears reading one input, in the order the model calls them, block by block:
    `round_group(group_plans, {name: [input rows (tokens, in) per batch]})` rounds them and returns
    {name: float weight to compute with from now on} (the dequantized rounding, in the module's own
    basis), which is written into the live module. Afterwards every touched weight is restored.
    Linears outside the blocks are rounded last, in one group each, on the inputs the rounded blocks give.
    Returns the names handled."""
    by_module = {id(p.module): p for p in plans}
    found = find_blocks(model, [p.module for p in plans])
    saved: dict[str, torch.Tensor] = {}
    handled: set[str] = set()

    def commit(group: list, inputs: dict[str, list[torch.Tensor]]) -> None:
        new = round_group(group, inputs)
        for p in group:
            if p.name in new:
                saved.setdefault(p.name, p.module.weight.data)
                p.module.weight.data = new[p.name].to(p.module.weight.dtype)
            handled.add(p.name)

    try:
        with torch.no_grad():
            if found is not None:
                _, blocks = found
                inputs = _block_inputs(model, blocks[0], batches, forward)
                for block in progress(list(blocks)):
                    names = {id(m): by_module[id(m)].name for m in block.modules() if id(m) in by_module}
                    if names:
                        plan_of = {p.name: p for p in plans}
                        for group in _call_groups(block, names, inputs):
                            # The group's members read one tensor: grab it at the first and stop the block
                            # there (the layers after it need not run for this group).
                            seen: list[torch.Tensor] = []

                            def grab(m, a, seen=seen):
                                seen.append(a[0].detach().reshape(-1, a[0].shape[-1]))
                                raise _Stop

                            hook = plan_of[group[0]].module.register_forward_pre_hook(grab)
                            try:
                                for args, kwargs in inputs:
                                    with contextlib.suppress(_Stop):
                                        block(*args, **kwargs)
                            finally:
                                hook.remove()
                            commit([plan_of[n] for n in group], {n: seen for n in group})
                    outs = _run_block(block, inputs)
                    inputs = [((o, *args[1:]), kwargs) for o, (args, kwargs) in zip(outs, inputs)]
                del inputs
            rest = [p for p in plans if p.name not in handled]
            if rest:
                rows = {p.name: [] for p in rest}
                hooks = [p.module.register_forward_pre_hook(
                    lambda m, a, n=p.name: rows[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for p in rest]
                try:
                    for batch in batches:
                        forward(model, batch)
                finally:
                    for h in hooks:
                        h.remove()
                for p in rest:
                    commit([p], {p.name: rows[p.name]})
    finally:
        for p in plans:
            if p.name in saved:
                p.module.weight.data = saved[p.name]
    return handled


def weight_only_round(model: nn.Module, plans: list, batches: list, forward: Callable, grid_of: Callable,
                      *, gptq: bool, awq: bool, damp: float = 0.01, act_order: bool = True,
                      warn: Callable[[str], None] = lambda m: None,
                      progress: Callable[[Any], Any] = lambda it: it) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Weight-only rounding of the Linears of `plans` with true-sequential calibration (`sequential_round`):
    AWQ scales (sets plan.smooth) and clipping, then GPTQ or round-to-nearest, each group on the inputs
    the already-rounded layers before it give. Returns ({name: (q, scale, zero_point)}, AWQ report)."""
    from . import awq as A
    from .ops import dequantize_weight, quantize_weight

    rounded: dict[str, tuple] = {}
    report: dict[str, dict] = {}

    def round_group(group: list, rows: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        x_rows = rows[group[0].name]
        if not x_rows:
            return {}
        formats = {p.name: (grid_of(p.weights), p.weights.symmetric) for p in group}
        s = None
        if awq:
            (qmin, qmax, gs), sym = formats[group[0].name]
            same = len({repr(f) for f in formats.values()}) == 1
            members = group if same else group[:1]
            s, info = A.search_scale(A.sample_rows(x_rows, A.SCALE_ROWS), [p.module.weight for p in members],
                                     lambda w: A.fake_quant(w, qmin, qmax, sym, gs))
            if info["alpha"] == 0:
                s = None
            for p in members:
                p.smooth = s
                report[p.name] = dict(info, shared_with=[q.name for q in members if q is not p])
        new = {}
        for p in group:
            (qmin, qmax, gs), sym = formats[p.name]
            w = p.weight()  # W * s when scaled
            x_obs = [p.observed(x) for x in x_rows]
            if awq and not gptq:
                w = A.search_clip(w, A.sample_rows(x_obs, A.CLIP_ROWS), qmin, qmax, sym, gs)
            granularity = "per_group" if gs else str(p.weights.granularity)
            if gptq:
                obs = HessianObserver(w.shape[1])
                for x in x_obs:
                    obs.update(x)
                try:
                    q, scale, zp = gptq_quantize(w, obs.h, qmin, qmax, sym, granularity, gs, damp=damp,
                                                 act_order=act_order)
                except torch.linalg.LinAlgError:
                    warn(f"quantize: gptq: the input Hessian of {p.name} is not positive definite even with "
                         f"gptq_damp={damp}; rounded to nearest instead (raise gptq_damp to retry)")
                    q = None
            if not gptq or q is None:
                scale, zp = weight_qparams(w, qmin, qmax, sym, granularity, gs)
                q = quantize_weight(w, scale, zp, qmin, qmax, torch.int8 if sym else torch.uint8).float()
            rounded[p.name] = (q, scale, zp)
            deq = dequantize_weight(q.to(torch.int8 if sym else torch.uint8), scale, zp, qmin, qmax)
            new[p.name] = deq if p.smooth is None else deq / p.smooth
        return new

    sequential_round(model, plans, batches, forward, round_group, progress)
    return rounded, report
