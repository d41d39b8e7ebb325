"""A fast compositional l2 bound (in the spirit of ECLipsE-Fast, Xu and Sivaranjani 2024): one
small matrix inequality per layer, solved in closed form and proven in float64.

State. At every node v the method keeps a quadratic form X_v (a dense PSD matrix when v has at
most ``DENSE_STATE`` entries, else a scalar x_v meaning x_v I) with the invariant

    (f_v(a) - f_v(b))^T X_v (f_v(a) - f_v(b)) <= ||a - b||^2      for all inputs a, b.

The input starts with X = I; at the output, L <= 1 / sqrt(lambda_min(X_out)).

Step through a layer with an activation, v = phi(W u) with every slope of phi in [alpha, beta]
(per neuron: (v_j - alpha w_j)(beta w_j - v_j) >= 0 for the differences w = W du, v = dphi). For
a multiplier lambda >= 0 (one per layer) and an output form Y, the S-procedure gives
du^T X du - dy^T Y dy >= du^T X du - dy^T Y dy - lambda q >= 0 whenever

    N - B^T Y B >= 0,    N = [[X + alpha beta lambda W^T W, -m lambda W^T], [-m lambda W, lambda I]],

with m = (alpha + beta) / 2, z = (du, v) and dy = B z: B = [0, I] for a plain layer, and
B = [c_s S, c_b W2] for a residual block y = c_s S u + c_b W2 phi(W u) (S the identity or a
projection), which is how a residual block is bounded as one block instead of 1 + L(g). The best
Y for a given lambda is the push-forward (B N^-1 B^T)^-1; for a plain layer it is the Schur
complement lambda I - m^2 lambda^2 W (X + alpha beta lambda W^T W)^-1 W^T. lambda is chosen in
closed form (ECLipsE-Fast's choice: half of the largest lambda that keeps N positive definite),
or, for blocks and alpha beta != 0, by a short scan.

Proof. Whatever the floating-point choice of lambda and Y, every step *checks* its inequality
N - B^T Y B >= 0 in float64 by a Cholesky factorisation of the matrix minus an allowance that
covers the rounding errors of assembling it and of the factorisation (``proven_psd``), with a
small margin built into Y. A step that cannot be proven, or that would need a dense matrix that
is too large (convolutions with tens of thousands of neurons), falls back to the scalar rule
x_v = x_u / (c ||W||)^2 with the layer's proven norm bound (c = max(|alpha|, |beta|)), so the
method never needs a d x d matrix for a large layer. A residual block of convolutions that is too
large for a dense form is bounded as a block in the Fourier domain instead (convblock.py: the
block inequality from a scalar state, one small matrix per frequency), and so is a pair of such
convolutions W2 phi(W1 u) with no shortcut (the same inequality with S = 0: VGG's conv-relu-conv,
the first two layers of a bottleneck), where the per-layer rule would be naive. A linear map after
max-pooling of an activation layer gets a short multiplier search of widesdp (``POOL_SEARCH``
seconds; the method sdp-wide searches minutes). Other max-pooling, sums of branches that are not a
recognised residual block and concatenations use the naive rules on scalar states. The reported
value is also never above the naive bound (the smaller of the two proven numbers is reported).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ..config import EPS, Settings, gamma, gram_norm_margin
from ..graph import Activation, Affine, Concat, Extremum, Graph, MaxPool, Node, NormPool, Sort, Sum
from ..result import Result
from .base import SAFETY, register
from .naive import node_lipschitz_bounds

log = logging.getLogger(__name__)

# Largest layer (entries) that keeps a dense quadratic form: a step factors a matrix of at most
# twice this size (2 x 4096 rows: about 10 s with 2 cores), never one of a convolution's full size.
DENSE_STATE = 4096
# Largest dense weight matrix (entries) built for a step (the same limit as LinearOp.dense).
DENSE_WEIGHT = 4096 * 6144
# The relative margin built into every closed-form choice, so that the float64 check has room.
MARGINS = (1e-7, 1e-5, 1e-3)
# seconds of widesdp's multiplier search for a linear map after max-pooling, where compose has no
# rule but the naive one (Convnet_maxpool: 0.65-0.71 of naive in 20 s, by machine; sdp-wide searches minutes)
POOL_SEARCH = 20.0
# the most work (convblock.MAX_WORK's units) a conv-relu-conv pair may take, about 15 s on 2
# cores: VGG's 512-channel pairs at 4x4 take 4e10; MobileNetV2's expansion + depthwise pairs
# (1120 rows per frequency, 1.7e11) took most of a 10-minute run and are left to the naive rule
PAIR_WORK = 5e10

State = Union[np.ndarray, float]


def proven_psd(a: np.ndarray, err_fro: float = 0.0) -> bool:
    """True only if every symmetric matrix within Frobenius distance ``err_fro`` of the float64
    matrix ``a`` is positive semidefinite.

    The matrix is scaled by D = diag(2^k) (exact) to a unit-order diagonal; a Cholesky factorisation
    of D a D - delta I that runs to completion proves D a D >= delta I - F with |F| within the
    factorisation's backward error gamma_{d+1} d max diag (Demmel 1989), and delta also covers
    ||D E D|| <= max(D)^2 err_fro."""
    d = a.shape[0]
    if d == 0:
        return True
    if not (np.isfinite(a).all() and math.isfinite(err_fro)):
        return False
    diag = np.abs(np.diag(a)).copy()
    diag[~(diag > 0)] = 1.0
    D = np.exp2(-np.round(np.log2(np.sqrt(diag))))
    ad = a * D[:, None] * D[None, :]
    delta = err_fro * float(D.max()) ** 2 + gamma(d + 1) * d * float(np.abs(np.diag(ad)).max())
    ad[np.diag_indices(d)] -= delta
    return _chol(ad) is not None


def proven_psd_batch(a: torch.Tensor, err_fro: torch.Tensor) -> bool:
    """True only if, for every b, every symmetric (Hermitian, for complex ``a``) matrix within
    Frobenius distance err_fro[b] of a[b] is positive semidefinite: ``proven_psd`` on a batch.
    The backward error bound is doubled (gamma_{2(n+1)}): a complex product counts as several
    real ones."""
    b, n, _ = a.shape
    if not bool(torch.isfinite(torch.view_as_real(a) if a.is_complex() else a).all()):
        return False
    diag = a.diagonal(dim1=-2, dim2=-1).real.abs().clone()
    diag[~(diag > 0)] = 1.0
    D = torch.exp2(-torch.round(torch.log2(torch.sqrt(diag))))
    ad = a * (D[:, :, None] * D[:, None, :]).to(a.dtype)
    delta = err_fro * D.max(dim=1).values ** 2 + 2.0 * gamma(2 * (n + 1)) * n * ad.diagonal(dim1=-2, dim2=-1).real.abs().max(dim=1).values
    ad.diagonal(dim1=-2, dim2=-1).sub_(delta[:, None].to(a.dtype))
    _, info = torch.linalg.cholesky_ex(ad)
    return bool((info == 0).all())


def _chol(a: np.ndarray) -> torch.Tensor | None:
    """The lower Cholesky factor (torch), or None when the factorisation breaks down."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if not bool(torch.isfinite(t).all()):
        return None
    factor, info = torch.linalg.cholesky_ex(t)
    return factor if int(info) == 0 else None


