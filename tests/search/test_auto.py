"""st.auto on quantization actions: the Lagrangian hull, a chosen model within the budget (in PyTorch
and ONNX Runtime), the best candidate marked when nothing fits, failing candidates passed over."""

from __future__ import annotations

import json

import pytest
import torch

import shrinktunnel as st
from shrinktunnel.errors import ConfigError
from shrinktunnel.search import auto
from shrinktunnel.search.auto import lagrangian_plans

from test_analysis import wide_data, wide_mlp

QUANT = ["quant8", "quant4", "quant2"]


def test_lagrangian_hull_runs_from_keep_everything_to_cheapest():
    options = {"a": [(None, 10.0, 0.0), ("q8", 4.0, 0.001), ("q2", 1.0, 0.3)],
               "b": [(None, 20.0, 0.0), ("q8", 8.0, 0.01), ("q4", 5.0, 0.02)]}
    hull = lagrangian_plans(options)
    plans = [p for p, _, _ in hull]
    assert plans[0] == {}  # at a high enough price on the drop every layer keeps its float form
    assert plans[-1] == {"a": "q2", "b": "q4"}
    drops = [d for _, _, d in hull]
    costs = [c for _, c, _ in hull]
    assert drops == sorted(drops) and costs == sorted(costs, reverse=True)
    assert {"a": "q8", "b": "q4"} in plans  # a's 2-bit step costs 0.3 drop for 3 bytes: taken last


def test_auto_chooses_a_smaller_model_within_the_budget_verified_in_onnx_runtime(tmp_path):
    model, data = wide_mlp(), wide_data()
    r = auto(model, data, max_drop=0.01, actions=QUANT, progress=False, max_evaluations=6)
    assert r.fits and r.chosen != 0 and "chosen" in r.message
    c = r.candidates[r.chosen]
    assert c["drop"] <= 0.01 and c["runtime_metric"] >= r.baseline - 0.01
    assert c["bytes"] < r.candidates[0]["bytes"] / 2  # both layers at 8 bits or fewer
    assert all(len(x["plan"]) <= 2 for x in r.candidates) and r.candidates[0]["plan"] == {}
    assert r.pareto["size"] and all(r.candidates[i]["status"] == "ok" for i in r.pareto["size"])
    # Every fitting candidate costs at least as much as the chosen one (the objective picks the point).
    assert all(x["bytes"] >= c["bytes"] for x in r.candidates if x["fits"] and x["plan"])
    out = r.save(tmp_path / "auto")
    saved = json.loads((out / "auto.json").read_text())
    assert saved["chosen"] == r.chosen and saved["fits"] is True and len(saved["candidates"]) == len(r.candidates)
    assert "plot scatter" in (out / "auto.html").read_text()
    x = data[0]
    assert torch.equal(st.load(out, wide_mlp())(x), r.model(x))


def test_nothing_fits_returns_the_best_candidate_marked():
    model, data = wide_mlp(), wide_data()
    reference = [model(x) for x in data]

    def exact(m):  # 1 only for the float model itself: any quantized layer fails
        return float(all(torch.equal(m(x), y) for x, y in zip(data, reference)))

    r = auto(model, data, eval_fn=exact, max_drop=0.0, actions=["quant2"], progress=False, max_evaluations=3,
             verify_runtime=False)
    assert not r.fits and "NO CANDIDATE MEETS THE BUDGET max_drop=0.0" in r.message
    assert r.chosen != 0 and r.candidates[r.chosen]["drop"] == 1.0 and any("NO CANDIDATE" in w for w in r.warnings)


def test_a_failing_candidate_is_marked_and_the_search_goes_on():
    model, data = wide_mlp(), wide_data()
    from shrinktunnel.quant import QuantizedLayer

    def metric(m):
        n = sum(isinstance(x, QuantizedLayer) for x in m.modules())
        if n == 2:
            raise RuntimeError("both layers quantized: metric broke")
        return 1.0 - 0.001 * n

    r = auto(model, data, eval_fn=metric, max_drop=0.01, actions=["quant8"], progress=False, max_evaluations=4,
             verify_runtime=False)
    failed = [c for c in r.candidates if c["status"] == "failed"]
    assert failed and "metric broke" in failed[0]["note"] and any("failed" in w for w in r.warnings)
    assert r.fits and len(r.candidates[r.chosen]["plan"]) == 1


@pytest.mark.parametrize("bad", [{"objective": "speed"}, {"max_drop": -1}, {"max_drop": float("nan")}])
def test_bad_objective_or_budget(bad):
    kwargs = {"max_drop": 0.01, "objective": "size", **bad}
    with pytest.raises(ConfigError, match="objective|max_drop"):
        auto(wide_mlp(), wide_data(n=1), progress=False, **kwargs)


