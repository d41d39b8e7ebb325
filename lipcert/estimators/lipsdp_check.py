"""A block-scaled variant of the float64 proof in ``sdp_problem.verify`` (a proposal).

``verify`` proves M(rho, lambda) <= 0 by a Cholesky factorisation of -M - delta I, with one
rounding allowance delta for the whole matrix: gamma_n ||C_abs||_F for the assembly plus
gamma_{d+1} d max|diag M| for the factorisation. On real networks the multipliers of different
layers differ by up to ten decades (ACAS Xu: 1e-2 .. 1e10 at the LipSDP optimum), so delta, set
by the largest layer, exceeds the smallest eigenvalues that belong to the smallest layers, and
the proof fails for every good multiplier (measured: all three ACAS Xu networks and
mnist-net_256x2; see benchmarks/RESULTS.md, "LipSDP at scale").

The fix: prove D M D <= 0 instead, with D = diag(2^k_i) chosen so that D M D has unit-order
diagonal. Multiplying by powers of two is exact in floating point, D M D <= 0 iff M <= 0, and the
same two allowances computed for D M D (from D C_abs D and diag(D M D)) are now relative to
each block's own magnitude. Everything else is verify()'s procedure unchanged: the Schur
complement gives rho*, and relative margins 1e-9 .. 1e-3 are tried in turn.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from .base import SAFETY
from .sdp_problem import EPS, LipSDPProblem, Verified, expand_multipliers


def _gamma(k: int) -> float:
    return k * EPS / (1 - k * EPS)


def verify_block_scaled(problem: LipSDPProblem, lambdas: list[np.ndarray] | np.ndarray) -> Verified:
    """verify(), with the final Cholesky proof done on D M D (D = diag of powers of two)."""
    if problem.n_hidden == 0:
        return Verified(False, None, None, "no hidden layer: use the exact norm")
    lams = expand_multipliers(problem, lambdas)
    if len(lams) != len(problem.widths) - 1 or any(lam.shape != (n,) for lam, n in zip(lams, problem.widths[1:])):
        return Verified(False, None, None, "multipliers do not match the layer widths")
    if not all(np.isfinite(lam).all() for lam in lams):
        return Verified(False, None, None, "multipliers are not finite")
    lams = [np.maximum(lam, 0.0) for lam in lams]
    C = problem.assemble(lams)
    n0, d = problem.widths[0], problem.dim
    try:
        chol = scipy.linalg.cho_factor(-C[n0:, n0:], lower=True, check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        return Verified(False, None, None, "the multipliers leave the hidden block not negative definite")
    schur = C[:n0, :n0] + C[:n0, n0:] @ scipy.linalg.cho_solve(chol, C[n0:, :n0], check_finite=False)
    rho_star = float(scipy.linalg.eigvalsh((schur + schur.T) / 2, subset_by_index=[n0 - 1, n0 - 1], check_finite=False)[0])
    if not math.isfinite(rho_star):
        return Verified(False, None, None, "the Schur complement is not finite")
    rho_star = max(rho_star, 0.0)
    absC = problem.assemble(lams, absolute=True)
    n_max = max(problem.widths) + 2
    scale = max(rho_star, float(np.abs(np.diag(C)).max()), 1e-300)
    idx = np.arange(n0)
    for rel in (SAFETY, 1e-7, 1e-5, 1e-3):
        rho = rho_star * (1.0 + rel) + rel * 1e-12 * scale
        M = C.copy()
        M[idx, idx] -= rho
        dg = np.abs(np.diag(M))
        dg[~(dg > 0)] = 1.0
        D = np.exp2(-np.round(np.log2(np.sqrt(dg))))  # exact scaling
        MD = M * D[:, None] * D[None, :]
        absD = absC * D[:, None] * D[None, :]
        absD[idx, idx] += rho * D[:n0] ** 2
        delta = _gamma(n_max) * float(np.linalg.norm(absD, "fro")) + _gamma(d + 1) * d * float(np.abs(np.diag(MD)).max())
        A = -MD
        A[np.diag_indices(d)] -= delta
        try:
            scipy.linalg.cholesky(A, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        return Verified(True, math.sqrt(rho) * (1.0 + SAFETY), rho, f"verified (block-scaled) with relative margin {rel:g}")
    return Verified(False, None, None, "the whole matrix inequality could not be verified in float64, even block-scaled")
