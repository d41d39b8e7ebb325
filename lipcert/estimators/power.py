"""Power iteration: per-layer l2 norms from below (an estimate), and their directions."""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np
import torch

from ..config import Settings
from ..graph import Affine, Graph, Node
from ..graph.linear import LinearOp, as_conv
from ..result import Result
from .base import register
from .naive import branch_warnings, node_lipschitz_bounds


def power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor],
    adjoint: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    iterations: int,
    seed: int = 0,
    tol: float = 1e-12,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[float, torch.Tensor]:
    """Top singular value of a linear map given by ``apply``/``adjoint`` on batches, and its
    right singular vector (shape ``shape``), iterating in ``dtype`` on ``device``. Converges
    from below: the value is an estimate."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((1, *shape), generator=gen, dtype=torch.float64).to(device, dtype)
    v /= v.norm()
    sigma = 0.0
    with torch.no_grad():
        for _ in range(iterations):
            u = apply(v)
            new_sigma = float(u.norm())
            if new_sigma == 0.0:
                return 0.0, v[0]
            w = adjoint(u / new_sigma)
            norm = float(w.norm())
            if norm == 0.0:
                return 0.0, v[0]
            v = w / norm
            if abs(new_sigma - sigma) <= tol * new_sigma:
                sigma = new_sigma
                break
            sigma = new_sigma
        sigma = float(apply(v).norm())
    return sigma, v[0]


def layer_power(lin: LinearOp, iterations: int, seed: int, device: str = "cpu") -> tuple[float, torch.Tensor]:
    """Power iteration on one linear operator. A convolution (batch-norm folded in) iterates in
    float32 on ``device`` (several times faster); the value returned is ||A v|| for the
    final direction, recomputed in float64. Either way an estimate from below."""
    conv = as_conv(lin)
    if conv is None:
        return power_iteration(lin.apply, lin.adjoint, lin.in_shape, iterations, seed)
    dev = torch.device(device)
    w32 = conv.weight.to(dev, torch.float32)
    apply32 = lambda x: conv._conv(x, w32)  # noqa: E731
    adjoint32 = lambda y: conv._conv_adjoint(y, w32)  # noqa: E731  (transposed convolution, no autograd)
    # float32 cannot settle below ~1e-7: stop at 1e-6
    _, v = power_iteration(apply32, adjoint32, conv.in_shape, iterations, seed, tol=1e-6, dtype=torch.float32, device=dev)
    v64 = v.to("cpu", torch.float64).unsqueeze(0)
    v64 /= v64.norm().clamp_min(1e-300)
    with torch.no_grad():
        return float(lin.apply(v64).norm()), v64[0]


def layer_powers(nodes: list[Affine], iterations: int, seed: int, device: str = "cpu", workers: int = min(2, os.cpu_count() or 1)) -> dict[str, float]:
    """layer_power's value for every node, side by side on ``workers`` Python threads with
    single-threaded torch (see convnorm.single_threaded), the largest operators first; each
    value is the same as one at a time (each iteration has its own seeded start)."""
    import concurrent.futures

    from ..graph.convnorm import single_threaded

    todo = sorted(nodes, key=lambda n: float(n.lin.in_dim) * n.lin.out_dim, reverse=True)
    with single_threaded(), concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {n.name: pool.submit(layer_power, n.lin, iterations, seed, device) for n in todo}
        return {name: f.result()[0] for name, f in futures.items()}


def power_directions(graph: Graph, settings: Settings) -> dict[str, np.ndarray]:
    """Each (merged) affine node's top right singular vector, for the lower-bound search."""
    merged = graph.merge_linear()
    return {
        n.name: layer_power(n.lin, settings.iterations, settings.seed)[1].numpy()
        for n in merged.nodes
        if isinstance(n, Affine)
    }


@register
class Power:
    name = "power"
    kind = "estimate"
    description = "product of per-layer power-iteration norms (l2); converges from below: an estimate, not a bound"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None if settings.norm == "2" else "power iteration estimates l2 norms only"

    def run(self, graph: Graph, settings: Settings) -> Result:
        from ..graph.convnorm import resolve_device

        start = time.perf_counter()
        merged = graph.merge_linear()
        device, notes = resolve_device(settings.device)

        sigmas = layer_powers([n for n in merged.nodes if isinstance(n, Affine)], settings.iterations, settings.seed, device)

        def node_norm(node: Node, norm: str) -> tuple[float, bool, str]:
            if isinstance(node, Affine):
                sigma = sigmas[node.name]
                return sigma, False, f"power iteration ({settings.iterations} its, estimate)"
            return node.lipschitz(norm)

        total, layers = node_lipschitz_bounds(merged, "2", node_norm, margin=0.0)
        value = total[merged.output]
        return Result(
            method=self.name, kind="estimate", norm="2", value=value if math.isfinite(value) else None, certified=False,
            time_s=time.perf_counter() - start, settings={"iterations": settings.iterations, "seed": settings.seed, "device": settings.device},
            layers=layers, warnings=notes + ["an estimate: power iteration approaches each layer norm from below"] + branch_warnings(merged, [])[:1],
            model=graph.source, sha256=graph.sha256,
        )
