"""Witnessed lower bounds: an adversarial search for the inputs where the network stretches most.

For many starting points at once: power iteration on J(x)^T J(x) (jvp then vjp) finds the
direction v that x stretches most (the Hessian of ||f(x + r) - f(x)||^2 at r = 0 is 2 J^T J);
gradient ascent on x then increases ||J(x) v||, on a copy of the network whose kinks are smoothed
(softplus with an annealed temperature), because a ReLU network's Jacobian is piecewise constant
and gives ascent no slope. The real network is re-evaluated throughout, and the reported value is
||f(x) - f(y)|| / ||x - y|| for a pair (x, y = x + t v), recomputed by plain float64 evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import progress
from ..config import Settings
from ..errors import InputError
from ..graph import Activation, Graph
from ..result import Result
from ..witness import check_witness, ratio
from .base import register

log = logging.getLogger(__name__)


def choose_device(requested: str) -> tuple[torch.device, list[str]]:
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda"), []
    if requested == "cuda":
        return torch.device("cpu"), ["no CUDA device is available: the search ran on the CPU"]
    return torch.device("cpu"), []


def _smooth_activation(node: Activation, x: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth stand-ins for kinked activations (sharper as beta grows)."""
    sp = lambda t: F.softplus(t, beta=beta)  # noqa: E731  softplus(beta t) / beta
    if node.kind == "relu":
        return sp(x)
    if node.kind == "leaky_relu":
        a = node.params["alpha"]
        return a * x + (1 - a) * sp(x)
    if node.kind == "prelu":
        a = node.params["slope"].to(x.device)
        return a * x + (1 - a) * sp(x)
    if node.kind == "clip":
        lo, hi = node.params.get("min"), node.params.get("max")
        out = x
        if lo is not None:
            out = lo + sp(out - lo)
        if hi is not None:
            out = hi - sp(hi - out)
        return out
    return node.forward(x)


def forward_fn(graph: Graph, beta: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network (beta None) or its smoothed copy, as a function of a batch (B, *input_shape)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        values = {Graph.INPUT: x}
        for n in graph.nodes:
            args = [values[i] for i in n.inputs]
            if beta is not None and isinstance(n, Activation):
                values[n.name] = _smooth_activation(n, args[0], beta)
            else:
                values[n.name] = n.forward(*args)
        return values[graph.output].flatten(1)

    return f


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *[1] * (v.dim() - 1))


