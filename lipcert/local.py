"""Local Lipschitz constants over an input region, and certified radii that use them.

Why local: a global constant holds for every pair of inputs in the whole space; near a data point
most neurons of a trained network never change state, and the network is much flatter there.

Region R: an lp ball B_p(c, r) (p = 2, inf or 1) or a box [lo, hi]. Both are convex.

Mathematics (the proof behind every number this module calls proven):

1. Pre-activation bounds. For a chain x -> z_1 = W_1 x + b_1 -> a_1 = s_1(z_1) -> z_2 = W_2 a_1 + b_2
   -> ... -> z_L, every z_k(x) for x in R lies in [l_k, u_k], computed by
   - the exact range of the first layer: W_1 c + b_1 -/+ r ||row_i(W_1)||_q (q the dual norm of p),
   - interval propagation, and
   - linear bound propagation (CROWN, Zhang et al. 2018): each activation on [l, u] lies between two
     lines (ReLU: the chord above, a line through 0 below; a smooth activation with slopes in
     [a, b] on [l, u]: the chord slope s with offsets widened by pq w / (p + q), p = b - s,
     q = s - a, w = u - l, which bounds how far such a function can leave its chord); the
     lines are pushed back to the input, and the resulting affine function is minimised exactly
     over the region. The tighter of the two bounds is kept per neuron.
   All of it runs in float64 and every bound is widened outward by ROUND times the sum of the
   absolute values of the terms that formed it (a float64 sum of n products errs by at most
   n * 1.1e-16 times that, far below ROUND = 1e-9 for the widths and depths handled here).

2. Slopes. On [l_k, u_k] each neuron's activation has slopes (difference quotients, hence also
   Clarke derivatives) in [alpha_i, beta_i]: ReLU with l > 0 exactly 1, with u < 0 exactly 0,
   else [0, 1]; sigmoid/tanh their derivative's range over [l, u]; softplus [sigmoid(l), sigmoid(u)].

3. Jacobian bound. By Lebourg's mean value theorem and the chain rule for Clarke Jacobians,
   f(x) - f(y) = J (x - y) for some J in the convex hull of {W_L D_{L-1} W_{L-1} ... D_1 W_1 :
   D_k diagonal, D_k[i, i] in [alpha_i, beta_i]} when x, y lie in R (the segment stays in R). So
   ||f(x) - f(y)|| <= K ||x - y|| with K the largest norm over that set (a convex function is
   maximal at an extreme point, so the hull adds nothing). lipcert bounds K two ways and keeps the
   smaller:
   - interval Jacobian: entrywise interval bounds on every such J, by interval arithmetic from
     the output back (Fast-Lip / RecurJac style); then the norm of the entrywise largest |J|
     (for a margin row g = (e_y - e_j)^T f, sup ||grad g||_q <= || max |G| ||_q);
   - masked product: the product of the layer norms of diag(m_k) W_k restricted to the neurons
     that can be active (m = max(|alpha|, |beta|)), i.e. the naive bound with stable neurons fixed.
   For l2 the slopes also feed LipSDP (``method="sdp"``), whose multipliers are verified as for
   the global bound.

4. Certificates. If margin_yj(x) > r K_yj(B(x, r)) for every j != y, no point of B(x, r) changes
   class: g(x') >= g(x) - K_yj ||x' - x|| > 0. lipcert searches r by bisection between the global
   radius (always certified) and margin / ||grad g(x)||_q (never certifiable), checking each
   candidate afresh; the returned radius is one that passed the check.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import check_choice, normalize_norm
from .errors import InputError
from .estimators.base import SAFETY
from .graph import Activation, Affine, Graph
from .result import Result

ROUND = 1e-9  # outward widening, relative to the sum of absolute terms (see the module docstring)
DUAL = {"2": 2.0, "inf": 1.0, "1": np.inf}


# --------------------------------------------------------------------------------------------
# The network as a chain of dense layers, and the region
# --------------------------------------------------------------------------------------------


@dataclass
class Chain:
    """z_{k+1} = W_k a_k + b_k with a_0 = x and a_k = acts[k-1](z_k): len(acts) = len(weights) - 1."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    acts: list[Activation]

    def __post_init__(self) -> None:
        self.abs_weights = [np.abs(w) for w in self.weights]  # used by every interval product

    @property
    def depth(self) -> int:
        return len(self.weights)


