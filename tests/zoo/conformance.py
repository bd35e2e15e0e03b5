"""One cell of the conformance matrix: a zoo model x a method, checked the way a new user would find out.

`run_cell(name, method)` applies the method with its default-ish settings and returns a `Cell`:

- **runs**: the method returned a model whose forward runs on the example batch;
- **share**: of the eligible weights (the `weight` of every module that computes with one: Linear,
  Conv1d/2d/3d and ConvTranspose, Embedding / EmbeddingBag, Hugging Face `Conv1D`, and
  `nn.MultiheadAttention`'s `in_proj_weight`), the share the method transformed (the module at that
  name was replaced or wrapped, or its weight changed value, dtype or shape); each layer left alone
  carries the reason the method gave. Counted here independently of the library and, where the
  library records its own coverage (`shrinktunnel.core.coverage.stage_coverage`), compared with it;
- **round trip**: `st.save` then `st.load(dir, model=<freshly built base>)` gives bit-identical outputs;
- **ONNX**: `st.export_onnx`, then ONNX Runtime (`shrinktunnel.export.OrtModel`) against PyTorch:
  largest absolute difference, held to the method's tolerance (`TOLERANCE`);
- **seconds**: wall time of the method alone.

Used by tests/zoo/test_zoo.py (a fast subset) and benchmarks/coverage.py (every model x method).
"""

from __future__ import annotations

import copy
import signal
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from zoo.models import build, calibration, example_inputs, run

__all__ = ["METHODS", "TOLERANCE", "SHARE_TARGET", "TARGETED", "Cell", "run_cell", "eligible_weights",
           "own_coverage", "library_coverage"]

SHARE_TARGET = 0.95
# The methods held to the share target (issue 15: quantize, cluster and unstructured prune on every
# zoo model; cast and QAT use the same layer selection as quantize; BatchNorm folding should fold every
# BatchNorm that follows a conv, and all of the zoo's do). The structural methods leave
# layers alone by design (an output layer keeps its channels, a layer whose low-rank form would be
# larger stays whole): for them each layer left alone must carry a reason, and the share is reported.
TARGETED = ("quantize_w8a8", "quantize_dynamic", "cast_fp16", "prune", "cluster", "qat", "fuse_bn")

# ONNX Runtime vs PyTorch, largest absolute difference of the main output, relative to the largest
# absolute output value (floor 1). Float graphs: float rounding only (different kernels and summation
# orders). Int8: ONNX Runtime's integer kernels round the requantized outputs once where the PyTorch
# simulation rounds in float, so a value may land one quantization step away, and that step travels
# through the layers after it.
TOLERANCE = {
    "quantize_w8a8": 5e-2, "qat": 5e-2, "quantize_dynamic": 2e-2,
    "cast_fp16": 1e-4, "prune": 1e-4, "cluster": 1e-4, "decompose": 1e-4, "prune_channels": 1e-4, "fuse_bn": 1e-4,
}


# --------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------
def _quiet(fn: Callable[[], nn.Module]) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    messages = []
    for w in caught:
        text = str(w.message)
        if text not in messages and not text.startswith("[transformers]"):
            messages.append(text)
    return out, messages


def _apply(method: str, model: nn.Module, x: Any, calib: list[Any]) -> nn.Module:
    import shrinktunnel as st

    if method == "quantize_w8a8":
        return st.quantize(model, st.QuantConfig(), data=calib, progress=False)
    if method == "quantize_dynamic":
        return st.quantize(model, st.QuantConfig(activations={"dynamic": True}), data=calib, progress=False)
    if method == "cast_fp16":
        return st.cast(model, st.CastConfig(format="float16"))
    if method == "prune":
        return st.prune(model, st.PruneConfig(sparsity=0.5), progress=False)
    if method == "cluster":
        return st.cluster(model, st.ClusterConfig(), progress=False)
    if method == "decompose":
        return st.decompose(model, st.DecomposeConfig(keep_if_slower=False), example_inputs=x, progress=False)
    if method == "prune_channels":
        return st.prune(model, st.ChannelPruneConfig(ratio=0.3), example_inputs=x, progress=False)
    if method == "fuse_bn":
        from shrinktunnel.api import run_stage
        from shrinktunnel.core.registry import Context

        return run_stage(model, "fuse_ops", {"bn": True, "linear": "never"}, Context(example_inputs=x, progress=False))
    if method == "qat":
        # Two steps of training against the float model's outputs: enough to run the whole path
        # (prepare, train, convert), not to change accuracy.
        return st.qat(model, st.QATConfig(steps=2, loss="mse_to_float", calibration_batches=2), data=calib,
                      progress=False)
    raise KeyError(method)


