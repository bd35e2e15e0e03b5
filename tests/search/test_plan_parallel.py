"""The search's plans (sound order, recovery), its held-out check, its parallel evaluation (the same
result serially and in processes) and its failures (NaN, raising eval_fn, unknown objective)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shrinktunnel.errors import ConfigError
from shrinktunnel.search import ACTIONS, RecoveryConfig, auto, build_plan, plan_stages
from shrinktunnel.core.registry import SearchAction
from shrinktunnel.search.actions import from_search_action

from test_analysis import wide_data, wide_mlp

REC = RecoveryConfig(steps=7, share_steps=3, qat_steps=3, analysis_steps=2)


def test_stages_follow_the_sound_order_with_recovery_in_between():
    actions = dict(ACTIONS)  # every method's declared actions, and the chains over them
    plan = {"fc2": "int8", "fc1": "prune90+share2", "conv": "chan50", "lin": "lowrank1/2"}
    stages = plan_stages(plan, actions, REC)
    assert [m for m, _ in stages] == ["decompose", "prune_channels", "prune", "cluster", "quantize"]
    prune = stages[2][1]
    # the prune stage's own fine-tuning (masks held) is the recovery: every structural change is trained
    assert prune["steps"] == 7 and prune["schedule"] == "oneshot" and prune["layers"] == ["fc1"]
    assert prune["overrides"] == [{"pattern": "fc1", "sparsity": 0.9}]
    assert stages[3][1]["tune"] == {"steps": 3, "lr": REC.share_lr} and stages[3][1]["overrides"] == [{"pattern": "fc1", "bits": 2}]
    assert stages[1][1]["rules"] == [{"pattern": "conv", "ratio": 0.5}]
    # without unstructured pruning, a distill stage from the original follows the structure, before sharing
    stages = plan_stages({"a": "chan50", "b": "share4", "c": "int8"}, actions, REC)
    assert [m for m, _ in stages] == ["prune_channels", "distill", "cluster", "quantize"]
    assert stages[1][1]["teacher"] == "original" and stages[1][1]["steps"] == 7
    # no recovery: one shot, nothing added
    assert [m for m, _ in plan_stages({"a": "chan50", "c": "int8"}, actions, None)] == ["prune_channels", "quantize"]


def test_recovery_wins_back_what_channel_pruning_lost():
    model, data = wide_mlp(), wide_data(n=4)
    chan75 = SearchAction("chan75", {"ratio": 0.0, "rules": [{"pattern": "{layer}", "ratio": 0.75}], "round_to": 1})
    actions = {"chan75": from_search_action("prune_channels", chan75, "channels")}

    def fidelity(m):
        with torch.no_grad():
            return sum(torch.cosine_similarity(m(x), model(x), dim=-1).mean().item() for x in data) / len(data)

    one_shot = build_plan(model, {"fc1": "chan75"}, actions, data, seed=0)
    recovered = build_plan(model, {"fc1": "chan75"}, actions, data, seed=0,
                           recovery=RecoveryConfig(steps=60, lr=3e-3, alpha=1.0))
    assert recovered.fc1.out_features == one_shot.fc1.out_features == 32  # 128 -> 32: physically smaller
    assert fidelity(recovered) > fidelity(one_shot) + 0.01
    again = build_plan(model, {"fc1": "chan75"}, actions, data, seed=0, recovery=RecoveryConfig(steps=60, lr=3e-3, alpha=1.0))
    assert all(torch.equal(a, b) for a, b in zip(recovered.state_dict().values(), again.state_dict().values()))  # seeded


def test_low_bit_quantization_recovers_by_qat_and_ends_as_quantize_layers():
    from shrinktunnel.quant import QuantizedLayer

    stages = plan_stages({"a": "quant2", "b": "quant8", "c": "quant4h"}, dict(ACTIONS), REC)
    assert [m for m, _ in stages] == ["qat", "quantize", "qat"]  # 8 bits: above qat_bits (4), rounding only
    assert stages[0][1]["steps"] == REC.qat_steps and stages[0][1]["loss"] == "mse_to_float"
    assert stages[2][1]["weights"]["coding"] == "huffman"  # the stored format is unchanged
    model, data = wide_mlp(), wide_data(n=4)

    def fidelity(m):
        with torch.no_grad():
            return sum(torch.cosine_similarity(m(x), model(x), dim=-1).mean().item() for x in data) / len(data)

    one_shot = build_plan(model, {"fc1": "quant2"}, dict(ACTIONS), data, seed=0)
    trained = build_plan(model, {"fc1": "quant2"}, dict(ACTIONS), data, seed=0,
                         recovery=RecoveryConfig(steps=0, qat_steps=15, qat_lr=3e-3))
    assert isinstance(trained.fc1, QuantizedLayer) and isinstance(one_shot.fc1, QuantizedLayer)
    assert fidelity(trained) > fidelity(one_shot) + 0.005

def _summary(r):
    return [(c["label"], c["status"], c.get("metric"), c.get("bytes")) for c in r.candidates], r.chosen, r.fits


def test_the_same_seed_gives_the_same_result_serially_and_in_processes():
    model, data = wide_mlp(), wide_data()
    kwargs = dict(max_drop=0.02, actions=["quant8", "quant4", "quant2", "share2"], progress=False, max_evaluations=6,
                  verify_runtime=False, recovery=REC, probes=3, seed=3)
    serial = auto(model, data, **kwargs)
    parallel = auto(model, data, workers=2, **kwargs)
    assert _summary(serial) == _summary(parallel)
    assert len(serial.candidates) > 3 and serial.fits


def test_ray_backend_gives_the_same_result():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'shrinktunnel[ray]') and is not installed here")
    torch.manual_seed(0)  # torch modules only: Ray's workers import what they unpickle, and this test file is no package
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    data = wide_data()
    kwargs = dict(max_drop=0.02, actions=["quant8", "quant2"], progress=False, max_evaluations=4, verify_runtime=False)
    try:
        assert _summary(auto(model, data, **kwargs)) == _summary(auto(model, data, workers=2, backend="ray", **kwargs))
    finally:
        ray.shutdown()


def test_nan_or_raising_candidates_are_marked_failed_and_the_search_goes_on():
    model, data = wide_mlp(), wide_data()
    from shrinktunnel.quant import QuantizedLayer
    from shrinktunnel.search import analyze

    def counts(m):
        layers = [x for x in m.modules() if isinstance(x, QuantizedLayer)]
        return len(layers), sum(hasattr(x, "qweight_packed") for x in layers)  # packed: fewer than 8 bits

    def benign(m):
        n, low = counts(m)
        return 1.0 - 0.001 * n - 0.003 * low

    def metric(m):  # the analysis saw `benign`; the candidates meet a metric that breaks
        n, low = counts(m)
        if low:
            raise ValueError("low-bit metric broke")
        return math.nan if n == 2 else benign(m)

    a = analyze(model, data, eval_fn=benign, actions=["quant8", "quant2"], progress=False, latency_runs=1)
    r = auto(model, data, eval_fn=metric, analysis=a, max_drop=0.004, actions=["quant8", "quant2"], progress=False,
             max_evaluations=8, verify_runtime=False, workers=2)
    failed = [c for c in r.candidates if c["status"] == "failed"]
    assert any("NaN" in c["note"] for c in failed) and any("low-bit metric broke" in c["note"] for c in failed)
    assert r.fits and len(r.candidates[r.chosen]["plan"]) == 1 and r.candidates[r.chosen]["status"] == "ok"
    assert sum("failed" in w for w in r.warnings) == len(failed)


def test_a_candidate_failing_the_held_out_check_is_passed_over():
    model, data = wide_mlp(), wide_data()
    from shrinktunnel.quant import QuantizedLayer

    def held_out(m):  # the held-out data punishes a quantized fc2, which the search data does not see
        return 1.0 - float(isinstance(getattr(m, "fc2", None), QuantizedLayer))

    r = auto(model, data, max_drop=0.05, actions=["quant8"], progress=False, max_evaluations=4, verify_runtime=False,
             verify_fn=held_out)
    c = r.candidates[r.chosen]
    assert r.fits and c["plan"] == {"fc1": "quant8"} and c["verify_drop"] == 0.0
    assert any("held-out" in w for w in r.warnings)  # the cheaper plan quantizing both was passed over
    r = auto(model, data, max_drop=0.05, actions=["quant8"], progress=False, max_evaluations=4, verify_runtime=False,
             verify_fn=lambda m: 0.0 if m is not model and any(isinstance(x, QuantizedLayer) for x in m.modules()) else 1.0)
    assert not r.fits and "NO CANDIDATE MEETS THE BUDGET" in r.message


@pytest.mark.parametrize("bad", [{"objective": "fastest"}, {"margin": 0.5}, {"workers": 0}, {"backend": "dask"},
                                 {"probes": 0}])
def test_bad_search_settings_are_config_errors(bad):
    kwargs = {"max_drop": 0.01, **bad}
    with pytest.raises(ConfigError, match="objective|margin|workers|backend|probes"):
        auto(wide_mlp(), wide_data(n=1), progress=False, **kwargs)


def test_structured_and_small_nets_export(tmp_path):
    """A channel-pruned, recovered candidate runs in ONNX Runtime as the search measures it."""
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()
    torch.manual_seed(0)
    data = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    r = auto(net, data, max_drop=1.0, objective="latency", actions=["chan50"], progress=False, max_evaluations=2,
             recovery=RecoveryConfig(steps=3, analysis_steps=1))
    c = r.candidates[r.chosen]
    assert r.fits and c["plan"] and c["runtime_latency_ms"] > 0 and "latency_ms" in c
    assert abs(c["runtime_metric"] - c["metric"]) < 1e-4  # ONNX Runtime scores what PyTorch scored
    convs = [m.out_channels for m in r.model.modules() if isinstance(m, nn.Conv2d)]
    assert 8 in convs and len(convs) == 2  # a conv rewritten to half its channels: physically smaller


def test_a_second_search_reads_every_candidate_from_its_cache(tmp_path):
    model, data = wide_mlp(), wide_data()
    kwargs = dict(max_drop=0.02, actions=["quant8", "quant2"], progress=False, max_evaluations=4, verify_runtime=False,
                  cache_dir=tmp_path)
    first = auto(model, data, **kwargs)
    evals = list(tmp_path.rglob("evals.jsonl"))
    assert not any(c["cached"] for c in first.candidates) and evals
    lines = sum(len(p.read_text().splitlines()) for p in evals)
    second = auto(model, data, **kwargs)
    assert all(c["cached"] for c in second.candidates) and _summary(second) == _summary(first)
    assert sum(len(p.read_text().splitlines()) for p in evals) == lines  # nothing evaluated again


def test_uniform_single_action_plans_are_tried_first():
    model, data = wide_mlp(), wide_data()
    r = auto(model, data, max_drop=0.05, actions=["quant8", "quant4"], progress=False, max_evaluations=6, probes=2,
             verify_runtime=False)
    labels = [c["label"] for c in r.candidates]
    assert labels[1:3] == ["uniform quant4", "uniform quant8"]  # the cheapest single action first
    assert r.candidates[1]["plan"] == {"fc1": "quant4", "fc2": "quant4"}
    # the joint result is at least as small as every single action that fits
    assert all(r.candidates[r.chosen]["bytes"] <= c["bytes"] for c in r.candidates[1:3] if c["fits"])


def test_uniform_plans_leave_out_layers_the_action_makes_bigger():
    from shrinktunnel.search.rounds import uniform_plans

    # a tiny first conv: its codebook and code tables outweigh its 288 weights, and sharing it loses accuracy
    options = {"big": [(None, 1000.0, 0.0), ("share4", 200.0, 0.001), ("quant8", 260.0, 0.0)],
               "tiny": [(None, 10.0, 0.0), ("share4", 30.0, 0.02), ("quant8", 8.0, 0.0)]}
    for objective in ("size", "macs", "latency"):
        plans = dict((label, plan) for plan, label in uniform_plans(options, objective))
        assert plans == {"uniform share4": {"big": "share4"}, "uniform quant8": {"big": "quant8", "tiny": "quant8"}}
    assert [label for _, label in uniform_plans(options, "size")] == ["uniform share4", "uniform quant8"]


def _square_or_die(item):
    import os

    if item == "die":
        os._exit(3)  # a worker killed mid-evaluation (the OOM killer, a segfault in a kernel)
    return item * item


def test_forked_workers_return_results_in_order_and_a_dead_worker_is_a_model_error():
    from shrinktunnel.errors import ModelError
    from shrinktunnel.search.parallel import run_all

    items = list(range(7))
    assert list(run_all(_square_or_die, items, workers=3, progress=False)) == [i * i for i in items]
    with pytest.raises(ModelError, match="process died"):
        list(run_all(_square_or_die, [1, 2, "die", 4], workers=2, progress=False))
