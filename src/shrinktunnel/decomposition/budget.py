"""What needs data: each layer's real input (for timing and MACs), the sensitivity of the model's output
to each candidate rank of each layer, and the choice of ranks under a global budget.

Sensitivity is label-free: the relative squared error of the model's output when one layer alone is
replaced by a candidate, ||y~ - y||^2 / ||y||^2 summed over the calibration batches. Errors of small,
independent perturbations add up, so the choice across layers is a multiple-choice knapsack, solved
greedily: start with every layer whole and repeatedly take the step (one layer to a cheaper candidate)
with the least added error per unit of cost saved, until the model fits the budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core import data as D
from ..core.capture import capture_inputs as _capture
from ..core.progress import track
from ..core.select import set_submodule
from ..measure.macs import count_macs

__all__ = ["Candidate", "capture_inputs", "input_grams", "patches", "output_error", "reference_outputs", "layer_macs", "is_slower", "allocate"]

LATENCY_WARMUP = 3  # untimed runs of each first
LATENCY_RUNS = 30  # timed runs of each, alternated one by one; the fastest of each is compared


@dataclass
class Candidate:
    """One way to hold a layer: whole (module is None) or decomposed at `ranks`."""

    ranks: list[int] | None
    module: nn.Module | None
    cost: float  # MACs per sample or weights, the budget's metric
    error: float = 0.0  # the model's relative output error with this layer alone replaced
    weight_error: float = 0.0  # ||W - W~|| / ||W||
    extra: dict[str, Any] = field(default_factory=dict)


def capture_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: list) -> dict[str, torch.Tensor]:
    """Each module's first positional input on the first batch (the real shape it runs at)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            inputs, _ = D.split(batches[0])
            D.forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The rows a layer's weight matrix multiplies: (N, in) for a Linear (every position of the last
    dimension), (N * L, S * k) input patches for a convolution (its channel view), or None for a convolution
    whose padding this does not reproduce (a padding mode other than zeros, or a string padding)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        kernel, dilation, padding, stride = ((1, *module.kernel_size), (1, *module.dilation), (0, *module.padding),
                                             (1, *module.stride))
    else:
        kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, S*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_grams(model: nn.Module, modules: dict[str, nn.Module], batches: list) -> dict[str, torch.Tensor]:
    """Each module's input second moment X^T X (float64), summed over the rows of every batch: the data that
    whitened SVD fits. A batch given as a dict with an `attention_mask` (B, T) drops the rows of padding
    tokens from inputs shaped (B, T, ...): no output is read at those positions. A module that never ran,
    or whose rows `patches` cannot form, is left out."""
    grams: dict[str, torch.Tensor] = {}
    skipped: set[str] = set()

    def reduce(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if name in skipped:
            return
        rows = patches(module, x)
        if rows is None:
            skipped.add(name)
            return
        rows = rows.double()
        g = rows.T @ rows
        grams[name] = grams[name] + g if name in grams else g

    _capture(model, modules, batches, reduce, label="whitening: measuring inputs")
    return {k: v for k, v in grams.items() if k not in skipped}


def reference_outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [D.first_tensor(D.forward(model, D.split(b)[0])).detach().double() for b in batches]


def output_error(model: nn.Module, batches: list, reference: list[torch.Tensor]) -> float:
    """||y~ - y||^2 / ||y||^2 over every batch."""
    num = den = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            out = D.first_tensor(D.forward(model, D.split(batch)[0])).double()
            num += float(((out - ref) ** 2).sum())
            den += float((ref ** 2).sum())
    return num / den if den > 0 else num


def with_layer(model: nn.Module, names: list[str], module: nn.Module, fn: Callable[[], float]) -> float:
    """fn() with `module` standing in for the layer under every one of its names, then put back."""
    originals = [model.get_submodule(n) for n in names]
    for n in names:
        set_submodule(model, n, module)
    try:
        return fn()
    finally:
        for n, m in zip(names, originals):
            set_submodule(model, n, m)


def layer_macs(module: nn.Module, x: torch.Tensor | None) -> int:
    """MACs per sample of `module` on an input shaped like x (0 when the layer never ran)."""
    if x is None:
        return 0
    return count_macs(module, ((x[:1],), {}))


def timing_threads() -> tuple[int, str | None]:
    """The thread count to time layers with, and why when it is not the caller's. On a machine with more
    runnable work than cores, every parallel operator waits for its second thread to be scheduled: a chain of
    three small convolutions then reads 3x slower than one large one for that reason alone (measured here:
    80 ms for a 1 ms conv). One thread has no such wait, so the comparison measures the arithmetic again."""
    threads = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on every platform
        return threads, None
    cores = os.cpu_count() or 1
    if threads > 1 and load > cores:
        return 1, (f"decompose: the machine is busy (load average {load:.1f} on {cores} cores), so layers were timed "
                   f"on one thread rather than {threads}: with more work than cores, parallel operators mostly measure "
                   f"waiting for their threads")
    return threads, None


def is_slower(whole: nn.Module, decomposed: nn.Module, x: torch.Tensor, threads: int | None = None) -> tuple[bool, float, float]:
    """Time both on the layer's real input, one run of each in turn; (slower, whole ms, decomposed ms), each
    the fastest of its runs. Alternating run by run gives both the same machine load, and the fastest run is
    the one least disturbed by other work: on a busy machine the median of a block of runs mostly measured
    what else was running (a Linear of 0.3 ms read 56 ms once)."""
    pair, best = (whole, decomposed), [float("inf"), float("inf")]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        _time_pair(pair, best, x)
    finally:
        torch.set_num_threads(previous)
    return best[1] >= best[0], best[0], best[1]


def _time_pair(pair: tuple[nn.Module, nn.Module], best: list[float], x: torch.Tensor) -> None:
    with torch.inference_mode():
        for i in range(LATENCY_WARMUP + LATENCY_RUNS):
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):  # neither always runs first
                t0 = time.perf_counter()
                pair[j](x)
                elapsed = (time.perf_counter() - t0) * 1e3
                if i >= LATENCY_WARMUP:
                    best[j] = min(best[j], elapsed)


