"""What `quantize` offers the search (`st.analyze` / `st.auto`), declared where it registers.

Weight-only per-channel symmetric actions carry the size (quant8 ... quant2; GPTQ's rounding and
Huffman-coded integers by name); W8A8 static (`int8`) and dynamic (`dyn8`, and `dyn6h` / `dyn5h` with the
weights on a smaller Huffman-coded grid) are the speed actions;
log2 (power-of-two) weights by name (`log2_4`, `log2_3`) for shift-only targets.
With recovery, a stage of `qat_bits` bits or fewer trains through fake quantization (the `qat`
method: PTQ, fine-tuning to the float model's outputs, converted to exactly PTQ's layers).
"""

from __future__ import annotations

from typing import Any

from ..core.registry import SearchAction, SearchHooks

__all__ = ["QUANTIZE_SEARCH"]


def _weights(bits: int, huffman: bool) -> dict[str, Any]:
    w = {"bits": bits, "granularity": "per_channel", "symmetric": True}
    return {**w, "coding": "huffman"} if huffman else w


def _weight_only(bits: int, huffman: bool = False, gptq: bool = False, default: bool = False) -> SearchAction:
    config = {"weights": _weights(bits, huffman), "activations": None, **({"rounding": "gptq"} if gptq else {})}
    return SearchAction(f"{'gptq' if gptq else 'quant'}{bits}{'h' if huffman else ''}", config, float(bits),
                        default=default)


def _recover(config: dict[str, Any], recovery: Any) -> tuple[str, dict[str, Any]] | None:
    """Low-bit weight-only stages train through fake quantization (QAT) for `recovery.qat_steps`,
    on the distance to the model before the stage (no labels needed): GPTQ's rounding is replaced by
    training, which starts from the same grid."""
    weights = config.get("weights") or {}
    steps = getattr(recovery, "qat_steps", 0)
    if not steps or config.get("activations") is not None or weights.get("bits", 8) > getattr(recovery, "qat_bits", 4):
        return None
    qat = {k: v for k, v in config.items() if k in ("weights", "activations", "layers", "skip", "overrides")}
    return "qat", {**qat, "steps": steps, "lr": getattr(recovery, "qat_lr", 1e-4), "loss": "mse_to_float"}


QUANTIZE_SEARCH = SearchHooks(
    family="quantize", order=40, recover=_recover,
    actions=(
        *(_weight_only(b, default=True) for b in (8, 6, 4, 2)),
        # W8A8 static: predicted speed 1.0 (int8 on every layer of the MNIST CNN ran only 1.2-1.6x faster in
        # ONNX Runtime, docs/search.md); the latency objective measures every candidate anyway
        SearchAction("int8", {"weights": {"bits": 8}, "activations": {}}, 8.0, speed=1.0),
        _weight_only(3), *(_weight_only(b, gptq=True) for b in (4, 3, 2)),
        # int8 with dynamic activations per tensor and SmoothQuant factors: ONNX Runtime's DynamicQuantizeMatMul,
        # 12 ms of int8 kernels against 61 ms of fp32 MatMul on all-MiniLM-L6-v2's Linears: speed 0.3
        SearchAction("dyn8", {"weights": _weights(8, False), "activations": {"dynamic": True, "per_token": False},
                              "smooth": "auto"}, 8.0, speed=0.3, default=False),
        # the same int8 kernels with the weights on a 6 / 5-bit grid, Huffman-coded in the artifact (int8 in the
        # ONNX file): size and speed in one action, the joint objective's (`--min-speedup`; docs/search.md)
        *(SearchAction(f"dyn{b}h", {"weights": _weights(b, True), "activations": {"dynamic": True, "per_token": False},
                                    "smooth": "auto"}, float(b), speed=0.3, default=False) for b in (6, 5)),
        *(_weight_only(b, huffman=True) for b in (8, 6, 5, 4, 3)),
        *(_weight_only(b, huffman=True, gptq=True) for b in (6, 5, 4, 3)),
        # log2 (power-of-two) weights: the same bytes as intN, a shift instead of a multiply on hardware
        # that has one; never faster in ONNX Runtime / on CPU (exported as int8 QDQ), so by name only
        *(SearchAction(f"log2_{b}", {"weights": {"bits": b, "format": "log2", "granularity": "per_channel"},
                                     "activations": None}, float(b), default=False) for b in (4, 3)),
    ))
