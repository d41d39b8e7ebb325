"""Build small ONNX models with onnx.helper for converter tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def one_node_model(op: str, in_shape, inits: dict[str, np.ndarray] | None = None, extra_inputs: list[str] | None = None,
                   opset: int = 17, **attrs) -> onnx.ModelProto:
    """A model with input 'x', one node ``op``(x, *extra_inputs) -> 'y', and float initializers."""
    inits = inits or {}
    node = helper.make_node(op, ["x", *(extra_inputs or [])], ["y"], name=f"the_{op.lower()}", **attrs)
    return graph_model([node], in_shape, inits, opset)


def graph_model(nodes, in_shape, inits: dict[str, np.ndarray], opset: int = 17, output: str = "y") -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(np.asarray(v), name=k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.normal(size=shape).astype(np.float32)
