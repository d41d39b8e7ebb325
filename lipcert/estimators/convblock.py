"""A residual block of convolutions, y = c_s S u + c_b W2 phi(W1 u), bounded as one block in
the Fourier domain (a step of the compositional method, compose.py, for blocks far too large for
a dense form: a CIFAR ResNet-18 block has 65536 inputs).

Why the Fourier domain. With a scalar input state (X = x I) and one multiplier per hidden
channel (T = diag(t), the same at every position), every matrix in the block's inequality

    N - B^H Y B >= 0,   N = [[x I, -m W1^H T], [-m T W1, T]],   B = [c_s S, c_b W2]

(compose.py's block inequality with per-neuron multipliers t_c at channel c) is a convolution
when the layers are circular convolutions on one periodic grid, so the spatial DFT
block-diagonalises it: it holds iff it holds at every frequency f, for the small matrices
(c_in s^d + c_mid rows) of the layers' polyphase spectra (convnorm.py). Zero padding: embed the
input window in a periodic grid of N points per axis, large enough that no output a layer keeps
wraps around (N >= n + pads for W1, N / s >= n_mid + pads for W2). The real block is then
R(c_s C_S u + c_b C_2 phi'(C_1 u)) on the window, where R restricts to the output window (it
only removes coordinates, so it does not increase a difference) and phi' is phi inside the
window and the constant 0 outside: each of its neurons is still slope-restricted in [0, beta]
as long as alpha <= 0 <= beta (the constant has slope 0). So the circular inequality, with the
same multiplier at every position of a channel, bounds the real block. Here alpha beta = 0 is required
(ReLU and other activations with slopes in [0, beta]).

Choice and proof. t = lambda w with fixed relative weights w (``channel_weights``); lambda is
scanned over a few fractions of the largest value that keeps N positive definite; for each, the
best y is 1 / max_f lambda_max(P_f), P = B N^-1 B^H (through the Schur complement of N, in
float64). The chosen y (times 1 - margin) is then *proven* at every
frequency: the Hermitian matrix N_f - y B_f^H B_f (through an equivalent one of c_mid + c_out
rows, ``_proof_chunk``), assembled in float64 from spectra computed from the kernel taps with
exact integer phase indices, is shown positive semidefinite by a
batched complex Cholesky factorisation with an allowance for the spectra's rounding, the
assembly and the factorisation (``compose.proven_psd_batch``). With x = 1 the block's output state is
y: ||dy||^2 <= ||du||^2 / y, so an input state x gives x y.
"""

from __future__ import annotations

import itertools
import math
import weakref

import torch

from ..config import EPS, gamma
from ..graph import Conv
from ..graph.linear import CircularConv, Composed
from ..graph.convnorm import _unique_frequencies as unique_frequencies
from .compose import proven_psd_batch

# Fractions of the largest multiplier that keeps N positive definite (measured on the blocks of a
# random CIFAR ResNet-18: the best fraction was 0.7-0.8 in every block)
LAMBDA_FRACTIONS = (0.7, 0.8)
# Largest work (about sum over frequencies of rows^3) a block may take: a few seconds on one core
MAX_WORK = 4e11
MARGINS = (1e-6, 1e-4, 1e-2)
CHUNK_ENTRIES = 1 << 23  # complex entries per proof chunk (128 MB)


def _usable(conv: object) -> bool:
    return isinstance(conv, Conv) and not conv.transposed and all(d == 1 for d in conv.dilations)


def _pointwise(conv: Conv) -> bool:
    """An unpadded convolution with a 1x1 kernel: the same on a periodic grid and on a window."""
    return all(k == 1 for k in conv.weight.shape[2:]) and not any(conv.begins) and not any(conv.ends)


