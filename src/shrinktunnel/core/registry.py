"""The method registry: a method is a config class plus two plain functions.

- `apply(model, config, ctx) -> (new_model, replay)`: compresses a copy of `model`; `replay` is
  JSON-ready data that lets `replay_fn` rebuild the compressed structure from the original one.
- `replay(model, replay) -> model`: rebuilds the structure (shapes and dtypes, not values) in place,
  so that `st.load` can then fill it from safetensors. Values never travel through the manifest
  except small scalars a method chooses to keep there (documented in docs/artifact-format.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from .config import Config

__all__ = ["Method", "Context", "register_method", "get_method", "method_for_config", "METHODS", "SearchAction",
           "SearchHooks", "merge_overrides", "merge_rules", "searchable_methods"]


@dataclass
class Context:
    """Live objects a stage may need; never part of a config."""

    data: Any = None  # calibration / fine-tuning batches
    example_inputs: Any = None
    eval_fn: Callable[[nn.Module], float] | None = None
    progress: bool = True
    original: nn.Module | None = None  # the model before the first stage (a distillation teacher)
    train_step: Callable[[nn.Module, Any], None] | None = None  # the caller's own training step(model, batch),
    # run instead of the built-in loop by methods that fine-tune
    loss_fn: Callable[[nn.Module, Any], Any] | None = None  # the built-in loop's loss(model, batch) -> tensor
    warnings: list[str] = field(default_factory=list)  # things skipped, shown in the report
    skipped: dict[str, str] = field(default_factory=dict)  # {layer: reason} of the running stage (core/coverage)

    def warn(self, message: str) -> None:
        import warnings

        self.warnings.append(message)
        warnings.warn(message, stacklevel=3)

    def skip(self, layer: str, reason: str) -> None:
        """A layer the running stage leaves as it is, and why. Recorded in the stage's coverage and
        warned once per reason when the stage ends (`flush_skips`), not once per layer."""
        self.skipped.setdefault(layer, reason)

    def flush_skips(self, method: str, shown: int = 4) -> None:
        """One warning per distinct reason of the stage that just ran; clears the record."""
        by_reason: dict[str, list[str]] = {}
        for layer, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(layer)
        for reason, layers in by_reason.items():
            listed = ", ".join(layers[:shown]) + (f" and {len(layers) - shown} more" if len(layers) > shown else "")
            self.warn(f"{method}: {listed}: {reason}")
        self.skipped = {}


@dataclass(frozen=True)
class SearchAction:
    """One action a method offers the search (`shrink analyze` / `shrink auto`): its stage config for
    ONE layer. The string "{layer}" anywhere in `config` stands for the layer's name; a config without
    it gets `layers: [layer]`."""

    name: str  # short and unique across methods: a column of the sensitivity table, a key of the cache
    config: dict[str, Any]
    level: float = 0.0  # strength within the family (bits kept, fraction removed): ordering only
    speed: float = 1.0  # predicted time per MAC of the changed layer relative to float (latency objective)
    default: bool = True  # in the default action set; False: used when asked for by name

    def config_for_layer(self, layer: str) -> dict[str, Any]:
        import copy

        def fill(v: Any) -> Any:
            if isinstance(v, str):
                return v.replace("{layer}", layer)
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            if isinstance(v, list):
                return [fill(x) for x in v]
            return v

        config = fill(copy.deepcopy(self.config))
        if "{layer}" not in repr(self.config):
            config["layers"] = [layer]
        return config


@dataclass(frozen=True)
class SearchHooks:
    """What the search needs to know of a method, declared when it registers: its actions, where its
    stages go in a plan, how several layers' steps become one stage, and its recovery."""

    family: str  # actions of one kind ("quantize", "share"...): a plan's stages are grouped by family
    order: int  # position of the family's stages in a plan, lowest first: structure before precision
    actions: tuple[SearchAction, ...] = ()
    structural: bool = False  # changes what the weights can express: distillation recovers it (with recovery)
    merge: Callable[[list[tuple[str, dict[str, Any]]]], dict[str, Any]] | None = None  # the (layer, config)
    # steps of several layers -> ONE stage config (per-layer overrides); None: one stage per distinct config
    recover: Callable[[dict[str, Any], Any], tuple[str, dict[str, Any]]] | None = None  # (stage config,
    # RecoveryConfig) -> (method, config) run instead when the search recovers: e.g. centroid tuning, QAT
    recovers_structure: bool = False  # the recovered stage trains the whole model on the distillation loss,
    # so it is the recovery of the structure before it (no separate distillation stage)


@dataclass(frozen=True)
class ReportSection:
    """A figure a method adds to `st.compress`'s metrics of the compressed model: `metrics["after"][key]
    = build(model)` when `build` returns something (cluster: bits per weight per layer beside each
    stream's entropy)."""

    key: str
    build: Callable[[nn.Module], Any]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[Config]
    apply: Callable[[nn.Module, Config, Context], tuple[nn.Module, dict[str, Any]]]
    replay: Callable[[nn.Module, dict[str, Any]], nn.Module]
    summary: str = ""
    search: SearchHooks | None = None  # None: the search never proposes this method
    report: ReportSection | None = None
    recurrent: bool = False  # takes LSTM / GRU matrices as Linears it never calls (core/recurrent.RecurrentLinears)


METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type[Config], *, replay: Callable, summary: str = "",
                    search: SearchHooks | None = None, report: ReportSection | None = None, recurrent: bool = False):
    """Decorator: `@register_method("quantize", QuantConfig, replay=replay_quantize)`. The stored
    replay first redoes the stage's canonical record (core/layers.py: the layers canonicalized before
    the method ran), then calls the method's own. `search`: the method's actions and plan rules, which
    make it searchable by `st.analyze` / `st.auto` without touching search/; `report`: a section of
    the compressed model's metrics. Custom operators a method's layers call at export declare their
    ONNX with `register_onnx_translations`. `recurrent=True`: the method transforms a Linear by its weight
    alone (it never needs the layer called), so recurrent layers reach it as Linears (core/recurrent.py)."""

    def replay_canonical(model: nn.Module, record: dict[str, Any]) -> nn.Module:
        from .layers import restore

        restore(model, record.get("canonical"))
        return replay(model, record)

    def wrap(fn: Callable) -> Callable:
        import inspect

        if name in METHODS and METHODS[name].apply is not fn:
            raise ConfigError(f"register_method: a method named {name!r} is registered already "
                              f"({METHODS[name].apply.__module__}); choose another name")
        for what, f, arity in (("apply", fn, 3), ("replay", replay, 2)):
            try:
                inspect.signature(f).bind(*range(arity))
            except TypeError:
                raise ConfigError(f"register_method({name!r}): {what} must take {arity} positional arguments "
                                  f"({'model, config, ctx' if arity == 3 else 'model, replay'}), got {inspect.signature(f)}") from None
        if search is not None and not isinstance(search, SearchHooks):
            raise ConfigError(f"register_method({name!r}): search= must be a SearchHooks, got {type(search).__name__}")
        if report is not None and not isinstance(report, ReportSection):
            raise ConfigError(f"register_method({name!r}): report= must be a ReportSection, got {type(report).__name__}")
        METHODS[name] = Method(name, config_cls, fn, replay_canonical, summary or (fn.__doc__ or "").split("\n")[0],
                               search, report, recurrent)
        return fn

    return wrap


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}"
        ) from None


def method_for_config(config: Config) -> Method:
    _load_builtin_methods()
    for method in METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise ConfigError(f"no method takes a {type(config).__name__}; pass one of the method configs")


def searchable_methods() -> list[Method]:
    """The registered methods that declare search hooks, builtin ones loaded first, in registration order."""
    _load_builtin_methods()
    return [m for m in METHODS.values() if m.search is not None]


def report_sections() -> list[ReportSection]:
    """The report sections the registered methods declare, builtin ones loaded first."""
    _load_builtin_methods()
    return [m.report for m in METHODS.values() if m.report is not None]


ONNX_TRANSLATIONS: list[Callable[[], dict]] = []


def register_onnx_translations(provider: Callable[[], dict]) -> Callable[[], dict]:
    """Decorator for a method package's `provider() -> {torch custom op: onnxscript function}`: how
    the exporter writes the custom operators its layers call (called at export time only, so onnxscript
    is imported then). export/ reads them all here and knows no method by name."""
    if provider not in ONNX_TRANSLATIONS:
        ONNX_TRANSLATIONS.append(provider)
    return provider


def onnx_translations() -> dict:
    """Every registered method package's ONNX translations, merged (builtin packages loaded first)."""
    _load_builtin_methods()
    table: dict = {}
    for provider in ONNX_TRANSLATIONS:
        table.update(provider())
    return table


def merge_overrides(key: str, value_key: str, base: dict[str, Any] | None = None) -> Callable:
    """A merge rule: one stage for several layers whose configs differ only in `value_key`, written
    as per-layer `key` entries `{pattern: layer, value_key: value}` (prune's and cluster's overrides)."""

    def merge(items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        config = {k: v for k, v in items[0][1].items() if k not in ("layers", key)}
        config["layers"] = [layer for layer, _ in items]
        config[key] = [{"pattern": layer, value_key: c[value_key]} for layer, c in items]
        return {**config, **(base or {})}

    return merge


def merge_rules(items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A merge rule: one stage whose `rules` list holds every layer's rules (prune_channels)."""
    config = {k: v for k, v in items[0][1].items() if k != "rules"}
    config["rules"] = [rule for _, c in items for rule in c.get("rules", [])]
    return config


def _load_builtin_methods() -> None:
    # Importing a method's package registers its methods; done lazily to keep `import shrinktunnel` cheap.
    import importlib

    for package in BUILTIN_PACKAGES:
        importlib.import_module(f"shrinktunnel.{package}")


# Each package's __init__ imports the modules that register its methods.
BUILTIN_PACKAGES = ("quant", "pruning", "clustering", "decomposition", "distillation", "fusion")
