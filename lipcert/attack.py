"""A PGD attack (Madry et al. 2018) written in torch: the empirical side of a certificate.

For each point, the smallest perturbation norm at which projected gradient ascent on the margin
loss max_{j != y} f_j - f_y flips the class, searched by bisection on the radius. Every flip
is re-evaluated on the real network in float64, and its radius is the exact norm of the
perturbation found, so each finite radius is witnessed: an upper bound on the point's true
robust radius (a certified radius can never exceed it). Points the attack cannot flip within
``max_radius`` get radius inf.

The perturbation is not clipped to a data range (e.g. [0, 1] pixels) unless ``clip`` is given:
certificates are over the whole ball, so the attack searches the same ball.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import check_range, normalize_norm
from .data import input_batch, labels_array


@dataclass
class AttackResult:
    """radii[i]: the norm of the smallest flipping perturbation found (inf: none found, 0:
    misclassified already); adversarial[i]: that perturbed input (NaN where none)."""

    norm: str
    radii: np.ndarray
    adversarial: np.ndarray
    labels: np.ndarray
    time_s: float
    settings: dict[str, Any]

    def robust_accuracy(self, eps: float) -> float:
        """Fraction of points the attack cannot flip within eps: an upper bound on the true
        robust accuracy (the empirical curve)."""
        return float(np.mean(self.radii > eps)) if len(self.radii) else 0.0


def _margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} f_j - f_y per row: positive exactly when the class flipped."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return other.amax(1) - true


def _norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    order = {"2": 2.0, "inf": math.inf, "1": 1.0}[norm]
    return torch.linalg.vector_norm(d.reshape(len(d), -1), ord=order, dim=1)


def _project(d: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    shape = (-1,) + (1,) * (d.dim() - 1)
    if norm == "inf":
        return torch.maximum(torch.minimum(d, eps.reshape(shape)), -eps.reshape(shape))
    n = _norms(d, norm).clamp_min(1e-300)
    if norm == "2":
        return d * torch.clamp(eps / n, max=1.0).reshape(shape)
    # l1: scaling is a feasible (not nearest) projection; PGD stays inside the ball
    return d * torch.clamp(eps / n, max=1.0).reshape(shape)


def _step(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "inf":
        return g.sign()
    if norm == "2":
        return g / _norms(g, "2").clamp_min(1e-300).reshape((-1,) + (1,) * (g.dim() - 1))
    flat = g.reshape(len(g), -1)  # l1: move the largest coordinate
    out = torch.zeros_like(flat)
    idx = flat.abs().argmax(1)
    out[torch.arange(len(flat)), idx] = flat[torch.arange(len(flat)), idx].sign()
    return out.reshape(g.shape)


def _pgd(graph: Any, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: str, steps: int, restarts: int,
         gen: torch.Generator, clip: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD run per point at radius eps[i]; returns (flipped, best perturbation)."""
    n = len(x)
    flipped = torch.zeros(n, dtype=torch.bool)
    best = torch.zeros_like(x)
    best_norm = torch.full((n,), math.inf, dtype=torch.float64)
    shape = (-1,) + (1,) * (x.dim() - 1)
    for rs in range(restarts):
        if rs == 0:
            d = torch.zeros_like(x)
        else:
            d = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1)
            d = _project(d * eps.reshape(shape), eps, norm)
        size = 2.5 * eps / steps
        for it in range(steps + 1):
            d.requires_grad_(True)
            xa = x + d if clip is None else torch.clamp(x + d, *clip)
            loss = _margin_loss(graph.forward(xa).reshape(n, -1), y)
            with torch.no_grad():  # keep the smallest flip seen (checked again in float64 by the caller)
                dn = _norms(d, norm)
                better = (loss > 0) & (dn < best_norm)
                best[better], best_norm[better] = d[better], dn[better]
                flipped |= loss > 0
            if it == steps:
                break
            (g,) = torch.autograd.grad(loss.sum(), d)
            with torch.no_grad():
                d = _project(d + size.reshape(shape) * _step(g, norm), eps, norm)
                if clip is not None:
                    d = torch.clamp(x + d, *clip) - x
    return flipped, best


def attack(model: Any, x: Any, labels: Any, norm: Any = 2, steps: int = 50, restarts: int = 2, search: int = 12,
           max_radius: float | None = None, seed: int = 0, clip: tuple[float, float] | None = None,
           input_shape: tuple[int, ...] | None = None) -> AttackResult:
    """Smallest flip radius per point by PGD (``steps`` per run, ``restarts`` runs per radius,
    ``search`` bisection rounds on the radius). ``max_radius``: the largest radius tried
    (default: the norm of the input range, so that every class is reachable)."""
    from .load import load

    start = time.perf_counter()
    graph = load(model, input_shape)
    norm = normalize_norm(norm, "attack")
    for name, v in (("steps", steps), ("restarts", restarts), ("search", search)):
        check_range("attack", name, v, 1)
    xs = torch.from_numpy(input_batch(graph, x))
    ys = torch.as_tensor(labels_array(labels, len(xs), "labels", graph.source))
    gen = torch.Generator().manual_seed(seed)
    n = len(xs)
    with torch.no_grad():
        pred = graph.forward(xs).reshape(n, -1).argmax(1)
    if max_radius is None:
        span = float(xs.max() - xs.min()) or 1.0
        max_radius = span * {"2": math.sqrt(graph.input_dim), "inf": 1.0, "1": float(graph.input_dim)}[norm]
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), float(max_radius), dtype=torch.float64)
    found = torch.full((n,), math.inf, dtype=torch.float64)
    adv = torch.full_like(xs, math.nan)
    wrong = pred != ys
    found[wrong] = 0.0
    adv[wrong] = xs[wrong]
    active = ~wrong
    eps = hi.clone()
    for it in range(search + 1):
        idx = torch.nonzero(active).reshape(-1)
        if len(idx) == 0:
            break
        flipped, best = _pgd(graph, xs[idx], ys[idx], eps[idx], norm, steps, restarts, gen, clip)
        with torch.no_grad():  # the witness: re-evaluated on the real network in float64
            xa = xs[idx] + best
            really = (graph.forward(xa).reshape(len(idx), -1).argmax(1) != ys[idx]) & flipped
            dn = _norms(best, norm)
        for k, i in enumerate(idx.tolist()):
            if really[k] and dn[k] < found[i]:
                found[i], adv[i] = dn[k], xa[k]
            if really[k]:
                hi[i] = min(float(hi[i]), float(dn[k]))
            else:
                lo[i] = eps[i]
                if it == 0:
                    active[i] = False  # not even the largest radius flips it
        eps = (lo + hi) / 2
    return AttackResult(norm, found.numpy(), adv.numpy(), ys.numpy(), time.perf_counter() - start,
                        {"steps": steps, "restarts": restarts, "search": search, "max_radius": max_radius, "seed": seed,
                         "clip": list(clip) if clip else None})
