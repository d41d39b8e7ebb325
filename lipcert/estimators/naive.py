"""Certified upper bound: the product of exact per-layer norms, summed over parallel branches."""

from __future__ import annotations

import math
import time
from typing import Callable

from ..config import Settings
from ..graph import Activation, Affine, Concat, Extremum, Graph, MaxPool, Node, NormPool, Sort, Sum
from ..result import LayerNorm, Result
from .base import SAFETY, register


NodeNorm = Callable[[Node, str], tuple[float, bool, str]]


def default_node_norm(node: Node, norm: str) -> tuple[float, bool, str]:
    """Each node's own proven Lipschitz constant (exact operator norm where one is cheap)."""
    return node.lipschitz(norm)


def node_lipschitz_bounds(graph: Graph, norm: str, node_norm: NodeNorm = default_node_norm, margin: float = SAFETY) -> tuple[dict[str, float], list[LayerNorm]]:
    """Lipschitz constants from the input to every node's output, composed along the graph:
    products along chains, sums over the branches of a Sum, and the norm-dependent rule for
    Concat (and for an elementwise Max/Min of several tensors, which changes by at most as much
    per entry as the concatenation of its inputs). ``node_norm`` gives each single-input node's constant; with ``margin`` > 0 each is
    enlarged by that relative margin (for proven bounds)."""
    total = {Graph.INPUT: 1.0}
    layers: list[LayerNorm] = []
    for n in graph.nodes:
        ins = [total[i] for i in n.inputs]
        if isinstance(n, (Affine, Activation, MaxPool, Sort, NormPool)):
            value, exact, how = node_norm(n, norm)
            value *= 1.0 + margin
            total[n.name] = value * ins[0]
            layers.append(LayerNorm(n.name, n.op, value, exact, how, total[n.name]))
        elif isinstance(n, Sum):
            total[n.name] = sum(abs(c) * v for c, v in zip(n.coeffs, ins))
        elif isinstance(n, (Concat, Extremum)):
            if norm == "2":
                total[n.name] = math.sqrt(sum(v * v for v in ins)) * (1.0 + margin)
            elif norm == "inf":
                total[n.name] = max(ins)
            else:
                total[n.name] = sum(ins)
        else:  # pragma: no cover - every node type is handled above
            raise TypeError(f"no composition rule for {type(n).__name__}")
    return total, layers


def branch_warnings(graph: Graph, layers: list[LayerNorm]) -> list[str]:
    warnings = []
    if not graph.is_chain():
        warnings.append("the network has parallel branches: their bounds are added (residual: 1 + L(g))")
    inexact = [layer.name for layer in layers if not layer.exact]
    if inexact:
        warnings.append(f"{len(inexact)} layer norm(s) are proven upper bounds, not exact values: {', '.join(inexact)}")
    return warnings


def _gram_hint(graph: Graph, layers: list[LayerNorm]) -> list[str]:
    """A note when some convolution's l2 norm is a circular-embedding bound that method gram can
    replace by the exact norm (small grids: convnorm.tight_applies)."""
    from ..graph.convnorm import tight_applies
    from ..graph.linear import conv_of

    nodes = {n.name: n for n in graph.nodes}
    count = 0
    for layer in layers:
        node = nodes.get(layer.name)
        conv = conv_of(node.lin) if isinstance(node, Affine) and not layer.exact else None
        if conv is not None and tight_applies(conv):
            count += 1
    if not count:
        return []
    return [f"{count} convolution(s) on small grids have circular-embedding bounds, up to about 10% above their "
            "exact norms: --method gram proves the exact norms where that gains more than 0.5% (slower)"]


@register
class Naive:
    name = "naive"
    kind = "upper"
    description = "product of exact per-layer operator norms (sum over residual branches); proven"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None

    def run(self, graph: Graph, settings: Settings) -> Result:
        from ..graph.convnorm import on_device, prefetch_l2_norms

        start = time.perf_counter()
        merged = graph.merge_linear()
        with on_device(settings.device) as notes:
            if settings.norm == "2":
                prefetch_l2_norms([n.lin for n in merged.nodes if isinstance(n, Affine)])
            total, layers = node_lipschitz_bounds(merged, settings.norm)
        hint = _gram_hint(merged, layers) if settings.norm == "2" else []
        return Result(
            method=self.name, kind="upper", norm=settings.norm, value=total[merged.output], certified=True,
            time_s=time.perf_counter() - start, settings={"norm": settings.norm, "safety_margin": SAFETY, "device": settings.device},
            layers=layers, warnings=notes + branch_warnings(merged, layers) + hint, model=graph.source, sha256=graph.sha256,
        )