METHODS = ("quantize_w8a8", "quantize_dynamic", "cast_fp16", "prune", "cluster", "decompose", "prune_channels",
           "fuse_bn", "qat")
METHOD_TITLES = {
    "quantize_w8a8": "quantize W8A8 (default)", "quantize_dynamic": "quantize dynamic int8",
    "cast_fp16": "cast fp16", "prune": "prune 0.5 (unstructured)", "cluster": "cluster (5 bits)",
    "decompose": "decompose (ratio 0.5)", "prune_channels": "prune_channels 0.3", "fuse_bn": "fuse_ops bn",
    "qat": "qat (2 steps)",
}


# --------------------------------------------------------------------------------------------------
# The independent count
# --------------------------------------------------------------------------------------------------
_WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)


def _is_hf_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int)


def eligible_weights(model: nn.Module) -> dict[str, int]:
    """{module name: weights} of every module that computes with a weight of its own (see the module
    docstring). A module reached under two names counts once (its first name); a tensor tied between
    two modules (an LM head and its embedding) counts under each, as two layers use it."""
    out: dict[str, int] = {}
    for name, m in model.named_modules():  # named_modules yields a shared module once
        if not name:
            continue
        if isinstance(m, nn.MultiheadAttention):
            ws = [m.in_proj_weight] if m.in_proj_weight is not None else [m.q_proj_weight, m.k_proj_weight,
                                                                           m.v_proj_weight]
            out[name] = sum(int(w.numel()) for w in ws)
        elif isinstance(m, nn.RNNBase):  # LSTM / GRU: its matrices, as a Linear counts its weight, not its bias
            if any(isinstance(p, nn.Parameter) for p in m._parameters.values()):  # not core's placeholder inside
                out[name] = sum(int(p.numel()) for p in m.parameters(recurse=False) if p.dim() >= 2)
        elif isinstance(m, _WEIGHT_LAYERS) or _is_hf_conv1d(m):
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor):
                out[name] = int(w.numel())
    return out


def _compute_of(m: nn.Module) -> nn.Module | None:
    """The layer a wrapper computes with (`Wrapped.compute`), if `m` is such a wrapper."""
    inner, compute = getattr(m, "inner", None), getattr(m, "compute", None)
    return compute if isinstance(inner, nn.Module) and isinstance(compute, nn.Module) else None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Permutation-free comparison: a Conv1D's (in, out) weight held as a Linear's (out, in) is unchanged.
    if a.dtype != b.dtype or a.numel() != b.numel():
        return False
    return torch.equal(a.detach().flatten().sort().values, b.detach().flatten().sort().values)


def _transformed(before: nn.Module, after: nn.Module | None) -> bool:
    if after is None:
        return True
    compute = _compute_of(after)
    if compute is not None:  # wrapped: done when the method replaced or changed the computing layer
        w = getattr(compute, "weight", None)
        return not (type(compute) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
                    and isinstance(w, torch.Tensor) and _same_values(w, before.weight))
    if type(after) is not type(before):
        # A module replaced by an exact canonical copy of itself (GPT-2's Conv1D -> Linear) is unchanged.
        w = getattr(after, "weight", None)
        canonical = type(after) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
        return not (canonical and isinstance(w, torch.Tensor) and isinstance(getattr(before, "weight", None), torch.Tensor)
                    and _same_values(w, before.weight))
    if isinstance(before, nn.RNNBase):  # same class: left as it is (core/recurrent.py replaces it when it acts)
        return False
    if isinstance(before, nn.MultiheadAttention):
        return after.in_proj_weight is None or after.in_proj_weight.dtype != before.in_proj_weight.dtype
    wa, wb = getattr(after, "weight", None), getattr(before, "weight", None)
    if not isinstance(wa, torch.Tensor) or not isinstance(wb, torch.Tensor):
        return True
    # Same module kind: transformed when its weight changed shape (channel pruning) or storage dtype. New
    # values alone are not a transformation: QAT trains the float layers it leaves unquantized too.
    return wa.shape != wb.shape or wa.dtype != wb.dtype


