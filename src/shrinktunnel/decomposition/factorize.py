"""The arithmetic of decomposition on weight tensors, in float64; no modules here.

Shapes: a Linear weight is (out, in); a convolution weight is (T, S, *k) with T output channels, S input
channels and k the kernel (kh, kw) or (k,). Every function returns the factors that `layers.py` places
into thin layers, and `reconstruct(scheme, factors)` gives back the full weight they compute, so that the
reconstruction error is measured on exactly what the layers hold.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

__all__ = [
    "matrix_view", "singular_values", "energy_rank", "svd_factors", "spatial_factors", "channel_factors",
    "tucker2_factors", "cp_factors", "mode_singular_values", "reconstruct", "relative_error", "one_thread",
    "Whitening", "whitening", "whitened_svd", "output_error",
]


@contextmanager
def one_thread():
    """Run on one intra-op thread, then restore. The matrices here are small (a few hundred rows): a second
    thread saves little, and on a busy machine OpenMP's hand-offs made an eigh of 128 x 128 take 1 s instead
    of 4 ms (measured on the 2-core machine with other jobs running)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)
    return wrapper


def matrix_view(scheme: str, w: torch.Tensor) -> torch.Tensor:
    """The matrix whose truncated SVD a scheme takes: (out, in) for svd, (T, S*k) for channel,
    (S*kh, T*kw) for spatial (Jaderberg's scheme 2: rows are the vertical filters, columns the horizontal)."""
    if scheme == "svd":
        return w
    if scheme == "channel":
        return w.reshape(w.shape[0], -1)
    if scheme == "spatial":
        t, s, kh, kw = w.shape
        return w.permute(1, 2, 0, 3).reshape(s * kh, t * kw)  # M[(s, h), (t, w)] = W[t, s, h, w]
    raise ValueError(f"scheme {scheme!r} has no matrix view")


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(m.double(), full_matrices=False)


@_single_threaded
def singular_values(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.double())


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """The smallest r whose first r singular values hold `energy` of sum(sigma^2); the truncation error
    is then ||W - W_r||^2 <= (1 - energy) ||W||^2 (Eckart-Young)."""
    power = sigma.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # 1e-12: cumsum's rounding must not push energy=1.0 past the last singular value.
    return min(int((kept < energy - 1e-12).sum()) + 1, len(sigma))


