"""A Llama-family causal LM as an ONNX decoder with a KV cache, its Linears as ONNX Runtime's MatMulNBits.

`export_llm(model, path)` writes the graph node by node (onnx.helper), from the model's modules and
config, rather than tracing the Hugging Face forward: the cache layout is then ours and fixed, the graph
has no shape-dependent branches to trace around, and a 30-block model exports in seconds.

    inputs   input_ids (batch, seq) int64;  past_key_<i>, past_value_<i> (batch, kv_heads, past, head_dim)
    outputs  logits (batch, seq, vocab);    present_key_<i>, present_value_<i> (batch, kv_heads, past + seq, head_dim)

Positions are past .. past + seq - 1 and attention is causal over past + seq tokens; there is no
attention mask input, so a batch holds prompts of one length (no padding). A first call passes empty
pasts (past = 0), each later call the presents of the one before (`generate`).

Each Linear, by what the model holds:
- nn.Linear: MatMul on its float weight (the fp32 reference graph).
- a weight-only QuantizedLayer, per group (group a power of two >= 16) or per channel (in_features such a
  power of two): com.microsoft MatMulNBits with its integers and scales unchanged. 4-bit containers for
  2 to 4 bits (3-bit codes are 4-bit codes that never use the top values: exact, int4 speed), 8-bit ones
  for 5 to 8 bits. Symmetric int weights q become codes q + 2^(container-1) with that zero point.
- anything else: MatMul on the dequantized weight, with a note saying so.
AWQ's per-input-channel factor (input_smooth) is one Mul before the layer. The tied output head reads the
embedding table through Gemm(transB=1): one copy of the table in the file.

Supported: model_type llama, mistral (sliding window ignored: exact up to its window) and qwen2 (q/k/v
biases), SiLU MLP, RMSNorm, default or scaled RoPE (the model's own inv_freq and attention_scaling).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, ModelError

__all__ = ["export_llm", "generate", "llm_session", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
OPSET = 17
_EXTERNAL_ABOVE = 1_500_000_000  # bytes of weights above which they go to a side file (protobuf caps a file at 2 GB)


class _Graph:
    """Nodes and initializers, with fresh names."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.h, self.nh = helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self.names: set[str] = set()
        self.n = 0

    def op(self, op: str, *inputs: str, domain: str = "", outputs: int = 1, **attrs: Any) -> Any:
        self.n += 1
        names = [f"{op}_{self.n}" + (f"_{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(self.h.make_node(op, list(inputs), names, domain=domain, **attrs))
        return names if outputs > 1 else names[0]

    def const(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        """An initializer; a name given twice (the shared small constants) is stored once."""
        if name in self.names:
            return name
        self.names.add(name)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous().numpy()
        self.inits.append(self.nh.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes < 2^bits along the last axis -> bytes, 8 / bits codes a byte, the first in the low bits."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for j in range(per):
        out |= (c[..., j] << (bits * j)).astype(np.uint8)
    return out


def _nbits_tensors(layer: nn.Module) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray] | None:
    """(container bits, block, B, scales, zero_points) of MatMulNBits for a weight-only QuantizedLayer, or
    None when its format has no MatMulNBits form."""
    w = layer._format
    n, k = layer._spec["weight_shape"]
    if w.get("format", "int") != "int" or w["bits"] > 8:
        return None
    block = w["group_size"] if w["granularity"] == "per_group" else (k if w["granularity"] == "per_channel" else None)
    if block is None or block < 16 or block & (block - 1) or k % block:
        return None
    container = 4 if w["bits"] <= 4 else 8
    groups = k // block
    q = layer.integer_weight().to(torch.int16).reshape(n, groups, block)
    signed = w["dtype"] == "int8"
    offset = 1 << (container - 1) if signed else 0
    codes = (q + offset).numpy().astype(np.uint8)
    zp = (np.full((n, groups), offset, np.uint8) if signed
          else layer.weight_zero_point.reshape(n, groups).numpy().astype(np.uint8))
    per = 8 // container
    if groups % per:
        zp = np.concatenate([zp, np.zeros((n, per - groups % per), np.uint8)], axis=1)
    scales = layer.weight_scale.reshape(n, groups).float().numpy().reshape(-1)
    return container, block, _pack_codes(codes, container), scales, _pack_codes(zp, container).reshape(-1)


class _Builder:
    def __init__(self, model: nn.Module, notes: list[str]) -> None:
        self.g = _Graph()
        self.model = model
        self.notes = notes

    def linear(self, name: str, module: nn.Module, x: str) -> str:
        g = self.g
        if type(module).__name__ == "QuantizedLayer":
            if module.kind != "linear" or module.input_quant is not None or module.input_dynamic is not None \
                    or module._spec.get("activation") or module.output_quant is not None:
                raise ExportError(f"export_llm: {name} quantizes activations; the LLM export takes weight-only "
                                  "layers (activations: null) or float ones")
            if module._spec.get("input_smooth"):
                x = g.op("Mul", x, g.const(f"{name}.input_smooth", module.input_smooth.float()))
            nb = _nbits_tensors(module)
            if nb is not None:
                bits, block, b, scales, zp = nb
                n, k = module._spec["weight_shape"]
                y = g.op("MatMulNBits", x, g.const(f"{name}.qweight", b), g.const(f"{name}.scales", scales),
                         g.const(f"{name}.zero_points", zp), domain="com.microsoft", K=k, N=n, bits=bits, block_size=block)
            else:
                self.notes.append(f"{name}: {module._format['bits']}-bit {module._format['granularity']} weights have no "
                                  "MatMulNBits form (block a power of two >= 16 dividing in_features); exported dequantized")
                y = g.op("MatMul", x, g.const(f"{name}.weight_t", module.dequantized_weight().float().t()))
        elif isinstance(module, nn.Linear) and type(module) is nn.Linear:
            y = g.op("MatMul", x, g.const(f"{name}.weight_t", module.weight.float().t()))
        else:
            raise ExportError(f"export_llm: {name} is a {type(module).__name__}; the LLM export takes nn.Linear or "
                              "weight-only quantized layers (st.quantize with activations: null)")
        bias = getattr(module, "bias", None)
        return y if bias is None else g.op("Add", y, g.const(f"{name}.bias", bias.float()))

    def norm(self, name: str, module: nn.Module, x: str, eps: float) -> str:
        return self.g.op("SimplifiedLayerNormalization", x, self.g.const(f"{name}.weight", module.weight.float()),
                         axis=-1, epsilon=float(eps), stash_type=1)


def _table(embed: nn.Module) -> torch.Tensor:
    """The dense float embedding table (a tied, quantized or float embedding)."""
    if hasattr(embed, "dequantized_weight"):
        return embed.dequantized_weight().float()
    return embed.weight.detach().float()


def _check_model(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES or not hasattr(model, "model") or not hasattr(model, "lm_head"):
        raise ModelError(f"export_llm: model_type {kind!r} ({type(model).__name__}) is not supported; it exports "
                         f"Hugging Face causal LMs of type {', '.join(SUPPORTED_MODEL_TYPES)} (use st.export_onnx for others)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ModelError(f"export_llm: hidden_act {cfg.hidden_act!r}; the exporter writes SiLU MLPs only")
    return cfg


def _rope(b: _Builder, model: nn.Module, pos: str) -> tuple[str, str]:
    """cos, sin (seq, head_dim) at positions `pos` (seq,) int64, from the model's own rotary module."""
    g = b.g
    rot = model.model.rotary_emb
    inv = rot.inv_freq.float().reshape(1, -1)
    freqs = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=1), g.ints("axis1", [1])), g.const("inv_freq", inv))
    emb = g.op("Concat", freqs, freqs, axis=-1)
    scale = float(getattr(rot, "attention_scaling", 1.0))
    cos, sin = g.op("Cos", emb), g.op("Sin", emb)
    if scale != 1.0:
        s = g.const("rope_scaling", np.asarray(scale, np.float32))
        cos, sin = g.op("Mul", cos, s), g.op("Mul", sin, s)
    return cos, sin


def _rotate(g: _Graph, x: str, cos: str, sin: str, half: str) -> str:
    x1, x2 = g.op("Split", x, half, axis=-1, outputs=2)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", g.op("Concat", g.op("Neg", x2), x1, axis=-1), sin))


def _attention(b: _Builder, i: int, layer: nn.Module, h: str, cfg: Any, rope: tuple, mask: str) -> tuple[str, str, str]:
    """(attention output (B, S, hidden) before o_proj, present key, present value) of block i."""
    g, att = b.g, layer.self_attn
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rep = heads // kv
    p = f"model.layers.{i}.self_attn"

    def split_heads(x: str, n: int) -> str:  # (B, S, n*d) -> (B, n, S, d)
        return g.op("Transpose", g.op("Reshape", x, g.ints(f"shape_heads{n}", [0, 0, n, d])), perm=[0, 2, 1, 3])

    q = _rotate(g, split_heads(b.linear(f"{p}.q_proj", att.q_proj, h), heads), *rope, g.ints("half", [d // 2, d // 2]))
    k = _rotate(g, split_heads(b.linear(f"{p}.k_proj", att.k_proj, h), kv), *rope, "half")
    v = split_heads(b.linear(f"{p}.v_proj", att.v_proj, h), kv)
    pk = g.op("Concat", f"past_key_{i}", k, axis=2)
    pv = g.op("Concat", f"past_value_{i}", v, axis=2)
    # Grouped queries without copying keys: heads h*rep .. h*rep+rep-1 read kv head h (HF's repeat_kv), so
    # q (B, H, S, d) viewed as (B, kv, rep*S, d) meets the kv heads directly; the mask repeats rep times.
    qg = g.op("Reshape", q, g.ints("shape_groups", [0, kv, -1, d]))
    scores = g.op("MatMul", qg, g.op("Transpose", pk, perm=[0, 1, 3, 2]))
    scaling = float(getattr(att, "scaling", d ** -0.5))
    scores = g.op("Add", g.op("Mul", scores, g.const(f"scaling_{i}", np.asarray(scaling, np.float32))), mask)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), pv)  # (B, kv, rep*S, d)
    out = g.op("Transpose", g.op("Reshape", out, g.ints("shape_ungroup", [0, heads, -1, d])), perm=[0, 2, 1, 3])
    return g.op("Reshape", out, g.ints("shape_merge", [0, 0, heads * d])), pk, pv


def _causal_mask(g: _Graph, past: str, seq: str, rep: int) -> tuple[str, str]:
    """(positions past .. past+seq-1 (seq,), additive mask (rep*seq, past+seq): 0 where key j <= query position)."""
    one = g.ints("one", [1])
    pos = g.op("Range", g.op("Squeeze", past), g.op("Squeeze", g.op("Add", past, seq)), g.op("Squeeze", one))
    keys = g.op("Range", g.op("Squeeze", g.ints("zero", [0])), g.op("Squeeze", g.op("Add", past, seq)), g.op("Squeeze", one))
    later = g.op("Less", g.op("Unsqueeze", pos, g.ints("axis1", [1])), g.op("Unsqueeze", keys, g.ints("axis0", [0])))
    mask = g.op("Where", later, g.const("neg", np.asarray(-1e9, np.float32)), g.const("zero_f", np.asarray(0, np.float32)))
    return pos, (g.op("Tile", mask, g.ints("tile_rep", [rep, 1])) if rep > 1 else mask)


def build_llm_graph(model: nn.Module, notes: list[str]) -> Any:
    """The onnx.ModelProto of a supported causal LM (see the module docstring)."""
    from onnx import TensorProto, helper

    cfg = _check_model(model)
    b = _Builder(model, notes)
    g = b.g
    inner = model.model
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = cfg.rms_norm_eps
    past = g.op("Slice", g.op("Shape", "past_key_0"), g.ints("two", [2]), g.ints("three", [3]))
    seq = g.op("Slice", g.op("Shape", "input_ids"), g.ints("one", [1]), "two")
    pos, mask = _causal_mask(g, past, seq, heads // kv)
    rope = _rope(b, model, pos)
    table = _table(inner.embed_tokens)
    x = g.op("Gather", g.const("model.embed_tokens.weight", table), "input_ids", axis=0)
    presents = []
    for i, layer in enumerate(inner.layers):
        h = b.norm(f"model.layers.{i}.input_layernorm", layer.input_layernorm, x, eps)
        att, pk, pv = _attention(b, i, layer, h, cfg, rope, mask)
        x = g.op("Add", x, b.linear(f"model.layers.{i}.self_attn.o_proj", layer.self_attn.o_proj, att))
        h = b.norm(f"model.layers.{i}.post_attention_layernorm", layer.post_attention_layernorm, x, eps)
        m = f"model.layers.{i}.mlp"
        gate = b.linear(f"{m}.gate_proj", layer.mlp.gate_proj, h)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), b.linear(f"{m}.up_proj", layer.mlp.up_proj, h))
        x = g.op("Add", x, b.linear(f"{m}.down_proj", layer.mlp.down_proj, act))
        presents += [pk, pv]
    h = b.norm("model.norm", inner.norm, x, eps)
    head = model.lm_head
    if type(head) is nn.Linear and head.weight.data_ptr() == inner.embed_tokens.weight.data_ptr() and head.bias is None:
        # Tied float head: Gemm reads the Gather's table transposed; (B*S, hidden) -> (B, S, vocab).
        flat = g.op("Reshape", h, g.ints("shape_flat", [-1, cfg.hidden_size]))
        y = g.op("Gemm", flat, "model.embed_tokens.weight", transB=1)
        shape = g.op("Concat", g.op("Shape", "input_ids"), g.ints("vocab", [table.shape[0]]), axis=0)
        logits = g.op("Reshape", y, shape)
    else:
        logits = b.linear("lm_head", head, h)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    for j, name in enumerate(presents):
        kind = "key" if j % 2 == 0 else "value"
        g.nodes.append(helper.make_node("Identity", [name], [f"present_{kind}_{j // 2}"]))
    n_layers = len(inner.layers)
    cache = ["batch", kv, "past", d]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [helper.make_tensor_value_info(f"past_{t}_{i}", TensorProto.FLOAT, cache)
               for i in range(n_layers) for t in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", table.shape[0]])]
    outputs += [helper.make_tensor_value_info(f"present_{t}_{i}", TensorProto.FLOAT, ["batch", kv, "total", d])
                for i in range(n_layers) for t in ("key", "value")]
    graph = helper.make_graph(g.nodes, "shrinktunnel_llm", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="shrinktunnel")


def export_llm(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Write `model` (a supported Hugging Face causal LM, float or st.quantize'd weight-only) as an ONNX
    decoder with a KV cache at `path` (weights above 1.5 GB in `<path>.data` beside it). Written to a
    temporary name and renamed: a failure leaves nothing at `path`. Returns {path, bytes, nodes, notes}."""
    import onnx

    path = Path(path)
    notes: list[str] = []
    with torch.no_grad():
        proto = build_llm_graph(model, notes)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = path.with_name(path.name + ".data")
    try:
        if size > _EXTERNAL_ABOVE:
            onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        else:
            onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "nodes": counts, "notes": notes}


def llm_session(path: str | os.PathLike, threads: int = 2) -> Any:
    """An ONNX Runtime CPU session of an exported LLM with `threads` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def generate(session: Any, input_ids: torch.Tensor | np.ndarray, max_new_tokens: int,
             eos_token_id: int | None = None) -> dict[str, Any]:
    """Greedy decoding in ONNX Runtime with the KV cache: one call on the prompt (batch, seq), then one
    call per new token. Returns {tokens (batch, new) int64 array, prefill_s, decode_s, decode_tokens_per_s}."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ModelError(f"generate: input_ids must be (batch, seq) with seq >= 1, got shape {ids.shape}")
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_")]
    feed = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32) for i in past_inputs}
    names = ["logits"] + [i.name.replace("past_", "present_") for i in past_inputs]
    out_tokens, times = [], []
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        outs = session.run(names, {"input_ids": ids, **feed})
        times.append(time.perf_counter() - t0)
        nxt = outs[0][:, -1].argmax(-1).astype(np.int64)
        out_tokens.append(nxt)
        feed = {i.name: o for i, o in zip(past_inputs, outs[1:])}
        ids = nxt[:, None]
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
    decode = sum(times[1:])
    return {"tokens": np.stack(out_tokens, axis=1), "prefill_s": times[0], "decode_s": decode,
            "decode_tokens_per_s": (len(times) - 1) / decode if decode > 0 else None}
