"""The `cluster` method: k-means weight sharing per layer, optional codebook fine-tuning, and its replay."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core import data as D
from ..core.registry import Context, ReportSection, SearchAction, SearchHooks, merge_overrides, register_method
from ..core.select import matches, names_by_module, resolve, set_submodule, unmatched_patterns
from ..core.train import FitConfig, classification_loss, fit
from ..errors import DataError
from ..quant.modules import QuantizedLayer
from .config import ClusterConfig, Coding, SparseStorage, Trainable, TuneLoss
from .kmeans import kmeans_1d
from .layer import ClusteredLayer
from .storage import choose_position_bits, index_width
from ..core.layers import visible_modules
from ..core.tied import left_alone, tie, tie_plan, tie_record

__all__ = ["cluster_model", "replay_cluster", "storage_report", "SUPPORTED"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def replay_cluster(model: nn.Module, replay: dict[str, Any]) -> nn.Module:
    """Rebuild the clustered structure recorded by `cluster_model` (shapes only, no values)."""
    for name, spec in replay["layers"].items():
        set_submodule(model, name, ClusteredLayer.from_spec(spec))
    for alias, name in replay.get("shared", {}).items():
        set_submodule(model, alias, model.get_submodule(name))
    return tie(model, replay.get("tied", {}))


def _geometry(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, nn.Embedding):
        return {"kind": "embedding", "weight_shape": list(module.weight.shape), "bias": False,
                "padding_idx": module.padding_idx, "scale_grad_by_freq": module.scale_grad_by_freq,
                "sparse_grad": module.sparse}
    if type(module) in SUPPORTED:
        return QuantizedLayer.geometry(module)
    spec = dict(module.spec())  # a pruned layer (prune.SparseLayer): its geometry plus its sparse format
    return {k: v for k, v in spec.items() if k not in ("dtype", "sparse")}


def _is_pruned_layer(module: nn.Module) -> bool:
    """A pruned layer of the `prune` method: its weight, its mask and its geometry are read from it."""
    from ..pruning.sparse_layer import SparseLayer  # imported here: prune is a sibling method package

    return isinstance(module, SparseLayer)


def _has_own_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _float_bits_if_clustered(n: int, bits: int) -> int:
    """A lower estimate of a clustered layer's bits: the 2^b float32 centroids plus packed indices."""
    return 32 * min(1 << bits, n) + n * bits


def _recover_sharing(config: dict[str, Any], recovery: Any) -> tuple[str, dict[str, Any]] | None:
    """The search's recovery after sharing: the centroids tuned on the data (indices fixed), as Deep Compression does."""
    steps = getattr(recovery, "share_steps", 0)
    return ("cluster", {**config, "tune": {"steps": steps, "lr": recovery.share_lr}}) if steps else None


# the search's actions (a codebook of 2^bits values per layer) and plan rules (one stage, per-layer bits)
CLUSTER_SEARCH = SearchHooks("share", order=30, merge=merge_overrides("overrides", "bits"), recover=_recover_sharing,
                             actions=tuple(SearchAction(f"share{b}", {"bits": b}, float(b)) for b in (8, 4, 2)))


@register_method("cluster", ClusterConfig, replay=replay_cluster, search=CLUSTER_SEARCH, recurrent=True,
                 report=ReportSection("weight_sharing", lambda model: storage_report(model)))
