"""A structure-aware interior-point solver for LipSDP-Neuron and LipSDP-Layer.

The problem (see ``sdp_problem``): minimise rho over (rho, lambda >= 0) subject to

    S(rho, lambda) = rho E - C(lambda)  >=  0,      C(lambda) = C0 + sum_i lambda_i C_i,

with C_i of rank two: neuron i of hidden layer j, with u_i its weight row embedded in block j-1
and e_i its own unit vector, contributes the quadratic form -2 (a u.z - e.z)(b u.z - e.z), i.e.

    -C_i = 1/2 y1 y1^T - 1/2 y2 y2^T,    y1 = (a + b) u_i - 2 e_i,    y2 = (b - a) u_i.

Method: a primal barrier (dual-scaling) path-following method in the (rho, lambda) space,

    phi_t(rho, theta) = t rho - log det S - sum log theta,     lambda = P theta,

(P = I for LipSDP-Neuron, one column per layer for LipSDP-Layer) with Newton steps whose Hessian
tr(S^-1 A_a S^-1 A_b) is assembled from Q = Y^T S^-1 Y (Y = [y1, y2], 2m vectors) as four
entrywise squares: O(d^3 + d m n + m^3) per step for d = sum of widths, m hidden neurons and n the
widest layer, instead of the O((d^2)^3) of a generic primal-dual solver on the lifted problem.

Robustness on real networks, whose LipSDP data span many orders of magnitude:
- the input block is compressed to the row space of W_0 (an orthogonal change of variables that
  leaves the multipliers unchanged);
- the layers are rescaled, x_k -> s_k y_k (a congruence D M D that preserves the LMI): the working
  problem has weights diag(1/s_{k+1}) W_k diag(s_k) and W_l diag(s_l) / kappa, and its solution
  maps back by  rho = kappa^2 rho',  lambda_j = kappa^2 lambda'_j / s_j^2;
- the start is strictly feasible by construction (a backward block elimination that picks one
  multiplier per layer, as in ECLipsE-Fast), so no phase one is needed.

Certificate: at every centred iterate Z = S^-1 / tr(S^-1_00) is dual feasible when
<Z, C_i> >= 0 for every multiplier group, and then <Z, C0> is a lower bound on the LipSDP optimum
(weak duality). The iteration stops when (rho - rho_low) / rho <= tol. The returned multipliers
are in the coordinates of the original problem; callers re-verify them with
``sdp_problem.verify`` (the only number that may be reported as a bound).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from scipy.linalg import lapack

from .sdp_problem import LipSDPProblem, expand_multipliers

log = logging.getLogger(__name__)

VARIANTS = ("neuron", "layer")


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

    def S(self, rho: float, lam: np.ndarray) -> np.ndarray:
        """S(rho, lambda) = rho E - C(lambda), dense (d x d), lower and upper triangles."""
        S = np.zeros((self.dim, self.dim))
        for j in range(1, len(self.widths)):
            W = self.weights[j - 1]
            lj = lam[self.hidden(j)]
            p, q = self.block(j - 1), self.block(j)
            h = self.hidden(j)
            pw = self.pab[h] * lj
            if np.any(pw):
                S[p, p] += W.T @ ((2.0 * pw)[:, None] * W)
            cross = W.T * (self.sab[h] * lj)[None, :]
            S[p, q] -= cross
            S[q, p] -= cross.T
            S[q, q][np.diag_indices(self.widths[j])] += 2.0 * lj
        last = self.block(len(self.widths) - 1)
        Wl = self.weights[-1]
        S[last, last] -= Wl.T @ Wl
        S[np.arange(self.n0), np.arange(self.n0)] += rho
        return S

    def to_original(self, lam: np.ndarray) -> list[np.ndarray]:
        out = []
        for j in range(1, len(self.widths)):
            out.append(self.kappa2 * lam[self.hidden(j)] / self.scales[j - 1] ** 2)
        return out


def _working_problem(problem: LipSDPProblem, scale: bool) -> _Work:
    W = [np.asarray(w, np.float64) for w in problem.weights]
    # compress the input to the row space of W_0: x0 = V y, |x0| = |y|, W_0 x0 = (U Sigma) y
    if W[0].shape[1] > W[0].shape[0]:
        U, sig, _ = np.linalg.svd(W[0], full_matrices=False)
        W[0] = U * sig[None, :]
    l = len(W) - 1
    s = 1.0
    scales: list[np.ndarray] = []
    Wk: list[np.ndarray] = []
    # per-layer scales that give every hidden weight norm one: s_{k+1} = s_k ||W_k||, so that
    # W'_k = W_k s_k / s_{k+1}; the last layer carries the product, divided out by kappa
    for k in range(l):
        nrm = float(np.linalg.norm(W[k], 2)) if scale else 1.0
        nrm = nrm if nrm > 0 and math.isfinite(nrm) else 1.0
        Wk.append(W[k] / nrm)
        s *= nrm
        scales.append(np.full(W[k].shape[0], s))
    last = W[l] * s
    kappa = float(np.linalg.norm(last, 2)) if scale else 1.0
    kappa = kappa if kappa > 0 and math.isfinite(kappa) else 1.0
    Wk.append(last / kappa)
    return _Work(Wk, [np.asarray(a, np.float64) for a in problem.alphas], [np.asarray(b, np.float64) for b in problem.betas], scales, kappa * kappa)


def _rescale_objective(work: _Work, c: float) -> None:
    """Divide W'_l by sqrt(c): rho' and lambda' are divided by c, kappa^2 multiplied by c."""
    work.weights[-1] = work.weights[-1] / math.sqrt(c)
    work.kappa2 *= c


