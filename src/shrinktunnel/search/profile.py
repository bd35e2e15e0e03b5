"""Per-layer figures of a model: parameters, bytes, MACs and share of the measured latency.

MACs come from torch's FlopCounterMode, which attributes every aten op to the module it ran in
(keys "ClassName.dotted.name"); latency from forward pre/post hooks timing each layer's own forward
over repeated runs after warm-up, taken as the median per layer, next to the median of the whole
forward. Hooks add a few microseconds per layer; the share is of the hooked forward's time, so the
shares and the "other" remainder (activations, pooling, attention matmuls outside the layers) add up.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core import data as D
from ..core.select import matches
from ..core.layers import visible_modules

__all__ = ["LayerProfile", "candidate_layers", "profile_layers", "state_bytes", "module_state_bytes"]


@dataclass
class LayerProfile:
    name: str
    kind: str  # the module's class name
    params: int
    bytes: int  # bytes of its state (parameters and buffers) as stored now
    macs: int  # per sample
    latency_ms: float  # median time of its own forward, on the profiling batch
    latency_share: float  # of the median hooked forward

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def candidate_layers(model: nn.Module, layers: Sequence[str] = ("*",), skip: Sequence[str] = ()) -> list[str]:
    """Modules that hold a weight of their own (a parameter of 2 or more dimensions: Linear, Conv,
    Embedding, LSTM...), matching `layers` and not `skip`; a module registered twice is listed once."""
    out, seen = [], set()
    for name, module in visible_modules(model):
        if not name or id(module) in seen or not matches(name, layers) or matches(name, skip):
            continue
        if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            seen.add(id(module))
            out.append(name)
    return out


def module_state_bytes(module: nn.Module) -> int:
    """Bytes of a module's state dict tensors, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in module.state_dict(keep_vars=False).values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def state_bytes(model: nn.Module) -> int:
    """Bytes of the whole model's state: the payload of its artifact (safetensors adds a small header)."""
    return module_state_bytes(model)


def _macs_by_layer(model: nn.Module, inputs: D.Inputs, names: list[str]) -> dict[str, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        D.forward(model, inputs)
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    batch = max(D.batch_size(inputs), 1)
    return {n: int(sum(counts.get(f"{prefix}.{n}", {}).values()) // 2 // batch) for n in names}


def _time_layers(model: nn.Module, inputs: D.Inputs, names: list[str], *, warmup: int, runs: int,
                 threads: int) -> tuple[dict[str, float], float]:
    """Median ms of each named layer's forward, and the median ms of the whole (hooked) forward."""
    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = {n: [] for n in names}
    current: dict[str, float] = {}
    hooks = []

    def pre(name):
        def hook(module, args, kwargs=None):
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, args, output):
            # A module called more than once per forward (shared) accumulates its calls.
            current[name] = current.get(name, 0.0) + (time.perf_counter() - starts[name]) * 1e3
        return hook

    for name in names:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(pre(name)))
        hooks.append(module.register_forward_hook(post(name)))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    totals = []
    try:
        with torch.inference_mode():
            for i in range(warmup + runs):
                current.clear()
                t0 = time.perf_counter()
                D.forward(model, inputs)
                elapsed = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    totals.append(elapsed)
                    for n in names:
                        samples[n].append(current.get(n, 0.0))
    finally:
        torch.set_num_threads(previous)
        for h in hooks:
            h.remove()
    return {n: statistics.median(s) for n, s in samples.items()}, statistics.median(totals)


def profile_layers(model: nn.Module, inputs: D.Inputs, names: list[str], *, warmup: int = 3, runs: int = 10,
                   threads: int = 2, mac_inputs: D.Inputs | None = None) -> tuple[list[LayerProfile], dict[str, Any]]:
    """Per-layer figures, and the model's totals (params, bytes, MACs, latency and the share no
    listed layer accounts for). Latency is timed on `inputs`; MACs per sample are counted on
    `mac_inputs` (default: `inputs`), which may be a single sample."""
    mac_inputs = inputs if mac_inputs is None else mac_inputs
    macs = _macs_by_layer(model, mac_inputs, names)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        D.forward(model, mac_inputs)
    total_macs = int(counter.get_total_flops() // 2 // max(D.batch_size(mac_inputs), 1))
    latency, total_ms = _time_layers(model, inputs, names, warmup=warmup, runs=runs, threads=threads)
    layers = []
    for n in names:
        module = model.get_submodule(n)
        params = sum(p.numel() for p in module.parameters())
        layers.append(LayerProfile(n, type(module).__name__, params, module_state_bytes(module), macs[n],
                                   latency[n], latency[n] / total_ms if total_ms > 0 else 0.0))
    covered = sum(lp.latency_ms for lp in layers)
    seen: set[int] = set()
    params = 0
    for p in model.parameters():  # tied parameters once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    totals = {"params": params, "bytes": state_bytes(model), "macs": total_macs, "latency_ms": total_ms,
              "other_latency_share": max(0.0, 1 - covered / total_ms) if total_ms > 0 else 0.0,
              "latency_batch": D.batch_size(inputs), "threads": threads, "runs": runs}
    return layers, totals
