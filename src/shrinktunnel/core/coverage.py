"""What each stage did to each weight layer, or why it did not: the coverage record.

Every stage runs on a canonicalized model (core/layers.py), so the eligible layers of every method
are the same: the canonical weight layers, plus the modules with a weight that no method can reach
(with the reason canonicalization gave). After the stage, a layer counts as done when the method
changed it (replaced it, rewrote its shape, or changed its values); a layer left as it was carries
the reason the method gave through `Context.skip`, or says it was not selected.

The record travels in the stage entry of the model's history (and so in the artifact's manifest),
compact because every artifact carries it (a search writes thousands):
    {"eligible_layers": int, "eligible_weights": int, "done_layers": int, "done_weights": int,
     "reasons": [str, ...], "skipped": {name: [reason index, weights]}}
Layers neither done nor in `skipped` were not selected (NOT_SELECTED). `measure_coverage` also
returns the full per-layer table in memory (`layers`), which is not stored. `stage_coverage(model)`
reads records back; `summary_line` prints one as the CLI, the report and `shrink inspect` show it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import eligible_layers

__all__ = ["StageCoverage", "measure_coverage", "stage_coverage", "summary_line", "coverage_lines", "NOT_SELECTED"]

NOT_SELECTED = "not selected (outside the stage's layers / skip patterns, or a layer kind the method leaves alone)"


@dataclass
class StageCoverage:
    """One stage's coverage: how many of the eligible weights it transformed, and why not the rest."""

    method: str
    eligible_layers: int
    eligible_weights: int
    done_layers: int
    done_weights: int
    skipped: dict[str, str] = field(default_factory=dict)  # {layer: reason}; the rest of the
    # eligible layers that are not done were not selected (NOT_SELECTED)

    @property
    def not_selected(self) -> int:
        return self.eligible_layers - self.done_layers - len(self.skipped)

    @property
    def share(self) -> float:
        return self.done_weights / self.eligible_weights if self.eligible_weights else 1.0


def _changed(before: nn.Module, after: nn.Module | None) -> bool:
    if after is None or type(after) is not type(before):
        return True
    wa, wb = getattr(after, "weight", None), getattr(before, "weight", None)
    if not isinstance(wa, torch.Tensor) or not isinstance(wb, torch.Tensor):
        return True
    return wa.shape != wb.shape or wa.dtype != wb.dtype or not torch.equal(wa.detach(), wb.detach())


def measure_coverage(before: nn.Module, after: nn.Module, unreachable: dict[str, str],
                     reasons: dict[str, str]) -> dict[str, Any]:
    """The coverage record of one stage: `before` is the canonicalized model the method received,
    `after` what it returned; `unreachable` {name: reason} from canonicalization (the layers the method
    reached after all are removed from it); `reasons` {name: reason} the method gave for layers it left alone."""
    after_modules = dict(after.named_modules())
    before_modules = dict(before.named_modules())
    # A layer left alone under one name has the reason given under another: the same module registered twice,
    # or a module sharing its weight (T5's `shared` and `encoder.embed_tokens`: two Embeddings, one table).
    aliases: dict[int, list[str]] = {}
    for alias, module in before.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(alias)
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor):
            aliases.setdefault(id(w), []).append(alias)
    layers: dict[str, dict[str, Any]] = {}
    for name, n in eligible_layers(before).items():
        done = _changed(before_modules[name], after_modules.get(name))
        module = before_modules[name]
        names = aliases.get(id(module), []) + aliases.get(id(module.weight), [])
        given = [reasons.get(a) or reasons.get(_logical(a)) for a in [name, *names]]
        reason = None if done else next((r for r in given if r), NOT_SELECTED)
        layers[name] = {"weights": n, "done": done, "reason": reason}
    for name, why in list(unreachable.items()):
        module = before_modules.get(name)
        # its matrices, as a Linear counts its weight and not its bias (an LSTM counted as prune sees it)
        n = sum(int(p.numel()) for p in module.parameters(recurse=False) if p.dim() >= 2) if module is not None else 0
        # A layer no method's layer can replace that the method still reached (a recurrent layer stored
        # weight-only: core/recurrent.py) is done, and leaves `unreachable` (no warning for it then).
        done = module is not None and type(after_modules.get(name)) is not type(module)
        if done:
            del unreachable[name]
            reasons.pop(name, None)  # a skip said on the way ("not a supported layer kind") no longer holds
        layers[name] = {"weights": n, "done": done, "reason": None if done else why}
    reasons: list[str] = []
    skipped: dict[str, list[int]] = {}
    for name, v in layers.items():
        if not v["done"] and v["reason"] != NOT_SELECTED:
            if v["reason"] not in reasons:
                reasons.append(v["reason"])
            skipped[name] = [reasons.index(v["reason"]), v["weights"]]
    record: dict[str, Any] = {
        "eligible_layers": len(layers), "eligible_weights": sum(v["weights"] for v in layers.values()),
        "done_layers": sum(1 for v in layers.values() if v["done"]),
        "done_weights": sum(v["weights"] for v in layers.values() if v["done"])}
    if skipped:  # omitted when empty: every artifact of a search carries this record
        record.update(reasons=reasons, skipped=skipped)
    return record


def _logical(name: str) -> str:
    from .layers import logical_name

    return logical_name(name)


def stage_coverage(model: nn.Module | list[dict[str, Any]]) -> list[StageCoverage]:
    """The coverage of every stage a model (or a loaded artifact) went through, in order; also takes
    a manifest's `stages` list. Stages written before coverage was recorded are left out."""
    from .history import stages

    out = []
    for stage in stages(model) if isinstance(model, nn.Module) else model:
        cov = stage.get("coverage") if isinstance(stage, dict) else None
        if not isinstance(cov, dict):
            continue
        reasons = cov.get("reasons", [])
        out.append(StageCoverage(
            method=stage["method"], eligible_layers=int(cov["eligible_layers"]),
            eligible_weights=int(cov["eligible_weights"]), done_layers=int(cov["done_layers"]),
            done_weights=int(cov["done_weights"]),
            skipped={n: reasons[int(v[0])] for n, v in cov.get("skipped", {}).items()},
        ))
    return out


def summary_line(cov: StageCoverage, shown: int = 3) -> str:
    """`quantize: 48 of 49 layers (99.8 % of weights); 1 left: <reason> (a)` on one line."""
    text = f"{cov.method}: {cov.done_layers} of {cov.eligible_layers} layers ({100 * cov.share:.1f} % of weights)"
    by_reason: dict[str, list[str]] = {}
    for name, reason in cov.skipped.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        listed = ", ".join(names[:shown]) + (f", +{len(names) - shown} more" if len(names) > shown else "")
        parts.append(f"{len(names)} {reason} ({listed})")
    if cov.not_selected:
        parts.append(f"{cov.not_selected} not selected")
    return text + ("; left: " + "; ".join(parts) if parts else "")


def coverage_lines(model: nn.Module | list[dict[str, Any]]) -> list[str]:
    """One `summary_line` per recorded stage; a malformed record (an edited manifest) is said, not raised."""
    try:
        return [summary_line(c) for c in stage_coverage(model)]
    except (KeyError, TypeError, ValueError, IndexError):
        return ["coverage: the manifest's coverage record is malformed"]
