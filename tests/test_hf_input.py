"""A Hugging Face model directory as MODEL and a .txt file as DATA (issue 20): the good path through the CLI
with --eval-text, and each bad input as one line, exit 2, nothing written. Tiny random Llama and a word-level
tokenizer built here (no downloads)."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shrinktunnel as st
from shrinktunnel.errors import DataError, ModelError
from shrinktunnel.core.hf_input import load_hf_model, load_tokenizer, text_batches, token_windows
from test_cli import run_cli

WORDS = ("the a model layer weight small fast int four bits group scale zero point token window text is of and "
         "to in on runs holds reads writes each one two three").split()


def _corpus(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, eos_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text(_corpus(400))
    (d / "eval.txt").write_text(_corpus(200, seed=1))
    (d / "short.txt").write_text("the model")
    return d


def _recipe(tmp_path, group_size=16, **extra):
    cfg = {"weights": {"bits": 4, "granularity": "per_group", "group_size": group_size, "symmetric": False},
           "activations": None, **extra}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps([{"quantize": cfg}]))  # JSON is YAML
    return path


def test_text_is_cut_into_consecutive_windows(model_dir, texts):
    tok = load_tokenizer(model_dir)
    ids = tok(_corpus(400), return_tensors="pt").input_ids[0]
    w = token_windows(tok, _corpus(400), 32, samples=5)
    assert w.shape == (5, 32) and torch.equal(w.reshape(-1), ids[:160])
    batches = text_batches(texts / "calib.txt", model_dir, seq_len=32, samples=None, batch_size=4)
    assert sum(len(b) for b in batches) == ids.numel() // 32 and all(b.shape[1:] == (32,) for b in batches)
    assert torch.equal(torch.cat(text_batches([_corpus(400)], tok, 32, 3)), w[:3])  # a list of strings too


def test_cli_compresses_a_model_directory_on_text_with_perplexity(model_dir, texts, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run_cli("compress", model_dir, "--recipe", _recipe(tmp_path, rounding="gptq"),
                                "--data", texts / "calib.txt", "--seq-len", 32, "--samples", 8,
                                "--eval-text", texts / "eval.txt", "--out", out)
    assert code == 0, err + stdout
    report = json.loads((out / "report.json").read_text())
    before, after = report["metrics"]["before"]["metric"], report["metrics"]["after"]["metric"]
    assert 1.0 < before < 100 and 1.0 < after < 100  # perplexities (a random model over ~30 words)
    loaded = st.load(out)  # rebuilt from the recorded config: no code runs
    ids = token_windows(load_tokenizer(model_dir), _corpus(50), 16)
    ref = load_hf_model(model_dir)
    with torch.no_grad():
        assert loaded(ids).logits.shape == ref(ids).logits.shape


@pytest.mark.parametrize("case, match", [
    ("short", "tokenizes to 2 tokens, fewer than one window of seq_len=32"),
    ("no_weights", "has no weights: expected model.safetensors"),
    ("group", "group_size=24 does not divide the input dimension"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(model_dir, texts, tmp_path, case, match):
    import shutil

    model, data, recipe = model_dir, texts / "calib.txt", _recipe(tmp_path)
    if case == "short":
        data = texts / "short.txt"
    elif case == "no_weights":
        model = tmp_path / "empty-model"
        model.mkdir()
        shutil.copy(model_dir / "config.json", model / "config.json")
    elif case == "group":
        recipe = _recipe(tmp_path, group_size=24)
    out = tmp_path / "out"
    code, _, err = run_cli("compress", model, "--recipe", recipe, "--data", data, "--seq-len", 32, "--out", out)
    assert code == 2 and match in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_python_errors_are_typed(model_dir, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json is not readable JSON"):
        load_hf_model(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        text_batches(tmp_path / "missing.txt", model_dir)


def test_st_compress_takes_a_model_directory_and_strings(model_dir):
    cfg = {"weights": {"bits": 4, "granularity": "per_group", "group_size": 16}, "activations": None}
    with pytest.raises(DataError, match="fewer than one window of seq_len=512"):
        st.compress(model_dir, [("quantize", cfg)], data=[_corpus(100)], progress=False)
    result = st.compress(model_dir, [("quantize", cfg)], data=[_corpus(600), _corpus(600, seed=2)], progress=False)
    layers = result.model.model.layers
    assert all(type(getattr(blk.mlp, n)).__name__ == "QuantizedLayer" for blk in layers for n in ("gate_proj", "down_proj"))
