"""Linear operators: the linear part of every affine node of a Graph.

Every operator acts on a batch ``x`` of shape ``(B, *in_shape)`` (float64 torch tensors) and
answers ``apply``, ``adjoint``, ``dense`` (when small) and ``exact_norm(p)`` for p in
{"2", "inf", "1"} (None where no exact value is cheap). ``norm_bound(p)`` always gives a proven
upper bound: the exact norm when there is one, otherwise a sound bound.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

NORMS: tuple[str, ...] = ("2", "inf", "1")
# Largest dense matrix (entries) we build to take an exact norm: 4096 x 6144 floats = 200 MB.
DENSE_LIMIT = 4096 * 6144
# Largest l2 SVD taken on a dense matrix (about n_min^2 n_max flops: 2048^3, a few seconds); larger
# operators get proven bounds (convolutions: see convnorm) instead of minutes of SVD.
DENSE_SVD_FLOPS = 2048**3


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def vjp_linear(fn, in_shape: tuple[int, ...], y: torch.Tensor) -> torch.Tensor:
    """A^T y for the linear map ``fn`` on batches (B, *in_shape), by plain autograd (torch.func
    would first import functorch, seconds on a cold start): the gradient of the scalar <A x, y>
    in x. A scalar output, not ``grad_outputs=y``: torch checks a tensor of output gradients
    with its symbolic-shape module, whose first import (sympy) takes half a second."""
    with torch.enable_grad():
        x0 = torch.zeros((y.shape[0], *in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
        out = fn(x0)
        (g,) = torch.autograd.grad((out * y.reshape(out.shape)).sum(), x0, allow_unused=True)
    return torch.zeros_like(x0) if g is None else g.detach()


def dense_norm(a: np.ndarray, p: str) -> float:
    """Exact operator norm of a dense matrix for the l2, linf or l1 vector norm."""
    if a.size == 0:
        return 0.0
    if p == "2":  # numpy's LAPACK SVD: importing scipy.linalg alone takes seconds
        return float(np.linalg.svd(a, compute_uv=False)[0])
    if p == "inf":
        return float(np.abs(a).sum(axis=1).max())
    if p == "1":
        return float(np.abs(a).sum(axis=0).max())
    raise ValueError(f"norm must be one of {NORMS}, got {p!r}")


class LinearOp:
    """Base class. Subclasses set ``in_shape``, ``out_shape``, ``kind`` and implement ``apply``."""

    kind = "linear"
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y for a batch y of shape (B, *out_shape), through autograd of ``apply``."""
        return vjp_linear(self.apply, self.in_shape, y)

    @property
    def in_dim(self) -> int:
        return _numel(self.in_shape)

    @property
    def out_dim(self) -> int:
        return _numel(self.out_shape)

    def parameters(self) -> list[torch.Tensor]:
        """Tensors whose entries must be finite (checked at load time)."""
        return []

    def dense(self, limit: int | None = None) -> np.ndarray | None:
        """The (out_dim x in_dim) matrix, or None when it has more than ``limit`` entries
        (default ``DENSE_LIMIT``)."""
        if self.in_dim * self.out_dim > (DENSE_LIMIT if limit is None else limit):
            return None
        return self._dense

    @cached_property
    def _dense(self) -> np.ndarray:
        # probe with unit vectors on the smaller side: columns A e_i, or rows A^T e_j
        use_rows = self.out_dim < self.in_dim
        n, shape, fn = (self.out_dim, self.out_shape, self.adjoint) if use_rows else (self.in_dim, self.in_shape, self.apply)
        parts = []
        eye = torch.eye(n, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, n, 1024):
                chunk = eye[start : start + 1024].reshape(-1, *shape)
                parts.append(fn(chunk).reshape(chunk.shape[0], -1).detach())
        stacked = torch.cat(parts)
        return (stacked if use_rows else stacked.T).contiguous().numpy()

    def exact_norm(self, p: str) -> float | None:
        """Exact operator norm (None where it would need a too large dense matrix, or for l2 an
        SVD of more than DENSE_SVD_FLOPS)."""
        if p == "2" and min(self.in_dim, self.out_dim) ** 2 * max(self.in_dim, self.out_dim) > DENSE_SVD_FLOPS:
            return None
        a = self.dense()
        return None if a is None else self._cached_dense_norm(p)

    def _cached_dense_norm(self, p: str) -> float:
        cache = self.__dict__.setdefault("_norm_cache", {})
        if p not in cache:
            cache[p] = dense_norm(self._dense, p)
        return cache[p]

    def norm_bound(self, p: str) -> tuple[float, bool, str]:
        """(value, exact, how): a proven upper bound on the operator norm."""
        exact = self.exact_norm(p)
        if exact is not None:
            return exact, True, f"dense {'svd' if p == '2' else 'row/col sums'}"
        if p == "2":
            n1, ninf = self.norm_bound("1")[0], self.norm_bound("inf")[0]
            return math.sqrt(n1 * ninf), False, "sqrt(l1 * linf)"
        raise NotImplementedError(f"{type(self).__name__} has no l{p} bound")

    def describe(self) -> str:
        return f"{self.kind} {self.in_shape}->{self.out_shape}"


