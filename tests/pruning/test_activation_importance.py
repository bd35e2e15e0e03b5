"""Activation importance: a channel is scored by the energy it adds to the layers that read it on real
inputs, so a large-weight neuron that never fires goes first, and the pruned net tracks the original better
than with weight norms when inputs are uneven."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.history import get_record
from shrinktunnel.errors import DataError
from shrinktunnel.pruning.importance import input_energies

pytestmark = pytest.mark.filterwarnings("ignore:prune_channels:UserWarning")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_with_dead_neurons() -> MLP:
    """Hidden neurons 0..7 have the largest weights but a bias that keeps them at zero on every input."""
    torch.manual_seed(0)
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight[:8] *= 4
        m.fc1.bias[:8] = -1e3
        m.fc2.weight[:, :8] *= 4
    return m


def test_energies_are_the_mean_square_of_each_input_channel():
    m = MLP()
    x = torch.randn(4, 3, 8)  # (B, T, D); the mask drops the third token of the second sequence
    mask = torch.ones(4, 3, dtype=torch.long)
    mask[1, 2] = 0

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids)

    e = input_energies(Wrap(), [{"input_ids": x, "attention_mask": mask}], 1, progress=False)
    rows = x[mask.bool()]
    torch.testing.assert_close(e["m.fc1"], rows.double().pow(2).mean(0), atol=1e-12, rtol=0)
    hidden = torch.relu(m.fc1(rows)).double()
    torch.testing.assert_close(e["m.fc2"], hidden.pow(2).mean(0), atol=1e-6, rtol=1e-6)


def test_dead_neurons_go_first_and_the_output_is_kept():
    model = _mlp_with_dead_neurons()
    data = [torch.randn(32, 8) for _ in range(2)]
    by_l2 = st.prune(model, st.ChannelPruneConfig(ratio=0.5, importance="l2"), data=data, progress=False)
    by_act = st.prune(model, st.ChannelPruneConfig(ratio=0.5, importance="activation"), data=data, progress=False)
    kept = get_record(by_act)["stages"][-1]["replay"]["layers"]["fc1"]
    kept = kept.get("out", kept) if isinstance(kept, dict) else kept
    assert sorted(kept) == list(range(8, 16))  # every dead neuron removed, every live one kept
    with torch.no_grad():
        x = torch.randn(64, 8)
        torch.testing.assert_close(by_act(x), model(x), atol=1e-5, rtol=0)  # dead neurons added nothing
        assert float((by_l2(x) - model(x)).norm()) > 0.1 * float(model(x).norm())


def test_the_example_batch_is_enough_and_an_empty_dataset_is_refused():
    model = _mlp_with_dead_neurons()
    pruned = st.prune(model, st.ChannelPruneConfig(ratio=0.5, importance="activation"), example_inputs=torch.randn(32, 8),
                      progress=False)
    assert pruned.fc1.out_features == 8
    with pytest.raises(DataError, match="no batch"):
        input_energies(model, [], 4, progress=False)


def test_refit_recovers_removed_channels_that_the_kept_ones_predict(tmp_path):
    """Hidden neurons 8..15 are half of neurons 0..7 (a ReLU commutes with a positive scale): once removed,
    the refit moves their share of fc2 onto the kept neurons and the output is what it was; without the
    refit it is not. The refitted weights round-trip through save / load."""
    torch.manual_seed(1)
    m = MLP().eval()
    with torch.no_grad():
        m.fc1.weight[8:] = 0.5 * m.fc1.weight[:8]
        m.fc1.bias[8:] = 0.5 * m.fc1.bias[:8]
        m.fc2.weight[:, 8:] *= 0.2  # the copies rank below their originals
    data = [torch.randn(64, 8) for _ in range(4)]
    cfg = dict(ratio=0.5, importance="activation")
    plain = st.prune(m, st.ChannelPruneConfig(**cfg), data=data, progress=False)
    refit = st.prune(m, st.ChannelPruneConfig(**cfg, refit=True, refit_damping=0.0), data=data, progress=False)
    assert get_record(refit)["stages"][-1]["replay"]["refitted"] == ["fc2"]
    x = torch.randn(128, 8)
    with torch.no_grad():
        torch.testing.assert_close(refit(x), m(x), atol=1e-4, rtol=0)
        assert float((plain(x) - m(x)).norm()) > 0.05 * float(m(x).norm())
        loaded = st.load(st.save(refit, tmp_path / "art"), model=MLP())
        torch.testing.assert_close(loaded(x), refit(x), atol=0, rtol=0)
