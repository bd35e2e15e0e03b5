"""The `decompose` method on the tiny awkward nets: what is replaced, what is skipped and listed, bad input,
copy semantics, save -> load bit-identical, ONNX Runtime against PyTorch, recipes, the budget."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from conftest import CASES, Case, sqnr_db, snapshot, state_dicts_equal
from shrinktunnel.decomposition import LowRank
from shrinktunnel.decomposition import budget as B

NO_TIMING = {"keep_if_slower": False}  # tiny layers time as noise; the timing rule has its own test


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _decompose(model, config=None, data=None, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = st.decompose(model, config, data=data, progress=False, **kw)
    return out, [str(w.message) for w in caught]


def _lowrank(model) -> dict[str, LowRank]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRank)}


# -- every tiny net --------------------------------------------------------------------------------

EXPECTED = {  # the layers each case must decompose at energy 1 (full rank) with the default tucker2 scheme
    "residual": {"conv1", "conv2"},
    "functional_relu": {"fc1", "fc2"},
    "conv1d": {"body.0", "body.2"},
    "grouped_conv": set(),  # depthwise and grouped: warned, left whole
    "flatten": {"fc"},  # features.0 has 1 input channel: at full rank its Tucker-2 form is larger (warned)
    "attention": {"q", "k", "v", "o"},
    "unsupported": {"head"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_full_rank_keeps_outputs_and_lists_what_it_skips(name):
    case: Case = CASES[name]
    model = case.model()
    data = case.batches(2, 8)
    before = snapshot(model)
    out, warned = _decompose(model, {"energy": 1.0, **NO_TIMING}, data=data)
    assert state_dicts_equal(model, before)  # the caller's model is not changed
    # At full rank most decomposed forms are larger than the layer and stay whole: what is left must be exact
    # where decomposed, and each layer left whole must be listed.
    replaced = set(_lowrank(out))
    for layer in EXPECTED[name] - replaced:
        assert any(layer in w and "left whole" in w for w in warned), (layer, warned)
    with torch.no_grad():
        for x in data:
            assert sqnr_db(model(x), out(x)) > 80
    if name == "grouped_conv":
        assert any(w.startswith("decompose: dw") and "a depthwise convolution" in w for w in warned)
        assert any("gc" in w and "a grouped convolution" in w for w in warned)
    if name == "unsupported":
        assert any("emb" in w and "Embedding is not a layer kind" in w for w in warned)
        assert any("lstm" in w and "LSTM" in w for w in warned)


@pytest.mark.parametrize("name", ["residual", "conv1d", "flatten", "attention"])
def test_save_load_bit_identical_and_onnx(name, tmp_path):
    import onnxruntime as ort

    case = CASES[name]
    model = case.model()
    data = case.batches(2, 8)
    out, _ = _decompose(model, {"rank": 2, **NO_TIMING}, data=data)
    assert _lowrank(out)
    loaded = st.load(st.save(out, tmp_path / "art"), model=case.model(seed=5))  # other values, same architecture
    assert [type(m) for m in loaded.modules()] == [type(m) for m in out.modules()]
    with torch.no_grad():
        for x in data:
            torch.testing.assert_close(loaded(x), out(x), atol=0, rtol=0)
    path = st.export_onnx(loaded, tmp_path / "m.onnx", example_inputs=data[0])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[1]
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), out(x).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["spatial", "channel", "tucker2", "cp"])
def test_each_conv_scheme_round_trips(scheme, tmp_path):
    case = CASES["residual"]
    model = case.model()
    data = case.batches(1, 4)
    out, _ = _decompose(model, {"conv_scheme": scheme, "ratio": 0.6, **NO_TIMING}, data=data)
    assert {m.scheme for m in _lowrank(out).values()} == {scheme}
    loaded = st.load(st.save(out, tmp_path / "a"), model=case.model())
    torch.testing.assert_close(loaded(data[0]), out(data[0]), atol=0, rtol=0)


def test_scheme_needing_2d_kernel_on_conv1d_is_listed():
    case = CASES["conv1d"]
    out, warned = _decompose(case.model(), {"conv_scheme": "spatial", "ratio": 0.5, **NO_TIMING})
    assert not _lowrank(out)
    (w,) = [w for w in warned if "scheme spatial needs a 2-d kernel" in w]  # one warning for both layers
    assert w.count(",") >= 1


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, words", [
    ({"rank": 0}, ["rank=0", "at least 1"]),
    ({"rank": -3}, ["rank=-3", "at least 1"]),
    ({"energy": 0}, ["energy=0", "(0, 1]"]),
    ({"energy": 1.5}, ["energy=1.5", "(0, 1]"]),
    ({"ratio": 1.0}, ["ratio=1.0", "(0, 1)"]),
    ({"budget": 0}, ["budget=0", "(0, 1)"]),
    ({"budget_candidates": [0.5, 1.0]}, ["budget_candidates=[0.5, 1.0]", "(0, 1)"]),
    ({"method": "asvd"}, ["method"]),
    ({"rank": 2, "energy": 0.9}, ["rank and energy", "set one of"]),
    ({"rank": [1, 2, 3]}, ["3 entries"]),
    ({"conv_scheme": "svd2"}, ["conv_scheme"]),
    ({"ranks": 3}, ["unknown key 'ranks'", "did you mean 'rank'"]),
    ({"overrides": [{"pattern": "x", "rank": 0}]}, ["rank=0"]),
])
def test_bad_config_is_a_config_error(config, words):
    with pytest.raises(st.ConfigError) as exc:
        st.DecomposeConfig.parse(config)
    for w in words:
        assert w in str(exc.value)


def test_rank_above_full_rank_names_the_layer():
    model = CASES["functional_relu"].model()  # fc1 7 -> 13 (full rank 7), fc2 13 -> 5 (full rank 5)
    with pytest.raises(st.ConfigError) as exc:
        st.decompose(model, {"rank": 6, **NO_TIMING}, progress=False)
    msg = str(exc.value)
    assert "rank=6" in msg and "fc2" in msg and "full rank is 5" in msg and "override" in msg


def test_tucker2_rank_pair_is_checked_per_mode():
    model = CASES["residual"].model()  # 3 -> 3 channels
    with pytest.raises(st.ConfigError, match=r"rank=\[2, 4\] is out of range for conv1"):
        st.decompose(model, {"rank": [2, 4], **NO_TIMING}, progress=False)


@pytest.mark.parametrize("config", [{"ratio": 0.5}, {"ratio": 0.3}, {"rank": [20, 1]}])
def test_tucker2_ranks_stay_within_what_the_core_can_hold(config):
    # A thin input side (3 channels, 3 x 3 kernel): with r_in = 1 the core (r_out, 1, 3, 3) has room for 9
    # output directions, not more (timm's efficientnet_b0 stem failed with ranks [10, 1]).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False)).eval()
    out, _ = _decompose(model, {"conv_scheme": "tucker2", **config, **NO_TIMING})
    (layer,) = _lowrank(out).values()
    r_out, r_in = layer.ranks
    assert r_out <= 9 * r_in and r_in <= 9 * r_out
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(nn.functional.conv2d(x, layer.weight, None, 2, 1), out(x), atol=1e-5, rtol=1e-5)


def test_budget_without_data_is_a_data_error():
    with pytest.raises(st.DataError, match="budget needs data"):
        st.decompose(CASES["residual"].model(), {"budget": 0.5}, progress=False)


# -- what pays ---------------------------------------------------------------------------------------

def test_larger_form_is_left_whole_and_listed():
    model = CASES["functional_relu"].model()
    out, warned = _decompose(model, {"rank": 4, **NO_TIMING})  # fc2 at rank 4: 4 * (13 + 5) = 72 >= 65 weights
    assert isinstance(out.fc2, nn.Linear) and isinstance(out.fc1, LowRank)  # fc1: 4 * (7 + 13) = 80 < 91
    assert any(w.startswith("decompose: fc2:") and "no fewer weights than the layer" in w for w in warned)


def test_slower_form_is_left_whole_and_listed(monkeypatch):
    calls = []

    def slower(whole, decomposed, x, threads=None):
        calls.append(tuple(x.shape))
        return True, 1.0, 2.0

    monkeypatch.setattr(B, "is_slower", slower)
    case = CASES["attention"]
    out, warned = _decompose(case.model(), {"rank": 2}, data=case.batches(1, 4))
    assert not _lowrank(out)
    assert calls and all(s == (4, 5, 16) for s in calls)  # timed on each layer's real input
    (w,) = [w for w in warned if "ran slower" in w]  # one warning for the four layers
    assert w.count(",") + w.count(" and ") >= 3


def test_is_slower_times_real_modules():
    big = nn.Linear(256, 256)
    tiny_rank = B.is_slower(big, nn.Sequential(nn.Linear(256, 2, bias=False), nn.Linear(2, 256)), torch.randn(64, 256))
    assert tiny_rank[1] > 0 and tiny_rank[2] > 0


def test_busy_machine_times_on_one_thread(monkeypatch):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads, note = B.timing_threads()
    finally:
        torch.set_num_threads(previous)
    assert threads == 1 and "load average 99.0" in note
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert B.timing_threads() == (torch.get_num_threads(), None)


def test_no_data_warns_that_nothing_was_timed():
    _, warned = _decompose(CASES["functional_relu"].model(), {"rank": 2})
    assert any("no layer could be timed" in w for w in warned)


# -- overrides, sharing, tying -----------------------------------------------------------------------

def test_overrides_last_match_wins():
    model = CASES["attention"].model()
    cfg = {"rank": 4, **NO_TIMING, "overrides": [{"pattern": "*", "ratio": 0.2}, {"pattern": "o", "rank": 3},
                                                   {"pattern": "k", "skip": True}]}
    out, _ = _decompose(model, cfg)
    lr = _lowrank(out)
    assert lr["q"].ranks == [1] and lr["v"].ranks == [1] and lr["o"].ranks == [3] and "k" not in lr


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = self.a  # one layer, two names
        self.emb = nn.Embedding(10, 16)
        self.head = nn.Linear(16, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_shared_layer_once_under_both_names_and_tied_weights_skipped(tmp_path):
    torch.manual_seed(0)
    model = Shared().eval()
    out, warned = _decompose(model, {"rank": 4, **NO_TIMING})
    assert out.a is out.b and isinstance(out.a, LowRank)
    assert isinstance(out.head, nn.Linear) and any(w.startswith("decompose: head:") and "shares its weight with emb" in w for w in warned)
    torch.manual_seed(1)
    loaded = st.load(st.save(out, tmp_path / "s"), model=Shared())
    assert loaded.a is loaded.b
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), out(x), atol=0, rtol=0)


def test_unmatched_pattern_and_nothing_selected_are_listed():
    out, warned = _decompose(CASES["functional_relu"].model(), {"layers": ["nothing*"], **NO_TIMING})
    assert any("'nothing*' matches no module" in w for w in warned)
    assert any("the model is unchanged" in w for w in warned)


# -- budget ------------------------------------------------------------------------------------------

def test_allocate_takes_the_cheapest_error_per_saving():
    C = B.Candidate
    options = {
        "a": [C(None, None, 100), C([1], object(), 50, error=0.1), C([1], object(), 20, error=0.5)],
        "b": [C(None, None, 100), C([1], object(), 50, error=0.01)],
    }
    choice, cost = B.allocate(options, 200, 150)
    assert choice == {"a": 0, "b": 1} and cost == 150
    choice, cost = B.allocate(options, 200, 120)
    assert choice == {"a": 1, "b": 1} and cost == 100
    choice, cost = B.allocate(options, 200, 10)  # unreachable: everything at its cheapest
    assert choice == {"a": 2, "b": 1} and cost == 70


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_budget_is_met_and_measured(metric):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    out, warned = _decompose(model, {"budget": 0.5, "budget_metric": metric, **NO_TIMING}, data=data)
    if metric == "macs":
        before, after = st.measure.count_macs(model, ((data[0],), {})), st.measure.count_macs(out, ((data[0],), {}))
    else:
        before, after = st.measure.count_weights(model), st.measure.count_weights(out)
    assert after <= 0.5 * before
    assert not any("not reached" in w for w in warned)
    with torch.no_grad():
        assert sqnr_db(model(data[0]), out(data[0])) > 3  # a real approximation, not noise


def test_budget_unreachable_is_listed():
    case = CASES["functional_relu"]
    _, warned = _decompose(case.model(), {"budget": 0.05, "budget_metric": "params", **NO_TIMING}, data=case.batches(2, 8))
    assert any("budget 0.05 of the model's params not reached" in w for w in warned)


# -- recipes and recovery ----------------------------------------------------------------------------

def test_recipe_stage_then_quantize_round_trips(tmp_path):
    case = CASES["flatten"]
    data = case.batches(2, 8)
    recipe = "stages:\n  - decompose: {rank: 3, keep_if_slower: false}\n  - quantize: {activations: null}\n"
    result = st.compress(case.model(), recipe, data=data, progress=False)
    assert isinstance(result.model.fc, LowRank)
    loaded = st.load(result.save(tmp_path / "r"), model=case.model())
    torch.testing.assert_close(loaded(data[0]), result.model(data[0]), atol=0, rtol=0)


def test_fine_tune_recovers_and_needs_labels():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 3, 12, 12, generator=g) for _ in range(4)]
    labelled = [(x, model(x).argmax(1).detach()) for x in xs]  # the original model's own decisions
    # method svd: this random net's logits are nearly tied, and whitened SVD keeps every decision already,
    # leaving nothing for fine-tuning to recover
    base = {"ratio": 0.2, "method": "svd", **NO_TIMING}
    plain, _ = _decompose(model, base, data=labelled)
    tuned, _ = _decompose(model, {**base, "fine_tune": {"epochs": 10, "lr": 3e-3}}, data=labelled)
    agree = lambda m: sum(int((m(x).argmax(1) == y).sum()) for x, y in labelled)  # noqa: E731
    with torch.no_grad():
        assert agree(tuned) > agree(plain)
    with pytest.raises(st.DataError, match="labelled"):
        st.decompose(model, {**base, "fine_tune": {"epochs": 1}}, data=xs, progress=False)


def test_budget_drops_slower_choices_and_chooses_again(monkeypatch):
    timed = []

    def slower_below_half(whole, decomposed, x, threads=None):  # pretend every form of features.2 is slower
        timed.append(decomposed)
        return decomposed[0].in_channels == 16, 1.0, 2.0

    monkeypatch.setattr(B, "is_slower", slower_below_half)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    out, warned = _decompose(model, {"budget": 0.6}, data=data)
    assert isinstance(out.features[2], nn.Conv2d)  # every candidate of it was dropped
    assert any("features.2: the tucker2 form" in w and "not used" in w for w in warned)
    assert timed and len(timed) == len({id(t) for t in timed})  # each candidate timed at most once


def test_budget_with_a_fixed_layer_counts_it_at_its_cost():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    cfg = {"budget": 0.5, "budget_metric": "params", **NO_TIMING, "overrides": [{"pattern": "features.4", "ratio": 0.3}]}
    out, warned = _decompose(model, cfg, data=data)
    assert isinstance(out.features[4], LowRank)
    assert st.measure.count_weights(out.features[4]) - 32 <= 0.3 * 32 * 32 * 9  # its rule, not the budget's
    assert st.measure.count_weights(out) <= 0.5 * st.measure.count_weights(model)
