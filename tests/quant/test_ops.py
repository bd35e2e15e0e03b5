"""Quantization arithmetic: ranges, scales, the weight grid (exact), error floors, activation fake-quant,
and the min-max observer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from conftest import sqnr_db
from shrinktunnel.quant.observers import MinMaxObserver, make_observer
from shrinktunnel.quant.ops import (
    affine_qparams, dequantize_weight, fake_quant_activation, qrange, quantize_weight, symmetric_scale,
)

QMIN, QMAX = qrange(8, signed=True, narrow=True)


def _per_channel(w):
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = symmetric_scale(amax, QMAX)
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    q = quantize_weight(w, scale, zp, QMIN, QMAX, torch.int8)
    return q, scale, zp, dequantize_weight(q, scale, zp, QMIN, QMAX)


def _bshape(t, like):
    return t.view((-1,) + (1,) * (like.dim() - 1))


def test_qrange():
    assert qrange(8, signed=True) == (-128, 127)
    assert qrange(8, signed=True, narrow=True) == (-127, 127)
    assert qrange(8, signed=False) == (0, 255)
    assert qrange(4, signed=True, narrow=True) == (-7, 7)


def test_symmetric_scale_and_all_zero_channel():
    scale = symmetric_scale(torch.tensor([127.0, 0.0, 2.54]), 127)
    assert scale.dtype == torch.float32
    assert scale.tolist() == pytest.approx([1.0, 1.0, 0.02])
    assert scale[1] == 1.0  # an all-zero channel gets scale 1, never 0


@pytest.mark.parametrize("shape", [(16, 8), (6, 3, 3, 3), (4, 1, 3, 3), (5, 2, 7)], ids=["linear", "conv2d", "depthwise", "conv1d"])
def test_dequantized_weight_lies_exactly_on_the_grid(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).view((-1,) + (1,) * (len(shape) - 1))
    q, scale, zp, deq = _per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= QMIN and int(q.max()) <= QMAX
    assert torch.equal(deq, q.float() * _bshape(scale, w))  # exactly integer x scale, nothing else
    # Quantizing the dequantized weight again gives the same integers (the grid is a fixed point).
    assert torch.equal(quantize_weight(deq, scale, zp, QMIN, QMAX, torch.int8), q)


def test_each_channel_uses_the_full_range_and_errs_by_at_most_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(12, 40)
    q, scale, _, deq = _per_channel(w)
    assert torch.equal(q.abs().amax(dim=1), torch.full((12,), 127, dtype=torch.int8))
    err = (w - deq).abs()
    assert bool((err <= scale.view(-1, 1) / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("shape", [(64, 32), (32, 16, 3, 3), (48, 1, 3, 3), (16, 8, 5)], ids=["linear", "conv2d", "depthwise", "conv1d"])
def test_int8_per_channel_weight_sqnr_above_35_db(shape):
    torch.manual_seed(2)
    w = torch.empty(shape)
    torch.nn.init.kaiming_normal_(w)
    w *= torch.logspace(-2, 0, shape[0]).view((-1,) + (1,) * (len(shape) - 1))  # channels of very different scale
    _, _, _, deq = _per_channel(w)
    assert sqnr_db(w, deq) > 35.0


def test_per_channel_beats_per_tensor_on_uneven_channels():
    torch.manual_seed(3)
    w = torch.randn(8, 64) * torch.logspace(-3, 0, 8).view(-1, 1)
    _, _, _, deq_pc = _per_channel(w)
    scale_pt = symmetric_scale(w.abs().amax().expand(8), QMAX)
    zp = torch.zeros(8, dtype=torch.int32)
    deq_pt = dequantize_weight(quantize_weight(w, scale_pt, zp, QMIN, QMAX, torch.int8), scale_pt, zp, QMIN, QMAX)
    worst = lambda deq: min(sqnr_db(w[c], deq[c]) for c in range(8))  # noqa: E731
    assert worst(deq_pc) > 35.0  # every channel keeps its own resolution
    assert worst(deq_pt) < 5.0  # one shared scale flattens the small channels to (almost) zero


def test_round_half_to_even_and_clamp():
    scale = torch.tensor([0.5])
    zp = torch.zeros(1, dtype=torch.int32)
    w = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, 1000.0, -1000.0]])  # x / scale = 0.5, 1.5, 2.5, ...
    q = quantize_weight(w, scale, zp, QMIN, QMAX, torch.int8)
    assert q.tolist() == [[0, 2, 2, 0, -2, 127, -127]]


@settings(max_examples=60, deadline=None, database=None, derandomize=True)  # the same examples every run
@given(
    values=hs.lists(hs.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=24),
    channels=hs.integers(1, 4),
)
def test_grid_property(values, channels):
    w = torch.tensor(values * channels, dtype=torch.float32).view(channels, -1)
    q, scale, zp, deq = _per_channel(w)
    assert torch.equal(deq, q.float() * scale.view(-1, 1))
    assert bool(((w - deq).abs() <= scale.view(-1, 1) / 2 * (1 + 1e-5) + 1e-30).all())


# -- activations -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lo, hi", [(-1.5, 3.0), (0.0, 6.0), (0.5, 2.0), (-4.0, -1.0), (-2.0, 2.0)])
def test_asymmetric_qparams_keep_zero_exact(lo, hi):
    scale, zp = affine_qparams(lo, hi, 0, 255, symmetric=False)
    assert isinstance(scale, float) and isinstance(zp, int) and 0 <= zp <= 255
    assert scale == float(torch.tensor(scale, dtype=torch.float32))  # a float32 value
    lo0, hi0 = min(lo, 0.0), max(hi, 0.0)
    assert scale == pytest.approx((hi0 - lo0) / 255, rel=1e-6)
    y = fake_quant_activation(torch.tensor([0.0]), scale, zp, 0, 255, torch.uint8)
    assert y.item() == 0.0  # zero (padding, ReLU output) is exactly representable
    # The observed range is covered to within one step at both ends.
    ends = fake_quant_activation(torch.tensor([lo0, hi0]), scale, zp, 0, 255, torch.uint8)
    assert ends.tolist() == pytest.approx([lo0, hi0], abs=scale)


def test_post_relu_range_uses_zero_point_zero():
    scale, zp = affine_qparams(0.0, 2.55, 0, 255, symmetric=False)
    assert zp == 0 and scale == pytest.approx(0.01)


def test_symmetric_signed_qparams():
    scale, zp = affine_qparams(-3.0, 1.0, -128, 127, symmetric=True)
    assert zp == 0 and scale == pytest.approx(3.0 / 127)


def test_degenerate_range_gets_scale_one():
    assert affine_qparams(0.0, 0.0, 0, 255, symmetric=False) == (1.0, 0)


def test_fake_quant_output_is_on_the_grid_clipped_and_idempotent():
    torch.manual_seed(4)
    scale, zp = affine_qparams(-1.0, 2.0, 0, 255, symmetric=False)
    x = torch.randn(1000) * 2
    y = fake_quant_activation(x, scale, zp, 0, 255, torch.uint8)
    levels = y / scale + zp
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert float(levels.min()) >= -1e-3 and float(levels.max()) <= 255 + 1e-3
    assert float(y.max()) <= (255 - zp) * scale * (1 + 1e-6) and float(y.min()) >= -zp * scale * (1 + 1e-6)
    assert torch.equal(fake_quant_activation(y, scale, zp, 0, 255, torch.uint8), y)
    inside = (x > -zp * scale) & (x < (255 - zp) * scale)
    assert float((x - y)[inside].abs().max()) <= scale / 2 * (1 + 1e-5)


# -- observer --------------------------------------------------------------------------------------
def test_minmax_observer_tracks_the_running_range():
    obs = make_observer("minmax")
    assert isinstance(obs, MinMaxObserver)
    obs.update(torch.tensor([0.5, 1.0]))
    obs.update(torch.tensor([-2.0, 0.0]))
    obs.update(torch.empty(0))  # ignored
    assert (obs.lo, obs.hi, obs.count) == (-2.0, 1.0, 2)
    assert obs.qparams(0, 255, False) == affine_qparams(-2.0, 1.0, 0, 255, False)


def test_observer_without_data_or_with_non_finite_values():
    with pytest.raises(RuntimeError, match="saw no data"):
        MinMaxObserver().qparams(0, 255, False)
    obs = MinMaxObserver()
    obs.update(torch.tensor([1.0, math.inf]))
    with pytest.raises(ValueError, match="not finite"):
        obs.qparams(0, 255, False)
