"""Calibrators: the streaming histogram (exact growth, bounded memory, streaming == one shot), and the
percentile, entropy (KL) and MSE ranges checked against slow, independent reference computations."""

import functools
import math

import numpy as np
import pytest
import torch

import shrinktunnel as st
from conftest import CASES, quantized_layers, sqnr_db
from shrinktunnel.errors import ConfigError, DataError
from shrinktunnel.quant.config import ActivationQuant, Calibrator, QuantConfig
from shrinktunnel.quant.observers import (
    OBSERVERS, EntropyObserver, HistogramObserver, MinMaxObserver, MSEObserver, PercentileObserver,
    expected_sq_error, make_observer,
)
from shrinktunnel.quant.ops import affine_qparams, fake_quant_activation

INT8 = (-128, 127, True)  # (qmin, qmax, symmetric) as ptq.py asks: int8 symmetric ...
UINT8 = (0, 255, False)  # ... or uint8 with a zero point
CALIBRATORS = [c.value for c in Calibrator]
HIST_CALIBRATORS = ["percentile", "entropy", "mse"]


# -- data: fixed seeds, cached (observers never write to their input) --------------------------------
@functools.lru_cache(maxsize=None)
def gaussian(n: int = 1_000_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def laplace(n: int = 1_000_000, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.empty(n).exponential_(generator=g)  # Laplace(0, 1) = Exp(1) with a random sign
    return magnitude * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)


@functools.lru_cache(maxsize=None)
def heavy_tailed(n: int = 200_000, outliers: int = 20, size: float = 400.0) -> torch.Tensor:
    """Gaussian bulk plus a few huge values of both signs (the first `outliers` entries)."""
    x = gaussian(n, seed=2).clone()
    x[:outliers] = size * torch.linspace(-1, 1, outliers).sign() * torch.linspace(0.5, 1, outliers)
    return x


DISTRIBUTIONS = {"gaussian": gaussian, "laplace": laplace}


def observe(obs, x: torch.Tensor, chunks: int = 10):
    for part in x.chunk(chunks):
        obs.update(part)
    return obs


def fq(x: torch.Tensor, qp: tuple[float, int], qmin: int, qmax: int) -> torch.Tensor:
    dtype = torch.int8 if qmin < 0 else torch.uint8
    return fake_quant_activation(x, qp[0], qp[1], qmin, qmax, dtype)


# -- construction and config --------------------------------------------------------------------------
def test_make_observer_from_a_name_or_from_the_config():
    assert {name: type(make_observer(name)) for name in CALIBRATORS} == {
        "minmax": MinMaxObserver, "percentile": PercentileObserver, "entropy": EntropyObserver, "mse": MSEObserver,
    }
    assert set(OBSERVERS) == set(CALIBRATORS)
    obs = make_observer(ActivationQuant(calibrator="percentile", percentile=99.5, bins=512))
    assert isinstance(obs, PercentileObserver) and (obs.percentile, obs.bins) == (99.5, 512)
    assert make_observer(ActivationQuant(calibrator="entropy", bins=4096)).bins == 4096
    assert isinstance(make_observer(ActivationQuant()), MinMaxObserver)  # the default stays minmax
    # A bare name gets the same parameters as the config's defaults.
    default = make_observer(ActivationQuant(calibrator="percentile"))
    assert (make_observer("percentile").percentile, make_observer("percentile").bins) == (default.percentile, default.bins)
    with pytest.raises(ValueError, match="unknown calibrator 'kl'"):
        make_observer("kl")


@pytest.mark.parametrize(
    "activations, field",
    [
        ({"percentile": 0}, "percentile"),
        ({"percentile": 101}, "percentile"),
        ({"percentile": -5}, "percentile"),
        ({"bins": 10}, "bins"),
        ({"bins": 255}, "bins"),
        ({"calibrator": "kl"}, "calibrator"),
    ],
)
def test_config_rejects_bad_calibrator_settings(activations, field):
    with pytest.raises(ConfigError) as info:
        QuantConfig.parse({"activations": activations})
    assert f"activations.{field}" in str(info.value)


def test_config_accepts_every_calibrator_and_the_edges_of_the_ranges():
    for name in CALIBRATORS:
        assert QuantConfig.parse({"activations": {"calibrator": name}}).activations.calibrator == name
    aq = QuantConfig.parse({"activations": {"calibrator": "percentile", "percentile": 100, "bins": 256}}).activations
    assert (aq.percentile, aq.bins) == (100.0, 256)
    assert (ActivationQuant().percentile, ActivationQuant().bins, ActivationQuant().calibrator) == (99.99, 2048, "minmax")


# -- the streaming histogram ----------------------------------------------------------------------
def _growing_stream() -> list[torch.Tensor]:
    """Batches whose magnitude grows by 10x each time, so the range (and the bin width) grows 9 times."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(5000, generator=g) * 10.0**k for k in range(-4, 6)]


STREAMS = {
    "gaussian": lambda: list(gaussian(200_000).chunk(10)),
    "growing": _growing_stream,
    "relu": lambda: list(torch.relu(laplace(200_000)).chunk(10)),
    "one_sided_negative": lambda: [-t.abs() for t in _growing_stream()],
}


@pytest.mark.parametrize("stream", list(STREAMS))
def test_streaming_equals_one_shot_exactly(stream):
    batches = STREAMS[stream]()
    one = HistogramObserver()
    one.update(torch.cat(batches))
    many = HistogramObserver()
    for b in batches:
        many.update(b)
    assert many.width == one.width and torch.equal(many.counts, one.counts)  # bit-identical, not "close"
    assert (many.lo, many.hi, many.total) == (one.lo, one.hi, one.total)
    # Hence every calibrator gives the very same range, whatever the batching or the order.
    for name in HIST_CALIBRATORS:
        for qmin, qmax, sym in (INT8, UINT8):
            ranges = []
            for order in (batches, batches[::-1], [torch.cat(batches)]):
                obs = make_observer(name)
                for b in order:
                    obs.update(b)
                ranges.append(obs.clip_range(qmin, qmax, sym))
            assert ranges[0] == ranges[1] == ranges[2], (name, sym)


def _direct_histogram(x: torch.Tensor, width: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of |x| at `width`, negatives and non-negatives apart, computed independently in float64."""
    v = x.double().numpy()
    j = np.floor(np.abs(v) / width).astype(np.int64)
    neg = np.bincount(j[v < 0], minlength=2 * bins)
    pos = np.bincount(j[v >= 0], minlength=2 * bins)
    return neg, pos


@pytest.mark.parametrize("bins", [256, 2048, 3000])  # 3000: not a power of two, growth still exact
def test_growth_rebins_exactly(bins):
    batches = _growing_stream()
    obs = HistogramObserver(bins)
    for b in batches:
        obs.update(b)
    x = torch.cat(batches)
    amax = float(x.abs().max())
    w = obs.width
    assert math.log2(w) == round(math.log2(w))  # a power of two
    assert bins * w <= amax < 2 * bins * w  # the range is resolved into [bins, 2*bins) bins
    neg, pos = _direct_histogram(x, w, bins)
    counts = obs.counts.numpy()
    assert np.array_equal(counts[2 * bins:], pos) and np.array_equal(counts[: 2 * bins][::-1], neg)
    folded, width = obs.abs_histogram()
    assert width == w and bins < folded.numel() <= 2 * bins and float(folded.sum()) == x.numel()


def test_memory_is_bounded_by_the_bin_count():
    g = torch.Generator().manual_seed(4)
    obs = HistogramObserver(512)
    total = 0
    for _ in range(300):
        scale = 10.0 ** float(torch.empty(1).uniform_(-6, 6, generator=g))
        batch = torch.randn(int(torch.randint(1, 4000, (1,), generator=g)), generator=g) * scale
        obs.update(batch)
        total += batch.numel()
        assert obs.counts.shape == (4 * 512,) and obs.counts.dtype == torch.int64  # never grows
    assert int(obs.counts.sum()) == obs.total == total
    counts, w = obs.abs_histogram()
    assert 512 < counts.numel() <= 1024 and (counts.numel() - 1) * w <= obs.amax < counts.numel() * w


def test_all_zero_batches_then_data():
    obs = HistogramObserver()
    obs.update(torch.zeros(100))
    assert obs.width is None and int(obs.counts.sum()) == 100
    obs.update(torch.tensor([0.0, -3.0, 5.0]))
    counts, w = obs.abs_histogram()
    assert counts[0] == 101 and counts.sum() == 103 and w > 0


# -- percentile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("p", [90.0, 99.0, 99.99])
def test_percentile_is_the_empirical_quantile_within_one_bin(dist, p):
    x = DISTRIBUTIONS[dist]()
    obs = observe(PercentileObserver(p), x)
    w = obs.width
    lo, hi = obs.clip_range(*INT8)
    expected = float(torch.quantile(x.abs(), p / 100))
    assert lo == -hi and abs(hi - expected) <= w
    lo, hi = obs.clip_range(*UINT8)
    assert abs(hi - float(torch.quantile(x, p / 100))) <= w
    assert abs(lo - float(torch.quantile(x, 1 - p / 100))) <= w


def test_percentile_100_is_minmax():
    x = laplace()
    obs = observe(PercentileObserver(100.0), x)
    assert obs.clip_range(*UINT8) == (float(x.min()), float(x.max()))
    assert obs.qparams(*INT8) == observe(MinMaxObserver(), x).qparams(*INT8)


# -- entropy (KL) -----------------------------------------------------------------------------------
def reference_kl_search(h: np.ndarray, levels: int, epsilon: float = 1e-4) -> tuple[int, np.ndarray]:
    """TensorRT's entropy pseudocode, one candidate at a time, building P and Q bin by bin; a bin where
    P > 0 and Q = 0 gets `epsilon` of a count in Q. Returns (bins kept by the best candidate, KL of
    every candidate i = levels .. len(h))."""
    n = len(h)
    kls = []
    for i in range(levels, n + 1):
        p = h[:i].copy()
        p[i - 1] += h[i:].sum()  # the outliers, clipped into the last bin
        group = ((2 * np.arange(i) + 1) * levels) // (2 * i)  # the level that holds each bin's centre
        group_total = np.bincount(group, weights=h[:i], minlength=levels)  # Q: from the slice, no outliers
        group_nonzero = np.bincount(group, weights=(p > 0).astype(float), minlength=levels)
        q = np.where(p > 0, group_total[group] / np.maximum(group_nonzero[group], 1), 0.0)
        q[(p > 0) & (q == 0)] = epsilon
        if h[:i].sum() == 0:  # everything clipped
            kls.append(math.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        with np.errstate(divide="ignore"):
            kls.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
    kls = np.array(kls)
    return levels + int(np.argmin(kls)), kls


ENTROPY_CASES = {
    # name: (data, (qmin, qmax, symmetric), levels the search must use)
    "gaussian_int8": (gaussian, INT8, 128),
    "laplace_int8": (laplace, INT8, 128),
    "laplace_uint8_both_signs": (laplace, UINT8, 128),
    "relu_gaussian_uint8": (lambda: torch.relu(gaussian()), UINT8, 256),  # one sign: the whole grid
}


@pytest.mark.parametrize("case", list(ENTROPY_CASES))
def test_entropy_threshold_matches_a_loop_reference(case):
    make, (qmin, qmax, sym), levels = ENTROPY_CASES[case]
    x = make()
    obs = observe(EntropyObserver(), x)
    counts, w = obs.abs_histogram(exact_zeros=False)
    best_bins, ref_kl = reference_kl_search(counts.numpy(), levels)
    thresholds, kl = obs.divergences(qmin, qmax, sym)
    assert len(kl) == len(ref_kl) and thresholds[0] == levels * w  # the search starts at `levels` bins
    assert np.array_equal(np.isinf(kl.numpy()), np.isinf(ref_kl))
    finite = np.isfinite(ref_kl)
    np.testing.assert_allclose(kl.numpy()[finite], ref_kl[finite], rtol=1e-9, atol=1e-12)
    expected = min(best_bins * w, obs.amax)
    lo, hi = obs.clip_range(qmin, qmax, sym)
    assert abs(hi - expected) <= w
    assert lo == (-hi if sym else max(obs.lo, -hi))
    assert hi < obs.amax  # something is clipped on these long-tailed samples


@pytest.mark.parametrize("name", ["entropy", "mse"])
def test_exact_zeros_do_not_move_the_entropy_or_mse_clip(name):
    # A ReLU output is often half zeros. They are exact on every grid, so piling on more of them
    # must not change the clip (with them in bin 0, the KL search on ReLU(N(0,1)) falls to 1.8).
    x = torch.relu(gaussian(200_000))
    more_zeros = torch.cat([x, torch.zeros(1_000_000)])
    for qmin, qmax, sym in (INT8, UINT8):
        clip = observe(make_observer(name), x).clip_range(qmin, qmax, sym)
        assert observe(make_observer(name), more_zeros).clip_range(qmin, qmax, sym) == clip
        assert clip[1] > 0.8 * float(x.max())  # a half-normal: only the sparse tail is clipped


@pytest.mark.parametrize("qmin, qmax, sym", [INT8, UINT8])
def test_entropy_beats_minmax_on_the_bulk_of_a_heavy_tailed_tensor(qmin, qmax, sym):
    x = heavy_tailed()
    bulk = x[20:]
    ent = observe(EntropyObserver(), x).qparams(qmin, qmax, sym)
    mm = observe(MinMaxObserver(), x).qparams(qmin, qmax, sym)
    assert ent[0] < mm[0] / 10  # a much finer step: the outliers are clipped
    assert sqnr_db(bulk, fq(bulk, ent, qmin, qmax)) > sqnr_db(bulk, fq(bulk, mm, qmin, qmax)) + 15


# -- MSE --------------------------------------------------------------------------------------------
def numeric_sq_error(counts, origin, width, scale, zero_point, qmin, qmax, points=16) -> float:
    """Mean squared error of the runtime's fake-quant over `points` evenly spaced values per bin."""
    idx = torch.nonzero(counts).flatten().double()
    offsets = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    values = (origin + (idx[:, None] + offsets[None, :]) * width).float()
    err = (fq(values, (scale, zero_point), qmin, qmax).double() - values.double()) ** 2
    return float((err.mean(1) * counts[counts > 0]).sum() / counts.sum())


@pytest.mark.parametrize("qmin, qmax, sym", [INT8, UINT8])
def test_mse_objective_is_the_integrated_quantization_error(qmin, qmax, sym):
    obs = observe(MSEObserver(), heavy_tailed())
    counts, w = obs.signed_histogram(exact_zeros=False)
    origin = -2 * obs.bins * w
    ranges, errors = obs.candidates(qmin, qmax, sym)
    for k in (0, 40, 100, 150, len(ranges) - 1):  # from bins wider than a step up to min-max
        s, zp = affine_qparams(*ranges[k], qmin, qmax, sym)
        closed = expected_sq_error(counts, origin, w, torch.tensor([s]), torch.tensor([zp]), qmin, qmax, obs.total)
        assert float(closed[0]) == pytest.approx(float(errors[k]), rel=1e-12)
        numeric = numeric_sq_error(counts, origin, w, s, zp, qmin, qmax, points=64)
        assert float(closed[0]) == pytest.approx(numeric, rel=2e-3)


@pytest.mark.parametrize("data", ["heavy_tailed", "laplace"])
@pytest.mark.parametrize("qmin, qmax, sym", [INT8, UINT8])
def test_mse_clip_is_the_brute_force_best_candidate(data, qmin, qmax, sym):
    x = heavy_tailed() if data == "heavy_tailed" else laplace(200_000)
    obs = observe(MSEObserver(), x)
    counts, w = obs.signed_histogram(exact_zeros=False)
    ranges, _ = obs.candidates(qmin, qmax, sym)
    brute = [
        numeric_sq_error(counts, -2 * obs.bins * w, w, *affine_qparams(*r, qmin, qmax, sym), qmin, qmax)
        for r in ranges
    ]
    assert obs.clip_range(qmin, qmax, sym) == ranges[int(np.argmin(brute))]


@pytest.mark.parametrize("qmin, qmax, sym", [INT8, UINT8])
def test_mse_error_on_the_real_tensor_beats_minmax_and_is_near_the_best(qmin, qmax, sym):
    x = heavy_tailed()
    obs = observe(MSEObserver(), x)

    def true_mse(qp):
        return float(((fq(x, qp, qmin, qmax) - x).double() ** 2).mean())

    ours = true_mse(obs.qparams(qmin, qmax, sym))
    minmax = true_mse(observe(MinMaxObserver(), x).qparams(qmin, qmax, sym))
    best = min(true_mse(affine_qparams(*r, qmin, qmax, sym)) for r in obs.candidates(qmin, qmax, sym)[0])
    assert ours < minmax
    assert ours <= best * 1.02  # the histogram's estimate picks (almost) the truly best candidate


# -- degenerate and bad data ---------------------------------------------------------------------
DEGENERATE = {
    "zeros": torch.zeros(1000),
    "constant": torch.full((1000,), 3.0),
    "negative_constant": torch.full((64,), -2.5),
    "single_value": torch.tensor([0.7]),
    "subnormal": torch.tensor([0.0, 1e-40, -1e-41]),
    "huge": torch.tensor([3e38, -3e38, 1.0]),
}


@pytest.mark.parametrize("name", CALIBRATORS)
@pytest.mark.parametrize("data", list(DEGENERATE))
@pytest.mark.parametrize("qmin, qmax, sym", [INT8, UINT8])
def test_degenerate_tensors_give_a_finite_positive_scale(name, data, qmin, qmax, sym):
    x = DEGENERATE[data]
    obs = make_observer(name)
    obs.update(x)
    scale, zp = obs.qparams(qmin, qmax, sym)
    assert math.isfinite(scale) and scale > 0 and qmin <= zp <= qmax
    if data == "zeros":
        assert scale == 1.0
    if data in ("constant", "negative_constant", "single_value"):  # the value itself is representable
        assert float((fq(x, (scale, zp), qmin, qmax) - x).abs().max()) <= scale / 2 * (1 + 1e-6)


@pytest.mark.parametrize("name", CALIBRATORS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_is_a_data_error_naming_the_fix(name, bad):
    obs = make_observer(name)
    obs.update(torch.randn(100))
    obs.update(torch.tensor([1.0, bad, 2.0]))  # reported when the range is asked for, not in the hook
    obs.update(torch.randn(100))
    with pytest.raises(DataError) as info:
        obs.qparams(*UINT8)
    msg = str(info.value)
    assert "NaN/Inf" in msg and "check the inputs or the model" in msg and "1 of 3 batches" in msg
    assert ("1 NaN" if math.isnan(bad) else "1 infinite") in msg


@pytest.mark.parametrize("name", CALIBRATORS)
def test_no_data_is_a_runtime_error(name):
    obs = make_observer(name)
    obs.update(torch.empty(0))  # ignored
    with pytest.raises(RuntimeError, match="saw no data"):
        obs.qparams(*INT8)


def test_bad_observer_arguments():
    with pytest.raises(ValueError, match="bins"):
        HistogramObserver(100)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(0.0)


# -- through quantize ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CALIBRATORS)
@pytest.mark.parametrize("case_name", ["flatten", "attention"])
def test_every_calibrator_quantizes_a_model(name, case_name):
    case = CASES[case_name]
    model, data = case.model(), case.batches()
    q = st.quantize(model, {"activations": {"calibrator": name}}, data=data, progress=False)
    for layer in quantized_layers(q).values():
        for aq in (layer.input_quant, layer.output_quant):
            assert math.isfinite(aq.scale) and aq.scale > 0
    with torch.no_grad():
        ref = torch.cat([model(x) for x in data])
        out = torch.cat([q(x) for x in data])
    assert sqnr_db(ref, out) > 20


def test_entropy_never_clips_more_than_the_guard_allows():
    # 80 % of the values sit on one spike (an image's background), 20 % spread above it: plain KL keeps
    # the spike and clips the spread tail, which on the MNIST CNN cost 6.6 points of accuracy.
    from shrinktunnel.quant.observers import MAX_CLIPPED, EntropyObserver

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.full((800_000,), 0.4242), torch.rand(200_000, generator=g) * 2.8])
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.clip_range(0, 255, False)
    clipped = float((x > hi).double().mean())
    assert clipped <= MAX_CLIPPED
    assert hi > 2.7
