"""Loaders: ONNX files and models, and torch modules, into one Graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ..errors import InputError
from ..graph import Graph
from .onnx_loader import crosscheck_onnxruntime, onnx_to_graph, read_model
from .registry import supported_ops

__all__ = ["load", "supported_ops"]


def load(model: Any, input_shape: tuple[int, ...] | None = None, crosscheck: bool = True) -> Graph:
    """Load a network into lipcert's Graph.

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto``, a ``torch.nn.Module`` or a
            ``Graph`` (returned as is).
        input_shape: the input tensor shape, batch axis included (e.g. ``(1, 3, 32, 32)``).
            Needed for torch modules; for ONNX models only when the shape is not fixed.
        crosscheck: compare the graph with onnxruntime (or the torch module) on random inputs
            and refuse it when they disagree.

    Raises:
        UnsupportedModelError: the model uses ops lipcert cannot bound (all are listed).
        ModelError: the file is broken, has non-finite weights or unfixable dynamic shapes.
    """
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, Path)):
        proto, digest = read_model(model)
        graph = onnx_to_graph(proto, input_shape, source=str(model), sha256=digest)
        if crosscheck:
            crosscheck_onnxruntime(graph, proto)
        return graph
    if isinstance(model, onnx.ModelProto):
        graph = onnx_to_graph(model, input_shape, source="onnx model")
        if crosscheck:
            crosscheck_onnxruntime(graph, model)
        return graph
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(model, torch.nn.Module):
        from .torch_loader import torch_to_graph

        return torch_to_graph(model, input_shape)
    raise InputError(f"cannot load a {type(model).__name__}", None, "pass a path to an .onnx file, an onnx.ModelProto or a torch.nn.Module")
