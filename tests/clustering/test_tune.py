"""Codebook fine-tuning: each centroid's gradient is the sum of its weights' gradients, indices stay
fixed, in the built-in loop (tune) and in a user's own loop."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.clustering import ClusteredLayer
from shrinktunnel.errors import DataError


def task():
    """A small labelled problem and an MLP trained on it, trained once per session (copies handed out)."""
    model, batches, x, y = _task()
    return copy.deepcopy(model), batches, x, y


@functools.lru_cache(maxsize=1)
def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long() + (x[:, 5:10].sum(1) > 1).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(80):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    return model, batches, x, y


def loss_of(model, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def cluster(model, cfg, data=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.cluster(model, cfg, data=data, progress=False)


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    model, _, x, y = task()
    c = cluster(model, {"bits": 3})
    layer = c[0]
    # Reference: the dense weight as a leaf; its gradient summed per cluster.
    dense = layer.dense_weight().detach().clone().requires_grad_(True)
    with torch.no_grad():
        head = c[3].dense_weight().clone()
    F.cross_entropy(F.linear(c[2](c[1](F.linear(x, dense, layer.bias))), head, c[3].bias), y).backward()
    expected = torch.zeros_like(layer.codebook).index_add_(0, layer.indices, dense.grad.reshape(-1))
    c.train()
    c[1].eval()  # same BatchNorm behaviour as the reference
    c.zero_grad()
    F.cross_entropy(c(x), y).backward()
    assert torch.allclose(layer.codebook.grad, expected, atol=1e-6, rtol=1e-5)


def test_builtin_tuning_lowers_the_loss_and_keeps_indices(tmp_path):
    model, batches, x, y = task()
    plain = cluster(model, {"bits": 2})
    tuned = cluster(model, {"bits": 2, "tune": {"epochs": 4, "lr": 1e-3}}, data=batches)
    assert loss_of(tuned, x, y) < loss_of(plain, x, y)
    for name in ("0", "3"):
        a, b = plain.get_submodule(name), tuned.get_submodule(name)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.index_code, b.index_code)
        assert not torch.equal(a.codebook, b.codebook)
    # codebooks only: the float BatchNorm kept its parameters and statistics
    assert torch.equal(tuned[1].weight, model[1].weight) and torch.equal(tuned[1].running_mean, model[1].running_mean)
    st.save(tuned, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a", model=model)(x), tuned(x))


def test_distillation_without_labels():
    model, batches, x, y = task()
    plain = cluster(model, {"bits": 2})
    inputs = [bx for bx, _ in batches]  # no targets: auto picks distillation from the float model
    tuned = cluster(model, {"bits": 2, "tune": {"epochs": 4, "lr": 1e-3}}, data=inputs)
    with torch.no_grad():
        ref = model(x)
        assert F.mse_loss(tuned(x), ref) < F.mse_loss(plain(x), ref)


def test_train_all_moves_other_parameters():
    model, batches, _, _ = task()
    tuned = cluster(model, {"bits": 2, "tune": {"steps": 5, "lr": 1e-2, "train": "all"}}, data=batches)
    assert not torch.equal(tuned[0].bias, model[0].bias)
    assert all(p.requires_grad for p in tuned.parameters())


def test_users_own_loop_trains_codebooks(tmp_path):
    model, batches, x, y = task()
    c = cluster(model, {"bits": 2})
    before = {n: m.index_code.clone() for n, m in c.named_modules() if isinstance(m, ClusteredLayer)}
    start = loss_of(c, x, y)
    opt = torch.optim.SGD([m.codebook for m in c.modules() if isinstance(m, ClusteredLayer)], lr=1e-3)
    c.train()
    for bx, by in batches * 3:
        opt.zero_grad()
        F.cross_entropy(c(bx), by).backward()
        opt.step()
    c.eval()
    assert loss_of(c, x, y) < start
    for n, m in c.named_modules():
        if isinstance(m, ClusteredLayer):
            assert torch.equal(m.index_code, before[n])
    st.save(c, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(st.load(tmp_path / "a", model=model)(x), c(x))


def test_tuning_without_data_is_a_data_error():
    model, _, _, _ = task()
    with pytest.raises(DataError, match="tune needs training data"):
        cluster(model, {"bits": 2, "tune": {}})
