"""The layer graph: typed nodes with static shapes (see DESIGN.md)."""

from .graph import Graph
from .linear import NORMS, AvgPool, Composed, Conv, LinearOp, MatMul, Pad, Reshape, Scale, Transpose
from .nodes import Activation, Affine, Concat, Extremum, MaxPool, Node, NormPool, Sort, Sum

__all__ = [
    "Graph", "Node", "Affine", "Activation", "MaxPool", "Sum", "Concat", "Sort", "NormPool", "Extremum", "NORMS",
    "LinearOp", "MatMul", "Conv", "AvgPool", "Scale", "Reshape", "Transpose", "Pad", "Composed",
]
