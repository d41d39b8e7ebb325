"""Sorting written with linear maps and a ReLU, for methods that only know slope-restricted
activations (LipSDP).

For a pair (a, b): ``min(a, b) = a - relu(a - b)`` and ``max(a, b) = b + relu(a - b)``. So a
``Sort`` of groups of two (GroupSort2, MaxMin) is ``W_out phi(W_in x)`` with
``W_in = [I; D]`` (D: a - b per pair), ``phi`` the identity on the first block (slope in [1, 1])
and a ReLU on the second (slope in [0, 1]), and ``W_out = [S, G]`` (S selects the first member of
each output's pair, G adds -r for a min and +r for a max). The identity neurons carry the skip
connection, so the network stays a chain of affine maps and slope-restricted activations. The
function is unchanged, so every bound of the rewritten graph bounds the original.
"""

from __future__ import annotations

import numpy as np
import torch

from .graph import Graph
from .linear import Composed, MatMul, Reshape
from .nodes import Activation, Affine, Node, Sort

MAX_PAIRS = 4096  # dense matrices of (1.5 n) x n entries: beyond this LipSDP is out of reach anyway


def _pair_sort(node: Sort) -> list[Node] | None:
    shape = node.in_shape
    if shape[node.axis] != 2 or node.multiplicity != 1:
        return None
    n = int(np.prod(shape))
    pairs = n // 2
    if pairs > MAX_PAIRS:
        return None
    idx = np.arange(n).reshape(shape)
    first = np.take(idx, 0, axis=node.axis).ravel()  # flat index of a in each pair
    second = np.take(idx, 1, axis=node.axis).ravel()  # and of b
    w_in = np.zeros((n + pairs, n))
    w_in[:n] = np.eye(n)
    w_in[n + np.arange(pairs), first] = 1.0
    w_in[n + np.arange(pairs), second] = -1.0
    out_shape = node.out_shape
    out_idx = np.arange(int(np.prod(out_shape))).reshape(out_shape)
    w_out = np.zeros((out_idx.size, n + pairs))
    for pos, rank in enumerate(node.ranks):
        rows = np.take(out_idx, pos, axis=node.axis).ravel()
        if rank == 0:  # min = a - relu(a - b)
            w_out[rows, first] = 1.0
            w_out[rows, n + np.arange(pairs)] = -1.0
        else:  # max = b + relu(a - b)
            w_out[rows, second] = 1.0
            w_out[rows, n + np.arange(pairs)] = 1.0
    slope = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(pairs, dtype=torch.float64)])
    lin_in = Composed([Reshape(shape, (n,)), MatMul((n,), w_in, axis=-1)])
    lin_out = Composed([MatMul((n + pairs,), w_out, axis=-1), Reshape((out_idx.size,), out_shape)])
    a = Affine(name=f"{node.name}:split", op=f"{node.op}:pairs", inputs=list(node.inputs), out_shape=(n + pairs,), lin=lin_in)
    act = Activation(name=f"{node.name}:relu", op=f"{node.op}:pairs", inputs=[a.name], out_shape=(n + pairs,), kind="prelu", params={"slope": slope})
    b = Affine(name=node.name, op=f"{node.op}:pairs", inputs=[act.name], out_shape=out_shape, lin=lin_out)
    return [a, act, b]


def expand_pair_sorts(graph: Graph) -> Graph:
    """The graph with every sort of pairs written as affine, (identity | ReLU), affine."""
    nodes: list[Node] = []
    changed = False
    for n in graph.nodes:
        new = _pair_sort(n) if isinstance(n, Sort) else None
        nodes.extend(new or [n])
        changed |= new is not None
    if not changed:
        return graph
    return Graph(nodes, graph.input_shape, graph.output, graph.source, graph.sha256, list(graph.warnings))
