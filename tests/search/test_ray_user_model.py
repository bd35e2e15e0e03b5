"""Ray with the user's own model: a class in `model.py` that imports its own `train.py`, neither in
an installed package nor on the workers' path. The search ships them by value (issue 22: every Ray
task failed with `No module named 'train'`, surfacing as a raw RayTaskError)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from shrinktunnel.core.refs import load_model
from shrinktunnel.search import auto

TRAIN = '''
import torch
from torch import nn


class Block(nn.Module):  # the user's own layer, in the user's own file
    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.relu(self.fc(x))


def accuracy_of(model, batches):
    return sum(float((model(x).argmax(1) == y).float().mean()) for x, y in batches) / len(batches)
'''

MODEL = '''
import torch
from torch import nn

import train  # the user's sibling file: found through the user's sys.path only


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(train.Block(16, 64), train.Block(64, 64))
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.body(x))


def factory():
    torch.manual_seed(0)
    return Net().eval()
'''


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text(TRAIN)
    (tmp_path / "model.py").write_text(MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("train", None)


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(2)]


def test_user_modules_travel_by_value_without_ray_running(user_files, monkeypatch):
    cloudpickle = pytest.importorskip("ray.cloudpickle", reason="Ray is an optional extra (pip install 'shrinktunnel[ray]')")

    from shrinktunnel.search.parallel import ship_by_value, user_modules

    model = load_model(f"{user_files}/model.py:factory")
    assert "train" in user_modules()  # the sibling file; nothing installed, nothing of shrinktunnel
    assert not any(n.startswith(("torch", "numpy", "shrinktunnel")) for n in user_modules())
    assert "train" in ship_by_value(cloudpickle)
    blob = cloudpickle.dumps(model)
    monkeypatch.delitem(sys.modules, "train")  # a worker: neither the module nor the path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(user_files)])
    copy = cloudpickle.loads(blob)
    x = torch.randn(3, 16)
    assert torch.equal(copy(x), model(x))


@pytest.mark.slow  # ~40 s (a Ray cluster of 2 workers importing torch); benchmarks/search_ray.py runs it too
def test_ray_runs_the_users_own_file_model_from_the_api(user_files):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'shrinktunnel[ray]')")
    model = load_model(f"{user_files}/model.py:factory")
    import train

    data = _data()
    kwargs = dict(max_drop=0.05, actions=["quant8", "quant4"], progress=False, max_evaluations=4, verify_runtime=False,
                  eval_fn=lambda m: train.accuracy_of(m, data))  # the eval_fn calls the user's module too
    try:
        on_ray = auto(model, data, workers=2, backend="ray", **kwargs)
    finally:
        ray.shutdown()
    assert not [c for c in on_ray.candidates if c["status"] == "failed"], on_ray.warnings
    serial = auto(model, data, **kwargs)
    assert [(c["plan"], c["metric"], c["bytes"]) for c in on_ray.candidates] == \
        [(c["plan"], c["metric"], c["bytes"]) for c in serial.candidates]
    assert on_ray.fits and on_ray.chosen != 0


@pytest.mark.slow  # ~40 s, as above
def test_ray_runs_the_users_own_file_model_from_the_cli(user_files, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'shrinktunnel[ray]')")
    from test_cli_analyze import run_cli

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    try:
        code, out, err = run_cli("auto", f"{user_files}/model.py:factory", "--data", tmp_path / "d.npz",
                                 "--max-drop", "0.05", "--actions", "quant8,quant4", "--backend", "ray", "--workers", 2,
                                 "--max-evaluations", 4, "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    finally:
        ray.shutdown()
    assert code == 0, err
    saved = json.loads((tmp_path / "out" / "auto.json").read_text())
    assert saved["fits"] and not [c for c in saved["candidates"] if c["status"] == "failed"]
