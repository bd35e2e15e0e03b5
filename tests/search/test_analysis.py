"""st.analyze on tiny nets: exact per-layer figures, sensitivities that order as they must, the cache
(second run instant, resume after an interruption), failures and skips reported, never silent."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

from conftest import CASES
from shrinktunnel.errors import ConfigError, ModelError
from shrinktunnel.search import Action, Analysis, analyze
from shrinktunnel.search import ACTIONS
from shrinktunnel.core.pareto import pareto_front

FAST = dict(progress=False, latency_runs=2)


class WideMLP(nn.Module):
    """Big enough that 8- and 4-bit weights shrink the artifact despite the manifest's specs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 128)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return WideMLP().eval()


def wide_data(seed: int = 1, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 32, generator=g) for _ in range(n)]


def test_layer_figures_are_exact_and_sensitivity_orders_by_bits(tmp_path):
    model = wide_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = analyze(model, wide_data(), actions=["quant8", "quant4", "quant2"], **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    assert [lp.name for lp in a.layers] == ["fc1", "fc2"]
    fc1, fc2 = a.layers
    assert (fc1.params, fc2.params) == (32 * 128 + 128, 128 * 10 + 10)
    assert (fc1.macs, fc2.macs) == (32 * 128, 128 * 10)  # per sample
    assert (fc1.bytes, fc2.bytes) == (4 * fc1.params, 4 * fc2.params)
    assert a.totals["macs"] == 32 * 128 + 128 * 10 and a.totals["params"] == fc1.params + fc2.params
    shares = [lp.latency_share for lp in a.layers]
    assert all(0 < s < 1 for s in shares) and sum(shares) + a.totals["other_latency_share"] == pytest.approx(1.0)
    assert a.metric_name.startswith("cosine") and a.baseline == 1.0
    for layer in ("fc1", "fc2"):
        d8, d4, d2 = (a.drop(layer, n) for n in ("quant8", "quant4", "quant2"))
        assert 0 <= d8 < 1e-4 < d4 < d2  # fewer bits, more loss; 8 bits near lossless
        r = a.results[layer]
        assert r["quant2"]["bytes_after"] < r["quant4"]["bytes_after"] < r["quant8"]["bytes_after"] < a.layers[0 if layer == "fc1" else 1].bytes
        assert r["quant8"]["macs_after"] == (fc1.macs if layer == "fc1" else fc2.macs)  # quantization keeps MACs
    # fc1 at 8 bits: 4096 int8 weights instead of float32 saves 12 KiB, less 1 KiB of per-channel scales
    # and zero points, less the layer's spec in the manifest (about 1.5 KB of JSON).
    saved = fc1.bytes - a.results["fc1"]["quant8"]["bytes_after"]
    assert 3 * 4096 - 1024 - 3000 < saved < 3 * 4096 - 1024


def test_eval_fn_metric_and_json_round_trip(tmp_path):
    model = wide_mlp()
    data = wide_data()
    target = [model(x).argmax(1) for x in data]  # labels the float model gets right

    def agreement(m):
        return sum(float((m(x).argmax(1) == y).float().mean()) for x, y in zip(data, target)) / len(data)

    a = analyze(model, data, eval_fn=agreement, actions=["quant8", "quant2"], **FAST)
    assert a.metric_name == "eval_fn" and a.baseline == 1.0
    assert all(a.results[n]["quant8"]["metric"] == pytest.approx(1 - a.drop(n, "quant8")) for n in ("fc1", "fc2"))
    jpath, hpath = a.save(tmp_path)
    back = Analysis.from_dict(json.loads(jpath.read_text()))
    assert back.table().rows == a.table().rows and back.results == a.results
    assert hpath.read_text().startswith("<!DOCTYPE html>")


def test_second_run_reads_the_cache_and_an_interrupted_run_resumes(tmp_path):
    model, data = wide_mlp(), wide_data()

    class Counter:  # an object, not a dict: values a metric closes over are part of the cache key
        n = 0

    calls = Counter()

    def metric(m):
        calls.n += 1
        if calls.n == 3:  # the original, then one candidate: the third call is "killed"
            raise KeyboardInterrupt
        return float(m(data[0]).sum())

    with pytest.raises(KeyboardInterrupt):
        analyze(model, data, eval_fn=metric, actions=["quant8", "quant4"], cache_dir=tmp_path, **FAST)
    calls.n = 10
    first = analyze(model, data, eval_fn=metric, actions=["quant8", "quant4"], cache_dir=tmp_path, **FAST)
    assert first.cache["hits"] == 1 and first.cache["evaluated"] == 3  # resumed: one entry kept from the killed run
    assert calls.n == 13  # the three missing evaluations; the baseline came from the cache too
    t0 = time.perf_counter()
    second = analyze(model, data, eval_fn=metric, actions=["quant8", "quant4"], cache_dir=tmp_path, **FAST)
    elapsed = time.perf_counter() - t0
    assert calls.n == 13 and second.cache == {**first.cache, "hits": 4, "evaluated": 0}
    assert second.results == first.results and second.layers == first.layers
    assert elapsed < 2.0, f"a fully cached analysis took {elapsed:.2f} s"
    # A different data set, or other weights, is another key: everything is measured again.
    third = analyze(model, wide_data(seed=2), eval_fn=metric, actions=["quant8"], cache_dir=tmp_path, **FAST)
    assert third.cache["hits"] == 0 and third.cache["evaluated"] == 2
    other = wide_mlp()
    with torch.no_grad():
        other.fc1.weight[0, 0] += 1
    assert analyze(other, data, eval_fn=metric, actions=["quant8"], cache_dir=tmp_path, **FAST).cache["hits"] == 0


def test_eval_fn_that_captures_other_data_is_another_cache_key(tmp_path):
    model, data = wide_mlp(), wide_data()

    def scorer(batches):
        return lambda m: float(sum(m(x).sum() for x in batches))

    a = analyze(model, data, eval_fn=scorer(data), actions=["quant8"], cache_dir=tmp_path, **FAST)
    b = analyze(model, data, eval_fn=scorer(wide_data(seed=5)), actions=["quant8"], cache_dir=tmp_path, **FAST)
    assert a.cache["evaluated"] == 2 and b.cache["evaluated"] == 2 and a.baseline != b.baseline
    from functools import partial

    def score(m, batches):
        return float(sum(m(x).sum() for x in batches))

    c = analyze(model, data, eval_fn=partial(score, batches=data), actions=["quant8"], cache_dir=tmp_path, **FAST)
    d = analyze(model, data, eval_fn=partial(score, batches=wide_data(seed=5)), actions=["quant8"], cache_dir=tmp_path, **FAST)
    assert c.cache["evaluated"] == 2 and d.cache["evaluated"] == 2 and c.baseline == a.baseline and d.baseline == b.baseline


def test_failed_and_nan_candidates_are_marked_and_the_analysis_goes_on():
    model, data = wide_mlp(), wide_data()
    reference = model(data[0])

    def metric(m):
        out = m(data[0])
        if torch.equal(out, reference):
            return 1.0
        if isinstance(m.fc1, nn.Linear):  # fc2 was changed
            return math.nan
        raise RuntimeError("metric exploded")

    a = analyze(model, data, eval_fn=metric, actions=["quant8"], **FAST)
    assert a.results["fc1"]["quant8"]["status"] == "failed" and "metric exploded" in a.results["fc1"]["quant8"]["note"]
    assert a.results["fc2"]["quant8"]["status"] == "failed" and "NaN" in a.results["fc2"]["quant8"]["note"]
    assert a.drop("fc1", "quant8") is None and len(a.warnings) == 2
    assert "fail" in a.table().rows[0]


def test_unsupported_layers_are_skipped_with_the_methods_reason():
    case = CASES["unsupported"]
    a = analyze(case.model(), case.batches(2, 8), actions=["quant8"], **FAST)
    assert [lp.name for lp in a.layers] == ["emb", "lstm", "head"]
    for layer in case.quantized:  # the layers quantize handles (the Embedding too, once quantize takes it)
        assert a.results[layer]["quant8"]["status"] == "ok"
    for layer in {"emb"} - set(case.quantized):
        entry = a.results[layer]["quant8"]
        assert entry["status"] == "skipped" and "not a supported layer kind" in entry["note"] and layer in entry["note"]
    assert a.results["lstm"]["quant8"]["status"] == "ok"  # int8 weight-only (core/recurrent.py)


def test_actions_resolution_and_bad_input():
    model, data = wide_mlp(), wide_data(n=1)
    with pytest.raises(ConfigError, match="unknown action 'quant5'.*known actions: quant8"):
        analyze(model, data, actions=["quant5"], **FAST)
    with pytest.raises(ConfigError, match="given twice"):
        analyze(model, data, actions=["quant8", ACTIONS["quant8"]], **FAST)
    by_name = analyze(model, data, actions=["quant4", "quant3"], **FAST)  # quant3: by name, not a default
    r = by_name.results["fc1"]
    assert 0 < by_name.drop("fc1", "quant4") < by_name.drop("fc1", "quant3")
    assert r["quant4"]["bytes_after"] - r["quant3"]["bytes_after"] == 32 * 128 // 8  # one bit less per weight, packed
    gptq = analyze(model, data, actions=["quant3", "gptq3"], **FAST)  # same bytes, GPTQ's rounding
    for layer in ("fc1", "fc2"):
        g = gptq.results[layer]
        assert abs(g["gptq3"]["bytes_after"] - g["quant3"]["bytes_after"]) <= 3  # "gptq" vs "nearest" in the manifest
        assert 0 < gptq.drop(layer, "gptq3") < gptq.drop(layer, "quant3")
    never = Action("never", "no_such_method", lambda layer: {}, "x")
    bad = Action("bad", "quantize", lambda layer: {"weights": {"bits": 9}, "layers": [layer]}, "quantize")
    a = analyze(model, data, actions=["quant8", never, bad], **FAST)
    assert [x["name"] for x in a.actions] == ["quant8"]
    assert any("never" in n and "not registered" in n for n in a.skipped_actions)
    assert any("bad" in n and "bits=9" in n for n in a.skipped_actions)
    with pytest.raises(ModelError, match="no layer with a weight matches"):
        analyze(model, data, actions=["quant8"], layers=["nothing*"], **FAST)


def test_pareto_front():
    costs = [10, 5, 5, 8, None, 3, 12]
    metrics = [0.9, 0.8, 0.85, 0.85, 1.0, 0.5, 0.95]
    assert pareto_front(costs, metrics) == [5, 2, 0, 6]
    assert pareto_front([1, 1], [0.5, 0.5]) == [0]


def test_chained_and_static_int8_actions():
    from shrinktunnel.core.registry import METHODS

    model, data = wide_mlp(), wide_data()
    a = analyze(model, data, actions=["int8", "prune75+share2"], **FAST)
    assert a.results["fc1"]["int8"]["status"] == "ok" and 0 <= a.drop("fc1", "int8") < 1e-3
    if {"prune", "cluster"} <= set(METHODS):  # the chain: prune 75 %, then a 4-entry codebook, same layer
        e = a.results["fc1"]["prune75+share2"]
        # about half: both artifacts carry the same manifest (a few hundred bytes more for the chain's two stages)
        assert e["status"] == "ok" and e["bytes_after"] < a.results["fc1"]["int8"]["bytes_after"] * 0.55
    else:
        assert any(n.startswith("prune75+share2: skipped, method") for n in a.skipped_actions)


def test_histogram_grid_of_a_quantized_layer_holds_its_weights():
    import shrinktunnel as st
    from shrinktunnel.search.histogram import float_weight, layer_histogram

    q = st.quantize(wide_mlp(), {"weights": {"bits": 4}, "activations": None}, progress=False)
    h = layer_histogram(q.fc1, "fc1", bits=None)
    assert len(h["grid"]) == 15 and "4-bit quantization grid" in h["grid_label"]
    row = float_weight(q.fc1)[h["channel"]]
    grid = torch.tensor(h["grid"], dtype=torch.float64)
    assert float((row.double()[:, None] - grid[None]).abs().min(dim=1).values.max()) < 1e-6  # every weight on the grid
    assert sum(h["counts"]) == row.numel() == 32


class EmbedMLP(nn.Module):
    """Embedding -> mean -> Linear, with a tied copy of the Linear (an alias in the artifact)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc = nn.Linear(32, 8)
        self.again = self.fc

    def forward(self, ids):
        return self.again(self.emb(ids).mean(1))


def test_artifact_size_in_memory_equals_the_saved_artifact_byte_for_byte(tmp_path):
    import shrinktunnel as st
    from shrinktunnel.core.artifact import save_artifact
    from shrinktunnel.measure.size import artifact_bytes
    from shrinktunnel.search.analysis import artifact_size

    torch.manual_seed(0)
    model = EmbedMLP().eval()
    ids = [torch.randint(0, 50, (4, 6))]
    quantized = st.quantize(model, {"weights": {"bits": 3}, "activations": None, "layers": ["emb"]}, progress=False)
    mixed = st.quantize(quantized, {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16},
                                    "activations": None, "layers": ["fc"]}, data=ids, progress=False)
    for i, m in enumerate((model, quantized, mixed, wide_mlp())):
        assert artifact_size(m) == artifact_bytes(save_artifact(m, tmp_path / str(i)))
    assert artifact_size(quantized) < artifact_size(model)  # 3-bit rows: it sees the storage shrink


def test_huffman_actions_keep_the_drop_and_cost_fewer_bytes_and_dyn8_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    with torch.no_grad():  # bell-shaped, as trained weights are: the middle levels are the common ones
        model[0].weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 256, generator=g) for _ in range(3)]
    a = analyze(model, data, actions=["quant4", "quant4h", "gptq4", "gptq4h", "dyn8", "dyn6h"], **FAST)
    r = a.results["0"]
    for plain, coded in (("quant4", "quant4h"), ("gptq4", "gptq4h")):
        assert a.drop("0", coded) == a.drop("0", plain)  # the same integers, coded otherwise
        # rows of 256 Gaussian weights on an absmax 4-bit grid: about 3.2 bits each (a table and two
        # manifest keys more per layer, which small layers do not earn back)
        assert r[coded]["bytes_after"] < r[plain]["bytes_after"] - 256 * 128 * 0.5 / 8
    assert r["dyn8"]["status"] == "ok" and 0 <= a.drop("0", "dyn8") < 1e-2
    # dyn6h: dyn8's kernels, the weights on a 6-bit grid coded: fewer bytes than dyn8, a little more drop
    assert r["dyn6h"]["status"] == "ok" and r["dyn6h"]["bytes_after"] < r["dyn8"]["bytes_after"] - 256 * 128 * 2 / 8
    assert a.drop("0", "dyn8") <= a.drop("0", "dyn6h") < 2e-2


def test_analyze_takes_its_settings_as_one_config_or_as_keywords():
    from shrinktunnel import AnalyzeConfig
    from shrinktunnel.search.config import analyze_config

    cfg = analyze_config(AnalyzeConfig(layers=["fc*"], threads=1), {"workers": 2, "skip": ("fc2",)})
    assert cfg.layers == ["fc*"] and cfg.skip == ["fc2"] and cfg.threads == 1 and cfg.parallel.workers == 2
    with pytest.raises(ConfigError, match="latency_runz"):
        analyze_config(None, {"latency_runz": 3})
    with pytest.raises(ConfigError):
        analyze_config({"threads": 0}, {})
