"""LipSDP-Neuron for one wide layer of local units followed by a narrow linear map, posed in the
small dimension (inputs + outputs) instead of the wide one, and proven in float64.

Setting. From a quadratic form X on the input differences du (the state of compose), the
pre-activations z = W du of a wide layer (h rows, e.g. a convolution with 23328 outputs) feed
*groups* of local units, and the output is dy = sum_g V_g^T p_g, linear in the units' outputs.
A unit u of group g computes p_u = phi_u(q_u) with q_u = (Qz z_g + Qp p_g)_u (Qp strictly lower
triangular: a unit may read earlier units of its group) and phi_u nondecreasing with slopes in
[0, beta_u]; so every pair of inputs satisfies the quadratic constraint p_u (beta_u q_u - p_u) >= 0
on the differences (the same letters denote differences from here on). Two layers fit this form:

- an activation followed by a linear map: one group per neuron, q = z, p = phi(z) (k = n = 1);
- an activation, max-pooling, a linear map: one group per pooling window of k entries, whose
  output max_i phi(z_i) = phi(max_i z_i) (phi nondecreasing) is computed exactly by a tournament of
  k - 1 ReLU units, max(a, b) = b + relu(a - b), and a last unit phi: n = k units. Overlapping
  windows are just groups that share entries of z: no sqrt(overlap) factor. When the slopes of phi
  are in [0, 1] (ReLU, tanh, sigmoid), a difference of the window's output is lambda^T dz for some
  lambda >= 0 with sum lambda <= 1 (mean value theorem with Clarke's gradients), which gives one
  more constraint per window with a matrix-valued multiplier (LocalLayer.window_unit): a quadratic
  form in (dz, dp) that is nonnegative on that set, proven so at the set's vertices.

The matrix inequality. With multipliers t_u >= 0 (one per unit: LipSDP-Neuron) the S-procedure
gives ||dy||^2 <= rho du^T X du if, with T = diag(t), B = diag(beta),

    Aug = [[rho X, 0, -C^T], [0, I_r, V^T], [-C, V, D]] >= 0,
    D = blockdiag_g(2 T_g - T_g B_g Qp - Qp^T B_g T_g),   C = blockdiag_g(T_g B_g Qz) W,

(the last block row/column is the units; the I_r block is the Schur form of -V V^T). D is block
diagonal with one n x n block per group, so eliminating it leaves (n_in + r) rows only:

    R(rho) = [[rho X - P, Z], [Z^T, S]] >= 0,  P = C^T D^-1 C, Z = C^T D^-1 V, S = I - V^T D^-1 V,

and the best rho for given t is the largest eigenvalue of X^-1/2 (P + Z S^-1 Z^T) X^-1/2. Each
group touches only the c input coordinates its rows of W read (4 for a 2x2 convolution on one
channel), so P and Z are sums of c x c and c x r pieces and nothing h x h or h x n_in is formed.

The multipliers are chosen by a quasi-Newton descent on a smoothed largest eigenvalue (float64
autograd, one thread); the choice is never trusted. The proof (``prove``) takes the final t and a
rho slightly above its optimum and checks Aug >= 0 by an exact congruence: with Y_g = E_g D_g^-1
computed in float64 (E the off-diagonal block, per group), Aug is congruent to
[[R~, Delta], [Delta^T, D]] with R~ = K - sum_g (Y_g E_g^T + E_g Y_g^T - Y_g D_g Y_g^T) and
Delta_g = E_g - Y_g D_g (rounding-sized). It is PSD if D_g >= delta_g I for every group,
R~ >= eps I and eps >= sum_g ||Delta_g||^2 / delta_g; each of these is proven by a Cholesky
factorisation with an allowance for every rounding error (Higham's gamma_k bounds on the absolute
values of all the products involved; ``compose.proven_psd``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EPS, Settings, gamma
from ..graph import Activation, Affine, Graph, MaxPool
from ..graph.convnorm import single_threaded
from ..result import Result
from .base import register
from .compose import DENSE_STATE, MARGINS, _dense_of, _is_dense, compose_bound, compose_result, proven_psd, proven_psd_batch

log = logging.getLogger(__name__)

# Time the multiplier search may take by default (the proof comes after it, in seconds).
TIME_LIMIT = 420.0
# The most entries of the groups' c x c pieces of P (float64, and as many int64 indices): a layer
# whose groups each read much of the input (VGG: max-pooling after 512 channels of 3x3
# convolutions on a 2x2 grid, 512 groups x 2048^2) is not local and is left to the naive rule.
MAX_PIECES = 30_000_000


@dataclass
class LocalLayer:
    """One wide layer of local units between an input of ``n_in`` entries and ``r`` outputs."""

    n_in: int
    cols: np.ndarray  # (G, c) int64: the input coordinates each group's rows of W read
    Wz: np.ndarray  # (G, k, c): those rows of W restricted to those coordinates
    Qz: np.ndarray  # (n, k): unit pre-activations from the group's z
    Qp: np.ndarray  # (n, n) strictly lower triangular: from the group's earlier units
    beta: np.ndarray  # (n,): slope interval [0, beta_u] of every unit
    V: np.ndarray  # (G, n, r): dy = sum_g V_g^T p_g
    # a unit u whose output is max(0, z_1..z_k) of the group's z (a pooling window), -1: none;
    # then the group has one more, matrix-valued multiplier (window_params(k) columns of t, see
    # _Torch.window): M >= 0 (k x k), m (k) and mu >= 0 with the valid constraint
    #   z^T M z + 2 p_u m^T z - mu p_u^2 >= 0:
    # p_u = lambda^T z with lambda in {lambda >= 0, sum lambda <= 1} (the Clarke set), the form is
    # concave in lambda (mu >= 0), so it is >= 0 on the set when it is PSD at every vertex 0, e_i:
    # M >= 0 and M + m e_i^T + e_i m^T - mu e_i e_i^T >= 0, i.e. mu <= (1 + h_i)^2 / H_ii - m^T H m
    # (H = M^-1, h = H m). M = I, m = theta 1 is the 1-Lipschitz (theta = 0) and sign-aware
    # (theta = 1 / (k - 1)) pair of scalar constraints this replaces (measured on cvxpy subproblems
    # of Convnet_maxpool: 16-22% lower bounds than with that pair, which added nothing there)
    window_unit: int = -1

    @property
    def groups(self) -> int:
        return int(self.cols.shape[0])

    @property
    def multipliers(self) -> int:
        """Multipliers per group: one per unit, and the window's parameters when ``window_unit`` is set."""
        return int(self.Qz.shape[0]) + (window_params(int(self.Qz.shape[1])) if self.window_unit >= 0 else 0)

    @property
    def r(self) -> int:
        return int(self.V.shape[2])