# --------------------------------------------------------------------------------------------
# A strictly feasible start: backward block elimination, one multiplier per layer
# --------------------------------------------------------------------------------------------


def _layerwise_start(work: _Work, slack: float = 1.0) -> tuple[np.ndarray, float]:
    """Multipliers constant per layer with C22 < 0 and the smallest rho for them.

    Eliminating the hidden blocks from the last one: X_l = W_l^T W_l - 2 c_l I, and
    X_j = P_j - 2 c_j I with P_j = -2 W_j^T (ab c_{j+1}) W_j + W_j^T D (-X_{j+1})^-1 D W_j,
    D = (a + b) c_{j+1}; choosing c_j = (1 + slack)/2 lambda_max(P_j) keeps every X_j < 0 with
    condition number at most (1 + slack) / slack... finally rho = lambda_max(P_0)."""
    L = len(work.widths) - 1
    lam = np.zeros(work.m)
    X = None
    P = work.weights[L].T @ work.weights[L]
    for j in range(L, 0, -1):
        if j < L:
            h = work.hidden(j + 1)
            Wj = work.weights[j]
            D = work.sab[h] * lam[h]
            G = Wj.T * D[None, :]
            P = -2.0 * Wj.T @ ((work.pab[h] * lam[h])[:, None] * Wj) + G @ np.linalg.solve(-X, G.T)
        P = (P + P.T) / 2
        top = float(np.linalg.eigvalsh(P)[-1])
        floor = 1e-8 * max(float(np.abs(P).max()), 1e-300)
        c = max((1.0 + slack) / 2.0 * top, floor, 1e-300)
        lam[work.hidden(j)] = c
        X = P - 2.0 * c * np.eye(P.shape[0])
    h = work.hidden(1)
    W0 = work.weights[0]
    D = work.sab[h] * lam[h]
    G = W0.T * D[None, :]
    P0 = -2.0 * W0.T @ ((work.pab[h] * lam[h])[:, None] * W0) + G @ np.linalg.solve(-X, G.T)
    rho = float(np.linalg.eigvalsh((P0 + P0.T) / 2)[-1])
    return lam, max(rho, 0.0)


# --------------------------------------------------------------------------------------------
# Newton system
# --------------------------------------------------------------------------------------------


def _cholesky(S: np.ndarray) -> np.ndarray | None:
    Lf, info = lapack.dpotrf(S, lower=1, clean=1, overwrite_a=0)
    return Lf if info == 0 else None


def _logdet(Lf: np.ndarray) -> float:
    return 2.0 * float(np.sum(np.log(np.diag(Lf))))


