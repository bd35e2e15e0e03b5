"""Candidate actions: one compression step applied to ONE layer, through a registered method.

An action is plain data plus a function that writes the stage config for a layer name:
`Action("quant4", "quantize", config_for_layer)`, where `config_for_layer("fc1")` returns the config
`run_stage(model, "quantize", config, ctx)` takes. Analysis and search never call a method directly,
and never name one: each method declares its actions when it registers (`register_method(...,
search=SearchHooks(actions=(SearchAction("quant4", {...}), ...)))`, core/registry.py), and ACTIONS is
read from the registry, so a method registered tomorrow is searchable without touching search/. The
one thing defined here is the search's own composition: chains of two methods' actions on one layer
(Deep Compression's prune, then share), built when both actions exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..core.registry import METHODS, SearchAction, searchable_methods
from ..errors import ConfigError

__all__ = ["Action", "ACTIONS", "DEFAULT_ACTIONS", "CHAINS", "resolve_actions", "chain", "from_search_action"]


@dataclass(frozen=True)
class Action:
    """One candidate step for one layer: `method` is a registered method name, and
    `config_for_layer(layer_name)` returns that method's stage config restricted to the layer."""

    name: str  # short and unique: a column of the sensitivity table and a key of the cache
    method: str
    config_for_layer: Callable[[str], dict[str, Any]]
    family: str = ""  # "quantize", "prune", "decompose", "share": groups actions of one kind
    level: float = 0.0  # strength within the family (bits kept, fraction removed...): ordering only
    speed: float = 1.0  # predicted time of the changed layer per MAC, relative to float (auto's latency
    # objective; the chosen model's real latency is measured in ONNX Runtime)
    steps: tuple["Action", ...] = ()  # a chain: these actions applied in order to the same layer

    def config(self, layer: str) -> dict[str, Any]:
        return self.config_for_layer(layer)

    def stages(self, layers: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """(method, stage config) pairs that apply this action to `layers`, in order."""
        if self.steps:
            return [stage for step in self.steps for stage in step.stages(layers)]
        return [(self.method, self.config_for_layers(layers))]

    def config_for_layers(self, layers: Sequence[str]) -> dict[str, Any]:
        """The same stage for several layers at once: the first layer's config with `layers` set to
        all of them (every built-in action selects its layer through the method's `layers` key)."""
        config = dict(self.config_for_layer(layers[0]))
        if "layers" not in config:
            raise ConfigError(f"action {self.name!r} writes no 'layers' key, so it cannot be applied to several "
                              f"layers in one stage; give its config a 'layers' list")
        config["layers"] = list(layers)
        return config


def from_search_action(method: str, spec: SearchAction, family: str) -> Action:
    """The search's Action for one action a method declared."""
    return Action(spec.name, method, spec.config_for_layer, family, spec.level, spec.speed)


def chain(name: str, *steps: Action) -> Action:
    """Several actions applied in order to the same layer (Deep Compression: prune, then share)."""

    def config(layer: str) -> dict[str, Any]:
        return {"stages": [[s.method, s.config(layer)] for s in steps]}

    return Action(name, "+".join(s.method for s in steps), config, steps[0].family, steps[0].level, steps=tuple(steps))


# The search's compositions: (name, actions applied in order), in the default set when every step exists.
CHAINS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prune50+share4", ("prune50", "share4")),
    ("prune75+share4", ("prune75", "share4")),
    ("prune75+share2", ("prune75", "share2")),
    ("prune90+share2", ("prune90", "share2")),
    ("prune95+share2", ("prune95", "share2")),  # Deep Compression kept 8 % of LeNet-5's fc1
)


def _build() -> tuple[dict[str, Action], list[Action]]:
    """Every action the registered methods declare (and the chains over them): by name, and the default set."""
    by_name: dict[str, Action] = {}
    default: list[Action] = []
    for method in searchable_methods():
        hooks = method.search
        for spec in hooks.actions:
            if spec.name in by_name:
                raise ConfigError(f"action {spec.name!r} is declared by methods {by_name[spec.name].method!r} and "
                                  f"{method.name!r}; action names must be unique")
            by_name[spec.name] = from_search_action(method.name, spec, hooks.family)
            if spec.default:
                default.append(by_name[spec.name])
    for name, parts in CHAINS:
        if all(p in by_name for p in parts):
            by_name[name] = chain(name, *(by_name[p] for p in parts))
            default.append(by_name[name])
    return by_name, default


class _Registered(Mapping):
    """ACTIONS: read from the registry when first used (and again after a method registers)."""

    def __init__(self) -> None:
        self._seen: tuple = ()
        self._by_name: dict[str, Action] = {}
        self._default: list[Action] = []

    def _fresh(self) -> None:
        seen = tuple((m.name, id(m.search)) for m in searchable_methods())
        if self._seen != seen:
            self._by_name, self._default = _build()
            self._seen = seen

    def __getitem__(self, name: str) -> Action:
        self._fresh()
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        self._fresh()
        return iter(self._by_name)

    def __len__(self) -> int:
        self._fresh()
        return len(self._by_name)

    def default(self) -> list[Action]:
        self._fresh()
        return list(self._default)


class _Default(SequenceABC):
    """DEFAULT_ACTIONS: the actions every registered method declares as default, then the chains."""

    def __getitem__(self, i):
        return ACTIONS.default()[i]

    def __len__(self) -> int:
        return len(ACTIONS.default())


ACTIONS: _Registered = _Registered()
DEFAULT_ACTIONS: Sequence[Action] = _Default()


def resolve_actions(actions: Iterable[Action | str] | None) -> tuple[list[Action], list[str]]:
    """The actions to run and notes on those skipped. `None`: every default action whose method is
    registered; names are looked up in ACTIONS; an Action is taken as given. A name that is unknown,
    or a duplicate name, is a ConfigError."""
    requested: Sequence[Action | str] = list(ACTIONS.default() if actions is None else actions)
    chosen: list[Action] = []
    notes: list[str] = []
    for item in requested:
        if isinstance(item, str):
            if item not in ACTIONS:
                raise ConfigError(f"unknown action {item!r}; known actions: {', '.join(ACTIONS)} "
                                  f"(or pass shrinktunnel.search.Action objects)")
            item = ACTIONS[item]
        if not isinstance(item, Action):
            raise ConfigError(f"an action must be a name or a shrinktunnel.search.Action, got {type(item).__name__}: {item!r}")
        if any(a.name == item.name for a in chosen):
            raise ConfigError(f"action {item.name!r} is given twice; each action name must be unique")
        note = _check(item)
        if note:
            notes.append(f"{item.name}: skipped, {note}")
            continue
        chosen.append(item)
    if not chosen:
        raise ConfigError("no action left to run: every requested action's method is unregistered ("
                          + "; ".join(notes) + ")")
    return chosen, notes


def _check(action: Action) -> str:
    """Why the action cannot run now ("" when it can): a method not registered, or a config it rejects."""
    for step in action.steps or (action,):
        if step.method not in METHODS:
            return f"method {step.method!r} is not registered yet (registered: {', '.join(sorted(METHODS))})"
    try:
        stages = [(step.method, step.config("layer")) for step in action.steps or (action,)]
    except ConfigError as exc:
        return str(exc)
    for method, config in stages:
        try:  # a config the method rejects is skipped with its reason, before any evaluation
            METHODS[method].config_cls.parse(config)
        except ConfigError as exc:
            return f"method {method!r} rejects its config: {exc}"
    return ""
