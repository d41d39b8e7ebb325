"""ONNX ModelProto -> Graph."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

from ..errors import InputError, ModelError, UnsupportedModelError
from ..graph import Graph
from ..graph.nodes import Node
from . import onnx_ops  # noqa: F401  (fills the registry)
from .patterns import find_l2_pools, fuse_circular_convs, fuse_idioms
from .registry import Unsupported, find_converter, supported_ops

log = logging.getLogger(__name__)


class Context:
    """What converters see: constants, variable tensors (lipcert nodes), and the nodes so far."""

    def __init__(self, opset: int, exact_floats: dict[tuple[str, str], dict[float, float]] | None = None) -> None:
        self.opset = opset
        # a float64 source's float attributes, which ONNX stores in float32: (op, attribute) ->
        # {float32 rounding: exact value}; None for an ONNX file (its float32 values are the model)
        self.exact_floats = exact_floats
        self.consts: dict[str, np.ndarray] = {}
        self.vars: dict[str, str] = {}  # ONNX tensor name -> lipcert node name
        self.shapes: dict[str, tuple[int, ...]] = {Graph.INPUT: ()}
        self.nodes: list[Node] = []
        self.consumed: set[str] = set()  # tensors that some node or the graph output reads
        self.current: onnx.NodeProto | None = None

    def exact_float(self, op: str, attribute: str, stored: float) -> float:
        """A float attribute as the model has it. From a float64 source, ONNX's float32 value
        (LeakyReLU(1/3) arrives as 0.3333333432674408: another function, by 3e-8 of x) becomes the
        source's value with that rounding, or where none is known (F.leaky_relu(x, 0.1)) the shortest
        decimal with it, which is what a literal in the source was."""
        if self.exact_floats is None:
            return float(stored)
        rounded = np.float32(stored)
        return self.exact_floats.get((op, attribute), {}).get(float(rounded), float(str(rounded)))

    # --- inputs of the current node ---------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str, what: str = "operand") -> np.ndarray:
        if name not in self.consts:
            raise Unsupported(f"its {what} '{name}' must be a constant (an initializer), not computed from the input")
        return self.consts[name]

    def var(self, name: str) -> str:
        if name not in self.vars:
            raise Unsupported(f"its input '{name}' must come from the network input")
        return self.vars[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.var(name)]

    def optional(self, node: onnx.NodeProto, index: int) -> str | None:
        return node.input[index] if len(node.input) > index and node.input[index] else None

    # --- outputs -------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        name, k = base or "node", 1
        while name in self.shapes:
            k += 1
            name = f"{base}_{k}"
        return name

    def add(self, node: Node, output: str) -> None:
        self.nodes.append(node)
        self.shapes[node.name] = tuple(node.out_shape)
        self.vars[output] = node.name

    def alias(self, output: str, input_name: str) -> None:
        """The output is the input unchanged (Identity, Dropout at inference)."""
        if input_name in self.consts:
            self.consts[output] = self.consts[input_name]
        else:
            self.vars[output] = self.var(input_name)


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def read_model(path: str | Path) -> tuple[onnx.ModelProto, str]:
    p = Path(path)
    if not p.exists():
        raise InputError(f"model file not found: {p}", None, "check the path")
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise ModelError(
            f"could not read {p.name} as an ONNX model ({type(exc).__name__}: {str(exc)[:200]})",
            str(p),
            "check that the file is a complete .onnx file (not truncated, not another format)",
        ) from None
    if not model.graph.node:
        raise ModelError(f"{p.name} holds no ONNX graph nodes", str(p), "check that the file is a complete .onnx file")
    files = _external_files(model)
    if files:
        # weights saved beside the model (onnx.save(..., save_as_external_data=True)) are read from
        # the model's folder, not the working directory; a missing one is named, not left to onnx
        missing = [f for f in files if not (p.parent / f).is_file()]
        if missing:
            raise ModelError(f"{p.name} keeps its weights in external data file(s) that are missing: {', '.join(missing)}", str(p),
                             f"put {', '.join(missing)} in {p.parent} beside {p.name}, or save the model with its weights inside")
        try:
            load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise ModelError(f"could not read the external data of {p.name} ({type(exc).__name__}: {str(exc)[:200]})", str(p),
                             "check that the external data files are complete and belong to this model") from None
        for f in files:  # the digest identifies the weights too
            data += (p.parent / f).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
    return model, digest


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The initializers and the tensors of Constant-like attributes (where external data can be)."""
    return [*model.graph.initializer, *(a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)]


def _external_files(model: onnx.ModelProto) -> list[str]:
    """The external data files the model's tensors point to, in order of first use."""
    return list(dict.fromkeys(ExternalDataInfo(t).location for t in _tensors(model) if uses_external_data(t)))


