"""st.compile: quantized layers lowered to PyTorch's integer kernels, checked against the simulated model.

Tolerances (the simulated model is the reference):
- static int8 (oneDNN conv / linear): at most one step of the layer's output quantizer (inductor's kernels
  requantize with their own rounding; on the models here they agree exactly), and the lowered eager model
  (the same QDQ ops on plain int8 buffers) exactly.
- dynamic int8 (`_int_mm` -> oneDNN int8 GEMM): the int32 accumulators are the same integers; outputs
  within 1e-5 of the output's largest magnitude (float rounding of the rescale).
- int4 weight-only (`_weight_int4pack_mm_for_cpu` below 64 rows, a bfloat16 GEMM on the dequantized codes
  from 64 rows; bfloat16 compute): within 2 % of the output's largest magnitude, cosine >= 0.9999.
One compiled model covers the three kinds (marked slow: inductor's compile takes 30-70 s on 2 busy cores;
`-m slow` runs it); the rest runs the lowered modules eagerly or never calls the compiled model.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.errors import ConfigError
from shrinktunnel.quant import torch_int8
from shrinktunnel.quant.torch_int8 import DynamicInt8, Int4WeightOnly, Int8Compiled, StaticInt8, lower

CPU_FLAGS = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f in
                    ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")} if Path("/proc/cpuinfo").exists() else [])
DYNAMIC = {"activations": {"dynamic": True}}
INT4 = {"weights": {"bits": 4, "granularity": "per_group", "group_size": 32}, "activations": None}


class SmallCNN(nn.Module):
    """conv2d -> relu -> maxpool -> conv1d over rows (a view between) -> flatten -> linear: MNIST-like,
    with the `x.view(...)` after the convs that breaks some int8 paths."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv1d = nn.Sequential(nn.Conv1d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x):
        x = self.convs(x)  # (N, 8, 4, 4)
        x = self.conv1d(x.view(x.shape[0], 8, 16))  # (N, 16, 16)
        return self.fc(x.view(x.shape[0], -1))


def _static_cnn():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    calib = [torch.randn(8, 1, 8, 8) for _ in range(4)]
    return st.quantize(model, None, data=calib, progress=False), torch.randn(8, 1, 8, 8)


def _mlp(out=48):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, out)).eval()


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _output_steps(model) -> dict[str, float]:
    return {n: m.output_quant.scale for n, m in model.named_modules() if getattr(m, "output_quant", None) is not None}


def test_lowered_static_layers_compute_the_simulated_ops_exactly():
    q, x = _static_cnn()
    lowered, plan = lower(q)
    assert plan == {"convs.0": "static int8", "conv1d.0": "static int8", "fc": "static int8"}
    assert isinstance(lowered.conv1d[0], StaticInt8) and lowered.conv1d[0].qweight.shape == (16, 8, 1, 3)
    assert torch.equal(_run(lowered, x), _run(q, x))  # atol=0: the same quantized_decomposed ops
    assert type(q.fc).__name__ == "QuantizedLayer"  # the input model is not changed


def test_lowered_dynamic_linear_computes_the_same_integers():
    mlp = _mlp()
    x = torch.randn(3, 5, 64) * 3
    for per_token in (True, False):
        q = st.quantize(mlp, {"activations": {"dynamic": True, "per_token": per_token}}, progress=False)
        lowered, plan = lower(q)
        assert set(plan.values()) == {"dynamic int8"} and isinstance(lowered[0], DynamicInt8)
        ref, got = _run(q, x), _run(lowered, x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), f"per_token={per_token}, CPU {CPU_FLAGS}"


def test_shifted_int8_codes_are_the_uint8_codes_minus_128_exactly():
    # The lowered layer's vectorizable quantization (float codes, one cast to int8) against
    # quant/dynamic.py's uint8 one: the same codes, scales and zero points, bit for bit.
    from shrinktunnel.quant.dynamic import quantize_dynamic_u8

    torch.manual_seed(2)
    x = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]
    x[3] = 0.0  # an all-zero row: the tiniest scale
    x[5] = x[5].abs()  # no negative value: zero point 0
    x[7] = -x[7].abs()  # no positive value: zero point 255
    x[9, ::2] = x[9, ::2].round()  # values on rounding boundaries after scaling are possible
    for per_token in (True, False):
        a, scale, zp = torch_int8.quantize_dynamic_s8_shifted(x, per_token)
        q, ref_scale, ref_zp = quantize_dynamic_u8(x, per_token)
        assert a.dtype == torch.int8 and torch.equal(a.to(torch.int16), q.to(torch.int16) - 128)
        assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)


def test_lowered_int4_weight_only_within_bfloat16_rounding():
    # 4 rows: the int4 kernel; 80 rows: the codes dequantized to bfloat16 and one bfloat16 GEMM, where
    # the layer's inputs split into whole groups (the first Linear, 64 inputs, groups of 32)
    mlp = _mlp()
    for weights in (INT4["weights"], {**INT4["weights"], "symmetric": False}, {"bits": 4}):  # per channel too
        q = st.quantize(mlp, {"weights": weights, "activations": None}, progress=False)
        lowered, plan = lower(q)
        assert set(plan.values()) == {"int4 weight-only"} and isinstance(lowered[2], Int4WeightOnly)
        assert lowered[0].dense == (lowered[0].group == 32) and not lowered[2].dense  # 96 inputs: 3 groups
        for rows in (4, 80):
            x = torch.randn(rows, 64)
            ref, got = _run(q, x), _run(lowered, x)
            assert (got - ref).abs().max() <= 2e-2 * ref.abs().max(), (weights, rows)
            assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999, (weights, rows)
        if lowered[0].dense:  # the two kernels on one input: the same weights, bfloat16 rounding apart
            x = torch.randn(80, 64)
            dense = _run(lowered[0], x)
            lowered[0].DENSE_ROWS = 10**9
            kernel = _run(lowered[0], x)
            assert (dense - kernel).abs().max() <= 1e-2 * kernel.abs().max(), weights


