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

__all__ = ["Method", "Context", "register_method", "get_method", "method_for_config", "METHODS"]


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
class Method:
    name: str
    config_cls: type[Config]
    apply: Callable[[nn.Module, Config, Context], tuple[nn.Module, dict[str, Any]]]
    replay: Callable[[nn.Module, dict[str, Any]], nn.Module]
    summary: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type[Config], *, replay: Callable, summary: str = ""):
    """Decorator: `@register_method("quantize", QuantConfig, replay=replay_quantize)`. The stored
    replay first redoes the stage's canonical record (core/layers.py: the layers canonicalized before
    the method ran), then calls the method's own."""

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
        METHODS[name] = Method(name, config_cls, fn, replay_canonical, summary or (fn.__doc__ or "").split("\n")[0])
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


def _load_builtin_methods() -> None:
    # Importing a method's package registers its methods; done lazily to keep `import shrinktunnel` cheap.
    import importlib

    for package in BUILTIN_PACKAGES:
        importlib.import_module(f"shrinktunnel.{package}")


# Each package's __init__ imports the modules that register its methods.
BUILTIN_PACKAGES = ("quant", "prune", "cluster", "decompose", "distill", "fuse")
