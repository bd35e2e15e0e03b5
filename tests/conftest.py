"""Shared fixtures: tiny models with awkward shapes, their data, and small numeric helpers.

Every model is built here, from a fixed seed, in milliseconds. Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything can import huggingface_hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TESTS = Path(__file__).resolve().parent
HELPERS = TESTS / "helpers"
FACTORIES = HELPERS / "factories.py"  # module-level factories, referenced as "path/to/file.py:name"
VENV_BIN = Path(sys.executable).parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # lets test modules `from conftest import ...` the helpers below


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------
class ResidualNet(nn.Module):
    """conv -> relu -> conv, added to the input (the ReLU is a module, but not inside a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class FunctionalReluNet(nn.Module):
    """Linear -> F.relu -> Linear: no nn.ReLU module to fold; odd widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(7, 13)
        self.fc2 = nn.Linear(13, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Conv1dNet(nn.Module):
    """Conv1d with stride and padding, a foldable nn.ReLU in a Sequential, then a dilated Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(2, 6, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(6, 4, 3, dilation=2),
        )

    def forward(self, x):
        return self.body(x)


class GroupedConvNet(nn.Module):
    """Depthwise 3x3 conv (groups == channels), F.relu, then a grouped 1x1 conv without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.gc = nn.Conv2d(4, 6, 1, groups=2, bias=False)

    def forward(self, x):
        return self.gc(F.relu(self.dw(x)))


class FlattenNet(nn.Module):
    """Conv2d(stride 2) + ReLU in a Sequential, then x.view(N, -1) into a Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = self.features(x)
        return self.fc(x.view(x.shape[0], -1))


class TinyAttention(nn.Module):
    """Single-head self-attention: nn.Linear q/k/v/o, matmul + softmax, residual; (N, T, D) input."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.d = d
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1)
        return x + self.o(att @ v)


class UnsupportedNet(nn.Module):
    """Embedding -> LSTM -> Linear: the LSTM has weights but is not quantizable (warned); the embedding
    is quantized weight-only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h, _ = self.lstm(self.emb(tokens))
        return self.head(h[:, -1])


@dataclass(frozen=True)
class Case:
    name: str
    cls: type[nn.Module]
    make_inputs: Callable[[int, torch.Generator], torch.Tensor]
    quantized: tuple[str, ...]  # the module names PTQ must replace
    fused: tuple[str, ...] = ()  # the nn.ReLU modules it must fold into the preceding layer

    def model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.cls().eval()

    def batches(self, n: int = 4, batch: int = 16, seed: int = 1) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [self.make_inputs(batch, g) for _ in range(n)]


def _randn(*shape):
    return lambda n, g: torch.randn(n, *shape, generator=g)


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("residual", ResidualNet, _randn(3, 8, 8), ("conv1", "conv2")),
        Case("functional_relu", FunctionalReluNet, _randn(7), ("fc1", "fc2")),
        Case("conv1d", Conv1dNet, _randn(2, 20), ("body.0", "body.2"), ("body.1",)),
        Case("grouped_conv", GroupedConvNet, _randn(4, 6, 6), ("dw", "gc")),
        Case("flatten", FlattenNet, _randn(1, 10, 10), ("features.0", "fc"), ("features.1",)),
        Case("attention", TinyAttention, _randn(5, 16), ("q", "k", "v", "o")),
        Case("unsupported", UnsupportedNet, lambda n, g: torch.randint(0, 20, (n, 6), generator=g), ("emb", "head")),
    ]
}
SUPPORTED_CASES = [n for n in CASES if n != "unsupported"]


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> Case:
    """Every tiny model, the one with unsupported layers included."""
    return CASES[request.param]


@pytest.fixture(params=SUPPORTED_CASES, ids=SUPPORTED_CASES)
def supported_case(request) -> Case:
    return CASES[request.param]


@pytest.fixture
def one_thread():
    """Many tiny tensor operations on one thread: tiny models train fastest that way, and on a machine
    whose 2 cores other runs share, thread hand-offs would turn microseconds of work into milliseconds.
    Test files that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - approx||^2), in float64; inf for an exact match."""
    ref, err = reference.double(), (reference.double() - approx.double())
    noise = float((err * err).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref * ref).sum()) / noise)


def state_dicts_equal(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return list(sa) == list(sb) and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    from shrinktunnel.quant import QuantizedLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def hidden_entries(directory: Path) -> list[str]:
    """Leftovers of an atomic writer (hidden temporary siblings)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Tests never download anything: any attempt to open a connection outside this machine fails."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"a test tried to reach the network ({address!r}); tests must never download")
        return real_connect(self, address)

    socket.socket.connect = guarded
    yield
    socket.socket.connect = real_connect


@pytest.fixture
def quiet_quantize():
    """st.quantize without the progress bar; returns the function."""
    import shrinktunnel as st

    def run(model, config=None, data=None):
        return st.quantize(model, config, data=data, progress=False)

    return run


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `shrink ARGS...` run in this process."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from shrinktunnel.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def without_openvino(monkeypatch):
    """`importlib.import_module("openvino")` fails as on a machine without the package (the runtimes import it so)."""
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)


def runtime_installed(runtime: str) -> bool:
    """Whether an export runtime's package imports here (export/packages.require), for skipif marks."""
    from shrinktunnel.export.packages import RuntimeMissingError, require

    try:
        require(runtime)
        return True
    except RuntimeMissingError:
        return False
