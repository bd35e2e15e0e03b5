"""Measurement: MACs and weight counts by formula, accuracy and fidelity on hand-built models,
sizes on disk, latency bookkeeping."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import shrinktunnel as st
from conftest import CASES, TinyAttention
from shrinktunnel.errors import DataError
from shrinktunnel.measure import (
    LatencyStats, accuracy, artifact_bytes, count_macs, count_weights, fidelity, float_safetensors_bytes, torch_latency,
)
from shrinktunnel.measure import latency as latency_mod
from shrinktunnel.measure.latency import interleaved, paired_ratio
from shrinktunnel.measure.size import bits_per_weight


def _inputs(x):
    return ((x,), {})


# -- MACs -------------------------------------------------------------------------------------------
def test_macs_of_a_linear_are_in_times_out_per_sample():
    layer = nn.Linear(13, 7)
    x = torch.randn(5, 13)
    assert count_macs(layer, _inputs(x)) == 13 * 7
    assert count_macs(layer, _inputs(x), per_sample=False) == 5 * 13 * 7


def test_macs_of_a_linear_on_a_sequence():
    assert count_macs(nn.Linear(16, 8, bias=False), _inputs(torch.randn(3, 5, 16))) == 5 * 16 * 8


@pytest.mark.parametrize(
    "conv, hw, expected",
    [
        # out_channels * H_out * W_out * (in_channels / groups) * kh * kw
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (16, 16), 8 * 8 * 8 * 3 * 3 * 3),
        (nn.Conv2d(3, 5, (3, 5), padding=0), (9, 11), 5 * 7 * 7 * 3 * 3 * 5),
        (nn.Conv2d(4, 4, 3, padding=1, groups=4), (6, 6), 4 * 6 * 6 * 1 * 3 * 3),
        (nn.Conv2d(4, 6, 1, groups=2, bias=False), (6, 6), 6 * 6 * 6 * 2 * 1 * 1),
    ],
    ids=["strided", "rectangular-kernel", "depthwise", "grouped-1x1"],
)
def test_macs_of_a_conv2d(conv, hw, expected):
    x = torch.randn(3, conv.in_channels, *hw)
    assert count_macs(conv, _inputs(x)) == expected


def test_macs_of_a_conv1d():
    conv = nn.Conv1d(2, 6, 5, stride=2, padding=2)  # L_out = 10 for L = 20
    assert count_macs(conv, _inputs(torch.randn(4, 2, 20))) == 6 * 10 * 2 * 5


def test_macs_count_attention_matmuls():
    t, d = 5, 16
    model = TinyAttention(d)
    # four projections (t*d*d each) plus q @ k^T and att @ v (t*t*d each)
    assert count_macs(model, _inputs(torch.randn(2, t, d))) == 4 * t * d * d + 2 * t * t * d


def test_quantized_model_has_the_same_macs(supported_case):
    model, data = supported_case.model(), supported_case.batches()
    q = st.quantize(model, data=data, progress=False)
    assert count_macs(q, _inputs(data[0])) == count_macs(model, _inputs(data[0])) > 0


# -- weights and sizes -------------------------------------------------------------------------------
def test_count_weights_of_float_models():
    assert count_weights(nn.Linear(13, 7)) == 13 * 7 + 7
    assert count_weights(nn.Conv2d(4, 6, 1, groups=2, bias=False)) == 6 * 2
    m = CASES["unsupported"].model()
    assert count_weights(m) == sum(p.numel() for p in m.parameters())


@pytest.mark.filterwarnings("ignore:quantize:UserWarning")
def test_count_weights_is_unchanged_by_quantization(case):
    model = case.model()
    q = st.quantize(model, data=case.batches(), progress=False)
    assert count_weights(q) == count_weights(model)  # integer weights count, scales do not


def test_count_weights_counts_shared_parameters_once():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m[1].weight = m[0].weight
    assert count_weights(m) == 4 * 4 + 4 + 4


def test_float_safetensors_bytes_is_the_size_of_the_state_dict_file(tmp_path):
    model = CASES["flatten"].model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    assert float_safetensors_bytes(model) == (tmp_path / "m.safetensors").stat().st_size
    assert float_safetensors_bytes(model) >= 4 * sum(p.numel() for p in model.parameters())


def test_artifact_bytes_is_the_sum_of_the_file_sizes(tmp_path):
    case = CASES["flatten"]
    path = st.save(st.quantize(case.model(), data=case.batches(), progress=False), tmp_path / "a")
    sizes = [f.stat().st_size for f in path.iterdir()]
    assert len(sizes) == 2 and artifact_bytes(path) == sum(sizes)
    assert artifact_bytes(path / "model.safetensors") == (path / "model.safetensors").stat().st_size


def test_artifact_bytes_ignores_reports_beside_an_artifact(tmp_path):
    case = CASES["flatten"]
    path = st.save(case.model(), tmp_path / "a")
    size = artifact_bytes(path)
    (path / "report.md").write_text("x" * 1000)
    assert artifact_bytes(path) == size


def test_artifact_bytes_of_any_other_directory_counts_every_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\0" * 10)
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * 32)
    assert artifact_bytes(tmp_path) == 42


def test_bits_per_weight():
    assert bits_per_weight(100, 100) == 8.0
    assert bits_per_weight(10, 0) == 80.0  # never divides by zero


# -- accuracy and fidelity --------------------------------------------------------------------------
class Oracle(nn.Module):
    """Predicts the class written in the first input column (as one-hot logits)."""

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), 3).float()


def _batch(preds, labels):
    x = torch.tensor(preds, dtype=torch.float32).view(-1, 1)
    return x, torch.tensor(labels)


def test_accuracy_is_exact_and_weighted_by_samples():
    data = [
        _batch([0, 1, 2, 2], [0, 1, 2, 0]),  # 3 of 4
        _batch([1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]),  # 1 of 6
    ]
    assert accuracy(Oracle(), data) == 4 / 10  # not the mean of 0.75 and 0.1667


def test_accuracy_of_dict_batches_with_labels():
    class DictOracle(nn.Module):
        def forward(self, x):
            return Oracle()(x)

    x, y = _batch([2, 0, 1], [2, 0, 0])
    assert accuracy(DictOracle(), [{"x": x, "labels": y}]) == 2 / 3


def test_accuracy_of_a_lone_batch_and_of_a_perfect_model():
    assert accuracy(Oracle(), _batch([0, 1, 2], [0, 1, 2])) == 1.0


def test_accuracy_without_labels_is_a_data_error():
    with pytest.raises(DataError, match="labelled"):
        accuracy(Oracle(), [torch.zeros(2, 1)])


def test_fidelity_of_a_model_with_itself():
    case = CASES["attention"]
    model = case.model()
    f = fidelity(model, model, case.batches())
    assert f["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert f["top1_agreement"] == 1.0
    assert f["sqnr_db"] == math.inf and f["max_abs_error"] == 0.0


def test_fidelity_with_known_disagreement():
    x = torch.tensor([[0.0], [1.0], [2.0], [2.0]])
    flipped = lambda x: Oracle()(torch.where(x == 2, torch.zeros_like(x), x))  # noqa: E731
    f = fidelity(flipped, Oracle(), [x])
    assert f["top1_agreement"] == 0.5
    assert f["cosine"] == pytest.approx(0.5)  # two identical one-hots, two orthogonal ones
    assert f["max_abs_error"] == 1.0


def test_fidelity_of_a_negated_model():
    model = CASES["functional_relu"].model()
    f = fidelity(lambda x: -model(x), model, CASES["functional_relu"].batches())
    assert f["cosine"] == pytest.approx(-1.0, abs=1e-6)


def test_fidelity_shape_mismatch():
    with pytest.raises(DataError, match="differ in shape"):
        fidelity(nn.Linear(2, 3), nn.Linear(2, 4), [torch.randn(2, 2)])


# -- latency ----------------------------------------------------------------------------------------
def test_torch_latency_bookkeeping():
    before = torch.get_num_threads()
    stats = torch_latency(nn.Linear(8, 8), _inputs(torch.randn(6, 8)), threads=1, warmup=1, runs=11)
    assert isinstance(stats, LatencyStats)
    assert (stats.runs, stats.threads, stats.batch) == (11, 1, 6)
    assert 0 < stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == before  # restored
    assert set(stats.to_dict()) == {"median_ms", "p90_ms", "runs", "threads", "batch"}


def test_interleaved_keeps_each_contenders_best_median():
    medians = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}
    calls = []

    def make(name):
        def measure():
            calls.append(name)
            return LatencyStats(next(medians[name]), 9.0, 30, 2, 1)

        return measure

    best = interleaved({"a": make("a"), "b": make("b")}, rounds=3)
    assert best["a"].median_ms == 1.0 and best["b"].median_ms == 4.0
    assert calls == ["a", "b", "a", "b", "a", "b"]  # alternated, not one after the other


class _FakeClock:
    """perf_counter for latency_mod: a call costs `cost[name] * slowdown(t)` seconds of fake time."""

    def __init__(self, monkeypatch, slowdown=lambda now: 1.0):
        self.now, self.calls, self.slowdown = 0.0, [], slowdown
        monkeypatch.setattr(latency_mod.time, "perf_counter", lambda: self.now)

    def fn(self, name, seconds):
        def run():
            self.calls.append(name)
            self.now += seconds * self.slowdown(self.now)

        return run


def test_paired_ratio_alternates_blocks_and_cancels_slow_spells(monkeypatch):
    # The machine slows down 3x for a while, mid-measurement; each ratio compares blocks measured next
    # to each other, so the median per-pair ratio is exactly a's cost over b's.
    clock = _FakeClock(monkeypatch, slowdown=lambda now: 3.0 if 0.05 < now < 0.2 else 1.0)
    r = paired_ratio(clock.fn("a", 0.002), clock.fn("b", 0.001), pairs=20, block=3, warmup=1)
    assert r.ratio == pytest.approx(2.0) and r.low == pytest.approx(2.0) and r.high == pytest.approx(2.0)
    assert (r.pairs, r.block) == (20, 3) and r.a_ms > r.b_ms
    timed = clock.calls[2:]  # after the warm-up pair
    # each block: one untimed switch-over run, then 3 timed; A B, then B A: neither side always second
    assert timed[:16] == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4
    assert timed.count("a") == timed.count("b") == 20 * 4


def test_paired_ratio_leaves_the_switch_over_run_untimed(monkeypatch):
    # The first run after switching contenders is slow (the other's thread pool still spins): untimed.
    clock = _FakeClock(monkeypatch)
    last = []

    def contender(name, seconds):
        def run():
            cost = seconds * (10 if last[-1:] != [name] else 1)
            last.append(name)
            clock.calls.append(name)
            clock.now += cost

        return run

    r = paired_ratio(contender("a", 0.001), contender("b", 0.001), pairs=10, block=2, warmup=0)
    assert r.ratio == pytest.approx(1.0) and r.a_ms == pytest.approx(1.0) and r.b_ms == pytest.approx(1.0)


def test_paired_ratio_reports_an_interval_around_a_noisy_ratio(monkeypatch):
    noise = iter(np.random.default_rng(0).uniform(0.8, 1.2, size=1000))
    clock = _FakeClock(monkeypatch, slowdown=lambda now: next(noise))
    r = paired_ratio(clock.fn("a", 0.001), clock.fn("b", 0.001), pairs=200, block=1, warmup=0)
    assert r.low <= r.ratio <= r.high
    assert r.low < 1.0 < r.high and r.high - r.low < 0.1


def test_paired_ratio_needs_two_pairs():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_ratio(lambda: None, lambda: None, pairs=1)
    with pytest.raises(ValueError, match="at least 1 run"):
        paired_ratio(lambda: None, lambda: None, block=0)
