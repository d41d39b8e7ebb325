"""Idioms that span several ONNX nodes and are Lipschitz only as a whole.

* **L2-norm pooling** (torch's ``LPPool`` with p = 2, deel-torchlip's ``ScaledL2NormPool2d``):
  ``Pow(x, 2) -> AveragePool -> [Sign/Abs/Relu/Mul guard] -> [Mul c] -> Pow(., 0.5) | Sqrt``.
  Its parts (a square, a square root) are not globally Lipschitz, the whole is: it becomes one
  ``NormPool`` node. Found on the ONNX graph before conversion (``find_l2_pools``).
* **Sorting idioms** (deel-torchlip's ``GroupSort2`` and ``MaxMin``): a ``Concat`` of the min and
  the max of the same groups, of ``relu(x)`` and ``relu(-x)``, or of the elementwise max and min
  of two tensors. Converted node by node they are
  two branches whose constants add (sqrt(2) in l2); as one sort the constant is 1 in every lp.
  Rewritten on lipcert's nodes after conversion (``fuse_idioms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

import torch

from ..graph import Activation, Affine, Composed, Concat, Extremum, Node, Pad, Reshape, Scale, Sort, Sum
from ..graph.linear import Branches, CircularConv, Conv, LinearOp


# --- L2-norm pooling on the ONNX graph ---------------------------------------------------------------
@dataclass
class L2Pool:
    """A matched L2-norm pooling: ``out = sqrt(inner * pool(x^2))``."""

    x: str  # the pooled tensor
    pool: onnx.NodeProto  # AveragePool or GlobalAveragePool
    inner: float  # the constant multiplying the pooled squares under the root
    members: set[int]  # indices of the matched nodes other than the last


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _scalar(consts: dict[str, np.ndarray], name: str) -> float | None:
    v = consts.get(name)
    return float(np.asarray(v, np.float64).ravel()[0]) if v is not None and np.asarray(v).size == 1 else None


def find_l2_pools(model: onnx.ModelProto) -> dict[int, L2Pool]:
    """The L2-norm poolings of a model, keyed by the index of their final (root) node."""
    nodes = list(model.graph.node)
    consts = _constants(model)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    readers: dict[str, set[int]] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            readers.setdefault(i, set()).add(k)
    outputs = {o.name for o in model.graph.output}

    def node_of(tensor: str) -> tuple[int, onnx.NodeProto] | None:
        k = producer.get(tensor)
        return None if k is None else (k, nodes[k])

    def var_and_const(n: onnx.NodeProto) -> tuple[str, float] | None:
        a, b = n.input[0], n.input[1]
        for var, c in ((a, b), (b, a)):
            value = _scalar(consts, c)
            if value is not None and var not in consts:
                return var, value
        return None

    found: dict[int, L2Pool] = {}
    for root, n in enumerate(nodes):
        if not (n.op_type == "Sqrt" or (n.op_type == "Pow" and _scalar(consts, n.input[1]) == 0.5)):
            continue
        members: set[int] = set()
        inner, t = 1.0, n.input[0]
        while (hit := node_of(t)) is not None:
            k, m = hit
            if m.op_type in ("Mul", "Div") and (vc := var_and_const(m)) is not None and (m.op_type == "Mul" or vc[0] == m.input[0]):
                if vc[1] <= 0:
                    break
                inner *= vc[1] if m.op_type == "Mul" else 1.0 / vc[1]
                members.add(k)
                t = vc[0]
            elif m.op_type == "Relu" or (m.op_type == "Abs"):  # identities on the non-negative pooled squares
                members.add(k)
                t = m.input[0]
            elif m.op_type == "Mul" and len(m.input) == 2:  # sign(w) * relu(abs(w)) = w for w >= 0
                a, b = (node_of(i) for i in m.input)
                sign = next((h for h in (a, b) if h and h[1].op_type == "Sign"), None)
                other = b if sign is a else a
                chain, cur = [], other
                while cur is not None and cur[1].op_type in ("Relu", "Abs"):
                    chain.append(cur[0])
                    cur = node_of(cur[1].input[0])
                if sign is None or not chain or nodes[chain[-1]].input[0] != sign[1].input[0]:
                    break
                members.update([k, sign[0], *chain])
                t = sign[1].input[0]
            else:
                break
        pool = node_of(t)
        if pool is None or pool[1].op_type not in ("AveragePool", "GlobalAveragePool"):
            continue
        square = node_of(pool[1].input[0])
        if square is None:
            continue
        sq = square[1]
        if sq.op_type == "Pow" and _scalar(consts, sq.input[1]) == 2.0:
            x = sq.input[0]
        elif sq.op_type == "Mul" and sq.input[0] == sq.input[1]:
            x = sq.input[0]
        else:
            continue
        members.update([pool[0], square[0]])
        # every intermediate result must be read only inside the idiom
        inside = members | {root}
        if any(not readers.get(o, set()) <= inside or o in outputs for k in members for o in nodes[k].output):
            continue
        found[root] = L2Pool(x, pool[1], inner, members)
    return found


# --- sorting idioms on lipcert's nodes ----------------------------------------------------------------
def _negation_of(node: Node) -> str | None:
    """The input of an affine node that is exactly x -> -x, else None."""
    if isinstance(node, Affine) and node.bias is None and isinstance(node.lin, Scale):
        f = node.lin.factor
        if f.numel() and bool((f == -1.0).all()):
            return node.inputs[0]
    return None


def _maxmin(concat: Concat, by_name: dict[str, Node], unique) -> list[Node] | None:
    """Concat(relu(x), relu(-x)) (either order) along axis a: the sort of each pair (x_i, 0),
    with the min's sign flipped. Built as: embed x as pairs (x_i, 0) on a new axis (a reshape and a
    zero pad: isometries), sort each pair, then sign and reshape back into the concat layout."""
    if len(concat.inputs) != 2:
        return None
    acts = [by_name.get(i) for i in concat.inputs]
    if not all(isinstance(a, Activation) and a.kind == "relu" for a in acts):
        return None
    srcs = [a.inputs[0] for a in acts]
    neg = [_negation_of(by_name[s]) if s in by_name else None for s in srcs]
    if neg[1] is not None and neg[1] == srcs[0]:
        x, order = srcs[0], (1, 0)  # (relu(x), relu(-x)) = (max(x, 0), -min(x, 0))
    elif neg[0] is not None and neg[0] == srcs[1]:
        x, order = srcs[1], (0, 1)
    else:
        return None
    shape = acts[0].out_shape
    a = concat.axis
    lifted = shape[:a] + (1,) + shape[a:]
    pairs = shape[:a] + (2,) + shape[a:]
    embed = Affine(name=unique(f"{concat.name}:pairs"), op="MaxMin", inputs=[x], out_shape=pairs,
                   lin=Composed([Reshape(shape, lifted), Pad(lifted, (0,) * a + (0,) + (0,) * (len(shape) - a), (0,) * a + (1,) + (0,) * (len(shape) - a))]))
    sort = Sort(name=unique(f"{concat.name}:sort"), op="MaxMin", inputs=[embed.name], out_shape=pairs, axis=a, ranks=order, in_shape=pairs)
    signs = np.ones((2,) + (1,) * (len(shape) - a))
    signs[order.index(0)] = -1.0  # the min of (x_i, 0) is -relu(-x_i)
    out = Affine(name=concat.name, op="MaxMin", inputs=[sort.name], out_shape=concat.out_shape,
                 lin=Composed([Scale(pairs, signs), Reshape(pairs, concat.out_shape)]))
    return [embed, sort, out]


def _extremum_pair(concat: Concat, by_name: dict[str, Node], unique) -> list[Node] | None:
    """Concat(max(a, b), min(a, b)) (either order) along axis k: MaxMin written with elementwise
    Max and Min (``torch.maximum`` / ``torch.minimum`` of two halves). Node by node the two
    extrema count a and b twice (sqrt(2) more in l2); as one sort of each pair (a_i, b_i) the
    constant is that of the pair tensor. Built as: a and b side by side on a new axis before k
    (one affine node when both are affine in a common tensor, else a Concat), the sort of each
    pair, and a reshape into the concat's layout (max first when the max comes first)."""
    parts = [by_name.get(i) for i in concat.inputs]
    if len(parts) != 2 or not all(isinstance(p, Extremum) and len(p.inputs) == 2 for p in parts):
        return None
    a, b = parts[0].inputs
    if {p.mode for p in parts} != {"max", "min"} or set(parts[1].inputs) != {a, b} or a == b:
        return None
    shape, k = parts[0].out_shape, concat.axis
    lifted, pairs = shape[:k] + (1,) + shape[k:], shape[:k] + (2,) + shape[k:]
    lifts = [Affine(name=unique(f"{concat.name}:{i}"), op="MaxMin", inputs=[i], out_shape=lifted, lin=Reshape(shape, lifted)) for i in (a, b)]
    stack = Concat(name=unique(f"{concat.name}:pairs"), op="MaxMin", inputs=[n.name for n in lifts], out_shape=pairs, axis=k)
    by_name.update({n.name: n for n in lifts})
    stack_nodes = _linear_branches(stack, by_name) or [*lifts, stack]
    sort = Sort(name=unique(f"{concat.name}:sort"), op="MaxMin", inputs=[stack.name], out_shape=pairs, axis=k,
                ranks=(1, 0) if parts[0].mode == "max" else (0, 1), in_shape=pairs)
    out = Affine(name=concat.name, op="MaxMin", inputs=[sort.name], out_shape=concat.out_shape, lin=Reshape(pairs, concat.out_shape))
    return [*stack_nodes, sort, out]