def _mm(*mats: np.ndarray) -> np.ndarray:
    """The product of float64 matrices, through torch (whose thread count compose_bound sets)."""
    out = torch.from_numpy(np.ascontiguousarray(mats[0]))
    for m in mats[1:]:
        out = out @ torch.from_numpy(np.ascontiguousarray(m))
    return out.numpy()


def _whiten(chol: torch.Tensor, g: np.ndarray) -> np.ndarray:
    """L^-1 G L^-T for X = L L^T."""
    z = torch.linalg.solve_triangular(chol, torch.from_numpy(np.ascontiguousarray(g)), upper=False)
    z = torch.linalg.solve_triangular(chol, z.T.contiguous(), upper=False)
    return z.numpy()


def _solve_with(chol: torch.Tensor, b: np.ndarray) -> np.ndarray:
    """X^-1 B for X = L L^T."""
    return torch.cholesky_solve(torch.from_numpy(np.ascontiguousarray(b)), chol).numpy()


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2.0


def _eigvalsh(a: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(_sym(a)))
    if not bool(torch.isfinite(t).all()):
        return np.array([np.nan])
    return torch.linalg.eigvalsh(t).numpy()


def _lam_max(a: np.ndarray) -> float:
    return float(_eigvalsh(a)[-1])


def _lam_min(a: np.ndarray) -> float:
    return float(_eigvalsh(a)[0])


def scalar_of(state: State) -> float:
    """A proven lower bound on lambda_min of a state (x itself for a scalar state)."""
    if not isinstance(state, np.ndarray):
        return float(state)
    mu = _lam_min(state)
    if not mu > 0:
        return 0.0
    for rel in MARGINS:
        cand = mu * (1.0 - rel)
        shifted = state.copy()
        shifted[np.diag_indices(len(state))] -= cand
        # the subtraction rounds each diagonal entry: at most eps (|X_ii| + cand)
        err = EPS * float(np.linalg.norm(np.abs(np.diag(state)) + cand))
        if proven_psd(shifted, err):
            return cand
    return 0.0


def _dense_of(node: Affine) -> np.ndarray | None:
    """The layer's dense matrix when it has at most DENSE_WEIGHT entries (cached per operator)."""
    lin = node.lin
    if lin.in_dim * lin.out_dim > DENSE_WEIGHT:
        return None
    w = lin.dense(DENSE_WEIGHT)
    return None if w is None else np.asarray(w, np.float64)


def layer_norm(node: Affine) -> float:
    """The layer's proven l2 norm, enlarged by SAFETY: for a dense matrix the square root of the
    largest eigenvalue of its smaller Gram matrix in float64 (one BLAS thread), enlarged by the
    Gram matrix's rounding allowance, otherwise the operator's own
    proven bound (exact or the FFT bound of a large convolution)."""
    cache = node.lin.__dict__.setdefault("_compose_norm", {})
    if "2" not in cache:
        W = _dense_of(node)
        if W is None:
            cache["2"] = node.lin.norm_bound("2")[0]
        else:
            g = _mm(W, W.T) if W.shape[0] <= W.shape[1] else _mm(W.T, W)
            cache["2"] = math.sqrt(max(_lam_max(g), 0.0)) * gram_norm_margin(max(W.shape), min(W.shape)) if g.size else 0.0
    return cache["2"] * (1.0 + SAFETY)


