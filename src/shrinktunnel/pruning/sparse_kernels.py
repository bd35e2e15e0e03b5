"""Sparse kernels: a pruned Linear runs a sparse matrix product in PyTorch where its sparsity pays.

A `SparseLayer` (or any Linear) stores its kept weights compactly but computes with a dense weight. On a
CPU, `torch.sparse` multiplies a CSR matrix by a dense one (`torch.mm(W_csr, x^T)`, MKL's sparse BLAS
where torch is built with it) in time proportional to the kept weights, with more overhead per weight
than a dense GEMM: it wins only above a break-even sparsity, measured by `benchmarks/sparse_kernels.py`
(docs/benchmarks.md) on LeNet-300-100 and all-MiniLM-L6-v2 FFN shapes at batch 1 and 32; BREAK_EVEN
below is that measurement. `use_sparse_kernels` swaps every selected Linear at or above `min_sparsity`
for a `SparseKernelLinear` and keeps the rest dense with one warning naming them (a layer below the
break-even would run slower sparse).

This is a run-time choice, like `st.compile`: nothing new is stored (save the pruned model, then call
this after `st.load`), and the ONNX export of a swapped layer traces its dense weight (ONNX Runtime's
only sparse CPU kernel, com.microsoft SparseToDenseMatMul, takes the sparse matrix as a run-time input,
not an initializer; benchmarks/sparse_kernels.py measures it).
"""

from __future__ import annotations

import copy
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import Config
from ..core.layers import visible_modules
from ..core.select import matches, set_submodule
from ..errors import ModelError
from .sparse_layer import SparseLayer

__all__ = ["SparseKernelConfig", "SparseKernelLinear", "BREAK_EVEN", "use_sparse_kernels", "sparsity"]

BREAK_EVEN = {"csr": 0.9, "bsr": 0.98}  # the sparsity from which the sparse product was faster than dense on
# one thread for 32 to 1,024 rows, LeNet-300-100 and MiniLM FFN shapes (benchmarks/sparse_kernels.py --part sweep,
# docs/benchmarks.md: CSR 0.58-0.73 at 90 %, 0.97-1.81 at 80 %). A single row of a small layer never won (the
# dense product takes 15 us), and with 2 threads the dense GEMM scales while the sparse product does not


class SparseKernelConfig(Config):
    """Which pruned Linear layers run a sparse product (run time only; nothing is stored)."""

    layout: Literal["csr", "bsr"] = "csr"  # csr: one index per kept weight, MKL sparse BLAS; bsr: blocks
    # of `block` x `block` (only pays where pruning kept whole blocks; unstructured pruning rarely does)
    block: int = Field(default=4, ge=2, le=64)  # bsr only: the block edge; it must divide both dimensions
    min_sparsity: float | None = Field(default=None, ge=0, le=1)  # None: BREAK_EVEN[layout], measured
    layers: list[str] = ["*"]  # glob patterns over module names


def sparsity(weight: torch.Tensor) -> float:
    """Share of exactly-zero weights."""
    return float((weight == 0).sum()) / max(1, weight.numel())


class SparseKernelLinear(nn.Module):
    """y = x W^T + b with W held as a torch sparse CSR / BSR matrix: (W @ x^T)^T over the flattened
    leading dimensions. The dense `weight` stays a (non-persistent) buffer: the ONNX export traces it,
    and model code that reads `.weight` gets it. Float32 results equal the dense layer's up to the order
    of summation (about 1e-6 relative)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str = "csr", block: int = 4) -> None:
        super().__init__()
        w = weight.detach().float().contiguous()
        self.register_buffer("weight", w, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.layout = layout
        if layout == "bsr" and (w.shape[0] % block or w.shape[1] % block):
            raise ModelError(f"bsr blocks of {block} do not divide the weight {tuple(w.shape)}; use layout: csr "
                             "or a block that divides both dimensions")
        self.block = block
        self.density = 1.0 - sparsity(w)
        self._cache: tuple | None = None  # (weight version, sparse tensor); rebuilt after a copy or a change

    @property
    def w_sparse(self) -> torch.Tensor:
        """The weight as a torch sparse CSR / BSR tensor, built from `weight` once (and again if it changes)."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._cache is None or self._cache[0] != key:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # torch's notice
                w = self.weight.detach()
                sparse = w.to_sparse_bsr((self.block, self.block)) if self.layout == "bsr" else w.to_sparse_csr()
            self._cache = (key, sparse)
        return self._cache[1]

    def __getstate__(self):
        # Sparse CSR / BSR tensors cannot be deep-copied or pickled: copies rebuild theirs from `weight`.
        return {**self.__dict__, "_cache": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting() or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1 and self.layout == "csr":  # one row: CSR's matrix-vector product, half mm's time
            # (measured; BSR's mv was 100-1000x slower than dense, so BSR keeps mm)
            y = torch.mv(self.w_sparse, x2[0]).unsqueeze(0)
        else:
            y = torch.mm(self.w_sparse, x2.t()).t()  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.layout}, density {self.density:.1%}"


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if type(module) is nn.Linear:
        return module.weight, module.bias
    if isinstance(module, SparseLayer) and module.kind == "linear":
        return module.weight, module.bias
    return None


def use_sparse_kernels(model: nn.Module, config: SparseKernelConfig | dict | None = None) -> nn.Module:
    """Return a NEW model (`model` is unchanged) whose selected Linear layers with sparsity >= min_sparsity
    compute with a sparse product; the others stay dense, named in one warning each reason."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"use_sparse_kernels expects a torch.nn.Module, got {type(model).__name__}")
    cfg = SparseKernelConfig.parse(config)
    threshold = BREAK_EVEN[cfg.layout] if cfg.min_sparsity is None else cfg.min_sparsity
    model = copy.deepcopy(model).eval()
    below, convs, swapped = [], [], []
    for name, module in list(visible_modules(model)):
        if not name or not matches(name, cfg.layers):
            continue
        if isinstance(module, SparseLayer) and module.kind != "linear":
            convs.append(name)
            continue
        found = _linear_weight(module)
        if found is None:
            continue
        weight, bias = found
        s = sparsity(weight)
        if s < threshold:
            if isinstance(module, SparseLayer) or s > 0:
                below.append(f"{name} ({s:.0%})")
            continue
        set_submodule(model, name, SparseKernelLinear(weight, bias, cfg.layout, cfg.block))
        swapped.append(name)
    if below:
        warnings.warn(f"sparse_kernels: {len(below)} Linear layer(s) below the break-even sparsity {threshold:.0%} "
                      f"kept dense ({', '.join(below[:4])}{', ...' if len(below) > 4 else ''}): a {cfg.layout} product "
                      f"is slower than the dense one there (benchmarks/sparse_kernels.py); prune further or set "
                      "min_sparsity to force it", stacklevel=2)
    if convs:
        warnings.warn(f"sparse_kernels: {len(convs)} pruned convolution(s) kept dense ({', '.join(convs[:4])}): "
                      "torch.sparse has no sparse convolution on CPU", stacklevel=2)
    model.__dict__["_shrinktunnel_sparse_kernels"] = swapped
    return model
