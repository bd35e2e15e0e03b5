"""The shared training loop: it learns, honours its hooks and step count, and rejects bad input."""

import pytest
import torch
from torch import nn

from shrinktunnel.core.train import FitConfig, fit
from shrinktunnel.errors import ConfigError, DataError


def _data(n_batches=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(16, 4, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def test_fit_learns_a_separable_problem_and_counts_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = _data()
    log = fit(model, data, FitConfig(epochs=3, lr=0.05, progress=False))
    assert log.steps == 60 and len(log.losses) == 60
    assert sum(log.losses[-10:]) / 10 < 0.5 * sum(log.losses[:10]) / 10
    assert not model.training


def test_hooks_run_every_step_and_after_step_can_hold_a_mask():
    model = nn.Linear(4, 3)
    mask = torch.ones_like(model.weight)
    mask[:, :2] = 0
    model.weight.data *= mask
    calls = {"before": 0}

    def before(m):
        calls["before"] += 1
        assert m.weight.grad is not None

    def after(m):
        m.weight.mul_(mask)

    fit(model, _data(5), FitConfig(steps=7, progress=False), before_step=before, after_step=after)
    assert calls["before"] == 7
    assert torch.equal(model.weight[:, :2], torch.zeros(3, 2))


def test_bad_input_is_a_typed_error():
    model = nn.Linear(4, 3)
    with pytest.raises(ConfigError, match="optimizer"):
        fit(model, _data(1), FitConfig(steps=1, optimizer="lion", progress=False))
    with pytest.raises(ConfigError, match="steps"):
        fit(model, _data(1), FitConfig(steps=0, progress=False))
    with pytest.raises(DataError, match="target"):
        fit(model, [torch.randn(2, 4)], FitConfig(steps=1, progress=False))
    with pytest.raises(DataError, match="loss became"):
        fit(model, _data(1), FitConfig(steps=1, progress=False), loss_fn=lambda m, b: torch.tensor(float("nan"), requires_grad=True))