def _sort_concat(concat: Concat, by_name: dict[str, Node]) -> list[Node] | None:
    """Concat of order statistics of the same groups, along the sorted axis: one Sort."""
    parts = [by_name.get(i) for i in concat.inputs]
    if not all(isinstance(p, Sort) for p in parts):
        return None
    first = parts[0]
    if any(p.inputs != first.inputs or p.axis != first.axis or p.in_shape != first.in_shape for p in parts) or concat.axis != first.axis:
        return None
    ranks = tuple(r for p in parts for r in p.ranks)
    return [Sort(name=concat.name, op="+".join(dict.fromkeys([p.op for p in parts] + ["Concat"])), inputs=list(first.inputs),
                 out_shape=concat.out_shape, axis=first.axis, ranks=ranks, in_shape=first.in_shape)]


def _affine_chain(name: str, by_name: dict[str, Node]) -> list[str]:
    """``name`` and the nodes above it reached through single-input affine nodes, nearest first."""
    chain = [name]
    while isinstance(node := by_name.get(chain[-1]), Affine):
        chain.append(node.inputs[0])
    return chain


def _linear_branches(join: Node, by_name: dict[str, Node], shapes: dict[str, tuple[int, ...]] | None = None) -> list[Node] | None:
    """A Sum or Concat whose inputs are affine paths from one common tensor: one Affine node
    (the same function; its exact norm can be far below the branches' added bounds)."""
    if len(join.inputs) < 2:
        return None
    chains = [_affine_chain(i, by_name) for i in join.inputs]
    common = next((n for n in chains[0] if all(n in c for c in chains[1:])), None)
    if common is None or common in join.inputs and all(i == common for i in join.inputs):
        return None
    ops, biases = [], []
    for chain in chains:
        path = [by_name[n] for n in reversed(chain[: chain.index(common)])]
        if not path:  # the common tensor itself (a node, or the graph's input)
            shape = by_name[common].out_shape if common in by_name else (shapes or {}).get(common)
            if shape is None:
                return None
            ops.append(Reshape(shape, shape))
            biases.append(None)
            continue
        ops.append(Composed([n.lin for n in path]))
        x = torch.zeros((1, *path[0].lin.in_shape), dtype=torch.float64)
        for n in path:
            x = n.forward(x)
        biases.append(x[0] if any(n.bias is not None for n in path) else None)
    if isinstance(join, Sum):
        lin = Branches(ops, join.coeffs)
        parts = [c * b for c, b in zip(join.coeffs, biases) if b is not None]
        bias = sum(parts[1:], parts[0]) if parts else None
    else:
        lin = Branches(ops, axis=join.axis)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(op.out_shape, dtype=torch.float64) for b, op in zip(biases, ops)], dim=join.axis)
    return [Affine(name=join.name, op=f"{join.op}(linear branches)", inputs=[common], out_shape=join.out_shape, lin=lin, bias=bias)]


