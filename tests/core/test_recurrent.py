"""core/recurrent.py: LSTM / GRU matrices stored int8 per row or float16, expanded per forward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shrinktunnel.core.recurrent import RecurrentWeightOnly


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = float(((ref - got) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(("storage", "floor", "bytes_per"), [("int8", 30, 1), ("float16", 60, 2)])
def test_recurrent_weights_stored_narrow_keep_the_outputs(cls, storage, floor, bytes_per):
    torch.manual_seed(0)
    rnn = cls(8, 16, num_layers=2, batch_first=True, bidirectional=True).eval()
    layer = RecurrentWeightOnly.from_module(rnn, storage).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert _sqnr(rnn(x)[0], layer(x)[0]) > floor
    sd = layer.state_dict()
    matrices = [k for k in sd if k.endswith("_stored")]
    assert len(matrices) == 8 and all(sd[k].element_size() == bytes_per for k in matrices)
    assert not any(k.startswith("rnn.weight") for k in sd)  # nothing stored twice; biases stay float32
    assert layer.hidden_size == 16 and layer.weight_hh_l0.dtype == torch.float32
    again = RecurrentWeightOnly(layer.spec())
    again.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], layer(x)[0])


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="newer shrinktunnel"):
        RecurrentWeightOnly({"kind": "lstm", "storage": "int3", "config": {}, "matrices": []})