def chain_of(graph: Graph) -> Chain:
    """The dense affine/activation chain of ``graph``, or InputError saying why it is not one."""
    g = graph.merge_linear()
    hint = "local constants need a chain of dense (Gemm/MatMul/Conv) layers and elementwise activations; use the global bound"
    if not g.is_chain():
        raise InputError("the network is not a chain (it has residual branches or concatenations)", graph.source, hint)
    weights: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    acts: list[Activation] = []
    for n in g.nodes:
        if isinstance(n, Affine):
            if len(weights) > len(acts):
                raise InputError(f"node {n.name}: two affine layers in a row that could not be merged", graph.source, hint)
            W = n.lin.dense()
            if W is None:
                raise InputError(f"layer {n.name} ({n.op}) is too large for a dense matrix", graph.source, hint)
            W = np.asarray(W, np.float64)
            b = np.zeros(W.shape[0]) if n.bias is None else n.bias.detach().numpy().astype(np.float64).reshape(-1)
            weights.append(W)
            biases.append(np.broadcast_to(b, (W.shape[0],)).copy())
        elif isinstance(n, Activation):
            if len(weights) == len(acts):  # activation first or two in a row: an identity layer
                dim = weights[-1].shape[0] if weights else graph.input_dim
                weights.append(np.eye(dim))
                biases.append(np.zeros(dim))
            acts.append(n)
        else:
            raise InputError(f"node {n.name} ({type(n).__name__}) is not an affine layer or an elementwise activation", graph.source, hint)
    if len(weights) == len(acts):  # ends with an activation
        dim = weights[-1].shape[0]
        weights.append(np.eye(dim))
        biases.append(np.zeros(dim))
    return Chain(weights, biases, acts)


@dataclass
class Region:
    """An lp ball around ``center`` (``kind="ball"``) or a box [lo, hi] (``kind="box"``)."""

    kind: str
    center: np.ndarray  # flat
    radius: float = 0.0
    norm: str = "2"  # the ball's norm
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @staticmethod
    def ball(center: Any, radius: float, norm: Any = 2) -> "Region":
        if isinstance(radius, bool) or not (isinstance(radius, numbers.Real) and math.isfinite(radius) and radius >= 0):
            raise InputError(f"the radius must be a finite number >= 0, got {radius!r}", None, "give e.g. radius=0.05")
        c = np.asarray(center, np.float64).reshape(-1)
        if not np.isfinite(c).all():  # a NaN centre makes every interval NaN, and NaN compares as "stable"
            raise InputError("the centre contains NaN or infinite values", None, "give a finite centre")
        return Region("ball", c, float(radius), normalize_norm(norm, "Region"))

    @staticmethod
    def box(lo: Any, hi: Any) -> "Region":
        lo = np.asarray(lo, np.float64).reshape(-1)
        hi = np.asarray(hi, np.float64).reshape(-1)
        if lo.shape != hi.shape or not (np.isfinite(lo).all() and np.isfinite(hi).all()) or (lo > hi).any():
            raise InputError("a box needs finite lo <= hi of the same shape", None, "give lo and hi arrays with lo <= hi entrywise")
        return Region("box", (lo + hi) / 2, 0.0, "inf", lo, hi)

    def affine_range(self, A: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact [min, max] of A x + offset over the region (rows of A), widened for rounding."""
        mid = A @ self.center + offset
        mag = np.abs(A) @ np.abs(self.center) + np.abs(offset)
        if self.kind == "ball":
            rad = self.radius * np.linalg.norm(A, DUAL[self.norm], axis=1)
        else:
            rad = np.abs(A) @ ((self.hi - self.lo) / 2)
        slack = ROUND * (mag + rad)
        return mid - rad - slack, mid + rad + slack

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "ball":
            return {"kind": "ball", "norm": self.norm, "radius": self.radius, "center_dim": int(self.center.size)}
        return {"kind": "box", "width_max": float((self.hi - self.lo).max()), "center_dim": int(self.center.size)}


# --------------------------------------------------------------------------------------------
# Activations on an interval: slopes and linear relaxations
# --------------------------------------------------------------------------------------------

_PIECEWISE = ("relu", "leaky_relu")


def _neg_slope(act: Activation) -> float:
    return 0.0 if act.kind == "relu" else float(act.params["alpha"])


def _f(act: Activation, z: np.ndarray) -> np.ndarray:
    """act on flat per-neuron values, in the activation's own shape (PReLU's per-channel slopes)."""
    z = np.asarray(z, np.float64)
    return act.forward(torch.from_numpy(z.reshape(-1, *act.out_shape[1:]))).numpy().reshape(z.shape)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def slopes_on(act: Activation, l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron [alpha, beta] containing every difference quotient (and Clarke derivative) of
    the activation on [l, u]."""
    k = act.kind
    if k in _PIECEWISE:
        a = _neg_slope(act)
        lo_s, hi_s = min(a, 1.0), max(a, 1.0)
        alpha = np.where(l > 0, 1.0, np.where(u < 0, a, lo_s))
        beta = np.where(l > 0, 1.0, np.where(u < 0, a, hi_s))
        return alpha, beta
    if k in ("sigmoid", "tanh"):
        d = (lambda z: _sigmoid(z) * (1 - _sigmoid(z))) if k == "sigmoid" else (lambda z: 1 - np.tanh(z) ** 2)
        near = np.where((l <= 0) & (u >= 0), 0.0, np.where(l > 0, l, u))  # point of [l, u] nearest 0
        far = np.where(np.abs(l) > np.abs(u), l, u)
        tol = 1e-12
        return np.maximum(d(far) - tol, 0.0), d(near) + tol
    if k == "softplus":
        return np.maximum(_sigmoid(l) - 1e-12, 0.0), np.minimum(_sigmoid(u) + 1e-12, 1.0)
    if k == "prelu" and l.size == math.prod(act.out_shape):  # a leaky ReLU per channel
        a = act.neuron_slopes()
        alpha = np.where(l > 0, 1.0, np.where(u < 0, a, np.minimum(a, 1.0)))
        beta = np.where(l > 0, 1.0, np.where(u < 0, a, np.maximum(a, 1.0)))
        return alpha, beta
    a, b = act.slope_interval  # elu, clip: the global interval is always valid
    return np.full(l.shape, a), np.full(l.shape, b)