def cluster_model(model: nn.Module, cfg: ClusterConfig, ctx: Context) -> tuple[nn.Module, dict[str, Any]]:
    """Weight sharing on a copy of `model`: each selected layer's weights become indices into a k-means
    codebook of at most 2^bits float32 centroids, stored packed or Huffman-coded; pruned layers keep
    their zeros as relative-index positions. With `tune`, the centroids are then fine-tuned on `data`."""
    original = model
    model = copy.deepcopy(model).eval()
    for pattern in unmatched_patterns(model, [*cfg.layers, *cfg.skip, *(o.pattern for o in cfg.overrides)]):
        ctx.warn(f"cluster: pattern {pattern!r} matches no module")
    names_of = names_by_module(model)
    owners: dict[int, set[int]] = {}  # parameter id -> ids of the modules holding it (tied weights)
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    rules = [(o.pattern, o.bits) for o in cfg.overrides]
    # Tied weights (an Embedding and its lm_head, Embeddings sharing a table) are clustered once (core/tied.py).
    together, refused = tie_plan(model, cfg.layers, cfg.skip)
    following = {e for embs in together.values() for e in embs}
    layers: dict[str, Any] = {}
    shared: dict[str, str] = {}
    tied: dict[str, dict[str, Any]] = {}
    done: set[int] = set()
    fewer: dict[str, int] = {}  # small layers clustered with fewer bits: {name: bits}
    for name, module in list(visible_modules(model)):
        if not name or id(module) in done or not matches(name, cfg.layers) or matches(name, cfg.skip):
            continue
        if isinstance(module, ClusteredLayer):
            ctx.skip(name, "already clustered; left as it is")
            continue
        pruned = _is_pruned_layer(module)
        if not pruned and type(module) not in SUPPORTED:
            if isinstance(module, SUPPORTED):
                ctx.skip(name, f"{type(module).__name__} subclasses {type(module).__mro__[1].__name__} and is read by its parent; kept in float")
            elif _has_own_weight(module):
                ctx.skip(name, f"{type(module).__name__} is not a supported layer kind; kept in float")
            continue
        why = None if pruned else left_alone(name, module, SUPPORTED, refused, following, "kept in float")
        if why is not None:  # "": an Embedding clustered with the Linear it is tied to
            if why:
                ctx.skip(name, why)
            continue
        followers = together.get(name, []) if not pruned else []
        if not pruned and len(owners.get(id(module.weight), ())) > 1 + len(followers):
            ctx.skip(name, "its weight is tied to another module's; kept in float (clustering one copy would untie them)")
            continue
        layer = _cluster_layer(name, module, pruned, resolve(name, rules, cfg.bits), cfg, ctx, fewer)
        if layer is None:
            for e in followers:
                ctx.skip(e, f"its weight is tied to {name}, which stays float; kept in float so the tie holds")
            continue
        done.add(id(module))
        embedding = isinstance(module, nn.Embedding)  # Embeddings sharing its table: further names of its layer
        for alias in names_of[id(module)] + (followers if embedding else []):
            set_submodule(model, alias, layer)
            if alias != name:
                shared[alias] = name
        layers[name] = layer.spec()
        if not embedding:  # Embeddings tied to this Linear read its layer's rows
            tied.update({e: tie_record(model, e, name) for e in followers})
    tie(model, tied)  # each tied Embedding reads the rows of its Linear's clustered layer
    if fewer:
        listed = ", ".join(f"{n} ({b}-bit)" for n, b in list(fewer.items())[:6]) + (" ..." if len(fewer) > 6 else "")
        ctx.warn(f"cluster: {len(fewer)} layer(s) too small for a codebook of 2^bits float32 centroids to save space "
                 f"were clustered with the largest codebook that does: {listed}")
    if not layers:
        ctx.warn("cluster: no Linear/Conv1d/Conv2d/Embedding layer was clustered; the model is unchanged")
    elif cfg.tune is not None:
        _tune(model, original, cfg, ctx)
    # The per-layer figures (storage_report) are not replay data: st.compress puts them in the metrics.
    replay: dict[str, Any] = {"layers": layers, "shared": shared}
    if tied:
        replay["tied"] = tied
    return model, replay


def _cluster_layer(name: str, module: nn.Module, pruned: bool, bits: int, cfg: ClusterConfig, ctx: Context,
                   fewer: dict[str, int] | None = None) -> ClusteredLayer | None:
    """The clustered form of one layer, or None (left alone, with the reason). `fewer` collects the
    layers too small for 2^bits centroids to save space, clustered with the bits given there."""
    w = module.weight.detach().float().cpu()
    if not bool(torch.isfinite(w).all()):
        raise DataError(f"cluster: the weight of {name} holds NaN or infinite values, which no centroid can stand "
                        f"for; fix the model, or keep the layer in float with skip: [{name!r}]")
    n = w.numel()
    flat = w.reshape(-1)
    if pruned:
        keep = module.mask().reshape(-1).cpu()
    else:
        keep = flat != 0
    zeros = 1.0 - float(keep.float().mean()) if n else 0.0
    sparse = cfg.sparse == SparseStorage.SPARSE or (cfg.sparse == SparseStorage.AUTO and (pruned or zeros >= cfg.sparse_from))
    if pruned and cfg.sparse == SparseStorage.DENSE:
        ctx.warn(f"cluster: {name} is pruned but sparse: dense was asked; its zeros are clustered like any weight")
    positions = torch.nonzero(keep).reshape(-1) if sparse else None
    values = flat[positions] if sparse else flat
    if values.numel() == 0:
        ctx.skip(name, "no non-zero weight; kept as it is")
        return None
    # Too small for 2^bits centroids: the codebook (and indices) would cost at least as much as the float
    # weights. A smaller codebook that does save space is used instead (a 36-weight depthwise conv: 16
    # centroids rather than 32); none saves space: kept in float.
    asked = bits
    while bits >= 1 and _float_bits_if_clustered(values.numel(), bits) >= 32 * values.numel():
        bits -= 1
    if bits < 1:
        ctx.skip(name, f"too few weights ({values.numel()}) for any codebook of float32 centroids to save space; "
                       "kept in float")
        return None
    if bits < asked and fewer is not None:
        fewer[name] = bits
    codebook, indices = kmeans_1d(values, 1 << bits, init=cfg.init, iterations=cfg.iterations,
                                  optimal=cfg.optimal, seed=cfg.seed)
    if codebook.numel() < (1 << bits) and codebook.numel() == int(torch.unique(values).numel()):
        ctx.warn(f"cluster: {name} has only {codebook.numel()} distinct weights, fewer than {1 << bits} clusters; "
                 f"its codebook has {codebook.numel()} centroids (exact)")
    position_bits, position_codes = (None, None)
    if sparse:
        position_bits, position_codes = choose_position_bits(positions, n, cfg.coding, cfg.position_bits)
    bias = getattr(module, "bias", None)
    return ClusteredLayer.build(_geometry(module), bits, codebook, indices, cfg.coding, positions, position_codes,
                                position_bits, bias if isinstance(bias, torch.Tensor) else None).to(module.weight.device)