class Reshape(LinearOp):
    """Reshape, flatten, squeeze, unsqueeze and identity: an isometry for every norm."""

    kind = "reshape"

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        if _numel(in_shape) != _numel(out_shape):
            raise ValueError(f"cannot reshape {in_shape} into {out_shape}")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.out_shape)

    def exact_norm(self, p: str) -> float:
        return 1.0 if self.in_dim else 0.0


class Transpose(LinearOp):
    """A permutation of axes: an isometry for every norm."""

    kind = "transpose"

    def __init__(self, in_shape: tuple[int, ...], perm: tuple[int, ...]) -> None:
        if sorted(perm) != list(range(len(in_shape))):
            raise ValueError(f"perm {perm} is not a permutation of the axes of {in_shape}")
        self.in_shape, self.perm = tuple(in_shape), tuple(perm)
        self.out_shape = tuple(in_shape[i] for i in perm)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, *[i + 1 for i in self.perm])

    def exact_norm(self, p: str) -> float:
        return 1.0


class Pad(LinearOp):
    """Zero padding (or cropping, for negative pads): the norm is 1 unless nothing is kept."""

    kind = "pad"

    def __init__(self, in_shape: tuple[int, ...], begins: tuple[int, ...], ends: tuple[int, ...]) -> None:
        self.in_shape, self.begins, self.ends = tuple(in_shape), tuple(begins), tuple(ends)
        self.out_shape = tuple(n + b + e for n, b, e in zip(in_shape, begins, ends))
        if any(n <= 0 for n in self.out_shape):
            raise ValueError(f"padding {begins},{ends} leaves an empty tensor from {in_shape}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for b, e in zip(reversed(self.begins), reversed(self.ends)):
            pads += [b, e]
        return F.pad(x, pads + [0, 0])

    def exact_norm(self, p: str) -> float:
        return 1.0


class Scale(LinearOp):
    """Elementwise multiplication by a constant (batch-norm, Mul/Div by constants): a diagonal."""

    kind = "scale"

    def __init__(self, in_shape: tuple[int, ...], factor: np.ndarray) -> None:
        factor = np.asarray(factor, dtype=np.float64)
        try:
            full = np.broadcast_to(factor, in_shape)
        except ValueError as exc:
            raise ValueError(f"scale of shape {factor.shape} does not broadcast to {in_shape}") from exc
        self.in_shape = self.out_shape = tuple(in_shape)
        self.factor = torch.from_numpy(np.array(full, dtype=np.float64))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor.to(x.device)

    def parameters(self) -> list[torch.Tensor]:
        return [self.factor]

    def exact_norm(self, p: str) -> float:
        return float(self.factor.abs().max()) if self.factor.numel() else 0.0


class MatMul(LinearOp):
    """Multiplication by a constant matrix along one axis.

    ``axis=-1``: y[..., i] = sum_k W[i, k] x[..., k]  (Gemm, MatMul with a constant right operand).
    ``axis=-2``: y[..., i, j] = sum_k W[i, k] x[..., k, j]  (MatMul with a constant left operand).
    Over the other axes it is block-diagonal, so its l2, l1 and linf norms are those of W.
    """

    kind = "matmul"

    def __init__(self, in_shape: tuple[int, ...], weight: np.ndarray, axis: int = -1) -> None:
        weight = np.asarray(weight, dtype=np.float64)
        if weight.ndim != 2 or axis not in (-1, -2) or len(in_shape) < -axis:
            raise ValueError(f"MatMul needs a 2-D weight and an axis of the input, got {weight.shape}, {axis}")
        if in_shape[axis] != weight.shape[1]:
            raise ValueError(f"weight {weight.shape} does not fit input axis of size {in_shape[axis]}")
        self.weight = torch.from_numpy(np.array(weight, dtype=np.float64))
        self.axis = axis
        out = list(in_shape)
        out[axis] = weight.shape[0]
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.device)
        return x @ w.T if self.axis == -1 else w @ x

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight]

    @property
    def is_plain_matrix(self) -> bool:
        """True when the op is exactly W acting on the flattened input."""
        return self.in_dim == self.weight.shape[1]

    def exact_norm(self, p: str) -> float:
        cache = self.__dict__.setdefault("_norm_cache", {})
        if p not in cache:
            cache[p] = dense_norm(self.weight.numpy(), p)
        return cache[p]

    def dense(self, limit: int | None = None) -> np.ndarray | None:
        if self.is_plain_matrix and self.axis == -1:
            return self.weight.numpy()
        return super().dense(limit)


