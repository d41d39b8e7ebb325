"""The LipSDP problem of a chain of affine layers and slope-restricted activations, and the
float64 re-verification that turns any solver's multipliers into a proven bound.

Network: f(x) = W_l phi(W_{l-1} ... phi(W_0 x + b_0) ...) + b_l, with hidden layer k (k = 1..l)
of width n_k, and neuron i of every hidden layer slope-restricted in [alpha_i, beta_i].
Coordinates z = (x_0, x_1, ..., x_l): the input and each hidden layer's output. For multipliers
lambda >= 0 (one per hidden neuron; LipSDP-Neuron, or one per layer: LipSDP-Layer),

    M(rho, lambda) = C(lambda) - rho E,    E = diag(I_{n_0}, 0, ..., 0),

where C is block-tridiagonal: for hidden layer j with W = W_{j-1}, T = diag(lambda_j),
    C[j-1, j-1] += -2 W^T (alpha beta T) W,    C[j-1, j] += W^T ((alpha + beta) T),
    C[j, j]     += -2 T,                       C[l, l]   += W_l^T W_l.
If M(rho, lambda) <= 0 then ||f(x) - f(y)||_2 <= sqrt(rho) ||x - y||_2 (Fazlyab et al. 2019).

``verify`` takes the multipliers only and computes the smallest such rho itself.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..graph import Activation, Affine, Graph
from ..config import SAFETY, gamma



@dataclass
class LipSDPProblem:
    """weights[k]: (n_{k+1} x n_k) dense matrices, k = 0..l; alphas/betas[k]: slopes of hidden layer k+1."""

    weights: list[np.ndarray]
    alphas: list[np.ndarray]
    betas: list[np.ndarray]
    names: list[str] = field(default_factory=list)  # lipcert node names, for messages

    def __post_init__(self) -> None:
        if len(self.alphas) != len(self.weights) - 1 or len(self.betas) != len(self.alphas):
            raise ValueError("need one slope interval per hidden layer (len(weights) - 1)")
        for k, w in enumerate(self.weights[:-1]):
            if self.weights[k + 1].shape[1] != w.shape[0] or self.alphas[k].shape != (w.shape[0],):
                raise ValueError(f"layer {k}: shapes do not chain")

    @property
    def widths(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights[:-1]]

    @property
    def n_hidden(self) -> int:
        return sum(self.widths[1:])

    @property
    def dim(self) -> int:
        return sum(self.widths)

    def with_last(self, last: np.ndarray) -> LipSDPProblem:
        """The same network with another last layer (e.g. a row difference for certificates)."""
        return LipSDPProblem([*self.weights[:-1], np.atleast_2d(last)], self.alphas, self.betas, self.names)

    def assemble(self, lambdas: list[np.ndarray], absolute: bool = False) -> np.ndarray:
        """The dense matrix C(lambda) (or, with ``absolute``, the same sum with |.| of every term,
        which bounds the rounding errors of the assembly): ``assemble_blocks`` put in place."""
        return block_tridiagonal(*self.assemble_blocks(lambdas, absolute))

    def assemble_blocks(self, lambdas: list[np.ndarray], absolute: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """C(lambda) as its blocks: diagonal blocks D[k] (n_k x n_k) and sub-diagonal blocks
        B[k] = C[k + 1, k]; every other block is zero. With ``absolute``, every term is |.|."""
        ab = (lambda v: np.abs(v)) if absolute else (lambda v: v)
        D = [np.zeros((n, n)) for n in self.widths]
        B = []
        for j in range(1, len(self.widths)):
            W = ab(self.weights[j - 1])
            lam = lambdas[j - 1]
            a, b = self.alphas[j - 1], self.betas[j - 1]
            D[j - 1] += W.T @ (ab(-2.0 * a * b * lam)[:, None] * W)
            B.append(W * ab((a + b) * lam)[:, None])
            D[j][np.diag_indices(self.widths[j])] += ab(-2.0 * lam)
        Wl = ab(self.weights[-1])
        D[-1] += Wl.T @ Wl
        return D, B


def block_tridiagonal(D: list[np.ndarray], B: list[np.ndarray]) -> np.ndarray:
    """The dense symmetric matrix with diagonal blocks D[k] and sub-diagonal blocks B[k] (= its
    block (k + 1, k)); every other block is zero."""
    offsets = np.concatenate([[0], np.cumsum([len(Dk) for Dk in D])])
    C = np.zeros((offsets[-1], offsets[-1]))
    for k, Dk in enumerate(D):
        C[offsets[k] : offsets[k + 1], offsets[k] : offsets[k + 1]] = Dk
    for k, Bk in enumerate(B):
        C[offsets[k + 1] : offsets[k + 2], offsets[k] : offsets[k + 1]] = Bk
        C[offsets[k] : offsets[k + 1], offsets[k + 1] : offsets[k + 2]] = Bk.T
    return C


def layer_scales(problem: LipSDPProblem) -> list[float]:
    """Each layer's spectral norm: dividing by them balances magnitudes that span many decades."""
    return [max(float(np.linalg.norm(w, 2)), 1e-300) for w in problem.weights]


