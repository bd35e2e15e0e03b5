"""Huffman-coded integer weights (`weights.coding: huffman`): the same grid and the same outputs as
plain storage, fewer bytes, near the entropy of the integers, exact round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import quantized_layers, state_dicts_equal
from shrinktunnel.codec.entropy import entropy
from shrinktunnel.errors import ConfigError
from shrinktunnel.export import OrtModel
from shrinktunnel.measure import artifact_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 64)
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 16)
        with torch.no_grad():  # bell-shaped, as trained weights are (nn.Linear's init is uniform)
            for m in (self.emb, self.fc1, self.fc2):
                m.weight.normal_(0, 0.05)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))


def _ids(n=8):
    return torch.randint(0, 50, (n, 5), generator=torch.Generator().manual_seed(1))


FORMATS = [{"bits": 4}, {"bits": 2}, {"bits": 6, "symmetric": False}, {"bits": 8},
           {"bits": 4, "granularity": "per_group", "group_size": 16}, {"bits": 3, "granularity": "per_tensor"}]


@pytest.mark.parametrize("weights", FORMATS, ids=lambda w: "-".join(str(v) for v in w.values()))
def test_huffman_layers_hold_the_same_integers_and_compute_the_same(weights):
    model, x = _Net().eval(), _ids()
    plain = st.quantize(model, {"weights": weights, "activations": None}, progress=False)
    coded = st.quantize(model, {"weights": {**weights, "coding": "huffman"}, "activations": None}, progress=False)
    for name, layer in quantized_layers(coded).items():
        assert "qweight_code" in dict(layer.named_buffers())
        assert torch.equal(layer.integer_weight(), quantized_layers(plain)[name].integer_weight())
    with torch.no_grad():
        assert torch.equal(coded(x), plain(x))


def test_huffman_bytes_are_within_a_tenth_of_a_bit_of_the_entropy_and_below_packed():
    layer = nn.Linear(512, 256)
    with torch.no_grad():
        layer.weight.normal_(generator=torch.Generator().manual_seed(0))
    q = st.quantize(nn.Sequential(layer), {"weights": {"bits": 4, "coding": "huffman"}, "activations": None},
                    progress=False)
    coded = quantized_layers(q)["0"]
    ints = coded.integer_weight().to(torch.int64) + 8
    h = entropy(np.bincount(ints.reshape(-1).numpy(), minlength=16))
    bits = coded.qweight_code.numel() * 8 / ints.numel()
    assert h <= bits <= h + 0.1  # Huffman: never under the entropy, close above it for 16 symbols
    assert bits < 3.6  # Gaussian weights on an absmax 4-bit grid use the middle levels most


def test_artifact_is_smaller_and_round_trips_bit_exact(tmp_path):
    model, x = _Net().eval(), _ids()
    plain = st.compress(model, [st.QuantConfig.parse({"weights": {"bits": 4}, "activations": None})], progress=False)
    coded = st.compress(model, [st.QuantConfig.parse({"weights": {"bits": 4, "coding": "huffman"}, "activations": None})],
                        progress=False)
    p_path, c_path = plain.save(tmp_path / "plain"), coded.save(tmp_path / "coded")
    assert artifact_bytes(c_path) < artifact_bytes(p_path)
    code = sum(layer.qweight_code.numel() for layer in quantized_layers(coded.model).values())
    packed = sum(layer.qweight_packed.numel() for layer in quantized_layers(plain.model).values())
    assert code < 0.9 * packed
    loaded = st.load(c_path, model=_Net())
    assert state_dicts_equal(loaded, coded.model)
    with torch.no_grad():
        assert torch.equal(loaded(x), coded.model(x))
    specs = json.loads((c_path / "manifest.json").read_text())["stages"][0]["replay"]["layers"]
    for name, layer in quantized_layers(coded.model).items():
        assert specs[name]["weight"]["code_bytes"] == layer.qweight_code.numel() > 0


def test_a_stream_length_that_does_not_match_the_manifest_is_an_artifact_error(tmp_path):
    model = _Net().eval()
    path = st.save(st.quantize(model, {"weights": {"bits": 4, "coding": "huffman"}, "activations": None}, progress=False),
                   tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["stages"][0]["replay"]["layers"]["fc1"]["weight"]["code_bytes"] += 3
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(st.ShrinkError, match="fc1.qweight_code"):
        st.load(path, model=_Net())


@pytest.mark.parametrize("activations", [None, {"dynamic": True, "per_token": False}], ids=["weight-only", "dynamic"])
def test_huffman_layers_export_to_onnx_as_their_plain_twins(tmp_path, activations):
    model, x = _Net().eval(), _ids()
    coded = st.quantize(model, {"weights": {"bits": 8 if activations else 4, "coding": "huffman"},
                                "activations": activations}, progress=False)
    runtime = OrtModel(st.export_onnx(coded, tmp_path / "m.onnx", x), threads=1)
    with torch.no_grad():
        np.testing.assert_allclose(runtime(x).numpy(), coded(x).numpy(), rtol=1e-4, atol=1e-4)


def test_huffman_is_for_integer_weights_only():
    with pytest.raises(ConfigError, match="coding: huffman applies to integer weights"):
        st.QuantConfig.parse({"weights": {"format": "binary", "coding": "huffman"}})
    with pytest.raises(ConfigError, match="coding"):
        st.QuantConfig.parse({"weights": {"bits": 4, "coding": "zip"}})
