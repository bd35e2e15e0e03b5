"""A resumable training checkpoint: safetensors for tensors, JSON for the rest, never pickle.

```
DIR/
  state.json            format, step, fingerprint, evaluations, losses, optimiser scalars
  student.safetensors   the student's state dict; the hint adapters under `__hint_adapters__.<i>.`
  optimizer.safetensors the optimiser's per-parameter tensors as `<param index>.<key>`, and `rng.torch`
  best.safetensors      the best student so far (only when evaluation found one)
```
Written atomically (core.atomic): an interrupted write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.atomic import atomic_dir
from ..core.jsonio import write_json
from ..errors import ArtifactError

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT"]

FORMAT = "shrinktunnel-distill-checkpoint"
VERSION = 1


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: tied weights share storage, which safetensors refuses; a checkpoint may store them twice
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, *, student: nn.Module, adapters: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], best: dict[str, torch.Tensor] | None) -> None:
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    with atomic_dir(path) as tmp:
        weights = {**student.state_dict(), **{f"__hint_adapters__.{k}": v for k, v in adapters.state_dict().items()}}
        save_file(_contiguous(weights), str(tmp / "student.safetensors"))
        save_file(_contiguous(tensors), str(tmp / "optimizer.safetensors"))
        if best is not None:
            save_file(_contiguous(best), str(tmp / "best.safetensors"))
        write_json(tmp / "state.json", {"format": FORMAT, "version": VERSION, **state,
                                        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}})


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at `path` as {"state", "student", "adapters", "optimizer", "rng", "best"}, or None
    when there is none yet. ArtifactError when it is unreadable."""
    root = Path(path)
    if not (root / "state.json").is_file():
        if root.exists() and any(root.iterdir()):
            raise ArtifactError(f"checkpoint directory {str(root)!r} is not empty and holds no state.json; "
                                "choose an empty or new directory for the checkpoint")
        return None
    try:
        state = json.loads((root / "state.json").read_text())
        weights = load_file(str(root / "student.safetensors"))
        opt_tensors = load_file(str(root / "optimizer.safetensors"))
        best = load_file(str(root / "best.safetensors")) if (root / "best.safetensors").is_file() else None
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ArtifactError(f"cannot read the checkpoint at {str(root)!r} ({exc}); delete it to start over") from None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ArtifactError(f"{str(root)!r} is not a version-{VERSION} distillation checkpoint; delete it to start over")
    per_param: dict[int, dict[str, Any]] = {}
    rng = opt_tensors.pop("rng.torch", None)
    for name, value in opt_tensors.items():
        idx, key = name.split(".", 1)
        per_param.setdefault(int(idx), {})[key] = value
    for idx, extra in state["optimizer"]["scalars"].items():
        per_param.setdefault(int(idx), {}).update(extra)
    optimizer = {"state": per_param, "param_groups": state["optimizer"]["param_groups"]}
    student = {k: v for k, v in weights.items() if not k.startswith("__hint_adapters__.")}
    adapters = {k.removeprefix("__hint_adapters__."): v for k, v in weights.items() if k.startswith("__hint_adapters__.")}
    return {"state": state, "student": student, "adapters": adapters, "optimizer": optimizer, "rng": rng, "best": best}