def allocate(options: dict[str, list[Candidate]], total: float, target: float) -> tuple[dict[str, int], float]:
    """Choose one option per layer (index into its list; 0 is whole) so that the total cost falls to
    `target`, adding the least output error per unit of cost saved at each step. Returns the choice and
    the total cost reached (above `target` when even the cheapest options do not reach it)."""
    choice = {name: 0 for name in options}
    cost = total
    while cost > target:
        best: tuple[float, float, str, int] | None = None
        for name, opts in options.items():
            here = opts[choice[name]]
            for j in range(choice[name] + 1, len(opts)):
                saved = here.cost - opts[j].cost
                if saved <= 0:
                    continue
                added = max(opts[j].error - here.error, 0.0)
                # Ties (added 0) go to the larger saving; the error per saving decides otherwise.
                key = (added / saved, -saved)
                if best is None or key < best[:2]:
                    best = (*key, name, j)
        if best is None:
            break
        _, neg_saved, name, j = best
        cost += neg_saved
        choice[name] = j
    return choice, cost


def sensitivity(model: nn.Module, names: dict[str, list[str]], candidates: dict[str, list[Candidate]], batches: list,
                progress: bool) -> None:
    """Fill each candidate's `error`: the model's output error with that layer alone decomposed."""
    reference = reference_outputs(model, batches)
    work = [(name, c) for name, cands in candidates.items() for c in cands if c.module is not None]
    for name, cand in track(work, "decompose: measuring sensitivity", enabled=progress):
        cand.error = with_layer(model, names[name], cand.module, lambda: output_error(model, batches, reference))
