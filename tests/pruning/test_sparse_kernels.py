"""Sparse kernels: a pruned Linear above the break-even runs a torch.sparse product with the dense layer's
outputs (up to summation order), layers below it stay dense with one warning naming them, the caller's
model is unchanged, the export traces the dense weight, and bad input fails with typed errors."""

import warnings

import pytest
import torch
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ConfigError, ModelError
from shrinktunnel.pruning.sparse_kernels import BREAK_EVEN, SparseKernelLinear, use_sparse_kernels
from shrinktunnel.pruning.sparse_layer import SparseLayer

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")


class Net(nn.Module):
    """A conv (pruned but never sparse-run), a Linear pruned hard, a Linear pruned lightly; 3-D input to the last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 64)
        self.fc2 = nn.Linear(64, 8)

    def forward(self, x):
        h = torch.relu(self.fc1(self.conv(x).flatten(1)))
        return self.fc2(h.unsqueeze(1).expand(-1, 3, -1))  # (B, 3, 8): leading dims flattened by the kernel


def _pruned():
    torch.manual_seed(0)
    model = Net().eval()
    cfg = st.PruneConfig(sparsity=0.95, overrides=[{"pattern": "fc2", "sparsity": 0.5}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.prune(model, cfg), model


def test_sparse_product_matches_dense_and_below_break_even_stays_dense_with_a_warning():
    pruned, _ = _pruned()
    assert isinstance(pruned.fc1, SparseLayer) and isinstance(pruned.fc2, SparseLayer)
    x = torch.randn(5, 2, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = use_sparse_kernels(pruned)
    msgs = [str(w.message) for w in caught if "sparse_kernels" in str(w.message)]
    assert len(msgs) == 2  # one per reason
    assert any("fc2 (50%)" in m and f"break-even sparsity {BREAK_EVEN['csr']:.0%}" in m for m in msgs)
    assert any("convolution" in m and "conv" in m for m in msgs)
    assert isinstance(fast.fc1, SparseKernelLinear) and isinstance(fast.fc2, SparseLayer)
    assert isinstance(pruned.fc1, SparseLayer)  # the caller's model is unchanged
    assert fast.fc1.w_sparse.layout == torch.sparse_csr and fast.fc1.density <= 0.05 + 1e-3
    with torch.no_grad():
        torch.testing.assert_close(fast(x), pruned(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_forced_layouts_compute_the_layer(layout):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g) * (torch.rand(16, 32, generator=g) > 0.8)
    b = torch.randn(16, generator=g)
    layer = SparseKernelLinear(w, b, layout, 4)
    for x in (torch.randn(2, 7, 32, generator=g), torch.randn(1, 32, generator=g)):  # mm, and mv for one row
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 5-10 s of dynamo export for a one-line branch (F.linear with the dense weight)
def test_export_traces_the_dense_weight(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pruned, _ = _pruned()
    fast = use_sparse_kernels(pruned, {"min_sparsity": 0.4})
    x = torch.randn(2, 2, 8, 8)
    path = st.export_onnx(fast, tmp_path / "s.onnx", example_inputs=x)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - fast(x).detach().numpy()).max() < 1e-4


def test_bad_input():
    with pytest.raises(ModelError, match="expects a torch.nn.Module"):
        use_sparse_kernels("model")
    with pytest.raises(ConfigError, match="layout"):
        use_sparse_kernels(nn.Linear(4, 4), {"layout": "coo"})
    with pytest.raises(ModelError, match="bsr blocks of 4 do not divide"):
        SparseKernelLinear(torch.zeros(6, 8), None, "bsr", 4)