# --------------------------------------------------------------------------------------------
# Steps: each returns a new state, proven, or None when it does not apply / cannot be proven
# --------------------------------------------------------------------------------------------


def linear_to_scalar(X: np.ndarray, W: np.ndarray) -> float | None:
    """y with y ||W du||^2 <= du^T X du: y = 1 / t for t X - W^T W >= 0 (proven)."""
    G = _mm(W.T, W)
    err_g = gamma(W.shape[0] + 2) * float(np.linalg.norm(W, "fro")) ** 2
    chol = _chol(X)
    if chol is None:
        return None
    t0 = max(_lam_max(_whiten(chol, G)), 0.0)
    if t0 == 0.0:  # a zero map is constant; anything else underflowed: no proof
        return math.inf if not W.any() else None
    for rel in MARGINS:
        t = t0 * (1.0 + rel)
        A = t * X - G
        err = err_g + 2 * EPS * (t * float(np.linalg.norm(X, "fro")) + float(np.linalg.norm(G, "fro")))
        if proven_psd(A, err):
            return _finite_state(1.0 / t)
    return None


def chain_dense(X: np.ndarray, W: np.ndarray, m: float, ab: float) -> np.ndarray | None:
    """Dense state -> dense state through v = phi(W u) (B = [0, I]); verified on the full N."""
    n, n1 = X.shape[0], W.shape[0]
    WtW = _mm(W.T, W) if ab != 0.0 else None
    cx = _chol(X)
    if cx is None:
        return None
    K0 = _mm(W, _solve_with(cx, W.T))
    s = _lam_max(K0)
    if not s > 0:
        return None
    lam0 = 1.0 / (2.0 * m * m * s) if m > 0 else 1.0

    def push(lam: float) -> np.ndarray | None:
        if ab == 0.0:
            K = K0
        else:
            c = _chol(X + ab * lam * WtW)
            if c is None:
                return None
            K = _mm(W, _solve_with(c, W.T))
        Y = -(m * m * lam * lam) * _sym(K)
        Y[np.diag_indices(n1)] += lam
        return Y

    if ab == 0.0:
        lam = lam0
    else:  # scan lambda: the best smallest eigenvalue of Y
        best = (-math.inf, lam0)
        for f in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0):
            Y = push(lam0 * f)
            if Y is not None:
                mu = _lam_min(Y)
                if mu > best[0]:
                    best = (mu, lam0 * f)
        lam = best[1]
    Ystar = push(lam)
    if Ystar is None:
        return None
    wf = float(np.linalg.norm(W, "fro"))
    for rel in MARGINS:
        Y = Ystar.copy()
        Y[np.diag_indices(n1)] -= rel * lam
        Nm = np.zeros((n + n1, n + n1))
        Nm[:n, :n] = X if ab == 0.0 else X + ab * lam * WtW
        Nm[n:, :n] = -m * lam * W
        Nm[:n, n:] = Nm[n:, :n].T
        R = -Y
        R[np.diag_indices(n1)] += lam
        Nm[n:, n:] = R
        err = (abs(ab) * lam * gamma(n1 + 2) * wf * wf + 2 * EPS * float(np.linalg.norm(Nm, "fro"))) * 2.0
        if proven_psd(Nm, err):
            return Y
    return None


def chain_from_scalar(x: float, W: np.ndarray, m: float) -> np.ndarray | None:
    """Scalar state (any size) -> dense state, with alpha beta >= 0 dropped (sound: it only adds
    a PSD term to N). Proven in the small dimension: x (lambda I - Y) - m^2 lambda^2 W W^T >= 0 is
    N's Schur complement."""
    n1 = W.shape[0]
    G = _sym(_mm(W, W.T))
    err_g = gamma(W.shape[1] + 2) * float(np.linalg.norm(W, "fro")) ** 2
    s = _lam_max(G)
    if not (s > 0 and m > 0 and x > 0):
        return None
    lam = x / (2.0 * m * m * s)
    c = m * m * lam * lam
    if not math.isfinite(c):  # a state near MU_MAX over a tiny layer: no finite multiplier
        return None
    for rel in MARGINS:
        Y = -(c / x) * G
        Y[np.diag_indices(n1)] += lam * (1.0 - rel)
        R = -Y
        R[np.diag_indices(n1)] += lam
        A = x * R - c * G
        err = c * err_g + 4 * EPS * (x * float(np.linalg.norm(R, "fro")) + c * float(np.linalg.norm(G, "fro")))
        if proven_psd(A, err):
            return Y
    return None


