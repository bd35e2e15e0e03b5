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

import numpy as np
import torch
from torch import nn

from .ops import weight_qparams
from .scale_search import search_qparams

__all__ = ["HessianObserver", "gptq_quantize", "find_blocks", "sequential_round", "inverse_factor"]

ROUND_THREADS_GEMM = 2  # threads for the per-block GEMM of the column loop: more only waits for busy cores


class HessianObserver:
    """Streams H = 2/n sum x x^T over every row x (the last dimension) of a layer's inputs; memory is
    in_features^2 floats whatever the amount of data."""

    def __init__(self, in_features: int) -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        # Each batch's X^T X in float32 (as the reference implementation's whole Hessian; float64 GEMMs ran at
        # half the speed and were a fifth of GPTQ's time on SmolLM2), the running mean in float64.
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        total = self.count + n
        self.h.mul_(self.count / total).add_((x.t() @ x).double(), alpha=2.0 / total)
        self.count = total


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U) of a positive definite H (float64): with J the
    reversal, J H J = L L^T gives H = (J L J)(J L J)^T, J L J upper, so U = (J L J)^-1 (upper as well):
    one Cholesky and one triangular solve, the same factor as chol(cholesky_inverse(chol(H))) (that
    route's LAPACK potri took 0.4-0.6 s for a 576 x 576 H here, a third of GPTQ's whole time)."""
    up = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)
    return torch.linalg.solve_triangular(up, torch.eye(h.shape[0], dtype=h.dtype), upper=True)


def _round_columns(wt: np.ndarray, hinv: np.ndarray, qmin: int, qmax: int, block: int,
                   params: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """GPTQ's loop on the transposed weight wt (k, out), float32, updated in place (column j is the
    contiguous row wt[j]); hinv (k, k) the upper factor; params(j) -> (scale, zero point) (out,) of
    column j, called when column j is reached. Returns the integers (k, out).

    The column loop is thousands of ops on vectors of `out` floats: in numpy each costs ~1 us, in torch
    ~5-10 us plus the thread pool's synchronisation (issue 20: the torch loop took 49 s quiet, 1,134 s
    on a loaded machine). numpy's elementwise ops run on one thread; the per-block update, a real GEMM,
    runs in torch with its thread setting."""
    k, out = wt.shape
    q = np.empty_like(wt)
    err = np.empty((block, out), np.float32)
    tmp = np.empty(out, np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, h1 = wt[i1:i2], hinv[i1:i2, i1:i2]  # views: updates land in wt
        for i in range(i2 - i1):
            s, z = params(i1 + i)
            x, qi, e = w1[i], q[i1 + i], err[i]
            np.divide(x, s, out=qi)
            np.round(qi, out=qi)  # half to even, as torch.round
            qi += z
            np.clip(qi, qmin, qmax, out=qi)
            np.subtract(qi, z, out=tmp)
            tmp *= s
            np.subtract(x, tmp, out=e)
            e /= h1[i, i]
            if i + 1 < i2 - i1:
                w1[i + 1:] -= np.outer(h1[i, i + 1:], e)
        if i2 < k:  # the lazy batch update: the block's errors reach the remaining columns at once
            rest = torch.from_numpy(wt[i2:])
            rest.sub_(torch.from_numpy(hinv[i1:i2, i2:]).t() @ torch.from_numpy(err[:i2 - i1]))
    return q


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
    search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integers in [qmin, qmax] (float tensor, weight's shape), scale, zero_point) of a Linear weight
    (out, in); scale and zero point shaped as `ops.weight_qparams` gives them. Rows are independent
    given H: Linears reading one input may be stacked into one call (the same result, one loop).
    `search`: each group's scale and zero point from `scale_search.search_qparams` weighted by diag(H)
    (per group only), instead of the min-max range's."""
    w = weight.detach().float().clone()
    out, k = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    per_group = granularity == "per_group"
    search = search and per_group
    energy = torch.diag(h).float()  # the importance of each input column's rounding error (natural order)

    def group_qparams(wg: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if search:
            return search_qparams(wg, qmin, qmax, symmetric, group_size, energy[cols])
        return weight_qparams(wg, qmin, qmax, symmetric, granularity, group_size)

    if not per_group:
        scale, zero_point = weight_qparams(w, qmin, qmax, symmetric, granularity)
    elif act_order:  # static groups: scales from the original weights, natural column order
        scale, zero_point = group_qparams(w, slice(None))
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(k, dtype=h.dtype) * (damp * torch.diag(h).mean())
    # Computed in float64, used in float32 as the reference implementation does.
    hinv = inverse_factor(h).float().numpy()
    wt = w.t().contiguous().numpy()
    if not per_group:
        col = (np.ascontiguousarray(np.broadcast_to(scale.float().reshape(-1).numpy(), (out,))),
               np.ascontiguousarray(np.broadcast_to(zero_point.float().reshape(-1).numpy(), (out,))))

        def params(j):
            return col
    elif act_order:
        g = (perm // group_size).tolist()
        s_cols, z_cols = scale.float().t().contiguous().numpy(), zero_point.float().t().contiguous().numpy()

        def params(j):
            return s_cols[g[j]], z_cols[g[j]]
    else:
        # Scales when a group's first column is reached, from the weights as the earlier corrections left
        # them: a group must lie in one block, or start at a block's start (then the columns past the block
        # are current: every earlier block's update has reached them).
        block = max(group_size, block // group_size * group_size)
        scales, zps, cur = [], [], [None]

        def params(j):
            if j % group_size == 0:
                s, z = group_qparams(torch.from_numpy(wt[j:j + group_size]).t(), slice(j, j + group_size))
                s, z = s[:, 0], z[:, 0]
                scales.append(s)
                zps.append(z)
                cur[0] = (s.numpy(), z.float().numpy())
            return cur[0]
    with _threads(ROUND_THREADS_GEMM):
        qt = _round_columns(wt, hinv, qmin, qmax, block, params)
    q = torch.from_numpy(qt).t()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    q = q.contiguous()
    if per_group and not act_order:
        scale, zero_point = torch.stack(scales, dim=1), torch.stack(zps, dim=1)
    return q, scale.float(), zero_point.to(torch.int32)


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
    # The input tensors themselves are kept (compared by identity), not their id(): a freed tensor's id is
    # reused by the next one allocated, which grouped o_proj with gate / up_proj now and then.
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: order.append((n, a[0])))
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
        if x is last_input and groups:
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
                      *, gptq: bool, awq: bool, damp: float = 0.01, act_order: bool = True, scale_search: bool = True,
                      warn: Callable[[str], None] = lambda m: None,
                      progress: Callable[[Any], Any] = lambda it: it) -> tuple[dict[str, tuple], dict[str, dict]]:
    """Weight-only rounding of the Linears of `plans` with true-sequential calibration (`sequential_round`):
    AWQ scales (sets plan.smooth) and clipping, then GPTQ or round-to-nearest, each group on the inputs
    the already-rounded layers before it give. `scale_search`: per-group scales and zero points searched
    (scale_search.py, weighted by each input's energy) instead of min-max. Returns ({name: (q, scale,
    zero_point)}, AWQ report)."""
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
        for batch in _stacks(group, formats, gptq):
            p0 = batch[0]
            (qmin, qmax, gs), sym = formats[p0.name]
            granularity = "per_group" if gs else str(p0.weights.granularity)
            x_obs = [p0.observed(x) for x in x_rows]  # one input for the stack: its members share s
            ws = [p.weight() for p in batch]  # W * s when scaled
            if awq and not gptq:
                ws = [A.search_clip(w, A.sample_rows(x_obs, A.CLIP_ROWS), qmin, qmax, sym, gs) for w in ws]
            results = None
            if gptq:
                obs = HessianObserver(ws[0].shape[1])
                for x in x_obs:
                    obs.update(x)
                try:  # one Hessian, one factor, one column loop for the stack (rows are independent)
                    q, scale, zp = gptq_quantize(torch.cat(ws), obs.h, qmin, qmax, sym, granularity, gs,
                                                 damp=damp, act_order=act_order, search=scale_search)
                    bounds = torch.tensor([0] + [w.shape[0] for w in ws]).cumsum(0).tolist()
                    results = [(q[a:b], scale[a:b], zp[a:b]) for a, b in zip(bounds, bounds[1:])]
                except torch.linalg.LinAlgError:
                    warn(f"quantize: gptq: the input Hessian of {', '.join(p.name for p in batch)} is not positive "
                         f"definite even with gptq_damp={damp}; rounded to nearest instead (raise gptq_damp to retry)")
            if results is None:
                results = []
                energy = sum((x.float() ** 2).sum(dim=0) for x in x_obs) if scale_search and gs else None
                for w in ws:
                    scale, zp = (search_qparams(w, qmin, qmax, sym, gs, energy) if energy is not None
                                 else weight_qparams(w, qmin, qmax, sym, granularity, gs))
                    results.append((quantize_weight(w, scale, zp, qmin, qmax, torch.int8 if sym else torch.uint8).float(),
                                    scale, zp))
            for p, (q, scale, zp) in zip(batch, results):
                rounded[p.name] = (q, scale, zp)
                deq = dequantize_weight(q.to(torch.int8 if sym else torch.uint8), scale, zp, qmin, qmax)
                new[p.name] = deq if p.smooth is None else deq / p.smooth
        return new

    sequential_round(model, plans, batches, forward, round_group, progress)
    return rounded, report


def _stacks(group: list, formats: dict, gptq: bool) -> list[list]:
    """The group's Linears (one input) cut into stacks rounded together: GPTQ rows are independent given
    the Hessian, so members with the same format and the same AWQ scale object share one Hessian and one
    loop (q / k / v, gate / up). Per-tensor scales span the whole matrix: never stacked."""
    stacks: list[list] = []
    for p in group:
        last = stacks[-1][0] if stacks else None
        if (gptq and last is not None and repr(formats[p.name]) == repr(formats[last.name])
                and p.smooth is last.smooth and str(p.weights.granularity) != "per_tensor"
                and p.module.weight.shape[1] == last.module.weight.shape[1]):
            stacks[-1].append(p)
        else:
            stacks.append([p])
    return stacks
