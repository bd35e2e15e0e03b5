"""Post-training quantization: observe, compute scales, convert to integer-weight layers."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core import data as D
from ..core.progress import track
from ..core.registry import Context, register_method
from ..core.select import matches, select_modules, set_submodule, unmatched_patterns
from ..errors import DataError
from .config import Granularity, QuantConfig
from .modules import SUPPORTED, ActQuant, QuantizedLayer
from .observers import make_observer
from .ops import qrange, quantize_weight, symmetric_scale

__all__ = ["quantize_model", "replay_quantize"]


def replay_quantize(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized structure recorded by `quantize_model` (shapes only, no values)."""
    for name, spec in replay["layers"].items():
        set_submodule(model, name, QuantizedLayer.from_spec(spec))
    for name in replay.get("fused", []):
        set_submodule(model, name, nn.Identity())
    return model


def _following_relu(model: nn.Module, name: str) -> str | None:
    """Name of an nn.ReLU that directly follows `name` inside an nn.Sequential, if any."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    i = keys.index(child)
    if i + 1 < len(keys) and type(parent._modules[keys[i + 1]]) is nn.ReLU:
        return f"{parent_name}.{keys[i + 1]}" if parent_name else keys[i + 1]
    return None


def _weight_qparams(weight: torch.Tensor, cfg: QuantConfig) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    wq = cfg.weights
    if not wq.symmetric:
        raise NotImplementedError("asymmetric weights")  # unreachable with the issue-2 config
    qmin, qmax = qrange(wq.bits, signed=True, narrow=True)
    w = weight.detach().float()
    if wq.granularity == Granularity.PER_CHANNEL:
        amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    else:
        amax = w.abs().amax().expand(w.shape[0])
    scale = symmetric_scale(amax, qmax)
    zero_point = torch.zeros(w.shape[0], dtype=torch.int32)
    meta = {"bits": wq.bits, "dtype": "int8", "qmin": qmin, "qmax": qmax, "granularity": str(wq.granularity)}
    return meta, scale, zero_point


def _calibrate(model, targets, relus, cfg: QuantConfig, ctx: Context):
    """One pass over the calibration data; returns {name: (input observer, output observer)}."""
    name_of = cfg.activations.calibrator.value
    observers = {name: (make_observer(name_of), make_observer(name_of)) for name, _ in targets}
    hooks = []
    for name, module in targets:
        in_obs, out_obs = observers[name]
        hooks.append(module.register_forward_hook(lambda m, i, o, obs=in_obs: obs.update(i[0])))
        # With a fused ReLU, the output range is the ReLU's output range.
        where = model.get_submodule(relus[name]) if name in relus else module
        hooks.append(where.register_forward_hook(lambda m, i, o, obs=out_obs: obs.update(o)))
    try:
        D.check_model_runs(model, ctx.data)
        batches = list(D.take(ctx.data, cfg.calibration_batches))
        with torch.no_grad():
            for batch in track(batches, "calibrating", enabled=ctx.progress):
                inputs, _ = D.split(batch)
                D.forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return observers


@register_method("quantize", QuantConfig, replay=replay_quantize)
def quantize_model(model: nn.Module, cfg: QuantConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Post-training quantization of a copy of `model`: int8 weights per channel, activations calibrated."""
    model = copy.deepcopy(model).eval()
    for pattern in unmatched_patterns(model, [*cfg.layers, *cfg.skip]):
        ctx.warn(f"quantize: pattern {pattern!r} matches no module")
    targets = select_modules(model, SUPPORTED, cfg.layers, cfg.skip)
    for name, module in model.named_modules():
        if name and matches(name, cfg.layers) and not matches(name, cfg.skip) and _has_own_weight(module) \
                and not isinstance(module, SUPPORTED):
            ctx.warn(f"quantize: {name} ({type(module).__name__}) is not a supported layer kind; kept in float")
    if not targets:
        ctx.warn("quantize: no Linear/Conv1d/Conv2d layer selected; the model is unchanged")
    relus = {}
    if cfg.fuse_relu and cfg.activations is not None:
        relus = {n: r for n, _ in targets if (r := _following_relu(model, n)) is not None}

    observers = {}
    act_meta: dict[str, Any] = {}
    if cfg.activations is not None and targets:
        if ctx.data is None:
            raise DataError(
                "static quantization needs calibration data: pass data=..., or set activations: null "
                "for weight-only quantization"
            )
        observers = _calibrate(model, targets, relus, cfg, ctx)
        signed = cfg.activations.symmetric
        qmin, qmax = qrange(cfg.activations.bits, signed=signed)
        act_meta = {"qmin": qmin, "qmax": qmax, "dtype": "int8" if signed else "uint8"}

    layers: dict[str, Any] = {}
    for name, module in targets:
        meta, scale, zero_point = _weight_qparams(module.weight, cfg)
        spec = QuantizedLayer.geometry(module)
        spec["weight"] = meta
        spec["activation"] = "relu" if name in relus else None
        if observers:
            in_obs, out_obs = observers[name]
            for side, obs in (("input", in_obs), ("output", out_obs)):
                try:
                    s, z = obs.qparams(act_meta["qmin"], act_meta["qmax"], cfg.activations.symmetric)
                except (RuntimeError, ValueError) as exc:
                    raise DataError(f"quantize: cannot calibrate the {side} of {name}: {exc}") from None
                spec[side] = {"scale": s, "zero_point": z, **act_meta}
        qlayer = QuantizedLayer.from_spec(spec)
        qlayer.qweight.copy_(quantize_weight(module.weight, scale, zero_point, meta["qmin"], meta["qmax"], torch.int8))
        qlayer.weight_scale.copy_(scale)
        qlayer.weight_zero_point.copy_(zero_point)
        if module.bias is not None:
            qlayer.bias.data.copy_(module.bias.detach().float())
        set_submodule(model, name, qlayer)
        layers[name] = qlayer.spec()
    for relu in relus.values():
        set_submodule(model, relu, nn.Identity())
    return model, {"layers": layers, "fused": sorted(relus.values())}


def _has_own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))
