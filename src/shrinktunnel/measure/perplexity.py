"""Perplexity of a causal language model over a token stream, as lm-evaluation-harness computes it.

lm-evaluation-harness scores a document (its wikitext task) with `loglikelihood_rolling`: the tokens are
cut into windows of the model's length L, every token is predicted once, the first from a prefix token
(end-of-text) and each later one from at most L tokens of real context before it
(`get_rolling_token_windows(..., context_len=1)`: disjoint windows, each starting one token before its
targets). Perplexity is exp of the mean negative log-likelihood per token; its word perplexity divides
the same sum by the number of words instead (`words=`).

`stride` < L gives the sliding window of Hugging Face's perplexity guide: each window scores only its
last `stride` tokens, the others being context, so every token but the first window's has at least
L - stride tokens of context (lower perplexity, L / stride times the compute). stride = L (the
default) is lm-evaluation-harness's rolling scheme exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError

__all__ = ["perplexity", "negative_log_likelihood"]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "logits"):
        return out["logits"] if isinstance(out, dict) else out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise DataError(f"perplexity: the model returned {type(out).__name__}; it must return logits (B, T, vocab) "
                    "or an object with .logits (a Hugging Face causal LM)")


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(a, s, e) per window over a sequence of n tokens: input seq[a:e-1], targets seq[s:e] (s >= 1),
    e - 1 - a <= max_length. The first window scores up to max_length tokens, each later one `stride`."""
    out, s = [], 1
    first = True
    while s < n:
        e = min(n, s + (max_length if first else stride))
        out.append((max(0, e - 1 - max_length), s, e))
        s, first = e, False
    return out


@torch.no_grad()
def negative_log_likelihood(model: nn.Module, token_windows: torch.Tensor, *, stride: int | None = None,
                            max_length: int | None = None, prefix_token: int | None = None,
                            batch_size: int = 4) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of tokens scored) of the stream
    `token_windows.reshape(-1)` (see `perplexity`)."""
    if token_windows.dim() not in (1, 2) or token_windows.dtype not in (torch.int32, torch.int64):
        raise DataError(f"perplexity: token_windows must be integer token ids shaped (n, seq_len) or (tokens,), "
                        f"got {tuple(token_windows.shape)} {token_windows.dtype}")
    L = max_length or token_windows.shape[-1]
    stride = stride or L
    if not 1 <= stride <= L:
        raise ConfigError(f"perplexity: stride={stride} must be in [1, max_length={L}]")
    seq = token_windows.reshape(-1).long()
    if prefix_token is not None:
        seq = torch.cat([torch.tensor([prefix_token]), seq])
    if seq.numel() < 2:
        raise DataError("perplexity: fewer than 2 tokens (with the prefix): nothing to predict")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, count = 0.0, 0
    windows = _windows(seq.numel(), L, stride)
    try:
        i = 0
        while i < len(windows):
            # Batch consecutive windows of one input length (all but the first and the last, usually).
            j, size = i + 1, windows[i][2] - 1 - windows[i][0]
            while j < len(windows) and j - i < batch_size and windows[j][2] - 1 - windows[j][0] == size \
                    and windows[j][2] - windows[j][1] == windows[i][2] - windows[i][1]:
                j += 1
            ids = torch.stack([seq[a:e - 1] for a, _, e in windows[i:j]]).to(device)
            logits = _logits(model, ids).float()
            n_t = windows[i][2] - windows[i][1]
            targets = torch.stack([seq[s:e] for _, s, e in windows[i:j]]).to(device)
            nll = F.cross_entropy(logits[:, -n_t:].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            total += float(nll.double().sum())  # summed in float64: thousands of float32 terms
            count += targets.numel()
            i = j
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, token_windows: torch.Tensor, *, stride: int | None = None,
               max_length: int | None = None, prefix_token: int | None = None, words: int | None = None,
               batch_size: int = 4) -> float:
    """exp(mean negative log-likelihood per token) of a causal LM over `token_windows` (n, seq_len) token
    ids, read as one stream (the windows' concatenation), in context windows of `max_length` tokens
    (default seq_len).

    stride: None (= max_length): lm-evaluation-harness's rolling windows, every token scored once with
    the context of its own window. Smaller: each window scores its last `stride` tokens only (more
    context per token, max_length / stride times the compute).
    prefix_token: lm-evaluation-harness prepends end-of-text so that the stream's first token is scored
    too; None scores from the second token (Hugging Face's guide).
    words: given, the word perplexity of lm-evaluation-harness's wikitext (the same sum over `words`)."""
    total, count = negative_log_likelihood(model, token_windows, stride=stride, max_length=max_length,
                                           prefix_token=prefix_token, batch_size=batch_size)
    return math.exp(total / (words if words else count))