@_single_threaded
def svd_factors(m: torch.Tensor, r: int, usv=None, white: Whitening | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """m (a, b) ~ left (a, r) @ right (r, b), the singular values split evenly (sqrt on each side),
    which keeps both factors at the same scale for fine-tuning and for float rounding. With `white`,
    `usv` is the SVD of m S (`whitened_svd`) and the right factor is un-whitened by S^-1."""
    u, s, vh = usv if usv is not None else (whitened_svd(m, white) if white is not None else _svd(m))
    root = s[:r].sqrt()
    right = root[:, None] * vh[:r]
    if white is not None:
        right = right @ white.inverse
    return u[:, :r] * root, right


class Whitening:
    """A square root S of a layer's input second moment G = X^T X = S S^T, and S^-1, in float64.

    S = Q diag(sqrt(e)) from the eigendecomposition G = Q diag(e) Q^T (rather than a Cholesky factor,
    which fails on the singular G of a layer whose inputs span fewer directions than its width; the
    damping below makes every e positive either way)."""

    def __init__(self, root: torch.Tensor, inverse: torch.Tensor) -> None:
        self.root, self.inverse = root, inverse


@_single_threaded
def whitening(gram: torch.Tensor, damping: float) -> Whitening:
    """S and S^-1 of gram + damping * mean(diag(gram)) * I. The damping keeps directions the data never
    takes from being free to hold any weight (they would be when the input never reaches them during
    calibration but does later), and it bounds S^-1."""
    g = gram.double()
    g = (g + g.T) / 2
    scale = float(g.diagonal().mean())
    if scale <= 0:
        scale = 1.0
    g = g + damping * scale * torch.eye(g.shape[0], dtype=torch.float64)
    e, q = torch.linalg.eigh(g)
    e = e.clamp_min(damping * scale * 1e-3 if damping > 0 else 1e-300)
    root = e.sqrt()
    return Whitening(q * root, (q / root).T)


@_single_threaded
def whitened_svd(m: torch.Tensor, white: Whitening) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of M S: its truncation to rank r, right factor times S^-1, is the rank-r matrix M~ with the
    least output error ||(M - M~) X^T||_F on the calibration inputs X (SVD-LLM, Wang et al. 2024, theorem
    3.2; ASVD, Yuan et al. 2023, with the full second moment in place of its diagonal)."""
    return _svd(m.double() @ white.root)


@_single_threaded
def output_error(m: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """||(M - M~) X^T||_F / ||M X^T||_F from the second moment G = X^T X: tr(D G D^T) over tr(M G M^T)."""
    g, m, d = gram.double(), m.double(), (m.double() - approx.double())
    num = float(torch.einsum("oi,ij,oj->", d, g, d))
    den = float(torch.einsum("oi,ij,oj->", m, g, m))
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else max(num, 0.0) ** 0.5


@_single_threaded
def spatial_factors(w: torch.Tensor, r: int, usv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical (r, S, kh, 1), horizontal (T, r, 1, kw)) of Jaderberg's scheme 2."""
    t, s, kh, kw = w.shape
    left, right = svd_factors(matrix_view("spatial", w), r, usv)  # (S*kh, r), (r, T*kw)
    vertical = left.T.reshape(r, s, kh, 1)
    horizontal = right.reshape(r, t, kw).permute(1, 0, 2).reshape(t, r, 1, kw)
    return vertical, horizontal


@_single_threaded
def channel_factors(w: torch.Tensor, r: int, usv=None, white: Whitening | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first (r, S, *k) with the layer's geometry, second (T, r, 1...)): an SVD of (T, S*k), whitened by
    the second moment of the input patches when `white` is given."""
    t, s, *k = w.shape
    left, right = svd_factors(matrix_view("channel", w), r, usv, white)  # (T, r), (r, S*k)
    return right.reshape(r, s, *k), left.reshape(t, r, *[1] * len(k))


def _unfold(x: torch.Tensor, mode: int) -> torch.Tensor:
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


@_single_threaded
def mode_singular_values(w: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-`mode` unfolding (0: output channels, 1: input channels)."""
    return singular_values(_unfold(w.double(), mode))


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading left singular vectors of a wide matrix m (a, b), a <= b: the leading eigenvectors of
    m m^T (a, a). An unfolding of a conv weight is very wide (128 x 1152), and this is 10-40x faster than
    its SVD; in float64 the squared condition number costs nothing on the leading vectors."""
    if m.shape[0] > m.shape[1]:
        return _svd(m)[0][:, :r]
    _, vectors = torch.linalg.eigh(m @ m.T)  # ascending eigenvalues
    return vectors.flip(1)[:, :r]


@_single_threaded
def tucker2_factors(w: torch.Tensor, r_out: int, r_in: int, iterations: int = 2):
    """Tucker-2 of a conv weight over its two channel modes: W ~ core x0 U_out x1 U_in, with
    core (r_out, r_in, *k), U_out (T, r_out), U_in (S, r_in) orthonormal.

    Starts from the truncated HOSVD (De Lathauwer et al. 2000: leading left singular vectors of each
    mode's unfolding), then `iterations` HOOI sweeps (each factor re-solved exactly with the other
    fixed), which never increase the error. Returns (u_in, core, u_out)."""
    w = w.double()
    u_out = _leading(_unfold(w, 0), r_out)
    u_in = _leading(_unfold(w, 1), r_in)
    for _ in range(iterations):
        u_out = _leading(_unfold(torch.einsum("ts...,sb->tb...", w, u_in), 0), r_out)
        u_in = _leading(_unfold(torch.einsum("ts...,ta->as...", w, u_out), 1), r_in)
    core = torch.einsum("ts...,ta,sb->ab...", w, u_out, u_in)
    return u_in, core, u_out


def _mttkrp(w: torch.Tensor, factors: list[torch.Tensor], mode: int) -> torch.Tensor:
    """W_(mode) times the Khatri-Rao product of the other factors, (dim, rank), without forming that
    product (for the kernel modes of a 128x64x3x3 weight it would be 128*64*3 x rank): the largest other
    mode is contracted by a matrix product, the two others elementwise."""
    others = [i for i in range(w.dim()) if i != mode]
    first = max(others, key=lambda i: w.shape[i])
    y = torch.tensordot(w, factors[first], dims=([first], [0]))  # the other dims in order, then rank
    remaining = [i for i in range(w.dim()) if i != first]
    for i in others:
        if i == first:
            continue
        pos = remaining.index(i)
        shape = [1] * (len(remaining) + 1)
        shape[pos], shape[-1] = w.shape[i], factors[i].shape[1]
        y = (y * factors[i].reshape(shape)).sum(pos)
        remaining.pop(pos)
    return y


@_single_threaded
def cp_factors(w: torch.Tensor, rank: int, iterations: int = 100, seed: int = 0):
    """CP decomposition of a (T, S, kh, kw) weight by alternating least squares:
    W[t, s, h, x] ~ sum_r A[t, r] B[s, r] C[h, r] D[x, r].

    ALS (Carroll & Chang 1970; Kolda & Bader 2009, fig. 3.3) re-solves one factor at a time in closed
    form: A = W_(0) (D . C . B) (B'B * C'C * D'D)^+. Started from each mode's leading singular vectors
    (random columns from `seed` where a mode has fewer than `rank`), which converges faster and more
    reliably than a random start. The column norms are spread evenly over the four factors.
    Returns (A, B, C, D)."""
    w = w.double()
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode in range(4):
        u = _leading(_unfold(w, mode), rank)
        if u.shape[1] < rank:
            extra = torch.randn(w.shape[mode], rank - u.shape[1], generator=gen, dtype=torch.float64)
            u = torch.cat([u, extra / extra.norm(dim=0, keepdim=True)], dim=1)
        factors.append(u)
    for _ in range(iterations):
        for mode in range(4):
            others = [f for i, f in enumerate(factors) if i != mode]
            gram = torch.ones(rank, rank, dtype=torch.float64)
            for f in others:
                gram = gram * (f.T @ f)
            mttkrp = _mttkrp(w, factors, mode)  # (dim, rank)
            # gelsy: a least-squares solve that copes with a singular Gram matrix (rank above a mode's size)
            factors[mode] = torch.linalg.lstsq(gram, mttkrp.T, driver="gelsy").solution.T
            if mode < 3:  # keep the scale in the last factor solved until the sweep ends
                norms = factors[mode].norm(dim=0).clamp_min(1e-300)
                factors[mode] = factors[mode] / norms
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, rank)
    scale = norms.prod(0).clamp_min(1e-300) ** 0.25
    return tuple(f / norms[i].clamp_min(1e-300) * scale for i, f in enumerate(factors))


def reconstruct(scheme: str, factors) -> torch.Tensor:
    """The full weight that the factors compute (float64)."""
    f = [x.double() for x in factors]
    if scheme == "svd":
        return f[1] @ f[0]  # (out, r) @ (r, in): second Linear after the first
    if scheme == "channel":
        first, second = f
        return torch.einsum("tr,rs...->ts...", second.flatten(1), first)
    if scheme == "spatial":
        vertical, horizontal = f
        return torch.einsum("rsh,trw->tshw", vertical[..., 0], horizontal[:, :, 0])
    if scheme == "tucker2":
        u_in, core, u_out = f
        return torch.einsum("ab...,ta,sb->ts...", core, u_out, u_in)
    if scheme == "cp":
        a, b, c, d = f
        return torch.einsum("tr,sr,hr,xr->tshx", a, b, c, d)
    raise ValueError(f"unknown scheme {scheme!r}")


def relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    """||W - W~|| / ||W|| (Frobenius), 0 for an all-zero W reproduced exactly."""
    w = w.double()
    norm = float(w.norm())
    err = float((w - approx.double()).norm())
    return err / norm if norm > 0 else err
