"""Certified upper bound: the product of exact per-layer norms, summed over parallel branches."""

from __future__ import annotations

import math
import time

from ..config import Settings
from ..graph import Activation, Affine, Concat, Graph, MaxPool, Sum
from ..result import LayerNorm, Result
from .base import SAFETY, register


def node_lipschitz_bounds(graph: Graph, norm: str) -> tuple[dict[str, float], list[LayerNorm]]:
    """Proven Lipschitz constants from the input to every node's output (with margins)."""
    total = {Graph.INPUT: 1.0}
    layers: list[LayerNorm] = []
    for n in graph.nodes:
        ins = [total[i] for i in n.inputs]
        if isinstance(n, (Affine, Activation, MaxPool)):
            value, exact, how = n.lipschitz(norm)
            value *= 1.0 + SAFETY
            total[n.name] = value * ins[0]
            layers.append(LayerNorm(n.name, n.op, value, exact, how, total[n.name]))
        elif isinstance(n, Sum):
            total[n.name] = sum(abs(c) * v for c, v in zip(n.coeffs, ins))
        elif isinstance(n, Concat):
            if norm == "2":
                total[n.name] = math.sqrt(sum(v * v for v in ins)) * (1.0 + SAFETY)
            elif norm == "inf":
                total[n.name] = max(ins)
            else:
                total[n.name] = sum(ins)
        else:  # pragma: no cover - every node type is handled above
            raise TypeError(f"naive bound has no rule for {type(n).__name__}")
    return total, layers


@register
class Naive:
    name = "naive"
    kind = "upper"
    description = "product of exact per-layer operator norms (sum over residual branches); proven"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None

    def run(self, graph: Graph, settings: Settings) -> Result:
        start = time.perf_counter()
        merged = graph.merge_linear()
        total, layers = node_lipschitz_bounds(merged, settings.norm)
        warnings = []
        if not merged.is_chain():
            warnings.append("the network has parallel branches: their bounds are added (residual: 1 + L(g))")
        inexact = [layer.name for layer in layers if not layer.exact]
        if inexact:
            warnings.append(f"{len(inexact)} layer norm(s) are proven upper bounds, not exact values: {', '.join(inexact)}")
        return Result(
            method=self.name, kind="upper", norm=settings.norm, value=total[merged.output], certified=True,
            time_s=time.perf_counter() - start, settings={"norm": settings.norm, "safety_margin": SAFETY},
            layers=layers, warnings=warnings, model=graph.source, sha256=graph.sha256,
        )
