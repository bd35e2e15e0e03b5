"""Post-training quantization: plan per layer, observe in one pass, convert to integer-weight layers."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import data as D
from ..core.progress import track
from ..core.registry import Context, register_method
from .search_hooks import QUANTIZE_SEARCH
from ..core.select import names_by_module, matches, select_modules, set_submodule, unmatched_patterns
from ..errors import ConfigError, DataError
from . import log2
from .config import ActivationQuant, Granularity, QuantConfig, Rounding, WeightFormat, WeightQuant, WeightScale
from .fallback import choose_fallback
from .recipe_choice import per_token_under_budget
from .gptq import HessianObserver, gptq_quantize
from .modules import SUPPORTED, WEIGHT_ONLY, QuantizedLayer
from .observers import make_observer
from .smooth import choose_smoothing, observe_inputs
from .ops import qrange, quantize_weight, weight_qparams, weight_qrange
from ..core.layers import WRAP_CHILD, Wrapped, read_for_weight, visible_modules
from ..core.tied import tie, tie_plan, tie_record, tied_pairs

__all__ = ["quantize_model", "replay_quantize", "plan_layers", "LayerPlan"]


@dataclass
class LayerPlan:
    """What one layer will become: its weight format, its activation format (None: weight-only)
    and the ReLU folded into it, if any."""

    name: str
    module: nn.Module
    weights: WeightQuant
    activations: ActivationQuant | None
    relu: str | None = None
    aliases: tuple[str, ...] = ()  # other names of the same module object (a layer registered twice)
    smooth: torch.Tensor | None = None  # SmoothQuant factors s per input channel (quant/smooth.py)

    def weight(self) -> torch.Tensor:
        """The float weight to quantize: the module's, times s per input channel when smoothed."""
        w = self.module.weight.detach()
        return w if self.smooth is None else w * self.smooth

    def observed(self, x: torch.Tensor) -> torch.Tensor:
        """A layer input as the quantized layer sees it (divided by s when smoothed)."""
        return x if self.smooth is None else x / self.smooth