def chain_to_scalar(X: np.ndarray, W: np.ndarray, m: float, ab: float) -> float | None:
    """Dense state (small) -> scalar state (large layer): y with
    X - (m^2 lambda^2 / (lambda - y) - alpha beta lambda) W^T W >= 0, proven in the small dimension."""
    G = _sym(_mm(W.T, W))
    err_g = gamma(W.shape[0] + 2) * float(np.linalg.norm(W, "fro")) ** 2
    chol = _chol(X)
    if chol is None:
        return None
    s = _lam_max(_whiten(chol, G))  # X >= (1/s) W^T W
    if not (s > 0 and m > 0):
        return None
    # maximise y = lambda - m^2 lambda^2 / (1/s + alpha beta lambda) over lambda (> 0)
    lams = np.geomspace(1e-3, 1e3, 121) / (2 * m * m * s)
    ys = lams - m * m * lams**2 / (1.0 / s + ab * lams)
    ys[(1.0 / s + ab * lams) <= 0] = -np.inf
    k = int(np.argmax(ys))
    lam, y0 = float(lams[k]), float(ys[k])
    if not y0 > 0:
        return None
    for rel in MARGINS:
        y = y0 * (1.0 - rel)
        t = m * m * lam * lam / (lam - y) - ab * lam
        A = X - t * G
        err = abs(t) * err_g + 2 * EPS * (float(np.linalg.norm(X, "fro")) + abs(t) * float(np.linalg.norm(G, "fro")))
        if proven_psd(A, err):
            return y
    return None


def block_dense(X: np.ndarray, W1: np.ndarray, m: float, ab: float, S: np.ndarray, c_s: float, W2: np.ndarray, c_b: float) -> np.ndarray | None:
    """Dense state -> dense state through y = c_s S u + c_b W2 phi(W1 u): one matrix inequality
    N - B^T Y B >= 0 with B = [c_s S, c_b W2], Y = (1 - margin) (B N^-1 B^T)^-1."""
    n, h = X.shape[0], W1.shape[0]
    B = np.hstack([c_s * S, c_b * W2])
    WtW = _mm(W1.T, W1) if ab != 0.0 else None
    cx = _chol(X)
    if cx is None:
        return None
    s = _lam_max(_mm(W1, _solve_with(cx, W1.T)))
    if not (s > 0 and m > 0):
        return None

    def assemble(lam: float) -> np.ndarray:
        Nm = np.zeros((n + h, n + h))
        Nm[:n, :n] = X if ab == 0.0 else X + ab * lam * WtW
        Nm[n:, :n] = -m * lam * W1
        Nm[:n, n:] = Nm[n:, :n].T
        Nm[np.arange(n, n + h), np.arange(n, n + h)] = lam
        return Nm

    def push(lam: float) -> np.ndarray | None:
        c = _chol(assemble(lam))
        if c is None:
            return None
        P = _sym(_mm(B, _solve_with(c, B.T)))
        # (P + tau I)^-1 <= P^-1 keeps the inequality and bounds Y's condition number: output
        # directions that the block barely reaches (strided convolutions) would otherwise get
        # huge entries whose rounding errors no proof can absorb
        P[np.diag_indices(P.shape[0])] += 1e-3 * _lam_max(P)
        cp = _chol(P)
        if cp is None:
            return None
        return _sym(torch.cholesky_inverse(cp).numpy())

    lam_top = 1.0 / (m * m * s)  # N > 0 needs lambda < this (alpha beta = 0)
    best: tuple[float, float, np.ndarray | None] = (-math.inf, 0.0, None)
    for f in (0.3, 0.5, 0.7):
        Y = push(lam_top * f)
        if Y is not None:
            mu = _lam_min(Y)
            if mu > best[0]:
                best = (mu, lam_top * f, Y)
    mu, lam, Ystar = best
    if Ystar is None or not mu > 0:
        return None
    bf = float(np.linalg.norm(B, "fro"))
    for rel in MARGINS:
        Y = Ystar * (1.0 - rel)
        Nm = assemble(lam)
        Q = _mm(B.T, Y, B)
        A = Nm - _sym(Q)
        err = 2.0 * (gamma(2 * B.shape[0] + 2) * bf * bf * float(np.linalg.norm(Y, "fro"))
                     + abs(ab) * lam * gamma(h + 2) * float(np.linalg.norm(W1, "fro")) ** 2
                     + 2 * EPS * float(np.linalg.norm(A, "fro")))
        if proven_psd(A, err):
            return Y
    return None