# --- circular padding ----------------------------------------------------------------------------------
def _selection(op: LinearOp) -> bool:
    """Whether ``op`` copies each output entry from one input entry or sets it to 0 (slices,
    zero pads, reshapes, concatenations of such): then A applied to 1, 2, ..., n names every
    output's source exactly."""
    if isinstance(op, (Pad, Reshape)):
        return True
    if isinstance(op, Composed):
        return all(_selection(o) for o in op.ops)
    if isinstance(op, Branches):
        return op.axis is not None and all(c == 1.0 for c in op.coeffs) and all(_selection(o) for o in op.ops)
    return False


def _circular_shift(op: LinearOp) -> tuple[int, ...] | None:
    """For a selection ``op`` from (1, C, *n) to (1, C, *m) with m >= n, the begin pads p such
    that out[c, i] = in[c, (i - p) mod n] for every entry (torch's circular padding), else None."""
    shape_in, shape_out = op.in_shape, op.out_shape
    if (len(shape_in) < 3 or len(shape_in) != len(shape_out) or shape_in[:2] != shape_out[:2]
            or any(m < n for n, m in zip(shape_in[2:], shape_out[2:]))):
        return None
    count = math.prod(shape_in)
    with torch.no_grad():
        source = op.apply(torch.arange(1, count + 1, dtype=torch.float64).reshape(1, *shape_in))[0].round().long() - 1
    if bool((source < 0).any()):  # a zero-padded entry (source -1): not a circular padding
        return None
    first = np.unravel_index(int(source.reshape(-1)[0]), shape_in)  # the source of out[0, 0, 0, ...]
    if any(first[:2]):
        return None
    n = shape_in[2:]
    begins = tuple(int((-i) % k) for i, k in zip(first[2:], n))
    grids = torch.meshgrid(*[torch.arange(c) for c in shape_out], indexing="ij")
    expected = grids[1].clone()  # the flat source index: channel c, then (i - p) mod n per spatial axis
    for axis, (p, k) in enumerate(zip(begins, n)):
        expected = expected * k + (grids[axis + 2] - p) % k
    return begins if bool((source == expected).all()) else None


