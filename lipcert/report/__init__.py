"""Self-contained HTML reports: the interval, the methods, the layers, the witness, certificates."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from ..config import Settings
from ..graph import Graph
from ..result import Result, best_proven
from . import figures


def versions() -> dict[str, str]:
    import cvxpy
    import onnx
    import torch

    from .. import __version__

    return {"lipcert": __version__, "torch": torch.__version__, "cvxpy": cvxpy.__version__, "numpy": np.__version__, "onnx": onnx.__version__}


def collect(graph: Graph, settings: Settings, note: Any = None, budget: Any = None) -> tuple[list[Result], list[tuple[str, str]]]:
    """Run every registered method that applies (within ``budget``, a lipcert.budget.Budget, when
    given); return the results and the skipped methods."""
    from ..estimators import estimate_all

    results, skipped = estimate_all(graph, settings, note, budget)
    return results, list(skipped.items())


def _short(arr: Any, n: int = 12) -> str:
    flat = np.asarray(arr, dtype=np.float64).ravel()
    text = np.array2string(flat[:n], precision=6, separator=", ")
    return text + (f" ... ({flat.size} values)" if flat.size > n else "")


def render(graph: Graph, results: list[Result], path: str | Path, command: str = "", skipped: list[tuple[str, str]] | None = None,
           certificates: dict[str, Any] | None = None, data_name: str = "", seed: int = 0, notes: list[str] | None = None) -> Path:
    """Write one self-contained HTML file (plots inline as SVG, no external resources). ``notes``:
    further lines for the warnings list (e.g. what a budget cut)."""
    env = Environment(loader=PackageLoader("lipcert.report", "templates"), autoescape=select_autoescape(["html", "jinja"]))
    lowers = [r for r in results if r.kind == "lower" and r.value is not None]
    best = best_proven(results)
    low = max(lowers, key=lambda r: r.value) if lowers else None
    norm = results[0].norm if results else "2"
    if best and low:
        interval = f"{low.value:.6g} \u2264 L \u2264 {best.value:.6g}"
        sentence = (f"Proven: for all inputs x, y, ||f(x) - f(y)|| \u2264 {best.value:.6g} ||x - y|| (l{norm} norm, by {best.method}). "
                    f"Witnessed: two inputs stretch by {low.value:.6g} (by {low.method}), so the true constant lies in this interval; "
                    + (f"the gap is a factor {best.value / low.value:.3g}." if low.value > 0 else
                       "the bounds meet at 0: the network is constant." if best.value == 0 else "the lower bound is 0."))
    elif best:
        interval = f"L \u2264 {best.value:.6g}"
        sentence = f"Proven: for all inputs x, y, ||f(x) - f(y)|| \u2264 {best.value:.6g} ||x - y|| (l{norm} norm, by {best.method})."
    else:
        interval, sentence = "no proven bound", "No method gave a proven upper bound; see the warnings below."
    # naive's and gram's bounds break down per layer (LipSDP's per section): the tighter of the
    # two (gram where it proved small-grid convolutions exact), naive on a tie
    per_layer = [r for r in results if r.method in ("naive", "gram") and r.layers and r.certified and r.value is not None]
    layered = (min(per_layer, key=lambda r: (r.value, r.method != "naive")) if per_layer else None) or next((r for r in results if r.layers), None)
    layers = layered.layers if layered else []
    warnings = [f"{r.method}: {w}" for r in results for w in r.warnings] + [f"{r.method}: {r.status}" for r in results if r.value is None] + list(notes or [])
    ctx: dict[str, Any] = {
        "model_name": Path(graph.source or "model").name, "model_path": graph.source or "", "sha256": graph.sha256 or "n/a",
        "input_shape": "x".join(map(str, graph.input_shape)), "output_shape": "x".join(map(str, graph.output_shape)),
        "norm": norm, "interval": interval, "sentence": sentence, "results": results, "best": best.method if best else None,
        "skipped": skipped or [], "methods_svg": figures.methods([r.to_dict() for r in results], low.value if low else None),
        "layers_method": layered.method if layered else "", "layers": layers,
        "layers_svg": figures.layer_norms([l.name for l in layers], [l.value for l in layers], [l.cumulative for l in layers]) if layers else "",
        "witness": low.witness if low else None, "lower_value": low.value if low else None,
        "witness_x": _short(low.witness["x"]) if low else "", "witness_y": _short(low.witness["y"]) if low else "",
        "cert": certificates, "data_name": data_name, "warnings": warnings, "command": command, "versions": versions(), "seed": seed,
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if certificates:
        # with local constants a point's radius is the larger of its pairwise and local ones
        label = "local or pairwise constants" if certificates.get("local") else "pairwise constants"
        ctx["curve_svg"] = figures.accuracy_curve(certificates["curve"]["radius"], certificates["curve"]["certified_accuracy"], certificates.get("global_curve"), label)
        ctx["hist_svg"] = figures.radius_histogram([p["radius"] for p in certificates["points"] if p["certified"]])
        if certificates.get("local"):  # local constants and an attack (lipcert report --local)
            curves = {"global (pairwise) constants": certificates["pairwise_radii"], "local constants": [p["radius"] for p in certificates["points"]]}
            if certificates.get("attack_radii") is not None:
                curves["attack (PGD): not broken"] = certificates["attack_radii"]
            ctx["local_svg"] = figures.radius_curves(curves, {"attack (PGD): not broken": (figures.ORANGE, "--")})
        hows = sorted(set(certificates["lipschitz"]["how"].values()))
        ctx["cert_how"] = ", ".join(hows) + f"; global bound {certificates['lipschitz']['global_bound']:.6g} ({certificates['lipschitz']['global_method']})"
        if certificates.get("local"):
            ctx["cert_how"] += f"; local constants over each ball B(x, r) certified {sum(h.startswith('local') for h in certificates['how'])} point(s)"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(env.get_template("report.html.jinja").render(**ctx), encoding="utf-8")
    return out
