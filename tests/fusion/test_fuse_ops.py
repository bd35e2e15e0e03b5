"""fuse_ops: BatchNorm folding and Linear merging keep outputs within 1e-5, shrink the model, replay
from the original architecture bit for bit, export to ONNX Runtime, and report what they skip."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.fusion.ops import fold_bn, merge_linears

from conftest import snapshot, state_dicts_equal


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics: BN folding with mean 0 / var 1 / gamma 1 would prove little."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
            if m.affine:
                m.weight.data = torch.randn(n, generator=g)
                m.bias.data = torch.randn(n, generator=g)
    return model.eval()


class ConvBNNet(nn.Module):
    """Conv2d(no bias)+BN2d in a Sequential, a depthwise conv + BN called from forward, a residual,
    Conv1d+BN1d, and a Linear + BN1d + Linear + Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw_bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv1d(8, 6, 3)
        self.c1_bn = nn.BatchNorm1d(6, affine=False)
        self.fc1 = nn.Linear(6 * 14, 32)
        self.fc_bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x):
        h = self.stem(x)
        h = h + F.relu(self.dw_bn(self.dw(h)))
        h = h.mean(dim=2)  # (B, 8, W)
        h = F.relu(self.c1_bn(self.c1(h))).flatten(1)
        return self.fc3(self.fc2(self.fc_bn(self.fc1(h))))


def make_net():
    torch.manual_seed(0)
    return randomize_bn(ConvBNNet())


def test_fold_bn_and_merge_linears_arithmetic():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(4, 6, 3, groups=2, bias=False), randomize_bn(nn.BatchNorm2d(6)).eval()
    x = torch.randn(5, 4, 9, 9)
    with torch.no_grad():
        ref = bn(conv(x))
        fold_bn(conv, bn)
        torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=0)
    a, b = nn.Linear(7, 5), nn.Linear(5, 3, bias=False)
    x = torch.randn(4, 2, 7)
    with torch.no_grad():
        torch.testing.assert_close(merge_linears(a, b)(x), b(a(x)), atol=1e-5, rtol=0)


def test_fuse_ops_folds_every_bn_merges_linears_and_keeps_outputs_within_1e5(tmp_path):
    model = make_net()
    before = snapshot(model)
    x = torch.randn(6, 3, 16, 16)
    fused = st.compress(model, [{"fuse_ops": {}}], example_inputs=x, progress=False).model
    assert state_dicts_equal(model, before)  # copy semantics
    kinds = [type(m) for m in fused.modules()]
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # fc1 (84->32, its BN folded), fc2 (32->16) and fc3 (16->4) merged into one 84->4 Linear
    assert isinstance(fused.fc2, nn.Identity) and isinstance(fused.fc3, nn.Identity) and fused.fc1.weight.shape == (4, 84)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())

    st.save(fused, tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=ConvBNNet())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, atol=0, rtol=0)


def test_fused_model_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = make_net()
    x = torch.randn(2, 3, 16, 16)
    fused = st.compress(model, [{"fuse_ops": {}}], example_inputs=x, progress=False).model
    path = st.export_onnx(fused, tmp_path / "m.onnx", example_inputs=x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, fused(x).numpy(), atol=1e-4, rtol=0)


def test_low_rank_pair_is_not_merged_unless_asked_and_skips_are_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64), nn.ReLU(), nn.BatchNorm1d(64)).eval()
    randomize_bn(model)
    with pytest.warns(UserWarning) as record:
        kept = st.compress(model, [{"fuse_ops": {}}], example_inputs=torch.randn(3, 64), progress=False)
    messages = " | ".join(kept.warnings)
    assert "low-rank" in messages and "3 (BatchNorm1d) does not directly follow" in messages
    assert isinstance(kept.model[0], nn.Linear) and kept.model[0].out_features == 4
    assert record  # warnings were raised, not only listed
    merged = st.compress(model, [{"fuse_ops": {"linear": "always", "bn": False}}], progress=False).model
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=0)
    assert merged[0].weight.shape == (64, 64)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; the Sequential still folds."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.body(x)
        return self.body(-x)


