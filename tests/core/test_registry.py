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
