"""Recipes in every accepted form, and every rejected form with a helpful message."""

from pathlib import Path

import pytest

import shrinktunnel as st
from shrinktunnel.core.recipe import Stage, load_recipe
from shrinktunnel.errors import ConfigError
from shrinktunnel.quant.config import QuantConfig

REPO = Path(__file__).resolve().parents[2]
EXPECTED = QuantConfig(skip=["fc"], calibration_batches=2)

YAML_MAPPING = """\
name: tiny
description: skip the classifier
stages:
  - quantize:
      skip: [fc]
      calibration_batches: 2
"""
YAML_LIST = """\
- quantize:
    skip: [fc]
    calibration_batches: 2
"""


def _only_stage(stages):
    assert len(stages) == 1 and isinstance(stages[0], Stage)
    assert stages[0].method == "quantize"
    return stages[0].config


@pytest.mark.parametrize("text", [YAML_MAPPING, YAML_LIST], ids=["stages-mapping", "top-level-list"])
def test_yaml_string(text):
    assert _only_stage(load_recipe(text)) == EXPECTED


@pytest.mark.parametrize("text", [YAML_MAPPING, YAML_LIST], ids=["stages-mapping", "top-level-list"])
@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_yaml_file(tmp_path, text, as_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(text)
    assert _only_stage(load_recipe(f if as_path else str(f))) == EXPECTED


def test_yml_extension(tmp_path):
    f = tmp_path / "r.yml"
    f.write_text(YAML_LIST)
    assert _only_stage(load_recipe(str(f))) == EXPECTED


def test_shipped_example_recipe_is_the_defaults():
    assert _only_stage(load_recipe(REPO / "examples" / "recipes" / "w8a8.yaml")) == QuantConfig()


@pytest.mark.parametrize(
    "recipe",
    [
        [QuantConfig(skip=["fc"], calibration_batches=2)],
        QuantConfig(skip=["fc"], calibration_batches=2),
        [{"quantize": {"skip": ["fc"], "calibration_batches": 2}}],
        [("quantize", {"skip": ["fc"], "calibration_batches": 2})],
        [("quantize", QuantConfig(skip=["fc"], calibration_batches=2))],
        {"stages": [{"quantize": {"skip": ["fc"], "calibration_batches": 2}}]},
    ],
    ids=["config-list", "single-config", "one-key-dicts", "tuples", "tuple-with-instance", "stages-dict"],
)
def test_python_forms(recipe):
    assert _only_stage(load_recipe(recipe)) == EXPECTED


@pytest.mark.parametrize("recipe", [["quantize"], [{"quantize": None}], [("quantize", None)], "- quantize: {}\n"])
def test_stage_without_config_gets_defaults(recipe):
    assert _only_stage(load_recipe(recipe)) == QuantConfig()


def test_several_stages_keep_their_order():
    stages = load_recipe([{"quantize": {"skip": ["a"]}}, QuantConfig(skip=["b"])])
    assert [s.config.skip for s in stages] == [["a"], ["b"]]


def test_unknown_method_lists_the_available_methods():
    with pytest.raises(ConfigError) as info:
        load_recipe("- sparsify: {amount: 0.5}\n")
    msg = str(info.value)
    assert "unknown method 'sparsify'" in msg and "quantize" in msg and "prune" in msg


def test_unknown_top_level_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        load_recipe("stagez:\n  - quantize: {}\n")
    msg = str(info.value)
    assert "'stagez'" in msg and "stages" in msg and "name" in msg and "description" in msg


def test_unknown_config_key_names_stage_key_and_hint():
    with pytest.raises(ConfigError) as info:
        load_recipe("stages:\n  - quantize: {weightz: {bits: 8}}\n")
    msg = str(info.value)
    assert "recipe stage 0 (quantize)" in msg
    assert "'weightz'" in msg and "did you mean 'weights'?" in msg


def test_bad_value_inside_a_stage_names_the_stage():
    with pytest.raises(ConfigError) as info:
        load_recipe([{"quantize": {}}, {"quantize": {"weights": {"bits": 9}}}])
    assert "recipe stage 1 (quantize)" in str(info.value) and "bits=9" in str(info.value)


@pytest.mark.parametrize("recipe", ["stages: []\n", [], {"stages": []}, {"name": "no stages"}, "name: x\n"],
                         ids=["yaml-empty-stages", "empty-list", "empty-stages-dict", "dict-without-stages", "yaml-without-stages"])
def test_empty_recipe(recipe):
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert "non-empty list of stages" in str(info.value)


def test_empty_recipe_file(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    assert "non-empty list of stages" in str(info.value)


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_missing_recipe_file_names_the_path(tmp_path, as_path):
    f = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_recipe(f if as_path else str(f))
    msg = str(info.value)
    assert "nope.yaml" in msg and "does not exist" in msg


@pytest.mark.parametrize(
    "recipe, fragment",
    [
        ([{"quantize": {}, "other": {}}], "is not a stage"),
        ([42], "is not a stage"),
        ([("quantize", {}, "extra")], "is not a stage"),
        ("- quantize: 5\n", "must be a mapping"),
    ],
)
def test_malformed_stages(recipe, fragment):
    with pytest.raises(ConfigError) as info:
        load_recipe(recipe)
    assert fragment in str(info.value)


def test_invalid_yaml_is_a_config_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stages:\n  - quantize: {a: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    assert "not valid YAML" in str(info.value)


def test_invalid_yaml_message_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("stages:\n  - quantize: {a: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(f)
    assert "\n" not in str(info.value)


def test_one_line_yaml_string_without_colon():
    assert _only_stage(load_recipe("- quantize")) == QuantConfig()


def test_compress_accepts_every_recipe_form():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    data = [torch.randn(8, 4)]
    for recipe in ("- quantize: {skip: ['2']}\n", [QuantConfig()], [("quantize", {"activations": None})]):
        result = st.compress(model, recipe, data=data, progress=False)
        assert type(result.model[0]).__name__ == "QuantizedLayer"