def test_untraceable_model_falls_back_to_module_order_with_a_warning():
    torch.manual_seed(0)
    model = randomize_bn(Untraceable())
    res = st.compress(model, [{"fuse_ops": {}}], progress=False)
    assert any("cannot trace" in w for w in res.warnings)
    assert isinstance(res.model.body[1], nn.Identity)
    x = torch.randn(3, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), atol=1e-5, rtol=0)


def test_bn_read_by_a_second_branch_is_not_folded():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is also read without BN: folding would change it

    torch.manual_seed(0)
    model = randomize_bn(TwoReaders())
    res = st.compress(model, [{"fuse_ops": {}}], progress=False)
    assert isinstance(res.model.bn, nn.BatchNorm2d)
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), atol=0, rtol=0)


class UntraceableNotSequential(nn.Module):
    """Control flow torch.fx cannot trace, and conv -> BN called from forward (no nn.Sequential):
    as Hugging Face's ResNet / RegNet / ConvNext layers are written."""

    def __init__(self, padding: int | str = 0):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=padding)  # "same": aten.conv2d.padding (HF EfficientNet)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[0] > 0:  # data-independent here, but fx's proxies cannot take the branch
            h = torch.relu(self.bn(self.conv(x)))
            return self.bn2(self.conv2(h)) + h  # conv2's output feeds only bn2; h feeds both
        return x


@pytest.mark.parametrize("padding", [0, "same"])
def test_pairs_come_from_torch_export_when_fx_cannot_trace_and_nothing_is_sequential(padding):
    torch.manual_seed(0)
    model = randomize_bn(UntraceableNotSequential(padding))
    x = torch.randn(3, 2, 6, 6)
    res = st.compress(model, [{"fuse_ops": {}}], example_inputs=x, progress=False)
    assert isinstance(res.model.bn, nn.Identity) and isinstance(res.model.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x), atol=1e-5, rtol=1e-5)
    # without an example nothing can be captured: nothing folds, and the warning says how to fix it
    plain = st.compress(model, [{"fuse_ops": {}}], progress=False)
    assert isinstance(plain.model.bn, nn.BatchNorm2d)
    assert any("pass example_inputs or data" in w for w in plain.warnings)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: normalise, then its own `drop` and `act` children."""

    def __init__(self, n: int, scale_after: float = 1.0) -> None:
        super().__init__(n)
        self.drop, self.act = nn.Dropout(0.1), nn.Hardswish()
        self.scale_after = scale_after

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x)) * self.scale_after


def _bn_act_net(scale_after: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNormAct(8, scale_after),
                                      nn.Conv2d(8, 4, 1), BatchNormAct(4, scale_after)))


@pytest.mark.parametrize("how", ["fuse_ops", "quantize"])
def test_batchnorm_with_activation_folds_and_keeps_its_activation(how, tmp_path):
    from shrinktunnel.fusion.ops import BatchNormTail

    model, x = _bn_act_net(), torch.randn(4, 3, 10, 10)
    if how == "fuse_ops":
        out = st.compress(model, [{"fuse_ops": {"bn": True, "linear": "never"}}], example_inputs=x).model
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)
        assert isinstance(out[0], nn.Conv2d) and out[0].bias is not None
    else:  # static int8 folds BatchNorms first (fold_bn)
        out = st.quantize(model, st.QuantConfig(), data=[x], progress=False)
    assert [type(out[i]) for i in (1, 3)] == [BatchNormTail] * 2
    assert isinstance(out[1].act, nn.Hardswish) and isinstance(out[1].drop, nn.Dropout)
    loaded = st.load(st.save(out, tmp_path / "a"), model=_bn_act_net())
    torch.testing.assert_close(loaded(x), out(x), atol=0, rtol=0)


def test_batchnorm_subclass_doing_more_is_kept_with_the_reason():
    model, x = _bn_act_net(scale_after=2.0), torch.randn(2, 3, 10, 10)
    with pytest.warns(UserWarning, match="does more than normalise"):
        out = st.compress(model, [{"fuse_ops": {"bn": True, "linear": "never"}}], example_inputs=x).model
    assert isinstance(out[1], BatchNormAct)
    torch.testing.assert_close(out(x), model(x), atol=0, rtol=0)
