"""Robustness certificates from proven Lipschitz bounds.

For a classifier with logits f and predicted class y, the class cannot change within

    radius(x) = min_{j != y} (f_y(x) - f_j(x)) / L_yj,

where L_yj is a proven bound on the Lipschitz constant of the margin f_y - f_j. lipcert bounds
each pair separately: with h the network up to its last affine layer W (and p the input norm,
q its dual), |g(x) - g(x')| <= ||W_y - W_j||_q ||h(x) - h(x')||_p <= ||W_y - W_j||_q L_p(h) ||x - x'||_p,
and for l2 also by LipSDP on the network whose last layer is the row difference. The smaller of
the pairwise bound and the global fallback (sqrt(2) L for l2, 2 L for linf, L for l1: the margin
of a vector a moves by at most that times the change of a) is used, so pairwise radii are never
smaller than the global ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import progress
from .config import Settings, check_choice, normalize_norm
from .data import input_batch, load_npz
from .errors import InputError
from .estimators import estimate
from .estimators.base import SAFETY
from .estimators.naive import node_lipschitz_bounds
from .graph import Affine, Graph
from .result import Result, best_proven

DUAL = {"2": 2, "inf": 1, "1": np.inf}
GLOBAL_FACTOR = {"2": math.sqrt(2.0), "inf": 2.0, "1": 1.0}


@dataclass
class PairwiseConstants:
    """Proven bounds K[y, j] on the Lipschitz constant of f_y - f_j (K[y, y] = 0)."""

    norm: str
    matrix: np.ndarray
    global_bound: float  # a proven bound on L of the whole network
    global_method: str
    how: dict[str, str] = field(default_factory=dict)  # per pair "y,j" -> which bound was smaller

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "pairwise": self.matrix.tolist(), "global_bound": self.global_bound,
                "global_method": self.global_method, "global_factor": GLOBAL_FACTOR[self.norm], "how": self.how}


def _naive_pairwise(graph: Graph, norm: str) -> np.ndarray | None:
    merged = graph.merge_linear()
    last = merged.node(merged.output)
    if not isinstance(last, Affine):
        return None
    W = last.lin.dense()
    if W is None:
        return None
    total, _ = node_lipschitz_bounds(merged, norm)
    inner = total[last.inputs[0]]
    k = W.shape[0]
    out = np.zeros((k, k))
    for y in range(k):
        for j in range(k):
            if y != j:
                out[y, j] = np.linalg.norm(W[y] - W[j], DUAL[norm]) * inner * (1 + SAFETY)
    return out


def pairwise_constants(graph: Graph, norm: str = "2", method: str = "sdp", settings: Settings | None = None,
                       proven: list[Result] | None = None) -> PairwiseConstants:
    """Compute every pair's proven margin constant once per model.

    ``proven``: results already computed for this graph and norm (e.g. by a report); the best
    proven one is the global bound, instead of solving for it again."""
    norm = normalize_norm(norm, "pairwise_constants")
    check_choice("pairwise_constants", "method", method, ("sdp", "naive"))
    s = settings or Settings(norm=norm)
    k = graph.output_dim
    known = best_proven([r for r in proven or [] if r.norm == norm])
    glob = known or estimate(graph, "naive", Settings(norm=norm))
    global_value, global_method = glob.value, glob.method
    candidates: list[tuple[str, np.ndarray]] = []
    naive = _naive_pairwise(graph, norm)
    if naive is not None:
        candidates.append(("naive pairwise", naive))
    if method == "sdp" and norm == "2":
        from .estimators import ESTIMATORS

        sdp_settings = Settings(norm="2", solver=s.solver, sdp_variant=s.sdp_variant, extra=s.extra)
        if ESTIMATORS["sdp"].accepts(graph, sdp_settings) is None:
            if known is None:
                full = estimate(graph, "sdp", sdp_settings)
                if full.value is not None and full.value < global_value:
                    global_value, global_method = full.value, "sdp"
            try:
                from .estimators.sdp import pairwise_lipschitz

                pairs = [(y, j) for y in range(k) for j in range(k) if y < j]
                got = pairwise_lipschitz(graph, pairs, sdp_settings)
                mat = np.full((k, k), np.inf)
                for (y, j), v in got.items():
                    if v is not None:
                        mat[y, j] = mat[j, y] = v
                np.fill_diagonal(mat, 0.0)
                candidates.append(("LipSDP pairwise", mat))
            except InputError as exc:  # not a chain, or too large: the naive pairwise bound stands
                progress.note(f"pairwise LipSDP skipped: {exc.message()}")
    fallback = np.full((k, k), GLOBAL_FACTOR[norm] * global_value)
    np.fill_diagonal(fallback, 0.0)
    best = fallback.copy()
    how = {}
    for y in range(k):
        for j in range(k):
            if y == j:
                continue
            label = f"{GLOBAL_FACTOR[norm]:.4g} x L ({global_method})"
            for name, mat in candidates:
                if mat[y, j] < best[y, j]:
                    best[y, j], label = mat[y, j], name
            how[f"{y},{j}"] = label
    return PairwiseConstants(norm, best, global_value, global_method, how)


@dataclass
class Certificates:
    """Certified radii for a batch of points."""

    radii: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray
    constants: PairwiseConstants
    global_radii: np.ndarray  # the same radii from the global fallback constant only
    how: list[str] | None = None  # with local=True: which constant certified each point
    pairwise_radii: np.ndarray | None = None  # with local=True: the radii before the local search

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    def certified_accuracy(self, eps: float, global_only: bool = False) -> float:
        """Fraction of points classified correctly with a radius strictly larger than eps (with
        ``global_only``: the radius from the global constant alone)."""
        radii = self.global_radii if global_only else self.radii
        return float(np.mean(self.correct & (radii > eps))) if len(radii) else 0.0

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.radii if dtype is None else self.radii.astype(dtype)


def certified_radius(model: Any, x: Any, label: Any = None, norm: Any = 2, method: str = "sdp",
                     input_shape: tuple[int, ...] | None = None, constants: PairwiseConstants | None = None,
                     proven: list[Result] | None = None, local: bool = False) -> Certificates:
    """Certified radii for a batch of inputs ``x`` (shape (N, *input_shape)).

    ``label``: the true classes (None: certify the predicted class). Misclassified points get
    radius 0. ``method``: "sdp" (LipSDP pairwise constants for l2 where it applies, else the naive
    pairwise ones) or "naive". The returned object holds the radii (``np.asarray`` works on it),
    the predictions, and the constants used and how each was obtained. ``constants``: reuse
    constants computed before; ``proven``: results already computed for this model and norm
    (see ``pairwise_constants``). ``local``: also search, per point, the largest radius r that
    local constants over the ball B(x, r) certify (lipcert.local; dense chains only), and keep
    the larger radius; ``Certificates.how`` then says which constant certified each point.
    """
    from .load import load

    graph = load(model, input_shape)  # a Graph comes back as is
    norm = normalize_norm(norm, "certified_radius")
    xs = torch.from_numpy(input_batch(graph, x))
    consts = constants or pairwise_constants(graph, norm, method, proven=proven)
    with torch.no_grad():
        logits = graph.forward(xs).reshape(len(xs), -1).numpy()
    predicted = logits.argmax(1)
    labels = predicted.copy() if label is None else np.asarray(label, dtype=np.int64).reshape(-1)
    if len(labels) != len(xs):
        raise InputError(f"{len(labels)} labels for {len(xs)} inputs", graph.source, "give one label per input")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise InputError(f"labels must lie in 0..{logits.shape[1] - 1}", graph.source, "check the labels")
    radii, global_radii = np.zeros(len(xs)), np.zeros(len(xs))
    gfactor = GLOBAL_FACTOR[norm] * consts.global_bound
    for i, (row, y) in enumerate(zip(logits, predicted)):
        if labels[i] != y:
            continue  # misclassified: radius 0
        others = [j for j in range(len(row)) if j != y]
        margins = np.array([row[y] - row[j] for j in others])
        radii[i] = float(np.min(margins / consts.matrix[y, others]))
        global_radii[i] = float(np.min(margins) / gfactor)
    how, before = None, None
    if local:  # local constants over the ball itself (lipcert/local.py)
        from .local import local_radii

        before = radii.copy()
        with progress.bar("local radii", len(xs)) as bar:
            radii, how = local_radii(graph, xs.numpy(), labels, logits, norm, radii, on_point=lambda i: bar.update(i + 1))
    return Certificates(radii, predicted, labels, consts, global_radii, how, before)


def load_dataset(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An .npz file with inputs ``x`` and integer labels ``y``."""
    x, y = load_npz(path, labels=True)
    assert y is not None
    return x, y