def wide_layer_to_scalar(X: np.ndarray, W: np.ndarray, m: float, ab: float, Wl: np.ndarray) -> float | None:
    """State X (n) -> a wide activation layer v = phi(W u) (h neurons, no state kept there) -> a
    narrow linear map Wl (r outputs): a scalar y with y ||Wl dv||^2 <= du^T X du, from the
    two-layer inequality [[X + ab lam W^T W, -m lam W^T], [-m lam W, lam I - y Wl^T Wl]] >= 0.

    With U = Wl^T, the h x h block is inverted by Woodbury, and the inequality is equivalent
    (Schur complements; M = (lam / y) I - Wl Wl^T > 0) to the (n + r)-row matrix
        Q = [[X - (m^2 - ab) lam W^T W, m sqrt(lam) W^T Wl^T], [m sqrt(lam) Wl W, M]] >= 0,
    which is what is proven, with M - tau I >= 0 proven separately: nothing of size h is formed
    beyond the products W^T W, W^T Wl^T and Wl Wl^T."""
    n, r = X.shape[0], Wl.shape[0]
    G = _sym(_mm(W.T, W))
    H = _mm(W.T, Wl.T)
    K = _sym(_mm(Wl, Wl.T))
    h = W.shape[0]
    wf, lf = float(np.linalg.norm(W, "fro")), float(np.linalg.norm(Wl, "fro"))
    chol = _chol(X)
    if chol is None or not m > 0:
        return None
    s = _lam_max(_whiten(chol, G))
    k = _lam_max(K)
    c2 = m * m - ab
    if not (s > 0 and k > 0 and c2 > 0):
        return None

    def assemble(lam: float, y: float) -> np.ndarray:
        Q = np.empty((n + r, n + r))
        Q[:n, :n] = X - (c2 * lam) * G
        Q[:n, n:] = (m * math.sqrt(lam)) * H
        Q[n:, :n] = Q[:n, n:].T
        Q[n:, n:] = -K
        Q[np.arange(n, n + r), np.arange(n, n + r)] += lam / y
        return Q

    def err(lam: float, Q: np.ndarray) -> float:
        g = gamma(h + 2)
        return 2.0 * (c2 * lam * g * wf * wf + 2 * m * math.sqrt(lam) * g * wf * lf + g * lf * lf + 4 * EPS * float(np.linalg.norm(Q, "fro")))

    def feasible(lam: float, y: float) -> bool:  # a float test only; the proof is below
        return _chol(assemble(lam, y)) is not None

    best = (0.0, 0.0)
    for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        lam = f / (c2 * s)
        lo, hi = 0.0, lam / k  # M > 0 needs y < lam / ||K||
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if feasible(lam, mid) else (lo, mid)
        if lo > best[0]:
            best = (lo, lam)
    y0, lam = best
    if not y0 > 0:
        return None
    for rel in MARGINS:
        y = y0 * (1.0 - rel)
        Q = assemble(lam, y)
        M = Q[n:, n:].copy()
        tau = rel * (lam / y - k)
        M[np.diag_indices(r)] -= max(tau, 0.0)
        if tau > 0 and proven_psd(M, err(lam, Q)) and proven_psd(Q, err(lam, Q)):
            return y
    return None


# --------------------------------------------------------------------------------------------
# The walk over the graph
# --------------------------------------------------------------------------------------------


@dataclass
class Step:
    node: str
    rule: str
    value: float  # proven bound from the input to this node (1 / sqrt(lambda_min(state)))


def _slopes(node: Activation) -> tuple[float, float]:
    a, b = node.slope_interval
    return float(a), float(b)


# A scalar state mu (||dy||^2 <= ||du||^2 / mu) of inf says "constant": one that overflowed from
# finite numbers would say it of a map that is not (a bound of 0). Capped here, the state only
# gets smaller: still proven.
MU_MAX = 1e300


def _finite_state(mu: float) -> float:
    return min(mu, MU_MAX)


def _state_of_bound(total: float) -> float:
    """The scalar state of a proven constant ``total`` (0: constant, inf)."""
    return math.inf if total == 0 else _finite_state(1.0 / total / total)


def _bound_of(state: State) -> float:
    mu = scalar_of(state)
    return math.inf if mu <= 0 else (1.0 / math.sqrt(mu)) * (1.0 + SAFETY)


def _is_dense(state: State) -> bool:
    return isinstance(state, np.ndarray)


def _densify(state: State, n: int) -> np.ndarray | None:
    if _is_dense(state):
        return state  # type: ignore[return-value]
    if n > DENSE_STATE or state == math.inf:
        # a constant map (inf) has no dense form: inf * eye is NaN off the diagonal, which the
        # dense rules refused anyway (their Cholesky fails); the scalar rules handle it
        return None
    return float(state) * np.eye(n)


