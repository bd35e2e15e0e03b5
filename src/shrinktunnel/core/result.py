"""One result type for a whole tunnel."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .artifact import build_manifest, save_artifact

__all__ = ["Result"]


@dataclass
class Result:
    """What `st.compress` returns: the compressed model, its measured metrics, and the warnings of
    everything that was skipped. `manifest` is what `save` writes beside the tensors."""

    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> list:
        """What each stage did to the weight layers (core/coverage.StageCoverage, one per stage)."""
        from .coverage import stage_coverage

        return stage_coverage(self.model)

    @property
    def manifest(self) -> dict[str, Any]:
        return build_manifest(self.model, self.metrics, self.warnings)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the artifact directory atomically (see docs/artifact-format.md); an existing artifact
        at `path` is replaced only with `overwrite=True`."""
        return save_artifact(self.model, path, metrics=self.metrics, warnings=self.warnings, overwrite=overwrite)
