"""l2 norms of convolutions without their dense matrices.

A convolution at a fixed input size is a linear map whose dense matrix quickly gets too large
for an SVD (a 64-channel 32x32 layer is 65536 x 65536). Three routes, fastest first:

* **1x1 kernels**: every output position applies the same c_out x c_in matrix W to a different
  input position, so the operator is a direct sum of copies of W (plus zero rows or columns
  where padding or striding leaves positions out): its norm is exactly ||W||_2 (per group: the
  largest of the groups' norms).
* **Small layers**: the dense matrix of each group (all groups probed at once), and a batched
  SVD: exact.
* **Everything else: circular embedding.** A zero-padded convolution with stride s reads, for
  output j, padded inputs j*s + [0, k). Embed the padded input in a periodic grid of size N >=
  n + pads with N divisible by s: no output that is kept wraps around, so the layer is
  ``R C E`` with E an isometric embedding, R a coordinate restriction and C the *circular*
  strided convolution on the N-grid. Hence ||layer|| <= ||C||. And ||C|| is computed exactly:
  writing the input in its s^d polyphase components x_b[m] = x[m s + b] turns C into a stride-1
  circular convolution on the (N/s)-grid with c_in s^d input channels (a permutation of the
  input coordinates, so an isometry), which the d-dimensional DFT block-diagonalises into one
  c_out x (c_in s^d) matrix per frequency (Sedghi et al., ICLR 2019): ||C|| is the largest
  singular value over the frequencies. Dilation inserts zeros in the kernel; groups make each
  frequency block block-diagonal, so each group is done on its own; a transposed convolution
  has the norm of its adjoint, a plain convolution on its uncropped output (the crop only
  removes rows).

Rounding: the DFT of a kernel (one product with a table of phases over its taps) has a
relative error of O(taps eps) and a float64 SVD or eigensolve a backward error of
O(c eps ||block||); both are far below the estimators' SAFETY margin. Gram matrices and the
Cholesky proofs carry their own allowances (max_singular, _top_eig_certified).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
import os
import time
from typing import Iterator

import torch

from ..config import gamma, gram_norm_margin

# Dense route when a layer's groups cost at most this many flops (about g * n_min^2 * n_max for
# the SVDs) and hold at most DENSE_ENTRIES numbers: a few seconds at most (the
# Gram matrix of the smaller side).
DENSE_FLOPS = 2e10
DENSE_ENTRIES = 25_000_000

_device: contextvars.ContextVar[str] = contextvars.ContextVar("lipcert_conv_device", default="cpu")


def resolve_device(requested: str) -> tuple[str, list[str]]:
    """'cpu', 'cuda' or 'auto' -> the device to use, and a note when cuda is not there."""
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return "cuda", []
    if requested == "cuda":
        return "cpu", ["no CUDA device is available: ran on the CPU"]
    return "cpu", []


@contextlib.contextmanager
def on_device(requested: str) -> Iterator[list[str]]:
    """Run the convolution norms inside the block on ``requested`` ('cpu', 'cuda', 'auto');
    yields the notes (a fallback to the CPU)."""
    device, notes = resolve_device(requested)
    token = _device.set(device)
    try:
        yield notes
    finally:
        _device.reset(token)


def current_device() -> torch.device:
    return torch.device(_device.get())


@functools.cache
def _blas_controller():
    """threadpoolctl's handle on the OpenBLAS of numpy and scipy (loaded first: scipy.linalg's
    eigensolvers are among the hot spots), which torch.set_num_threads does not reach."""
    import scipy.linalg  # noqa: F401
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch (and its BLAS) on ``n`` threads inside the block, numpy's and scipy's BLAS too, the
    previous counts restored after. scipy's eigh left on every core spin-waited under load:
    Convnet_maxpool's multiplier scan took 124 s in 95 eigenvalue problems, 2.4 s on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        with _blas_controller().limit(limits=max(1, n), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


def single_threaded() -> contextlib.AbstractContextManager[None]:
    """torch (and its BLAS) on one thread inside the block, the previous count restored after.
    The layer norms run side by side on a few Python threads instead (torch releases the GIL):
    on a small shared machine, many BLAS threads per product spin-wait for each other and
    for other jobs (a ResNet-18 naive took 5.8 s alone, 101 s beside two busy processes)."""
    return torch_threads(1)


def _l2_cost(op) -> float:
    """A rough cost of an operator's l2 norm, to start the largest first."""
    conv = getattr(op, "conv", None) if not hasattr(op, "l2") else op
    if conv is None:
        return float(op.in_dim) * op.out_dim
    w = conv.weight.shape
    side = min(w[0], w[1] * math.prod(conv.strides))
    grid = math.prod(adjoint_grid(conv)) / math.prod(conv.strides)
    return float(side) ** 2 * max(w[0], w[1]) * (math.prod(w[2:]) ** 2 + grid)


