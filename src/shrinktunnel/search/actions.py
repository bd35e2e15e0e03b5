"""Candidate actions: one compression step applied to ONE layer, through a registered method.

An action is plain data plus a function that writes the stage config for a layer name:
`Action("quant4", "quantize", config_for_layer)`, where `config_for_layer("fc1")` returns the config
`run_stage(model, "quantize", config, ctx)` takes. Analysis and search never call a method directly:
they go through the registry, so a method registered tomorrow becomes searchable by adding its
actions here (or passing them in), and an action whose method is not registered yet is skipped with a
note naming the method.

The config keys of the methods other engineers are building (prune, cluster, decompose) are written
here against their issue's config names; if a method's config differs, the action fails to parse and
is skipped with the ConfigError's message (never silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..core.registry import METHODS, _load_builtin_methods
from ..errors import ConfigError

__all__ = ["Action", "ACTIONS", "DEFAULT_ACTIONS", "resolve_actions", "quantize_action", "gptq_action"]


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


def _coded(weights: dict[str, Any], huffman: bool) -> dict[str, Any]:
    return {**weights, "coding": "huffman"} if huffman else weights


def quantize_action(bits: int, huffman: bool = False) -> Action:
    """Weight-only quantization of one layer to `bits` (symmetric, one scale per output channel):
    the weights carry the size; activation formats are a separate, later choice of the search.
    `huffman`: the integers Huffman-coded in the artifact (name suffix "h"): the same model, fewer
    bytes (about 3.1 bits per weight at 4 bits, 5.2 at 6 on a transformer), decoded once at load."""

    def config(layer: str) -> dict[str, Any]:
        return {"weights": _coded({"bits": bits, "granularity": "per_channel", "symmetric": True}, huffman),
                "activations": None, "layers": [layer]}

    return Action(f"quant{bits}" + ("h" if huffman else ""), "quantize", config, "quantize", float(bits))


def gptq_action(bits: int, huffman: bool = False) -> Action:
    """Weight-only quantization of one Linear to `bits` per output channel, rounded by GPTQ (later input
    columns absorb earlier rounding errors, from the layer's input Hessian on the data): the same bytes
    as `quant{bits}` (no extra scales), less damage at 4 bits and below on transformers. Embeddings
    and convolutions are rounded to nearest by quantize (it warns), so there it equals quant{bits}."""

    def config(layer: str) -> dict[str, Any]:
        return {"weights": _coded({"bits": bits, "granularity": "per_channel", "symmetric": True}, huffman),
                "activations": None, "rounding": "gptq", "layers": [layer]}

    return Action(f"gptq{bits}" + ("h" if huffman else ""), "quantize", config, "quantize", float(bits))


def prune_action(percent: int) -> Action:
    """Unstructured magnitude pruning of one layer, one shot (no fine-tuning)."""

    def config(layer: str) -> dict[str, Any]:
        return {"sparsity": percent / 100, "layers": [layer]}

    return Action(f"prune{percent}", "prune", config, "prune", percent / 100)


def decompose_action(denominator: int) -> Action:
    """Low-rank factors holding 1/denominator of the layer's weights (DecomposeConfig.ratio: the
    largest rank that fits). Kept even where the factors run slower: the analysis measures the
    action itself; the search weighs latency separately."""

    def config(layer: str) -> dict[str, Any]:
        return {"ratio": 1 / denominator, "layers": [layer], "keep_if_slower": False}

    return Action(f"lowrank1/{denominator}", "decompose", config, "decompose", 1 / denominator)


def share_action(bits: int) -> Action:
    """Weight sharing: a codebook of 2^bits centroids for the layer."""

    def config(layer: str) -> dict[str, Any]:
        return {"bits": bits, "layers": [layer]}

    return Action(f"share{bits}", "cluster", config, "share", float(bits))


def channels_action(percent: int, round_to: int = 8) -> Action:
    """Structured pruning of the channel group whose root is the layer (its output channels, and the
    inputs of every layer reading them): the layers are rewritten smaller, so dense kernels do less
    work. A group whose channels reach the model's output is left whole (the method warns: skipped).
    round_to 8: kept counts stay multiples of 8, the channel block ONNX Runtime's NCHWc convs use."""

    def config(layer: str) -> dict[str, Any]:
        return {"ratio": 0.0, "rules": [{"pattern": layer, "ratio": percent / 100}], "round_to": round_to}

    return Action(f"chan{percent}", "prune_channels", config, "channels", percent / 100)