def replay_quantize(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized structure recorded by `quantize_model` (shapes only, no values)."""
    for entry in replay.get("bn_folded", []):  # folded before quantizing: a bias where BN added one
        layer = model.get_submodule(entry["layer"])
        if getattr(layer, "bias", None) is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        from ..fusion.ops import bypass_bn

        bypass_bn(model, entry)  # nn.Identity, or the activation a BatchNormAct2d ran after normalising
    for name, spec in replay["layers"].items():
        set_submodule(model, name, QuantizedLayer.from_spec(spec))
    for alias, name in replay.get("shared", {}).items():
        set_submodule(model, alias, model.get_submodule(name))
    if replay.get("recurrent"):
        from ..core.recurrent import replay_recurrent

        replay_recurrent(model, replay["recurrent"])
    for name in replay.get("fused", []):
        set_submodule(model, name, nn.Identity())
    return tie(model, replay.get("tied", {}))


def plan_layers(model: nn.Module, cfg: QuantConfig, ctx: Context) -> list[LayerPlan]:
    """Resolve which layers are quantized and how; warn about everything selected but not handled."""
    override_patterns = [rule.pattern for rule in cfg.overrides]
    for pattern in unmatched_patterns(model, [*cfg.layers, *cfg.skip, *override_patterns]):
        ctx.warn(f"quantize: pattern {pattern!r} matches no module")
    for name, module in visible_modules(model):
        selected = name and matches(name, cfg.layers) and not matches(name, cfg.skip)
        if selected and _has_own_weight(module) and not isinstance(module, SUPPORTED + WEIGHT_ONLY):
            ctx.skip(name, f"{type(module).__name__} is not a supported layer kind; kept in float")
        elif selected and hasattr(module, "values") and hasattr(module, "index") and not isinstance(module, SUPPORTED):
            # A pruned layer (pruning/sparse_layer.py) stores its weight as buffers, so it has no weight to quantize.
            ctx.warn(f"quantize: {name} is a pruned sparse layer; quantizing it is not supported, it stays float "
                     "(quantize before pruning, or share its weights with `cluster`, which keeps the sparsity)")
    names_of = names_by_module(model)
    plans, read_only = [], []
    for name, module in select_modules(model, SUPPORTED, cfg.layers, cfg.skip):
        if type(module) not in SUPPORTED:
            # A subclass may override forward, or its parent may read its weight directly
            # (nn.MultiheadAttention.out_proj): replacing it would change what the model computes.
            ctx.skip(name, f"{type(module).__name__} subclasses {type(module).__mro__[1].__name__} and is read by its parent; kept in float")
            continue
        weights, activations = cfg.weights, cfg.activations
        for rule in cfg.overrides:  # last match wins, field by field
            if matches(name, [rule.pattern]):
                if "weights" in rule.model_fields_set and rule.weights is not None:
                    weights = rule.weights
                if "activations" in rule.model_fields_set:
                    activations = rule.activations
        _check_weight(name, module, weights)
        if activations is not None and activations.dynamic:
            if not isinstance(module, nn.Linear):
                ctx.warn(f"quantize: {name} ({type(module).__name__}): dynamic activations apply to Linear "
                         "layers only; its weights are quantized, its activations stay float")
                activations = None
            else:
                _check_dynamic_weight(name, weights)
        if activations is not None and read_for_weight(name):
            read_only.append(name)
            activations = None
        relu = _following_relu(model, name) if (cfg.fuse_relu and activations is not None) else None
        aliases = tuple(n for n in names_of[id(module)] if n != name)
        plans.append(LayerPlan(name, module, weights, activations, relu, aliases))
    if read_only:
        ctx.warn(f"quantize: {', '.join(read_only)}: recurrent matrices, read for their weight by the recurrent op "
                 "(core/recurrent.py); quantized weight-only, their activations stay float")
    plans = _embedding_plans(model, cfg, ctx, names_of, plans)
    plans = _tied_head_default(model, cfg, ctx, plans)
    if not plans:
        ctx.warn("quantize: no Linear/Conv1d/Conv2d/Embedding layer selected; the model is unchanged")
    return plans


def _embedding_plans(model: nn.Module, cfg: QuantConfig, ctx: Context, names_of: dict,
                     plans: list[LayerPlan]) -> list[LayerPlan]:
    """`plans` (the Linear / conv layers) and the embeddings': weight-only, one scale per row
    (per_channel) or per group along the row. An embedding tied to a Linear (lm_head) gets no plan of its
    own: it reads the Linear's quantized layer (`_build`, core/tied.py), whose scales per output channel
    are per vocabulary row; a tied pair whose other half this stage leaves alone stays float, tied."""
    together, refused = tie_plan(model, cfg.layers, cfg.skip)
    following = {e for embs in together.values() for e in embs}
    for name, reason in refused.items():
        ctx.skip(name, reason)
    plans = [p for p in plans if p.name not in refused]
    shared = {id(p): n for n, m in visible_modules(model) if not isinstance(m, nn.Embedding)
              for p in m.parameters(recurse=False)}
    for name, module in select_modules(model, WEIGHT_ONLY, cfg.layers, cfg.skip):
        if name in following or name in refused:
            continue
        if type(module) is not nn.Embedding or module.max_norm is not None:
            why = "renormalises its rows in place (max_norm)" if type(module) is nn.Embedding else "is a subclass"
            ctx.skip(name, f"{type(module).__name__} {why}; kept in float")
            continue
        if id(module.weight) in shared:
            ctx.skip(name, f"its weight is tied to {shared[id(module.weight)]}, which stays float; "
                     "kept in float so the tie holds (quantizing it would store a second copy)")
            continue
        weights = cfg.weights
        for rule in cfg.overrides:
            if matches(name, [rule.pattern]) and "weights" in rule.model_fields_set and rule.weights is not None:
                weights = rule.weights
        _check_weight(name, module, weights)
        # Embeddings sharing its table (tied, no Linear among them): further names of its quantized layer.
        aliases = tuple(n for n in names_of[id(module)] if n != name) + tuple(together.get(name, ()))
        plans.append(LayerPlan(name, module, weights, None, None, aliases))
    return plans


def _tied_head_default(model: nn.Module, cfg: QuantConfig, ctx: Context, plans: list[LayerPlan]) -> list[LayerPlan]:
    """`tied`: a Linear tied to an Embedding (lm_head) stays float with `tied: float`, and with `auto` when
    its weights would have fewer than 8 bits; its Embedding then stays float and tied with it."""
    embs_of: dict[str, list[str]] = {}
    for emb, lin in tied_pairs(model).items():
        embs_of.setdefault(lin, []).append(emb)
    kept = []
    for plan in plans:
        if plan.name in embs_of and (cfg.tied == "float" or (cfg.tied == "auto" and plan.weights.bits < 8)):
            why = ("tied: float" if cfg.tied == "float" else
                   f"tied: auto keeps a tied output head float below 8 bits (here {plan.weights.bits})")
            reason = (f"{why}: the output head tied to the embedding ({plan.name} = {', '.join(embs_of[plan.name])}) is "
                      "the most sensitive layer of a language model and quantizing it changes the embedding too; "
                      "set tied: quantize to quantize it once for both uses")
            for name in (plan.name, *embs_of[plan.name]):
                ctx.skip(name, reason)
            continue
        kept.append(plan)
    return kept


def _following_relu(model: nn.Module, name: str) -> str | None:
    """Name of an nn.ReLU that directly follows `name` inside an nn.Sequential (folded BatchNorms, now
    nn.Identity, in between are looked through; a wrapped layer counts at its module's place), if any."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, Wrapped) and child == WRAP_CHILD and parent.call.get("returns") and parent_name:
        name = parent_name
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    i = keys.index(child) + 1
    while i < len(keys) and type(parent._modules[keys[i]]) is nn.Identity:
        i += 1
    if i < len(keys) and type(parent._modules[keys[i]]) is nn.ReLU:
        return f"{parent_name}.{keys[i]}" if parent_name else keys[i]
    return None


def _check_dynamic_weight(name: str, wq: WeightQuant) -> None:
    # The integer kernel (MatMulInteger u8 x s8) takes int8 weights with zero point 0, one scale per column.
    if not wq.symmetric or wq.granularity == Granularity.PER_GROUP:
        raise ConfigError(
            f"quantize: {name}: dynamic activations need symmetric weights per_channel or per_tensor "
            f"(got symmetric={wq.symmetric}, granularity={wq.granularity}); set weights: "
            "{symmetric: true, granularity: per_channel}, or use static activations"
        )


MAX_LISTED_GROUP = 256  # the largest group size an error message suggests


def _check_weight(name: str, module: nn.Module, wq: WeightQuant) -> None:
    """Fail before any calibration on a weight that cannot be quantized as asked: NaN/Inf values, or a
    group size that does not divide the layer's input dimension."""
    w = module.weight.detach()
    if not bool(torch.isfinite(w).all()):
        n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        raise DataError(
            f"quantize: the weight of {name} has {n_nan} NaN and {n_inf} infinite values, which have no "
            f"quantization grid; fix the model (a diverged training run or a bad checkpoint), or keep the "
            f"layer in float with skip: [{name!r}]"
        )
    if wq.granularity == Granularity.PER_GROUP:
        k = w[0].numel()
        if k % wq.group_size:
            if isinstance(module, nn.Linear):
                dim = f"in_features = {k}"
            else:
                dims = " x ".join(str(d) for d in (w.shape[1], *w.shape[2:]))
                dim = f"in_channels/groups x kernel = {dims} = {k}"
            valid = [d for d in range(2, min(k, MAX_LISTED_GROUP) + 1) if k % d == 0]
            choose = (f"choose a group_size that divides {k} ({', '.join(map(str, valid))})" if valid
                      else f"{k} has no divisor from 2 to {MAX_LISTED_GROUP}")
            raise ConfigError(
                f"quantize: group_size={wq.group_size} does not divide the input dimension of {name} "
                f"({type(module).__name__}, {dim}); {choose}, or quantize this layer per_channel with an "
                f"override: {{pattern: {name!r}, weights: {{granularity: per_channel, bits: {wq.bits}"
                f"{'' if wq.symmetric else ', symmetric: false'}}}}}"
            )


def _weight_grid(wq: WeightQuant) -> tuple[int, int, int | None]:
    """(qmin, qmax, group_size) of a weight format: its integer range and, per group, the group size."""
    qmin, qmax = weight_qrange(wq.bits - 1 if wq.reduce_range else wq.bits, wq.symmetric)
    return qmin, qmax, (wq.group_size if wq.granularity == Granularity.PER_GROUP else None)


def _weight_qparams(weight: torch.Tensor, wq: WeightQuant) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The weight's format record (the spec's `weight` entry), scales and zero points."""
    if wq.format == WeightFormat.LOG2:  # powers of two below 2^e_max per channel (quant/log2.py)
        return (log2.log2_meta(wq.bits, str(wq.granularity)), *log2.log2_qparams(weight, str(wq.granularity)))
    qmin, qmax, group_size = _weight_grid(wq)
    scale, zero_point = weight_qparams(weight, qmin, qmax, wq.symmetric, str(wq.granularity), group_size)
    if wq.scale == WeightScale.POW2:
        scale = log2.pow2_scales(weight, scale, zero_point, qmin, qmax, str(wq.granularity), group_size)
    dtype = "int8" if wq.symmetric else "uint8"
    meta = {"bits": wq.bits, "dtype": dtype, "qmin": qmin, "qmax": qmax, "granularity": str(wq.granularity),
            "symmetric": wq.symmetric, "group_size": group_size, "packed": wq.bits < 8,
            # One zero point per group is a byte in the weight's own type (int32 would add 0.5 to 1 bit per
            # weight at groups of 64 to 32); per channel it stays int32, as artifacts have always stored it.
            "zero_point_dtype": dtype if group_size else "int32"}
    if wq.scale == WeightScale.POW2:
        meta["scale"] = "pow2"  # every weight_scale a power of two (docs/artifact-format.md)
    if wq.coding != "plain":
        meta.update(coding=str(wq.coding), code_bytes=0)  # the stream's length is set with the weights
    return meta, scale, zero_point


def _calibrate(model: nn.Module, plans: list[LayerPlan], cfg: QuantConfig, ctx: Context,
               hessian_plans: list[LayerPlan] = ()):
    """One pass over the calibration data feeds every observer: activation ranges of `plans`
    ({name: (input, output)}) and the input Hessians GPTQ needs of `hessian_plans` ({name: HessianObserver})."""
    observers, hooks = {}, []
    hessians = {p.name: HessianObserver(p.module.in_features) for p in hessian_plans}
    for plan in hessian_plans:
        hooks.append(plan.module.register_forward_hook(
            lambda m, i, o, obs=hessians[plan.name], p=plan: obs.update(p.observed(i[0]))))
    for plan in plans:
        in_obs, out_obs = observers[plan.name] = (make_observer(plan.activations), make_observer(plan.activations))
        hooks.append(plan.module.register_forward_hook(lambda m, i, o, obs=in_obs, p=plan: obs.update(p.observed(i[0]))))
        if plan.activations.outputs:
            # With a folded ReLU, the output range is the ReLU's output range.
            where = model.get_submodule(plan.relu) if plan.relu else plan.module
            hooks.append(where.register_forward_hook(lambda m, i, o, obs=out_obs: obs.update(o)))
    try:
        batches = list(D.take(ctx.data, cfg.calibration_batches))
        with torch.no_grad():
            for batch in track(batches, "calibrating", enabled=ctx.progress):
                inputs, _ = D.split(batch)
                D.forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return observers, hessians


def _gptq_weights(plans: list[LayerPlan], hessians: dict, cfg: QuantConfig, ctx: Context) -> dict[str, tuple]:
    """GPTQ-rounded (q, scale, zero_point) of every layer with a Hessian, computed once: fallback
    rebuilds candidates many times from these."""
    rounded = {}
    todo = [p for p in plans if p.name in hessians and hessians[p.name].count > 0]
    for plan in track(todo, "gptq", enabled=ctx.progress and bool(todo)):  # no empty bar without GPTQ
        wq = plan.weights
        qmin, qmax, group_size = _weight_grid(wq)
        try:
            rounded[plan.name] = gptq_quantize(plan.weight(), hessians[plan.name].h, qmin, qmax, wq.symmetric,
                                               str(wq.granularity), group_size, damp=cfg.gptq_damp,
                                               act_order=cfg.gptq_act_order)
        except torch.linalg.LinAlgError:
            ctx.warn(f"quantize: gptq: the input Hessian of {plan.name} is not positive definite even with "
                     f"gptq_damp={cfg.gptq_damp}; rounded to nearest instead (raise gptq_damp to retry)")
    return rounded


def _act_spec(name: str, side: str, obs, aq: ActivationQuant) -> dict[str, Any]:
    qmin, qmax = qrange(aq.bits, signed=aq.symmetric)
    try:
        scale, zero_point = obs.qparams(qmin, qmax, aq.symmetric)
    except DataError as exc:  # NaN / Inf seen: the observer's message already says what to do
        raise DataError(f"quantize: the {side} of {name}: {exc}") from None
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"quantize: cannot calibrate the {side} of {name}: {exc}; check the calibration data") from None
    return {"scale": scale, "zero_point": zero_point, "qmin": qmin, "qmax": qmax,
            "dtype": "int8" if aq.symmetric else "uint8"}


def _convert(plan: LayerPlan, observers: dict, rounded: dict | None = None) -> QuantizedLayer:
    module = plan.module
    weight = plan.weight()
    meta, scale, zero_point = _weight_qparams(weight, plan.weights)
    q = None
    if rounded and plan.name in rounded:
        q, scale, zero_point = rounded[plan.name]
    spec = QuantizedLayer.geometry(module)
    spec.update(weight=meta, activation="relu" if plan.relu else None)
    if plan.smooth is not None:
        spec["input_smooth"] = True
    if plan.activations is not None and plan.activations.dynamic:
        spec["input_dynamic"] = {"per_token": plan.activations.per_token}
    elif plan.activations is not None:
        in_obs, out_obs = observers[plan.name]
        spec["input"] = _act_spec(plan.name, "input", in_obs, plan.activations)
        spec["output"] = _act_spec(plan.name, "output", out_obs, plan.activations) if plan.activations.outputs else None
    layer = QuantizedLayer.from_spec(spec)
    dtype = torch.int8 if meta["dtype"] == "int8" else torch.uint8
    if q is None and meta.get("format") == "log2":
        q = log2.quantize(weight, scale, meta["bits"])
    elif q is None:
        q = quantize_weight(weight, scale, zero_point, meta["qmin"], meta["qmax"], dtype)
    layer.set_weight(q.to(dtype), scale, zero_point)
    if plan.smooth is not None:
        layer.input_smooth.copy_(1.0 / plan.smooth)
    if getattr(module, "bias", None) is not None:
        layer.bias.data.copy_(module.bias.detach().float())
    return layer


@register_method("quantize", QuantConfig, replay=replay_quantize, search=QUANTIZE_SEARCH)
def quantize_model(model: nn.Module, cfg: QuantConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Post-training quantization of a copy of `model`: 2- to 8-bit weights per tensor, channel or group,
    activations calibrated (or weight-only)."""
    model = copy.deepcopy(model).eval()
    folded = _fold_batchnorms(model, cfg, ctx)
    plans = plan_layers(model, cfg, ctx)
    static = [p for p in plans if p.activations is not None and not p.activations.dynamic]
    observers, rounded, smoothing, awq_report = {}, {}, None, None
    if cfg.smooth is not None:
        smoothing = _smooth(model, plans, cfg, ctx)
    gptq = _gptq_plans(plans, cfg, ctx)
    if (gptq or cfg.awq) and ctx.data is None:
        raise DataError(f"{'awq' if cfg.awq else 'rounding: gptq'} needs calibration data (the inputs of each layer): "
                        "pass data=... (--data), or use rounding: nearest without awq")
    if (gptq or cfg.awq) and not static:
        D.check_model_runs(model, ctx.data)
        rounded, awq_report = _weight_only_round(model, plans, cfg, ctx)
    if static:
        if ctx.data is None:
            raise DataError(
                "static quantization needs calibration data: pass data=... (--data), or set "
                "activations: null for weight-only quantization"
            )
        D.check_model_runs(model, ctx.data)
        observers, hessians = _calibrate(model, static, cfg, ctx, gptq)
        rounded = _gptq_weights(plans, hessians, cfg, ctx)
        unused = [p.name for p in static if observers[p.name][0].count == 0]
        for name in unused:
            ctx.skip(name, "never ran on the calibration data, so its activations have no range; kept in float")
        plans = [p for p in plans if p.name not in unused]
    report = None
    per_token = None
    if cfg.max_drop is not None and plans:
        metric = ctx.eval_fn or _fidelity_metric(model, ctx.data)
        build = lambda chosen: _build(model, chosen, observers, rounded)[0]  # noqa: E731
        for rung in cfg.fallback:  # per_token (quant/recipe_choice.py) and / or float, in the configured order
            if rung == "per_token":
                plans, per_token = per_token_under_budget(model, plans, build, metric, cfg, ctx)
            else:
                known = (per_token["baseline"], per_token["final"]) if per_token else None  # no re-measuring
                plans, report = choose_fallback(model, plans, build, metric, cfg.max_drop, progress=ctx.progress,
                                                known=known)
        for step in (report or {}).get("fallback", []):
            ctx.warn(f"quantize: {step['layer']} kept in float to stay within max_drop={cfg.max_drop} "
                     f"(sensitivity {step['sensitivity']:.4g}, metric after {step['metric_after']:.4g})")
    quantized, replay = _build(model, plans, observers, rounded)
    if cfg.weights is not None:  # LSTM / GRU: int8 matrices per row, weight-only (core/recurrent.py)
        from ..core.recurrent import store_recurrent

        if recurrent := store_recurrent(quantized, cfg.layers, cfg.skip, "int8", "quantize", ctx):
            replay["recurrent"] = recurrent
    if folded:
        replay["bn_folded"] = folded
    if report is not None:
        replay["fallback_report"] = report  # informational: replay ignores it
    if per_token is not None:
        replay["per_token_report"] = per_token  # informational, as fallback_report
    if smoothing is not None:
        replay["smoothing_report"] = smoothing
    if cfg.awq and awq_report:
        replay["awq_report"] = awq_report  # informational, as smoothing_report
    return quantized, replay


def _weight_only_round(model: nn.Module, plans: list[LayerPlan], cfg: QuantConfig, ctx: Context):
    """Weight-only GPTQ and / or AWQ of the Linear plans, true-sequential over transformer blocks
    (quant/gptq.weight_only_round)."""
    from .gptq import weight_only_round

    linear = [p for p in plans if isinstance(p.module, nn.Linear)]
    batches = [D.split(b)[0] for b in D.take(ctx.data, cfg.calibration_batches)]
    return weight_only_round(
        model, linear, batches, D.forward, _weight_grid, gptq=cfg.rounding == Rounding.GPTQ, awq=cfg.awq,
        damp=cfg.gptq_damp, act_order=cfg.gptq_act_order, warn=ctx.warn,
        progress=lambda it: track(it, "rounding blocks", enabled=ctx.progress))


def _build(model: nn.Module, plans: list[LayerPlan], observers: dict, rounded: dict | None = None
           ) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the float `model` with exactly `plans` quantized, and its replay record."""
    model = copy.deepcopy(model)
    pairs = tied_pairs(model)  # before the Linears are replaced: their weights are what ties them
    layers: dict[str, Any] = {}
    shared: dict[str, str] = {}
    for plan in plans:
        layer = _convert(plan, observers, rounded)
        for name in (plan.name, *plan.aliases):
            set_submodule(model, name, layer)
        layers[plan.name] = layer.spec()
        shared.update({alias: plan.name for alias in plan.aliases})
    fused = sorted(p.relu for p in plans if p.relu)
    for relu in fused:
        set_submodule(model, relu, nn.Identity())
    # An Embedding tied to a quantized Linear reads its integer rows (core/tied.py): stored once, still tied.
    tied = {emb: tie_record(model, emb, lin) for emb, lin in pairs.items() if lin in layers}
    tie(model, tied)
    replay = {"layers": layers, "fused": fused, "shared": shared}
    if tied:
        replay["tied"] = tied
    return model, replay


def _smooth(model: nn.Module, plans: list[LayerPlan], cfg: QuantConfig, ctx: Context) -> dict[str, Any]:
    """SmoothQuant factors for every Linear with quantized activations, from one pass over the data
    (before calibration: the activation ranges are then those of the smoothed inputs). Sets plan.smooth;
    returns {layer: {alpha, error, error_unsmoothed}}."""
    if ctx.data is None:
        raise DataError("smooth needs calibration data (each layer's input range per channel): pass data=... "
                        "(--data), or remove smooth")
    for pattern in unmatched_patterns(model, cfg.smooth_layers):
        ctx.warn(f"quantize: smooth_layers pattern {pattern!r} matches no module")
    todo = [p for p in plans if p.activations is not None and isinstance(p.module, nn.Linear)
            and matches(p.name, cfg.smooth_layers)]
    others = [p.name for p in plans if p.activations is not None and not isinstance(p.module, nn.Linear)]
    if others:
        ctx.warn(f"quantize: smooth applies to Linear layers; {len(others)} other layer(s) quantized unsmoothed "
                 f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    if not todo:
        return {}
    D.check_model_runs(model, ctx.data)
    observers, groups = observe_inputs(model, todo, D.take(ctx.data, cfg.calibration_batches),
                                       "smoothing statistics" if ctx.progress else None)
    by_name = {p.name: p for p in todo}
    report = {}
    for names in track(groups, "smoothing factors", enabled=ctx.progress):
        group = [by_name[n] for n in names]
        same_format = len({(repr(p.weights), repr(p.activations)) for p in group}) == 1
        for members in [group] if same_format else [[p] for p in group]:  # one s cannot fit two formats
            s, chosen = choose_smoothing(observers[members[0].name], [p.module.weight for p in members],
                                         members[0].weights, members[0].activations, cfg.smooth)
            for p in members:
                p.smooth = s
                partners = [q.name for q in members if q is not p]
                report[p.name] = dict(chosen, shared_with=partners) if partners else chosen
    return report


def _fold_batchnorms(model: nn.Module, cfg: QuantConfig, ctx: Context) -> list[dict[str, str]]:
    """Static activations: BatchNorms folded into the Conv / Linear before them (fold_bn), IN PLACE."""
    static = cfg.activations is not None and not cfg.activations.dynamic
    if not (cfg.fold_bn and static) or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []
    from ..fusion.ops import fold_batchnorms, try_trace

    quiet = dataclasses.replace(ctx, warnings=[])  # a BN that stays is no news here: it just stays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = fold_batchnorms(model, try_trace(model, quiet), quiet,
                                  lambda *names: not any(matches(n, cfg.skip) for n in names), cfg.skip)
    if entries:
        ctx.warn(f"quantize: {len(entries)} BatchNorm{'s' if len(entries) > 1 else ''} folded into the layer before "
                 f"{'them' if len(entries) > 1 else 'it'} first (fold_bn), so each int8 layer runs as one kernel")
    return entries


def _gptq_plans(plans: list[LayerPlan], cfg: QuantConfig, ctx: Context) -> list[LayerPlan]:
    if cfg.rounding != Rounding.GPTQ:
        return []
    for plan in plans:
        if not isinstance(plan.module, nn.Linear):
            ctx.warn(f"quantize: gptq applies to Linear layers; {plan.name} ({type(plan.module).__name__}) "
                     "is rounded to nearest")
    return [p for p in plans if isinstance(p.module, nn.Linear)]


def _fidelity_metric(reference: nn.Module, data: Any):
    """Without labels: mean cosine of a candidate's outputs to the float model's, on the data."""
    from ..measure.quality import fidelity

    if data is None:
        raise DataError("max_drop needs data to measure the drop on: pass data=... (and eval_fn=... for a metric of yours)")
    return lambda candidate: fidelity(candidate, reference, data)["cosine"]


def _has_own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))