def test_fitting_moves_of_a_round_are_taken_together_next():
    from shrinktunnel.search.config import AutoConfig
    from shrinktunnel.search.job import plan_key
    from shrinktunnel.search.rounds import merge_moves, search

    options = {"a": [(None, 100.0, 0.0), ("s", 10.0, 0.001)], "b": [(None, 100.0, 0.0), ("s", 10.0, 0.001)],
               "c": [(None, 100.0, 0.0), ("s", 10.0, 0.5)]}
    best = {"plan": {}, "label": "original"}
    results = [{"plan": {"a": "s"}, "fits": True}, {"plan": {"b": "s"}, "fits": True}, {"plan": {"c": "s"}, "fits": False}]
    assert merge_moves(best, results, options) == [({"a": "s", "b": "s"}, "original + a:s + b:s")]
    assert merge_moves(best, results[1:], options) == []  # one fitting move: nothing to merge

    class FakeEvaluator:  # the moves phase alone, two candidates a round, drops adding exactly
        config = AutoConfig(max_drop=0.01, probes=2, max_evaluations=4)
        objective, limit, budget, spent, candidates = "size", 0.01, 4, 0, []

        def left(self):
            return self.budget - self.spent

        def round(self, plans, count=True):
            out = []
            for plan, label in plans:
                assert not any(c["key"] == plan_key(plan) for c in self.candidates)  # never the same plan twice
                self.spent += count
                drop = sum(0.001 if layer != "c" else 0.5 for layer in plan)
                c = {"plan": plan, "label": label, "key": plan_key(plan), "status": "ok", "fits": drop <= 0.01,
                     "bytes": sum(10.0 if layer in plan else 100.0 for layer in options)}
                self.candidates.append(c)
                out.append(c)
            return out

    ev = FakeEvaluator()
    ev.round([({}, "original")], count=False)
    search([({}, 300.0, 0.0)], options, ev, uniform=False)
    candidates = ev.candidates
    # round 1 moves a and b, both fit; round 2 takes them together first, then the best next move
    assert [c["plan"] for c in candidates[1:3]] == [{"a": "s"}, {"b": "s"}]
    assert candidates[3]["plan"] == {"a": "s", "b": "s"} and candidates[3]["label"] == "original + a:s + b:s"
    assert candidates[3]["fits"] and len(candidates) == 5


def test_objective_size_leaves_channel_actions_out_when_others_are_given():
    from types import SimpleNamespace

    from shrinktunnel.search import ACTIONS
    from shrinktunnel.search.hull import layer_options as _layer_options

    layer = SimpleNamespace(name="conv", bytes=1000, macs=100, latency_ms=1.0)
    entry = lambda b, m: {"status": "ok", "bytes_after": b, "macs_after": m, "drop": 0.0}  # noqa: E731
    analysis = SimpleNamespace(totals={"bytes": 1000, "macs": 100}, layers=[layer],
                               results={"conv": {"chan50": entry(-5000, 25), "share4": entry(150, 100)}})
    usable = {k: ACTIONS[k] for k in ("chan50", "share4")}
    assert [o[0] for o in _layer_options(analysis, "size", usable)["conv"]] == [None, "share4"]
    assert [o[0] for o in _layer_options(analysis, "macs", usable)["conv"]] == [None, "chan50", "share4"]
    only = {"chan50": ACTIONS["chan50"]}  # nothing else: channel pruning is the size action
    assert [o[0] for o in _layer_options(analysis, "size", only)["conv"]] == [None, "chan50"]


def test_no_action_cheaper_than_a_layer_says_so_and_returns_the_original():
    # A 6 -> 16 -> 3 MLP: any quantized layer's spec and scales cost more bytes than its float weights.
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    r = auto(tiny, [torch.randn(8, 6)], max_drop=0.01, actions=["quant8h"], progress=False, max_evaluations=3)
    assert r.fits
    assert r.chosen == 0 and "no action makes any layer cheaper" in r.message
    assert not any(c["plan"] for c in r.candidates)


def test_progress_line_shows_the_best_candidate_so_far(capsys):
    model, data = wide_mlp(), wide_data()
    r = auto(model, data, max_drop=0.01, actions=["quant4"], progress=True, max_evaluations=2,
             verify_runtime=False, time_budget="10m")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("auto: ") and "evaluations" in line]
    assert lines and "of 10m00s" in lines[-1]
    best = min((c for c in r.candidates if c["fits"] and c["plan"]), key=lambda c: c["bytes"])
    assert f"best so far: {best['label']}, {best['bytes']:,} bytes" in lines[-1]


def test_time_budget_stops_starting_rounds_it_cannot_finish():
    import time

    from shrinktunnel.search.config import AutoConfig
    from shrinktunnel.search.evaluate import Evaluator

    ev = Evaluator(None, None, AutoConfig(max_drop=0.01, time_budget=60, max_evaluations=100), baseline=1.0,
                   inputs=None, warnings=[])
    assert ev.left() == 100  # nothing measured yet: the first round always runs
    ev.round_seconds = [20.0]
    ev.started = time.perf_counter() - 30  # 30 s spent, a round takes 20: one more fits
    assert ev.left() == 100
    ev.started = time.perf_counter() - 45  # 45 + 20 > 60: no round is started
    assert ev.left() == 0


def test_the_joint_objective_offers_only_options_fast_enough_on_the_layers_that_take_time():
    from types import SimpleNamespace

    from shrinktunnel.search import ACTIONS
    from shrinktunnel.search.hull import layer_options

    entry = lambda b, m: {"status": "ok", "bytes_after": b, "macs_after": m, "drop": 0.0}  # noqa: E731
    fc = SimpleNamespace(name="fc", bytes=4000, macs=1000, latency_ms=1.0, latency_share=0.6)
    emb = SimpleNamespace(name="emb", bytes=9000, macs=0, latency_ms=0.0, latency_share=0.0)
    analysis = SimpleNamespace(totals={"bytes": 13000, "macs": 1000}, layers=[fc, emb],
                               results={"fc": {"quant4h": entry(400, 1000), "dyn8": entry(1000, 1000)},
                                        "emb": {"quant4h": entry(900, 0), "dyn8": entry(2250, 0)}})
    usable = {k: ACTIONS[k] for k in ("quant4h", "dyn8")}
    size_only = layer_options(analysis, "size", usable)
    assert [o[0] for o in size_only["fc"]] == [None, "quant4h", "dyn8"]
    joint = layer_options(analysis, "size", usable, min_speedup=2.0)
    assert [o[0] for o in joint["fc"]] == [None, "dyn8"]  # quant4h: predicted no faster (dequantized weights)
    assert [o[0] for o in joint["emb"]] == [None, "quant4h", "dyn8"]  # a lookup nobody waits on: any option
