"""st.fuse: two task networks over the same input become one trunk with two heads, learn both tasks
from their teachers, save / load / export, and refuse models that disagree about the input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ConfigError, DataError, ModelError

from conftest import snapshot, state_dicts_equal


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TaskNet(nn.Module):
    """conv trunk, flatten, then a two-layer head; `classes` differs per task."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 8, 8, generator=g) for _ in range(n)]


def trained_pair():
    """Two teachers over the same images, like digit and parity: a 3-class labelling (argmax of a random
    projection) and a 2-class one derived from it (class 0 or not), each trained on its own."""
    proj = torch.randn(64, 3, generator=torch.Generator().manual_seed(10))
    out = []
    for classes, seed in ((3, 0), (2, 1)):
        torch.manual_seed(seed)
        net = TaskNet(classes)
        labels = lambda x: (x.flatten(1) @ proj).argmax(1)  # noqa: E731
        batches = [(x, labels(x) if classes == 3 else (labels(x) == 0).long()) for x in data()]
        st_fit(net, batches)
        out.append(net.eval())
    return out


def st_fit(net, batches):
    from shrinktunnel.core.train import FitConfig, fit

    fit(net, batches, FitConfig(epochs=4, lr=3e-3, progress=False))


@pytest.fixture(scope="module")
def teachers():
    torch.set_num_threads(1)
    return trained_pair()


def agreement(out, ref):
    return float((out.argmax(1) == ref.argmax(1)).float().mean())


def test_fuse_builds_one_trunk_with_a_head_per_task_that_agrees_with_each_teacher(teachers, tmp_path):
    a, b = teachers
    sa, sb = snapshot(a), snapshot(b)
    fused = st.fuse([a, b], st.FuseConfig(epochs=3, split="features"), data=data(), progress=False)
    assert state_dicts_equal(a, sa) and state_dicts_equal(b, sb)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert params(fused) < params(a) + params(b) and len(fused.heads) == 2
    held = torch.cat(data(4, seed=9))
    start = st.fuse([a, b], st.FuseConfig(steps=1, lr=1e-12, split="features"), data=data(), progress=False)
    kl = lambda out, ref: float(F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean"))  # noqa: E731
    with torch.no_grad():
        out_a, out_b = fused(held)
        assert agreement(out_a, a(held)) > 0.9 and agreement(out_b, b(held)) > 0.9
        assert out_b.shape == (len(held), 2)
        # task b's head first read model a's trunk, not its own: distillation brought it back to its teacher
        assert kl(out_b, b(held)) < 0.5 * kl(start(held)[1], b(held))

    st.save(fused, tmp_path / "f")
    loaded = st.load(tmp_path / "f", model=TaskNet(3))
    with torch.no_grad():
        for x, y in zip(loaded(held), fused(held)):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_default_split_keeps_only_the_last_layer_per_task_and_exports(teachers, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    a, b = teachers
    fused = st.fuse([a, b], {"steps": 5, "output": "dict", "names": ["three", "two"]}, data=data(), progress=False)
    assert [type(m).__name__ for m in fused.heads[1].modules() if any(True for _ in m.parameters(recurse=False))] == ["Linear"]
    x = data(1, seed=3)[0]
    with torch.no_grad():
        out = fused(x)
    assert list(out) == ["three", "two"] and out["two"].shape == (16, 2)
    path = st.export_onnx(fused, tmp_path / "f.onnx", example_inputs=x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x[:5].numpy()})  # dynamic batch
    np.testing.assert_allclose(got[0], out["three"][:5].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], out["two"][:5].numpy(), atol=1e-4, rtol=0)


class OtherInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 2)

    def forward(self, x, lengths):
        return self.fc(x.flatten(1))


class Flat(nn.Module):
    """Reads (B, 100) vectors: the images of the others do not fit it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(100, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_models_that_disagree_about_the_input_are_typed_errors(teachers):
    a, _ = teachers
    with pytest.raises(ModelError, match=r"disagree about the input: model 0 takes \(x\) and model 1 takes \(x, lengths\)"):
        st.fuse([a, OtherInput()], data=data(2), progress=False)
    with pytest.raises(DataError, match=r"disagree about the input: model 1 \(Flat\) fails on the batch \(\(16, 1, 8, 8\)"):
        st.fuse([a, Flat()], data=data(2), progress=False)
    with pytest.raises(ConfigError, match="two or more"):
        st.fuse([a], data=data(2), progress=False)
    with pytest.raises(ConfigError, match="names no layer"):
        st.fuse([a, TaskNet(2)], {"split": "nope"}, data=data(2), progress=False)
    with pytest.raises(ConfigError, match="temperature: Input should be greater than 0"):
        st.FuseConfig(temperature=-1)
    with pytest.raises(ConfigError, match="cannot be a recipe stage"):
        st.compress(a, [{"fuse_networks": {}}], data=data(2), progress=False)


def test_split_across_a_skip_connection_is_refused():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(x)) + x)

    with pytest.raises(ConfigError, match="skip connection"):
        st.fuse([Skip(), Skip()], {"split": "a"}, data=[torch.randn(3, 4)], progress=False)
