"""Gram iteration (Delattre et al. 2023): a proven l2 bound per layer, without an SVD.

For a matrix G_0 = W and G_{t+1} = G_t^T G_t, sigma_1(W) <= ||G_t||_F^(1 / 2^t), and the bound
tightens quickly with t. Each iterate is rescaled to unit Frobenius norm and the scale is kept in
logarithms, so nothing overflows. Convolutions get the norms of naive (lipcert/graph/convnorm.py:
exact for 1x1 and small layers, the circular embedding otherwise), except where the circular
embedding is loose and the exact norm is within reach: on small grids (a 512-channel layer on
4x4 inputs: 8% lower), the Gram matrix of the layer's smaller side (up to
``convnorm.TIGHT_SIDE`` rows), Lanczos, and a Cholesky proof (``convnorm.tight_conv_norm``).
Slower than naive on such networks (a CIFAR ResNet-18: about 35 s against 3 s; under a budget
it stops starting proofs), never looser: where naive's layer norm is exact, gram reports it.

Rounding: with unit Frobenius norm, each product is computed with an absolute error of at most
gamma_n = n eps / (1 - n eps) in Frobenius norm, relative to sigma_1^2 >= 1 / rank; the 2^-t roots
shrink later errors, so the total relative error is below 2 n rank eps, which is added as a
margin (together with SAFETY).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..config import EPS, Settings
from ..graph import Affine, Graph, Node
from ..graph.linear import Conv, conv_of, fft_conv_bound
from ..result import Result
from .base import SAFETY, register
from .naive import branch_warnings, node_lipschitz_bounds



def gram_bound(mats: np.ndarray, iterations: int) -> float:
    """Proven bound on max_k sigma_1(mats[k]) for a stack of matrices (k, m, n) (or one (m, n))."""
    g = np.asarray(mats, dtype=np.complex128 if np.iscomplexobj(mats) else np.float64)
    if g.ndim == 2:
        g = g[None]
    if g.size == 0:
        return 0.0
    if g.shape[1] < g.shape[2]:  # work with the smaller Gram matrix
        g = np.conj(np.swapaxes(g, 1, 2))
    n, rank = max(g.shape[1:]), min(g.shape[1:])
    fro = np.sqrt((np.abs(g) ** 2).sum(axis=(1, 2)))
    if not np.any(fro > 0):
        return 0.0
    fro = np.where(fro > 0, fro, 1.0)
    log_scale = np.log(fro)
    g = g / fro[:, None, None]
    for _ in range(iterations):
        g = np.conj(np.swapaxes(g, 1, 2)) @ g
        f = np.sqrt((np.abs(g) ** 2).sum(axis=(1, 2)))
        f = np.where(f > 0, f, 1.0)
        g = g / f[:, None, None]
        log_scale = 2 * log_scale + np.log(f)
    # sigma_1 <= (exp(log_scale) * ||g||_F)^(1 / 2^t), and ||g||_F = 1 after normalisation
    bound = float(np.exp(log_scale.max() / 2**iterations))
    return bound * (1.0 + SAFETY + 2.0 * n * rank * EPS)


def conv_spectrum(conv: Conv) -> np.ndarray:
    """The kernel's spectrum as a stack of (c_out x c_in) matrices, one per frequency."""
    # fft_conv_bound builds the same spectrum; recompute it here to run Gram iteration on it
    w = conv.weight.numpy()
    c_out, c_in_g = w.shape[:2]
    g = conv.groups
    if g > 1:
        per_out = c_out // g
        full = np.zeros((c_out, c_in_g * g, *w.shape[2:]))
        for k in range(g):
            full[k * per_out : (k + 1) * per_out, k * c_in_g : (k + 1) * c_in_g] = w[k * per_out : (k + 1) * per_out]
        w = full
    if any(d > 1 for d in conv.dilations):
        shape = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], conv.dilations)]
        dil = np.zeros((*w.shape[:2], *shape))
        dil[(slice(None), slice(None), *[slice(None, None, d) for d in conv.dilations])] = w
        w = dil
    spatial = conv.out_shape[2:] if conv.transposed else conv.in_shape[2:]
    size = [max(n + b + e, k) for n, b, e, k in zip(spatial, conv.begins, conv.ends, w.shape[2:])]
    spectrum = np.fft.fftn(w, s=size, axes=tuple(range(2, w.ndim)))
    return np.moveaxis(spectrum.reshape(*w.shape[:2], -1), -1, 0)


def affine_gram(node: Affine, iterations: int) -> tuple[float, bool, str]:
    """The layer's l2 bound: naive's where it is exact (never looser than naive), else the
    smaller of naive's and Gram iteration's."""
    conv = conv_of(node.lin)
    if conv is not None:  # exact or circular-embedding norms, exact on small grids (convnorm)
        return conv.l2_tight()
    naive = node.lin.norm_bound("2")
    if naive[1]:
        return naive
    dense = node.lin.dense()
    ops = getattr(node.lin, "ops", [node.lin])
    core = [op for op in ops if op.kind not in ("reshape", "transpose")]
    if dense is not None:
        gram = gram_bound(dense, iterations), False, f"gram iteration ({iterations} its)"
    elif len(core) == 1 and isinstance(core[0], Conv):
        gram = gram_bound(conv_spectrum(core[0]), iterations), False, f"gram iteration on the conv spectrum ({iterations} its)"
    else:
        return naive
    return min(naive, gram, key=lambda bound: bound[0])


@register
class Gram:
    name = "gram"
    kind = "upper"
    stops_early = True  # at settings.extra["deadline"]: layers without time for the exact route keep naive's bound
    budget_weight = 0.0  # under a budget, last, with the time LipSDP and sdp-wide leave (its gains are per cent)
    description = "per-layer Gram-iteration bounds (l2; convolutions on small grids exact by a Cholesky proof, where naive's are looser), composed like naive; proven"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None if settings.norm == "2" else "Gram iteration bounds l2 norms only (linf/l1 norms are exact in naive)"

    def run(self, graph: Graph, settings: Settings) -> Result:
        start = time.perf_counter()
        merged = graph.merge_linear()
        its = min(settings.iterations, 12)  # beyond ~12 squarings float64 gains nothing

        def node_norm(node: Node, norm: str) -> tuple[float, bool, str]:
            return affine_gram(node, its) if isinstance(node, Affine) else node.lipschitz(norm)

        from ..graph.convnorm import CUT_NOTE, on_device, prefetch_l2_norms, tight_until

        with on_device(settings.device) as notes, tight_until(settings.extra.get("deadline")):
            convs = [conv_of(n.lin) for n in merged.nodes if isinstance(n, Affine)]
            prefetch_l2_norms([c for c in convs if c is not None], tight=True)
            total, layers = node_lipschitz_bounds(merged, "2", node_norm)
        value = total[merged.output]
        cut = [layer.name for layer in layers if CUT_NOTE in layer.how]
        if cut:
            notes.append(f"{len(cut)} convolution(s) kept the circular bound: {CUT_NOTE} (give more time for their exact norms)")
        return Result(
            method=self.name, kind="upper", norm="2", value=value if math.isfinite(value) else None,
            certified=math.isfinite(value), time_s=time.perf_counter() - start,
            settings={"iterations": its, "safety_margin": SAFETY, "device": settings.device}, layers=layers,
            warnings=notes + branch_warnings(merged, []), model=graph.source, sha256=graph.sha256,
            details={"exact_route_cut": len(cut)},
        )


__all__ = ["Gram", "gram_bound", "conv_spectrum", "fft_conv_bound"]
