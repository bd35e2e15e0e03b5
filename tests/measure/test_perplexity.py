"""st.measure.perplexity against hand computations: a uniform model, lm-evaluation-harness's rolling
windows written out as it does, and per-token brute force for strided windows."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shrinktunnel.errors import ConfigError, DataError
from shrinktunnel.measure import perplexity
from shrinktunnel.measure.perplexity import negative_log_likelihood


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) + 0 * self.w


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_uniform_model_has_perplexity_vocab():
    ids = torch.randint(0, 50, (3, 16))
    assert perplexity(Uniform(50), ids) == pytest.approx(50.0, rel=1e-6)
    assert perplexity(Uniform(50), ids, stride=5, prefix_token=0) == pytest.approx(50.0, rel=1e-6)
    total, count = negative_log_likelihood(Uniform(50), ids)
    assert count == 3 * 16 - 1 and total == pytest.approx(count * math.log(50), rel=1e-6)
    # word perplexity: the same sum over the words
    assert perplexity(Uniform(50), ids, words=10) == pytest.approx(math.exp(count * math.log(50) / 10), rel=1e-5)


def _lm_eval_rolling(token_list, prefix_token, max_seq_len, context_len=1):
    # lm_eval.utils.get_rolling_token_windows, as published
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    yield ([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len])
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (token_list[window_end - max_seq_len - 1: window_end - 1], token_list[window_end - window_pred_len: window_end])
        predicted += window_pred_len


def test_rolling_windows_match_lm_evaluation_harness():
    model = _tiny_llama()
    ids = torch.randint(3, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    stream = ids.reshape(-1).tolist()[:-5]  # 43 tokens: a last window shorter than the others
    total = 0.0
    with torch.no_grad():
        for context, cont in _lm_eval_rolling(stream, 2, 12):
            context = context[: len(context) - (len(cont) - 1)]  # lm_eval.utils.make_disjoint_window
            # lm-eval's _loglikelihood_tokens: the window is context + continuation minus its last token
            inp = torch.tensor([(context + cont)[-(12 + 1):][:-1]])
            logp = torch.log_softmax(model(inp).logits[0, -len(cont):].double(), -1)
            total -= float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
    expected = math.exp(total / len(stream))
    got = perplexity(model, torch.tensor(stream), max_length=12, prefix_token=2, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)


def test_strided_windows_against_per_token_brute_force():
    model = _tiny_llama()
    seq = torch.randint(3, 97, (30,), generator=torch.Generator().manual_seed(2))
    L, stride = 10, 4
    # By hand: the first window scores tokens 1..L from seq[0:L]; then each window scores `stride`
    # tokens, every target t seeing the L tokens up to the window's last input.
    total, n = 0.0, 0
    with torch.no_grad():
        chunks = [(1, L + 1)] + [(s, min(s + stride, 30)) for s in range(L + 1, 30, stride)]
        for s, e in chunks:
            a = max(0, e - 1 - L)
            for t in range(s, e):
                logp = torch.log_softmax(model(seq[a:t].unsqueeze(0)).logits[0, -1].double(), -1)
                total -= float(logp[seq[t]])
                n += 1
    assert n == 29
    got = perplexity(model, seq.reshape(3, 10), stride=stride)
    assert got == pytest.approx(math.exp(total / n), rel=1e-5)
    # more context per token: below the disjoint windows' perplexity on this stream
    assert perplexity(model, seq.reshape(3, 10), stride=1) != perplexity(model, seq.reshape(3, 10))


def test_bad_inputs():
    with pytest.raises(ConfigError, match="stride"):
        perplexity(Uniform(5), torch.zeros(2, 4, dtype=torch.long), stride=5)
    with pytest.raises(DataError, match="token ids"):
        perplexity(Uniform(5), torch.zeros(2, 4))
    with pytest.raises(DataError, match="fewer than 2"):
        perplexity(Uniform(5), torch.zeros(1, 1, dtype=torch.long))
