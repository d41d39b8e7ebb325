"""One converter per ONNX op: each turns a node into lipcert graph nodes, or raises Unsupported.

A converter receives ``(ctx, node, attrs, name)``: the loader context, the ONNX node, its
attributes as Python values, and a unique name for the lipcert node it adds.
"""

from __future__ import annotations

import numpy as np
import torch

from ..graph import Activation, Affine, AvgPool, Composed, Concat, Conv, Extremum, MatMul, MaxPool, Pad, Reshape, Scale, Sort, Sum, Transpose
from ..graph.linear import Broadcast, LinearOp
from .registry import Unsupported, converter


def _add_affine(ctx, node, name: str, lin: LinearOp, bias: np.ndarray | None = None, src: str | None = None) -> None:
    b = None
    if bias is not None:
        b = torch.from_numpy(np.array(np.broadcast_to(np.asarray(bias, np.float64), lin.out_shape)))
    ctx.add(Affine(name=name, op=node.op_type, inputs=[ctx.var(src or node.input[0])], out_shape=lin.out_shape, lin=lin, bias=b), node.output[0])


def _broadcast_const(c: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A constant operand must broadcast to the variable's shape without enlarging it."""
    try:
        if np.broadcast_shapes(c.shape, shape) != tuple(shape):
            raise ValueError
    except ValueError:
        raise Unsupported(f"the constant {what} of shape {list(c.shape)} would change the input shape {list(shape)}") from None
    return np.asarray(c, dtype=np.float64)


def _spatial_pads(attrs, in_spatial, kernel, strides, dilations) -> tuple[int, ...]:
    nd = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return tuple(attrs.get("pads", [0] * (2 * nd)))
    if auto == "VALID":
        return (0,) * (2 * nd)
    begins, ends = [], []
    for n, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return tuple(begins + ends)


# --- constants and identities -------------------------------------------------------------------
@converter("Constant")
def constant(ctx, node, attrs, name):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in attrs:
            ctx.consts[node.output[0]] = np.asarray(attrs[key])
            return
    raise Unsupported("only value, value_float(s) and value_int(s) constants are supported")


@converter("Identity")
def identity(ctx, node, attrs, name):
    ctx.alias(node.output[0], node.input[0])


@converter("Dropout")
def dropout(ctx, node, attrs, name):
    training = ctx.optional(node, 2)
    if training is not None and bool(np.asarray(ctx.const(training, "training_mode")).item()):
        raise Unsupported("training_mode=True: dropout at training time is random; export the model in eval mode")
    if len(node.output) > 1 and node.output[1]:
        raise Unsupported("its mask output is used")
    ctx.alias(node.output[0], node.input[0])


@converter("Cast")
def cast(ctx, node, attrs, name):
    import onnx

    if attrs.get("to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
        raise Unsupported("casts of the network's values to a non-float type are not Lipschitz")
    ctx.alias(node.output[0], node.input[0])


# --- reshaping -----------------------------------------------------------------------------------
@converter("Flatten")
def flatten(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    out = (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
    _add_affine(ctx, node, name, Reshape(shape, out))


@converter("Reshape")
def reshape(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    target = [int(v) for v in ctx.const(node.input[1], "shape")]
    if not attrs.get("allowzero", 0):
        target = [shape[i] if v == 0 else v for i, v in enumerate(target)]
    if -1 in target:
        known = int(np.prod([v for v in target if v != -1]))
        target[target.index(-1)] = int(np.prod(shape)) // max(known, 1)
    _add_affine(ctx, node, name, Reshape(shape, tuple(target)))


def _squeeze(ctx, node, name, axes):
    shape = ctx.shape(node.input[0])
    if axes is None:
        axes = [i for i, n in enumerate(shape) if n == 1]
    axes = {a + len(shape) if a < 0 else a for a in axes}
    _add_affine(ctx, node, name, Reshape(shape, tuple(n for i, n in enumerate(shape) if i not in axes)))


def _unsqueeze(ctx, node, name, axes):
    shape = list(ctx.shape(node.input[0]))
    rank = len(shape) + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        shape.insert(a, 1)
    _add_affine(ctx, node, name, Reshape(ctx.shape(node.input[0]), tuple(shape)))


@converter("Squeeze")
def squeeze_attr(ctx, node, attrs, name):
    _squeeze(ctx, node, name, attrs.get("axes"))


@converter("Squeeze", since=13)
def squeeze_input(ctx, node, attrs, name):
    axes = ctx.optional(node, 1)
    _squeeze(ctx, node, name, None if axes is None else [int(a) for a in ctx.const(axes, "axes")])


@converter("Unsqueeze")
def unsqueeze_attr(ctx, node, attrs, name):
    _unsqueeze(ctx, node, name, list(attrs["axes"]))


@converter("Unsqueeze", since=13)
def unsqueeze_input(ctx, node, attrs, name):
    _unsqueeze(ctx, node, name, [int(a) for a in ctx.const(node.input[1], "axes")])


@converter("Transpose")
def transpose(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    perm = tuple(attrs.get("perm", reversed(range(len(shape)))))
    _add_affine(ctx, node, name, Transpose(shape, perm))


@converter("Pad")
def pad(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    mode = attrs.get("mode", "constant")
    if mode != "constant":
        raise Unsupported(f"mode='{mode}': only constant (zero) padding is supported")
    if ctx.opset < 11:
        pads, value = list(attrs.get("pads", [])), float(attrs.get("value", 0.0))
        axes = list(range(len(shape)))
    else:
        pads = [int(p) for p in ctx.const(node.input[1], "pads")]
        value_name = ctx.optional(node, 2)
        value = 0.0 if value_name is None else float(np.asarray(ctx.const(value_name, "constant_value")).item())
        axes_name = ctx.optional(node, 3)
        axes = list(range(len(shape))) if axes_name is None else [int(a) % len(shape) for a in ctx.const(axes_name, "axes")]
    begins, ends = [0] * len(shape), [0] * len(shape)
    for k, a in enumerate(axes):
        begins[a], ends[a] = pads[k], pads[k + len(axes)]
    lin = Pad(shape, tuple(begins), tuple(ends))
    bias = None
    if value != 0.0:  # padding with c = zero padding plus a constant on the border
        border = lin.apply(torch.zeros((1, *shape), dtype=torch.float64))[0].numpy()
        bias = np.where(lin.apply(torch.ones((1, *shape), dtype=torch.float64))[0].numpy() == 0, value, border)
    _add_affine(ctx, node, name, lin, bias)


@converter("Concat")
def concat(ctx, node, attrs, name):
    if any(ctx.is_const(i) for i in node.input):
        raise Unsupported("concatenation with a constant tensor is not supported")
    if len(node.input) == 1:  # a concatenation of one tensor is that tensor (torch's circular padding of one axis)
        ctx.alias(node.output[0], node.input[0])
        return
    shapes = [ctx.shape(i) for i in node.input]
    axis = attrs["axis"] % len(shapes[0])
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    ctx.add(Concat(name=name, op="Concat", inputs=[ctx.var(i) for i in node.input], out_shape=tuple(out), axis=axis), node.output[0])


# --- dense layers ----------------------------------------------------------------------------------
@converter("Gemm")
def gemm(ctx, node, attrs, name):
    if attrs.get("transA", 0):
        raise Unsupported("transA=1 (the input transposed) is not supported")
    shape = ctx.shape(node.input[0])
    w = np.asarray(ctx.const(node.input[1], "weight B"), np.float64)
    w = w if attrs.get("transB", 0) else w.T  # as (out, in)
    lin = MatMul(shape, attrs.get("alpha", 1.0) * w, axis=-1)
    c = ctx.optional(node, 2)
    bias = None if c is None else attrs.get("beta", 1.0) * _broadcast_const(ctx.const(c, "bias C"), lin.out_shape, "bias C")
    _add_affine(ctx, node, name, lin, bias)


@converter("MatMul")
def matmul(ctx, node, attrs, name):
    a, b = node.input[0], node.input[1]
    if ctx.is_const(b) and not ctx.is_const(a):
        w = np.asarray(ctx.const(b), np.float64)
        if w.ndim != 2:
            raise Unsupported(f"the constant operand must be a matrix, it has shape {list(w.shape)}")
        shape = ctx.shape(a)
        if len(shape) == 1:  # vector @ matrix
            r = Reshape(shape, (1, shape[0]))
            _add_affine(ctx, node, name, _compose(r, MatMul(r.out_shape, w.T, -1), Reshape((1, w.shape[1]), (w.shape[1],))))
            return
        _add_affine(ctx, node, name, MatMul(shape, w.T, axis=-1))
    elif ctx.is_const(a) and not ctx.is_const(b):
        w = np.asarray(ctx.const(a), np.float64)
        shape = ctx.shape(b)
        if w.ndim != 2:
            raise Unsupported(f"the constant operand must be a matrix, it has shape {list(w.shape)}")
        if len(shape) == 1:  # matrix @ vector
            r = Reshape(shape, (shape[0], 1))
            _add_affine(ctx, node, name, _compose(r, MatMul(r.out_shape, w, -2), Reshape((w.shape[0], 1), (w.shape[0],))), src=b)
            return
        _add_affine(ctx, node, name, MatMul(shape, w, axis=-2), src=b)
    else:
        raise Unsupported("the product of two tensors that depend on the input is not globally Lipschitz")


def _compose(*ops: LinearOp) -> LinearOp:
    from ..graph import Composed

    return Composed(list(ops))


# --- elementwise arithmetic ------------------------------------------------------------------------
def _var_const(ctx, node):
    a, b = node.input[0], node.input[1]
    if ctx.is_const(b):
        return a, ctx.const(b), False
    if ctx.is_const(a):
        return b, ctx.const(a), True
    return None


@converter("Add", "Sub")
def add_sub(ctx, node, attrs, name):
    sign = -1.0 if node.op_type == "Sub" else 1.0
    vc = _var_const(ctx, node)
    if vc is None:  # two branches: a residual sum
        sa, sb = ctx.shape(node.input[0]), ctx.shape(node.input[1])
        ins = [ctx.var(node.input[0]), ctx.var(node.input[1])]
        if sa != sb:  # broadcasting one branch to the other's shape (e.g. x - mean(x)) is a linear copy
            try:
                out = tuple(np.broadcast_shapes(sa, sb))
            except ValueError:
                raise Unsupported(f"branches of shapes {list(sa)} and {list(sb)} do not broadcast") from None
            if out not in (sa, sb) or len(sa) != len(sb):
                raise Unsupported(f"adding branches of shapes {list(sa)} and {list(sb)} would enlarge both")
            k = 0 if out == sb else 1
            small = (sa, sb)[k]
            wide = Affine(name=ctx.unique(f"{name}:broadcast"), op="Expand", inputs=[ins[k]], out_shape=out, lin=Broadcast(small, out))
            ctx.add(wide, f"{node.output[0]}:broadcast{k}")
            ins[k], sa = wide.name, out
        ctx.add(Sum(name=name, op=node.op_type, inputs=ins, out_shape=sa, coeffs=(1.0, sign)), node.output[0])
        return
    var, c, const_first = vc
    shape = ctx.shape(var)
    c = _broadcast_const(c, shape, "operand")
    if node.op_type == "Sub" and const_first:  # c - x
        _add_affine(ctx, node, name, Scale(shape, np.array(-1.0)), c, src=var)
    else:
        _add_affine(ctx, node, name, Reshape(shape, shape), sign * c, src=var)


@converter("Mul", "Div")
def mul_div(ctx, node, attrs, name):
    vc = _var_const(ctx, node)
    if vc is None:
        raise Unsupported("the product of two tensors that depend on the input is not globally Lipschitz")
    var, c, const_first = vc
    if node.op_type == "Div" and const_first:
        raise Unsupported("division by a tensor that depends on the input is not globally Lipschitz")
    shape = ctx.shape(var)
    c = _broadcast_const(c, shape, "factor")
    if node.op_type == "Div":
        if np.any(c == 0):
            raise Unsupported("division by a constant that contains zeros")
        c = 1.0 / c
    _add_affine(ctx, node, name, Scale(shape, c), src=var)


@converter("Neg")
def neg(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    _add_affine(ctx, node, name, Scale(shape, np.array(-1.0)))


@converter("BatchNormalization")
def batch_norm(ctx, node, attrs, name):
    if attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise Unsupported("training_mode=1: export the model in eval mode so batch-norm uses its running statistics")
    shape = ctx.shape(node.input[0])
    scale, bias, mean, var = (np.asarray(ctx.const(node.input[k], w), np.float64) for k, w in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
    factor = scale / np.sqrt(var + ctx.exact_float("BatchNormalization", "epsilon", attrs.get("epsilon", 1e-5)))
    bshape = (shape[1],) + (1,) * (len(shape) - 2)
    _add_affine(ctx, node, name, Scale(shape, factor.reshape(bshape)), (bias - mean * factor).reshape(bshape))


# --- convolutions and pooling ---------------------------------------------------------------------
def _conv_geometry(attrs, shape, kernel):
    nd = len(kernel)
    strides = tuple(attrs.get("strides", [1] * nd))
    dilations = tuple(attrs.get("dilations", [1] * nd))
    return strides, dilations, _spatial_pads(attrs, shape[2:], kernel, strides, dilations)


@converter("Conv")
def conv(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    w = np.asarray(ctx.const(node.input[1], "weight"), np.float64)
    strides, dilations, pads = _conv_geometry(attrs, shape, w.shape[2:])
    lin = Conv(shape, w, strides, pads, dilations, attrs.get("group", 1))
    b = ctx.optional(node, 2)
    bias = None if b is None else np.asarray(ctx.const(b, "bias"), np.float64).reshape((-1,) + (1,) * (len(shape) - 2))
    _add_affine(ctx, node, name, lin, bias)


@converter("ConvTranspose")
def conv_transpose(ctx, node, attrs, name):
    if "output_shape" in attrs or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise Unsupported("output_shape and auto_pad SAME are not supported; give explicit pads")
    shape = ctx.shape(node.input[0])
    w = np.asarray(ctx.const(node.input[1], "weight"), np.float64)
    nd = w.ndim - 2
    strides = tuple(attrs.get("strides", [1] * nd))
    dilations = tuple(attrs.get("dilations", [1] * nd))
    pads = tuple(attrs.get("pads", [0] * (2 * nd)))
    lin = Conv(shape, w, strides, pads, dilations, attrs.get("group", 1), transposed=True, output_padding=tuple(attrs.get("output_padding", [0] * nd)))
    b = ctx.optional(node, 2)
    bias = None if b is None else np.asarray(ctx.const(b, "bias"), np.float64).reshape((-1,) + (1,) * nd)
    _add_affine(ctx, node, name, lin, bias)


def _pool_geometry(attrs, shape):
    kernel = tuple(attrs["kernel_shape"])
    if attrs.get("ceil_mode", 0):
        raise Unsupported("ceil_mode=1 is not supported; export with ceil_mode=False")
    strides, dilations, pads = _conv_geometry(attrs, shape, kernel)
    return kernel, strides, dilations, pads


@converter("AveragePool")
def average_pool(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    kernel, strides, dilations, pads = _pool_geometry(attrs, shape)
    if any(d != 1 for d in dilations):
        raise Unsupported("dilated average pooling is not supported")
    _add_affine(ctx, node, name, AvgPool(shape, kernel, strides, pads, bool(attrs.get("count_include_pad", 0))))


@converter("GlobalAveragePool")
def global_average_pool(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    nd = len(shape) - 2
    _add_affine(ctx, node, name, AvgPool(shape, tuple(shape[2:]), (1,) * nd, (0,) * (2 * nd), True))


@converter("MaxPool")
def max_pool(ctx, node, attrs, name):
    if len([o for o in node.output if o]) > 1:
        raise Unsupported("its Indices output is used")
    shape = ctx.shape(node.input[0])
    kernel, strides, dilations, pads = _pool_geometry(attrs, shape)
    mp = MaxPool(name=name, op="MaxPool", inputs=[ctx.var(node.input[0])], out_shape=(), kernel=kernel, strides=strides, pads=pads, dilations=dilations, in_shape=shape)
    mp.out_shape = tuple(mp.forward(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:])
    ctx.add(mp, node.output[0])


def l2_norm_pool(ctx, root, pool, attrs, x: str, inner: float, name: str) -> None:
    """The L2-norm pooling idiom matched by ``patterns.find_l2_pools``: ``sqrt(inner * pool(x^2))``
    (not in the registry: its parts are refused on their own)."""
    from ..graph import NormPool

    shape = ctx.shape(x)
    nd = len(shape) - 2
    if pool.op_type == "GlobalAveragePool":
        lin = AvgPool(shape, tuple(shape[2:]), (1,) * nd, (0,) * (2 * nd), True)
    else:
        kernel, strides, dilations, pads = _pool_geometry(attrs, shape)
        if any(d != 1 for d in dilations):
            raise Unsupported("dilated L2-norm pooling is not supported")
        lin = AvgPool(shape, kernel, strides, pads, bool(attrs.get("count_include_pad", 0)))
    ctx.add(NormPool(name=name, op="L2NormPool", inputs=[ctx.var(x)], out_shape=lin.out_shape, pool=lin, factor=float(np.sqrt(inner))), root.output[0])


@converter("GlobalMaxPool")
def global_max_pool(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    nd = len(shape) - 2
    mp = MaxPool(name=name, op="GlobalMaxPool", inputs=[ctx.var(node.input[0])], out_shape=(), kernel=tuple(shape[2:]), strides=(1,) * nd, pads=(0,) * (2 * nd), dilations=(1,) * nd, in_shape=shape)
    mp.out_shape = tuple(mp.forward(torch.zeros((1, *shape), dtype=torch.float64)).shape[1:])
    ctx.add(mp, node.output[0])


# --- activations ------------------------------------------------------------------------------------
def _activation(ctx, node, name, kind, **params):
    shape = ctx.shape(node.input[0])
    ctx.add(Activation(name=name, op=node.op_type, inputs=[ctx.var(node.input[0])], out_shape=shape, kind=kind, params=params), node.output[0])


@converter("Relu")
def relu(ctx, node, attrs, name):
    _activation(ctx, node, name, "relu")


@converter("LeakyRelu")
def leaky_relu(ctx, node, attrs, name):
    _activation(ctx, node, name, "leaky_relu", alpha=ctx.exact_float("LeakyRelu", "alpha", attrs.get("alpha", 0.01)))


@converter("PRelu")
def prelu(ctx, node, attrs, name):
    shape = ctx.shape(node.input[0])
    slope = _broadcast_const(ctx.const(node.input[1], "slope"), shape, "slope")
    _activation(ctx, node, name, "prelu", slope=torch.from_numpy(np.array(slope, dtype=np.float64)))


@converter("Sigmoid")
def sigmoid(ctx, node, attrs, name):
    _activation(ctx, node, name, "sigmoid")


@converter("Tanh")
def tanh(ctx, node, attrs, name):
    _activation(ctx, node, name, "tanh")


@converter("Elu")
def elu(ctx, node, attrs, name):
    _activation(ctx, node, name, "elu", alpha=ctx.exact_float("Elu", "alpha", attrs.get("alpha", 1.0)))


@converter("Softplus")
def softplus(ctx, node, attrs, name):
    _activation(ctx, node, name, "softplus")


@converter("Clip")
def clip(ctx, node, attrs, name):
    if ctx.opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo_name, hi_name = ctx.optional(node, 1), ctx.optional(node, 2)
        lo = None if lo_name is None else float(np.asarray(ctx.const(lo_name, "min")).item())
        hi = None if hi_name is None else float(np.asarray(ctx.const(hi_name, "max")).item())
    _activation(ctx, node, name, "clip", min=lo, max=hi)


def _reduced_axes(ctx, node, attrs, shape: tuple[int, ...], axes) -> tuple[list[int], list[int]] | None:
    """(reduced axes, kept axes) of a Reduce* node, sorted and non-negative; None when the node is
    an identity (no axes and noop_with_empty_axes), which is then aliased to its input."""
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            ctx.alias(node.output[0], node.input[0])
            return None
        axes = range(len(shape))
    axes = sorted({int(a) % len(shape) for a in axes})
    return axes, [i for i in range(len(shape)) if i not in axes]


def _reduce_linear(ctx, node, attrs, name, axes, mean: bool):
    """ReduceSum / ReduceMean: a permutation and reshape that gather the reduced axes, then one
    row of ones (or 1/n) applied along them; a linear map."""
    shape = ctx.shape(node.input[0])
    reduced = _reduced_axes(ctx, node, attrs, shape, axes)
    if reduced is None:
        return
    axes, keep = reduced
    perm = tuple(keep + axes)
    moved = tuple(shape[i] for i in perm)
    n = int(np.prod([shape[i] for i in axes]))
    grouped = tuple(shape[i] for i in keep) + (n,)
    final = tuple(1 if i in axes else m for i, m in enumerate(shape)) if attrs.get("keepdims", 1) else tuple(shape[i] for i in keep)
    row = np.full((1, n), 1.0 / n if mean else 1.0)
    mm = MatMul(grouped, row, axis=-1)
    _add_affine(ctx, node, name, Composed([Transpose(shape, perm), Reshape(moved, grouped), mm, Reshape(mm.out_shape, final)]))


@converter("ReduceMean", "ReduceSum")
def reduce_linear_attr(ctx, node, attrs, name):
    _reduce_linear(ctx, node, attrs, name, attrs.get("axes"), node.op_type == "ReduceMean")


@converter("ReduceSum", since=13)
def reduce_sum_input(ctx, node, attrs, name):
    axes = ctx.optional(node, 1)
    _reduce_linear(ctx, node, attrs, name, None if axes is None else [int(a) for a in ctx.const(axes, "axes")], False)


@converter("ReduceMean", since=18)
def reduce_mean_input(ctx, node, attrs, name):
    axes = ctx.optional(node, 1)
    _reduce_linear(ctx, node, attrs, name, None if axes is None else [int(a) for a in ctx.const(axes, "axes")], True)


@converter("Slice", since=10)
def slice_(ctx, node, attrs, name):
    """Steps of 1: a crop, i.e. zero padding with negative pads (a coordinate restriction, norm 1)."""
    shape = ctx.shape(node.input[0])
    starts = [int(v) for v in ctx.const(node.input[1], "starts")]
    ends = [int(v) for v in ctx.const(node.input[2], "ends")]
    axes_name, steps_name = ctx.optional(node, 3), ctx.optional(node, 4)
    axes = list(range(len(starts))) if axes_name is None else [int(a) % len(shape) for a in ctx.const(axes_name, "axes")]
    steps = [1] * len(starts) if steps_name is None else [int(v) for v in ctx.const(steps_name, "steps")]
    if any(st != 1 for st in steps):
        raise Unsupported("only steps of 1 are supported")
    begins, cuts = [0] * len(shape), [0] * len(shape)
    for a, b, e in zip(axes, starts, ends):
        n = shape[a]
        b = min(max(b + n if b < 0 else b, 0), n)
        e = min(max(e + n if e < 0 else e, 0), n)
        if e <= b:
            raise Unsupported(f"the slice [{b}:{e}] of axis {a} is empty")
        begins[a], cuts[a] = -b, -(n - e)
    _add_affine(ctx, node, name, Pad(shape, tuple(begins), tuple(cuts)))


@converter("Abs")
def abs_(ctx, node, attrs, name):
    _activation(ctx, node, name, "abs")


# --- sorting, maxima and minima ---------------------------------------------------------------------
def _add_sort(ctx, node, name: str, src: str, shape: tuple[int, ...], axis: int, ranks: tuple[int, ...], output: str) -> None:
    out = list(shape)
    out[axis] = len(ranks)
    ctx.add(Sort(name=name, op=node.op_type, inputs=[src], out_shape=tuple(out), axis=axis, ranks=tuple(ranks), in_shape=shape), output)


def _reduce_extremum(ctx, node, attrs, name, axes, largest: bool):
    shape = ctx.shape(node.input[0])
    reduced = _reduced_axes(ctx, node, attrs, shape, axes)
    if reduced is None:
        return
    axes, keep = reduced
    final = tuple(1 if i in axes else n for i, n in enumerate(shape)) if attrs.get("keepdims", 1) else tuple(shape[i] for i in keep)
    src, cur, axis = ctx.var(node.input[0]), shape, axes[0]
    if len(axes) > 1:  # bring the reduced axes together at the end: a permutation and a reshape (isometries)
        perm = tuple(keep + axes)
        moved = tuple(shape[i] for i in perm)
        cur = tuple(shape[i] for i in keep) + (int(np.prod([shape[i] for i in axes])),)
        gather = Affine(name=ctx.unique(f"{name}:group"), op="Transpose+Reshape", inputs=[src], out_shape=cur,
                        lin=Composed([Transpose(shape, perm), Reshape(moved, cur)]))
        ctx.add(gather, f"{node.output[0]}:group")
        src, axis = gather.name, len(keep)
    n = cur[axis]
    sort_out = tuple(1 if i == axis else m for i, m in enumerate(cur))
    if sort_out == final:
        _add_sort(ctx, node, name, src, cur, axis, (n - 1,) if largest else (0,), node.output[0])
        return
    _add_sort(ctx, node, ctx.unique(f"{name}:sort"), src, cur, axis, (n - 1,) if largest else (0,), f"{node.output[0]}:sort")
    _add_affine(ctx, node, name, Reshape(sort_out, final), src=f"{node.output[0]}:sort")


@converter("ReduceMax", "ReduceMin")
def reduce_extremum_attr(ctx, node, attrs, name):
    _reduce_extremum(ctx, node, attrs, name, attrs.get("axes"), node.op_type == "ReduceMax")


@converter("ReduceMax", "ReduceMin", since=18)
def reduce_extremum_input(ctx, node, attrs, name):
    axes = ctx.optional(node, 1)
    _reduce_extremum(ctx, node, attrs, name, None if axes is None else [int(a) for a in ctx.const(axes, "axes")], node.op_type == "ReduceMax")


def _top_k(ctx, node, attrs, name, k: int):
    if len(node.output) > 1 and node.output[1] in ctx.consumed:
        raise Unsupported("its Indices output is used (indices are not a Lipschitz function of the input)")
    if not attrs.get("sorted", 1) and k > 1:
        raise Unsupported("sorted=0 leaves the order of the k values to the runtime; export with sorted=True")
    shape = ctx.shape(node.input[0])
    axis = attrs.get("axis", -1) % len(shape)
    n = shape[axis]
    if not 1 <= k <= n:
        raise Unsupported(f"k={k} is not in 1..{n}")
    ranks = tuple(range(n - 1, n - 1 - k, -1)) if attrs.get("largest", 1) else tuple(range(k))
    _add_sort(ctx, node, name, ctx.var(node.input[0]), shape, axis, ranks, node.output[0])


@converter("TopK")
def top_k_attr(ctx, node, attrs, name):
    _top_k(ctx, node, attrs, name, int(attrs["k"]))


@converter("TopK", since=10)
def top_k_input(ctx, node, attrs, name):
    _top_k(ctx, node, attrs, name, int(np.asarray(ctx.const(node.input[1], "K")).ravel()[0]))


@converter("Max", "Min")
def extremum(ctx, node, attrs, name):
    inputs = [i for i in node.input if i]
    variables = [i for i in inputs if not ctx.is_const(i)]
    consts = [ctx.const(i) for i in inputs if ctx.is_const(i)]
    mode = "max" if node.op_type == "Max" else "min"
    if len(variables) == 1 and len(inputs) == 1:
        ctx.alias(node.output[0], inputs[0])
        return
    shape = ctx.shape(variables[0])
    if any(ctx.shape(v) != shape for v in variables):
        raise Unsupported(f"the {mode} of tensors of different shapes {[list(ctx.shape(v)) for v in variables]} (broadcasting) is not supported")
    if consts:
        if len(variables) > 1:
            raise Unsupported(f"the {mode} of several computed tensors and a constant is not supported")
        c = _broadcast_const(np.maximum.reduce(consts) if mode == "max" else np.minimum.reduce(consts), shape, "operand")
        # max(x, c) = c + relu(x - c); min(x, c) = c - relu(c - x): affine maps around a ReLU
        sign = 1.0 if mode == "max" else -1.0
        var = variables[0]
        pre = ctx.unique(f"{name}:shift")
        ctx.add(Affine(name=pre, op=node.op_type, inputs=[ctx.var(var)], out_shape=shape, lin=Scale(shape, np.array(sign)),
                       bias=torch.from_numpy(np.array(np.broadcast_to(-sign * c, shape)))), f"{node.output[0]}:shift")
        act = ctx.unique(f"{name}:relu")
        ctx.add(Activation(name=act, op=node.op_type, inputs=[pre], out_shape=shape, kind="relu"), f"{node.output[0]}:relu")
        ctx.add(Affine(name=name, op=node.op_type, inputs=[act], out_shape=shape, lin=Scale(shape, np.array(sign)),
                       bias=torch.from_numpy(np.array(np.broadcast_to(c, shape)))), node.output[0])
        return
    ctx.add(Extremum(name=name, op=node.op_type, inputs=[ctx.var(v) for v in variables], out_shape=shape, mode=mode), node.output[0])


@converter("Pow")
def pow_(ctx, node, attrs, name):
    e = np.asarray(ctx.const(node.input[1], "exponent"), np.float64)
    if e.size == 1 and float(e.ravel()[0]) == 1.0:
        ctx.alias(node.output[0], node.input[0])
        return
    raise Unsupported(
        "x^p with p != 1 is not globally Lipschitz; only L2-norm pooling (Pow 2 -> AveragePool -> Pow 0.5 or Sqrt) is recognised"
    )


def _space_depth(ctx, node, attrs, name, to_depth: bool):
    shape = ctx.shape(node.input[0])
    if len(shape) != 4:
        raise Unsupported(f"only 4-D inputs (N, C, H, W) are supported, got {list(shape)}")
    b = int(attrs["blocksize"])
    n, c, h, w = shape
    if to_depth:  # (n, c, h/b, b, w/b, b) -> (n, b, b, c, h/b, w/b)
        split, perm, out = (n, c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4), (n, c * b * b, h // b, w // b)
    elif attrs.get("mode", "DCR") == "DCR":  # (n, b, b, c/b^2, h, w) -> (n, c/b^2, h, b, w, b)
        split, perm, out = (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2), (n, c // (b * b), h * b, w * b)
    else:  # CRD
        split, perm, out = (n, c // (b * b), b, b, h, w), (0, 1, 4, 2, 5, 3), (n, c // (b * b), h * b, w * b)
    t = Transpose(split, perm)
    _add_affine(ctx, node, name, Composed([Reshape(shape, split), t, Reshape(t.out_shape, out)]))


@converter("DepthToSpace")
def depth_to_space(ctx, node, attrs, name):
    _space_depth(ctx, node, attrs, name, False)


@converter("SpaceToDepth")
def space_to_depth(ctx, node, attrs, name):
    _space_depth(ctx, node, attrs, name, True)


# Ops that are refused with a specific hint (they are not in the registry).
HINTS: dict[str, str] = {
    "Softmax": "a softmax output is not bounded: load the model up to its logits (remove the Softmax node)",
    "LogSoftmax": "load the model up to its logits (remove the LogSoftmax node)",
    "Gather": "indexing a tensor computed from the input is not supported",
    "Split": "splitting a tensor computed from the input is not supported yet (use Slice)",
    "Greater": "comparisons are not continuous",
    "LessOrEqual": "comparisons are not continuous",
    "Sqrt": "the square root is not Lipschitz at 0; only L2-norm pooling (Pow 2 -> AveragePool -> Sqrt) is recognised",
    "Sign": "the sign is not continuous; it is accepted only in the guard torch's LPPool emits (L2-norm pooling)",
    "Reciprocal": "1/x is not globally Lipschitz",
    "LSTM": "recurrent layers are not supported",
    "GRU": "recurrent layers are not supported",
    "RNN": "recurrent layers are not supported",
}
