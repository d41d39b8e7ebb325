"""Matplotlib figures rendered to inline SVG strings (no external fonts or files)."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams.update({"svg.fonttype": "path", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
BLUE, ORANGE, GREY, GREEN = "#1f5fa8", "#d9822b", "#8a8f98", "#2e8b57"


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype


def layer_norms(names: list[str], values: list[float], cumulative: list[float | None]) -> str:
    """Bars of the per-layer norms and the running bound. With many layers (a ResNet has 60+)
    the figure widens up to a limit and only every k-th layer is named, so labels never overlap."""
    n = len(values)
    fig, ax = plt.subplots(figsize=(min(7.5 + max(0, n - 30) * 0.08, 12.0), 2.8))
    xs = range(n)
    ax.bar(xs, values, color=BLUE, label="layer norm")
    cum = [c if c is not None else float("nan") for c in cumulative]
    ax.plot(xs, cum, color=ORANGE, marker="o", ms=3 if n <= 40 else 1.5, label="bound so far")
    if any(v > 0 for v in values):  # a log axis needs a positive value (a zero layer: linear)
        ax.set_yscale("log")
    step = max(1, -(-n // 40))  # at most about 40 names
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [names[i][-18:] for i in ticks], rotation=40 if step == 1 else 60, ha="right", fontsize=7 if n <= 40 else 6)
    if step > 1:
        ax.set_xlabel(f"layers (every {step}th named)", fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.legend(frameon=False, fontsize=8)
    ax.set_ylabel("Lipschitz bound")
    return _svg(fig)


def methods(rows: list[dict[str, Any]], lower: float | None) -> str:
    """Horizontal bars per method, value labels at the bar ends; a log axis (from the smallest
    value down a bit) only when the values span more than a factor 30, else a linear axis from 0."""
    rows = [r for r in rows if r["value"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 0.9))
    if not rows:
        return _svg(fig)
    colors = {"upper": BLUE, "estimate": GREY, "lower": GREEN}
    values = [r["value"] for r in rows]
    log = min(values) > 0 and max(values) > 30 * min(values)  # a 0 (constant network) keeps it linear
    ys = list(range(len(rows)))
    left = min(values) / 3 if log else 0.0
    ax.barh(ys, [v - left for v in values], left=left, color=[colors[r["kind"]] for r in rows])
    for y, v in zip(ys, values):
        ax.text(v, y, f" {v:.4g}", va="center", fontsize=8)
    ax.set_yticks(ys, [f"{r['method']} ({'proven' if r['certified'] else r['kind']})" for r in rows])
    if log:
        ax.set_xscale("log")
    if lower:
        ax.axvline(lower, color=GREEN, ls="--", lw=1)
    ax.set_xlim(left, (max(values) or 1.0) * (3 if log else 1.15))
    ax.invert_yaxis()
    ax.set_xlabel("value" + (" (log scale)" if log else ""))
    return _svg(fig)


def accuracy_curve(radius: list[float], acc: list[float], global_acc: list[float] | None = None, label: str = "pairwise constants") -> str:
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    ax.plot(radius, acc, color=BLUE, label=label)
    if global_acc is not None:
        ax.plot(radius, global_acc, color=GREY, ls="--", label="global constant only")
    ax.set_xlabel("radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False, fontsize=8)
    return _svg(fig)


def radius_curves(curves: dict[str, list[float]], styles: dict[str, tuple[str, str]] | None = None) -> str:
    """Accuracy against radius (log axis) for several per-point radius lists: the fraction of
    points whose radius exceeds r (0 marks a misclassified point, inf one never flipped)."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.8, 3.0))
    finite = [r for rs in curves.values() for r in rs if 0 < r < float("inf")]
    lo, hi = (min(finite) / 3, max(finite) * 3) if finite else (1e-3, 1.0)
    grid = np.geomspace(lo, hi, 200)
    for (label, radii), color in zip(curves.items(), [GREY, BLUE, ORANGE, GREEN]):
        c, ls = (styles or {}).get(label, (color, "-"))
        arr = np.asarray(radii, dtype=np.float64)
        ax.step(grid, [float(np.mean(arr > g)) for g in grid], where="post", color=c, ls=ls, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("radius (log scale)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False, fontsize=8)
    return _svg(fig)


def radius_histogram(radii: list[float]) -> str:
    """Histogram of the finite radii; infinite ones (margins that do not depend on the input) are
    counted in the axis label."""
    finite = [r for r in radii if math.isfinite(r)]
    fig, ax = plt.subplots(figsize=(5.2, 3.0))
    if finite:
        ax.hist(finite, bins=30, color=BLUE)
    unbounded = len(radii) - len(finite)
    ax.set_xlabel("certified radius" + (f" ({unbounded} infinite, not shown)" if unbounded else ""))
    ax.set_ylabel("points")
    return _svg(fig)
