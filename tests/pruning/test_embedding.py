"""Unstructured pruning of nn.Embedding (SparseLayer kind `embedding`) and of an Embedding tied to its
output Linear (pruned once, core/tied.py)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.artifact import read_manifest
from shrinktunnel.core.coverage import stage_coverage
from shrinktunnel.core.tied import TiedEmbedding
from shrinktunnel.pruning import SparseLayer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Bag(nn.Module):
    """Embedding (padding_idx 3) -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(120, 16, padding_idx=3)
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


def _bag() -> Bag:
    torch.manual_seed(0)
    return Bag().eval()


def _ids() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, 120, (4, 9))


def _prune(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.prune(model, config, progress=False)


def test_embedding_table_is_magnitude_pruned_and_looked_up_sparse():
    model = _bag()
    pruned = _prune(model, {"sparsity": 0.7})
    emb = pruned.emb
    assert isinstance(emb, SparseLayer) and emb.kind == "embedding" and emb.padding_idx == 3
    orig = model.emb.weight.detach()
    kept = emb.weight != 0
    n = orig.numel()
    assert int(kept.sum()) == n - round(0.7 * n)
    assert torch.equal(emb.weight[kept], orig[kept])  # kept weights untouched, bit for bit
    assert orig[kept].abs().min() >= orig[~kept].abs().max()  # and the largest
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, emb.weight, padding_idx=3))
    (cov,) = stage_coverage(pruned)
    assert cov.share == 1.0


@pytest.mark.parametrize("encoding", ["bitmask", "relative"])
def test_pruned_embedding_round_trips_exactly_and_exports(encoding, tmp_path):
    from shrinktunnel.export import OrtModel

    model, ids = _bag(), _ids()
    pruned = _prune(model, {"sparsity": 0.8, "encoding": encoding})
    path = st.save(pruned, tmp_path / "a")
    spec = read_manifest(path)["stages"][0]["replay"]["layers"]["emb"]
    assert spec["kind"] == "embedding" and spec["padding_idx"] == 3 and spec["sparse"]["encoding"] == encoding
    loaded = st.load(path, model=_bag())
    assert isinstance(loaded.emb, SparseLayer) and torch.equal(loaded.emb.weight, pruned.emb.weight)
    with torch.no_grad():
        got = pruned(ids)
        assert torch.equal(loaded(ids), got)
    out = OrtModel(st.export_onnx(loaded, tmp_path / "m.onnx", example_inputs=ids))(ids)
    assert torch.allclose(torch.as_tensor(out), got, atol=1e-5, rtol=0)


def test_embedding_with_max_norm_is_left_with_the_reason():
    model = _bag()
    model.emb.max_norm = 1.0
    pruned = _prune(model, {"sparsity": 0.5})
    assert type(pruned.emb) is nn.Embedding
    (cov,) = stage_coverage(pruned)
    assert "max_norm" in cov.skipped["emb"]


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(200, 24)
        self.head = nn.Linear(24, 200)  # with a bias: the lookup ignores it
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _tied() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM().eval()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_tied_pair_is_pruned_once_and_stays_tied(scope, tmp_path):
    from shrinktunnel.export import OrtModel

    model, ids = _tied(), torch.randint(0, 200, (3, 5))
    pruned = _prune(model, {"sparsity": 0.6, "scope": scope})
    assert isinstance(pruned.head, SparseLayer) and pruned.emb.layer is pruned.head
    assert isinstance(pruned.emb, TiedEmbedding)
    n = model.emb.weight.numel()
    assert pruned.head.sparse_spec["kept"] == n - round(0.6 * n)  # one table, pruned once
    with torch.no_grad():
        assert torch.equal(pruned.emb(ids), pruned.head.weight[ids])
        got = pruned(ids)
    (cov,) = stage_coverage(pruned)
    assert cov.share == 1.0
    path = st.save(pruned, tmp_path / "t")
    assert len(read_manifest(path)["tensors"]["aliases"]) >= 2  # values and index stored once, named twice
    loaded = st.load(path, model=_tied())
    assert loaded.emb.layer is loaded.head
    with torch.no_grad():
        assert torch.equal(loaded(ids), got)
    out = OrtModel(st.export_onnx(loaded, tmp_path / "m.onnx", example_inputs=ids))(ids)
    assert torch.allclose(torch.as_tensor(out), got, atol=1e-4, rtol=0)


def test_tied_pair_fine_tuned_with_a_train_step_keeps_one_mask():
    model = _tied()
    ids = torch.randint(0, 200, (3, 5))

    def step(m, batch):
        opt = step.__dict__.setdefault("opt", torch.optim.SGD(m.parameters(), lr=0.1))
        opt.zero_grad()
        m(ids).pow(2).mean().backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = st.prune(model, {"sparsity": 0.5, "steps": 4}, train_step=step, progress=False)
    assert isinstance(pruned.emb, TiedEmbedding) and pruned.emb.layer is pruned.head
    n = model.emb.weight.numel()
    assert int((pruned.emb.weight != 0).sum()) <= n - round(0.5 * n)
