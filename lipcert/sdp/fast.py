"""A structure-aware primal-dual interior-point solver for LipSDP-Neuron and LipSDP-Layer.

The problem (see ``lipcert.sdp.problem``): minimise rho over (rho, lambda >= 0) subject to

    S(rho, lambda) = rho E - C0 - sum_i lambda_i C_i  >=  0,

with C_i of rank two: neuron i of hidden layer j, with u_i its weight row (living in block j-1)
and e_i its own unit vector (block j),

    C_i = -2ab u_i u_i^T + (a + b)(u_i e_i^T + e_i u_i^T) - 2 e_i e_i^T
        = -1/2 y1 y1^T + 1/2 y2 y2^T,      y1 = (a + b) u_i - 2 e_i,   y2 = (b - a) u_i.

Method: an infeasible-primal, feasible-dual path-following method with the HKM direction and
Mehrotra's predictor-corrector, on the pair

    (multipliers)  y = (rho, theta), lambda = P theta,  S = S(rho, lambda) > 0,  theta > 0,
    (certificate)  X > 0 (d x d), x > 0:  tr X_00 = 1,  <C_g, X> = x_g,   maximise <C0, X>,

(P = I for LipSDP-Neuron; one column per layer for LipSDP-Layer). The structure enters twice:
- the Schur complement M_kl = <A_k, X A_l S^-1> is, with the rank-two C_i, four entrywise
  products of the m x m matrices Y^T X Y and Y^T S^-1 Y, built from the weights layer by layer;
- S is block-tridiagonal over the layers (one diagonal block per layer, one off-diagonal block per
  pair of adjacent layers: the chordal structure of Chordal-LipSDP), and so is every direction
  dS: its Cholesky factor has no fill, so X dS and step lengths cost O(d n) per column.
A step costs O(L^2 n^3 + m^3) (L layers of width n, d = sum of widths, m hidden neurons) against
O(m d^3 + m^2 d^2) for a generic solver on the same problem, and the iteration count of a
primal-dual method (about 10-30 here, with Mehrotra's corrector).

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
(rho - lower) / rho <= tol. While X breaks some of those constraints (the primal is infeasible
until a full step, which on cifar_base_kw never comes: its primal steps stay short), D X D with
one scale per neuron, chosen layer by layer, is feasible (``_Work.repair_scales``) and gives the
lower bound instead. The returned multipliers are in the coordinates of the original
problem; callers re-verify them with ``problem.verify``, whose value is the only one that may
be reported as a bound.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..graph.convnorm import torch_threads
from .problem import LipSDPProblem, block_tridiagonal, expand_multipliers

log = logging.getLogger(__name__)

VARIANTS = ("neuron", "layer")
OPTIONS = ("tol", "max_iter", "time_limit", "scale", "init", "threads", "progress", "target", "start_factor", "precision")
F64 = torch.float64
F32 = torch.float32
# Mixed precision: above DENSE_DIM rows the steps run in float32 while the duality gap is above
# SINGLE_GAP (or the caller's tol, if larger), then in float64. Measured on mnist-net_256x4 pair
# problems (1280 rows, tol 0.05): the same iterations and values to 6 digits, 1.8-1.9x faster
# (float32 products and memory traffic). The Schur complement system and the multipliers stay in
# float64, a float32 step that fails hands over to float64, and the reported dual bound is
# recomputed in float64; the multipliers are verified in float64 as always.
SINGLE_GAP = 1e-2
# step lengths: from the dense matrix L^-1 D L^-T up to this size (block Krylov estimates, the exact
# eigenvalue when an estimate fails), Lanczos on the operator above (measured crossover)
EXACT_STEP_DIM = 400
# below this size S is kept dense (fewer, larger operations), above it block-tridiagonal
DENSE_DIM = 400
# the start: rho = START_FACTOR x the smallest feasible rho of the layer-wise multipliers. After
# STALL_STEPS steps in a row shorter than 0.5 (far from the central path), one restart from the
# current multipliers, further inside (measured: mnist_relu_9_200 stalled at a duality gap of 0.08
# after 60 steps; with the restart it converges in 35; starting every net at 5x instead costs one
# or two steps on the small MLPs). The restart's rho is RESTART_FACTOR x the smallest feasible one:
# 2 rather than 5 (2026-12-04, the 45 certify pairs of mnist-net_256x4 at tol 0.05: 682 steps
# instead of 709, the slowest pair 27 instead of 48; ACAS Xu 2_3 28 instead of 32; the bench MLPs
# and real MLPs otherwise unchanged; 1.2 was worse: one pair took 55)
START_FACTOR = 2.0
RESTART_FACTOR = 2.0
STALL_STEPS = 6


# BLAS threads: one below PARALLEL_DIM rows (on a shared machine, spin-waiting threads cost
# 10-100x on small operations: a 256 x 256 eigvalsh took 7 s with 2 threads under load, 5 ms with
# 1), torch's default (one per core) above, where every step is a few d^3 products (cifar_base_kw,
# 6244 rows, 2 cores: 18.5 s a step instead of 32 s)
PARALLEL_DIM = 3000
# relative rounding allowed in repair_scales' constraint check, per working precision
REPAIR_ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-5}


def default_threads(dim: int) -> int:
    """BLAS threads for a solve of ``dim`` rows (see PARALLEL_DIM)."""
    return 1 if dim < PARALLEL_DIM else torch.get_num_threads()


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
    dtype: torch.dtype = F64  # of every tensor the steps use (see SINGLE_GAP)
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
        self.has_uu = bool(np.any(self.pab != 0))
        self.set_dtype(self.dtype)

    def t(self, a) -> torch.Tensor:
        """A numpy array (or a tensor) as a tensor of the working precision."""
        return torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a).to(self.dtype)

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Rebuild the weight tensors in ``dtype`` (float64 data stay in ``weights``)."""
        self.dtype = dtype
        self.tw = [self.t(w) for w in self.weights]
        self.tsab, self.tdba, self.tpab = self.t(self.sab), self.t(self.dba), self.t(self.pab)
        # a + b and b - a as a row and a column factor; plain numbers when every neuron has the
        # same slope interval (one activation throughout: fewer and cheaper operations)
        self.sab_rc, self.dba_rc = (self._factors(v) for v in (self.sab, self.dba))
        # small problems: all weight rows u_i as the columns of one dense d x m matrix, so that S and
        # <C_i, Z> take a few large operations instead of a few per layer
        self.U = None
        if self.dim <= DENSE_DIM:
            self.U = torch.zeros((self.dim, self.m), dtype=dtype)
            for j in range(1, self.layers + 1):
                self.U[self.block(j - 1), self.hidden(j)] = self.tw[j - 1].T

    def _factors(self, v: np.ndarray) -> tuple:
        if v.size and np.all(v == v[0]):
            return float(v[0]), float(v[0])
        t = self.t(v)
        return t[:, None], t[None, :]

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
        self.tw[-1] = self.t(W)

    # ---- the linear maps -------------------------------------------------------------------

    def S(self, rho: float, lam: np.ndarray, const: bool = True) -> torch.Tensor:
        """S = rho E - C(lambda) (dense d x d); without ``const`` the linear part only."""
        d, n0 = self.dim, self.n0
        tl = self.t(lam)
        S = torch.zeros((d, d), dtype=self.dtype)
        if self.U is not None:
            if self.has_uu:
                S += self.U @ ((2.0 * self.tpab * tl)[:, None] * self.U.T)
            cross = self.U * (self.tsab * tl)[None, :]  # column i: (a + b) lambda_i u_i
            S[:, n0:] -= cross
            S[n0:, :] -= cross.T
        else:
            for j in range(1, self.layers + 1):
                W = self.tw[j - 1]
                h = self.hidden(j)
                lj = tl[h]
                p, q = self.block(j - 1), self.block(j)
                if self.has_uu:
                    S[p, p] += W.T @ ((2.0 * self.tpab[h] * lj)[:, None] * W)
                cross = W.T * (self.tsab[h] * lj)[None, :]
                S[p, q] -= cross
                S[q, p] -= cross.T
        S.diagonal()[n0:] += 2.0 * tl
        if const:
            Wl = self.tw[-1]
            last = self.block(self.layers)
            S[last, last] -= Wl.T @ Wl
        S.diagonal()[:n0] += rho
        return S

    def S_bt(self, rho: float, lam: np.ndarray, const: bool = True) -> "_BT | _DenseS":
        """S(rho, lambda) (or its linear part) as a block-tridiagonal matrix (dense when small)."""
        if self.dim <= DENSE_DIM:
            return _DenseS(self, self.S(rho, lam, const))
        D = [torch.zeros((n, n), dtype=self.dtype) for n in self.widths]
        B = []
        tl = self.t(lam)
        for j in range(1, self.layers + 1):
            W = self.tw[j - 1]
            h = self.hidden(j)
            lj = tl[h]
            if self.has_uu:
                D[j - 1] += W.T @ ((2.0 * self.tpab[h] * lj)[:, None] * W)
            B.append(-(self.tsab[h] * lj)[:, None] * W)
            D[j] += torch.diag(2.0 * lj)
        if const:
            D[-1] -= self.tw[-1].T @ self.tw[-1]
        D[0] += torch.eye(self.n0, dtype=self.dtype) * rho
        return _BT(self, D, B)

    def apply_C(self, Z: torch.Tensor) -> tuple[float, np.ndarray]:
        """For a symmetric Z: <E, Z> and (<C_i, Z>)_i; reads the block-tridiagonal part (cheaper
        than the diagonals of quad(Z) when Q is not needed otherwise)."""
        n0 = self.n0
        ee = torch.diagonal(Z)[n0:]
        if self.U is not None:
            ZU = Z @ self.U
            uu = torch.einsum("ij,ij->j", self.U, ZU)
            ue = torch.diagonal(ZU[n0:])
            out = -2.0 * self.tpab * uu + 2.0 * self.tsab * ue - 2.0 * ee
            return float(torch.trace(Z[:n0, :n0])), out.numpy()
        out = np.empty(self.m)
        for j in range(1, self.layers + 1):
            W = self.tw[j - 1]
            h = self.hidden(j)
            p, q = self.block(j - 1), self.block(j)
            WZ = W @ Z[p, p]
            uu = torch.einsum("ij,ij->i", WZ, W)
            ue = torch.einsum("ij,ji->i", W, Z[p, q])
            out[h] = (-2.0 * self.tpab[h] * uu + 2.0 * self.tsab[h] * ue - 2.0 * ee[h]).numpy()
        return float(torch.trace(Z[:n0, :n0])), out

    def quad(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q_st = Y_s^T Z Y_t (m x m) for s, t in {1, 2}, and the input rows (Z Y_1)_0, (Z Y_2)_0."""
        n0, d, m = self.n0, self.dim, self.m
        AZ = torch.empty((m, d), dtype=Z.dtype)  # rows u_i^T Z
        for j in range(1, self.layers + 1):
            AZ[self.hidden(j)] = self.tw[j - 1] @ Z[self.block(j - 1)]
        R = torch.empty((m, m), dtype=Z.dtype)  # u_i^T Z u_k
        for k in range(1, self.layers + 1):
            R[:, self.hidden(k)] = AZ[:, self.block(k - 1)] @ self.tw[k - 1].T
        R = _sym(R)
        Pm = AZ[:, n0:]  # u_i^T Z e_k
        T = Z[n0:, n0:]  # e_i^T Z e_k
        (sr, sc), (dr, dc) = self.sab_rc, self.dba_rc
        SP = sr * Pm
        Q11 = sr * R * sc - 2.0 * (SP + SP.T) + 4.0 * T
        Q12 = (sr * R - 2.0 * Pm.T) * dc
        Q22 = dr * R * dc
        Z1 = AZ[:, :n0].T * sc - 2.0 * Z[:n0, n0:]
        Z2 = AZ[:, :n0].T * dc
        return Q11, Q12, Q22, Z1, Z2

    def repair_scales(self, Z: torch.Tensor) -> torch.Tensor | None:
        """For a positive semidefinite Z that breaks some constraints <C_i, Z> >= 0 (the
        infeasible-primal iterate): a diagonal D (as a vector) with X' = D Z D feasible:
        1 on the input block and per neuron the s_i >= 0 nearest 1 with <C_i, X'> >= 0, layer
        by layer (neuron i's constraint reads the scales of layer j - 1 and its own: -2ab q_i +
        2(a+b) p_i s_i - 2 Z_ii s_i^2, q_i and p_i from the scaled layer j - 1), up to rounding
        (REPAIR_ROUNDING of the terms). None when some neuron has no such s_i (possible only when
        ab > 0). In the working precision, like the plain check in the loop."""
        scales = [torch.ones(self.n0, dtype=self.dtype)]
        for j in range(1, self.layers + 1):
            p, q, h = self.block(j - 1), self.block(j), self.hidden(j)
            Wd = self.tw[j - 1] * scales[-1][None, :]  # rows u_i^T D_{j-1}
            qi = torch.einsum("ij,ij->i", Wd @ Z[p, p], Wd)  # u^T D Z D u
            pi = torch.einsum("ij,ji->i", Wd, Z[p, q])  # u^T D Z e_i
            z = torch.diagonal(Z[q, q])
            b, c = self.tsab[h] * pi, self.tpab[h] * qi
            # f(s) / 2 = -z s^2 + b s - c is concave: s = 1 when f(1) >= 0, else the end of
            # {s >= 0: f(s) >= 0} (an interval between the roots) nearest 1. Z_ii = 0 leaves row i
            # of the semidefinite Z zero, so b = 0 there: f does not depend on s, and s = 1. Every
            # f(s) >= 0 is then checked, up to the rounding of its terms (a neuron on the edge of
            # its slope interval has a double root)
            sq = torch.sqrt(torch.clamp(b * b - 4.0 * z * c, min=0.0))
            zz = (2.0 * z).clamp(min=1e-300)
            lo, hi = torch.clamp((b - sq) / zz, min=0.0), (b + sq) / zz
            one = torch.ones_like(z)
            s = torch.where((z > 0) & (b - z - c < 0), torch.minimum(torch.maximum(lo, one), hi.clamp(min=0.0)), one)
            terms = z * s * s + b.abs() * s + c.abs()
            if not bool(torch.all(-z * s * s + b * s - c >= -REPAIR_ROUNDING[self.dtype] * terms)):
                return None
            scales.append(s)
        return torch.cat(scales)

    def repaired_bound(self, Z: torch.Tensor) -> float | None:
        """<C0, X'> / tr X'_00 for X' = D Z D of repair_scales: X' is positive semidefinite and
        feasible, so by weak duality a lower bound on the optimum; None if Z cannot be repaired."""
        D = self.repair_scales(Z)
        trE = float(torch.trace(Z[: self.n0, : self.n0]))
        if D is None or not trE > 0:
            return None
        last = self.block(self.layers)
        Wl = self.tw[-1] * D[last][None, :]
        return float(torch.einsum("ij,ij->", Wl @ Z[last, last], Wl)) / trE

    def c0(self, Z: torch.Tensor) -> float:
        """<C0, Z> = <W_l^T W_l, Z_ll>."""
        last, Wl = self.block(self.layers), self.tw[-1]
        return float(torch.einsum("ij,ij->", Wl @ Z[last, last], Wl))

    def to_original(self, lam: np.ndarray) -> list[np.ndarray]:
        return [self.kappa2 * lam[self.hidden(j)] / self.scales[j - 1] ** 2 for j in range(1, self.layers + 1)]

    def from_original(self, lams: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([lams[j - 1] * self.scales[j - 1] ** 2 for j in range(1, self.layers + 1)]) / self.kappa2


class _BT:
    """A symmetric block-tridiagonal matrix over the layer blocks: diagonal blocks D[k] and
    sub-diagonal blocks B[k] = S[k+1, k]. Its Cholesky factor has the same block pattern, so
    factorising, solving and multiplying cost O(sum n_k^3) and O(d n) per vector, not O(d^3)."""

    def __init__(self, work: "_Work", D: list[torch.Tensor], B: list[torch.Tensor]):
        self.work, self.D, self.B = work, D, B
        self.Ld: list[torch.Tensor] = []
        self.Lo: list[torch.Tensor] = []
        self._Li: list[torch.Tensor] | None = None

    def factor(self) -> bool:
        Ld, Lo = [], []
        A = self.D[0]
        for k in range(len(self.D)):
            if k > 0:
                sub = torch.linalg.solve_triangular(Ld[k - 1], self.B[k - 1].T, upper=False).T  # B L^-T
                Lo.append(sub)
                A = self.D[k] - sub @ sub.T
            Lk, info = torch.linalg.cholesky_ex(A)
            if int(info) != 0:
                return False
            Ld.append(Lk)
        self.Ld, self.Lo, self._Li = Ld, Lo, None
        return True

    @property
    def Li(self) -> list[torch.Tensor]:
        """The inverses of the diagonal Cholesky blocks, formed on first use: substitution is then
        matrix products, 2-4x faster than triangular solves at these sizes (measured on 256-row
        blocks with 1280 right-hand sides), and the same steps and values on the bench problems."""
        if self._Li is None:
            self._Li = [torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype), upper=False) for L in self.Ld]
        return self._Li

    def logdet(self) -> float:
        return 2.0 * sum(float(torch.log(torch.diagonal(L)).sum()) for L in self.Ld)

    def lsolve(self, R: torch.Tensor) -> torch.Tensor:
        """L^-1 R."""
        w = self.work
        Z = torch.empty_like(R)
        for k in range(len(self.Ld)):
            r = R[w.block(k)]
            if k > 0:
                r = r - self.Lo[k - 1] @ Z[w.block(k - 1)]
            Z[w.block(k)] = self.Li[k] @ r
        return Z

    def usolve(self, Z: torch.Tensor) -> torch.Tensor:
        """L^-T Z."""
        w = self.work
        X = torch.empty_like(Z)
        for k in range(len(self.Ld) - 1, -1, -1):
            z = Z[w.block(k)]
            if k < len(self.Ld) - 1:
                z = z - self.Lo[k].T @ X[w.block(k + 1)]
            X[w.block(k)] = self.Li[k].T @ z
        return X

    def inverse(self) -> torch.Tensor:
        """S^-1 = L^-T L^-1, where L^-1 is block lower triangular (its upper blocks are skipped)."""
        w = self.work
        K = len(self.Ld)
        Z = torch.zeros((w.dim, w.dim), dtype=w.dtype)
        for k in range(K):
            rk = w.block(k)
            cols = slice(0, rk.stop)
            r = torch.zeros((rk.stop - rk.start, rk.stop), dtype=w.dtype)
            r[:, rk] = torch.eye(rk.stop - rk.start, dtype=w.dtype)
            if k > 0:
                r[:, : rk.start] -= self.Lo[k - 1] @ Z[w.block(k - 1), : rk.start]
            Z[rk, cols] = self.Li[k] @ r
        return _sym(self.usolve(Z))

    def lmul(self, X: torch.Tensor) -> torch.Tensor:
        """S @ X for a dense X, block row by block row (contiguous row slices)."""
        w = self.work
        out = torch.empty_like(X)
        K = len(self.D)
        for q in range(K):
            acc = self.D[q] @ X[w.block(q)]
            if q > 0:
                acc += self.B[q - 1] @ X[w.block(q - 1)]
            if q < K - 1:
                acc += self.B[q].T @ X[w.block(q + 1)]
            out[w.block(q)] = acc
        return out

    def inner(self, X: torch.Tensor) -> float:
        """<S, X> for a symmetric dense X."""
        w = self.work
        total = sum(float(torch.sum(self.D[k] * X[w.block(k), w.block(k)])) for k in range(len(self.D)))
        return total + 2.0 * sum(float(torch.sum(self.B[k] * X[w.block(k + 1), w.block(k)])) for k in range(len(self.B)))

    def plus(self, alpha: float, dS: "_BT") -> "_BT":
        return _BT(self.work, [a + alpha * b for a, b in zip(self.D, dS.D)], [a + alpha * b for a, b in zip(self.B, dS.B)])

    def dense(self) -> torch.Tensor:
        D, B = ([a.double().numpy() for a in blocks] for blocks in (self.D, self.B))
        return torch.from_numpy(block_tridiagonal(D, B)).to(self.work.dtype)


class _DenseS:
    """The same interface as _BT on one dense matrix: fewer, larger operations, which is faster
    below a few hundred rows (each small operation costs about as much as a large one)."""

    def __init__(self, work: "_Work", S: torch.Tensor):
        self.work, self.S = work, S
        self.L: torch.Tensor | None = None

    def factor(self) -> bool:
        L, info = torch.linalg.cholesky_ex(self.S)
        self.L = L if int(info) == 0 else None
        return self.L is not None

    def logdet(self) -> float:
        return 2.0 * float(torch.log(torch.diagonal(self.L)).sum())

    def lsolve(self, R: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.L, R, upper=False)

    def usolve(self, Z: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.L.T, Z, upper=True)

    def inverse(self) -> torch.Tensor:
        return _sym(torch.cholesky_inverse(self.L))

    def lmul(self, X: torch.Tensor) -> torch.Tensor:
        return self.S @ X

    def inner(self, X: torch.Tensor) -> float:
        return float(torch.sum(self.S * X))

    def dense(self) -> torch.Tensor:
        return self.S

    def plus(self, alpha: float, dS: "_DenseS") -> "_DenseS":
        return _DenseS(self.work, self.S + alpha * dS.S)


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
            lh = work.t(lam[h])
            G = Wj.T * (work.tsab[h] * lh)[None, :]
            P = -2.0 * Wj.T @ ((work.tpab[h] * lh)[:, None] * Wj) + G @ torch.linalg.solve(-X, G.T)
        P = _sym(P)
        top = float(torch.linalg.eigvalsh(P)[-1])
        if j == 0:
            return lam, max(top, 0.0)
        # a floor for layers whose P_j vanishes (zero weights): keep the scale of the next layer
        floor = 1e-8 * max(float(P.abs().max()), float(lam[work.hidden(j + 1)][0]) if j < L else 1.0)
        c = max((1.0 + slack) / 2.0 * top, floor, 1e-300)
        lam[work.hidden(j)] = c
        X = P - 2.0 * c * torch.eye(P.shape[0], dtype=P.dtype)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Dense linear algebra helpers
# --------------------------------------------------------------------------------------------


def _chol(A: torch.Tensor) -> torch.Tensor | None:
    L, info = torch.linalg.cholesky_ex(A)
    return L if int(info) == 0 else None


def _lanczos(op, d: int, dtype: torch.dtype, steps: int = 40) -> tuple[float, float]:
    """The extreme Ritz values of the symmetric operator ``op`` (d x 1 -> d x 1) after ``steps``
    Lanczos steps with full reorthogonalisation: the smallest lies above the smallest eigenvalue,
    the largest below the largest."""
    gen = torch.Generator().manual_seed(0)
    steps = min(steps, d)
    V = torch.zeros((d, steps + 1), dtype=dtype)
    v = torch.randn((d, 1), generator=gen, dtype=F64).to(dtype)
    V[:, :1] = v / torch.linalg.norm(v)
    alphas, betas = [], []
    for k in range(steps):
        w = op(V[:, k : k + 1])
        a = float(V[:, k] @ w[:, 0])
        w = w - V[:, : k + 1] @ (V[:, : k + 1].T @ w)  # full reorthogonalisation, twice
        w = w - V[:, : k + 1] @ (V[:, : k + 1].T @ w)
        alphas.append(a)
        bk = float(torch.linalg.norm(w))
        if bk <= 1e-13 * max(max(abs(t) for t in alphas), 1e-300):
            break
        betas.append(bk)
        V[:, k + 1 : k + 2] = w / bk
    n = len(alphas)
    T = np.diag(alphas) + np.diag(betas[: n - 1], 1) + np.diag(betas[: n - 1], -1)
    ev = np.linalg.eigvalsh(T)
    return float(ev[0]), float(ev[-1])


def _step_from(lo: float) -> float:
    return -1.0 / lo if lo < 0 else math.inf


# A block Krylov estimate of the smallest eigenvalue of a small dense symmetric matrix: KRYLOV_BLOCK
# random vectors and KRYLOV_POWERS products with the matrix, then Rayleigh-Ritz. It costs about
# two thirds of a dense eigenvalue problem at d ~ 100 (whose tridiagonalisation is memory-bound)
# and, measured on the step lengths of the bench MLPs, is within 0.3% of the exact step wherever
# that is below 1.2. A Ritz value lies above the smallest eigenvalue, so the step is an
# over-estimate: callers confirm it by a Cholesky factorisation and fall back to the exact value.
KRYLOV_BLOCK = 8
KRYLOV_POWERS = 4
_KRYLOV_START: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _extremes(B: torch.Tensor, exact: bool) -> tuple[float, float]:
    """The smallest and largest eigenvalue of a small dense symmetric B, exact or estimated."""
    d = B.shape[0]
    if exact or d <= 2 * KRYLOV_BLOCK * (KRYLOV_POWERS + 1):
        ev = torch.linalg.eigvalsh(B)
        return float(ev[0]), float(ev[-1])
    V = _KRYLOV_START.get((d, B.dtype))
    if V is None:
        V = torch.randn((d, KRYLOV_BLOCK), generator=torch.Generator().manual_seed(0), dtype=F64).to(B.dtype)
        _KRYLOV_START[(d, B.dtype)] = V
    blocks = []
    for k in range(KRYLOV_POWERS + 1):
        V = V / torch.linalg.vector_norm(V, dim=0, keepdim=True)
        blocks.append(V)
        if k < KRYLOV_POWERS:
            V = B @ V
    Q = torch.linalg.qr(torch.cat(blocks, dim=1))[0]
    ev = torch.linalg.eigvalsh(_sym(Q.T @ B @ Q))
    return float(ev[0]), float(ev[-1])


def _max_step(L: torch.Tensor, D: torch.Tensor, exact: bool = False) -> float:
    """The largest alpha with L L^T + alpha D >= 0 (inf if D >= 0), from the smallest eigenvalue of
    L^-1 D L^-T: exact with ``exact``, else an estimate (block Krylov for small d, Lanczos above)
    that can only be too large."""
    d = L.shape[0]
    if d <= EXACT_STEP_DIM:
        B = torch.linalg.solve_triangular(L, D, upper=False)
        B = torch.linalg.solve_triangular(L, B.T, upper=False)
        return _step_from(_extremes(_sym(B), exact)[0])

    def op(v):
        w = torch.linalg.solve_triangular(L.T, v, upper=True)
        return torch.linalg.solve_triangular(L, D @ w, upper=False)

    return _step_from(_lanczos(op, d, L.dtype)[0])


def _dual_extremes(S: "_BT", dS: "_BT", exact: bool = False) -> tuple[float, float]:
    """The extreme eigenvalues of L^-1 dS L^-T (S = L L^T factorised), estimated unless ``exact``
    (the smallest from above, the largest from below)."""
    d = S.work.dim
    if d <= EXACT_STEP_DIM:
        B = S.lsolve(dS.dense())
        return _extremes(_sym(S.lsolve(B.T)), exact)
    return _lanczos(lambda v: S.lsolve(dS.lmul(S.usolve(v))), d, S.work.dtype)


def _max_step_bt(S: "_BT", dS: "_BT", exact: bool = False) -> float:
    """The largest alpha with S + alpha dS >= 0, as _max_step."""
    return _step_from(_dual_extremes(S, dS, exact)[0])


def _accepted_step(step: float, accept, exact_step, shrink: float):
    """(step, accept(step)) for the first step that ``accept`` takes (it returns None to refuse):
    ``step``, then once ``exact_step()`` when given and shorter (``step`` came from an estimate that
    can be too long), then ``shrink`` times shorter each time; (step, None) after 30 refusals."""
    for _ in range(30):
        out = accept(step)
        if out is not None:
            return step, out
        if exact_step is not None:
            retry, exact_step = exact_step(), None
            if retry < step:
                step = retry
                continue
        step *= shrink
    return step, None


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


def _dual_bound(work: _Work, X: torch.Tensor, QX, grp) -> float:
    """The lower bound on rho that X proves (-inf if none): <C0, X> / tr X_00 when X is feasible
    (``grp`` sums <C_i, X> per multiplier group), else that of its repair (see the module
    docstring's Certificate)."""
    trE = float(torch.trace(X[: work.n0, : work.n0]))
    if trE > 0 and np.all(grp(_diag_C(QX)) >= 0):
        return work.c0(X) / trE
    repaired = work.repaired_bound(X)  # the primal is infeasible until a full step
    return -math.inf if repaired is None else repaired


def _diag_C(Q) -> np.ndarray:
    """(<C_i, Z>)_i from ``quad(Z)``: C_i = -1/2 y1 y1^T + 1/2 y2 y2^T."""
    return (0.5 * (torch.diagonal(Q[2]) - torch.diagonal(Q[0]))).numpy()


def _sym(A: torch.Tensor) -> torch.Tensor:
    return (A + A.T).mul_(0.5)


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

    Options: tol (relative duality gap on rho at which to stop, 1e-6: the bound sqrt(rho) is then
    within 5e-7 of the LipSDP optimum), max_iter (60), time_limit (seconds, None), scale (rescale
    the layers, True), init (multipliers in the original coordinates to start from, when strictly
    feasible), threads (BLAS threads for torch during the solve; default_threads: one below
    PARALLEL_DIM rows), progress (a callable ``progress(iteration, value, gap)`` called at every
    step; value is sqrt(rho), not verified),
    target (stop as soon as sqrt(rho) <= target: status "target"), start_factor (the start's rho
    over the smallest feasible one for its multipliers, START_FACTOR; closer to 1 resumes from
    good multipliers without giving much of their value back), precision ("mixed": float32 steps
    while the gap is above max(tol, SINGLE_GAP) on problems above DENSE_DIM rows, then float64;
    "double": float64 throughout).

    Returns (multipliers, info): one nonnegative array per hidden layer in the coordinates of
    ``problem`` (constant per layer for "layer"), or None when no strictly feasible point was
    found; info has status ("optimal", "target", "max_iter", "time_limit", "stalled", "failed: ..."),
    iterations, gap (relative duality gap on rho proven by a dual feasible point; inf if none),
    solver_value (sqrt of the solver's rho), lower_value (sqrt of the dual bound: no multipliers of
    this variant give less), start_value (the value of the layer-wise start: one multiplier per
    layer by backward block elimination, as in ECLipsE-Fast; a looser bound), interior (those
    start multipliers, strictly feasible), restarted (whether a stall forced a restart),
    single_steps (how many steps ran in float32: see SINGLE_GAP and the option precision, "mixed"
    or "double"), time_s,
    method.
    Every iterate is strictly feasible, so a stop on max_iter or time_limit still returns
    multipliers that verify.
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
    target = opts.get("target")  # stop once sqrt(rho) <= target (every iterate's rho is feasible)
    report = opts.get("progress")  # called as report(iteration, sqrt(rho), gap) at every step
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
        # used only when strictly feasible; else the layer-wise start stands
        if np.all(cand > 0) and np.all(np.isfinite(cand)) and _min_rho(work, cand) is not None:
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
    info["start_value"] = math.sqrt(rho * work.kappa2)  # the layer-wise (ECLipsE-Fast-style) start
    info["interior"] = work.to_original(lam)  # strictly feasible, well inside: see solve.verify_best
    start = _centred_start(work, theta, lam, rho, float(opts.get("start_factor", START_FACTOR)))
    if start is None:
        return done("failed: start not strictly feasible")
    rho, S, Sinv, X, LX, x = start
    n0, d, p = work.n0, work.dim, theta.size
    nu = d + p
    precision = opts.get("precision", "mixed")
    if precision not in ("mixed", "double"):
        raise ValueError(f"The 'precision' option of solve() must be 'mixed' or 'double'. Got {precision!r} instead.")
    single_until = max(float(tol), SINGLE_GAP)  # float32 steps while the gap is above this
    if precision == "mixed" and d > DENSE_DIM:
        moved = _with_dtype(work, F32, rho, theta if P is None else P @ theta, X)
        if moved is not None:
            S, Sinv, X, LX = moved
    single_steps = 0
    short_steps, restarted = 0, False
    b = np.zeros(p + 1)
    b[0] = -1.0
    low_best = -math.inf
    status = "max_iter"
    it = 0
    gap = math.inf
    grp = (lambda v: v) if P is None else (lambda v: P.T @ v)
    t_step = t_start
    def to_double() -> bool:
        """Continue in float64 from the current point (the float32 certificates are dropped: the
        dual bound is recomputed in float64); False if the point is not positive definite there."""
        nonlocal S, Sinv, X, LX, low_best, rho
        # S was positive definite in float32; in float64 it can fall just short (seen on
        # mnist_relu_9_200 at a gap of 1e-2): rho a little larger (a feasible, slightly worse point)
        for bump in (0.0, 1e-6, 1e-5, 1e-4, 1e-3):
            moved = _with_dtype(work, F64, rho * (1.0 + bump), theta if P is None else P @ theta, X)
            if moved is not None:
                break
        else:
            return False
        rho *= 1.0 + bump
        S, Sinv, X, LX = moved
        low_best = -math.inf
        return True

    while True:
        # ---- certificate from the current X (<C_i, X> is on the diagonal of Y^T X Y) ----
        QX = work.quad(X)
        low_best = max(low_best, _dual_bound(work, X, QX, grp))
        # relative gap; in working units the start has rho ~ 1, which bounds the scale from below
        gap = (rho - low_best) / max(rho, 1e-9) if low_best > -math.inf else math.inf
        if work.dtype == F32 and gap <= single_until:
            if to_double():
                continue  # the certificate again, in float64
            status = "stalled"
            break
        mu = (S.inner(X) + float(x @ theta)) / nu
        log.debug("it %d rho %.12g low %.12g gap %.3g mu %.3g", it, rho, low_best, gap, mu)
        if report is not None:
            report(it, math.sqrt(max(rho, 0.0) * work.kappa2), gap)
        if gap <= tol:
            status = "optimal"
            break
        if target is not None and rho * work.kappa2 <= target * target:
            status = "target"  # the caller needs no smaller value (certify: the pair no longer decides a radius)
            break
        if it >= max_iter:
            break
        # stop at the limit, or before a step that would end past it (the last step's length)
        now = time.perf_counter()
        # (before the first step, the start's time: about two steps)
        if time_limit is not None and now - t_start + (now - t_step if it else 0.5 * (now - t_start)) > time_limit:
            status = "time_limit"
            break
        t_step = now
        it += 1
        single_steps += work.dtype == F32
        # ---- Schur complement M_kl = <A_k, X A_l S^-1> + LP part ----
        if it > 1:
            Sinv = S.inverse()
        QS = work.quad(Sinv)
        trSi, cSi = float(torch.trace(Sinv[:n0, :n0])), _diag_C(QS)
        M_ll = 0.25 * (QX[0] * QS[0] + QX[2] * QS[2] - QX[1] * QS[1] - (QX[1] * QS[1]).T)
        M_rl = 0.5 * (torch.einsum("ij,ij->j", QS[3], QX[3]) - torch.einsum("ij,ij->j", QS[4], QX[4]))
        M_rr = float(torch.sum(X[:n0, :n0] * Sinv[:n0, :n0]))
        del QS, QX
        M_ll, M_rl = M_ll.numpy(), M_rl.numpy()
        if P is not None:
            M_ll, M_rl = P.T @ M_ll @ P, P.T @ M_rl
        M = np.empty((p + 1, p + 1))
        M[0, 0], M[0, 1:], M[1:, 0], M[1:, 1:] = M_rr, M_rl, M_rl, M_ll
        M[np.arange(1, p + 1), np.arange(1, p + 1)] += x / theta
        fac = _factor(M)
        if fac is None:
            if work.dtype == F32 and to_double():
                continue
            status = "stalled"
            break

        def direction(rhs: np.ndarray):
            dy = _fsolve(fac, rhs)
            dlam = dy[1:] if P is None else P @ dy[1:]
            return dy, work.S_bt(dy[0], dlam, const=False)

        # predictor: dX = -X - sym(S^-1 dS X), with S^-1 dS = (dS S^-1)^T formed once per
        # direction from the S^-1 of the Schur complement (fewer operations than substituting
        # for each product: measured 10% faster steps on 1280 rows)
        dy, dS = direction(b)
        G = dS.lmul(Sinv).T
        dX = -X - _sym(G @ X)
        dth = dy[1:]
        dx = -x - x * dth / theta
        # predictor step lengths, for sigma only, from one eigenvalue estimate: the dual one from
        # the smallest eigenvalue of L^-1 dS L^-T, the primal one from its largest (exact on the
        # central path, where X = mu S^-1 and X + a dX = mu S^-1/2 ((1 - a) I - a S^-1/2 dS
        # S^-1/2) S^-1/2; measured on the bench MLPs: 1-3 fewer steps than exact primal steps)
        lo, hi = _dual_extremes(S, dS)
        ap = min(1.0, _step_from(-1.0 - hi), _max_step_vec(x, dx))
        ad = min(1.0, _step_from(lo), _max_step_vec(theta, dth))
        Xa = X + ap * dX
        mu_aff = (S.inner(Xa) + ad * dS.inner(Xa) + float((x + ap * dx) @ (theta + ad * dth))) / nu
        del Xa
        expon = max(1.0, 3.0 * min(ap, ad) ** 2)
        sigma = min(1.0, max(mu_aff / mu, 0.0) ** expon)
        # corrector, with the second-order term Wc = sym(dX_a dS_a S^-1)
        Wc = _sym(G @ dX)
        trW, cW = work.apply_C(Wc)
        smu = sigma * mu
        rhs = np.empty(p + 1)
        rhs[0] = -1.0 + smu * trSi - trW
        rhs[1:] = -smu * (grp(cSi) - 1.0 / theta) + grp(cW) - dx * dth / theta
        dx_a, dth_a = dx, dth
        dy, dS = direction(rhs)
        dth = dy[1:]
        G = dS.lmul(Sinv).T
        dX = smu * Sinv - X - Wc - _sym(G @ X)
        del G
        del Wc
        dx = smu / theta - x - dx_a * dth_a / theta - x * dth / theta
        # a cone that allows 1 / 0.99 takes a full step (one Cholesky decides it, before any
        # eigenvalue problem); the others gamma x their largest step, first from an estimate
        full = 1.0 / 0.99
        ap_vec, ad_vec = _max_step_vec(x, dx), _max_step_vec(theta, dth)
        p_full = ap_vec >= full and _chol(X + full * dX) is not None
        d_full = ad_vec >= full and S.plus(full, dS).factor()
        ap = full if p_full else min(ap_vec, _max_step(LX, dX))
        ad = full if d_full else min(ad_vec, _max_step_bt(S, dS))
        gamma = 0.9 + 0.09 * min(ap, ad, 1.0)
        ap = 1.0 if p_full else min(1.0, gamma * ap)
        ad = 1.0 if d_full else min(1.0, gamma * ad)
        # primal and dual steps: X and S stay positive definite in floating point
        def primal(a: float):
            X_a = _sym(X + a * dX)
            L_a = _chol(X_a)
            return None if L_a is None else (X_a, L_a)

        def dual(a: float):
            th_a, S_a = theta + a * dth, S.plus(a, dS)
            return (th_a, rho + a * dy[0], S_a) if np.all(th_a > 0) and S_a.factor() else None

        # a step from a block Krylov estimate that X or S refuses: gamma x the exact one instead
        def exact_primal() -> float:
            return min(1.0, gamma * min(ap_vec, _max_step(LX, dX, exact=True)))

        def exact_dual() -> float:
            return min(1.0, gamma * min(ad_vec, _max_step_bt(S, dS, exact=True)))

        estimated = d <= EXACT_STEP_DIM  # above, Lanczos: no exact value to fall back to
        ap, p_new = _accepted_step(ap, primal, exact_primal if estimated and not p_full else None, 0.8)
        ad, d_new = _accepted_step(ad, dual, exact_dual if estimated and not d_full else None, 0.5)
        if p_new is None or d_new is None:
            if work.dtype == F32 and to_double():
                continue
            status = "stalled"
            break
        (X, LX), (theta, rho, S) = p_new, d_new
        x = x + ap * dx
        log.debug("   ap %.3f ad %.3f sigma %.3g", ap, ad, sigma)
        short_steps = short_steps + 1 if min(ap, ad) < 0.5 else 0
        if short_steps >= STALL_STEPS and not restarted:
            # stalled far from the central path: start again, centred, from the current multipliers
            lam = theta if P is None else P @ theta
            rho_min = _min_rho(work, lam)
            start = _centred_start(work, theta, lam, rho_min, RESTART_FACTOR) if rho_min is not None else None
            if start is not None:
                rho, S, Sinv, X, LX, x = start
                log.debug("   restart at rho %.12g", rho)
            restarted, short_steps = True, 0

    if work.dtype == F32:
        # stopped in the float32 phase (target, time or iteration limit): the dual bound in float64
        X64 = X.to(F64)
        work.set_dtype(F64)
        low_best = _dual_bound(work, X64, work.quad(X64), grp)
        gap = (rho - low_best) / max(rho, 1e-9) if low_best > -math.inf else math.inf
    lam = theta if P is None else P @ theta
    mult = work.to_original(lam)
    if variant == "layer":
        mult = [np.full(v.shape, float(np.mean(v))) for v in mult]
    return done(
        status,
        mult,
        iterations=it,
        restarted=restarted,
        single_steps=single_steps,
        gap=float(gap),
        solver_value=math.sqrt(max(rho, 0.0) * work.kappa2),
        lower_value=math.sqrt(max(low_best, 0.0) * work.kappa2) if low_best > -math.inf else None,
    )


def solve(problem: LipSDPProblem, variant: str = "neuron", **opts) -> tuple[list[np.ndarray] | None, dict]:
    threads = opts.pop("threads", None)
    with torch_threads(int(threads) if threads else default_threads(problem.dim)):
        keep = _read_neurons(problem) if variant == "neuron" else None
        if keep is None:
            return _solve(problem, variant, opts)
        if opts.get("init") is not None:
            opts = {**opts, "init": [np.asarray(v)[k] for v, k in zip(expand_multipliers(problem, opts["init"]), keep)]}
        lams, info = _solve(_restrict(problem, keep), variant, opts)
        info["dropped"] = int(sum(int((~k).sum()) for k in keep))
        if info.get("interior") is not None:
            info["interior"] = _expand(info["interior"], keep)
        return (None if lams is None else _expand(lams, keep)), info


# Presolve: neurons that no later layer reads (all outgoing weights zero; e.g. the border of a
# strided convolution's input that its kernel never covers: 232 of 1800 in cifar10_small). They do
# not change the network, and they only hurt LipSDP (their term in the Schur complement is
# -lambda_i (b - a)^2 / 2 u_i u_i^T), whose optimum is approached as lambda_i -> 0; but they make
# the problem degenerate for an interior-point method. They are solved without and get a tiny
# positive multiplier back (the float64 verification decides what it costs: about 1e-9).
DROPPED_MULTIPLIER = 1e-9


def _read_neurons(problem: LipSDPProblem) -> list[np.ndarray] | None:
    """Per hidden layer, the mask of neurons that a later layer reads (from the last hidden layer
    back, so that neurons read only by dropped ones are dropped too); None when none is dropped
    or a whole layer would go."""
    L = len(problem.weights) - 1
    keep: list[np.ndarray] = [np.ones(0, bool)] * L
    reader = problem.weights[L]
    for j in range(L, 0, -1):  # hidden layer j is read by weights[j] (rows: the kept neurons of layer j + 1)
        keep[j - 1] = np.any(reader != 0, axis=0)
        reader = problem.weights[j - 1][keep[j - 1]]
    if all(k.all() for k in keep) or not all(k.any() for k in keep):
        return None
    return keep


def _restrict(problem: LipSDPProblem, keep: list[np.ndarray]) -> LipSDPProblem:
    W = problem.weights
    L = len(W) - 1
    weights = [W[0][keep[0]]] + [W[j][keep[j]][:, keep[j - 1]] for j in range(1, L)] + [W[L][:, keep[L - 1]]]
    return LipSDPProblem(weights, [a[k] for a, k in zip(problem.alphas, keep)], [b[k] for b, k in zip(problem.betas, keep)], problem.names)


def _expand(lams: list[np.ndarray], keep: list[np.ndarray]) -> list[np.ndarray]:
    out = []
    for lam, k in zip(lams, keep):
        full = np.full(k.size, DROPPED_MULTIPLIER * max(float(np.max(lam)), 1e-300))
        full[k] = lam
        out.append(full)
    return out


solve.__doc__ = _solve.__doc__


def _centred_start(work: _Work, theta: np.ndarray, lam: np.ndarray, rho_min: float, factor: float):
    """(rho, S, S^-1, X, chol X, x) at rho = factor * rho_min with X = xi S^-1, x = xi / theta,
    tr X_00 = 1: a point on the central path of the current multipliers; None if S is singular."""
    rho = factor * rho_min + 1e-12
    S = work.S_bt(rho, lam)
    if not S.factor():
        return None
    Sinv = S.inverse()
    xi = 1.0 / float(torch.trace(Sinv[: work.n0, : work.n0]))
    X = xi * Sinv
    return rho, S, Sinv, X, _chol(X), xi / theta


def _with_dtype(work: _Work, dtype: torch.dtype, rho: float, lam: np.ndarray, X: torch.Tensor):
    """Move the working problem and the current point to ``dtype``: (S, S^-1, X, chol X), or None
    (work back in float64) when S or X is not numerically positive definite in ``dtype``."""
    work.set_dtype(dtype)
    S = work.S_bt(rho, lam)
    X = X.to(dtype)
    LX = _chol(X)
    if LX is None or not S.factor():
        work.set_dtype(F64)
        return None
    return S, S.inverse(), X, LX


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