def certify(model: Any, x: Any, y: Any, eps: list[float] | None = None, norm: Any = 2, method: str = "sdp",
            input_shape: tuple[int, ...] | None = None, proven: list[Result] | None = None, local: bool = False) -> dict[str, Any]:
    """Certified radii and certified accuracy of a data set, as a JSON-ready dict. ``proven``:
    results already computed for this model and norm (see ``pairwise_constants``); ``local``:
    see ``certified_radius``."""
    from .load import load

    graph = load(model, input_shape)  # a Graph comes back as is
    certs = certified_radius(graph, x, y, norm=norm, method=method, proven=proven, local=local)
    eps = sorted(eps) if eps else []
    top = float(certs.radii.max()) if len(certs.radii) else 0.0
    grid = np.linspace(0.0, top * 1.05 if top > 0 else 1.0, 41)
    return {
        "norm": certs.constants.norm,
        "points": [{"index": i, "label": int(l), "predicted": int(p), "radius": float(r), "certified": bool(l == p and r > 0)}
                   for i, (l, p, r) in enumerate(zip(certs.labels, certs.predicted, certs.radii))],
        "clean_accuracy": float(np.mean(certs.correct)),
        "certified_accuracy": {str(e): certs.certified_accuracy(e) for e in eps},
        "curve": {"radius": grid.tolist(), "certified_accuracy": [certs.certified_accuracy(r) for r in grid]},
        "global_curve": [certs.certified_accuracy(r, global_only=True) for r in grid],
        "lipschitz": certs.constants.to_dict(),
        **({"local": True, "how": certs.how, "pairwise_radii": certs.pairwise_radii.tolist()} if certs.how is not None else {}),
    }
