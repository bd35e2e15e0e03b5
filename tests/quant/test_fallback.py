"""Accuracy-driven fallback: the most sensitive layers go back to float until the budget holds."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.quant import QuantizedLayer
from shrinktunnel.quant.fallback import choose_fallback


class _Plan:
    def __init__(self, name):
        self.name = name


def test_choose_fallback_returns_most_sensitive_first_until_within_budget():
    # A synthetic metric: each quantized layer costs a known amount.
    cost = {"a": 0.05, "b": 0.20, "c": 0.01, "d": 0.10}
    plans = [_Plan(n) for n in cost]

    def build(chosen):
        return [p.name for p in chosen]

    def metric(model):
        names = model if isinstance(model, list) else []
        return 1.0 - sum(cost[n] for n in names)

    kept, report = choose_fallback("float", plans, build, metric, max_drop=0.07, progress=False)
    assert [p.name for p in kept] == ["a", "c"]  # b (0.20) then d (0.10) fell back: drop 0.06 <= 0.07
    assert [s["layer"] for s in report["fallback"]] == ["b", "d"]
    assert report["sensitivity"] == pytest.approx(cost)
    assert report["final"] == pytest.approx(0.94)
    assert report["fallback"][0]["recovered"] == pytest.approx(0.20)


def test_no_fallback_when_everything_fits():
    plans = [_Plan("a")]
    kept, report = choose_fallback("float", plans, lambda c: c, lambda m: 1.0, max_drop=0.0, progress=False)
    assert kept == plans and report["fallback"] == [] and report["sensitivity"] == {}


class _Outlier(nn.Module):
    """Two Linear layers; the second sees a huge activation range on one feature, so per-tensor
    activation quantization ruins it while the first layer quantizes cleanly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[0].mul_(500.0)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def test_quantize_with_max_drop_keeps_the_budget_and_reports_the_layers():
    model = _Outlier().eval()
    data = [torch.randn(64, 16) for _ in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = st.quantize(model, {"max_drop": 0.001}, data=data, progress=False)
    fidelity = st.measure.fidelity(q, model, data)["cosine"]
    assert fidelity >= 1.0 - 0.001
    report = q.__dict__["_shrinktunnel"]["stages"][-1]["replay"]["fallback_report"]
    fell = [s["layer"] for s in report["fallback"]]
    assert fell and all(any(name in str(w.message) for w in caught) for name in fell)
    assert all(not isinstance(q.get_submodule(n), QuantizedLayer) for n in fell)
    # The artifact replays the mixed-precision structure exactly.
    kept = [n for n in ("fc1", "fc2") if n not in fell]
    assert all(isinstance(q.get_submodule(n), QuantizedLayer) for n in kept)


def test_max_drop_with_eval_fn_uses_it(tmp_path):
    model = _Outlier().eval()
    data = [torch.randn(64, 16)]
    calls = []

    def eval_fn(m):
        calls.append(m)
        return st.measure.fidelity(m, model, data)["cosine"]

    result = st.compress(model, [st.QuantConfig(max_drop=0.5)], data=data, eval_fn=eval_fn, progress=False)
    assert calls  # the user's metric drove the choice
    result.save(tmp_path / "a")
    again = st.load(tmp_path / "a", model=model)
    assert torch.equal(again(data[0]), result.model(data[0]))