class _Walker:
    def __init__(self, graph: Graph, wide_sdp_time: float | None = None, deadline: float | None = None) -> None:
        self.g = graph
        # a time.perf_counter() value after which no Fourier-domain block is started (each takes
        # seconds on a large network; the naive rule, proven too, takes over)
        self.deadline = deadline
        self.consumers = graph.consumers()
        self.states: dict[str, State] = {Graph.INPUT: 1.0}
        self.steps: list[Step] = []
        # seconds for the per-neuron multiplier search of a wide layer (widesdp); None: not tried
        self.wide_sdp_time = wide_sdp_time
        self.wide_sdp_info: list[dict] = []
        # the walk's progress bar and the step it is at (a step that searches for minutes redraws it)
        self.bar = None
        self.at = 0

    def dim(self, name: str) -> int:
        return int(np.prod(self.g.shape_of(name)))

    def searching(self, seconds_left: float) -> None:
        """A step's search has at most ``seconds_left`` to go: the bar says so (a terminal only)."""
        if self.bar is not None:
            self.bar.update(self.at, eta=seconds_left)

    def record(self, name: str, rule: str, state: State) -> State:
        self.states[name] = state
        self.steps.append(Step(name, rule, _bound_of(state)))
        return state

    def scalar_step(self, prev: State, factor: float) -> float:
        """The naive rule: ||dy|| <= factor ||du||."""
        mu = scalar_of(prev)
        if factor == 0 or mu == math.inf:  # a constant map, or a constant input
            return math.inf
        return _finite_state(mu / factor / factor * (1.0 - 4 * EPS))

    def activation(self, node: Activation) -> State:
        a, b = _slopes(node)
        m, ab, c = (a + b) / 2.0, a * b, max(abs(a), abs(b))
        src = self.g.node(node.inputs[0]) if node.inputs[0] != Graph.INPUT else None
        if isinstance(src, Affine) and self.consumers[src.name] == [node.name] and src.name != self.g.output:
            prev, W_node = self.states[src.inputs[0]], src
            n_in = self.dim(src.inputs[0])
        else:
            prev, W_node, n_in = self.states[node.inputs[0]], None, self.dim(node.inputs[0])
        n_out = self.dim(node.name)
        if node.kind == "prelu":  # per-channel slopes: bound them by the widest interval
            s = node.params["slope"].numpy().ravel()
            a, b = min(float(s.min()), 1.0), max(float(s.max()), 1.0)
            m, ab, c = (a + b) / 2.0, a * b, max(abs(a), abs(b))
        W = None
        if W_node is None:
            W = np.eye(n_in) if n_in <= DENSE_STATE else None
        elif min(n_in, n_out) <= DENSE_STATE:
            W = _dense_of(W_node)
        out: State | None = None
        rule = ""
        if W is not None and m > 0:
            if n_out <= DENSE_STATE:
                X = prev if _is_dense(prev) else (_densify(prev, n_in) if ab != 0.0 else None)
                if X is not None:
                    out, rule = chain_dense(X, W, m, ab), "layer inequality (dense form)"
                elif ab >= 0.0:
                    out, rule = chain_from_scalar(float(prev), W, m), "layer inequality (from a scalar form)"
            elif _is_dense(prev):
                out, rule = chain_to_scalar(prev, W, m, ab), "layer inequality (to a scalar form)"  # type: ignore[arg-type]
        if out is None:
            factor = c * (layer_norm(W_node) if W_node is not None else 1.0)
            out, rule = self.scalar_step(prev, factor), "naive: slope x proven layer norm"
            pair = self.conv_pair(W_node) if W_node is not None and c > 0 else None
            if pair is not None and pair / (c * c) > float(out):  # the larger state is the smaller bound
                out, rule = pair / (c * c), "two-convolution inequality (Fourier domain)"
        return self.record(node.name, rule, out)

    def conv_pair(self, n2: Affine) -> float | None:
        """The scalar state at n2's output for n2 = W2 phi(W1 u), two convolutions too large for
        dense forms: convblock's block inequality without a shortcut, from the state of u."""
        act = self.g.node(n2.inputs[0]) if n2.inputs[0] != Graph.INPUT else None
        if not isinstance(act, Activation) or act.kind == "prelu" or self.consumers[act.name] != [n2.name]:
            return None
        n1 = self.g.node(act.inputs[0]) if act.inputs[0] != Graph.INPUT else None
        if not isinstance(n1, Affine) or self.consumers[n1.name] != [act.name] or n1.inputs[0] not in self.states:
            return None
        if len(n1.out_shape) < 3 or min(n1.out_shape[2:]) < 4:
            # on a 2x2 or 3x3 grid the periodic embedding is loose (VGG-16's 512-channel pairs at
            # 2x2: 8.3 against naive's 5.8, 10-14 s each)
            return None
        a, b = _slopes(act)
        block = self.conv_block(n1.inputs[0], n1, a, b, n2, None, 0.0, 1.0, PAIR_WORK)
        return None if block is None else float(block[0])

    def affine(self, node: Affine) -> State:
        prev = self.states[node.inputs[0]]
        if _is_dense(prev) and node.lin.out_dim * node.lin.in_dim <= DENSE_WEIGHT:
            W = _dense_of(node)
            if W is not None:
                y = linear_to_scalar(prev, W)  # type: ignore[arg-type]
                if y is not None:
                    return self.record(node.name, "linear map (dense form)", y)
        y = self.scalar_step(prev, layer_norm(node))
        best, rule = y, "naive: proven layer norm"
        wide = self.wide_layer(node)
        if wide is not None and wide > best:
            best, rule = wide, "two-layer inequality (wide layer, narrow output)"
        search = self.wide_sdp_time
        if search is None and self.after_pooling(node):
            search = POOL_SEARCH
            if self.deadline is not None and self.deadline - time.perf_counter() < search:
                search = None
        if search is not None:
            from .widesdp import wide_step  # the LipSDP-Neuron step (method sdp-wide; compose after max-pooling)

            wide_sdp = wide_step(self, node, search)
            if wide_sdp is not None and wide_sdp > best:  # the larger state is the smaller bound
                best, rule = wide_sdp, "LipSDP-Neuron over a wide layer (per-unit multipliers)"
        return self.record(node.name, rule, best)

    def after_pooling(self, node: Affine) -> bool:
        """node reads max-pooling alone (the pattern of widesdp.wide_step with a pool)."""
        prev = self.g.node(node.inputs[0]) if node.inputs[0] != Graph.INPUT else None
        return isinstance(prev, MaxPool) and self.consumers[prev.name] == [node.name]

    def wide_layer(self, node: Affine) -> float | None:
        """The narrow map ``node`` after a wide activation layer phi(W u) whose state is a scalar:
        one inequality over both layers (wide_layer_to_scalar), from the state of u."""
        act = self.g.node(node.inputs[0]) if node.inputs[0] != Graph.INPUT else None
        if not isinstance(act, Activation) or act.kind == "prelu" or self.consumers[act.name] != [node.name]:
            return None
        src = self.g.node(act.inputs[0]) if act.inputs[0] != Graph.INPUT else None
        if not isinstance(src, Affine) or self.consumers[src.name] != [act.name] or _is_dense(self.states[act.name]):
            return None
        n = self.dim(src.inputs[0])
        if node.lin.out_dim > DENSE_STATE or n > DENSE_STATE:
            return None
        X = _densify(self.states[src.inputs[0]], n)
        W, Wl = _dense_of(src), _dense_of(node)
        if X is None or W is None or Wl is None:
            return None
        a, b = _slopes(act)
        return wide_layer_to_scalar(X, W, (a + b) / 2.0, a * b, Wl)

    def residual_block(self, node: Sum) -> tuple[State, str] | None:
        """y = c_s S(p) + c_b W2 phi(W1 p), with S the identity or one affine map: one inequality
        (the new state and the rule's name)."""
        if len(node.inputs) != 2:
            return None

        def branch(name: str) -> tuple[str, Affine, Activation, Affine] | None:
            n2 = self.g.node(name) if name != Graph.INPUT else None
            if not isinstance(n2, Affine) or self.consumers[n2.name] != [node.name]:
                return None
            act = self.g.node(n2.inputs[0]) if n2.inputs[0] != Graph.INPUT else None
            if not isinstance(act, Activation) or self.consumers[act.name] != [n2.name] or act.kind == "prelu":
                return None
            n1 = self.g.node(act.inputs[0]) if act.inputs[0] != Graph.INPUT else None
            if not isinstance(n1, Affine) or self.consumers[n1.name] != [act.name]:
                return None
            return n1.inputs[0], n1, act, n2

        for k in (0, 1):
            br = branch(node.inputs[k])
            if br is None:
                continue
            p, n1, act, n2 = br
            other = node.inputs[1 - k]
            c_b, c_s = float(node.coeffs[k]), float(node.coeffs[1 - k])
            n_p, n_out = self.dim(p), self.dim(node.name)
            if other == p:
                S = np.eye(n_p) if n_p <= DENSE_STATE else None
            else:
                sn = self.g.node(other) if other != Graph.INPUT else None
                if not (isinstance(sn, Affine) and sn.inputs == [p] and self.consumers[sn.name] == [node.name]):
                    continue
                S = _dense_of(sn)
            a, b = _slopes(act)
            if S is None or max(n_p, n_out, self.dim(n1.name)) > DENSE_STATE:
                return self.conv_block(p, n1, a, b, n2, None if other == p else self.g.node(other), c_s, c_b)
            X = _densify(self.states[p], n_p)
            W1, W2 = _dense_of(n1), _dense_of(n2)
            if X is None or W1 is None or W2 is None:
                return None
            out = block_dense(X, W1, (a + b) / 2.0, a * b, S, c_s, W2, c_b)
            return None if out is None else (out, "residual block inequality")
        return None

    def conv_block(self, p: str, n1: Affine, a: float, b: float, n2: Affine, shortcut: Node | None,
                   c_s: float, c_b: float, max_work: float | None = None) -> tuple[State, str] | None:
        """A block of convolutions too large for a dense form: its inequality in the Fourier
        domain (convblock.py), from the scalar state of its input."""
        from ..graph.convnorm import torch_threads
        from .convblock import MAX_WORK, block_factor

        if a != 0.0 or not b > 0 or (self.deadline is not None and time.perf_counter() > self.deadline):
            return None
        with torch_threads(min(2, os.cpu_count() or 1)):  # large batched factorisations: 1.6x on 2 cores
            y = block_factor(n1.lin, n2.lin, None if shortcut is None else shortcut.lin, b / 2.0, c_s, c_b,
                             max_work=MAX_WORK if max_work is None else max_work)
        if y is None:
            return None
        return scalar_of(self.states[p]) * y * (1.0 - 4 * EPS), "residual block inequality (Fourier domain)"

    def block_interior(self, node: Sum) -> list[str]:
        """The nodes strictly inside a residual block ending at ``node`` (structure only): the
        block's inequality needs none of their states, so they are computed only if it fails."""
        if len(node.inputs) != 2:
            return []
        cons = self.consumers
        for k in (0, 1):
            names = [node.inputs[k]]
            for _ in range(2):  # n2 <- act <- n1
                prev = self.g.node(names[-1]).inputs if names[-1] != Graph.INPUT else []
                if len(prev) != 1 or prev[0] == Graph.INPUT:
                    break
                names.append(prev[0])
            if len(names) != 3 or not all(len(cons[n]) == 1 for n in names):
                continue
            p = self.g.node(names[-1]).inputs[0]
            other = node.inputs[1 - k]
            if other == p:
                return names
            sn = self.g.node(other) if other != Graph.INPUT else None
            if isinstance(sn, Affine) and sn.inputs == [p] and cons[other] == [node.name]:
                return names + [other]
        return []

    def visit(self, n: Node) -> None:
        if isinstance(n, Activation):
            self.activation(n)
        elif isinstance(n, Affine):
            self.affine(n)
        elif isinstance(n, (MaxPool, Sort, NormPool)):  # their exact l2 constants, as naive takes them
            c, _, how = n.lipschitz("2")
            self.record(n.name, f"naive: {how}", self.scalar_step(self.states[n.inputs[0]], c * (1.0 + SAFETY)))
        elif isinstance(n, Sum):
            block = self.residual_block(n)
            if block is not None:
                self.record(n.name, block[1], block[0])
                return
            for name in [m.name for m in self.g.nodes if m.name in self.deferred.get(n.name, ())]:
                if not self.skipped(self.g.node(name)):
                    self.visit(self.g.node(name))
            total = sum(abs(c) * _bound_of(self.states[i]) for c, i in zip(n.coeffs, n.inputs))
            self.record(n.name, "naive: sum over branches", _state_of_bound(total))
        elif isinstance(n, (Concat, Extremum)):  # an elementwise max / min changes at most as the concatenation
            total = math.sqrt(sum(_bound_of(self.states[i]) ** 2 for i in n.inputs)) * (1.0 + SAFETY)
            rule = "naive: concatenation" if isinstance(n, Concat) else f"naive: elementwise {n.mode} (as a concatenation)"
            self.record(n.name, rule, _state_of_bound(total))
        else:  # pragma: no cover - every node type is handled above
            raise TypeError(f"no compositional rule for {type(n).__name__}")

    def skipped(self, n: Node) -> bool:
        """An affine layer read by its one activation: the activation's step uses its weights."""
        return (isinstance(n, Affine) and n.name != self.g.output and len(self.consumers[n.name]) == 1
                and isinstance(self.g.node(self.consumers[n.name][0]), Activation))

    def run(self, label: str = "compose") -> float:
        from .. import progress

        self.deferred = {n.name: set(self.block_interior(n)) for n in self.g.nodes if isinstance(n, Sum)}
        inside = set().union(*self.deferred.values()) if self.deferred else set()
        todo = [n for n in self.g.nodes if n.name not in inside and not self.skipped(n)]
        # a bar on a terminal only: a ResNet-50's walk takes minutes (its Fourier-domain steps)
        with progress.bar(label, len(todo)) as bar:
            self.bar = bar
            for i, n in enumerate(todo):
                self.at = i
                self.visit(n)
                bar.update(i + 1)
            self.bar = None
        return _bound_of(self.states[self.g.output])