def fuse_circular_convs(nodes: list[Node]) -> list[Node]:
    """Every convolution of a circularly padded tensor as one circular convolution (see
    _circular_conv), on the pruned nodes (every reader counted is a live one); the padding nodes
    it absorbs are dropped once nothing else reads them (a padding two convolutions share is
    absorbed by both)."""
    by_name = {n.name: n for n in nodes}
    readers: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    fused: dict[str, Node] = {}
    absorbed: set[str] = set()
    for n in nodes:
        if isinstance(n, Affine) and isinstance(n.lin, Conv) and (found := _circular_conv(n, by_name, readers)) is not None:
            fused[n.name], chain = found
            absorbed.update(chain)
    out = [fused.get(n.name, n) for n in nodes]
    while dead := {n.name for n in out if n.name in absorbed} - {i for n in out for i in n.inputs}:
        out = [n for n in out if n.name not in dead]
    return out


def _circular_conv(conv: Affine, by_name: dict[str, Node], readers: dict[str, int]) -> tuple[Affine, list[str]] | None:
    """A convolution without padding of a tensor padded circularly (torch's
    ``padding_mode="circular"`` exports slices and concatenations): one circular convolution,
    whose exact l2 norm comes from the FFT (node by node, the padding alone has norm up to 2);
    with the names of the padding nodes it replaces."""
    if conv.lin.transposed or any(conv.lin.begins) or any(conv.lin.ends):
        return None
    # the selection nodes above the convolution, nearest first: the padded tensor itself may have
    # other readers (a shared padding), the nodes that build it only the next one
    chain: list[Affine] = []
    name = conv.inputs[0]
    while (isinstance(node := by_name.get(name), Affine) and node.bias is None and (not chain or readers.get(name) == 1)
           and _selection(node.lin)):
        chain.append(node)
        name = node.inputs[0]
    for k in range(len(chain), 0, -1):  # the longest chain that pads circularly
        pad = Composed([n.lin for n in reversed(chain[:k])])
        if (shift := _circular_shift(pad)) is not None and CircularConv.covers(pad.in_shape, conv.lin):
            fused = Affine(name=conv.name, op=f"{conv.op}(circular padding)", inputs=chain[k - 1].inputs, out_shape=conv.out_shape,
                           lin=CircularConv(pad, conv.lin, shift), bias=conv.bias)
            return fused, [n.name for n in chain[:k]]
    return None


def fuse_idioms(nodes: list[Node], shapes: dict[str, tuple[int, ...]]) -> list[Node]:
    """Replace every sorting idiom by the equivalent sort, and linear branches by one affine node
    (same output name, same function). ``shapes``: every name in use (new node names avoid them)
    and its shape. Nodes left unread are pruned later."""
    names = set(shapes) | {n.name for n in nodes}

    def unique(base: str) -> str:
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    by_name = {n.name: n for n in nodes}
    out: list[Node] = []
    for n in nodes:
        new = None
        if isinstance(n, Concat):
            new = _sort_concat(n, by_name) or _maxmin(n, by_name, unique) or _extremum_pair(n, by_name, unique)
        if isinstance(n, (Sum, Concat)) and not new:
            new = _linear_branches(n, by_name, shapes)

        if new:
            out.extend(new)
            by_name.update({m.name: m for m in new})
        else:
            out.append(n)
    return out