def block_view(op: object) -> tuple[Conv, tuple[int, ...] | None] | None:
    """A layer as this step sees it: (a zero-padded Conv, None), or for a circular convolution
    (torch's padding_mode="circular") the Conv whose taps start at -shift, with the grid it is
    periodic on (its own input grid: exact, no embedding); None when the step cannot take it. A
    chain with channel scales (an unfolded batch-norm) is taken as its folded convolution."""
    if isinstance(op, Composed):
        op = op.conv or op.circular
    if isinstance(op, CircularConv):
        c = op.conv
        if op.shift is None or not _usable(c):
            return None
        ends = [k - st - p for k, st, p in zip(c.weight.shape[2:], c.strides, op.shift)]
        if min(ends) < 0:
            return None
        conv = Conv(op.in_shape, c.weight.numpy(), c.strides, (*op.shift, *ends), c.dilations, c.groups)
        return (conv, tuple(op.in_shape[2:])) if conv.out_shape == op.out_shape else None
    return (op, None) if _usable(op) else None


def full_weight(conv: Conv) -> torch.Tensor:
    """The weight (c_out, c_in, *kernel) in float64, a grouped convolution's with zeros between
    its groups (a depthwise convolution's is diagonal in the channels)."""
    K = conv.weight.to(torch.float64)
    if conv.groups == 1:
        return K
    co, cig = K.shape[:2]
    cog = co // conv.groups
    full = torch.zeros((co, cig * conv.groups, *K.shape[2:]), dtype=torch.float64)
    for g in range(conv.groups):
        full[g * cog:(g + 1) * cog, g * cig:(g + 1) * cig] = K[g * cog:(g + 1) * cog]
    return full