def _naive_norm(node: Node, p: str) -> tuple[float, bool, str]:
    if isinstance(node, Affine):
        return layer_norm(node) / (1.0 + SAFETY), True, "layer norm"
    return node.lipschitz(p)


def compose_bound(graph: Graph, wide_sdp_time: float | None = None, info: list | None = None,
                  deadline: float | None = None) -> tuple[float, float, list[Step]]:
    """(the compositional proven l2 bound, the naive bound with the same layer norms, the rule
    used at every node). ``wide_sdp_time``: also try the LipSDP-Neuron step of widesdp on wide
    layers, with that many seconds for each multiplier search; its logs are appended to ``info``.
    ``deadline`` (a time.perf_counter() value): no Fourier-domain block step starts after it."""
    from ..graph.convnorm import prefetch_l2_norms, single_threaded

    merged = graph.merge_linear()
    # every layer's proven norm is read (scalar steps, the naive value): computed ahead on 2 threads
    prefetch_l2_norms([n.lin for n in merged.nodes if isinstance(n, Affine)])
    walker = _Walker(merged, wide_sdp_time, deadline)
    # one BLAS thread: on a shared machine spin-waiting threads cost 10-100x (see lipcert/sdp/fast.py)
    with single_threaded():
        value = walker.run("compose" if wide_sdp_time is None else "sdp-wide")
        if info is not None:
            info.extend(walker.wide_sdp_info)
        naive = node_lipschitz_bounds(merged, "2", _naive_norm)[0][merged.output]
        return value, naive, walker.steps