@pytest.mark.slow  # 30 s warm, 70 s with a cold inductor cache on 2 busy cores; benchmarks/torch_int8.py
# compiles the MNIST CNN and MiniLM (static, dynamic and int4) and checks the same things on every run
def test_compiled_model_runs_int8_kernels_and_matches_the_simulation():
    """One compile: static conv2d / conv1d / linear, dynamic Linears, int4 Linears in one model."""
    static, x = _static_cnn()
    dynamic = st.quantize(_mlp(), DYNAMIC, progress=False)
    int4 = st.quantize(_mlp(out=64), INT4, progress=False)
    head = nn.Linear(10, 64)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.static, self.head, self.int4, self.dynamic = static, head, int4, dynamic

        def forward(self, x):
            return self.dynamic(self.int4(self.head(self.static(x))))

    model = Mixed().eval()
    c = st.compile(model)
    assert isinstance(c, Int8Compiled) and c.compile_seconds is None  # compiled at the first call
    counts = {how: list(c.plan.values()).count(how) for how in set(c.plan.values())}
    assert counts == {"static int8": 3, "dynamic int8": 2, "int4 weight-only": 2}
    ref = _run(model, x)
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with warnings.catch_warnings(), inductor_config.patch(fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False):  # compiled here, so the census counts
        warnings.simplefilter("error", UserWarning)  # no "inductor left ... unmatched" warning
        warnings.filterwarnings("ignore", message=".*(TF32|Enum subclass|cache).*")
        got = c(x)
    assert (c.int8_matched, c.int8_unmatched) == (5, 0), f"inductor: {c.int8_matched} matched, {c.int8_unmatched} not (CPU {CPU_FLAGS})"
    assert c.compile_seconds > 0 and got.requires_grad is False
    # static part: within one step of its last output quantizer
    s_ref, s_got = _run(static, x), _run(c.lowered.static, x)
    assert (s_got - s_ref).abs().max() <= _output_steps(static)["fc"] + 1e-6
    # the whole chain: int4 (bfloat16) dominates the difference
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.9999, f"CPU {CPU_FLAGS}"
    assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert torch.equal(c(x), got)  # the second call reuses the compiled code
    # another batch size compiles again (static shapes: torch 2.13's int8 conv lowering fails with dynamic ones)
    small = c(x[:3])
    assert F.cosine_similarity(small.flatten(), ref[:3].flatten(), dim=0) >= 0.9999


def test_layers_that_stay_simulated_say_so_once_per_reason():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(32 * 4 * 4, 24), nn.Linear(24, 10)).eval()
    calib = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    cfg = {"weights": {"granularity": "per_group", "group_size": 32},
           "overrides": [{"pattern": "0", "weights": {"granularity": "per_channel"}, "activations": None},
                         {"pattern": "6", "weights": {"bits": 8}, "activations": None}]}
    q = st.quantize(net, cfg, data=calib, progress=False)
    with pytest.warns(UserWarning) as record:
        c = st.compile(q)
    messages = [str(w.message) for w in record if str(w.message).startswith("compile:")]
    assert len(messages) == 3, messages
    per_group = [m for m in messages if "per-group weights with int8 activations" in m]
    assert len(per_group) == 1 and "2, 5" in per_group[0]  # both layers, one warning
    assert any("weight-only convolution" in m and "compile: 0:" in m for m in messages)
    assert any("8-bit weight-only Linear" in m and "compile: 6:" in m for m in messages)
    assert c.plan["2"].startswith("simulated: per-group") and c.plan["0"].startswith("simulated: weight-only")
    assert c.warnings == messages
    # the layers left as they are still compute the simulated model (no compile needed to check)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(_run(c.lowered, x), _run(q, x))


def test_missing_backend_is_a_config_error_naming_what_is_missing(monkeypatch):
    q = st.quantize(_mlp(), DYNAMIC, progress=False)
    with pytest.raises(ConfigError, match=re.escape("backend='tensorrt' is unknown; allowed: inductor")):
        st.compile(q, backend="tensorrt")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="oneDNN") as info:
        st.compile(q)
    assert "torch.backends.mkldnn.is_available() is False" in str(info.value)
    monkeypatch.setattr(torch_int8.platform, "machine", lambda: "aarch64")
    with pytest.raises(ConfigError, match="an x86 CPU .*aarch64"):
        st.compile(q)


def test_load_with_backend_returns_the_compiled_model(tmp_path):
    q = st.quantize(_mlp(), DYNAMIC, progress=False)
    st.save(q, tmp_path / "a")
    c = st.load(tmp_path / "a", _mlp(), backend="inductor")
    assert isinstance(c, Int8Compiled) and set(c.plan.values()) == {"dynamic int8"}
    x = torch.randn(2, 64)
    assert (_run(c.lowered, x) - _run(q, x)).abs().max() <= 1e-5 * _run(q, x).abs().max()
    with pytest.raises(ConfigError, match="unknown"):
        st.load(tmp_path / "a", _mlp(), backend="onnx")