def _fixed_input(model: onnx.ModelProto, input_shape: tuple[int, ...] | None, where: str) -> tuple[onnx.ValueInfoProto, tuple[int, ...]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise UnsupportedModelError(
            [("(graph)", where, f"the graph has {len(inputs)} inputs ({names}); lipcert bounds networks with exactly one input")]
        )
    if len(model.graph.output) != 1:
        raise UnsupportedModelError(
            [("(graph)", where, f"the graph has {len(model.graph.output)} outputs; lipcert bounds networks with exactly one output")]
        )
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != len(dims) or any(d.dim_value and d.dim_value != s for d, s in zip(dims, shape)):
            model_shape = [d.dim_value or d.dim_param or "?" for d in dims]
            raise InputError(f"input_shape {list(shape)} does not match the model's input {model_shape}", where, "pass a shape that agrees with the model's fixed dimensions")
        return inp, shape
    shape = []
    for k, d in enumerate(dims):
        if d.dim_value > 0:
            shape.append(d.dim_value)
        elif k == 0:
            shape.append(1)  # a symbolic batch axis: bound the network on one example
        else:
            raise ModelError(
                f"input '{inp.name}' has a dynamic dimension {k} ('{d.dim_param or '?'}') that lipcert cannot fix",
                where,
                "pass the input shape explicitly (--input-shape 1,3,32,32 or input_shape=...)",
            )
    if not dims:
        raise ModelError(f"input '{inp.name}' has no shape information", where, "pass the input shape explicitly")
    return inp, tuple(shape)


def _fold_constant(node: onnx.NodeProto, ctx: Context) -> None:
    """Evaluate a node whose inputs are all constants with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    inputs = [i for i in node.input if i]
    feeds = {i: ctx.consts[i] for i in inputs}
    graph = onnx.helper.make_graph(
        [node], "fold",
        [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(feeds[i].dtype), feeds[i].shape) for i in inputs],
        [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", ctx.opset)])
    outs = ReferenceEvaluator(model).run(None, feeds)
    for name, value in zip([o for o in node.output if o], outs):
        ctx.consts[name] = np.asarray(value)


def onnx_to_graph(model: onnx.ModelProto, input_shape: tuple[int, ...] | None = None, source: str | None = None, sha256: str | None = None,
                  exact_floats: dict[tuple[str, str], dict[float, float]] | None = None) -> Graph:
    """Convert an ONNX model into a Graph, refusing every node that cannot be bounded at once.
    ``exact_floats``: see ``Context.exact_floats`` (the torch loader's, for float64 modules)."""
    where = source or "model"
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    inp, shape = _fixed_input(model, input_shape, where)
    ctx = Context(opset, exact_floats)
    ctx.shapes[Graph.INPUT] = shape
    ctx.vars[inp.name] = Graph.INPUT
    ctx.consumed = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    if _external_files(model):  # read_model loads them; a ModelProto must come with them loaded
        raise ModelError("the model's weights are in external data files that were not loaded", where,
                         "pass the path of the .onnx file, or load the model with onnx.load(path) (which reads them)")
    for init in model.graph.initializer:
        ctx.consts[init.name] = numpy_helper.to_array(init)
    problems: list[tuple[str, str, str]] = []
    poisoned: set[str] = set()
    pools = find_l2_pools(model)
    inside_pools = {k for p in pools.values() for k in p.members}
    for index, node in enumerate(model.graph.node):
        label = node.name or f"#{index} {node.op_type}"
        if index in inside_pools:  # converted with the idiom's last node
            continue
        if index in pools:
            pool = pools[index]
            if pool.x in poisoned:
                poisoned.update(node.output)
                continue
            try:
                ctx.current = node
                onnx_ops.l2_norm_pool(ctx, node, pool.pool, attributes(pool.pool), pool.x, pool.inner,
                                      ctx.unique(pool.pool.name or node.name or f"L2NormPool_{index}"))
            except Unsupported as exc:
                problems.append(("L2NormPool", label, str(exc)))
                poisoned.update(node.output)
            continue
        if node.domain not in ("", "ai.onnx"):
            problems.append((node.op_type, label, f"custom domain '{node.domain}' is not supported"))
            poisoned.update(node.output)
            continue
        fn = find_converter(node.op_type, opset)
        if any(i in poisoned for i in node.input):
            if fn is None:
                problems.append((node.op_type, label, onnx_ops.HINTS.get(node.op_type, "op not supported")))
            poisoned.update(node.output)
            continue
        inputs = [i for i in node.input if i]
        try:
            if node.op_type == "Shape" and inputs[0] in ctx.vars:
                full = ctx.shape(inputs[0])
                a = attributes(node)
                ctx.consts[node.output[0]] = np.array(full[a.get("start", 0) : a.get("end", len(full))], dtype=np.int64)
            elif inputs and all(i in ctx.consts for i in inputs):
                _fold_constant(node, ctx)
            elif fn is None:
                raise Unsupported(onnx_ops.HINTS.get(node.op_type, "op not supported"))
            else:
                ctx.current = node
                fn(ctx, node, attributes(node), ctx.unique(node.name or f"{node.op_type}_{index}"))
        except Unsupported as exc:
            problems.append((node.op_type, label, str(exc)))
            poisoned.update(node.output)
        except (ValueError, RuntimeError, IndexError, KeyError) as exc:
            problems.append((node.op_type, label, f"could not convert: {exc}"))
            poisoned.update(node.output)
    if problems:
        raise UnsupportedModelError(problems, supported_ops())
    out_name = model.graph.output[0].name
    if out_name not in ctx.vars:
        raise ModelError(f"the output '{out_name}' does not depend on the input", where, "check the model")
    output = ctx.vars[out_name]
    if output == Graph.INPUT:
        raise UnsupportedModelError([("(graph)", where, "the network is the identity: nothing to bound")])
    ctx.nodes = fuse_idioms(ctx.nodes, ctx.shapes)
    # keep only the nodes the output depends on
    needed, stack = set(), [output]
    by_name = {n.name: n for n in ctx.nodes}
    while stack:
        name = stack.pop()
        if name in needed or name == Graph.INPUT:
            continue
        needed.add(name)
        stack.extend(by_name[name].inputs)
    nodes = fuse_circular_convs([n for n in ctx.nodes if n.name in needed])
    graph = Graph(nodes, shape, output, source, sha256)
    graph.check()
    return graph


def _float32_copy(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model with every double tensor, input, output and cast made float32 (for onnxruntime,
    which has no double kernel for Conv and other ops); None when it holds nothing double."""
    from onnx import TensorProto, numpy_helper

    copy, changed = onnx.ModelProto(), False
    copy.CopyFrom(model)

    def single(t: onnx.TensorProto) -> None:
        nonlocal changed
        if t.data_type == TensorProto.DOUBLE:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            changed = True

    for t in copy.graph.initializer:
        single(t)
    for v in [*copy.graph.input, *copy.graph.output, *copy.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.DOUBLE:
            v.type.tensor_type.elem_type, changed = TensorProto.FLOAT, True
    for node in copy.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                single(a.t)
            elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.DOUBLE:
                a.i, changed = TensorProto.FLOAT, True
    return copy if changed else None


def crosscheck_onnxruntime(graph: Graph, model: onnx.ModelProto, samples: int = 4, seed: int = 0) -> float:
    """Compare the Graph's forward pass with onnxruntime on random inputs; raise on mismatch.

    Returns the largest relative deviation seen.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        # onnxruntime's CPU kernels cover few ops in double (Conv has none): check a float32 copy
        single = _float32_copy(model) if "NOT_IMPLEMENTED" in str(exc) else None
        try:
            sess = ort.InferenceSession(single.SerializeToString(), opts, providers=["CPUExecutionProvider"]) if single else None
        except Exception:
            sess = None
        if sess is None:
            raise ModelError(f"onnxruntime cannot run this model ({str(exc)[:300]})", graph.source, "check that the model is valid ONNX") from None
    inp = sess.get_inputs()[0]
    dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(inp.type, np.float32)
    rng = np.random.default_rng(seed)
    worst, compared = 0.0, 0
    for k in range(samples):
        x = rng.uniform(0.0, 1.0, graph.input_shape) if k % 2 == 0 else rng.normal(0.0, 1.0, graph.input_shape)
        x = x.astype(dtype)
        ref = np.asarray(sess.run(None, {inp.name: x})[0], dtype=np.float64)
        ours = graph.forward(torch.from_numpy(x.astype(np.float64))[None])[0].numpy()
        if ref.shape != ours.shape and ref.size == ours.size:
            ref = ref.reshape(ours.shape)
        if ref.shape != ours.shape:
            raise ModelError(f"lipcert's graph gives output shape {ours.shape}, onnxruntime {ref.shape}", graph.source, "please report this model: a converter is wrong")
        if not np.isfinite(ref).all() and np.isfinite(ours).all():
            continue  # onnxruntime overflowed in the model's precision: nothing to compare (a NaN deviation passed)
        compared += 1
        scale = max(1.0, float(np.abs(ref).max()))
        dev = float(np.abs(ref - ours).max()) / scale
        worst = max(worst, dev)
        tol = 1e-4 if dtype == np.float32 else 1e-9
        if not np.isfinite(ours).all() or dev > tol:
            raise ModelError(
                f"lipcert's graph disagrees with onnxruntime on a random input (relative deviation {dev:.3g} > {tol:g})",
                graph.source,
                "please report this model: a converter is wrong, and no bound is given for a graph that differs from the model",
            )
    if not compared:
        raise ModelError("onnxruntime's outputs are not finite on any random input, so lipcert's graph could not be checked against the model",
                         graph.source, "check the model's weights: its outputs overflow in its own precision")
    return worst
