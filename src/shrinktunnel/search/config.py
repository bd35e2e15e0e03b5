"""`AutoConfig`: every setting of `st.auto` / `shrink auto` as plain, validated data.

One config instead of 25 keyword arguments: `st.auto(model, data, AutoConfig(max_drop=0.005))`,
`st.auto(model, data, "auto.yaml")`, or the old keyword form `st.auto(model, data, max_drop=0.005,
workers=2)` (keywords override the config's fields). Live objects (the model, data, eval_fn,
verify_fn, train_data, Action objects) stay arguments. Unknown keys fail naming the allowed ones,
as in every recipe; `shrink auto --config FILE` reads the same YAML, and flags override it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from ..core.config import Config, StrEnum
from ..errors import ConfigError
from .plan import RecoveryConfig

__all__ = ["AutoConfig", "AnalyzeConfig", "ParallelConfig", "analyze_config", "Objective", "Backend", "parse_duration", "auto_config"]


class Objective(StrEnum):
    SIZE = "size"  # bytes of the artifact on disk
    LATENCY = "latency"  # ONNX Runtime time of the profiling batch, measured for every candidate
    MACS = "macs"  # multiply-accumulates per sample (FlopCounterMode)


class Backend(StrEnum):
    PROCESS = "process"  # forked local processes: the model, data and eval_fn are inherited, never pickled
    RAY = "ray"  # a Ray cluster (pip install 'shrinktunnel[ray]'); the user's own modules travel by value


class ParallelConfig(Config):
    """Where candidate evaluations run; the result does not depend on it (rounds of fixed size)."""

    workers: int = Field(default=1, ge=1)  # evaluations side by side; 1: one at a time in this process
    backend: Backend = Backend.PROCESS  # process: local forks; ray: a Ray cluster
    ray_address: str | None = None  # Ray only: "auto" or "ray://host:10001" joins a running cluster;
    # None starts a local one with `workers` CPUs

    @model_validator(mode="after")
    def _address_needs_ray(self) -> "ParallelConfig":
        if self.ray_address is not None and self.backend != Backend.RAY:
            raise ValueError(f"ray_address={self.ray_address!r} is given with backend {self.backend.value!r}; "
                             f"set backend: ray (--backend ray) or drop the address")
        return self


_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from 600, '600s', '10m', '1.5h' or '1h30m'; ConfigError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*(\d+(\.\d+)?\s*(s|sec|m|min|h)?\s*)+", value.strip() or "x"):
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(sec|min|s|m|h)?", value)
        seconds = sum(float(n) * _UNITS[u or ""] for n, u in parts)
    else:
        raise ConfigError(f"time budget {value!r} is not a duration; write seconds (600) or '90s', '10m', '1h30m'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time budget {value!r} must be more than 0 seconds")
    return seconds


class AutoConfig(Config):
    """The budgeted search: one action per layer under `max_drop`, least `objective`."""

    max_drop: float = Field(ge=0, allow_inf_nan=False)  # the most the metric may fall below the original's, in
    # its units (0.005: half a point of accuracy in [0, 1]); no default: only the user knows their budget
    objective: Objective = Objective.SIZE  # what is least among the candidates that fit
    min_speedup: float | None = Field(default=None, gt=0)  # size / macs only: a candidate fits only when ONNX
    # Runtime runs it at least this many times faster than the original (every candidate is timed)
    max_bytes: int | None = Field(default=None, gt=0)  # latency / macs only: a candidate fits only when its
    # artifact is at most this many bytes (the fastest model under a size cap)
    margin: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # candidates fit at max_drop - margin, on the
    # search data and the held-out check alike
    max_evaluations: int = Field(default=12, ge=0, le=10_000)  # real candidate evaluations after the analysis
    time_budget: float | None = None  # seconds (or '10m', '1h'); the search stops starting rounds when the
    # next one would end past it (the held-out and runtime checks come after); None: max_evaluations only
    actions: list[str] | None = None  # action names (shrinktunnel.search.ACTIONS); None: every default one
    layers: list[str] = ["*"]  # glob patterns of the layers the search may change
    skip: list[str] = []  # glob patterns it leaves alone
    recovery: RecoveryConfig | None = None  # training after the lossy actions (needs data to train on); None:
    # every action one shot
    verify_runtime: bool = True  # the chosen model is exported and scored in the runtime too
    runtime: str = "ort"  # where candidates are timed and the chosen one checked, in a default session:
    # ort (ONNX Runtime) | openvino (the ONNX file) | executorch (a .pte program, XNNPACK); its package must import
    threads: int = Field(default=2, ge=1)  # intra-op threads (latency, and split between local workers)
    probes: int = Field(default=4, ge=1)  # candidates per round: fixed, so the result does not depend on workers
    max_verifications: int = Field(default=6, ge=1)  # fitting candidates checked held out / in ONNX Runtime
    uniform: bool = True  # first round: each action on every layer (the single-method plans to beat)
    seed: int = 0  # every candidate is seeded from it and its plan: same seed, same result
    cache_dir: str | None = None  # evaluations stored there (resume, reuse); None: no cache
    progress: bool = True  # progress bars and the per-round line on stderr
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "max_drop" not in data:
                raise ValueError("max_drop is missing: give the largest metric drop allowed (--max-drop 0.5pt, or "
                                 "max_drop: 0.005 in the config)")
            objective = data.get("objective", "size")
            if not isinstance(objective, Objective) and objective not in [o.value for o in Objective]:
                raise ValueError(f"unknown objective {objective!r}; use one of: size, latency, macs (size: bytes on "
                                 f"disk, latency: ONNX Runtime time, macs: multiply-accumulates)")
        return data

    @field_validator("runtime")
    @classmethod
    def _runtime_installed(cls, v: str) -> str:
        from ..export.packages import RUNTIMES, RuntimeMissingError, require

        if v not in RUNTIMES:
            raise ValueError(f"unknown runtime {v!r}; use one of: {', '.join(RUNTIMES)}")
        try:
            require(v)
        except RuntimeMissingError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)

    @model_validator(mode="after")
    def _consistent(self) -> "AutoConfig":
        if self.margin > self.max_drop:
            raise ValueError(f"margin={self.margin} is above max_drop={self.max_drop}: a candidate fits when its drop "
                             f"is <= max_drop - margin; use a margin below max_drop")
        if self.min_speedup is not None and self.objective == Objective.LATENCY:
            raise ValueError("min_speedup (--min-speedup) asks for the smallest model at least that much faster: use it "
                             "with objective size or macs; with objective latency bound the size with max_bytes instead")
        if self.max_bytes is not None and self.objective == Objective.SIZE:
            raise ValueError("max_bytes (--max-bytes) caps the size while another objective is least: use it with "
                             "objective latency or macs; with objective size lower max_drop or use min_speedup")
        return self


class AnalyzeConfig(Config):
    """Every setting of `st.analyze` / `shrink analyze`: which layers, how each evaluation runs, where it is cached."""

    layers: list[str] = ["*"]  # glob patterns of the layers measured
    skip: list[str] = []  # glob patterns left out
    threads: int = Field(default=2, ge=1)  # intra-op threads (latency, and split between local workers)
    latency_runs: int = Field(default=10, ge=1)  # timed runs per layer profile
    recovery: RecoveryConfig | None = None  # structural actions scored after a short recovery (on train_data)
    seed: int = 0  # every evaluation is seeded from it: same seed, same figures
    cache_dir: str | None = None  # evaluations stored there (resume, reuse); None: no cache
    progress: bool = True
    parallel: ParallelConfig = ParallelConfig()


_PARALLEL_KEYS = ("workers", "backend", "ray_address")


def analyze_config(config: "AnalyzeConfig | dict | None", overrides: dict[str, Any]) -> AnalyzeConfig:
    """One AnalyzeConfig from a config and keyword overrides (`workers`, `backend`, `ray_address` go into `parallel`)."""
    return _settings(AnalyzeConfig, config, overrides)


def auto_config(config: "AutoConfig | dict | str | Path | None", overrides: dict[str, Any]) -> AutoConfig:
    """One AutoConfig from a config (instance, dict, or YAML / JSON file) and keyword overrides (the
    old keyword form: `workers`, `backend`, `ray_address` go into `parallel`)."""
    return _settings(AutoConfig, config, overrides)


def _settings(cls: type, config: Any, overrides: dict[str, Any]) -> Any:
    name = cls.__name__
    if isinstance(config, (str, Path)):
        config = _read(Path(config))
    if isinstance(config, cls):
        base = config.model_dump()
    elif config is None or isinstance(config, dict):
        base = dict(config or {})
    else:
        raise ConfigError(f"config must be an {name}, a dict or a YAML file path, got {type(config).__name__}")
    overrides = dict(overrides)
    parallel = {k: overrides.pop(k) for k in _PARALLEL_KEYS if k in overrides}
    if "recovery" in overrides and isinstance(overrides["recovery"], RecoveryConfig):
        overrides["recovery"] = overrides["recovery"].model_dump()
    if "cache_dir" in overrides and overrides["cache_dir"] is not None:
        overrides["cache_dir"] = str(overrides["cache_dir"])
    for key in ("layers", "skip", "actions"):
        if isinstance(overrides.get(key), tuple):
            overrides[key] = list(overrides[key])
    merged = {**base, **overrides}
    if parallel:
        merged["parallel"] = {**dict(merged.get("parallel") or {}), **parallel}
    return cls.parse(merged)


def _read(path: Path) -> dict[str, Any]:
    import json

    import yaml

    if not path.is_file():
        raise ConfigError(f"auto config {path} does not exist; pass a YAML file of AutoConfig keys "
                          f"(e.g. 'max_drop: 0.005') or drop --config")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"auto config {path} could not be read: {str(exc).splitlines()[0]}; write it as YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"auto config {path} must be a mapping of AutoConfig keys, got {type(data).__name__}")
    return data
