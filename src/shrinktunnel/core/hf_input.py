"""Hugging Face causal LMs and plain text as MODEL and DATA (issue 20).

- A model directory (`config.json` + safetensors weights, as `save_pretrained` writes it) loads with
  transformers' AutoModelForCausalLM, float32, offline, `trust_remote_code=False`: only architectures
  transformers itself ships, and no pickle (`use_safetensors=True`; a directory holding only
  `pytorch_model.bin` is refused with the conversion to use). The artifact records the model's config,
  which rebuilds the architecture at `st.load` without running code.
- Text: a `.txt` file or a list of strings, tokenized once with the model directory's tokenizer, cut into
  consecutive windows of `seq_len` tokens (the remainder dropped), `samples` of them at most, batched
  (`text_batches`). Fewer tokens than one window is an error, not a silent empty calibration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DataError, ModelError, one_line

__all__ = ["is_hf_model_dir", "load_hf_model", "load_tokenizer", "token_windows", "read_text", "text_batches"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """A directory with a config.json and no shrinktunnel manifest (an artifact is read by st.load)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "manifest.json").exists()


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{str(path)!r}: config.json is not readable JSON ({one_line(exc)}); re-save the model "
                         "with save_pretrained") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ModelError(f"{str(path)!r}: config.json has no model_type; it is not a Hugging Face model config")
    return cfg


def load_hf_model(path: str | os.PathLike) -> nn.Module:
    """The causal LM in the Hugging Face model directory `path`, float32, eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(path)
    cfg = _config(p)
    if not any((p / w).is_file() for w in _WEIGHTS):
        other = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (f" (it holds {', '.join(other)}: pickled or other formats are not loaded; convert with "
                "model.save_pretrained(dir, safe_serialization=True))") if other else ""
        raise ModelError(f"model directory {str(p)!r} has no weights: expected {' or '.join(_WEIGHTS)}{hint}")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" on stderr: the CLI's error contract is one line there
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True,
                                                     trust_remote_code=False, use_safetensors=True)
    except Exception as exc:
        raise ModelError(f"cannot load the Hugging Face model in {str(p)!r} (model_type {cfg['model_type']!r}) as a "
                         f"causal LM: {one_line(exc)}") from exc
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    from .history import update_record
    from .rebuild import transformers_entry

    hf = transformers_entry(model)  # the config st.load rebuilds the architecture from, running no code
    if hf is not None:
        update_record(model, transformers=hf)
    return model.eval()


def load_tokenizer(path: str | os.PathLike) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise DataError(f"text data needs the model directory's tokenizer, and {str(path)!r} has none that loads "
                        f"({one_line(exc)}); save it there with tokenizer.save_pretrained") from exc


def read_text(source: str | os.PathLike | list[str]) -> str:
    """A .txt file's content (UTF-8), or a list of strings joined by blank lines."""
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise DataError("text data: a list must hold strings")
        return "\n\n".join(source)
    p = Path(source)
    if not p.is_file():
        raise DataError(f"text file {str(source)!r} does not exist; check the path (relative to {Path.cwd()})")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"text file {str(source)!r} is not readable UTF-8 text ({one_line(exc)})") from None


def token_windows(tokenizer: Any, text: str | list[str], seq_len: int, samples: int | None = None) -> torch.Tensor:
    """(n, seq_len) token ids: `text` (strings joined by blank lines) tokenized once and cut into
    consecutive windows; the remainder shorter than a window is dropped. Fewer tokens than one window:
    DataError."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: a window needs at least 2 tokens")
    if not isinstance(text, str):
        text = "\n\n".join(text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise DataError(f"the text tokenizes to {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
                        "give more text or a smaller --seq-len")
    if samples is not None:
        n = min(n, samples)
    return ids[: n * seq_len].reshape(n, seq_len)


def text_batches(source: str | os.PathLike | list[str], tokenizer: Any, seq_len: int = 512,
                 samples: int | None = 128, batch_size: int = 4) -> list[torch.Tensor]:
    """Calibration / evaluation batches (b, seq_len) of token ids from a .txt file or a list of strings."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    windows = token_windows(tokenizer, read_text(source), seq_len, samples)
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]

