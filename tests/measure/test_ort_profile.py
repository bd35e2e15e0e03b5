"""measure.ort_profile: ONNX Runtime's kernel time per operator type, counted over the timed runs only."""

from __future__ import annotations

import onnx
import pytest
import torch

import shrinktunnel as st
from shrinktunnel.export import ort_session
from shrinktunnel.measure.ort_profile import op_profile

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)))


@pytest.mark.parametrize("runs", [3, 7])
def test_every_node_of_the_run_graph_is_counted_once_per_run(tmp_path, runs):
    x = torch.randn(4, 32)
    path = st.export_onnx(_Net().eval(), tmp_path / "m.onnx", example_inputs=x)
    ort_session(path, threads=1, optimized_model_path=tmp_path / "run.onnx")  # the graph ONNX Runtime runs
    run_graph = onnx.load(str(tmp_path / "run.onnx")).graph
    expected = {}
    for node in run_graph.node:
        expected[node.op_type] = expected.get(node.op_type, 0) + 1
    name = ort_session(path, threads=1).get_inputs()[0].name
    p = op_profile(path, {name: x.numpy()},
                   runs=runs, warmup=4, threads=1)
    assert p.runs == runs
    assert p.nodes_per_run == expected  # warm-up runs left out, nothing counted twice
    assert all(ms >= 0 for ms in p.ms_per_run.values()) and p.total_ms > 0
    assert list(p.ms_per_run) == sorted(p.ms_per_run, key=p.ms_per_run.get, reverse=True)
    assert set(p.to_dict()) == {"ms_per_run", "nodes_per_run", "runs", "total_ms"}


def test_zero_runs_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        op_profile(tmp_path / "missing.onnx", {}, runs=0)