def relaxation(act: Activation, l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Lines with sl z + cl <= act(z) <= su z + cu on [l, u], per neuron."""
    alpha, beta = slopes_on(act, l, u)
    if act.kind in _PIECEWISE and _neg_slope(act) <= 1.0:
        # convex: the chord lies above; lines through 0 with slope a or 1 lie below
        a = _neg_slope(act)
        w = np.maximum(u - l, 1e-300)
        unstable = (l <= 0) & (u >= 0)
        chord = np.where(unstable, (u - a * l) / w, alpha)
        cu = np.where(unstable, a * l - chord * l, 0.0)
        cu = cu + ROUND * (np.abs(a * l) + np.abs(chord * l))  # rounding of the chord's offset
        sl = np.where(unstable, np.where(u >= -l, 1.0, a), alpha)
        return sl, np.zeros_like(l), chord, cu
    fl, fu = _f(act, l), _f(act, u)
    w = u - l
    wide = w > 1e-12
    s = np.where(wide, (fu - fl) / np.where(wide, w, 1.0), alpha)
    gl, gu = fl - s * l, fu - s * u  # g(z) = act(z) - s z at both ends; slopes of g in [alpha - s, beta - s]
    p, q = np.maximum(beta - s, 0.0), np.maximum(s - alpha, 0.0)
    bulge = np.where(p + q > 0, p * q * w / np.where(p + q > 0, p + q, 1.0), 0.0)
    tol = 1e-12 * (1 + np.abs(fl) + np.abs(fu) + np.abs(s * l) + np.abs(s * u))
    return s, np.minimum(gl, gu) - bulge - tol, s, np.maximum(gl, gu) + bulge + tol


# --------------------------------------------------------------------------------------------
# Pre-activation bounds
# --------------------------------------------------------------------------------------------


@dataclass
class Bounds:
    """Pre-activation bounds [lower[k], upper[k]] of hidden layer k over a region, and the slopes."""

    lower: list[np.ndarray]
    upper: list[np.ndarray]
    alphas: list[np.ndarray] = field(default_factory=list)
    betas: list[np.ndarray] = field(default_factory=list)

    def unstable(self) -> list[int]:
        return [int(np.sum(a != b)) for a, b in zip(self.alphas, self.betas)]


def _ibp_next(W: np.ndarray, absW: np.ndarray, b: np.ndarray, act: Activation, l: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interval bounds on W act(z) + b for z in [l, u] (monotone activations: the range is
    [act(l), act(u)]; others through their slope interval)."""
    monotone = act.kind in ("sigmoid", "tanh", "softplus") or (act.kind in _PIECEWISE and _neg_slope(act) >= 0)
    if monotone:
        lo, hi = _f(act, l), _f(act, u)
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        if act.kind not in _PIECEWISE:
            lo, hi = lo - 1e-12 * (1 + np.abs(lo)), hi + 1e-12 * (1 + np.abs(hi))
    else:  # act(z) in act(l) + [min(0, a, b), max(0, a, b)] (u - l)
        a, bb = act.slope_interval
        fl = _f(act, l)
        lo = fl + min(0.0, a, bb) * (u - l)
        hi = fl + max(0.0, a, bb) * (u - l)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    c = W @ mid + b
    r = absW @ rad
    slack = ROUND * (absW @ np.abs(mid) + np.abs(b) + r)
    return c - r - slack, c + r + slack


def _crown(chain: Chain, region: Region, k: int, rows: np.ndarray, relax: list[tuple[np.ndarray, ...]],
           terms: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """CROWN bounds on z_k[rows] (k >= 1: the output of the affine map chain.weights[k]).

    Rounding: the products A @ W_j err by at most n eps |A| |W_j| entrywise, and such an error
    moves the final bound by at most n eps |A| |W_j| |a_{j-1}| <= n eps |A| terms[j], with
    terms[j] = |W_j| max|a_{j-1}| + |b_j| over the region; ``mag`` sums these and every offset's
    absolute terms, and the bound is widened by ROUND times that sum."""
    out = []
    for sign in (1.0, -1.0):  # lower bound of sign * z
        A = sign * chain.weights[k][rows]
        off = sign * chain.biases[k][rows]
        mag = np.abs(off)
        for j in range(k - 1, -1, -1):
            sl, cl, su, cu = relax[j]
            pos, neg = np.maximum(A, 0.0), np.minimum(A, 0.0)
            A = pos * sl + neg * su
            off = off + pos @ cl + neg @ cu
            mag = mag + np.abs(pos) @ np.abs(cl) + np.abs(neg) @ np.abs(cu) + np.abs(A) @ terms[j]
            off = off + A @ chain.biases[j]
            A = A @ chain.weights[j]
        lo, _ = region.affine_range(A, off)
        lo = lo - ROUND * mag * (k + 1)
        out.append(lo)
    return out[0], -out[1]


def preactivation_bounds(chain: Chain, region: Region, method: str = "crown") -> Bounds:
    """Bounds on every hidden pre-activation over ``region`` (``method``: "ibp" or "crown")."""
    check_choice("preactivation_bounds", "method", method, ("ibp", "crown"))
    if region.center.size != chain.weights[0].shape[1]:
        raise InputError(f"the region has dimension {region.center.size}, the network's input {chain.weights[0].shape[1]}", None,
                         "give a centre with one value per network input")
    lower, upper, alphas, betas, relax = [], [], [], [], []
    if region.kind == "ball":
        size = np.abs(region.center) + region.radius  # |x_i - c_i| <= ||x - c||_p <= r
    else:
        size = np.maximum(np.abs(region.lo), np.abs(region.hi))
    terms = [chain.abs_weights[0] @ size + np.abs(chain.biases[0])]  # magnitudes of the summands, for rounding
    l, u = region.affine_range(chain.weights[0], chain.biases[0])
    for k in range(1, chain.depth):
        act = chain.acts[k - 1]
        lower.append(l)
        upper.append(u)
        a, b = slopes_on(act, l, u)
        alphas.append(a)
        betas.append(b)
        if k == chain.depth - 1:
            break
        relax.append(relaxation(act, l, u))
        smax = max(abs(v) for v in act.slope_interval)
        size = np.abs(_f(act, l)) + smax * (u - l)  # |act(z)| <= |act(l)| + max slope (z - l)
        terms.append(chain.abs_weights[k] @ size + np.abs(chain.biases[k]))
        l, u = _ibp_next(chain.weights[k], chain.abs_weights[k], chain.biases[k], act, l, u)
        if method == "crown":
            # only neurons the intervals leave unstable (or, for smooth activations, all) need CROWN
            nxt = chain.acts[k]
            rows = np.flatnonzero((l <= 0) & (u >= 0)) if nxt.kind in _PIECEWISE else np.arange(l.size)
            if rows.size:
                cl, cu = _crown(chain, region, k, rows, relax, terms)
                l[rows], u[rows] = np.maximum(l[rows], cl), np.minimum(u[rows], cu)
    return Bounds(lower, upper, alphas, betas)


# --------------------------------------------------------------------------------------------
# Local constants
# --------------------------------------------------------------------------------------------


def jacobian_intervals(chain: Chain, bounds: Bounds, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entrywise [lo, hi] bounds on rows @ J for every Jacobian J the region allows (rows: m x n_out)."""
    mid = np.asarray(rows, np.float64) @ chain.weights[-1]
    rad = ROUND * (np.abs(rows) @ chain.abs_weights[-1])
    for j in range(chain.depth - 2, -1, -1):
        a, b = bounds.alphas[j], bounds.betas[j]
        lo, hi = mid - rad, mid + rad
        cands = np.stack([lo * a, lo * b, hi * a, hi * b])
        lo, hi = cands.min(0), cands.max(0)
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        W, absW = chain.weights[j], chain.abs_weights[j]
        new_rad = rad @ absW
        new_rad += ROUND * ((np.abs(mid) + rad) @ absW)
        mid, rad = mid @ W, new_rad * (1 + ROUND)
    return mid - rad, mid + rad


def _layer_norm(M: np.ndarray, norm: str) -> float:
    if M.size == 0:
        return 0.0
    if norm == "2":
        if min(M.shape) > 32:  # Gram iteration: a proven bound, several times cheaper than an SVD here
            from .estimators.gram import gram_bound

            return gram_bound(M, 8)
        return float(np.linalg.norm(M, 2))
    return float(np.linalg.norm(M, np.inf if norm == "inf" else 1))


def masked_prefix(chain: Chain, bounds: Bounds, norm: str) -> tuple[float, np.ndarray]:
    """The naive bound with stable neurons fixed, up to the last hidden layer:
    prod_k ||diag(m_k) W_k restricted|| (a neuron whose slope is exactly 0 drops out of both
    adjacent layers), and the mask of the last hidden layer's neurons that remain."""
    value = 1.0
    keep_prev = np.ones(chain.weights[0].shape[1], bool)
    for k in range(chain.depth - 1):
        m = np.maximum(np.abs(bounds.alphas[k]), np.abs(bounds.betas[k]))
        keep = m > 0
        M = m[keep, None] * chain.weights[k][np.ix_(keep, keep_prev)]
        value *= _layer_norm(M, norm) * (1 + SAFETY)
        keep_prev = keep
    return value, keep_prev


def masked_product(chain: Chain, bounds: Bounds, norm: str, last: np.ndarray | None = None,
                   prefix: tuple[float, np.ndarray] | None = None) -> float:
    """``masked_prefix`` times the norm of the last layer (or of ``last``) on the remaining neurons."""
    value, keep = prefix or masked_prefix(chain, bounds, norm)
    W = chain.weights[-1] if last is None else np.atleast_2d(last)
    return value * _layer_norm(W[:, keep], norm) * (1 + SAFETY)


def margin_rows(k: int, y: int) -> tuple[list[int], np.ndarray]:
    others = [j for j in range(k) if j != y]
    rows = np.zeros((len(others), k))
    rows[:, y] = 1.0
    rows[np.arange(len(others)), others] = -1.0
    return others, rows


def margin_constants(chain: Chain, bounds: Bounds, norm: str, rows: np.ndarray, sdp: bool = False,
                     masked: bool = False) -> tuple[np.ndarray, list[str]]:
    """Proven local constants of each scalar function rows[i] @ f over the region of ``bounds``
    (input norm ``norm``; for a scalar function the constant is the dual norm of its gradient).
    The smallest of: the interval Jacobian, the masked product (always for linf and l1; for l2
    with ``masked``), and with ``sdp`` (l2) LipSDP with the local slopes."""
    lo, hi = jacobian_intervals(chain, bounds, rows)
    big = np.maximum(np.abs(lo), np.abs(hi))
    interval = np.linalg.norm(big, DUAL[norm], axis=1) * (1 + SAFETY)
    values, how = [], []
    # the same for every row; for l2 it needs spectral norms, and the interval Jacobian is the
    # tighter one on every network measured (benchmarks/RESULTS.md), so it is left out there
    prefix = masked_prefix(chain, bounds, norm) if norm != "2" or masked else None
    for i, row in enumerate(rows):
        best, label = float(interval[i]), "interval Jacobian"
        masked = masked_product(chain, bounds, norm, last=row @ chain.weights[-1], prefix=prefix) if prefix else math.inf
        if masked < best:
            best, label = masked, "masked product"
        values.append(best)
        how.append(label)
    values = np.array(values)
    if sdp and norm == "2":
        got = _local_sdp(chain, bounds, list(rows @ chain.weights[-1]))
        for i, v in enumerate(got):
            if v is not None and v < values[i]:
                values[i], how[i] = v, "LipSDP local slopes"
    return values, how


def _local_sdp(chain: Chain, bounds: Bounds, lasts: list[np.ndarray]) -> list[float | None]:
    """LipSDP with the local per-neuron slopes (stably inactive neurons removed), one solve per
    last layer in ``lasts`` (a matrix, or a row for a margin)."""
    from .config import Settings
    from .sdp.solve import solve_problem
    from .sdp.problem import LipSDPProblem

    keeps = [np.maximum(np.abs(a), np.abs(b)) > 0 for a, b in zip(bounds.alphas, bounds.betas)]
    weights, alphas, betas = [], [], []
    prev = np.ones(chain.weights[0].shape[1], bool)
    for k, keep in enumerate(keeps):
        weights.append(chain.weights[k][np.ix_(keep, prev)])
        alphas.append(bounds.alphas[k][keep])
        betas.append(bounds.betas[k][keep])
        prev = keep
    if any(w.shape[0] == 0 for w in weights):
        return [0.0 for _ in lasts]  # a layer with no active neuron: the function is constant
    out: list[float | None] = []
    for last in lasts:
        problem = LipSDPProblem([*weights, np.atleast_2d(last)[:, prev]], alphas, betas)
        solved = solve_problem(problem, Settings(norm="2"))
        out.append(solved.value)
    return out


def whole_constant(chain: Chain, bounds: Bounds, norm: str, sdp: bool = False) -> tuple[float, str]:
    """A proven local constant of the whole network (same norm on input and output)."""
    lo, hi = jacobian_intervals(chain, bounds, np.eye(chain.weights[-1].shape[0]))
    big = np.maximum(np.abs(lo), np.abs(hi))
    best, how = _layer_norm(big, norm) * (1 + SAFETY), "interval Jacobian"  # ||J|| <= || |J| || <= ||max|J|||
    # J = mid + D with |D| <= rad entrywise: ||J|| <= ||mid|| + ||rad|| (exact when no neuron is unstable)
    split = (_layer_norm((lo + hi) / 2, norm) + _layer_norm((hi - lo) / 2, norm)) * (1 + 4 * SAFETY)
    if split < best:
        best = split
    masked = masked_product(chain, bounds, norm)
    if masked < best:
        best, how = masked, "masked product"
    if sdp and norm == "2":
        got = _local_sdp(chain, bounds, [chain.weights[-1]])
        if got[0] is not None and got[0] < best:
            best, how = got[0], "LipSDP local slopes"
    return best, how


LOCAL_METHODS = ("naive", "sdp")


def local_bound(model: Any, center: Any = None, radius: float | None = None, norm: Any = 2, method: str = "naive",
                box: tuple[Any, Any] | None = None, bounds: str = "crown", input_shape: tuple[int, ...] | None = None) -> Result:
    """A proven Lipschitz constant of ``model`` over a region: the ball of ``norm`` with
    ``radius`` around ``center``, or ``box=(lo, hi)``.

    ``||f(x) - f(y)|| <= value * ||x - y||`` (in ``norm``) for all x, y in the region.
    ``method``: "naive" (interval Jacobian and the layer-norm product with stable neurons
    fixed, the smaller) or "sdp" (also LipSDP with the local slopes; l2 only).
    ``bounds``: "crown" (linear bound propagation) or "ibp" (intervals) for the pre-activation
    ranges. The Result's ``details`` has the region and the number of unstable neurons per layer.
    """
    from .load import load

    start = time.perf_counter()
    graph = load(model, input_shape)
    norm = normalize_norm(norm, "local_bound")
    check_choice("local_bound", "method", method, LOCAL_METHODS)
    check_choice("local_bound", "bounds", bounds, ("ibp", "crown"))  # before preactivation_bounds() names itself
    if method == "sdp" and norm != "2":
        raise InputError("method 'sdp' bounds the l2 norm only", graph.source, "use norm=2 or method='naive'")
    if box is not None:
        region = Region.box(*box)
    else:
        if center is None or radius is None:
            raise InputError("give a centre and a radius (or a box)", graph.source, "e.g. local_bound(model, x, 0.05, norm=2)")
        region = Region.ball(center, radius, norm)
    chain = chain_of(graph)
    b = preactivation_bounds(chain, region, bounds)
    value, how = whole_constant(chain, b, norm, sdp=method == "sdp")
    return Result(
        method=f"local-{method}", kind="upper", norm=norm, value=value, certified=True, time_s=time.perf_counter() - start,
        settings={"norm": norm, "method": method, "bounds": bounds, "safety_margin": SAFETY, "rounding_widening": ROUND},
        model=graph.source, sha256=graph.sha256,
        details={"region": region.to_dict(), "how": how, "unstable_neurons": b.unstable(), "neurons": [a.size for a in b.alphas]},
    )


# --------------------------------------------------------------------------------------------
# Certified radii from local constants
# --------------------------------------------------------------------------------------------


@dataclass
class LocalRadius:
    radius: float
    how: str  # which constant certified it
    checks: int  # bound computations made
    time_s: float


def point_gradients(graph: Graph, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Gradients of rows @ f at x (m x n_in), by one backward pass over a batch of copies of x."""
    xt = torch.from_numpy(np.repeat(x.reshape(1, *graph.input_shape), len(rows), axis=0)).requires_grad_(True)
    out = graph.forward(xt).reshape(len(rows), -1)
    (g,) = torch.autograd.grad((out * torch.from_numpy(rows)).sum(), xt)
    return g.reshape(len(rows), -1).numpy()


def local_radius(graph: Graph, chain: Chain, x: np.ndarray, y: int, margins: np.ndarray, norm: str, start: float,
                 bounds: str = "crown", sdp: bool = False, steps: int = 14, rel_tol: float = 0.02) -> LocalRadius:
    """The largest radius (within ``rel_tol``, at most ``steps`` checks) at which the local margin
    constants certify class ``y`` at ``x``; ``start`` is a radius known to be certified."""
    t0 = time.perf_counter()
    k = chain.weights[-1].shape[0]
    _, rows = margin_rows(k, y)
    grads = point_gradients(graph, x, rows)
    gnorm = np.linalg.norm(grads, DUAL[norm], axis=1)
    with np.errstate(divide="ignore"):
        hi = float(np.min(np.where(gnorm > 0, margins / gnorm, np.inf)))
    if not math.isfinite(hi):
        hi = max(start, 1.0) * 1e6
    lo, how, checks = start, "global", 0

    def certifies(r: float) -> str | None:
        region = Region.ball(x, r, norm)
        b = preactivation_bounds(chain, region, bounds)
        consts, labels = margin_constants(chain, b, norm, rows, sdp=sdp)
        return labels[int(np.argmax(r * consts - margins))] if np.all(margins > r * consts) else None

    # geometric bisection: radii span decades
    floor = hi * 1e-6  # below this, a zero start is not worth refining
    while checks < steps and hi > max(lo, floor) * (1 + rel_tol):
        r = math.sqrt(max(lo, floor) * hi)
        checks += 1
        got = certifies(r)
        if got is not None:
            lo, how = r, f"local ({got})"
        else:
            hi = r
    return LocalRadius(lo, how, checks, time.perf_counter() - t0)


def local_radii(graph: Graph, xs: np.ndarray, labels: np.ndarray, logits: np.ndarray, norm: str, start: np.ndarray,
                sdp: bool = False, on_point: Any = None) -> tuple[np.ndarray, list[str]]:
    """Local certified radii of a batch (radius 0 where misclassified), never below ``start``
    (radii already certified, e.g. by the global constants), and which constant certified each."""
    chain = chain_of(graph)
    radii, how = np.asarray(start, np.float64).copy(), ["global"] * len(xs)
    for i, (row, y) in enumerate(zip(logits, labels)):
        if row.argmax() != y:
            how[i] = "misclassified"
            continue
        _, rows = margin_rows(len(row), int(y))
        got = local_radius(graph, chain, np.asarray(xs[i], np.float64).reshape(-1), int(y), rows @ row, norm, float(radii[i]), sdp=sdp)
        if got.radius > radii[i]:
            radii[i], how[i] = got.radius, got.how
        if on_point is not None:
            on_point(i)
    return radii, how
