"""The method registry: one registration per name, functions of the documented shape, the
canonical record replayed before a method's own replay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shrinktunnel.core.config import Config
from shrinktunnel.core.registry import METHODS, get_method, register_method
from shrinktunnel.errors import ConfigError


class _Cfg(Config):
    pass


def test_a_second_method_of_the_same_name_is_refused():
    get_method("quantize")  # the built-in methods are registered
    with pytest.raises(ConfigError, match="'quantize' is registered already"):
        register_method("quantize", _Cfg, replay=lambda model, replay: model)(lambda model, cfg, ctx: (model, {}))
    assert METHODS["quantize"].config_cls.__name__ == "QuantConfig"


@pytest.mark.parametrize("apply, replay, what", [
    (lambda model, cfg: (model, {}), lambda model, replay: model, "apply must take 3"),
    (lambda model, cfg, ctx: (model, {}), lambda model: model, "replay must take 2"),
])
def test_functions_of_the_wrong_shape_are_refused(apply, replay, what):
    with pytest.raises(ConfigError, match=what):
        register_method("test_shape_only", _Cfg, replay=replay)(apply)
    assert "test_shape_only" not in METHODS


def test_replay_redoes_the_canonical_record_first():
    seen = []
    register_method("test_replay_order", _Cfg, replay=lambda model, replay: seen.append(type(model.fc)) or model)(
        lambda model, cfg, ctx: (model, {}))
    try:
        class Sub(nn.Linear):  # a subclass with torch's forward: replaced by an exact nn.Linear
            pass

        model = nn.Sequential()
        model.add_module("fc", Sub(3, 2))
        record = {"canonical": {"layers": [{"name": "fc", "replace": "Linear"}]}}
        METHODS["test_replay_order"].replay(model, record)
        assert seen == [nn.Linear] and type(model.fc) is nn.Linear
        x = torch.randn(2, 3)
        assert model.fc(x).shape == (2, 2)
    finally:
        del METHODS["test_replay_order"]


# -- a method that becomes searchable by what it declares when it registers (issue 17) ---------------

class HalfConfig(Config):
    layers: list[str] = ["*"]  # glob patterns of the Linears stored in float16


class HalfLinear(nn.Linear):
    """A Linear whose weight is stored in float16 (half the bytes) and computed in float32."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float(), self.bias)


def _halve(model, cfg, ctx):
    import copy

    from shrinktunnel.core.select import select_modules, set_submodule

    model = copy.deepcopy(model)
    done = []
    for name, m in select_modules(model, (nn.Linear,), cfg.layers):
        if type(m) is nn.Linear:
            h = HalfLinear(m.in_features, m.out_features, m.bias is not None)
            h.weight = nn.Parameter(m.weight.detach().half(), requires_grad=False)
            h.bias = m.bias
            set_submodule(model, name, h)
            done.append([name, m.in_features, m.out_features, m.bias is not None])
    return model, {"layers": done}


def _replay_half(model, replay):
    from shrinktunnel.core.select import set_submodule

    for name, n_in, n_out, bias in replay["layers"]:
        h = HalfLinear(n_in, n_out, bias)
        h.weight = nn.Parameter(h.weight.detach().half(), requires_grad=False)
        set_submodule(model, name, h)
    return model


@pytest.fixture
def half_method():
    from shrinktunnel.core.registry import SearchAction, SearchHooks

    merged = []

    def merge(items):  # the declared rule: one stage for every layer
        merged.append([layer for layer, _ in items])
        return {"layers": [layer for layer, _ in items]}

    hooks = SearchHooks("half", order=35, merge=merge, actions=(SearchAction("half", {}, 16.0, default=False),))
    register_method("test_halve", HalfConfig, replay=_replay_half, search=hooks)(_halve)
    try:
        yield merged
    finally:
        METHODS.pop("test_halve")


def test_a_method_declaring_search_hooks_is_searchable_without_touching_search(half_method, tmp_path):
    import shrinktunnel as st
    from shrinktunnel.search import ACTIONS, auto, plan_stages
    from shrinktunnel.search.plan import family_order

    assert ACTIONS["half"].method == "test_halve" and ACTIONS["half"].family == "half"
    assert ACTIONS["half"] not in list(st.search.DEFAULT_ACTIONS)  # default=False: by name only
    order = family_order()
    assert order.index("share") < order.index("half") < order.index("quantize")  # its declared order, 35
    stages = plan_stages({"fc1": "quant8", "fc2": "half", "fc0": "half"}, dict(ACTIONS), None)
    assert [m for m, _ in stages] == ["test_halve", "quantize"]
    assert stages[0][1] == {"layers": ["fc0", "fc2"]} and half_method == [["fc0", "fc2"]]  # its merge rule ran

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    data = [torch.randn(8, 64) for _ in range(2)]
    r = auto(model, data, max_drop=0.01, actions=["half"], progress=False, max_evaluations=3, verify_runtime=False)
    c = r.candidates[r.chosen]
    assert r.fits and set(c["plan"].values()) == {"half"}
    assert c["bytes"] < 0.6 * r.candidates[0]["bytes"]  # float16 weights: about half the artifact
    out = r.save(tmp_path / "half")
    x = data[0]
    assert torch.equal(st.load(out, model)(x), r.model(x))  # the declared replay rebuilds it
    del ACTIONS  # the registry is read again once the method is gone
    from shrinktunnel.search import ACTIONS as again

    METHODS.pop("test_halve")
    try:
        assert "half" not in again
    finally:
        register_method("test_halve", HalfConfig, replay=_replay_half)(_halve)  # for the fixture's pop