def top_direction(f: Callable, x: torch.Tensor, v: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample power iteration on J(x)^T J(x): returns (||J v||, v) for each point of the batch."""
    _, vjp = torch.func.vjp(f, x)
    for _ in range(iterations):
        _, u = torch.func.jvp(f, (x,), (v,))
        v = _unit(vjp(u)[0])
    _, u = torch.func.jvp(f, (x,), (v,))
    return u.norm(dim=1), v


def jacobian_rows(f: Callable, x: torch.Tensor, m: int) -> torch.Tensor:
    """J(x) for each point, shape (B, m, n), from m vector-Jacobian products."""
    _, vjp = torch.func.vjp(f, x)
    rows = [vjp(torch.nn.functional.one_hot(torch.full((x.shape[0],), i, device=x.device), m).to(x.dtype))[0].flatten(1) for i in range(m)]
    return torch.stack(rows, 1)


def linf_objective(f: Callable, x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """max_i ||row_i(J(x))||_1 per point and the sign direction of the best row."""
    rows = jacobian_rows(f, x, m)
    sums = rows.abs().sum(2)
    best, idx = sums.max(1)
    direction = torch.sign(rows[torch.arange(len(idx)), idx]).reshape(x.shape)
    return best, direction


def starting_points(graph: Graph, starts: int, seed: int, data: np.ndarray | None, device: torch.device) -> torch.Tensor:
    """Uniform in [0, 1]^n and Gaussian at scales 0.5, 1 and 3, plus the user's data first."""
    gen = torch.Generator().manual_seed(seed)
    shape = graph.input_shape
    pts = []
    if data is not None:
        d = torch.as_tensor(np.asarray(data, np.float64)).reshape(-1, *shape)
        pts.append(d[torch.randperm(len(d), generator=gen)[: max(starts // 2, 1)]])
    n_left = starts - sum(len(p) for p in pts)
    kinds = [torch.rand((n_left, *shape), generator=gen, dtype=torch.float64)]
    for k, s in enumerate((0.5, 1.0, 3.0)):
        kinds.append(torch.randn((n_left, *shape), generator=gen, dtype=torch.float64) * s)
    mixed = torch.stack(kinds, 0)  # (4, n, *shape): take them in turn
    pts.append(mixed.transpose(0, 1).reshape(-1, *shape)[:n_left])
    return torch.cat(pts).to(device)


def jacobian_norms(f: Callable, x: torch.Tensor, v: torch.Tensor, m: int, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """||J(x)|| per point (l2: top singular value; inf: largest absolute row sum) and the input
    direction that attains it. Small outputs: J from m vector-Jacobian products; otherwise power
    iteration on J^T J."""
    with torch.no_grad():
        if norm == "inf":
            return linf_objective(f, x, m)
        if m > 32:
            return top_direction(f, x, v, 20)
        rows = jacobian_rows(f, x, m)  # (B, m, n)
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        return s[:, 0], vh[:, 0].reshape(x.shape)


def _batches(n: int, dim: int, budget: int = 4_000_000) -> int:
    return max(1, min(n, budget // max(dim, 1)))


def search(graph: Graph, settings: Settings, data: np.ndarray | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Screen many random points, then improve the best ones by smoothed gradient ascent and
    random proposals, always keeping what the real network confirms."""
    device, notes = choose_device(settings.device)
    norm, m = settings.norm, graph.output_dim
    if norm not in ("2", "inf"):
        raise InputError("the lower-bound search supports --norm 2 and inf", graph.source)
    real = forward_fn(graph, None)
    t0 = time.perf_counter()
    # 1. screening: many random points, evaluated exactly on the real network
    n_screen = max(16 * settings.starts, 1024)
    pool = starting_points(graph, n_screen, settings.seed, data, device)
    chunk = _batches(len(pool), graph.input_dim * max(m, 1))
    gen = torch.Generator().manual_seed(settings.seed + 1)
    vals, dirs = [], []
    for i in range(0, len(pool), chunk):
        p = pool[i : i + chunk]
        v0 = _unit(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device))
        a, b = jacobian_norms(real, p, v0, m, norm)
        vals.append(a)
        dirs.append(b)
    vals_t, dirs_t = torch.cat(vals), torch.cat(dirs)
    top = torch.argsort(vals_t, descending=True)[: settings.starts]
    x, best_val, best_v = pool[top].clone(), vals_t[top].clone(), dirs_t[top].clone()
    best_x = x.clone()
    screened = float(best_val.max())
    x_scale = float(pool.flatten(1).std(dim=1).mean().clamp_min(1e-3))
    # 2. improvement: smoothed ascent step plus random proposals around each point
    steps, proposals = settings.steps, 4
    betas = np.geomspace(2.0, 2e3, max(steps, 1)) / x_scale
    with progress.bar("lower-bound search", steps) as bar:
        for k in range(steps):
            sigma = x_scale * 0.3 * (1e-3 / 0.3) ** (k / max(steps - 1, 1))
            smooth = forward_fn(graph, float(betas[k]))
            v = best_v.clone()
            if norm == "2":
                def objective(z: torch.Tensor) -> torch.Tensor:
                    return (torch.func.jvp(smooth, (z,), (v,))[1] ** 2).sum()
            else:
                def objective(z: torch.Tensor) -> torch.Tensor:
                    return linf_objective(smooth, z, m)[0].sum()
            grad = torch.nan_to_num(torch.func.grad(objective)(best_x))
            cands = [best_x + sigma * _unit(grad)]
            for _ in range(proposals):
                cands.append(best_x + sigma * torch.randn(best_x.shape, generator=gen, dtype=torch.float64).to(device))
            for cand in cands:
                val, d = jacobian_norms(real, cand, v, m, norm)
                better = val > best_val
                best_val = torch.where(better, val, best_val)
                best_x[better] = cand[better]
                best_v[better] = d[better]
            bar.update(k + 1)
    search_time = time.perf_counter() - t0
    # 3. witnesses for the best few points, recomputed by plain evaluation in float64. The step t
    # is large enough that rounding in f(y) - f(x) stays far below the digits reported.
    order = torch.argsort(best_val, descending=True)[: min(8, len(best_val))]
    best: dict[str, Any] | None = None
    with torch.no_grad():
        for i in order.tolist():
            xi = best_x[i].cpu()
            vi = best_v[i].cpu()
            if norm == "2":
                vi = vi / vi.norm()
            for rel in (1e-3, 1e-4, 1e-5):
                t = rel * (1.0 + float(xi.abs().max()))
                yi = xi + t * vi
                out = graph.forward(torch.stack([xi, yi])).numpy()
                r = ratio(out[0], out[1], xi.numpy(), yi.numpy(), norm)
                if best is None or r > best["value"]:
                    best = {"value": r, "x": xi.numpy(), "y": yi.numpy(), "t": t, "jacobian_norm": float(best_val[i])}
    assert best is not None
    evaluations = n_screen + settings.starts * steps * (proposals + 1)
    details = {"search_time_s": search_time, "points_per_s": evaluations / max(search_time, 1e-9), "jacobian_evaluations": evaluations,
               "best_after_screening": screened, "best_jacobian_norm": float(best_val.max()), "device": str(device), "notes": notes}
    return best, details


def lower_bound(model: Any, norm: Any = 2, starts: int = 64, steps: int = 50, seed: int = 0, device: str = "cpu",
                data: np.ndarray | str | Path | None = None, input_shape: tuple[int, ...] | None = None) -> Result:
    """A witnessed lower bound on the Lipschitz constant of ``model``.

    Args:
        model: path to an .onnx file, onnx.ModelProto, torch.nn.Module (with ``input_shape``) or Graph.
        norm: 2 or "inf".
        starts: starting points searched at once; steps: ascent steps; seed: random seed.
        device: "cpu", "cuda" (falls back to the CPU with a warning) or "auto".
        data: inputs to start from as well (an array, or an .npz file with ``x``).

    Returns:
        A Result of kind "lower" whose value is ||f(x) - f(y)|| / ||x - y|| for the witness pair
        in ``result.witness`` (``x``, ``y`` in the input's shape), recomputed in float64.
    """
    from ..config import normalize_norm
    from ..load import load

    graph = model if isinstance(model, Graph) else load(model, input_shape)
    s = Settings(norm=normalize_norm(norm, "lower_bound"), starts=starts, steps=steps, seed=seed, device=device)
    if isinstance(data, (str, Path)):
        data = load_inputs(data)
    return LowerSearch().run(graph, s, data)


def load_inputs(path: str | Path) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise InputError(f"data file not found: {p}", None, "give an .npz file with an array 'x'")
    try:
        with np.load(p) as npz:
            if "x" not in npz:
                raise InputError(f"{p.name} has no array 'x' (it has: {', '.join(npz.files) or 'nothing'})", str(p), "save the inputs as x=... in the .npz file")
            return np.asarray(npz["x"], np.float64)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"could not read {p.name} as an .npz file ({exc})", str(p), "give an .npz file written by numpy.savez") from None


@register
class LowerSearch:
    name = "lower"
    kind = "lower"
    description = "adversarial Jacobian search (power iteration on J^T J, smoothed ascent); witnessed lower bound"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None if settings.norm in ("2", "inf") else "the lower-bound search supports l2 and linf"

    def run(self, graph: Graph, settings: Settings, data: np.ndarray | None = None) -> Result:
        start = time.perf_counter()
        if data is not None and np.asarray(data).reshape(-1).size % graph.input_dim:
            raise InputError(f"data of shape {np.asarray(data).shape} does not fit the input shape {list(graph.input_shape)}", graph.source)
        best, details = search(graph, settings, data)
        witness = {"x": best["x"].tolist(), "y": best["y"].tolist(), "t": best["t"]}
        value = check_witness(graph, witness, best["value"], settings.norm)
        details["jacobian_norm_at_witness"] = best["jacobian_norm"]
        return Result(
            method=self.name, kind="lower", norm=settings.norm, value=value, certified=False,
            time_s=time.perf_counter() - start,
            settings={"starts": settings.starts, "steps": settings.steps, "seed": settings.seed, "device": settings.device,
                      "smoothing": "softplus, temperature annealed geometrically x1000", "data": data is not None},
            warnings=list(details.pop("notes")), model=graph.source, sha256=graph.sha256, witness=witness, details=details,
        )
