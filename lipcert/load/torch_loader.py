"""torch.nn.Module -> Graph, through an in-memory ONNX export and the ONNX converters.

The module is exported with torch's TorchScript-based exporter (``dynamo=False``), which ships
with torch itself; the newer exporter needs the optional ``onnxscript`` package. The resulting
graph is checked against the module on random inputs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from ..errors import InputError, ModelError
from ..graph import Graph
from .onnx_loader import onnx_to_graph


def module_to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...]) -> onnx.ModelProto:
    was_training = module.training
    module.eval()
    try:
        example = torch.zeros(input_shape, dtype=next(iter(module.parameters()), torch.zeros(1)).dtype)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, input_names=["input"], output_names=["output"])
    except Exception as exc:
        raise ModelError(
            f"torch could not export the module to ONNX ({type(exc).__name__}: {str(exc)[:300]})",
            type(module).__name__,
            "use standard layers (Linear, Conv, pooling, batch-norm, activations) or export it to ONNX yourself",
        ) from None
    finally:
        module.train(was_training)
    return onnx.load_from_string(buffer.getvalue())


def torch_to_graph(module: torch.nn.Module, input_shape: tuple[int, ...] | None) -> Graph:
    if input_shape is None:
        raise InputError("loading a torch module needs input_shape", type(module).__name__, "pass input_shape=(1, C, H, W) (the batch axis included)")
    shape = tuple(int(n) for n in input_shape)
    model = module_to_onnx(module, shape)
    graph = onnx_to_graph(model, shape, source=f"torch module {type(module).__name__}")
    crosscheck_module(graph, module)
    return graph


def crosscheck_module(graph: Graph, module: torch.nn.Module, samples: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    dtype = next(iter(module.parameters()), torch.zeros(1, dtype=torch.float32)).dtype
    module.eval()
    for _ in range(samples):
        x = rng.normal(size=graph.input_shape)
        with torch.no_grad():
            ref = module(torch.as_tensor(x, dtype=dtype)).double().numpy()
        ours = graph.forward(torch.from_numpy(x)[None])[0].numpy()
        scale = max(1.0, float(np.abs(ref).max()))
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        if ref.shape != ours.shape or float(np.abs(ref - ours).max()) / scale > tol:
            raise ModelError("lipcert's graph disagrees with the torch module on a random input", graph.source, "please report this module: a converter is wrong")