@dataclass
class _Derivs:
    g_rho: float  # d/drho (-log det S)
    g_lam: np.ndarray  # d/dlambda (-log det S) = <S^-1, C_i>
    H_rr: float
    H_rl: np.ndarray
    H_ll: np.ndarray
    low: float  # <S^-1, C0> / tr(S^-1_00): the dual objective of Z = S^-1 / tr(S^-1_00)


def _derivs(work: _Work, Lf: np.ndarray) -> _Derivs:
    n0, d = work.n0, work.dim
    Sinv, info = lapack.dpotri(Lf, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("dpotri failed")
    Sinv = np.tril(Sinv) + np.tril(Sinv, -1).T
    L = len(work.widths) - 1
    m = work.m
    AS = np.empty((m, d))  # rows u_i^T S^-1
    for j in range(1, L + 1):
        AS[work.hidden(j)] = work.weights[j - 1] @ Sinv[work.block(j - 1)]
    R = np.empty((m, m))  # u_i^T S^-1 u_k
    for k in range(1, L + 1):
        R[:, work.hidden(k)] = AS[:, work.block(k - 1)] @ work.weights[k - 1].T
    R = (R + R.T) / 2
    Pm = AS[:, n0:]  # u_i^T S^-1 e_k
    T = Sinv[n0:, n0:]  # e_i^T S^-1 e_k
    sab, dba = work.sab, work.dba
    SP = sab[:, None] * Pm
    Q11 = sab[:, None] * R * sab[None, :] - 2.0 * (SP + SP.T) + 4.0 * T
    Q12 = (sab[:, None] * R - 2.0 * Pm.T) * dba[None, :]
    Q22 = dba[:, None] * R * dba[None, :]
    Q12sq = Q12 * Q12
    H_ll = 0.25 * (Q11 * Q11 + Q22 * Q22 - Q12sq - Q12sq.T)
    g_lam = -0.5 * (np.diag(Q11) - np.diag(Q22))
    S00 = Sinv[:n0, :n0]
    Z1 = AS[:, :n0].T * sab[None, :] - 2.0 * Sinv[:n0, n0:]
    Z2 = AS[:, :n0].T * dba[None, :]
    H_rl = 0.5 * (np.einsum("ij,ij->j", Z1, Z1) - np.einsum("ij,ij->j", Z2, Z2))
    tr00 = float(np.trace(S00))
    last = work.block(L)
    Wl = work.weights[-1]
    low = float(np.einsum("ij,ij->", Wl @ Sinv[last, last], Wl)) / tr00
    return _Derivs(-tr00, g_lam, float(np.sum(S00 * S00)), H_rl, H_ll, low)


# --------------------------------------------------------------------------------------------
# The path-following method
# --------------------------------------------------------------------------------------------


def _group_matrix(work: _Work, variant: str) -> np.ndarray | None:
    """lambda' = P theta: None (identity) for the neuron variant; for the layer variant one
    column per layer, with entries s_i^2 so that the original lambda is constant per layer."""
    if variant == "neuron":
        return None
    L = len(work.widths) - 1
    P = np.zeros((work.m, L))
    for j in range(1, L + 1):
        s2 = work.scales[j - 1] ** 2
        P[work.hidden(j), j - 1] = s2 / s2.max()
    return P


def solve(problem: LipSDPProblem, variant: str = "neuron", **opts) -> tuple[list[np.ndarray] | None, dict]:
    """Near-optimal LipSDP multipliers for ``problem`` (``variant`` "neuron" or "layer").

    Options: tol (relative duality gap on rho, 1e-7), max_iter (Newton steps, 400),
    time_limit (seconds, None), mu (barrier growth per centring, 10), scale (True),
    init (multipliers in the original coordinates to start from, if strictly feasible).

    Returns (multipliers, info): one nonnegative array per hidden layer in the coordinates of
    ``problem`` (constant per layer for "layer"), or None when no strictly feasible point was
    found; info has status ("optimal", "max_iter", "time_limit", "failed: ..."), iterations,
    gap (relative duality gap on rho reached, from a dual feasible point; inf if none),
    solver_value (sqrt of the solver's rho), lower_value (sqrt of the dual bound: no multipliers
    can do better), time_s, method.
    """
    t_start = time.perf_counter()
    if variant not in VARIANTS:
        raise ValueError(f"The 'variant' parameter of solve() must be one of {{{', '.join(VARIANTS)}}}. Got {variant!r} instead.")
    unknown = set(opts) - {"tol", "max_iter", "time_limit", "mu", "scale", "init"}
    if unknown:
        raise TypeError(f"unknown option(s) for lipsdp_fast.solve: {', '.join(sorted(unknown))}")
    tol = float(opts.get("tol", 1e-7))
    max_iter = int(opts.get("max_iter", 400))
    time_limit = opts.get("time_limit")
    mu = float(opts.get("mu", 10.0))
    info: dict = {"method": f"lipsdp_fast barrier ({variant})", "variant": variant, "status": "failed", "iterations": 0, "gap": math.inf, "solver_value": None, "lower_value": None, "time_s": 0.0}
    if problem.n_hidden == 0:
        info["status"] = "failed: no hidden layer"
        return None, info

    work = _working_problem(problem, bool(opts.get("scale", True)))
    lam, rho0 = _layerwise_start(work)
    # normalise the objective so that the start has rho' = 1
    if rho0 > 0 and math.isfinite(rho0):
        _rescale_objective(work, rho0)
        lam = lam / rho0
        rho0 = 1.0
    init = opts.get("init")
    if init is not None:
        cand = np.concatenate(expand_multipliers(problem, init))
        cand = np.concatenate([cand[work.hidden(j)] * work.scales[j - 1] ** 2 for j in range(1, len(work.widths))]) / work.kappa2
        if np.all(cand > 0):
            lam = cand  # rho chosen below
    P = _group_matrix(work, variant)
    if P is None:
        theta = lam.copy()
    else:
        theta = np.array([lam[work.hidden(j)].max() for j in range(1, len(work.widths))])
        lam = P @ theta
    # a strictly feasible rho: twice the smallest feasible one for these multipliers
    rho = _min_rho(work, lam)
    if rho is None:
        info["status"] = "failed: no strictly feasible start"
        info["time_s"] = time.perf_counter() - t_start
        return None, info
    rho = 2.0 * rho + 1e-12

    S = work.S(rho, lam)
    Lf = _cholesky(S)
    if Lf is None:
        info["status"] = "failed: start not strictly feasible"
        info["time_s"] = time.perf_counter() - t_start
        return None, info
    logdet = _logdet(Lf)
    d, p = work.dim, theta.size
    t: float | None = None
    it = 0
    status = "max_iter"
    low_best = -math.inf
    gap = math.inf
    while True:
        if it >= max_iter:
            break
        if time_limit is not None and time.perf_counter() - t_start > time_limit:
            status = "time_limit"
            break
        dv = _derivs(work, Lf)
        if P is None:
            G_th, H_tt, H_rt = dv.g_lam, dv.H_ll, dv.H_rl
        else:
            G_th, H_tt, H_rt = P.T @ dv.g_lam, P.T @ dv.H_ll @ P, P.T @ dv.H_rl
        nb = p + 1
        Hld = np.empty((nb, nb))  # Hessian of -log det S in (rho, theta)
        Hld[0, 0] = dv.H_rr
        Hld[0, 1:] = H_rt
        Hld[1:, 0] = H_rt
        Hld[1:, 1:] = H_tt
        G = np.concatenate([[dv.g_rho], G_th])  # gradient of -log det S
        K = Hld.copy()
        K[np.arange(1, nb), np.arange(1, nb)] += 1.0 / theta**2
        fac = _factor(K)
        if fac is None:
            status = "failed: singular Newton system"
            break
        gb = G.copy()
        gb[1:] -= 1.0 / theta
        if t is None:  # the t for which the start is closest to the central path
            c = np.zeros(nb)
            c[0] = 1.0
            hc, hg = _solve(fac, c), _solve(fac, gb)
            t = -float(c @ hg) / float(c @ hc)
            if not (t > 0 and math.isfinite(t)):
                t = (d + p) / rho
        while True:
            g = gb.copy()
            g[0] += t
            dx = -_solve(fac, g)
            dec2 = -float(g @ dx)
            # dual certificate from the Newton step: Z = (S^-1 - S^-1 dS S^-1) / t has
            # tr(Z_00) = 1, <Z, C_g> = (1 - dtheta_g / theta_g) / (t theta_g), and Z >= 0 when
            # |S^-1/2 dS S^-1/2| <= 1, implied by dx^T Hld dx < 1; then weak duality gives
            # rho_opt >= rho - (d + G.dx + p - sum dtheta / theta) / t.
            r = dx[1:] / theta
            q = float(dx @ Hld @ dx)
            if q < 0.99 and float(np.max(r)) <= 1.0:
                low_best = max(low_best, rho - (d + float(G @ dx) + p - float(np.sum(r))) / t)
            gap = (rho - low_best) / rho if low_best > -math.inf else math.inf
            if gap <= tol or dec2 > 0.25:
                break
            t *= mu  # centred: move along the path
        if gap <= tol:
            status = "optimal"
            break
        # backtracking line search on phi_t along dx, staying strictly feasible
        drho, dth = dx[0], dx[1:]
        neg = dth < 0
        amax = float(np.min(-theta[neg] / dth[neg])) if np.any(neg) else math.inf
        alpha = min(1.0, 0.99 * amax)
        phi0 = t * rho - logdet - float(np.sum(np.log(theta)))
        slope = float(g @ dx)
        accepted = False
        for _ in range(60):
            th_new = theta + alpha * dth
            rho_new = rho + alpha * drho
            Lf_new = _cholesky(work.S(rho_new, th_new if P is None else P @ th_new))
            if Lf_new is not None and np.all(th_new > 0):
                ld_new = _logdet(Lf_new)
                phi_new = t * rho_new - ld_new - float(np.sum(np.log(th_new)))
                if phi_new <= phi0 + 0.01 * alpha * slope:
                    accepted = True
                    break
            alpha *= 0.5
        it += 1
        if not accepted:
            status = "failed: line search"
            break
        rho, theta, Lf, logdet = rho_new, th_new, Lf_new, ld_new
        log.debug("it %d t %.3g rho %.12g alpha %.3g dec2 %.3g gap %.3g", it, t, rho, alpha, dec2, gap)

    lam = theta if P is None else P @ theta
    mult = work.to_original(lam)
    if variant == "layer":
        mult = [np.full(v.shape, float(np.mean(v))) for v in mult]
    info.update(
        status=status,
        iterations=it,
        gap=float(gap),
        solver_value=math.sqrt(max(rho, 0.0) * work.kappa2),
        lower_value=math.sqrt(max(low_best, 0.0) * work.kappa2) if low_best > -math.inf else None,
        time_s=time.perf_counter() - t_start,
    )
    return mult, info


def _factor(H: np.ndarray):
    """Cholesky of a positive definite H after symmetric diagonal equilibration."""
    dg = np.sqrt(np.abs(np.diag(H)))
    dg[dg == 0] = 1.0
    Hs = H / dg[:, None] / dg[None, :]
    for ridge in (0.0, 1e-14, 1e-12, 1e-10, 1e-8):
        A = Hs if ridge == 0 else Hs + ridge * np.eye(len(H))
        Lf, info = lapack.dpotrf(A, lower=1, clean=1, overwrite_a=0)
        if info == 0:
            return Lf, dg
    return None


def _solve(fac, b: np.ndarray) -> np.ndarray:
    Lf, dg = fac
    x, _ = lapack.dpotrs(Lf, b / dg, lower=1)
    return x / dg


def _min_rho(work: _Work, lam: np.ndarray) -> float | None:
    """The smallest rho with S(rho, lambda) >= 0 (Schur complement), or None if C22 is not < 0."""
    S = work.S(0.0, lam)
    n0 = work.n0
    Lf = _cholesky(S[n0:, n0:])
    if Lf is None:
        return None
    X = scipy.linalg.solve_triangular(Lf, S[n0:, :n0], lower=True, check_finite=False)
    schur = -S[:n0, :n0] + X.T @ X  # C11 - C12 C22^-1 C21
    return max(float(np.linalg.eigvalsh((schur + schur.T) / 2)[-1]), 0.0)
