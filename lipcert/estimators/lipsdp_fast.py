"""A structure-aware primal-dual interior-point solver for LipSDP-Neuron and LipSDP-Layer.

The problem (see ``sdp_problem``): minimise rho over (rho, lambda >= 0) subject to

    S(rho, lambda) = rho E - C0 - sum_i lambda_i C_i  >=  0,

with C_i of rank two: neuron i of hidden layer j, with u_i its weight row (living in block j-1)
and e_i its own unit vector (block j),

    C_i = -2ab u_i u_i^T + (a + b)(u_i e_i^T + e_i u_i^T) - 2 e_i e_i^T
        = -1/2 y1 y1^T + 1/2 y2 y2^T,      y1 = (a + b) u_i - 2 e_i,   y2 = (b - a) u_i.

Method: an infeasible-primal, feasible-dual path-following method with the HKM direction and
Mehrotra's predictor-corrector, on the pair

    (multipliers)  y = (rho, theta), lambda = P theta,  S = S(rho, lambda) > 0,  theta > 0,
    (certificate)  X > 0 (d x d), x > 0:  tr X_00 = 1,  <C_g, X> = x_g,   maximise <C0, X>,

(P = I for LipSDP-Neuron; one column per layer for LipSDP-Layer). The structure enters through
the Schur complement M_kl = <A_k, X A_l S^-1>: with the rank-two C_i it is four entrywise products
of m x m matrices Y^T X Y and Y^T S^-1 Y, built from the weights layer by layer, so a step costs
O(d^3 + d m n + m^3) (d = sum of widths, m hidden neurons, n the widest layer) instead of the
O(m d^3 + m^2 d^2) of a generic solver on the same problem.

Robustness on real networks, whose LipSDP data span many orders of magnitude:
- the input block is compressed to the row space of W_0 (an orthogonal change of variables that
  leaves the multipliers unchanged);
- the layers are rescaled, x_k -> s_k y_k (a congruence D M D, which preserves the LMI): the
  working problem has weights W_k s_k / s_{k+1} and W_l s_l / kappa, and its solution maps back by
  rho = kappa^2 rho',  lambda_j = kappa^2 lambda'_j / s_j^2;
- the start is strictly feasible and centred by construction: multipliers from a backward block
  elimination (one per layer, as in ECLipsE-Fast), X_0 proportional to S_0^-1.

Certificate: X / tr(X_00) is dual feasible when <C_g, X> >= 0 for every multiplier group, and then
<C0, X> / tr(X_00) is a lower bound on the LipSDP optimum (weak duality); the iteration stops when
(rho - lower) / rho <= tol. The returned multipliers are in the coordinates of the original
problem; callers re-verify them with ``sdp_problem.verify``, whose value is the only one that may
be reported as a bound.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .sdp_problem import LipSDPProblem, expand_multipliers

log = logging.getLogger(__name__)

VARIANTS = ("neuron", "layer")
OPTIONS = ("tol", "max_iter", "time_limit", "scale", "init", "threads")
F64 = torch.float64


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# The working problem: compressed input, rescaled layers
# --------------------------------------------------------------------------------------------


@dataclass
class _Work:
    """LipSDP data in working coordinates, with what is needed to map multipliers back."""

    weights: list[np.ndarray]  # W'_0 .. W'_l
    alphas: list[np.ndarray]
    betas: list[np.ndarray]
    scales: list[np.ndarray]  # s_j per hidden layer j = 1..l (per neuron)
    kappa2: float  # kappa^2
    widths: list[int] = field(init=False)
    offsets: np.ndarray = field(init=False)
    sab: np.ndarray = field(init=False)  # a + b, all hidden neurons
    dba: np.ndarray = field(init=False)  # b - a
    pab: np.ndarray = field(init=False)  # a * b

    def __post_init__(self) -> None:
        self.widths = [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights[:-1]]
        self.offsets = np.concatenate([[0], np.cumsum(self.widths)]).astype(int)
        a, b = np.concatenate(self.alphas), np.concatenate(self.betas)
        self.sab, self.dba, self.pab = a + b, b - a, a * b
        self.tw = [_t(w) for w in self.weights]
        self.tsab, self.tdba, self.tpab = _t(self.sab), _t(self.dba), _t(self.pab)

    @property
    def layers(self) -> int:
        return len(self.widths) - 1

    @property
    def n0(self) -> int:
        return self.widths[0]

    @property
    def dim(self) -> int:
        return int(self.offsets[-1])

    @property
    def m(self) -> int:
        return self.dim - self.n0

    def block(self, k: int) -> slice:
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def hidden(self, j: int) -> slice:
        """Indices of hidden layer j (1-based) among the m multipliers."""
        return slice(int(self.offsets[j] - self.n0), int(self.offsets[j + 1] - self.n0))

    def set_last(self, W: np.ndarray) -> None:
        self.weights[-1] = W
        self.tw[-1] = _t(W)

    # ---- the linear maps -------------------------------------------------------------------

    def S(self, rho: float, lam: np.ndarray, const: bool = True) -> torch.Tensor:
        """S = rho E - C(lambda) (dense d x d); without ``const`` the linear part only."""
        d = self.dim
        S = torch.zeros((d, d), dtype=F64)
        tl = _t(lam)
        for j in range(1, self.layers + 1):
            W = self.tw[j - 1]
            h = self.hidden(j)
            lj = tl[h]
            p, q = self.block(j - 1), self.block(j)
            pw = self.tpab[h] * lj
            if bool(torch.any(pw != 0)):
                S[p, p] += W.T @ ((2.0 * pw)[:, None] * W)
            cross = W.T * (self.tsab[h] * lj)[None, :]
            S[p, q] -= cross
            S[q, p] -= cross.T
            S[q, q] += torch.diag(2.0 * lj)
        if const:
            Wl = self.tw[-1]
            last = self.block(self.layers)
            S[last, last] -= Wl.T @ Wl
        S[: self.n0, : self.n0] += torch.eye(self.n0, dtype=F64) * rho
        return S

    def apply_C(self, Z: torch.Tensor) -> tuple[float, np.ndarray, float]:
        """For a symmetric Z: <E, Z>, (<C_i, Z>)_i and <C0, Z>; reads the block-tridiagonal part."""
        out = np.empty(self.m)
        for j in range(1, self.layers + 1):
            W = self.tw[j - 1]
            h = self.hidden(j)
            p, q = self.block(j - 1), self.block(j)
            WZ = W @ Z[p, p]
            uu = torch.einsum("ij,ij->i", WZ, W)
            ue = torch.einsum("ij,ji->i", W, Z[p, q])
            ee = torch.diagonal(Z[q, q])
            out[h] = (-2.0 * self.tpab[h] * uu + 2.0 * self.tsab[h] * ue - 2.0 * ee).numpy()
        last = self.block(self.layers)
        Wl = self.tw[-1]
        c0 = float(torch.einsum("ij,ij->", Wl @ Z[last, last], Wl))
        return float(torch.trace(Z[: self.n0, : self.n0])), out, c0

    def quad(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q_st = Y_s^T Z Y_t (m x m) for s, t in {1, 2}, and the input rows (Z Y_1)_0, (Z Y_2)_0."""
        n0, d, m = self.n0, self.dim, self.m
        AZ = torch.empty((m, d), dtype=F64)  # rows u_i^T Z
        for j in range(1, self.layers + 1):
            AZ[self.hidden(j)] = self.tw[j - 1] @ Z[self.block(j - 1)]
        R = torch.empty((m, m), dtype=F64)  # u_i^T Z u_k
        for k in range(1, self.layers + 1):
            R[:, self.hidden(k)] = AZ[:, self.block(k - 1)] @ self.tw[k - 1].T
        R = (R + R.T) / 2
        Pm = AZ[:, n0:]  # u_i^T Z e_k
        T = Z[n0:, n0:]  # e_i^T Z e_k
        sab, dba = self.tsab, self.tdba
        SP = sab[:, None] * Pm
        Q11 = sab[:, None] * R * sab[None, :] - 2.0 * (SP + SP.T) + 4.0 * T
        Q12 = (sab[:, None] * R - 2.0 * Pm.T) * dba[None, :]
        Q22 = dba[:, None] * R * dba[None, :]
        Z1 = AZ[:, :n0].T * sab[None, :] - 2.0 * Z[:n0, n0:]
        Z2 = AZ[:, :n0].T * dba[None, :]
        return Q11, Q12, Q22, Z1, Z2

    def to_original(self, lam: np.ndarray) -> list[np.ndarray]:
        return [self.kappa2 * lam[self.hidden(j)] / self.scales[j - 1] ** 2 for j in range(1, self.layers + 1)]

    def from_original(self, lams: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([lams[j - 1] * self.scales[j - 1] ** 2 for j in range(1, self.layers + 1)]) / self.kappa2


def _norm2(W: np.ndarray) -> float:
    return float(torch.linalg.matrix_norm(_t(W), ord=2)) if W.size else 0.0


def _working_problem(problem: LipSDPProblem, scale: bool) -> _Work:
    W = [np.asarray(w, np.float64) for w in problem.weights]
    # compress the input to the row space of W_0: x0 = V y, |x0| = |y|, W_0 x0 = (U Sigma) y
    if W[0].shape[1] > W[0].shape[0]:
        U, sig, _ = torch.linalg.svd(_t(W[0]), full_matrices=False)
        W[0] = (U * sig[None, :]).numpy()
    l = len(W) - 1
    s = 1.0
    scales: list[np.ndarray] = []
    Wk: list[np.ndarray] = []
    # per-layer scales that give every hidden weight norm one: s_{k+1} = s_k ||W_k||, so that
    # W'_k = W_k s_k / s_{k+1}; the last layer carries the product, divided out by kappa
    for k in range(l):
        nrm = _norm2(W[k]) if scale else 1.0
        nrm = nrm if nrm > 0 and math.isfinite(nrm) else 1.0
        Wk.append(W[k] / nrm)
        s *= nrm
        scales.append(np.full(W[k].shape[0], s))
    last = W[l] * s
    kappa = _norm2(last) if scale else 1.0
    kappa = kappa if kappa > 0 and math.isfinite(kappa) else 1.0
    Wk.append(last / kappa)
    alphas = [np.asarray(a, np.float64) for a in problem.alphas]
    betas = [np.asarray(b, np.float64) for b in problem.betas]
    return _Work(Wk, alphas, betas, scales, kappa * kappa)


# --------------------------------------------------------------------------------------------
# A strictly feasible start: backward block elimination, one multiplier per layer
# --------------------------------------------------------------------------------------------


def _layerwise_start(work: _Work, slack: float = 1.0) -> tuple[np.ndarray, float]:
    """Multipliers constant per layer with C22 < 0, and the smallest rho for them.

    Eliminating the hidden blocks from the last one: X_l = W_l^T W_l - 2 c_l I and
    X_j = P_j - 2 c_j I with P_j = -2 W_j^T (ab c_{j+1}) W_j + W_j^T D (-X_{j+1})^-1 D W_j,
    D = (a + b) c_{j+1}; c_j = (1 + slack)/2 lambda_max(P_j) keeps X_j < 0 with condition number
    at most (1 + slack)/slack; finally rho = lambda_max(P_0)."""
    L = work.layers
    lam = np.zeros(work.m)
    X = None
    P = work.tw[L].T @ work.tw[L]
    for j in range(L, -1, -1):
        if j < L:
            h = work.hidden(j + 1)
            Wj = work.tw[j]
            lh = _t(lam[h])
            G = Wj.T * (work.tsab[h] * lh)[None, :]
            P = -2.0 * Wj.T @ ((work.tpab[h] * lh)[:, None] * Wj) + G @ torch.linalg.solve(-X, G.T)
        P = _sym(P)
        top = float(torch.linalg.eigvalsh(P)[-1])
        if j == 0:
            return lam, max(top, 0.0)
        floor = 1e-8 * max(float(P.abs().max()), 1e-300)
        c = max((1.0 + slack) / 2.0 * top, floor, 1e-300)
        lam[work.hidden(j)] = c
        X = P - 2.0 * c * torch.eye(P.shape[0], dtype=F64)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Dense linear algebra helpers
# --------------------------------------------------------------------------------------------


def _chol(A: torch.Tensor) -> torch.Tensor | None:
    L, info = torch.linalg.cholesky_ex(A)
    return L if int(info) == 0 else None


def _max_step(L: torch.Tensor, D: torch.Tensor, steps: int = 40) -> float:
    """An estimate of the largest alpha with L L^T + alpha D >= 0 (inf if D >= 0): the smallest
    eigenvalue of L^-1 D L^-T by Lanczos with full reorthogonalisation (exact for small d). The
    Ritz value lies above the eigenvalue, so callers confirm the step with a Cholesky factorisation."""
    d = L.shape[0]
    if d <= 2 * steps:
        B = torch.linalg.solve_triangular(L, D, upper=False)
        B = torch.linalg.solve_triangular(L, B.T, upper=False)
        lo = float(torch.linalg.eigvalsh(_sym(B))[0])
        return -1.0 / lo if lo < 0 else math.inf
    gen = torch.Generator().manual_seed(0)
    V = torch.zeros((d, steps + 1), dtype=F64)
    v = torch.randn((d, 1), generator=gen, dtype=F64)
    V[:, :1] = v / torch.linalg.norm(v)
    alphas, betas = [], []
    for k in range(steps):
        w = torch.linalg.solve_triangular(L.T, V[:, k : k + 1], upper=True)  # L^-T v
        w = torch.linalg.solve_triangular(L, D @ w, upper=False)
        a = float(V[:, k] @ w[:, 0])
        w = w - V[:, : k + 1] @ (V[:, : k + 1].T @ w)  # full reorthogonalisation (twice)
        w = w - V[:, : k + 1] @ (V[:, : k + 1].T @ w)
        alphas.append(a)
        bk = float(torch.linalg.norm(w))
        if bk < 1e-12 * max(abs(a), 1e-300):
            break
        betas.append(bk)
        V[:, k + 1 : k + 2] = w / bk
    n = len(alphas)
    Tm = np.diag(alphas) + np.diag(betas[: n - 1], 1) + np.diag(betas[: n - 1], -1)
    lo = float(np.linalg.eigvalsh(Tm)[0])
    return -1.0 / lo if lo < 0 else math.inf


def _tri_blocks(work: "_Work", A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """The block-tridiagonal part of A @ B (or of A): what <C_i, .>, <E, .> and <C0, .> read."""
    out = torch.zeros_like(A)
    L = work.layers
    for k in range(L + 1):
        rk = work.block(k)
        for l in (k - 1, k, k + 1):
            if 0 <= l <= L:
                cl = work.block(l)
                out[rk, cl] = A[rk, cl] if B is None else A[rk] @ B[:, cl]
    return out


def _tri_mul(work: "_Work", X: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """X @ T for a block-tridiagonal T (dense storage)."""
    out = torch.empty_like(X)
    L = work.layers
    for q in range(L + 1):
        cq = work.block(q)
        lo, hi = work.block(max(q - 1, 0)).start, work.block(min(q + 1, L)).stop
        out[:, cq] = X[:, lo:hi] @ T[lo:hi, cq]
    return out


def _max_step_vec(v: np.ndarray, dv: np.ndarray) -> float:
    neg = dv < 0
    return float(np.min(-v[neg] / dv[neg])) if np.any(neg) else math.inf


def _factor(M: np.ndarray):
    """Cholesky of a positive definite M after symmetric diagonal equilibration."""
    dg = np.sqrt(np.abs(np.diag(M)))
    dg[dg == 0] = 1.0
    Ms = _t(M / dg[:, None] / dg[None, :])
    eye = torch.eye(len(M), dtype=F64)
    for ridge in (0.0, 1e-14, 1e-12, 1e-10, 1e-8):
        L = _chol(Ms + ridge * eye if ridge else Ms)
        if L is not None:
            return L, dg
    return None


def _fsolve(fac, b: np.ndarray) -> np.ndarray:
    L, dg = fac
    x = torch.cholesky_solve(_t(b / dg)[:, None], L)[:, 0].numpy()
    return x / dg


def _sym(A: torch.Tensor) -> torch.Tensor:
    return (A + A.T) / 2


# --------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------


def _group_matrix(work: _Work, variant: str) -> np.ndarray | None:
    """lambda' = P theta: None (identity) for the neuron variant; for the layer variant one
    column per layer, with entries s_i^2 (normalised) so that the original lambda is constant per
    layer."""
    if variant == "neuron":
        return None
    P = np.zeros((work.m, work.layers))
    for j in range(1, work.layers + 1):
        s2 = work.scales[j - 1] ** 2
        P[work.hidden(j), j - 1] = s2 / s2.max()
    return P


def _solve(problem: LipSDPProblem, variant: str, opts: dict) -> tuple[list[np.ndarray] | None, dict]:
    """Near-optimal LipSDP multipliers for ``problem`` (``variant`` "neuron" or "layer").

    Options: tol (relative duality gap on rho at which to stop, 1e-6), max_iter (60),
    time_limit (seconds, None), scale (rescale the layers, True), init (multipliers in the
    original coordinates to start from, when strictly feasible).

    Returns (multipliers, info): one nonnegative array per hidden layer in the coordinates of
    ``problem`` (constant per layer for "layer"), or None when no strictly feasible point was
    found; info has status ("optimal", "max_iter", "time_limit", "stalled", "failed: ..."),
    iterations, gap (relative duality gap on rho proven by a dual feasible point; inf if none),
    solver_value (sqrt of the solver's rho), lower_value (sqrt of the dual bound: no multipliers of
    this variant give less), time_s, method.
    """
    t_start = time.perf_counter()
    if variant not in VARIANTS:
        raise ValueError(f"The 'variant' parameter of solve() must be one of {{{', '.join(VARIANTS)}}}. Got {variant!r} instead.")
    unknown = set(opts) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s) for lipsdp_fast.solve: {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    tol = float(opts.get("tol", 1e-6))
    max_iter = int(opts.get("max_iter", 60))
    time_limit = opts.get("time_limit")
    info: dict = {"method": f"lipcert-fast primal-dual interior point (LipSDP-{variant.capitalize()})", "variant": variant, "status": "failed", "iterations": 0, "gap": math.inf, "solver_value": None, "lower_value": None, "time_s": 0.0}

    def done(status: str, mult=None, **kw):
        info.update(status=status, time_s=time.perf_counter() - t_start, **kw)
        return mult, info

    if problem.n_hidden == 0:
        return done("failed: no hidden layer")

    work = _working_problem(problem, bool(opts.get("scale", True)))
    lam, rho0 = _layerwise_start(work)
    if rho0 > 0 and math.isfinite(rho0):  # normalise the objective: the start has rho' = 1
        work.set_last(work.weights[-1] / math.sqrt(rho0))
        work.kappa2 *= rho0
        lam = lam / rho0
    if opts.get("init") is not None:
        cand = work.from_original(expand_multipliers(problem, opts["init"]))
        if np.all(cand > 0) and np.all(np.isfinite(cand)):
            lam = cand
    P = _group_matrix(work, variant)
    if P is None:
        theta = lam.copy()
    else:
        theta = np.array([lam[work.hidden(j)].max() for j in range(1, work.layers + 1)])
        lam = P @ theta
    rho = _min_rho(work, lam)
    if rho is None:
        return done("failed: no strictly feasible start")
    rho = 2.0 * rho + 1e-12
    S = work.S(rho, lam)
    LS = _chol(S)
    if LS is None:
        return done("failed: start not strictly feasible")

    n0, d, p = work.n0, work.dim, theta.size
    nu = d + p
    Sinv = torch.cholesky_inverse(LS)
    xi = 1.0 / float(torch.trace(Sinv[:n0, :n0]))
    X = _sym(xi * Sinv)  # a centred start: X S = xi I, x s = xi
    LX = _chol(X)
    x = xi / theta
    b = np.zeros(p + 1)
    b[0] = -1.0
    low_best = -math.inf
    status = "max_iter"
    it = 0
    gap = math.inf
    while True:
        # ---- certificate from the current X ----
        trE, cx, c0 = work.apply_C(X)
        cx_g = cx if P is None else P.T @ cx
        if trE > 0 and np.all(cx_g >= 0):
            low_best = max(low_best, c0 / trE)
        gap = (rho - low_best) / rho if low_best > -math.inf else math.inf
        mu = (float(torch.sum(X * S)) + float(x @ theta)) / nu
        log.debug("it %d rho %.12g low %.12g gap %.3g mu %.3g", it, rho, low_best, gap, mu)
        if gap <= tol:
            status = "optimal"
            break
        if it >= max_iter:
            break
        if time_limit is not None and time.perf_counter() - t_start > time_limit:
            status = "time_limit"
            break
        it += 1
        # ---- Schur complement M_kl = <A_k, X A_l S^-1> + LP part ----
        Sinv = torch.cholesky_inverse(LS)
        QS, QX = work.quad(Sinv), work.quad(X)
        M_ll = 0.25 * (QX[0] * QS[0] + QX[2] * QS[2] - QX[1] * QS[1] - (QX[1] * QS[1]).T)
        M_rl = 0.5 * (torch.einsum("ij,ij->j", QS[3], QX[3]) - torch.einsum("ij,ij->j", QS[4], QX[4]))
        M_rr = float(torch.sum(X[:n0, :n0] * Sinv[:n0, :n0]))
        M_ll, M_rl = M_ll.numpy(), M_rl.numpy()
        if P is not None:
            M_ll, M_rl = P.T @ M_ll @ P, P.T @ M_rl
        M = np.empty((p + 1, p + 1))
        M[0, 0], M[0, 1:], M[1:, 0], M[1:, 1:] = M_rr, M_rl, M_rl, M_ll
        M[np.arange(1, p + 1), np.arange(1, p + 1)] += x / theta
        fac = _factor(M)
        if fac is None:
            status = "stalled"
            break

        def direction(rhs: np.ndarray):
            dy = _fsolve(fac, rhs)
            dlam = dy[1:] if P is None else P @ dy[1:]
            dS = work.S(dy[0], dlam, const=False)
            return dy, dS

        def steps(dX, dx, dS, dth):
            ap = min(_max_step(LX, dX), _max_step_vec(x, dx))
            ad = min(_max_step(LS, dS), _max_step_vec(theta, dth))
            return ap, ad

        # predictor
        dy, dS = direction(b)
        dX = -X - _sym(_tri_mul(work, X, dS) @ Sinv)
        dth = dy[1:]
        dx = -x - x * dth / theta
        ap, ad = steps(dX, dx, dS, dth)
        ap, ad = min(1.0, ap), min(1.0, ad)
        mu_aff = (float(torch.sum((X + ap * dX) * (S + ad * dS))) + float((x + ap * dx) @ (theta + ad * dth))) / nu
        expon = max(1.0, 3.0 * min(ap, ad) ** 2)
        sigma = min(1.0, max(mu_aff / mu, 0.0) ** expon)
        # corrector: second-order term Wc = sym(dX_a dS_a S^-1), of which the right-hand side
        # reads the block-tridiagonal part only
        K = _tri_mul(work, dX, dS)
        Wc_tri = _sym(_tri_blocks(work, K, Sinv))
        trSi, cSi, _ = work.apply_C(Sinv)
        trW, cW, _ = work.apply_C(Wc_tri)
        smu = sigma * mu
        rhs = np.empty(p + 1)
        rhs[0] = -1.0 + smu * trSi - trW
        cSi_g = cSi if P is None else P.T @ cSi
        cW_g = cW if P is None else P.T @ cW
        rhs[1:] = -smu * (cSi_g - 1.0 / theta) + cW_g - dx * dth / theta
        dx_a, dth_a = dx, dth
        dy, dS = direction(rhs)
        dth = dy[1:]
        dX = smu * Sinv - X - _sym((K + _tri_mul(work, X, dS)) @ Sinv)
        dx = smu / theta - x - dx_a * dth_a / theta - x * dth / theta
        ap, ad = steps(dX, dx, dS, dth)
        gamma = 0.9 + 0.09 * min(ap, ad, 1.0)
        ap, ad = min(1.0, gamma * ap), min(1.0, gamma * ad)
        # primal step: X stays positive definite (the Lanczos estimate is confirmed here)
        for _ in range(30):
            X_new = _sym(X + ap * dX)
            LX_new = _chol(X_new)
            if LX_new is not None:
                break
            ap *= 0.8
        else:
            status = "stalled"
            break
        # dual step: keep S strictly positive definite in floating point
        for _ in range(30):
            th_new = theta + ad * dth
            rho_new = rho + ad * dy[0]
            lam_new = th_new if P is None else P @ th_new
            S_new = work.S(rho_new, lam_new)
            LS_new = _chol(S_new)
            if LS_new is not None and np.all(th_new > 0):
                break
            ad *= 0.5
        else:
            status = "stalled"
            break
        X, LX = X_new, LX_new
        x = x + ap * dx
        rho, theta, S, LS = rho_new, th_new, S_new, LS_new
        log.debug("   ap %.3f ad %.3f sigma %.3g", ap, ad, sigma)

    lam = theta if P is None else P @ theta
    mult = work.to_original(lam)
    if variant == "layer":
        mult = [np.full(v.shape, float(np.mean(v))) for v in mult]
    return done(
        status,
        mult,
        iterations=it,
        gap=float(gap),
        solver_value=math.sqrt(max(rho, 0.0) * work.kappa2),
        lower_value=math.sqrt(max(low_best, 0.0) * work.kappa2) if low_best > -math.inf else None,
    )


def solve(problem: LipSDPProblem, variant: str = "neuron", **opts) -> tuple[list[np.ndarray] | None, dict]:
    # one BLAS thread by default: on a shared machine, spin-waiting threads cost 10-100x (measured
    # here: a 256 x 256 eigvalsh took 7 s with 2 threads under load, 5 ms with 1)
    threads = opts.pop("threads", 1)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _solve(problem, variant, opts)
    finally:
        torch.set_num_threads(before)


solve.__doc__ = _solve.__doc__


def _min_rho(work: _Work, lam: np.ndarray) -> float | None:
    """The smallest rho with S(rho, lambda) >= 0 (Schur complement), or None if C22 is not < 0."""
    S = work.S(0.0, lam)
    n0 = work.n0
    L = _chol(S[n0:, n0:])
    if L is None:
        return None
    Xs = torch.linalg.solve_triangular(L, S[n0:, :n0], upper=False)
    schur = -S[:n0, :n0] + Xs.T @ Xs  # C11 - C12 C22^-1 C21
    return max(float(torch.linalg.eigvalsh(_sym(schur))[-1]), 0.0)
