"""Layer selection: ordered glob rules, last match wins; include / exclude; typo detection."""

import pytest
from torch import nn

from shrinktunnel.core.select import (
    get_submodule_parent, matches, resolve, select_modules, set_submodule, unmatched_patterns,
)


def _model():
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)),  # "0", "0.0", "0.1", "0.2"
        nn.Flatten(),  # "1"
        nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)),  # "2", "2.0", "2.1"
    )


@pytest.mark.parametrize(
    "name, patterns, expected",
    [
        ("fc_layers.0", ["fc_layers.*"], True),
        ("fc_layers.0", ["conv*"], False),
        ("a.attention.q", ["*.attention.*"], True),
        ("conv1", ["CONV1"], False),  # case-sensitive
        ("conv1", [], False),
        ("x", ["*"], True),
        ("layer10", ["layer1?"], True),
        ("layer1", ["layer[12]"], True),
    ],
)
def test_matches(name, patterns, expected):
    assert matches(name, patterns) is expected


def test_resolve_last_matching_rule_wins():
    rules = [("*", "broad"), ("fc*", "fc"), ("fc2", "exact")]
    assert resolve("fc2", rules, "default") == "exact"
    assert resolve("fc1", rules, "default") == "fc"
    assert resolve("conv", rules, "default") == "broad"
    assert resolve("conv", [("fc*", 1)], "default") == "default"
    # Order matters: a broad rule after a narrow one overrides it.
    assert resolve("fc2", [("fc2", "exact"), ("*", "broad")], None) == "broad"


def test_select_modules_by_kind_include_exclude():
    m = _model()
    names = lambda sel: [n for n, _ in sel]  # noqa: E731
    assert names(select_modules(m, (nn.Conv2d, nn.Linear))) == ["0.0", "0.2", "2.0", "2.1"]
    assert names(select_modules(m, (nn.Linear,))) == ["2.0", "2.1"]
    assert names(select_modules(m, (nn.Conv2d, nn.Linear), include=["0.*"])) == ["0.0", "0.2"]
    assert names(select_modules(m, (nn.Conv2d, nn.Linear), exclude=["2.1", "0.0"])) == ["0.2", "2.0"]
    assert names(select_modules(m, (nn.Conv2d, nn.Linear), include=["2.*"], exclude=["2.*"])) == []


def test_select_modules_never_returns_the_root():
    lin = nn.Linear(2, 2)
    assert select_modules(lin, (nn.Linear,)) == []


def test_select_modules_returns_the_live_modules():
    m = _model()
    (name, module), = select_modules(m, (nn.Linear,), include=["2.1"])
    assert module is m[2][1]


def test_unmatched_patterns_reports_typos_only():
    m = _model()
    assert unmatched_patterns(m, ["*", "0.*", "2.1", "fc_layerz.*", "3"]) == ["fc_layerz.*", "3"]


def test_set_submodule_nested_and_top_level():
    m = _model()
    new = nn.Identity()
    set_submodule(m, "2.1", new)
    assert m[2][1] is new
    top = nn.Identity()
    set_submodule(m, "1", top)
    assert m[1] is top
    parent, child = get_submodule_parent(m, "0.2")
    assert parent is m[0] and child == "2"