def _named(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by the name users know: a wrapper's `compute` child answers to the wrapper's name."""
    return dict(model.named_modules())


def own_coverage(before: nn.Module, after: nn.Module, method: str) -> dict[str, Any]:
    """The independent count: {eligible, done, done_layers, left_layers: [names]}. For fuse_bn the
    eligible layers are the BatchNorms, done when folded away."""
    after_modules = _named(after)
    if method == "fuse_bn":
        bns = {n: int(m.num_features) for n, m in before.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        done = [n for n in bns if not isinstance(after_modules.get(n), nn.modules.batchnorm._BatchNorm)]
        return {"eligible": sum(bns.values()), "done": sum(bns[n] for n in done), "done_layers": done,
                "left_layers": [n for n in bns if n not in done], "layers": len(bns), "weights": bns}
    elig = eligible_weights(before)
    before_modules = _named(before)
    done = [n for n in elig if _transformed(before_modules[n], after_modules.get(n))]
    return {"eligible": sum(elig.values()), "done": sum(elig[n] for n in done), "done_layers": done,
            "left_layers": [n for n in elig if n not in done], "layers": len(elig), "weights": elig}


def _layer_name(name: str) -> str:
    """The record may name a weight-normed layer by its parametrization holder
    (`conv.parametrizations.weight`): the layer is `conv`."""
    suffix = ".parametrizations.weight"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def library_coverage(model: nn.Module) -> dict[str, Any] | None:
    """The library's own record of the last stage (`shrinktunnel.core.coverage.stage_coverage`), or
    None where it keeps none. Read field by field: `done` (the layers done) may be absent, then only
    the counts and the skipped layers are compared."""
    try:
        from shrinktunnel.core.coverage import stage_coverage
    except ImportError:
        return None
    try:
        from shrinktunnel.core.layers import logical_name
    except ImportError:
        def logical_name(n: str) -> str:
            return n[: -len(".compute")] if n.endswith(".compute") else n
    records = stage_coverage(model)
    if not records:
        return None
    c = records[-1]
    try:  # the raw record gives each skipped layer's weights: {name: [reason index, weights]}
        from shrinktunnel.core.history import stages

        raw = (stages(model)[-1].get("coverage") or {}).get("skipped", {})
        skipped_weights = {_layer_name(logical_name(n)): int(v[1]) for n, v in raw.items()
                           if isinstance(v, (list, tuple)) and len(v) > 1}
    except Exception:  # noqa: BLE001 - another layout: compare without it
        skipped_weights = {}
    done = getattr(c, "done", None)
    layers = getattr(c, "eligible_layers", None)
    return {"method": c.method, "eligible": int(c.eligible_weights), "done": int(c.done_weights), "share": float(c.share),
            "layers": int(layers) if isinstance(layers, int) else None,
            "done_layers": [logical_name(n) for n in done] if isinstance(done, (list, tuple, set)) else None,
            "skipped": {_layer_name(logical_name(n)): r for n, r in dict(getattr(c, "skipped", {}) or {}).items()},
            "skipped_weights": skipped_weights}


def _reason_for(layer: str, messages: list[str]) -> str | None:
    """The first warning that names `layer` (as a whole name, not a prefix of a longer one)."""
    import re

    pattern = re.compile(rf"(?<![\w.]){re.escape(layer)}(?![\w])(?!\.\w)")
    return next((m for m in messages if pattern.search(m)), None)


# --------------------------------------------------------------------------------------------------
# The cell
# --------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    model: str
    method: str
    runs: bool = False
    error: str | None = None  # the method failed (or its output did not run)
    seconds: float | None = None
    eligible: int = 0  # weights, independent count
    done: int = 0
    share: float | None = None
    layers: int = 0
    done_layers: int = 0
    library: dict[str, Any] | None = None  # the library's record (eligible, done, share), if it keeps one
    agreement: str | None = None  # where the two counts differ, how
    left: dict[str, str] = field(default_factory=dict)  # layer -> the reason it was left alone
    unexplained: list[str] = field(default_factory=list)  # layers left alone without a reason
    own: dict[str, Any] | None = None  # the independent count, where the library's record is what `share` shows
    beyond: dict[str, str] = field(default_factory=dict)  # weight holders only the library's record counts, with its reason
    roundtrip: bool | None = None
    roundtrip_error: str | None = None
    onnx: bool | None = None
    onnx_max_abs: float | None = None
    onnx_rel: float | None = None
    onnx_error: str | None = None
    output_drift: float | None = None  # max |compressed - original| / max |original|, informational
    warnings: list[str] = field(default_factory=list)

    @property
    def share_ok(self) -> bool:
        # No eligible layer at all (BatchNorm folding on a model without BatchNorm): nothing to miss.
        return self.share is None or self.share >= SHARE_TARGET or self.method not in TARGETED

    @property
    def green(self) -> bool:
        return bool(self.runs and self.share_ok and not self.unexplained and self.roundtrip and self.onnx
                    and not self.agreement)

    def problems(self) -> list[str]:
        """What keeps the cell from green, in words (empty when green)."""
        out = []
        if not self.runs:
            return [f"fails: {self.error}"]
        if self.share is not None and not self.share_ok:
            by: dict[str, list[str]] = {}
            for layer, reason in self.left.items():
                by.setdefault(reason, []).append(layer)
            top = sorted(by.items(), key=lambda kv: -len(kv[1]))[:2]
            why = "; ".join(f"{len(ls)} left ({', '.join(ls[:2])}{', ...' if len(ls) > 2 else ''}): {r}" for r, ls in top)
            out.append(f"share {100 * self.share:.1f} % < {100 * SHARE_TARGET:.0f} %" + (f": {why}" if why else ""))
        if self.unexplained:
            out.append(f"{len(self.unexplained)} layer(s) left without a reason: {', '.join(self.unexplained[:4])}"
                       + (" ..." if len(self.unexplained) > 4 else ""))
        if self.agreement:
            out.append(f"coverage counts disagree: {self.agreement}")
        if self.roundtrip is False:
            out.append(f"round trip: {self.roundtrip_error}")
        if self.onnx is False:
            out.append(f"ONNX: {self.onnx_error}")
        elif self.onnx is None:
            out.append(f"ONNX {self.onnx_error}" if self.onnx_error else "ONNX not checked")
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["green"] = self.green
        d["problems"] = self.problems()
        return d


class _Timeout(Exception):
    pass


def _where(frame) -> str:
    """Where a cell was when its time ran out: the innermost library frames."""
    stack = traceback.extract_stack(frame)
    ours = [f for f in stack if "shrinktunnel" in f.filename or "torch_pruning" in f.filename]
    picked = (ours or stack)[-2:]
    return " <- ".join(f"{'/'.join(Path(f.filename).parts[-2:])}:{f.name}" for f in reversed(picked))


def _alarm(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"took longer than {seconds} s (stopped in {_where(frame)})")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    return old


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def run_cell(name: str, method: str, *, onnx: bool = True, timeout: int = 600, workdir: str | Path | None = None,
             base: nn.Module | None = None) -> Cell:
    """Apply `method` to the zoo model `name` and check it (see the module docstring)."""
    cell = Cell(name, method)
    base = build(name) if base is None else base
    x, calib = example_inputs(name), calibration(name)
    reference = run(base, x)
    old = _alarm(timeout)
    try:
        try:
            t0 = time.perf_counter()
            new, messages = _quiet(lambda: _apply(method, base, x, calib))
            cell.seconds = time.perf_counter() - t0
            cell.warnings = messages
            out = run(new, x)
            cell.runs = True
            cell.output_drift = _max_abs(out, reference) / max(1.0, float(reference.abs().max()))
        except Exception as exc:  # noqa: BLE001 - a failing method is a finding, recorded in the cell
            cell.error = _one_line(exc)
            cell.warnings.append(traceback.format_exc(limit=-3))
            return cell
        _count(cell, base, new, method, messages)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            _roundtrip(cell, name, new, x, out, Path(tmp) / "artifact")
            if onnx:
                _onnx(cell, new, x, out, Path(tmp) / "model.onnx")
    except _Timeout as exc:
        cell.error = cell.error or str(exc)
        if cell.runs and cell.roundtrip is None:
            cell.roundtrip, cell.roundtrip_error = False, str(exc)
        elif cell.runs and onnx and cell.onnx is None:
            cell.onnx, cell.onnx_error = False, str(exc)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return cell


def _count(cell: Cell, base: nn.Module, new: nn.Module, method: str, messages: list[str]) -> None:
    own = own_coverage(base, new, method)
    cell.eligible, cell.done, cell.layers = own["eligible"], own["done"], own["layers"]
    cell.done_layers = len(own["done_layers"])
    cell.share = own["done"] / own["eligible"] if own["eligible"] else None
    lib = library_coverage(new) if method != "fuse_bn" else None
    if lib is not None and lib["method"] in ("fuse_ops",):
        lib = None
    if lib is not None:
        cell.library = {k: lib[k] for k in ("eligible", "done", "share")}
        diffs = []
        left, mine = set(own["left_layers"]), set(own["left_layers"]) | set(own["done_layers"])
        # Weight holders the record counts beyond this count's definition (an LSTM, Swin's relative
        # position bias table): reported, each with the record's reason, and left out of the comparison.
        beyond = {n: lib["skipped_weights"].get(n, 0) for n in lib["skipped"] if n not in mine}
        cell.beyond = {n: lib["skipped"][n] for n in beyond}
        # A layer both count may be counted with other tensors (a weight-normed conv: g and v, not the weight).
        recount = sum(w - own["weights"][n] for n, w in lib["skipped_weights"].items() if n in own["weights"])
        lib_eligible = lib["eligible"] - sum(beyond.values()) - recount
        if lib_eligible != own["eligible"]:
            diffs.append(f"eligible weights {own['eligible']:,} here, {lib_eligible:,} in the record"
                         + (f" (besides {', '.join(beyond)})" if beyond else ""))
        if lib["done"] != own["done"]:
            diffs.append(f"transformed weights {own['done']:,} here, {lib['done']:,} in the record")
        if (set(lib["skipped"]) & mine) - left:
            diffs.append(f"skipped in the record, transformed here: {', '.join(sorted((set(lib['skipped']) & mine) - left)[:4])}")
        if lib["done_layers"] is not None and set(lib["done_layers"]) & left:
            diffs.append(f"done in the record, unchanged here: {', '.join(sorted(set(lib['done_layers']) & left)[:4])}")
        cell.agreement = "; ".join(diffs) or None
        # The matrix shows the library's own record; the count here is the cross-check above.
        cell.own = {"eligible": own["eligible"], "done": own["done"], "share": cell.share}
        cell.eligible, cell.done, cell.share = lib["eligible"], lib["done"], lib["share"]
        cell.left.update(cell.beyond)
    # fuse_ops keeps no per-layer record: a warning that names no layer speaks for the whole model
    # ("torch.fx cannot trace ...; only layers inside nn.Sequential containers are fused").
    whole_model = ([m for m in messages if not any(_reason_for(n, [m]) for n in own["left_layers"] + own["done_layers"])]
                   if method == "fuse_bn" else [])
    for layer in own["left_layers"]:
        reason = lib["skipped"].get(layer) if lib is not None else None
        if reason is not None and reason.startswith("not selected ("):
            reason = _reason_for(layer, messages) or reason  # a warning naming the layer says more
        reason = reason or _reason_for(layer, messages) or ("; ".join(whole_model) if whole_model else None)
        if reason is None or (reason.startswith("not selected (") and method in TARGETED):
            cell.unexplained.append(layer)
        cell.left[layer] = reason or "no reason given"


def _roundtrip(cell: Cell, name: str, new: nn.Module, x: Any, out: torch.Tensor, path: Path) -> None:
    import shrinktunnel as st

    try:
        st.save(new, path)
        again = st.load(path, model=build(name))
        back = run(again, x)
        cell.roundtrip = bool(back.dtype == out.dtype and back.shape == out.shape and torch.equal(back, out))
        if not cell.roundtrip:
            cell.roundtrip_error = (f"outputs differ after st.load (max abs {_max_abs(back, out):.3g})"
                                    if back.shape == out.shape else f"shape {tuple(back.shape)} != {tuple(out.shape)}")
    except Exception as exc:  # noqa: BLE001
        cell.roundtrip, cell.roundtrip_error = False, _one_line(exc)


def _onnx(cell: Cell, new: nn.Module, x: Any, out: torch.Tensor, path: Path) -> None:
    import shrinktunnel as st
    from shrinktunnel.export.runtime import OrtModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st.export_onnx(copy.deepcopy(new), path, example_inputs=x)
        ort = OrtModel(path)
        got = ort(**x) if isinstance(x, dict) else ort(x)
        got = got[0] if isinstance(got, tuple) else got
        if got.shape != out.shape:
            cell.onnx, cell.onnx_error = False, f"ONNX Runtime's first output has shape {tuple(got.shape)}, PyTorch's {tuple(out.shape)}"
            return
        cell.onnx_max_abs = _max_abs(got, out)
        cell.onnx_rel = cell.onnx_max_abs / max(1.0, float(out.abs().max()))
        cell.onnx = cell.onnx_rel <= TOLERANCE[cell.method]
        if not cell.onnx:
            cell.onnx_error = (f"ONNX Runtime differs from PyTorch by {cell.onnx_max_abs:.3g} "
                               f"({cell.onnx_rel:.3g} of the output range; tolerance {TOLERANCE[cell.method]:g})")
    except Exception as exc:  # noqa: BLE001
        cell.onnx, cell.onnx_error = False, _one_line(exc)