def block_grid(w1: Conv, w2: Conv, s: Conv | None, periodic: tuple[int, ...] | None = None) -> list[int] | None:
    """The periodic grid (points per axis) on which every layer of the block is an exact
    restriction of a circular convolution, or None when the layers do not chain on one grid.
    ``periodic``: the layers are circular convolutions on this input grid (the grid itself)."""
    if any(st != 1 for st in w2.strides) or (s is not None and tuple(s.strides) != tuple(w1.strides)):
        return None
    if tuple(w2.in_shape[2:]) != tuple(w1.out_shape[2:]) or (s is not None and tuple(s.out_shape[2:]) != tuple(w2.out_shape[2:])):
        return None
    if periodic is not None:
        return list(periodic) if all(n % st == 0 for n, st in zip(periodic, w1.strides)) else None
    grid = []
    for i, st in enumerate(w1.strides):
        need = max(w1.in_shape[2 + i] + w1.begins[i] + w1.ends[i], st * (w2.in_shape[2 + i] + w2.begins[i] + w2.ends[i]))
        if s is not None:
            need = max(need, s.in_shape[2 + i] + s.begins[i] + s.ends[i])
        grid.append(-(-need // st) * st)
    return grid


def spectrum(conv: Conv, strides: tuple[int, ...], small: list[int], freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The polyphase spectra of ``conv`` at ``freqs`` of the grid ``small`` (= grid / strides):
    (F, c_out, c_in * prod(strides)) complex, input channel (c, phase) in C order, output j reading
    the input at j s + t - begin; and a bound on the Frobenius norm of each block's rounding error.
    The phase of tap offset a at frequency f is exp(2 pi i (a . f mod n) / n), its index reduced
    exactly in integers, so each phase is within a few tens of eps of the exact one."""
    K = full_weight(conv)
    co, ci = K.shape[:2]
    nd = len(strides)
    phases = list(itertools.product(*[range(s) for s in strides]))
    out = torch.zeros((len(freqs), co, ci, len(phases)), dtype=torch.complex128)
    abs_sum = torch.zeros((co, ci), dtype=torch.float64)
    taps = list(itertools.product(*[range(k) for k in K.shape[2:]]))
    for t in taps:
        d = [ti - b for ti, b in zip(t, conv.begins)]
        r = tuple(di % s for di, s in zip(d, strides))
        a = [di // s for di, s in zip(d, strides)]
        # angle 2 pi sum_i a_i f_i / n_i, each term's index reduced mod n_i exactly
        angle = torch.zeros(len(freqs), dtype=torch.float64)
        for i in range(nd):
            angle += ((a[i] * freqs[:, i]) % small[i]).to(torch.float64) / small[i]
        phase = torch.polar(torch.ones_like(angle), 2.0 * math.pi * angle)
        tap = K[(slice(None), slice(None)) + tuple(t)]
        out[:, :, :, phases.index(r)] += phase[:, None, None] * tap[None]
        abs_sum += tap.abs()
    # each entry: a sum of at most `taps` complex products. A phase's angle 2 pi sum_i (k_i / n_i),
    # with |angle| < 2 pi nd, is off by at most 2 pi nd (nd + 2) eps (divisions, sum, product with
    # 2 pi), cos and sin by 2 eps more each: |d phase| <= (2 pi nd (nd + 2) + 4) eps; the products
    # and the sum add gamma(2 taps + 4) relative to sum_t |K_t|. Doubled.
    phase_err = (2.0 * math.pi * nd * (nd + 2) + 4.0) * EPS
    err = 2.0 * (gamma(2 * len(taps) + 4) + phase_err) * float(torch.linalg.norm(abs_sum))
    return out.reshape(len(freqs), co, ci * len(phases)), torch.full((len(freqs),), err, dtype=torch.float64)


def block_factor(w1: Conv, w2: Conv, shortcut: Conv | None, m: float, c_s: float, c_b: float,
                 info: dict | None = None, max_work: float = MAX_WORK) -> float | None:
    """A proven y > 0 with ||dy||^2 <= ||du||^2 / y for the block y = c_s S u + c_b W2 phi(W1 u)
    (S: ``shortcut``, or the identity when None), phi with slopes in [0, 2m]; None when the
    block does not fit this step (see the module docstring). ``info`` receives the multiplier
    and the periodic grid. ``max_work``: blocks whose factorisations cost more are not tried."""
    views = [block_view(op) for op in (w1, w2)] + ([] if shortcut is None else [block_view(shortcut)])
    if any(v is None for v in views) or not m > 0:
        return None
    # circular layers: the block is periodic on its input grid; an unpadded 1x1 convolution (a
    # shortcut) is circular as it is, but zero and circular padding do not mix
    periodic = any(v[1] is not None for v in views)
    if periodic and not all(v[1] is not None or _pointwise(v[0]) for v in views):
        return None
    # the same block again (sdp-wide walks the network as compose does): the proven value computed before
    key = (w2, shortcut, m, c_s, c_b, max_work)
    known = _DONE.setdefault(w1, {}).get(key)
    if known is None:
        v1, v2, *vs = views
        grid = tuple(v1[0].in_shape[2:]) if periodic else None
        known = _DONE[w1][key] = _block_factor(v1[0], v2[0], vs[0][0] if vs else None, m, c_s, c_b, max_work, grid)
    if info is not None and known[1]:
        info.update(known[1])
    return known[0]


_DONE: "weakref.WeakKeyDictionary[Conv | CircularConv, dict]" = weakref.WeakKeyDictionary()


def _block_factor(w1: Conv, w2: Conv, shortcut: Conv | None, m: float, c_s: float, c_b: float,
                  max_work: float, periodic: tuple[int, ...] | None = None) -> tuple[float | None, dict]:
    """block_factor's work: (y or None, the multipliers and the grid)."""
    grid = block_grid(w1, w2, shortcut, periodic)
    if grid is None:
        return None, {}
    strides = tuple(w1.strides)
    small = [g // s for g, s in zip(grid, strides)]
    # one frequency of each pair f, -f: the inequality at -f is the complex conjugate of the one at f
    freqs = unique_frequencies(small)
    c_in = w1.weight.shape[1] * w1.groups
    ci = c_in * math.prod(strides)
    cm, co = w1.weight.shape[0], w2.weight.shape[0]
    if shortcut is None and c_s != 0.0 and (co != c_in or math.prod(strides) != 1):
        return None, {}
    # the products with the input side (c_in x c_mid Gram blocks; with a shortcut, the Schur form's
    # (c_in + c_mid) rows), then per multiplier a c_mid Cholesky and the (c_mid + c_out)-row proof
    first = cm * cm * ci if c_s == 0.0 else (ci + cm) ** 3
    if len(freqs) * (first + len(LAMBDA_FRACTIONS) * (cm**3 + co**3 + co * cm * (co + cm))) > max_work:
        return None, {}
    A1, e1 = spectrum(w1, strides, small, freqs)
    A2, e2 = spectrum(w2, (1,) * len(strides), small, freqs)
    nf = len(freqs)
    if c_s == 0.0:  # a plain pair W2 phi(W1 u): the shortcut's products are zero, not computed
        BsBs, BsA1 = (torch.zeros((nf, co, c), dtype=torch.complex128) for c in (co, cm))
        bs_fro = es = torch.zeros(nf, dtype=torch.float64)
    else:
        if shortcut is None:
            As, es = torch.eye(ci, dtype=torch.complex128).expand(nf, ci, ci), torch.zeros(nf, dtype=torch.float64)
        else:
            As, es = spectrum(shortcut, strides, small, freqs)
        Bs = c_s * As
        BsBs, BsA1 = Bs @ Bs.mH, Bs @ A1.mH  # (F, co, co), (F, co, cm)
        bs_fro, es = torch.linalg.norm(Bs, dim=(1, 2)), abs(c_s) * es
    B2 = c_b * A2
    G1 = A1 @ A1.mH  # (F, cm, cm)
    w = channel_weights(w1, w2)
    root_w = w.sqrt().to(torch.complex128)
    top = _top_estimate(root_w[:, None] * G1 * root_w[None, :])  # only to place lambda: all below is proven
    if not top > 0:
        return None, {}
    lam_top = 1.0 / (m * m * top)
    best_y, best_t = 0.0, None
    for frac in LAMBDA_FRACTIONS:
        t = (frac * lam_top) * w
        # N^-1 by the Schur complement of its top-left x I (x = 1): Sc = T - m^2 T W1 W1^H T,
        # P = B N^-1 B^H = Bs Bs^H + Q Sc^-1 Q^H with Q = B2 + m Bs W1^H T
        chol, failed = torch.linalg.cholesky_ex(_schur(G1, t, m))
        if bool((failed != 0).any()):
            continue
        Z = torch.linalg.solve_triangular(chol, (B2 + m * BsA1 * t.to(torch.complex128)).mH, upper=False)
        p_top = float(torch.linalg.eigvalsh(BsBs + Z.mH @ Z)[:, -1].max())
        if p_top > 0 and 1.0 / p_top > best_y:
            best_y, best_t = 1.0 / p_top, t
    if best_t is None:
        return None, {}
    # the proof (see _proof_chunk), with bounds on the Frobenius errors of the products it uses
    a1_fro, e2 = torch.linalg.norm(A1, dim=(1, 2)), abs(c_b) * e2
    g = gamma(2 * ci + 4)
    g1_err = 2.0 * a1_fro * e1 + e1**2 + g * a1_fro**2
    bsa1_err = bs_fro * e1 + es * a1_fro + es * e1 + g * bs_fro * a1_fro
    bsbs_err = 2.0 * bs_fro * es + es**2 + g * bs_fro**2
    step = max(1, CHUNK_ENTRIES // ((cm + co) ** 2))
    for rel in MARGINS:
        y = best_y * (1.0 - rel)
        if all(_proof_chunk(G1[k : k + step], BsA1[k : k + step], B2[k : k + step], BsBs[k : k + step],
                            g1_err[k : k + step], bsa1_err[k : k + step], e2[k : k + step], bsbs_err[k : k + step], m, best_t, y)
               for k in range(0, len(freqs), step)):
            return y, {"t": best_t.numpy(), "grid": grid}
    return None, {}


def channel_weights(w1: Conv, w2: Conv) -> torch.Tensor:
    """Relative multipliers of the hidden channels: ||W2[:, c]|| / ||W1[c]|| (kernel norms),
    clipped to 1e-3..1e3 times their median. Measured on the blocks of a random CIFAR ResNet-18,
    5-6% lower block constants than one multiplier for all channels (and better than 1 / ||W1[c]||^2,
    ||W2[:, c]||^2 or 1 / max_f (W1 W1^H)_cc); any positive choice is proven the same way."""
    row1 = w1.weight.to(torch.float64).flatten(1).norm(dim=1)
    col2 = full_weight(w2).transpose(0, 1).flatten(1).norm(dim=1)
    w = col2 / row1.clamp_min(1e-300)
    med = float(w.median())
    if not med > 0 or not math.isfinite(med):
        return torch.ones_like(w)
    return w.clamp(1e-3 * med, 1e3 * med) / med


def _schur(G1: torch.Tensor, t: torch.Tensor, m: float) -> torch.Tensor:
    """T - m^2 T G1 T for T = diag(t), batched over frequencies."""
    tc = t.to(torch.complex128)
    out = -(m * m) * (tc[:, None] * G1 * tc[None, :])
    out.diagonal(dim1=-2, dim2=-1).add_(tc)
    return out


def _top_estimate(G: torch.Tensor, iters: int = 60) -> float:
    """The largest eigenvalue over a batch of Hermitian PSD matrices, by power iteration (an
    estimate from below, used only to choose the multiplier)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn((G.shape[0], G.shape[1], 1), dtype=torch.float64, generator=gen).to(G.dtype)
    for _ in range(iters):
        v = G @ v
        v = v / torch.linalg.norm(v, dim=(1, 2), keepdim=True).clamp_min(1e-300)
    return float((v.mH @ G @ v).real.max())


def _proof_chunk(G1: torch.Tensor, BsA1: torch.Tensor, B2: torch.Tensor, BsBs: torch.Tensor, g1_err: torch.Tensor,
                 bsa1_err: torch.Tensor, b2_err: torch.Tensor, bsbs_err: torch.Tensor, m: float, t: torch.Tensor, y: float) -> bool:
    """N - y B^H B >= 0 proven for a chunk of frequencies (N with x = 1; see block_factor).

    Equivalent forms: N - y B^H B >= 0 iff [[N, sqrt(y) B^H], [sqrt(y) B, I]] >= 0 (Schur
    complement of I), iff, eliminating N's exact identity block, T >= 0 with

        T = [[D - m^2 D W1 W1^H D, sqrt(y) Q^H], [sqrt(y) Q, I - y Bs Bs^H]],   Q = B2 + m Bs W1^H D,

    which has c_mid + c_out rows instead of c_in s^d + c_mid, and needs no B^H B. The errors of
    the products (given) and of the assembly (4 eps |T|_F) are covered, doubled."""
    f, cm, _ = G1.shape
    co = B2.shape[1]
    n = cm + co
    root = math.sqrt(y)
    Q = B2 + m * BsA1 * t.to(torch.complex128)
    T = torch.zeros((f, n, n), dtype=torch.complex128)
    T[:, :cm, :cm] = _schur(G1, t, m)
    T[:, cm:, :cm] = root * Q
    T[:, :cm, cm:] = root * Q.mH
    T[:, cm:, cm:] = -y * BsBs
    T.diagonal(dim1=-2, dim2=-1)[:, cm:] += 1.0
    t_max = float(t.max())
    q_err = b2_err + m * t_max * bsa1_err
    err = (m * t_max) ** 2 * g1_err + 2.0 * root * q_err + y * bsbs_err + 4.0 * EPS * torch.linalg.norm(T, dim=(1, 2))
    return proven_psd_batch(T, 2.0 * err)
