"""Configs: unknown keys are named with the allowed ones, bad values fail, round trips are exact."""

import pytest
import yaml

import shrinktunnel as st
from shrinktunnel.errors import ConfigError
from shrinktunnel.quant.config import ActivationQuant, Calibrator, Granularity, LayerOverride, QuantConfig, WeightQuant

ALLOWED = ["weights", "activations", "layers", "skip", "calibration_batches", "fuse_relu"]


def test_defaults_are_w8a8_per_channel_minmax():
    cfg = QuantConfig()
    assert cfg.weights == WeightQuant(bits=8, granularity=Granularity.PER_CHANNEL, symmetric=True)
    assert cfg.activations == ActivationQuant(bits=8, symmetric=False, calibrator=Calibrator.MINMAX)
    assert cfg.layers == ["*"] and cfg.skip == [] and cfg.calibration_batches is None and cfg.fuse_relu is True


def test_public_names_are_the_same_classes():
    assert st.QuantConfig is QuantConfig and st.WeightQuant is WeightQuant and st.ActivationQuant is ActivationQuant


def test_unknown_key_names_the_key_and_every_allowed_key():
    with pytest.raises(ConfigError) as info:
        QuantConfig.parse({"zzz": 1})
    msg = str(info.value)
    assert "'zzz'" in msg
    for key in ALLOWED:
        assert key in msg
    assert "did you mean" not in msg  # nothing is close to 'zzz'


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({"weightz": {}}, "weightz", "weights"),
        ({"calibration_batch": 4}, "calibration_batch", "calibration_batches"),
        ({"weights": {"bitz": 8}}, "bitz", "bits"),
        ({"activations": {"calibrater": "minmax"}}, "calibrater", "calibrator"),
    ],
)
def test_near_miss_gets_a_did_you_mean_hint(data, key, hint):
    with pytest.raises(ConfigError) as info:
        QuantConfig.parse(data)
    msg = str(info.value)
    assert f"unknown key {key!r}" in msg
    assert f"did you mean {hint!r}?" in msg
    assert "allowed keys:" in msg


def test_nested_unknown_key_lists_the_nested_allowed_keys():
    with pytest.raises(ConfigError) as info:
        QuantConfig.parse({"weights": {"bitz": 8}})
    msg = str(info.value)
    assert msg.startswith("QuantConfig.weights")
    assert "bits, granularity, symmetric" in msg


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"weights": {"bits": 9}}, "bits=9 is not supported"),
        ({"activations": {"bits": 4}}, "bits=4 is not supported"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"calibration_batches": -3}, "calibration_batches"),
        ({"weights": {"granularity": "per_row"}}, "per_row"),
        ({"activations": {"calibrator": "kl"}}, "kl"),
        ({"layers": "conv1"}, "layers"),
        ({"fuse_relu": "maybe"}, "fuse_relu"),
    ],
)
def test_wrong_values_raise_config_error_naming_the_field(data, fragment):
    with pytest.raises(ConfigError) as info:
        QuantConfig.parse(data)
    assert fragment in str(info.value)


def test_not_a_mapping_is_a_config_error_listing_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        QuantConfig.parse([1, 2])
    msg = str(info.value)
    assert "must be a mapping" in msg and "list" in msg
    for key in ALLOWED:
        assert key in msg


def test_config_error_is_a_value_error_and_a_shrink_error():
    with pytest.raises(ValueError):
        QuantConfig.parse({"zzz": 1})
    with pytest.raises(st.ShrinkError):
        QuantConfig.parse({"zzz": 1})


def test_parse_none_gives_defaults_and_parse_instance_returns_it():
    assert QuantConfig.parse(None) == QuantConfig()
    cfg = QuantConfig(skip=["fc"])
    assert QuantConfig.parse(cfg) is cfg


def test_to_dict_is_plain_json_data():
    d = QuantConfig().to_dict()
    assert d["weights"] == {"bits": 8, "format": "int", "granularity": "per_channel", "symmetric": True,
                            "reduce_range": False, "group_size": None, "coding": "plain", "scale": "float",
                            "stochastic": False}
    assert d["activations"] == {"bits": 8, "format": "int", "symmetric": False, "calibrator": "minmax",
                                "percentile": 99.99, "bins": 2048, "outputs": True, "dynamic": False, "per_token": True}
    assert type(d["weights"]["granularity"]) is str  # the enum became its value


CONFIGS = [
    QuantConfig(),
    QuantConfig(activations=None),
    QuantConfig(weights=WeightQuant(granularity="per_tensor"), skip=["fc*", "body.2"], calibration_batches=3, fuse_relu=False),
    QuantConfig(activations=ActivationQuant(symmetric=True), layers=["conv*"]),
    QuantConfig(activations=ActivationQuant(dynamic=True, per_token=False), rounding="gptq"),
    QuantConfig(overrides=[LayerOverride(pattern="fc", activations=None),
                           LayerOverride(pattern="conv*", weights=WeightQuant(granularity="per_tensor"))]),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_to_dict_parse_round_trip(cfg):
    again = QuantConfig.parse(cfg.to_dict())
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("cfg", CONFIGS)
def test_yaml_round_trip(cfg):
    text = yaml.safe_dump(cfg.to_dict())
    again = QuantConfig.parse(yaml.safe_load(text))
    assert again == cfg


def test_assignment_is_validated():
    cfg = QuantConfig()
    with pytest.raises(ValueError):
        cfg.calibration_batches = 0
    assert cfg.calibration_batches is None


def test_direct_construction_raises_config_error():
    with pytest.raises(ConfigError):
        QuantConfig(calibration_batches=0)


def test_asymmetric_weights_are_honoured():
    import torch
    from torch import nn

    cfg = QuantConfig.parse({"weights": {"symmetric": False}, "activations": None})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        # Rows spanning [-0.2 c, 0.8 c]: uint8 with zero point round(0.2 / 1.0 * 255) = 51 in every row.
        model[0].weight.copy_(torch.linspace(-0.2, 0.8, 8) * torch.arange(1.0, 5.0).view(-1, 1))
    q = st.quantize(model, cfg, progress=False)
    assert q[0].weight_zero_point.tolist() == [51, 51, 51, 51], "symmetric=False produced zero points of 0"
