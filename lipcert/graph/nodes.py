"""Graph nodes: affine maps, elementwise activations, max-pooling, sorting, L2-norm pooling, sums,
elementwise maxima and concatenations.

Each node names its producers in ``inputs`` (node names, or ``Graph.INPUT``), knows its output
shape, computes its forward pass on a batch ``(B, *shape)`` in float64, and gives its Lipschitz
constant from its inputs to its output per norm (``lipschitz``), with ``exact`` telling whether
that value is the exact operator norm (True) or a proven upper bound (False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .linear import LinearOp


@dataclass
class Node:
    name: str
    op: str  # the source op type(s), e.g. "Gemm" or "Sub+Flatten+MatMul+Add"
    inputs: list[str]
    out_shape: tuple[int, ...]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        return []


@dataclass
class Affine(Node):
    """y = A x + b with A a LinearOp."""

    lin: LinearOp = None  # type: ignore[assignment]
    bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin.apply(x)
        return y if self.bias is None else y + self.bias.to(y.device)

    def parameters(self) -> list[torch.Tensor]:
        return self.lin.parameters() + ([self.bias] if self.bias is not None else [])

    def lipschitz(self, p: str) -> tuple[float, bool, str]:
        return self.lin.norm_bound(p)


# name -> (forward, slope interval from params)
def _prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, x * slope.to(x.device))


@dataclass
class Activation(Node):
    """An elementwise activation whose slopes lie in ``slope_interval`` = [alpha, beta]."""

    kind: str = "relu"
    params: dict = field(default_factory=dict)

    KINDS = ("relu", "leaky_relu", "prelu", "sigmoid", "tanh", "elu", "softplus", "clip", "abs")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; known: {self.KINDS}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, p = self.kind, self.params
        if k == "relu":
            return torch.relu(x)
        if k == "leaky_relu":
            return F.leaky_relu(x, p["alpha"])
        if k == "prelu":
            return _prelu(x, p["slope"])
        if k == "sigmoid":
            return torch.sigmoid(x)
        if k == "tanh":
            return torch.tanh(x)
        if k == "elu":
            return F.elu(x, p["alpha"])
        if k == "softplus":
            return F.softplus(x)
        if k == "clip":
            return torch.clamp(x, p.get("min"), p.get("max"))
        if k == "abs":
            return torch.abs(x)
        raise AssertionError(k)

    @property
    def slope_interval(self) -> tuple[float, float]:
        """[alpha, beta] with alpha <= (f(a) - f(b)) / (a - b) <= beta for all a != b."""
        k, p = self.kind, self.params
        if k == "leaky_relu":
            a = float(p["alpha"])
            return (min(a, 1.0), max(a, 1.0))
        if k == "prelu":
            s = p["slope"]
            return (min(float(s.min()), 1.0), max(float(s.max()), 1.0))
        if k == "sigmoid":
            return (0.0, 0.25)
        if k == "elu":
            a = float(p["alpha"])  # slope a*exp(x) on x < 0, 1 on x > 0
            return (min(0.0, a), max(1.0, a))
        if k == "clip":
            lo, hi = p.get("min"), p.get("max")
            return (0.0, 0.0 if lo is not None and hi is not None and hi <= lo else 1.0)
        if k == "abs":  # | |a| - |b| | <= |a - b|, and the slope is -1 left of 0
            return (-1.0, 1.0)
        return (0.0, 1.0)  # relu, tanh, softplus

    def parameters(self) -> list[torch.Tensor]:
        return [self.params["slope"]] if self.kind == "prelu" else []

    def neuron_slopes(self) -> np.ndarray:
        """PReLU's negative-side slope of every neuron, flat: its slopes (per channel, (C, 1, 1)
        after a convolution) broadcast over the output shape."""
        return np.broadcast_to(self.params["slope"].numpy(), self.out_shape).ravel()

    def lipschitz(self, p: str) -> tuple[float, bool, str]:
        # elementwise and slope-restricted: the same constant for every p-norm
        a, b = self.slope_interval
        return max(abs(a), abs(b)), True, f"slope in [{a:g}, {b:g}]"


@dataclass
class MaxPool(Node):
    """Max-pooling. With overlapping windows an input entry is in up to m windows, and the
    Lipschitz constant is at most sqrt(m) (l2), 1 (linf) and m (l1)."""

    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()

    def _padded(self, x: torch.Tensor, value: float) -> torch.Tensor:
        nd = len(self.kernel)
        pads: list[int] = []
        for b, e in zip(reversed(self.pads[:nd]), reversed(self.pads[nd:])):
            pads += [b, e]
        return F.pad(x, pads, value=value) if any(pads) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:2]
        x = self._padded(x.reshape(-1, *self.in_shape[1:]), -math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(self.kernel) - 1]
        y = fn(x, self.kernel, self.strides, dilation=self.dilations)
        return y.reshape(*lead, *y.shape[1:])

    @property
    def max_windows_per_entry(self) -> int:
        """The largest number of pooling windows that contain one input entry."""
        nd = len(self.kernel)
        ones = torch.ones((1, *self.in_shape[1:]), dtype=torch.float64)
        x = self._padded(ones, 0.0)
        # count windows through the adjoint of a sum over each window (unit kernel of ones)
        channels = x.shape[1]
        weight = torch.ones((channels, 1, *self.kernel), dtype=torch.float64)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        _, vjp = torch.func.vjp(lambda t: conv(t, weight, stride=self.strides, dilation=self.dilations, groups=channels), x)
        out = conv(x, weight, stride=self.strides, dilation=self.dilations, groups=channels)
        counts = vjp(torch.ones_like(out))[0] * x  # padded entries do not count
        return int(round(float(counts.max())))

    def lipschitz(self, p: str) -> tuple[float, bool, str]:
        m = self.max_windows_per_entry
        if m <= 1:
            return 1.0, True, "non-overlapping windows"
        value = {"2": math.sqrt(m), "inf": 1.0, "1": float(m)}[p]
        return value, p == "inf", f"windows overlap: each entry in <= {m} windows"


@dataclass
class Sum(Node):
    """y = sum_i c_i x_i (residual Add, Sub of two branches)."""

    coeffs: tuple[float, ...] = (1.0, 1.0)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0] * self.coeffs[0]
        for c, x in zip(self.coeffs[1:], xs[1:]):
            out = out + c * x
        return out


@dataclass
class Concat(Node):
    """Concatenation of branches along one axis of the ONNX shape."""

    axis: int = 0

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.axis + 1)


@dataclass
class Sort(Node):
    """Order statistics along one axis: ``y = sort(x, axis)[ranks]`` (ascending; ``ranks`` are
    positions in the sorted order, e.g. ``(n-1,)`` for ReduceMax, ``(0, n-1)`` for the concatenated
    min and max of GroupSort2/MaxMin, ``(n-1, ..., n-k)`` for TopK).

    Proof of the constant. For vectors a, b of one group, ``||sort(a) - sort(b)||_p <= ||a - b||_p``
    for every p >= 1 (rearrangement: if a_i < a_j and b_i > b_j, swapping b_i, b_j does not increase
    sum_i |a_i - b_i|^p, since t -> |t|^p is convex; repeated swaps sort b, and for p = inf take the
    limit). Each axis fibre is one group and the fibres are disjoint, so the full sort is 1-Lipschitz
    in l1, l2 and linf. Selecting the ranks is a coordinate projection P; when a rank appears c times
    ||P y||_p <= c^(1/p) ||y||_p. So L = c^(1/2) (l2), 1 (linf), c (l1); for distinct ranks L = 1.
    These values are attained (move only the selected entry of one fibre), so they are exact."""

    axis: int = 0  # axis of the (batch-free) input shape
    ranks: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = self.in_shape[self.axis] if self.in_shape else 0
        if not self.ranks or any(not 0 <= r < n for r in self.ranks):
            raise ValueError(f"ranks {self.ranks} must be positions in an axis of size {n}")
        self._index = torch.tensor(self.ranks, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = torch.sort(x, dim=self.axis + 1).values
        if self.ranks == tuple(range(self.in_shape[self.axis])):
            return values
        return values.index_select(self.axis + 1, self._index.to(x.device))

    @property
    def multiplicity(self) -> int:
        return max(self.ranks.count(r) for r in set(self.ranks))

    def lipschitz(self, p: str) -> tuple[float, bool, str]:
        c = self.multiplicity
        if c == 1:
            return 1.0, True, "sorting / order statistics: 1-Lipschitz in every lp"
        return {"2": math.sqrt(c), "inf": 1.0, "1": float(c)}[p], True, f"order statistics, a rank repeated {c} times"

    def describe(self) -> str:
        n = self.in_shape[self.axis]
        what = "full sort" if self.ranks == tuple(range(n)) else f"ranks {list(self.ranks)}"
        return f"{what} of groups of {n} along axis {self.axis}"


@dataclass
class NormPool(Node):
    """L2-norm pooling: ``y_w = c * sqrt(sum_i a_wi x_i^2)`` for the non-negative weights ``a`` of
    an average pooling ``pool`` (LPPool with p = 2 is c = sqrt(kernel size)).

    Proof of the constants. With D_w = diag(a_w.), ``y_w = c ||D_w^(1/2) x||_2``, so by the triangle
    inequality |y_w(x) - y_w(x')| <= c ||D_w^(1/2) d||_2 with d = x - x'. Then
      l2:   ||dy||^2 <= c^2 sum_w sum_i a_wi d_i^2 <= c^2 max_i (sum_w a_wi) ||d||^2, so
            L = c sqrt(||A||_1) (A's largest column sum);
      linf: |dy_w| <= c sqrt(sum_i a_wi) ||d||_inf, so L = c sqrt(||A||_inf) (largest row sum);
      l1:   |dy_w| <= c ||D_w^(1/2) d||_1, so L = c max_i sum_w sqrt(a_wi).
    Each is attained (from x' = 0: one entry moved for l2 and l1, one whole window for linf), so
    the values are exact. Disjoint windows of k entries with c = sqrt(k) give 1 in l2."""

    pool: object = None  # an AvgPool LinearOp
    factor: float = 1.0  # c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool.apply(x * x)
        # sqrt with a zero gradient at 0 (instead of inf), so that searches never see NaN
        positive = s > 0
        return self.factor * torch.where(positive, s, torch.ones_like(s)).sqrt() * positive

    def lipschitz(self, p: str) -> tuple[float, bool, str]:
        c = abs(self.factor)
        if p == "2":
            return c * math.sqrt(self.pool.exact_norm("1")), True, "L2-norm pooling: c sqrt(max column sum)"
        if p == "inf":
            return c * math.sqrt(self.pool.exact_norm("inf")), True, "L2-norm pooling: c sqrt(max row sum)"
        # sqrt(a_wi) = a_wi sqrt(d_w) where a_wi = 1 / d_w on the window's entries
        divisor = self.pool._divisor
        if divisor is None:
            divisor = torch.full((1, *self.pool.out_shape), float(np.prod(self.pool.kernel)), dtype=torch.float64)
        colsums = self.pool.adjoint(divisor.sqrt())
        return c * float(colsums.max()), True, "L2-norm pooling: c max_i sum_w sqrt(a_wi)"

    def describe(self) -> str:
        return f"l2 norm of windows {self.pool.kernel}, strides {self.pool.strides}, times {self.factor:g}"


@dataclass
class Extremum(Node):
    """Elementwise max (``mode="max"``) or min of several tensors of one shape (ONNX Max / Min).

    |max_j a_j - max_j b_j| <= max_j |a_j - b_j| (likewise for min), so per entry the change is at
    most that of the concatenation of the inputs: the constant composes like Concat's, with
    sqrt(sum_j L_j^2) (l2), max_j L_j (linf) and sum_j L_j (l1)."""

    mode: str = "max"

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        fn = torch.maximum if self.mode == "max" else torch.minimum
        for x in xs[1:]:
            out = fn(out, x)
        return out


def finite(t: torch.Tensor | np.ndarray) -> bool:
    return bool(torch.isfinite(torch.as_tensor(t)).all())