def window_params(k: int) -> int:
    """Columns of t that parametrise one window constraint of k entries (see _Torch.window)."""
    return 1 + 2 * k + k * (k - 1) // 2


def _local_columns(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a boolean (G, n_in) mask, (G, c) column indices of its True entries (c = the largest
    count) and a (G, c) mask of padding: short rows repeat their first index there."""
    counts = mask.sum(1)
    c = max(int(counts.max()), 1)
    order = np.argsort(~mask, axis=1, kind="stable")[:, :c]
    pad = np.arange(c)[None, :] >= counts[:, None]
    return np.where(pad, order[:, :1], order), pad


def _gather(W: np.ndarray, rows: np.ndarray, cols: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """(G, k, c) blocks W[rows[g]][:, cols[g]], zero in the padding columns (so that a repeated
    index adds nothing)."""
    blocks = W[rows[:, :, None], cols[:, None, :]]
    blocks[np.broadcast_to(pad[:, None, :], blocks.shape)] = 0.0
    return blocks


def activation_layer(W: np.ndarray, Wl: np.ndarray, beta: float) -> LocalLayer:
    """u -> phi(W u) (slopes in [0, beta]) -> Wl: one group per neuron. Neurons that Wl does not
    read are left out (their constraints are not needed)."""
    used = np.flatnonzero(np.abs(Wl).sum(0) > 0)
    rows = used[:, None]
    cols, pad = _local_columns(W[used] != 0)
    return LocalLayer(W.shape[1], cols, _gather(W, rows, cols, pad), np.ones((1, 1)), np.zeros((1, 1)),
                      np.array([beta], float), np.ascontiguousarray(Wl[:, used].T[:, None, :]))


def max_tree(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Qz, Qp) of k units computing phi(max(z_1..z_k)): k - 1 ReLU units in a tournament,
    max(a, b) = b + relu(a - b), then the last unit phi on the maximum."""
    Qz, Qp = np.zeros((k, k)), np.zeros((k, k))
    exprs = [(np.eye(k)[i], np.zeros(k)) for i in range(k)]  # (coefficients on z, on p)
    u = 0
    while len(exprs) > 1:
        nxt = []
        for j in range(0, len(exprs) - 1, 2):
            (za, pa), (zb, pb) = exprs[j], exprs[j + 1]
            Qz[u], Qp[u] = za - zb, pa - pb
            p = pb.copy()
            p[u] += 1.0
            nxt.append((zb, p))
            u += 1
        if len(exprs) % 2:
            nxt.append(exprs[-1])
        exprs = nxt
    Qz[u], Qp[u] = exprs[0]
    return Qz, Qp


def max_tree_after(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Qz, Qp, out) of 2k - 1 units for max(phi(z_1)..phi(z_k)): first the k units phi(z_i),
    then k - 1 ReLU units in a tournament on them; the maximum is out^T p (not a unit)."""
    n = 2 * k - 1
    Qz, Qp = np.zeros((n, k)), np.zeros((n, n))
    Qz[:k, :k] = np.eye(k)
    exprs = [np.eye(n)[i] for i in range(k)]  # coefficients on p
    u = k
    while len(exprs) > 1:
        nxt = []
        for j in range(0, len(exprs) - 1, 2):
            pa, pb = exprs[j], exprs[j + 1]
            Qp[u] = pa - pb
            p = pb.copy()
            p[u] += 1.0
            nxt.append(p)
            u += 1
        if len(exprs) % 2:
            nxt.append(exprs[-1])
        exprs = nxt
    return Qz, Qp, exprs[0]


def pool_windows(pool: MaxPool) -> np.ndarray | None:
    """(windows, k) input indices of every 2-D pooling window, in the pool's output order;
    padded positions (never the maximum) replaced by a real entry of the same window."""
    if len(pool.kernel) != 2:
        return None
    shape = tuple(int(s) for s in pool.in_shape[1:])
    idx = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(1, *shape)
    x = pool._padded(idx, -1.0)[0]  # (C, Hp, Wp)
    win = F.unfold(x[:, None], pool.kernel, dilation=pool.dilations, stride=pool.strides)  # (C, k, L)
    win = win.permute(0, 2, 1).reshape(-1, win.shape[1]).numpy().astype(np.int64)
    first = np.where(win >= 0, win, np.iinfo(np.int64).max).min(1, keepdims=True)
    if (first == np.iinfo(np.int64).max).any():
        return None
    return np.where(win >= 0, win, first)


def maxpool_layer(W: np.ndarray, windows: np.ndarray, Wl: np.ndarray, beta: float, activation_first: bool = False) -> LocalLayer:
    """u -> maxpool(phi(W u)) -> Wl: one group per window (phi nondecreasing, slopes [0, beta]).
    ``activation_first``: the 2k - 1 units of max_tree_after instead of the k of max_tree."""
    k = windows.shape[1]
    if activation_first:
        Qz, Qp, out = max_tree_after(k)
        b = np.ones(2 * k - 1)
        b[:k] = beta
    else:
        Qz, Qp = max_tree(k)
        out = np.eye(k)[-1]
        b = np.ones(k)
        b[-1] = beta
    used = np.flatnonzero(np.abs(Wl).sum(0) > 0)
    windows = windows[used]
    mask = np.zeros((len(used), W.shape[1]), dtype=bool)
    for j in range(k):
        mask |= W[windows[:, j]] != 0
    cols, pad = _local_columns(mask)
    V = out[None, :, None] * Wl[:, used].T[:, None, :]
    if beta > 1.0 or activation_first:  # the window constraints need the Clarke set inside {lambda >= 0, sum lambda <= 1}
        return LocalLayer(W.shape[1], cols, _gather(W, windows, cols, pad), Qz, Qp, b, V)
    return LocalLayer(W.shape[1], cols, _gather(W, windows, cols, pad), Qz, Qp, b, V, window_unit=k - 1)


# --------------------------------------------------------------------------------------------
# Assembly (torch, float64; differentiable in the multipliers)
# --------------------------------------------------------------------------------------------


class _Torch:
    """The layer's arrays as torch tensors, with the scatter indices of P and Z."""

    def __init__(self, layer: LocalLayer) -> None:
        f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        self.n_in, self.r = layer.n_in, layer.r
        self.Wz, self.Qz, self.Qp, self.beta, self.V = f(layer.Wz), f(layer.Qz), f(layer.Qp), f(layer.beta), f(layer.V)
        cols = torch.from_numpy(layer.cols)
        self.p_idx = (cols[:, :, None] * self.n_in + cols[:, None, :]).reshape(-1)
        self.z_idx = (cols[:, :, None] * self.r + torch.arange(self.r)[None, None, :]).reshape(-1)
        self.QzWz = torch.einsum("nk,gkc->gnc", self.Qz, self.Wz)  # (G, n, c)
        self.n, self.window_unit = int(self.Qz.shape[0]), layer.window_unit
        if self.window_unit >= 0:
            self.k = int(self.Qz.shape[1])
            self.lower = torch.tril_indices(self.k, self.k, -1)
            self.e_w = torch.zeros(self.n, dtype=torch.float64)
            self.e_w[self.window_unit] = 1.0

    def to_t(self, s: torch.Tensor) -> torch.Tensor:
        """Multipliers t from the search's variables: log t for the units, the window's as they are."""
        return torch.cat([torch.exp(s[:, : self.n]), s[:, self.n:]], 1)

    def window(self, w: torch.Tensor, tau: torch.Tensor | None = None):
        """(sqrt_a, B, theta, mu_hat) of the window constraints from their parameters w (G, window_params(k)):
        [log a, e (k), the strictly lower part of B (k(k-1)/2), theta (k)]. The constraint is
        M = a B B^T with B = diag(exp e) + lower (so M > 0), m = a theta, mu = a mu_hat, mu_hat the
        largest valid value min_i (1 + h_i)^2 / H_ii - theta^T H theta (H = (B B^T)^-1, h = H theta),
        times (1 - 1e-6); with ``tau`` (G,), a smooth minimum below it (-tau log sum exp(-value / tau),
        within tau log k below the minimum: always valid, for the search; see ``window_tau``).
        mu_hat is None when some window has no valid mu_hat > 0 (the form would not be concave in lambda)."""
        k, G = self.k, w.shape[0]
        sqrt_a = torch.exp(0.5 * w[:, 0])
        B = torch.diag_embed(torch.exp(w[:, 1:1 + k]))
        low = w.new_zeros(G, k, k)
        low[:, self.lower[0], self.lower[1]] = w[:, 1 + k:-k]
        B = B + low
        theta = w[:, -k:]
        Binv = torch.linalg.solve_triangular(B, torch.eye(k, dtype=w.dtype).expand(G, k, k), upper=False)
        Hii = (Binv**2).sum(1)
        v = (Binv @ theta[:, :, None])[:, :, 0]
        h = (Binv.transpose(1, 2) @ v[:, :, None])[:, :, 0]
        vals = (1.0 + h) ** 2 / Hii - (v**2).sum(1, keepdim=True)
        if tau is None:
            mu_hat = vals.min(1).values * (1.0 - 1e-6)
        else:
            mu_hat = -tau * torch.logsumexp(-vals / tau[:, None], 1)
        if not bool((mu_hat > 0).all()):
            return sqrt_a, B, theta, None
        return sqrt_a, B, theta, mu_hat

    def window_tau(self, t: torch.Tensor, rel: float) -> torch.Tensor | None:
        """Temperatures of the smooth minimum for a search stage, fixed during it (a temperature that
        moved with t would make the gradient inconsistent): the smooth minimum is then at most
        ``rel`` x the minimum below it at t."""
        if self.window_unit < 0:
            return None
        with torch.no_grad():
            _, _, _, mu_hat = self.window(t[:, self.n:])
        if mu_hat is None:
            return None
        return rel * mu_hat / math.log(self.k + 1)

    def blocks(self, t: torch.Tensor, tau: torch.Tensor | None = None, mu: torch.Tensor | None = None):
        """D (G, n, n), C (G, n, c) and BW (G, k, c) or None, for multipliers t (G, multipliers);
        None when the window constraints are not valid. A window constraint adds mu to D_g's
        (u, u) entry, m^T W_g to C_g's row u, and W_g^T M W_g = BW^T BW to P (``mu``: its mu, instead of
        the one computed from t, e.g. the proven one)."""
        tu = t[:, : self.n]
        tb = tu * self.beta
        TBQ = tb[:, :, None] * self.Qp
        D = torch.diag_embed(2.0 * tu) - TBQ - TBQ.transpose(1, 2)
        BW = None
        C = tb[:, :, None] * self.QzWz
        if self.window_unit >= 0:
            sqrt_a, B, theta, mu_hat = self.window(t[:, self.n:], tau)
            if mu is None:
                if mu_hat is None:
                    return None
                mu = sqrt_a**2 * mu_hat
            D = D + torch.diag_embed(mu[:, None] * self.e_w)
            mW = ((sqrt_a**2)[:, None] * theta)[:, None, :] @ self.Wz  # (G, 1, c)
            C = C + mW * self.e_w[None, :, None]
            BW = sqrt_a[:, None, None] * (B.transpose(1, 2) @ self.Wz)
        return D, C, BW

    def reduced(self, t: torch.Tensor, tau: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(P, Z, S), or None when some D_g is not positive definite (or a window constraint is not valid)."""
        blk = self.blocks(t, tau)
        if blk is None:
            return None
        D, C, BW = blk
        L, info = torch.linalg.cholesky_ex(D)
        if bool((info != 0).any()):
            return None
        Fc = torch.linalg.solve_triangular(L, C, upper=False)
        Fv = torch.linalg.solve_triangular(L, self.V, upper=False)
        Pg = Fc.transpose(1, 2) @ Fc
        if BW is not None:
            Pg = Pg + BW.transpose(1, 2) @ BW
        P = torch.zeros(self.n_in * self.n_in, dtype=t.dtype).index_add(0, self.p_idx, Pg.reshape(-1))
        Z = torch.zeros(self.n_in * self.r, dtype=t.dtype).index_add(0, self.z_idx, (Fc.transpose(1, 2) @ Fv).reshape(-1))
        S = torch.eye(self.r, dtype=t.dtype) - torch.einsum("gnr,gns->rs", Fv, Fv)
        return P.reshape(self.n_in, self.n_in), Z.reshape(self.n_in, self.r), S


def _target(tl: _Torch, t: torch.Tensor, Xi: torch.Tensor | None, tau: torch.Tensor | None = None) -> torch.Tensor | None:
    """The matrix whose largest eigenvalue is the best rho for t: X^-1/2 (P + Z S^-1 Z^T) X^-1/2
    (Xi = the inverse Cholesky factor of X, None for X = I)."""
    red = tl.reduced(t, tau)
    if red is None:
        return None
    P, Z, S = red
    Ls, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        return None
    G = torch.linalg.solve_triangular(Ls, Z.T, upper=False)
    M = P + G.T @ G
    if Xi is not None:
        M = Xi @ M @ Xi.T
    return (M + M.T) / 2


def best_rho(tl: _Torch, t: torch.Tensor, Xi: torch.Tensor | None) -> float:
    """The smallest rho feasible for t in floating point (inf when t is infeasible); an estimate,
    the proof comes from ``prove``."""
    with torch.no_grad():
        M = _target(tl, t, Xi)
        if M is None or not bool(torch.isfinite(M).all()):
            return math.inf
        return float(_top_eigenpairs(M.numpy(), 1)[0][-1])


def _top_eigenpairs(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues (ascending) and their eigenvectors of the symmetric a: LAPACK's
    MRRR on a subset costs about a third of a full eigh (784 rows: 36 ms against 114 ms)."""
    import scipy.linalg

    d = a.shape[0]
    try:
        return scipy.linalg.eigh(a, subset_by_index=[d - min(k, d), d - 1], driver="evr", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        e, v = (x.numpy() for x in torch.linalg.eigh(torch.from_numpy(a)))
        return e[d - min(k, d):], v[:, d - min(k, d):]


class _SmoothTop(torch.autograd.Function):
    """top + mu log sum_i exp((e_i - top) / mu) over the eigenvalues e of a symmetric M, with its
    gradient V diag(softmax) V^T. With light smoothing only the top 32 eigenpairs are computed, when
    the others weigh less than e^-40 each (Convnet_maxpool at mu = 1e-3 rho: 72 ms, not 158 ms)."""

    @staticmethod
    def forward(ctx, M: torch.Tensor, mu: float, hint: dict) -> torch.Tensor:
        # hint: {"full": True} once a call with this mu needed them all (a stage of the search)
        e = None
        if not hint.get("full"):
            e, V = _top_eigenpairs(M.detach().numpy(), 32)
        if e is None or (e[0] - e[-1]) / mu > -40.0:  # heavy smoothing: all of them (a full eigh is faster then)
            e, V = (x.numpy() for x in torch.linalg.eigh(M.detach()))
            hint["full"] = True
        w = np.exp((e - e[-1]) / mu)
        ctx.save_for_backward(torch.from_numpy(V * (w / w.sum())), torch.from_numpy(V))
        return torch.tensor(e[-1] + mu * math.log(w.sum()), dtype=M.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        VW, V = ctx.saved_tensors
        return grad * (VW @ V.T), None, None


# --------------------------------------------------------------------------------------------
# The multiplier search: L-BFGS on a smoothed largest eigenvalue, in log t
# --------------------------------------------------------------------------------------------


def _smooth_max(tl: _Torch, s: torch.Tensor, Xi: torch.Tensor | None, mu: float, hint: dict, tau: torch.Tensor | None = None,
                tick=None) -> torch.Tensor | None:
    if tick is not None:
        tick()
    M = _target(tl, tl.to_t(s), Xi, tau)
    if M is None or not bool(torch.isfinite(M).all()):
        return None
    return _SmoothTop.apply(M, mu, hint)


def _initial(tl: _Torch, Xi: torch.Tensor | None, G: int, n: int, window_start: bool = True, tick=None,
             stop: float = math.inf) -> torch.Tensor:
    """Search variables (G, multipliers) of the best one-parameter family on a grid: the units'
    (see _initial_units), then the window constraints as M = a I, m = a theta 1 (a = f x the
    multiplier of the window's unit, theta 0 or 1 / (k - 1)). ``window_start``: the units'
    multipliers scaled by 1e-6 first, so that the window constraints carry the bound (see
    WINDOW_START_S). ``stop`` (a time.perf_counter() value): the grids end there with the best
    point found so far (each point costs an eigenvalue problem: 1.3 s on Convnet_maxpool under load)."""
    s = _initial_units(tl, Xi, G, n, tick, stop)
    if tl.window_unit < 0:
        return s
    k = tl.k
    last = s[:, tl.window_unit:tl.window_unit + 1]
    rest = torch.zeros(G, window_params(k) - 1, dtype=torch.float64)
    best = (math.inf, None)
    units, factors = (s + math.log(1e-6), np.geomspace(1e-2, 1e4, 7)) if window_start else (s, np.geomspace(1e-4, 1.0, 9))
    for theta in (0.0, 1.0 / max(k - 1, 1)):
        rest[:, -k:] = theta
        for f in factors:
            if best[1] is not None and time.perf_counter() > stop:
                break
            cand = torch.cat([units, last + math.log(f), rest], 1)
            if tick is not None:
                tick()
            rho = best_rho(tl, tl.to_t(cand), Xi)
            if rho < best[0]:
                best = (rho, cand)
    if best[1] is None:  # wide_bound reads this as "no multipliers found" (the naive step stays)
        raise ValueError("no multipliers of the window constraints' family are feasible")
    return best[1].clone()


def _initial_units(tl: _Torch, Xi: torch.Tensor | None, G: int, n: int, tick=None, stop: float = math.inf) -> torch.Tensor:
    """Log-multipliers of the best one-parameter family t_u = tau * ratio^level(u) on a grid (the
    grid ends at ``stop`` once a feasible point is found)."""
    # a unit's level: how many units of its group it reads through Qp (depth in the tournament)
    depth = np.zeros(n)
    Qp = tl.Qp.numpy()
    for u in range(n):
        prev = np.flatnonzero(Qp[u] != 0)
        depth[u] = 1 + depth[prev].max() if len(prev) else 0
    pad = torch.zeros((G, window_params(tl.k) if tl.window_unit >= 0 else 0), dtype=torch.float64)
    if tl.window_unit >= 0:
        pad[:, 0] = -60.0  # the window constraints' a = e^-60 meanwhile
    # groups whose outputs weigh more get larger multipliers: t ~ ||V_g||^power
    vlog = torch.log(torch.linalg.matrix_norm(tl.V).clamp_min(1e-300))[:, None]

    def scan(bases: list[torch.Tensor], factors: np.ndarray, best: tuple) -> tuple:
        for base in bases:
            for f in factors:
                if best[1] is not None and time.perf_counter() > stop:
                    return best
                cand = base.clone()
                cand[:, :n] += math.log(f)
                if tick is not None:
                    tick()
                rho = best_rho(tl, tl.to_t(cand), Xi)
                if rho < best[0]:
                    best = (rho, cand)
        return best

    # every family on a grid of tau (a factor 10 apart), then only the best one refined: half
    # the evaluations of refining each family (Convnet_maxpool: 9 s, not 17 s), a finer refinement
    families = [torch.cat([torch.from_numpy(np.log(ratio) * depth).expand(G, n) + power * vlog, pad], 1)
                for ratio in ((1.0,) if n == 1 else (1.0, 0.5, 0.25, 0.1)) for power in (0.0, 0.5, 1.0)]
    best = scan(families, np.geomspace(1e-8, 1e8, 17), (math.inf, None))
    if best[1] is not None:
        best = scan([best[1]], np.geomspace(0.1, 10.0, 33), best)
    if best[1] is None:
        raise ValueError("no multipliers of the one-parameter family are feasible")
    return best[1][:, :n].clone()


# The smoothing of the largest eigenvalue, relative to it, stage by stage (at most ITERATIONS
# quasi-Newton steps each): heavy smoothing first moves fastest (Convnet_maxpool, 300 s of search
# under load: 304.2 from 1e-1 down, 348.8 when starting at 1e-3).
SMOOTHING = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
ITERATIONS = 200
# Searches of at least this many seconds start where the window constraints carry the bound and
# the tournament's multipliers are near zero; shorter ones from the units' family. Measured on
# Convnet_maxpool (420 s): from the window start 390.1 after 109 s, 298.1 after 170 s, 285.3 after
# 396 s; from the units' start 305.0 after 104 s, 303.1 after 300 s (its basin: cvxpy on pieces
# of 2-16 windows puts the optimum at zero unit multipliers, which the search does not reach from
# there). Skipping the heaviest smoothing stage from the window start is faster at first and
# ends higher (289.7 at 420 s).
WINDOW_START_S = 150.0


def optimise(layer: LocalLayer, X: np.ndarray | None = None, time_limit: float = TIME_LIMIT, iters: int = ITERATIONS,
             smoothing: tuple[float, ...] = SMOOTHING, memory: int = 12, window_start: bool | None = None,
             report=None) -> tuple[np.ndarray, dict]:
    """Multipliers t (G, layer.multipliers) for ``layer`` from the state X (None: the identity), and a
    log. ``window_start``: see _initial (None: for searches of at least WINDOW_START_S).
    ``report(seconds_left)``: called every 2 s at most and after each stage with the time the search
    may still take (its limit less the time spent)."""
    start = time.perf_counter()
    tl = _Torch(layer)
    Xi = None
    if X is not None:
        Lx = torch.linalg.cholesky(torch.from_numpy(np.ascontiguousarray(X)))
        Xi = torch.linalg.solve_triangular(Lx, torch.eye(len(X), dtype=torch.float64), upper=False)
    last_report = start

    def tick() -> None:  # the time left, every 2 s at most
        nonlocal last_report
        now = time.perf_counter()
        if report is not None and now - last_report >= 2.0:
            last_report = now
            report(max(time_limit - (now - start), 0.0))

    window_start = time_limit >= WINDOW_START_S if window_start is None else window_start
    s = _initial(tl, Xi, layer.groups, int(layer.Qz.shape[0]), window_start, tick, start + time_limit)
    rho0 = best_rho(tl, tl.to_t(s), Xi)
    history = [(0, time.perf_counter() - start, rho0)]
    evals = 0
    stages = list(smoothing)
    # once every stage has run, the lightest one again while time is left and it still gains (a
    # stage ends after ``iters`` steps, not always at convergence: Convnet_maxpool from the window
    # start ran its last stages from 285.5 to 285.3 in 51 s, with 24 s of its 420 left)
    i = 0
    while i < len(stages):
        mu_rel = stages[i]
        i += 1
        mu = mu_rel * best_rho(tl, tl.to_t(s), Xi)
        hint: dict = {}
        # the window constraints' smooth minimum over their vertices is as light as the eigenvalue's
        # (lighter where the start of the stage would not be feasible with it: S = I - V^T D^-1 V
        # can be nearly singular there)
        tau = tl.window_tau(tl.to_t(s), mu_rel)
        for _ in range(6):
            if tau is None or _target(tl, tl.to_t(s), Xi, tau) is not None:
                break
            tau = tau * 0.1
        s, used = _lbfgs(lambda v: _smooth_max(tl, v, Xi, mu, hint, tau, tick), s, start, time_limit, iters, memory)
        evals += used
        history.append((evals, time.perf_counter() - start, best_rho(tl, tl.to_t(s), Xi)))
        if report is not None:
            report(max(time_limit - (time.perf_counter() - start), 0.0))
        if time.perf_counter() - start > time_limit:
            break
        if i == len(stages) and history[-1][2] < history[-2][2] * (1 - 1e-5):
            stages.append(stages[-1])
    info = {"initial_rho": rho0, "window_start": window_start and tl.window_unit >= 0, "history": history, "evaluations": evals, "search_s": time.perf_counter() - start,
            "stopped_at_limit": time.perf_counter() - start > time_limit}
    return tl.to_t(s).numpy(), info


def _lbfgs(fun, x: torch.Tensor, start: float, time_limit: float, iters: int, memory: int = 12) -> tuple[torch.Tensor, int]:
    """Minimise fun (None = outside the domain) by L-BFGS with backtracking; returns (x, evals)."""

    def value_grad(v: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        v = v.detach().requires_grad_(True)
        f = fun(v)
        if f is None or not bool(torch.isfinite(f)):
            return math.inf, None
        (g,) = torch.autograd.grad(f, v)
        return float(f.detach()), g

    f, g = value_grad(x)
    evals = 1
    if g is None:
        return x, evals
    S: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    for _ in range(iters):
        if time.perf_counter() - start > time_limit:
            break
        q = g.clone()
        alphas = []
        for s_, y_, rho_ in reversed(S):
            a = rho_ * float((s_ * q).sum())
            alphas.append(a)
            q -= a * y_
        if S:
            s_, y_, _ = S[-1]
            q *= float((s_ * y_).sum() / (y_ * y_).sum())
        else:
            q *= 1.0 / max(float(g.abs().max()), 1e-12)  # first step: move log t by at most 1
        for (s_, y_, rho_), a in zip(S, reversed(alphas)):
            b = rho_ * float((y_ * q).sum())
            q += (a - b) * s_
        d = -q
        slope = float((g * d).sum())
        if not slope < 0:
            d, slope, S = -g, -float((g * g).sum()), []
        step, accepted = 1.0, False
        for _ in range(30):
            xn = x + step * d
            fn, gn = value_grad(xn)
            evals += 1
            if gn is not None and fn <= f + 1e-4 * step * slope:
                accepted = True
                break
            step *= 0.3
        if not accepted:
            break
        sk, yk = xn - x, gn - g
        sy = float((sk * yk).sum())
        if sy > 1e-12 * float((yk * yk).sum()) ** 0.5 * float((sk * sk).sum()) ** 0.5:
            S.append((sk, yk, 1.0 / sy))
            S = S[-memory:]
        done = f - fn <= 1e-9 * abs(f)
        x, f, g = xn, fn, gn
        if done:
            break
    return x, evals


# --------------------------------------------------------------------------------------------
# The proof (float64, numpy/torch, every rounding error accounted for)
# --------------------------------------------------------------------------------------------


def _scatter(n_in: int, r: int, cols: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Sum of (G, c + r, c + r) blocks placed at rows/columns [cols_g, n_in + 0..r-1]."""
    G, c = cols.shape
    idx = np.concatenate([cols, np.broadcast_to(n_in + np.arange(r), (G, r))], axis=1)
    m = n_in + r
    flat = torch.zeros(m * m, dtype=torch.float64)
    lin = torch.from_numpy((idx[:, :, None] * m + idx[:, None, :]).reshape(-1))
    flat.index_add_(0, lin, torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1)))
    return flat.reshape(m, m).numpy()


def _proven_window_mu(tl: _Torch, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(sqrt_a, B, theta, mu) for the window constraints with parameters w (``_Torch.window``), mu
    (G,) proven valid for the exact M = s^2 B B^T and m = s^2 theta of the float64 numbers
    s = sqrt_a, B, theta: see ``vertices_proven``; None when no such mu > 0 is found."""
    sqrt_a, B, theta, mu_hat = tl.window(w)
    if mu_hat is None:
        return None
    a = sqrt_a**2
    for shrink in (0.0, 1e-4, 1e-2):
        mu = a * mu_hat * (1.0 - shrink)
        # an upper bound on the exact mu / s^2 (a = fl(s^2) and the quotient each round once)
        if vertices_proven(B, theta, (mu / a) * (1.0 + 4 * EPS)):
            return sqrt_a, B, theta, mu
    return None


def vertices_proven(B: torch.Tensor, theta: torch.Tensor, ratio: torch.Tensor) -> bool:
    """True only if, for every window g and every i, B B^T + theta e_i^T + e_i theta^T - ratio e_i e_i^T
    is PSD for the exact float64 numbers (a batched Cholesky with an allowance for the rounding
    of its entries): the window constraint with mu = s^2 ratio is then valid at every vertex."""
    G, k = theta.shape
    eye = torch.eye(k, dtype=B.dtype)
    Babs = B.abs()
    row = theta[:, None, None, :] * eye[None, :, :, None]  # [g, i]: theta in row i
    row_abs = theta.abs()[:, None, None, :] * eye[None, :, :, None]
    corner = ratio[:, None, None, None] * (eye[:, :, None] * eye[:, None, :])[None]
    N = (B @ B.transpose(1, 2))[:, None] + row + row.transpose(2, 3) - corner
    N_abs = (Babs @ Babs.transpose(1, 2))[:, None] + row_abs + row_abs.transpose(2, 3) + corner.abs()
    err = gamma(k + 4) * torch.linalg.matrix_norm(N_abs).reshape(-1)
    return proven_psd_batch(N.reshape(G * k, k, k), err)


def prove(layer: LocalLayer, t: np.ndarray, rho: float, X: np.ndarray | None = None) -> bool:
    """True only if Aug(rho, t) >= 0 holds exactly for the float64 data: then
    ||dy||^2 <= rho du^T X du for all input pairs (X = None: the identity)."""
    n_in, r, G = layer.n_in, layer.r, layer.groups
    n, k, c = layer.Qz.shape[0], layer.Qz.shape[1], layer.cols.shape[1]
    if t.shape != (G, layer.multipliers) or not (np.all(np.isfinite(t)) and np.all(t[:, :n] >= 0) and rho > 0 and math.isfinite(rho)):
        return False
    tt = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64))
    tl = _Torch(layer)
    with torch.no_grad():
        window, mu_w = None, None
        if layer.window_unit >= 0:
            window = _proven_window_mu(tl, tt[:, n:])
            if window is None:
                return False
            mu_w = window[3]
        D, C, BW = (None if v is None else v.numpy() for v in tl.blocks(tt, mu=mu_w))
        tu = t[:, :n]
        tb_abs = np.abs(tu * layer.beta)
        D_abs = 2 * np.abs(tu)[:, :, None] * np.eye(n) + tb_abs[:, :, None] * np.abs(layer.Qp)
        D_abs = D_abs + D_abs.transpose(0, 2, 1) - 2 * np.abs(tu)[:, :, None] * np.eye(n)  # diag counted once
        QW_abs = np.einsum("nk,gkc->gnc", np.abs(layer.Qz), np.abs(layer.Wz))
        C_abs = tb_abs[:, :, None] * QW_abs
        if window is not None:  # the window constraints' entries: mu, m^T W_g (m = a theta), and BW's
            sqrt_a, B, theta, _ = (v.numpy() for v in window)
            u = layer.window_unit
            D_abs[:, u, u] += mu_w.numpy()
            C_abs[:, u, :] += np.einsum("gk,gkc->gc", np.abs((sqrt_a**2)[:, None] * theta), np.abs(layer.Wz))
            BW_abs = sqrt_a[:, None, None] * (np.abs(B).transpose(0, 2, 1) @ np.abs(layer.Wz))
        # |computed - exact| <= g_dc * |.| entrywise for D and C (a few products and sums each)
        g_dc = gamma(2 * n + 2 * k + 8)
        D_abs *= 1 + g_dc
        C_abs *= 1 + g_dc
        # E_g: (c + r) x n, the off-diagonal block of Aug for group g: [-C_g^T; V_g^T]
        E = np.concatenate([-C.transpose(0, 2, 1), layer.V.transpose(0, 2, 1)], axis=1)
        E_abs = np.concatenate([C_abs.transpose(0, 2, 1), np.abs(layer.V).transpose(0, 2, 1)], axis=1)
        # delta_g: a proven lower bound on lambda_min(D_g) (half the computed one, then checked)
        ev = torch.linalg.eigvalsh(torch.from_numpy(D)).numpy()
        delta = 0.5 * ev[:, 0]
        if not np.all(delta > 0):
            return False
        back = gamma(n + 1) * n * np.abs(np.diagonal(D, axis1=1, axis2=2)).max(1)
        err_d = g_dc * np.sqrt((D_abs**2).sum((1, 2))) + 2 * EPS * (delta + np.abs(np.diagonal(D, axis1=1, axis2=2)).max(1)) + back
        shifted = D - (delta + err_d)[:, None, None] * np.eye(n)
        _, info = torch.linalg.cholesky_ex(torch.from_numpy(shifted))
        if bool((info != 0).any()):
            return False
        # Y_g = E_g D_g^-1 (any float matrix: the congruence is exact whatever Y is)
        Y = torch.linalg.solve(torch.from_numpy(D), torch.from_numpy(E).transpose(1, 2)).transpose(1, 2).numpy()
        YE = Y @ E.transpose(0, 2, 1)
        blocks = YE + YE.transpose(0, 2, 1) - Y @ D @ Y.transpose(0, 2, 1)
        Ya = np.abs(Y)
        blocks_abs = 2 * Ya @ E_abs.transpose(0, 2, 1) + Ya @ D_abs @ Ya.transpose(0, 2, 1)
        if BW is not None:  # the window constraints' W_g^T M W_g, subtracted from the input block
            blocks[:, :c, :c] += BW.transpose(0, 2, 1) @ BW
            blocks_abs[:, :c, :c] += BW_abs.transpose(0, 2, 1) @ BW_abs
        Delta = E - Y @ D
        Delta_err = gamma(n + 2) * (E_abs + Ya @ D_abs) + g_dc * (E_abs + Ya @ D_abs)
        dnorm = np.sqrt((Delta**2).sum((1, 2))) * (1 + 4 * EPS) + np.sqrt((Delta_err**2).sum((1, 2))) * (1 + 4 * EPS)
        eps_needed = float(np.sum(dnorm**2 / delta)) * (1 + 1e-6)
        K = np.zeros((n_in + r, n_in + r))
        K[:n_in, :n_in] = rho * (np.eye(n_in) if X is None else X)
        K[np.arange(n_in, n_in + r), np.arange(n_in, n_in + r)] = 1.0
        R = K - _scatter(n_in, r, layer.cols, blocks)
        R_abs = _scatter(n_in, r, layer.cols, blocks_abs)
    # rounding: the block products (inner size n, plus the product chain Y D Y^T), the scatter sum
    # over the groups, the entries' own errors (already in D_abs, E_abs via g_dc), the K - sum and
    # rho X; gamma of the total count, on the absolute values, covers all of them
    g_all = gamma(3 * n + k + G + 10) + 3 * g_dc
    err = g_all * float(np.linalg.norm(R_abs, "fro")) * (1 + 1e-6) + 2 * EPS * float(np.linalg.norm(K, "fro"))
    R[np.diag_indices(n_in + r)] -= eps_needed
    err += EPS * (float(np.linalg.norm(np.diag(R))) + eps_needed * math.sqrt(n_in + r))
    return proven_psd(R, err)


def wide_bound(layer: LocalLayer, X: np.ndarray | None = None, time_limit: float = TIME_LIMIT,
               window_start: bool | None = None, report=None) -> tuple[float, dict] | None:
    """(rho, info) with ||dy||^2 <= rho du^T X du proven, or None when no multipliers are found or
    the proof fails at every margin (``window_start``, ``report``: see optimise)."""
    with single_threaded():
        try:
            t, info = optimise(layer, X, time_limit, window_start=window_start, report=report)
        except ValueError as exc:
            log.info("widesdp: %s", exc)
            return None
        tl = _Torch(layer)
        Xi = None
        if X is not None:
            Lx = torch.linalg.cholesky(torch.from_numpy(np.ascontiguousarray(X)))
            Xi = torch.linalg.solve_triangular(Lx, torch.eye(len(X), dtype=torch.float64), upper=False)
        rho0 = best_rho(tl, torch.from_numpy(t), Xi)
        if not math.isfinite(rho0):
            return None
        for rel in MARGINS + (3e-3, 1e-2):  # a search stopped early can need more (Convnet_maxpool, 20 s: 3e-3)
            rho = rho0 * (1 + rel)
            if prove(layer, t, rho, X):
                info.update({"rho_float": rho0, "margin": rel, "groups": layer.groups, "units_per_group": int(layer.Qz.shape[0])})
                return rho, info
        return None


# --------------------------------------------------------------------------------------------
# The step inside the compositional walk, and the method
# --------------------------------------------------------------------------------------------


def wide_step(walker, node: Affine, time_limit: float) -> float | None:
    """For the linear map ``node`` read after [max-pooling of] an activation phi(W u) (phi
    nondecreasing, slopes in [0, beta]): the scalar state y with y ||dy||^2 <= du^T X_u du from
    one LipSDP-Neuron inequality over the whole wide layer (``walker``: compose's _Walker)."""
    g, cons = walker.g, walker.consumers
    prev = g.node(node.inputs[0]) if node.inputs[0] != Graph.INPUT else None
    pool = None
    if isinstance(prev, MaxPool) and cons[prev.name] == [node.name]:
        pool = prev
        prev = g.node(pool.inputs[0]) if pool.inputs[0] != Graph.INPUT else None
    if not isinstance(prev, Activation) or prev.kind == "prelu" or cons[prev.name] != [(pool or node).name]:
        return None
    a, b = (float(v) for v in prev.slope_interval)
    src = g.node(prev.inputs[0]) if prev.inputs[0] != Graph.INPUT else None
    if a != 0.0 or not b > 0 or not isinstance(src, Affine) or cons[src.name] != [prev.name]:
        return None
    n = walker.dim(src.inputs[0])
    if n > DENSE_STATE or node.lin.out_dim > DENSE_STATE:
        return None
    W, Wl = _dense_of(src), _dense_of(node)
    if W is None or Wl is None:
        return None
    if pool is None:
        layer = activation_layer(W, Wl, b)
    else:
        windows = pool_windows(pool)
        if windows is None:
            return None
        layer = maxpool_layer(W, windows, Wl, b)
    if layer.groups * layer.cols.shape[1] ** 2 > MAX_PIECES:
        return None
    state = walker.states[src.inputs[0]]
    X = state if _is_dense(state) else None
    if X is None and not float(state) > 0:
        return None
    walker.searching(time_limit)
    res = wide_bound(layer, X, time_limit, report=walker.searching)
    if res is None:
        return None
    rho, info = res
    walker.wide_sdp_info.append({"node": node.name, "pooling": pool is not None, "rho": rho, **info})
    scale = 1.0 if X is not None else float(state)  # X = x I: ||dy||^2 <= (rho / x) du^T (x I) du
    return scale / rho * (1.0 - 4 * EPS)


@register
class SdpWide:
    name = "sdp-wide"
    kind = "upper"
    description = ("the compositional walk, with LipSDP-Neuron over each wide layer (activations, max-pooling) "
                   "before a narrow linear map, posed in the small dimension; proven l2 bound, minutes")

    stops_early = True  # at settings.extra["deadline"]: the multiplier searches stop with what they have, still proven

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None if settings.norm == "2" else "the wide-layer LipSDP bounds the l2 norm only"

    def run(self, graph: Graph, settings: Settings) -> Result:
        start = time.perf_counter()
        limit = float(settings.extra.get("fast_time_limit") or TIME_LIMIT)
        deadline = settings.extra.get("deadline")
        if deadline is not None:
            # a budget's share: the searches get half of it, the walk and the float64 proofs the rest
            limit = min(limit, max(0.5 * (float(deadline) - start), 1.0))
        info: list[dict] = []
        value, naive, steps = compose_bound(graph, wide_sdp_time=limit, info=info)
        for item in info:  # keep the JSON small: the search history as (evaluations, seconds, rho)
            item["history"] = [list(h) for h in item.get("history", [])]
        return compose_result(self.name, graph, value, naive, steps, start, {"search_time_limit": limit}, {"wide_sdp": info})