def prefetch_l2_norms(ops: list, workers: int = min(2, os.cpu_count() or 1), tight: bool = False) -> None:
    """Compute (and cache on each operator) the l2 norm bounds ``op.norm_bound("2")`` of many
    linear operators ahead, on ``workers`` Python threads with single-threaded torch, the
    costliest first; the caller then reads them in its own order (the values are the same as
    one at a time). The device chosen by ``on_device`` carries over to the threads. With
    ``tight`` (Conv operators only): ``op.l2_tight()`` instead."""
    import concurrent.futures

    def cost(op) -> float:
        if not (tight and tight_applies(op) and not dense_is_cheap(op)):
            return _l2_cost(op)
        return _l2_cost(op) + SideGram(op).proof_seconds() * TIGHT_FLOPS_PER_S  # its Cholesky proof's flops

    from .. import progress

    costs = {id(op): cost(op) for op in ops}  # once each: a tight layer's cost builds its SideGram
    todo = sorted(ops, key=lambda op: costs[id(op)], reverse=True)
    if not todo:
        return
    total = sum(costs.values()) or 1.0
    label = "layer norms (exact routes)" if tight else "layer norms"
    with single_threaded(), concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, progress.bar(label, len(todo)) as bar:
        run = (lambda op: op.l2_tight()) if tight else (lambda op: op.norm_bound("2"))
        futures = {pool.submit(contextvars.copy_context().run, run, op): op for op in todo}
        pending, done_cost = set(futures), 0.0
        while pending:  # redrawn every 2 s: one Cholesky proof can take a minute
            finished, pending = concurrent.futures.wait(pending, timeout=2.0, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in finished:
                f.result()
                done_cost += costs[id(futures[f])]
            # the time left by cost (the proofs are most of gram's time), not by count; before
            # the first layer ends, from the costs at a typical rate (measured: a CIFAR ResNet-18)
            if done_cost > 0:
                left = (total - done_cost) * bar.elapsed() / done_cost
            else:
                left = total / (2.5 * TIGHT_FLOPS_PER_S * max(1, workers)) - bar.elapsed()
            bar.update(len(futures) - len(pending), max(left, 1.0))


SVD_SIZE = 64  # blocks with a side at most this, and few blocks, go through a batched SVD (exact)
EIG_BLOCKS = 4  # at most this many large blocks: one Hermitian eigensolve each (exact)
# a real dense matrix with a smaller side above this: Gram matrix + symmetric eigensolve, about 3x
# faster than its SVD (2048 x 2048 on one thread: 1.0 s against 2.9 s)
REAL_SVD_SIDE = 512
CHOL_SIDE = 16  # many blocks with a side above this: Gram matrices, Cholesky proofs (_top_eig_certified)


def _ritz_estimates(gram: torch.Tensor, iters: int = 4) -> torch.Tensor:
    """Rough lower estimates of the largest eigenvalue of each Hermitian positive semi-definite
    matrix of a batch (b, n, n): a few steps of subspace iteration on four vectors, then
    Rayleigh-Ritz. Only used to rank the blocks; every reported value is proven separately."""
    b, n, _ = gram.shape
    gen = torch.Generator(device=gram.device).manual_seed(0)
    x = torch.randn((b, n, min(n, 4)), dtype=gram.dtype, device=gram.device, generator=gen)
    for _ in range(iters):
        x, _ = torch.linalg.qr(gram @ x)
    return torch.linalg.eigvalsh(x.mH @ gram @ x)[:, -1].real.to(torch.float64)


def _top_eig_certified(gram: torch.Tensor) -> float:
    """The largest eigenvalue over a batch of Hermitian matrices (b, n, n), exact up to rounding,
    with an eigensolve of only a few blocks. Rank the blocks by a rough estimate, solve the most
    likely ones exactly (top lam), then prove lam I - G >= 0 for every other block at once by a
    float64 Cholesky factorisation of (lam - delta) I - G: one that succeeds in floating point has
    a backward error below gamma_{n+1} n max diag (twice that in complex arithmetic), which delta
    covers. Blocks whose factorisation fails may lie above lam and get their own eigensolve. A
    Cholesky factorisation costs a sixth of a 512 x 512 tridiagonalisation."""
    b, n, _ = gram.shape
    ritz = _ritz_estimates(gram)
    order = torch.argsort(ritz, descending=True)
    likely = order[: max(1, int((ritz >= 0.97 * ritz.max()).sum().clamp(max=3)))]
    lam = float(torch.linalg.eigvalsh(gram[likely])[:, -1].max())
    rest = order[len(likely):]
    if len(rest) == 0:
        return lam
    if not lam > 0:  # every block is zero or the estimate is meaningless: solve them all
        return max(lam, float(torch.linalg.eigvalsh(gram[rest])[:, -1].max()))
    shifted = gram[rest].neg_()  # a copy: (lam - delta) I - G
    diag = shifted.diagonal(dim1=-2, dim2=-1)
    diag_max = lam + float(diag.real.max())
    delta = (2.0 if gram.is_complex() else 1.0) * gamma(n + 1) * n * max(diag_max, lam)
    diag += lam - delta
    _, info = torch.linalg.cholesky_ex(shifted)
    failed = info != 0
    if bool(failed.any()):
        lam = max(lam, float(torch.linalg.eigvalsh(gram[rest[failed]])[:, -1].max()))
    return lam


def max_singular(mats: torch.Tensor, chunk_entries: int = 1 << 24) -> tuple[float, bool]:
    """(value, exact): the largest singular value over a batch of matrices (b, m, n), real or
    complex. Small blocks, and a few real ones, go through a batched SVD (exact). Otherwise the
    Gram matrix of each block's smaller side: with at most EIG_BLOCKS blocks an exact Hermitian
    eigensolve each, with many blocks an eigensolve of the likely largest and a Cholesky proof for
    the others (_top_eig_certified); in chunks of at most ``chunk_entries`` numbers. Forming the Gram matrix
    in float64 moves its entries by at most (big + 2) eps |W|^H |W|, so the value is enlarged by
    1 + 2 (big + 2) rank eps (as in gram.py). exact means up to rounding."""
    b, m, n = mats.shape
    if b == 0 or mats.numel() == 0:
        return 0.0, True
    side = min(m, n)
    if side <= CHOL_SIDE or (side <= SVD_SIZE and b <= EIG_BLOCKS) or (not mats.is_complex() and b <= EIG_BLOCKS and side <= REAL_SVD_SIDE):
        # small blocks, and real dense matrices up to REAL_SVD_SIDE: exact
        return float(torch.linalg.svdvals(mats)[:, 0].max()), True
    w = mats if m >= n else mats.mH  # (b, big, small): Gram matrices small x small
    big, rank = w.shape[1], w.shape[2]
    step = max(1, chunk_entries // (big * rank))
    top = 0.0
    for start in range(0, b, step):
        part = w[start : start + step]
        gram = part.mH @ part
        if b <= EIG_BLOCKS:
            top = max(top, float(torch.linalg.eigvalsh(gram)[:, -1].max()))
        else:
            top = max(top, _top_eig_certified(gram))
    return math.sqrt(max(top, 0.0)) * gram_norm_margin(big, rank), True


# --- kernels ----------------------------------------------------------------------------------
def grouped_kernel(conv) -> torch.Tensor:
    """The kernel of the plain convolution whose norm is the layer's, split by groups and
    dilated: (g, c_out/g, c_in/g, *k). A transposed convolution gives its adjoint's kernel."""
    w = conv.weight
    g = conv.groups
    # plain (C_out, C_in/g, k...); transposed (C_in, C_out/g, k...), whose adjoint is the plain
    # convolution C_out -> C_in with the same array: either way, split the first axis by groups
    w = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    if any(d > 1 for d in conv.dilations):
        size = [(k - 1) * d + 1 for k, d in zip(w.shape[3:], conv.dilations)]
        dil = w.new_zeros((*w.shape[:3], *size))
        dil[(slice(None),) * 3 + tuple(slice(None, None, d) for d in conv.dilations)] = w
        w = dil
    return w


def adjoint_grid(conv) -> list[int]:
    """Spatial size of the grid the (adjoint) plain convolution reads: the padded input, or the
    uncropped output of a transposed convolution."""
    if conv.transposed:
        return [o + b + e for o, b, e in zip(conv.out_shape[2:], conv.begins, conv.ends)]
    return [n + b + e for n, b, e in zip(conv.in_shape[2:], conv.begins, conv.ends)]


def _unique_frequencies(grid: list[int]) -> torch.Tensor:
    """Frequencies of a periodic grid up to f ~ -f (a real kernel's spectrum at -f is the complex
    conjugate of the one at f: the same singular values): (count, d) integers."""
    freqs = torch.cartesian_prod(*[torch.arange(n) for n in grid]).reshape(-1, len(grid))
    neg = (-freqs) % torch.tensor(grid)
    index = lambda f: sum(f[:, i] * math.prod(grid[i + 1 :]) for i in range(len(grid)))  # noqa: E731
    return freqs[index(freqs) <= index(neg)]


def _spectrum(w: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """The DFT blocks of a real kernel (g, co, ci, *taps) on a periodic ``grid`` at the unique
    frequencies, laid out (g * frequencies, co, ci): one matrix product with the phase table
    (taps x frequencies), cheaper than an FFT followed by a transposing copy for small kernels."""
    g, co, ci = w.shape[:3]
    taps = torch.cartesian_prod(*[torch.arange(k) for k in w.shape[3:]]).reshape(-1, len(grid))
    freqs = _unique_frequencies(grid)
    angle = (taps.to(torch.float64) / torch.tensor(grid, dtype=torch.float64)) @ freqs.to(torch.float64).T
    phase = torch.polar(torch.ones_like(angle), -2.0 * math.pi * angle).to(w.device)  # (taps, freqs)
    taps_first = w.reshape(g, co * ci, -1).transpose(1, 2).to(phase.dtype)  # (g, taps, co ci): small
    return (phase.T @ taps_first).reshape(-1, co, ci)  # (g, freqs, co ci): already in block order


def circular_conv_norm(kernel: torch.Tensor, grid: list[int], strides: tuple[int, ...]) -> tuple[float, bool]:
    """Exact l2 norm of the circular convolution (cross-correlation) with ``kernel`` of shape
    (g, c_out, c_in, *k) per group, stride ``strides``, on a periodic grid ``grid`` (each
    divisible by its stride and at least the kernel size): the largest over groups and
    frequencies of the singular values of the polyphase spectrum: (value, exact), exact up to
    the rounding allowance of max_singular."""
    nd = len(grid)
    if any(n % s for n, s in zip(grid, strides)) or any(n < k for n, k in zip(grid, kernel.shape[3:])):
        raise ValueError(f"grid {grid} must be divisible by the strides {strides} and hold the kernel {tuple(kernel.shape[3:])}")
    w = kernel.to(current_device(), torch.float64)
    g, co, ci = w.shape[:3]
    # polyphase: kernel tap t = s a + b -> input channel (c, b), tap a
    ks = [-(-k // s) * s for k, s in zip(w.shape[3:], strides)]
    w = torch.nn.functional.pad(w, [p for k, kk in zip(reversed(w.shape[3:]), reversed(ks)) for p in (0, kk - k)])
    shape = [g, co, ci]
    for kk, s in zip(ks, strides):
        shape += [kk // s, s]
    w = w.reshape(shape)
    # (g, co, ci, a1, b1, a2, b2, ...) -> (g, co, ci, b1, b2, ..., a1, a2, ...)
    perm = [0, 1, 2] + [4 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)]
    phases = math.prod(strides)
    w = w.permute(perm).reshape(g, co, ci * phases, *[kk // s for kk, s in zip(ks, strides)])
    small = [n // s for n, s in zip(grid, strides)]
    if min(co, ci * phases) > CHOL_SIDE and g * len(_unique_frequencies(small)) > EIG_BLOCKS:
        return gram_route_norm(w, small)
    blocks = _spectrum(w, small)
    return max_singular(blocks)


def _autocorrelation(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a real kernel (g, m, n, *taps) with taps P_t (m x n per group): R_d = sum_t P_t^T
    P_{t+d} over every tap difference d, as (g, D, n, n), and the differences (D, nd). Only
    differences d >= -d (lexicographically) are multiplied out; R_{-d} = R_d^T."""
    g, m, n = w.shape[:3]
    taps = tuple(w.shape[3:])
    nd = len(taps)
    diffs = list(itertools.product(*[range(-(k - 1), k) for k in taps]))
    where = {d: i for i, d in enumerate(diffs)}
    out = w.new_empty((g, len(diffs), n, n))
    perm = [0, 1, *range(3, 3 + nd), 2]  # (g, m, overlap..., n)
    for d in diffs:
        neg = tuple(-x for x in d)
        if d < neg:
            continue
        first = tuple(slice(max(0, -x), k - max(0, x)) for x, k in zip(d, taps))  # t with t and t+d taps
        second = tuple(slice(max(0, x), k + min(0, x)) for x, k in zip(d, taps))  # t + d
        a = w[(slice(None),) * 3 + first].permute(perm).reshape(g, -1, n)
        b = w[(slice(None),) * 3 + second].permute(perm).reshape(g, -1, n)
        r = a.transpose(1, 2) @ b
        out[:, where[d]] = r
        if neg != d:
            out[:, where[neg]] = r.transpose(1, 2)
    return out, torch.tensor(diffs, dtype=torch.float64).reshape(len(diffs), nd)


def gram_route_norm(w: torch.Tensor, grid: list[int], chunk_entries: int = 1 << 23) -> tuple[float, bool]:
    """(value, exact): the largest singular value over the frequency blocks W(f) = sum_t P_t
    w^(t.f) (w = exp(-2 pi i / N)) of a real stride-1 kernel (g, m, n, *taps) on a periodic
    ``grid``, through the Gram matrices of the smaller side built from the kernel's
    autocorrelation, never from the blocks: W(f)^H W(f) = sum_d R_d w^(d.f) with R_d = sum_t
    P_t^T P_{t+d} (the Gram operator of a convolution is the convolution with the
    autocorrelation kernel, 2k-1 taps per axis). For the other side, Q_t = P_t^T gives
    W(f) W(f)^H = conj(sum_d R'_d w^(d.f)), with the same eigenvalues. The largest eigenvalue
    over the frequencies is proven by _top_eig_certified (chunks of at most ``chunk_entries``).

    Rounding: each computed entry is a sum of m T D-phase-weighted products (T taps, D
    differences) whose absolute values sum to at most the entries of H = (sum_t |P_t|)^T
    (sum_t |P_t|), and ||H|| <= (sum_t ||P_t||_F)^2 <= T sum_t ||P_t||_F^2 = T mean_f
    ||W(f)||_F^2 <= T rank sigma^2 (Parseval on the grid, which holds the taps). So the Gram
    matrices are formed with an error of norm at most gamma(m T + D + 4) T rank sigma^2 (the
    +4 covers the rounding of the phases), and sigma^2 <= lam / (1 - gamma T rank); the value
    is enlarged by 1 + gamma(m T + D + 4) T rank, more than that."""
    if w.shape[1] < w.shape[2]:  # Gram of the smaller side: the output side, through Q_t = P_t^T
        w = w.transpose(1, 2)
    g, m, n = w.shape[:3]
    taps = math.prod(w.shape[3:])
    r, diffs = _autocorrelation(w)
    freqs = _unique_frequencies(grid).to(torch.float64)
    angle = 2.0 * math.pi * (diffs / torch.tensor(grid, dtype=torch.float64)) @ freqs.T  # (D, F)
    cos, sin = torch.cos(angle).to(w.device), torch.sin(angle).to(w.device)
    flat = r.reshape(g, len(diffs), n * n)
    step = max(1, chunk_entries // (n * n))
    count = len(freqs)
    top = 0.0
    for k in range(g):
        for start in range(0, count, step):
            c, s = cos[:, start : start + step], sin[:, start : start + step]
            gram = torch.complex(c.T @ flat[k], -(s.T @ flat[k])).reshape(-1, n, n)
            if gram.shape[0] <= EIG_BLOCKS:
                top = max(top, float(torch.linalg.eigvalsh(gram)[:, -1].max()))
            else:
                top = max(top, _top_eig_certified(gram))
    margin = 1.0 + gamma(m * taps + len(diffs) + 4) * taps * n
    return math.sqrt(max(top, 0.0)) * margin, True


def circular_embedding_bound(conv) -> tuple[float, bool]:
    """Proven l2 bound of a zero-padded (strided, dilated, grouped, transposed) convolution: the
    exact norm of the circular convolution on the smallest periodic grid that holds its padded
    input and is divisible by the strides (see the module docstring)."""
    kernel = grouped_kernel(conv)
    grid = [max(-(-n // s) * s, -(-k // s) * s) for n, s, k in zip(adjoint_grid(conv), conv.strides, kernel.shape[3:])]
    return circular_conv_norm(kernel, grid, conv.strides)


# --- exact routes -------------------------------------------------------------------------------
def _one_by_one_norm(conv) -> tuple[float, bool] | None:
    """Exact norm of a 1x1 convolution, or None when the kernel is larger or the layer could
    leave every input position out."""
    kernel = grouped_kernel(conv)
    if any(k != 1 for k in kernel.shape[3:]):
        return None
    if conv.transposed:
        if any(conv.begins) or any(conv.ends):
            return None
    else:  # some output must read a real input position along every axis
        for n, s, b, o in zip(conv.in_shape[2:], conv.strides, conv.begins, conv.out_shape[2:]):
            if not any(0 <= j * s - b < n for j in range(o)):
                return None
    return max_singular(kernel.reshape(*kernel.shape[:3]).to(current_device()))


def _dense_cost(conv) -> tuple[float, int]:
    g = conv.groups
    n_in, n_out = conv.in_dim // g, conv.out_dim // g
    lo, hi = min(n_in, n_out), max(n_in, n_out)
    return g * lo * lo * hi, g * n_in * n_out


def dense_is_cheap(conv) -> bool:
    flops, entries = _dense_cost(conv)
    return flops <= DENSE_FLOPS and entries <= DENSE_ENTRIES


def _reads(conv) -> list[tuple[int, int, int]]:
    """(output position, tap, input position) for every tap of a plain convolution that reads a
    real (not padded) input position; positions and taps as flat row-major indices."""
    out_sp, in_sp, taps = conv.out_shape[2:], conv.in_shape[2:], conv.weight.shape[2:]
    reads = []
    for o_idx, o in enumerate(itertools.product(*[range(n) for n in out_sp])):
        for t_idx, t in enumerate(itertools.product(*[range(k) for k in taps])):
            pos = [oi * s + ti * d - b for oi, ti, s, d, b in zip(o, t, conv.strides, conv.dilations, conv.begins)]
            if all(0 <= q < n for q, n in zip(pos, in_sp)):
                reads.append((o_idx, t_idx, sum(q * math.prod(in_sp[a + 1 :]) for a, q in enumerate(pos))))
    return reads


def grouped_dense_norm(conv) -> tuple[float, bool]:
    """Exact l2 norm from the dense matrix of every group, all groups probed at once: a unit
    vector in one input channel of every group at the same position gives one column of each
    group's matrix (groups do not interact)."""
    g = conv.groups
    out_sp, in_sp = conv.out_shape[2:], conv.in_shape[2:]
    taps = conv.weight.shape[2:]
    if not conv.transposed and math.prod(out_sp) * math.prod(taps) <= 4096:
        # the matrix from the kernel, entry by entry (a float64 convolution of one probe per
        # column costs c_in n times the layer: 9 s for 512 channels at 2 x 2): per output
        # position and tap, the input position it reads, if inside the input
        w = conv.weight.to(current_device())
        co, ci = w.shape[0] // g, w.shape[1]
        kernel = w.reshape(g, co, ci, math.prod(taps))
        mats = torch.zeros((g, co, math.prod(out_sp), ci, math.prod(in_sp)), dtype=torch.float64, device=w.device)
        for o, t, i in _reads(conv):
            mats[:, :, o, :, i] += kernel[..., t]
        return max_singular(mats.reshape(g, co * math.prod(out_sp), ci * math.prod(in_sp)))
    c_in = conv.in_shape[1]
    ci = c_in // g
    spatial = conv.in_shape[2:]
    m = math.prod(spatial)
    device = current_device()
    probes = torch.zeros((ci * m, *conv.in_shape), dtype=torch.float64, device=device)
    idx = torch.arange(ci * m, device=device)
    local, pos = idx // m, idx % m
    view = probes.reshape(ci * m, conv.in_shape[0], g, ci, m)
    view[idx, 0, :, local, pos] = 1.0
    weight = conv.weight.to(device)
    with torch.no_grad():
        out = conv._conv(probes, weight)  # (ci*m, 1, C_out, *out_spatial)
    co = conv.out_shape[1] // g
    cols = out.reshape(ci * m, g, co * math.prod(conv.out_shape[2:]))  # per group: column index, rows
    mats = cols.permute(1, 2, 0)  # (g, rows, cols)
    return max_singular(mats)


# --- the tight route (method gram): small grids, many channels ------------------------------
# On a small grid the circular embedding is loose (a 512-channel 3x3 layer on 4x4 inputs: 8-11%
# above the exact norm, 2-4% on 8x8, about 1% on 16x16), and a dense SVD too costly. The Gram
# matrix of the layer's smaller side is formed block by block from the kernel's tap products
# W_a^T W_b; its largest eigenvalue is estimated by Lanczos (through the convolution itself) and
# proven by a float64 block Cholesky factorisation over bands of grid rows (the Gram matrix is
# block banded there): at most TIGHT_SIDE rows per group (16384: about 12 s on one core;
# 25088, a 512-channel layer on 7x7 inputs as in ImageNet ResNets, about 50 s).
TIGHT_SIDE = 25600
MIN_BAND = 512  # numbers per band of the proof at least: fewer make many small, slow steps
# below this relative gain over the circular bound (which is then within it of the exact norm),
# no Cholesky proof is tried: on a CIFAR ResNet-18, 20 s of proof for a 0.3% gain on one layer
TIGHT_GAIN = 5e-3
LANCZOS_STEPS = 200
TIGHT_PRODUCTS = 1 << 26  # numbers in the table of tap products (0.5 GB; 3x3 x 512 channels: 21M)
TIGHT_FLOPS_PER_S = 2e10  # one core, float64, on the low side: a proof starts only if it fits before the deadline
CUT_NOTE = "the exact route was cut by the deadline"
_tight_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("lipcert_tight_deadline", default=None)


def tight_deadline() -> float | None:
    """The deadline set by the innermost ``tight_until`` (None: no limit)."""
    return _tight_deadline.get()


@contextlib.contextmanager
def tight_until(deadline: float | None) -> Iterator[None]:
    """Inside the block, the tight route starts no Cholesky proof that would end past
    ``deadline`` (a time.perf_counter() value; None: no limit): such layers keep their
    circular bound (proven), with CUT_NOTE in their description."""
    token = _tight_deadline.set(deadline)
    try:
        yield
    finally:
        _tight_deadline.reset(token)


class SideGram:
    """The Gram matrices (one per group) of a plain convolution's smaller side: A^T A for the
    input side, A A^T for the output side; coordinates position-major (row-major positions,
    channels inside). Block (p, q) of two input positions sums W_a^T W_b over the outputs that
    read p through tap a and q through tap b (for the output side, W_a W_b^T over the inputs that
    outputs p and q both read); every tap product comes from one matrix product.

    Positions couple only within a few rows of the first spatial axis, so with the positions cut
    into bands of whole rows (one row, or more where a row holds fewer than MIN_BAND numbers) the
    matrix is block banded: band r couples bands r - width .. r + width only, and
    ``block(r, s)`` assembles one band pair (g, n_r, n_s). One-row bands make the proof about 1.5x
    faster than bands of ``width`` rows (block tridiagonal) or one dense factorisation (a CIFAR
    ResNet-18's 256-channel 8x8 layers: 12 s instead of 19 s on one core; 512-channel 4x4: 5 s
    instead of 7 s).

    Rounding: each entry is a sum of at most K = inner + (products added to one block) terms whose
    absolute values sum to (|A|^T |A|)_pq, so the error is at most gamma(K) |A|^T |A| entrywise, of
    Frobenius norm at most gamma(K) ||A||_F^2 = gamma(K) tr G: ``err_fro``."""

    def __init__(self, conv) -> None:
        g = conv.groups
        w = conv.weight.to(current_device())
        co, ci, taps = w.shape[0] // g, w.shape[1], math.prod(w.shape[2:])
        w = w.reshape(g, co, ci, taps)
        m_in, m_out = math.prod(conv.in_shape[2:]), math.prod(conv.out_shape[2:])
        self.input_side = ci * m_in <= co * m_out
        if self.input_side:  # columns (tap, channel): block (a, b) of flat^T flat is W_a^T W_b
            self._flat, self.c, self._inner = w.permute(0, 1, 3, 2).reshape(g, co, taps * ci), ci, co
        else:  # rows (tap, channel): block (a, b) of flat flat^T is W_a W_b^T
            self._flat, self.c, self._inner = w.permute(0, 3, 1, 2).reshape(g, taps * co, ci), co, ci
        shape = conv.in_shape if self.input_side else conv.out_shape
        self.groups, self.dim = g, self.c * math.prod(shape[2:])
        shared: dict[int, list[tuple[int, int]]] = {}  # what one position of the other side couples
        for o, t, i in _reads(conv):
            if self.input_side:
                shared.setdefault(o, []).append((t, i))
            else:
                shared.setdefault(i, []).append((t, o))
        self.terms = [(p, q, a, b) for pairs in shared.values() for a, p in pairs for b, q in pairs]
        per_row = math.prod(shape[3:])  # positions in one row of the first spatial axis
        coupled = max((abs(p // per_row - q // per_row) for p, q, _, _ in self.terms), default=0)
        rows_per_band = max(1, math.ceil(MIN_BAND / (per_row * self.c)))
        self.width = math.ceil(coupled / rows_per_band)  # bands coupled on either side of a band
        band_positions = rows_per_band * per_row
        self.bands = [range(r, min(shape[2], r + rows_per_band)) for r in range(0, shape[2], rows_per_band)]
        self.starts = [r.start * per_row for r in self.bands]  # first position of each band
        self.sizes = [len(r) * per_row * self.c for r in self.bands]
        self._pairs: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}  # the terms of each band pair
        for p, q, a, b in self.terms:
            self._pairs.setdefault((p // band_positions, q // band_positions), []).append((p, q, a, b))

    def proof_seconds(self) -> float:
        """A rough time of the Cholesky proof on one core (TIGHT_FLOPS_PER_S), before any of it
        is computed: per band, its factorisation, its updates by the bands before it, and the
        blocks below it (a triangular solve each, after their updates)."""
        w, n = self.width, len(self.sizes)
        flops = 0.0
        for r, b in enumerate(self.sizes):
            flops += b**3 / 3 + min(r, w) * b**3
            for i in range(r + 1, min(n, r + w + 1)):
                flops += b**3 + 2 * b**3 * max(0, r - max(0, i - w))
        return self.groups * flops / TIGHT_FLOPS_PER_S

    @functools.cached_property
    def prods(self) -> torch.Tensor:
        """Every tap product, (g, taps c, taps c): block (a, b) is W_a^T W_b (W_a W_b^T)."""
        return self._flat.mT @ self._flat if self.input_side else self._flat @ self._flat.mT

    @functools.cached_property
    def err_fro(self) -> float:
        c = self.c
        added: dict[tuple[int, int], int] = {}
        trace = torch.zeros(self.groups, dtype=torch.float64, device=self._flat.device)
        for p, q, a, b in self.terms:
            added[p, q] = added.get((p, q), 0) + 1
            if p == q:
                trace += self.prods[:, a * c : (a + 1) * c, b * c : (b + 1) * c].diagonal(dim1=-2, dim2=-1).sum(-1)
        k = self._inner + max(added.values(), default=0)
        return gamma(k + 2) * float(trace.max()) * (1.0 + 1e-6)

    def block(self, r: int, s: int) -> torch.Tensor:
        """Bands r and s of every group's Gram matrix: (g, sizes[r], sizes[s])."""
        c = self.c
        out = self.prods.new_zeros((self.groups, self.sizes[r], self.sizes[s]))
        for p, q, a, b in self._pairs.get((r, s), []):
            i, j = (p - self.starts[r]) * c, (q - self.starts[s]) * c
            out[:, i : i + c, j : j + c] += self.prods[:, a * c : (a + 1) * c, b * c : (b + 1) * c]
        return out

    def dense(self) -> torch.Tensor:
        """The whole Gram matrices (g, dim, dim)."""
        n = len(self.bands)
        return torch.cat([torch.cat([self.block(r, s) for s in range(n)], dim=2) for r in range(n)], dim=1)


def _lanczos_top(matvec, n: int, steps: int = LANCZOS_STEPS, rtol: float = 1e-8) -> tuple[float, float]:
    """(theta, residual): the largest Ritz value of a symmetric positive semi-definite operator
    of size n after at most ``steps`` Lanczos steps (full reorthogonalisation, a fixed random
    start), and the norm of its Ritz vector's residual. An estimate: theta <= the largest
    eigenvalue up to rounding; the value is proven separately."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, dtype=torch.float64, generator=gen).to(current_device())
    q /= q.norm()
    basis = torch.empty((min(steps, n), n), dtype=torch.float64, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    theta, resid = 0.0, math.inf
    for j in range(basis.shape[0]):
        basis[j] = q
        w = matvec(q)
        alphas.append(float(q @ w))
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        betas.append(float(w.norm()))
        if (j + 1) % 10 == 0 or j + 1 == basis.shape[0] or betas[-1] <= rtol * abs(alphas[0]):
            tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            off = torch.tensor(betas[:-1], dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
            vals, vecs = torch.linalg.eigh(tri)
            theta, resid = float(vals[-1]), abs(betas[-1] * float(vecs[-1, -1]))
            if resid <= rtol * theta or betas[-1] <= rtol * abs(alphas[0]):
                break
        q = w / betas[-1]
    return theta, resid


def proven_top(block, sizes: list[int], lam: float, err_fro: float, width: int) -> bool:
    """True only if lam I - G >= 0 for every symmetric G within Frobenius distance ``err_fro`` of
    the float64 matrices G (a batch, block banded over bands of ``sizes``: band r couples bands
    r - width .. r + width only; ``block(r, s)`` gives (batch, sizes[r], sizes[s])). A block
    Cholesky factorisation of (lam - delta) I - G that runs to completion has a backward error
    below gamma_{3(n+1)} n max diag (Demmel 1989; a factor 3 for the blocked triangular solves
    and products), which delta covers together with err_fro. Keeps the factor's last ``width``
    block columns in memory, never the whole matrix."""
    n = sum(sizes)
    delta = err_fro + gamma(3 * (n + 1)) * n * lam
    if not lam > delta:
        return False
    factor: dict[tuple[int, int], torch.Tensor] = {}  # L_ik for the block columns k still needed
    for r in range(len(sizes)):
        d = block(r, r).neg_()
        d.diagonal(dim1=-2, dim2=-1).add_(lam - delta)
        for k in range(max(0, r - width), r):
            d -= factor[r, k] @ factor[r, k].mT
        info = torch.empty(d.shape[:-2], dtype=torch.int32, device=d.device)
        _, info = torch.linalg.cholesky_ex(d, out=(d, info))
        if bool((info != 0).any()):
            return False
        for i in range(r + 1, min(len(sizes), r + width + 1)):  # L_ir L_rr^T = -G_ir - sum_k L_ik L_rk^T
            rhs = block(i, r).neg_()
            for k in range(max(0, i - width), r):
                rhs -= factor[i, k] @ factor[r, k].mT
            factor[i, r] = torch.linalg.solve_triangular(d.mT, rhs, upper=True, left=False)
        for key in [key for key in factor if key[1] <= r - width]:  # no later band reads these
            del factor[key]
    return True


def tight_applies(conv) -> bool:
    """Whether the tight route may run on ``conv``: a plain convolution of one input, at most
    TIGHT_SIDE rows per group on its smaller side, and a table of tap products W_a^T W_b ((taps
    c)^2 numbers per group) of at most TIGHT_PRODUCTS numbers."""
    if conv.transposed or conv.in_shape[0] != 1:
        return False
    g = conv.groups
    if min(conv.in_dim, conv.out_dim) // g > TIGHT_SIDE:
        return False
    c = conv.in_shape[1] // g if conv.in_dim <= conv.out_dim else conv.out_shape[1] // g
    return g * (math.prod(conv.weight.shape[2:]) * c) ** 2 <= TIGHT_PRODUCTS


def tight_conv_norm(conv, bound: float) -> tuple[float, bool, str] | None:
    """(value, exact, how) below ``bound`` (a proven one) for a plain convolution whose smaller
    side has at most TIGHT_SIDE numbers per group, or None (no gain, or no proof). The largest
    eigenvalue of the Gram matrix of the smaller side by Lanczos (over all groups at once: the
    operator A^T A or A A^T), then a Cholesky proof of every group's Gram matrix at that value plus
    a hair (the residual and 1e-6 relative: reported as exact), or, if that fails, 0.1% above it.
    Under ``tight_until`` a proof that would end past the deadline is not started: ``bound``
    comes back, with CUT_NOTE in the description."""
    if not tight_applies(conv):
        return None
    side = SideGram(conv)
    flat_in, flat_out = (1, *conv.in_shape), (1, *conv.out_shape)
    if side.input_side:
        matvec = lambda v: conv.adjoint(conv.apply(v.reshape(flat_in))).reshape(-1)  # noqa: E731
        n = conv.in_dim
    else:
        matvec = lambda v: conv.apply(conv.adjoint(v.reshape(flat_out))).reshape(-1)  # noqa: E731
        n = conv.out_dim
    deadline = _tight_deadline.get()
    if deadline is not None and time.perf_counter() + side.proof_seconds() > deadline:
        return bound, False, f"circular embedding (fft, polyphase); {CUT_NOTE}"
    theta, resid = _lanczos_top(matvec, n)
    for lam, exact in ((theta * (1.0 + 1e-6) + resid, True), (theta * (1.0 + 1e-3) + resid, False)):
        if math.sqrt(max(lam, 0.0)) * (1.0 + (TIGHT_GAIN if exact else 0.0)) >= bound:
            return None
        if proven_top(side.block, side.sizes, lam, side.err_fro, side.width):
            how = f"Gram matrix of the {side.dim}-dim side: Lanczos + Cholesky proof"
            return math.sqrt(lam), exact, how + ("" if exact else " (within 0.1%)")
    return None


def conv_l2(conv) -> tuple[float, bool, str]:
    """(value, exact, how) for the l2 norm of a Conv: exact for 1x1 kernels and small layers,
    otherwise the circular-embedding bound (method gram then tries tight_conv_norm)."""
    one = _one_by_one_norm(conv)
    if one is not None:
        value, exact = one
        return value, exact, "1x1 kernel: ||W||"
    if conv.in_shape[0] == 1 and dense_is_cheap(conv):
        value, exact = grouped_dense_norm(conv)
        return value, exact, "dense svd" if conv.groups == 1 else "dense svd per group"
    value, _ = circular_embedding_bound(conv)
    return value, False, "circular embedding (fft, polyphase)"