@register
class Compose:
    name = "compose"
    kind = "upper"
    description = ("compositional layer-by-layer matrix inequalities (ECLipsE-Fast style, residual blocks as blocks, "
                   "convolution blocks and conv-relu-conv pairs in the Fourier domain, a short multiplier search after "
                   "max-pooling); proven l2 bound, seconds to a few minutes")

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None if settings.norm == "2" else "the compositional method bounds the l2 norm only"

    def run(self, graph: Graph, settings: Settings) -> Result:
        start = time.perf_counter()
        value, naive, steps = compose_bound(graph, deadline=settings.extra.get("deadline"))
        return compose_result(self.name, graph, value, naive, steps, start)


def compose_result(name: str, graph: Graph, value: float, naive: float, steps: list[Step], start: float,
                   settings: dict | None = None, details: dict | None = None) -> Result:
    """The Result of a compositional walk: min(value, naive), with the rule used at every node."""
    warnings = []
    if not value <= naive:
        warnings.append(f"the compositional bound ({value:.6g}) is not below the naive one: the naive bound is reported")
    rules: dict[str, int] = {}
    for s in steps:
        rules[s.rule] = rules.get(s.rule, 0) + 1
    out = {"compositional_value": value if math.isfinite(value) else None, "naive_value": naive, "rules": rules,
           "steps": [{"node": s.node, "rule": s.rule, "bound": s.value if math.isfinite(s.value) else None} for s in steps],
           **(details or {})}
    return Result(name, "upper", "2", min(value, naive), True, time.perf_counter() - start,
                  {"norm": "2", "dense_state": DENSE_STATE, "margins": list(MARGINS), "safety_margin": SAFETY, **(settings or {})},
                  warnings=warnings, model=graph.source, sha256=graph.sha256, details=out)