def static_int8_action() -> Action:
    """W8A8: int8 weights and calibrated uint8 activations, the form ONNX Runtime runs on integer
    kernels (QLinearConv / QGemm). Predicted speed 1.0 (no gain): measured on the MNIST CNN at batch 64,
    2 threads, int8 on every layer ran only 1.2-1.6x faster than fp32 in ONNX Runtime, int8 on some layers
    of a channel-pruned net made it slower (the QDQ pairs between float layers), docs/search.md; the
    latency objective measures every candidate, so a real gain is still found."""

    def config(layer: str) -> dict[str, Any]:
        return {"weights": {"bits": 8}, "activations": {}, "layers": [layer]}

    return Action("int8", "quantize", config, "quantize", 8.0, speed=1.0)


def dynamic_int8_action() -> Action:
    """W8A8 with dynamic activations: int8 weights per output channel, each input quantized per tensor
    at run time, SmoothQuant factors chosen per layer (`smooth: auto`; layers reading one tensor share
    them). ONNX Runtime runs it as DynamicQuantizeMatMul, the transformer path: on all-MiniLM-L6-v2 its
    36 Linears took 12 ms of int8 kernels against 61 ms of fp32 MatMul (docs/benchmarks.md), so the
    predicted speed is 0.3; no calibration ranges to go wrong on inputs the data did not show."""

    def config(layer: str) -> dict[str, Any]:
        return {"weights": {"bits": 8, "granularity": "per_channel", "symmetric": True},
                "activations": {"dynamic": True, "per_token": False}, "smooth": "auto", "layers": [layer]}

    return Action("dyn8", "quantize", config, "quantize", 8.0, speed=0.3)


def chain(name: str, *steps: Action) -> Action:
    """Several actions applied in order to the same layer (Deep Compression: prune, then share)."""

    def config(layer: str) -> dict[str, Any]:
        return {"stages": [[s.method, s.config(layer)] for s in steps]}

    return Action(name, "+".join(s.method for s in steps), config, steps[0].family, steps[0].level, steps=tuple(steps))


# The candidate set, in table order. Quantization exists now; the others are enabled as soon
# as their method is registered (see `resolve_actions`).
DEFAULT_ACTIONS: tuple[Action, ...] = (
    *(quantize_action(b) for b in (8, 6, 4, 2)),
    *(prune_action(p) for p in (25, 50, 75)),
    *(decompose_action(d) for d in (2, 4)),
    *(share_action(b) for b in (8, 4, 2)),
    *(channels_action(p) for p in (25, 50, 75)),
    static_int8_action(),
    chain("prune50+share4", prune_action(50), share_action(4)),
    chain("prune75+share4", prune_action(75), share_action(4)),
    chain("prune75+share2", prune_action(75), share_action(2)),
    chain("prune90+share2", prune_action(90), share_action(2)),
    chain("prune95+share2", prune_action(95), share_action(2)),  # Deep Compression kept 8 % of LeNet-5's fc1
)
# By name: the defaults, and actions asked for by name only (not in the default set, which stays the
# issue's): quant3, between 4 and 2 bits, where a size objective needs sub-4-bit layers (MiniLM at 8x);
# gptq4/3/2, the same bytes rounded by GPTQ (they need the data for the layers' input Hessians);
# dyn8, int8 with dynamic activations, the fast form of a transformer's Linears in ONNX Runtime;
# quant8h..quant3h and gptq6h..gptq3h, the same Huffman-coded (a size objective's finest steps).
ACTIONS: dict[str, Action] = {a.name: a for a in (
    *DEFAULT_ACTIONS, quantize_action(3), *(gptq_action(b) for b in (4, 3, 2)), dynamic_int8_action(),
    *(quantize_action(b, huffman=True) for b in (8, 6, 5, 4, 3)), *(gptq_action(b, huffman=True) for b in (6, 5, 4, 3)))}


def resolve_actions(actions: Iterable[Action | str] | None) -> tuple[list[Action], list[str]]:
    """The actions to run and notes on those skipped. `None`: every default action whose method is
    registered; names are looked up in ACTIONS; an Action is taken as given. A name that is unknown,
    or a duplicate name, is a ConfigError."""
    _load_builtin_methods()
    requested: Sequence[Action | str] = list(DEFAULT_ACTIONS if actions is None else actions)
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