class Conv(LinearOp):
    """N-d convolution (N = 1, 2, 3) or transposed convolution, without bias.

    The input carries the ONNX layout ``(N, C, *spatial)`` with its own leading ONNX batch axis.
    """

    kind = "conv"

    def __init__(
        self,
        in_shape: tuple[int, ...],
        weight: np.ndarray,
        strides: tuple[int, ...],
        pads: tuple[int, ...],  # ONNX order: begins of every spatial axis, then ends
        dilations: tuple[int, ...],
        groups: int = 1,
        transposed: bool = False,
        output_padding: tuple[int, ...] | None = None,
    ) -> None:
        weight = np.asarray(weight, dtype=np.float64)
        nd = weight.ndim - 2
        if nd not in (1, 2, 3) or len(in_shape) != nd + 2:
            raise ValueError(f"convolution weight {weight.shape} does not fit an input of shape {in_shape}")
        self.in_shape, self.nd = tuple(in_shape), nd
        self.weight = torch.from_numpy(np.array(weight, dtype=np.float64))
        self.strides, self.dilations, self.groups = tuple(strides), tuple(dilations), int(groups)
        self.begins, self.ends = tuple(pads[:nd]), tuple(pads[nd:])
        self.transposed = transposed
        self.output_padding = tuple(output_padding or (0,) * nd)
        in_channels = weight.shape[0] if transposed else weight.shape[1] * self.groups
        if in_shape[1] != in_channels:
            raise ValueError(f"convolution expects {in_channels} input channels, the input has {in_shape[1]}")
        with torch.no_grad():
            self.out_shape = tuple(self.apply(torch.zeros((1, *in_shape), dtype=torch.float64)).shape[1:])

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:2]
        x = x.reshape(-1, *self.in_shape[1:])
        if self.transposed:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.nd - 1]
            y = fn(x, weight, stride=self.strides, dilation=self.dilations, groups=self.groups,
                   output_padding=self.output_padding)
            # ONNX pads crop the full transposed output
            index = [slice(None), slice(None)]
            for b, e, n in zip(self.begins, self.ends, y.shape[2:]):
                index.append(slice(b, n - e))
            y = y[tuple(index)]
        else:
            pads: list[int] = []
            for b, e in zip(reversed(self.begins), reversed(self.ends)):
                pads += [b, e]
            if any(pads):
                x = F.pad(x, pads)
            fn = (F.conv1d, F.conv2d, F.conv3d)[self.nd - 1]
            y = fn(x, weight, stride=self.strides, dilation=self.dilations, groups=self.groups)
        return y.reshape(*lead, *y.shape[1:])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight.to(x.device))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._conv_adjoint(y, self.weight.to(y.device, y.dtype))

    def _conv_adjoint(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A^T y with the transposed convolution (no autograd graph): the adjoint of a plain
        convolution on the padded input, then the padding cut away; a transposed convolution's
        adjoint goes through autograd."""
        if self.transposed:
            return vjp_linear(lambda t: self._conv(t, weight), self.in_shape, y)
        lead = y.shape[:2]
        y = y.reshape(-1, *self.out_shape[1:])
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.nd - 1]
        z = fn(y, weight, stride=self.strides, dilation=self.dilations, groups=self.groups)
        # z covers the padded input up to the last position any output reads; the rest is zero
        index: list[slice] = [slice(None), slice(None)]
        pads: list[int] = []
        for n, b, e, m in zip(reversed(self.in_shape[2:]), reversed(self.begins), reversed(self.ends), reversed(z.shape[2:])):
            pads += [0, max(0, n + b + e - m)]
        if any(pads):
            z = F.pad(z, pads)
        for n, b in zip(self.in_shape[2:], self.begins):
            index.append(slice(b, b + n))
        z = z[tuple(index)]
        return z.reshape(*lead, *z.shape[1:])

    def parameters(self) -> list[torch.Tensor]:
        return [self.weight]

    def exact_norm(self, p: str) -> float | None:
        if p == "2":
            value, exact, _ = self.l2()
            return value if exact else None
        # Rows (columns) of |A| sum to |conv|(1) (|conv|^T(1)): exact without the matrix.
        cache = self.__dict__.setdefault("_norm_cache", {})
        if p not in cache:
            absw = self.weight.abs()
            ones_in = torch.ones((1, *self.in_shape), dtype=torch.float64)
            if p == "inf":
                cache[p] = float(self._conv(ones_in, absw).max())
            else:
                ones_out = torch.ones((1, *self.out_shape), dtype=torch.float64)
                cache[p] = float(self._conv_adjoint(ones_out, absw).max())
        return cache[p]

    def l2(self) -> tuple[float, bool, str]:
        """(value, exact, how) for the l2 norm, without a large dense matrix (see convnorm)."""
        if "_l2" not in self.__dict__:
            from .convnorm import conv_l2

            self._l2 = conv_l2(self)
        return self._l2

    def l2_tight(self) -> tuple[float, bool, str]:
        """l2() with the exact norm of layers on small grids where the circular embedding is
        looser (convnorm.tight_conv_norm; method gram): slower, at least as tight."""
        if "_l2_tight" in self.__dict__:
            return self._l2_tight
        from .convnorm import CUT_NOTE, tight_conv_norm, tight_deadline

        base = self.l2()
        if base[1]:
            self._l2_tight = base
            return base
        deadline = tight_deadline()
        cut = self.__dict__.get("_l2_cut")
        if cut is not None and cut[0] == deadline:
            return cut[1]
        value = tight_conv_norm(self, base[0]) or base
        if CUT_NOTE in value[2]:  # kept for this deadline only: a later call with more time may do better
            self._l2_cut = (deadline, value)
            return value
        self._l2_tight = value
        return value

    def norm_bound(self, p: str) -> tuple[float, bool, str]:
        if p == "2":
            return self.l2()
        return self.exact_norm(p), True, "|kernel| on ones"


class CircularConv(LinearOp):
    """A convolution without padding of a circularly padded input (``pad``: a selection with
    out[c, i] = in[c, (i - p) mod n], see load.patterns): the circular convolution on the
    input's grid n. Its l2 norm is exact from the FFT (convnorm.circular_conv_norm: the offset p
    is a circular shift, an isometry); node by node the padding alone would count up to 2."""

    kind = "circular conv"

    def __init__(self, pad: LinearOp, conv: Conv, shift: tuple[int, ...] | None = None) -> None:
        if not self.covers(pad.in_shape, conv) or pad.out_shape != conv.in_shape:
            raise ValueError(f"{conv.describe()} after {pad.describe()} is not a circular convolution on {pad.in_shape}")
        self.pad, self.conv = pad, conv
        self.in_shape, self.out_shape = pad.in_shape, conv.out_shape
        # the padding's begin offsets p (out[c, i] = in[c, (i - p) mod n]), when known: y_j =
        # sum_t K_t x_{(j s + t - p) mod n}, the circular convolution with taps starting at -p
        self.shift = shift

    @staticmethod
    def covers(grid_shape: tuple[int, ...], conv: Conv) -> bool:
        """Whether ``conv`` (unpadded, not transposed) on a circular padding of ``grid_shape`` is
        the circular convolution there: every stride divides the grid, the outputs are grid /
        stride, and the dilated kernel fits the grid (no tap wraps onto another)."""
        grid = grid_shape[2:]
        spans = [(k - 1) * d + 1 for k, d in zip(conv.weight.shape[2:], conv.dilations)]
        return (not conv.transposed and not any(conv.begins) and not any(conv.ends) and len(grid) == conv.nd
                and all(n % s == 0 and o == n // s and k <= n for n, s, o, k in zip(grid, conv.strides, conv.out_shape[2:], spans)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv.apply(self.pad.apply(x))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.pad.adjoint(self.conv.adjoint(y))

    def parameters(self) -> list[torch.Tensor]:
        return self.conv.parameters()

    def norm_bound(self, p: str) -> tuple[float, bool, str]:
        if p == "2":
            from .convnorm import circular_conv_norm, grouped_kernel

            value, exact = circular_conv_norm(grouped_kernel(self.conv), list(self.in_shape[2:]), self.conv.strides)
            return value, exact, "circular convolution (fft)"
        # |A| = |C P| <= |C| P entrywise, equal when no two taps meet (covers()): row / column sums
        absw = self.conv.weight.abs()
        if p == "inf":
            rows = self.conv._conv(self.pad.apply(torch.ones((1, *self.in_shape), dtype=torch.float64)), absw)
            return float(rows.max()), True, "|kernel| on ones"
        cols = self.pad.adjoint(self.conv._conv_adjoint(torch.ones((1, *self.out_shape), dtype=torch.float64), absw))
        return float(cols.max()), True, "|kernel| on ones"

    def exact_norm(self, p: str) -> float | None:
        value, exact, _ = self.norm_bound(p)
        return value if exact else None

    def describe(self) -> str:
        return f"circular {self.conv.describe()}"


def fft_conv_bound(conv: Conv) -> float:
    """Proven l2 bound for a zero-padded (possibly strided, dilated, grouped, transposed)
    convolution: the exact norm of the circular convolution it embeds in (see convnorm)."""
    from .convnorm import circular_embedding_bound

    return circular_embedding_bound(conv)[0]


def as_conv(op: LinearOp) -> Conv | None:
    """One Conv equal to ``op`` when op is a convolution with per-channel scales around it and
    zero padding before it (Conv + batch-norm, Mul by a channel constant, Pad + Conv), possibly
    between reshapes that keep the shape; else None. The scales are folded into the kernel and
    the padding into the convolution's pads, so its norm is taken as one operator's."""
    ops = list(op.ops) if isinstance(op, Composed) else [op]
    while ops and isinstance(ops[0], Reshape) and ops[0].in_shape == ops[0].out_shape:
        ops.pop(0)
    while ops and isinstance(ops[-1], Reshape) and ops[-1].in_shape == ops[-1].out_shape:
        ops.pop()
    convs = [i for i, o in enumerate(ops) if isinstance(o, Conv)]
    if len(convs) != 1:
        return None
    conv: Conv = ops[convs[0]]
    if len(ops) == 1:
        return conv
    before, after = ops[: convs[0]], ops[convs[0] + 1 :]
    weight = conv.weight.clone()
    g, nd = conv.groups, conv.nd
    begins, ends = list(conv.begins), list(conv.ends)
    in_scale = torch.ones(conv.in_shape[1], dtype=torch.float64)
    out_scale = torch.ones(conv.out_shape[1], dtype=torch.float64)
    for o in before:
        if isinstance(o, Scale) and (f := _channel_factor(o)) is not None:
            in_scale = in_scale * f
        elif isinstance(o, Pad) and not conv.transposed and _spatial_pad(o, nd):
            begins = [b + pb for b, pb in zip(begins, o.begins[2:])]
            ends = [e + pe for e, pe in zip(ends, o.ends[2:])]
        else:
            return None
    for o in after:
        if isinstance(o, Scale) and (f := _channel_factor(o)) is not None:
            out_scale = out_scale * f
        else:
            return None
    if conv.transposed:  # weight (C_in, C_out/g, k): input channels on axis 0
        weight = weight * in_scale.view(-1, *[1] * (nd + 1))
        weight = (weight.reshape(g, -1, weight.shape[1], *weight.shape[2:]) * out_scale.view(g, 1, -1, *[1] * nd)).reshape(weight.shape)
    else:  # weight (C_out, C_in/g, k)
        weight = weight * out_scale.view(-1, *[1] * (nd + 1))
        weight = (weight.reshape(g, -1, weight.shape[1], *weight.shape[2:]) * in_scale.view(g, 1, -1, *[1] * nd)).reshape(weight.shape)
    in_shape = before[0].in_shape if before else conv.in_shape
    return Conv(in_shape, weight.numpy(), conv.strides, (*begins, *ends), conv.dilations, g, conv.transposed, conv.output_padding)


def as_circular(op: LinearOp) -> CircularConv | None:
    """One CircularConv equal to ``op`` when op is a circular convolution with per-channel scales
    around it (an unfolded batch-norm after it), folded into its kernel like as_conv does; else None."""
    ops = list(op.ops) if isinstance(op, Composed) else [op]
    ops = [o for o in ops if not (isinstance(o, Reshape) and o.in_shape == o.out_shape)]
    circs = [i for i, o in enumerate(ops) if isinstance(o, CircularConv)]
    if len(circs) != 1 or not all(isinstance(o, Scale) and _channel_factor(o) is not None for o in ops if not isinstance(o, CircularConv)):
        return None
    circ: CircularConv = ops[circs[0]]
    # a channel scale before the circular padding (a per-channel selection) commutes with it
    shape = circ.conv.in_shape
    before = [Scale(shape, _channel_factor(o).numpy().reshape(-1, *[1] * (len(shape) - 2))) for o in ops[: circs[0]]]
    conv = as_conv(Composed([*before, circ.conv, *ops[circs[0] + 1 :]]))
    return None if conv is None else CircularConv(circ.pad, conv, circ.shift)


def conv_of(op: LinearOp) -> Conv | None:
    """``as_conv(op)``, the same object on every call for a Composed (its cached ``conv``), so
    that the norm cached on it is reused."""
    return op.conv if isinstance(op, Composed) else as_conv(op)


def _channel_factor(scale: Scale) -> torch.Tensor | None:
    """The per-channel factors of a Scale on (N, C, *spatial) that is constant over N and space."""
    f = scale.factor
    if f.dim() < 3:
        return None
    per = f[:1, :, *([slice(0, 1)] * (f.dim() - 2))]
    if not bool((f == per).all()):
        return None
    return per.reshape(-1).clone()


def _spatial_pad(pad: Pad, nd: int) -> bool:
    """True for non-negative zero padding of the spatial axes only."""
    return (len(pad.begins) == nd + 2 and not any(pad.begins[:2]) and not any(pad.ends[:2])
            and min(pad.begins + pad.ends) >= 0)


class AvgPool(LinearOp):
    """Average pooling (and global average pooling): a matrix with non-negative entries."""

    kind = "avgpool"

    def __init__(
        self,
        in_shape: tuple[int, ...],
        kernel: tuple[int, ...],
        strides: tuple[int, ...],
        pads: tuple[int, ...],
        count_include_pad: bool,
    ) -> None:
        nd = len(kernel)
        if nd not in (1, 2, 3) or len(in_shape) != nd + 2:
            raise ValueError(f"pooling kernel {kernel} does not fit an input of shape {in_shape}")
        self.in_shape, self.kernel, self.strides = tuple(in_shape), tuple(kernel), tuple(strides)
        self.begins, self.ends = tuple(pads[:nd]), tuple(pads[nd:])
        self.count_include_pad = count_include_pad
        with torch.no_grad():
            ones = torch.ones((1, *in_shape), dtype=torch.float64)
            self._divisor = self._sum(ones) if not count_include_pad else None
            self.out_shape = tuple(self._sum(ones).shape[1:])

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:2]
        x = x.reshape(-1, *self.in_shape[1:])
        pads: list[int] = []
        for b, e in zip(reversed(self.begins), reversed(self.ends)):
            pads += [b, e]
        if any(pads):
            x = F.pad(x, pads)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(self.kernel) - 1]
        y = fn(x, self.kernel, self.strides) * float(np.prod(self.kernel))
        return y.reshape(*lead, *y.shape[1:])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        s = self._sum(x)
        if self._divisor is None:
            return s / float(np.prod(self.kernel))
        return s / self._divisor.to(x.device)

    def exact_norm(self, p: str) -> float | None:
        if p in ("inf", "1"):  # non-negative entries: row/column sums are A 1 and A^T 1
            ones_in = torch.ones((1, *self.in_shape), dtype=torch.float64)
            if p == "inf":
                return float(self.apply(ones_in).max())
            ones_out = torch.ones((1, *self.out_shape), dtype=torch.float64)
            return float(self.adjoint(ones_out).max())
        return super().exact_norm(p)


class Composed(LinearOp):
    """A chain of linear operators applied in order (merged consecutive linear nodes)."""

    kind = "composed"

    def __init__(self, ops: list[LinearOp]) -> None:
        flat: list[LinearOp] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, Composed) else [op])
        for a, b in zip(flat, flat[1:]):
            if a.out_shape != b.in_shape:
                raise ValueError(f"cannot compose {a.describe()} with {b.describe()}")
        self.ops = flat
        self.in_shape, self.out_shape = flat[0].in_shape, flat[-1].out_shape

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op.apply(x)
        return x

    def parameters(self) -> list[torch.Tensor]:
        return [t for op in self.ops for t in op.parameters()]

    def dense(self, limit: int | None = None) -> np.ndarray | None:
        # A chain of isometries and one matrix needs no probing: reuse the matrix.
        core = [op for op in self.ops if not isinstance(op, (Reshape, Transpose))]
        if len(core) == 1 and isinstance(core[0], MatMul) and core[0].dense(limit) is not None and all(
            isinstance(op, Reshape) for op in self.ops
        ):
            return core[0].dense(limit)
        return super().dense(limit)

    @cached_property
    def conv(self) -> Conv | None:
        """The chain as one convolution (scales and padding folded in), when it is one."""
        return as_conv(self)

    @cached_property
    def circular(self) -> CircularConv | None:
        """The chain as one circular convolution (scales folded in), when it is one."""
        return None if self.conv is not None else as_circular(self)

    def exact_norm(self, p: str) -> float | None:
        if self.conv is not None:
            return self.conv.exact_norm(p)
        if self.circular is not None:
            return self.circular.exact_norm(p)
        core = [op for op in self.ops if not isinstance(op, (Reshape, Transpose))]
        if not core:
            return 1.0
        if len(core) == 1 and all(isinstance(op, Reshape) for op in self.ops if op is not core[0]):
            return core[0].exact_norm(p)
        return super().exact_norm(p)

    def norm_bound(self, p: str) -> tuple[float, bool, str]:
        if self.conv is not None:
            value, exact, how = self.conv.norm_bound(p)
            return value, exact, how + (" (scales folded into the kernel)" if len(self.ops) > 1 else "")
        if self.circular is not None:
            value, exact, how = self.circular.norm_bound(p)
            return value, exact, how + " (scales folded into the kernel)"
        exact = self.exact_norm(p)
        if exact is not None:
            return exact, True, "dense svd" if p == "2" else "dense row/col sums"
        value, how = 1.0, []
        for op in self.ops:
            v, _, h = op.norm_bound(p)
            value *= v
            how.append(h)
        return value, False, "product: " + ", ".join(dict.fromkeys(how))

    def describe(self) -> str:
        return " + ".join(op.kind for op in self.ops)


class Broadcast(LinearOp):
    """Numpy broadcasting of a tensor to a larger shape (each entry copied r = out/in times):
    the norm is sqrt(r) for l2, 1 for linf and r for l1, all attained by a single entry."""

    kind = "broadcast"

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        if np.broadcast_shapes(tuple(in_shape), tuple(out_shape)) != tuple(out_shape) or len(in_shape) != len(out_shape):
            raise ValueError(f"cannot broadcast {in_shape} to {out_shape}")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(x.shape[0], *self.out_shape)

    def exact_norm(self, p: str) -> float:
        r = self.out_dim / max(self.in_dim, 1)
        return {"2": math.sqrt(r), "inf": 1.0, "1": r}[p]


class Branches(LinearOp):
    """Linear branches of one input joined into one linear map: ``sum_i c_i A_i x`` (a residual
    ``x - mean(x)``, ``x + A x``) or, with ``axis``, their concatenation along that axis (circular
    padding built from slices). Its exact norm (dense matrix when small) can be far below the sum
    of the branches' norms; otherwise the branches' bounds are added (sum: triangle inequality;
    concatenation: the l2 norms in quadrature, the max for linf, the sum for l1)."""

    kind = "branches"

    def __init__(self, ops: list[LinearOp], coeffs: tuple[float, ...] | None = None, axis: int | None = None) -> None:
        if any(op.in_shape != ops[0].in_shape for op in ops):
            raise ValueError("branches must read inputs of one shape")
        self.ops, self.axis = list(ops), axis
        self.coeffs = tuple(coeffs) if coeffs is not None else (1.0,) * len(ops)
        self.in_shape = ops[0].in_shape
        if axis is None:
            if any(op.out_shape != ops[0].out_shape for op in ops):
                raise ValueError("summed branches must have one output shape")
            self.out_shape = ops[0].out_shape
        else:
            out = list(ops[0].out_shape)
            out[axis] = sum(op.out_shape[axis] for op in ops)
            self.out_shape = tuple(out)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        ys = [c * op.apply(x) for c, op in zip(self.coeffs, self.ops)]
        if self.axis is not None:
            return torch.cat(ys, dim=self.axis + 1)
        out = ys[0]
        for y in ys[1:]:
            out = out + y
        return out

    def parameters(self) -> list[torch.Tensor]:
        return [t for op in self.ops for t in op.parameters()]

    def norm_bound(self, p: str) -> tuple[float, bool, str]:
        exact = self.exact_norm(p)
        if exact is not None:
            return exact, True, "dense svd" if p == "2" else "dense row/col sums"
        parts = [abs(c) * op.norm_bound(p)[0] for c, op in zip(self.coeffs, self.ops)]
        if self.axis is not None and p == "2":
            return math.sqrt(sum(v * v for v in parts)), False, "branches in quadrature"
        if self.axis is not None and p == "inf":
            return max(parts), False, "largest branch"
        return sum(parts), False, "sum of branches"

    def describe(self) -> str:
        return ("concat" if self.axis is not None else "sum") + " of " + ", ".join(op.kind for op in self.ops)