# -- fine-tuning ---------------------------------------------------------------------------------

def _distill_loss(teacher: nn.Module) -> Callable[[nn.Module, Any], torch.Tensor]:
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = D.split(batch)
        with torch.no_grad():
            target = D.first_tensor(D.forward(teacher, inputs))
        return F.mse_loss(D.first_tensor(D.forward(model, inputs)), target)

    return loss


def _tune(model: nn.Module, original: nn.Module, cfg: ClusterConfig, ctx: Context) -> None:
    """Train the centroids (indices fixed) on ctx.data, in place, with the built-in loop."""
    tune = cfg.tune
    if ctx.data is None:
        raise DataError("cluster: tune needs training data: pass data=... (batches of inputs, or (inputs, target)), "
                        "or set tune: null to cluster without fine-tuning")
    loss_kind = tune.loss
    if loss_kind == TuneLoss.AUTO:
        _, target = D.split(next(D.batches(ctx.data)))
        loss_kind = TuneLoss.CROSS_ENTROPY if target is not None else TuneLoss.DISTILL
    loss_fn = classification_loss
    if loss_kind == TuneLoss.DISTILL:
        loss_fn = _distill_loss(copy.deepcopy(original).eval())
    codebooks = list({id(m): m.codebook for m in model.modules() if isinstance(m, ClusteredLayer)}.values())
    frozen: list[nn.Parameter] = []
    if tune.train == Trainable.CODEBOOKS:
        # Nothing but the centroids moves: other parameters get no gradient, norms keep their statistics.
        ids = {id(c) for c in codebooks}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        for p in frozen:
            p.requires_grad_(False)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        inner = loss_fn

        def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:  # noqa: F811
            for norm in norms:
                norm.eval()
            return inner(m, batch)

        params = codebooks
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    try:
        fit(model, ctx.data, FitConfig(steps=tune.steps, epochs=tune.epochs, lr=tune.lr, optimizer=tune.optimizer,
                                       description="cluster: tuning codebooks", progress=ctx.progress),
            loss_fn=loss_fn, params=params)
    finally:
        for p in frozen:
            p.requires_grad_(True)


# -- figures -------------------------------------------------------------------------------------

def storage_report(model: nn.Module) -> dict[str, Any]:
    """Per clustered layer and in total: stored bits per weight next to the entropy of each stream
    (`ClusteredLayer.storage`). Empty when the model has no clustered layer."""
    layers: dict[str, Any] = {}
    seen: set[int] = set()
    for name, m in visible_modules(model):
        if isinstance(m, ClusteredLayer) and id(m) not in seen:
            seen.add(id(m))
            layers[name] = m.storage()
    if not layers:
        return {}
    n = sum(s["weights"] for s in layers.values())
    stored = sum(s["stored_bits"] for s in layers.values())
    streams = sum(sum(x["bits"] for x in s["streams"].values()) for s in layers.values())
    bound = sum(s["entropy_bits_per_weight"] * s["weights"] for s in layers.values())
    total = {"weights": n, "stored_bits": stored, "bits_per_weight": stored / n,
             "stream_bits_per_weight": streams / n, "entropy_bits_per_weight": bound / n}
    return {"layers": layers, "total": total}