def scaled(problem: LipSDPProblem, c: list[float]) -> LipSDPProblem:
    return dataclasses.replace(problem, weights=[w / ck for w, ck in zip(problem.weights, c)])


def unscale_multipliers(lams: list[np.ndarray], c: list[float]) -> list[np.ndarray]:
    """Multipliers of the layer-normalised problem -> multipliers of the original one.

    With S_k = c_0 ... c_{k-1} and x_k = S_k x'_k, the original quadratic form is S_{l+1}^2 times
    the scaled one with rho' = rho / S_{l+1}^2 and lambda'_k = S_k^2 lambda_k / S_{l+1}^2."""
    logs = np.cumsum(np.log(c))  # logs[k] = log(c_0 ... c_k)
    total = logs[-1]
    return [lam * math.exp(2 * (total - logs[k - 1])) for k, lam in enumerate(lams, start=1)]


@dataclass
class Verified:
    ok: bool
    value: float | None  # proven bound on the l2 Lipschitz constant (sqrt(rho) with margins)
    rho: float | None
    reason: str = ""
    margin: float | None = None  # the relative margin on rho that the proof needed


def expand_multipliers(problem: LipSDPProblem, lambdas: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """Accept one array per layer (per-neuron or a scalar per layer) or one flat vector."""
    widths = problem.widths[1:]
    if isinstance(lambdas, np.ndarray) and lambdas.ndim == 1 and len(lambdas) == sum(widths):
        return np.split(np.asarray(lambdas, np.float64), np.cumsum(widths)[:-1])
    out = []
    for lam, n in zip(lambdas, widths):
        lam = np.asarray(lam, np.float64).ravel()
        out.append(np.full(n, lam[0]) if lam.size == 1 else lam)
    return out


def verify(problem: LipSDPProblem, lambdas: list[np.ndarray] | np.ndarray) -> Verified:
    """Recompute, in float64, the smallest rho for which M(rho, lambda) <= 0 is proven.

    1. lambda must be finite and >= 0 (negative entries are clipped to 0: still a valid choice).
    2. The hidden block C22 must be negative definite: then M <= 0 iff
       rho >= lambda_max(C11 - C12 C22^-1 C21)  (Schur complement; one eigenvalue problem).
    3. The candidate rho (with a small relative margin) is then *checked* on the whole matrix by a
       Cholesky factorisation of -D M D - delta I (D: exact powers of two that balance the
       diagonal), where delta covers the rounding errors of assembling M and of the factorisation
       itself (|dM| <= gamma_n |terms|; Cholesky backward error <= gamma_{d+1} d max diag).
       Success proves M <= 0 for the exact-arithmetic matrix.
    M is block-tridiagonal over the layers, and so is its Cholesky factor (no fill): both steps
    work on the blocks, O(sum n_k^3) instead of O(d^3). The factorisation is the dense one with
    its structural zeros skipped (they are exact: every product that would fill them is 0 x l), so
    its backward error bound is the dense one.
    """
    if problem.n_hidden == 0:
        return Verified(False, None, None, "no hidden layer: use the exact norm")
    lams = expand_multipliers(problem, lambdas)
    if any(lam.shape != (n,) for lam, n in zip(lams, problem.widths[1:])) or len(lams) != len(problem.widths) - 1:
        return Verified(False, None, None, "multipliers do not match the layer widths")
    if not all(np.isfinite(lam).all() for lam in lams):
        return Verified(False, None, None, "multipliers are not finite")
    lams = [np.maximum(lam, 0.0) for lam in lams]
    import scipy.linalg  # here: `lipcert bound` with other methods need not wait for scipy

    D, B = problem.assemble_blocks(lams)
    K = len(D)
    # -C22 > 0, eliminated from the last layer back: Q_k = -D_k - B_k^T Q_{k+1}^-1 B_k; then the Schur
    # complement of the input block is C11 + C12 (-C22)^-1 C21 = D_0 + B_0^T Q_1^-1 B_0
    def eliminated(Q: np.ndarray, k: int) -> np.ndarray:  # B_k^T Q^-1 B_k, with Q > 0 checked on the way
        return B[k].T @ scipy.linalg.cho_solve(scipy.linalg.cho_factor(Q, lower=True, check_finite=False), B[k], check_finite=False)

    try:
        Q = -D[K - 1]
        for k in range(K - 2, 0, -1):
            Q = -D[k] - eliminated(Q, k)
        S = D[0] + eliminated(Q, 0)
    except (np.linalg.LinAlgError, ValueError):
        return Verified(False, None, None, "the multipliers leave the hidden block not negative definite")
    S = (S + S.T) / 2
    n0 = problem.widths[0]
    rho_star = float(scipy.linalg.eigvalsh(S, subset_by_index=[n0 - 1, n0 - 1], check_finite=False)[0])
    if not math.isfinite(rho_star):
        return Verified(False, None, None, "the Schur complement is not finite")
    rho_star = max(rho_star, 0.0)
    # Prove D M D <= 0 (equivalent to M <= 0) with D = diag(2^k) chosen so that D M D has a
    # unit-order diagonal: powers of two scale exactly, and the rounding allowances below are then
    # relative to each block's own magnitude, which matters when the multipliers of different
    # layers span many decades (ACAS Xu: 1e-2 .. 1e10).
    d = problem.dim
    n_max = max(*problem.widths, problem.weights[-1].shape[0]) + 2  # W_l^T W_l sums over the output rows
    Da, Ba = problem.assemble_blocks(lams, absolute=True)
    scale = max(rho_star, max(float(np.abs(np.diag(Dk)).max()) for Dk in D), 1e-300)
    for rel in (SAFETY, 1e-7, 1e-5, 1e-3):
        rho = rho_star * (1.0 + rel) + rel * 1e-12 * scale
        M = [Dk.copy() for Dk in D]
        M[0][np.diag_indices(n0)] -= rho
        sc = []
        for Mk in M:
            diag = np.abs(np.diag(Mk))
            diag[~(diag > 0)] = 1.0
            sc.append(np.exp2(-np.round(np.log2(np.sqrt(diag)))))
        diag_scaled = lambda blocks: [X * sc[k][:, None] * sc[k][None, :] for k, X in enumerate(blocks)]  # noqa: E731
        off_scaled = lambda blocks: [X * sc[k + 1][:, None] * sc[k][None, :] for k, X in enumerate(blocks)]  # noqa: E731
        MD, BD, abs_d, abs_b = diag_scaled(M), off_scaled(B), diag_scaled(Da), off_scaled(Ba)
        abs_d[0][np.diag_indices(n0)] += rho * sc[0] ** 2
        fro2 = sum(float(np.sum(X**2)) for X in abs_d) + 2.0 * sum(float(np.sum(X**2)) for X in abs_b)
        # assembly: |dM| <= gamma_n |terms| entrywise; Cholesky: backward error <= gamma_{d+1} d max diag
        max_diag = max(float(np.abs(np.diag(Mk)).max()) for Mk in MD)
        delta = gamma(n_max) * math.sqrt(fro2) + gamma(d + 1) * d * max_diag
        if _block_cholesky_ok([-Mk - delta * np.eye(len(Mk)) for Mk in MD], [-Bk for Bk in BD]):
            return Verified(True, math.sqrt(rho) * (1.0 + SAFETY), rho, f"verified with relative margin {rel:g}", rel)
    return Verified(False, None, None, "the whole matrix inequality could not be verified in float64 (ill-conditioned multipliers)")


def _block_cholesky_ok(A: list[np.ndarray], B: list[np.ndarray]) -> bool:
    """Whether the float64 Cholesky factorisation of the symmetric block-tridiagonal matrix with
    diagonal blocks A[k] and sub-diagonal blocks B[k] = A[k + 1, k] runs to the end."""
    import scipy.linalg

    L = None
    for k, Ak in enumerate(A):
        if k > 0:
            Lo = scipy.linalg.solve_triangular(L, B[k - 1].T, lower=True, check_finite=False).T  # B L^-T
            Ak = Ak - Lo @ Lo.T
        try:
            L = scipy.linalg.cholesky(Ak, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            return False
    return True


def problem_from_graph(graph: Graph) -> LipSDPProblem | str:
    """The LipSDP problem of a chain graph (affine, activation, affine, ..., affine), or the reason
    it is not one. Consecutive affine nodes are merged first; biases do not matter."""
    g = graph.merge_linear()
    if not g.is_chain():
        return "the network is not a chain (residual branches or concatenations)"
    weights, alphas, betas, names = [], [], [], []
    expect_affine = True
    for n in g.nodes:
        if isinstance(n, Affine) and expect_affine:
            W = n.lin.dense()
            if W is None:
                return f"layer {n.name} ({n.op}) is too large for a dense matrix"
            weights.append(np.asarray(W, np.float64))
            names.append(n.name)
            expect_affine = False
        elif isinstance(n, Activation) and not expect_affine:
            a, b = n.slope_interval
            if n.kind == "prelu":  # per-channel slopes broadcast to the neurons
                s = n.neuron_slopes()
                a_vec, b_vec = np.minimum(s, 1.0), np.maximum(s, 1.0)
            else:
                a_vec, b_vec = np.full(weights[-1].shape[0], a), np.full(weights[-1].shape[0], b)
            alphas.append(a_vec)
            betas.append(b_vec)
            expect_affine = True
        elif isinstance(n, Activation):  # two activations in a row: compose via an identity layer
            weights.append(np.eye(weights[-1].shape[0]) if weights else np.eye(g.input_dim))
            names.append(f"{n.name}:identity")
            a, b = n.slope_interval
            alphas.append(np.full(weights[-1].shape[0], a))
            betas.append(np.full(weights[-1].shape[0], b))
        else:
            return f"node {n.name} ({type(n).__name__}) is not an affine layer or a slope-restricted activation"
    if expect_affine:  # ends with an activation: append the identity as last layer
        weights.append(np.eye(weights[-1].shape[0]))
        names.append("output:identity")
    if not names or len(weights) < 2:
        return "the network has no activation layer: its exact norm is the bound"
    return LipSDPProblem(weights, alphas, betas, names)
