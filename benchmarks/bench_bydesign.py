"""Lipschitz-by-design networks: the bound each method proves against the bound the construction
guarantees (orthogonal / spectral / Frobenius weights, 1-Lipschitz activations and pooling).

    python benchmarks/bench_bydesign.py              # writes the RESULTS.md section
    python benchmarks/bench_bydesign.py --no-write   # print it only

Networks are built here in float64 with fixed seeds (untrained: the construction, not training, makes them
1-Lipschitz), from torch's own ``parametrizations.orthogonal`` and from deel-torchlip (a test
dependency: ``pip install -e '.[test]'``), loaded as modules by ``lipcert.load``. naive and sdp
are proven l2 upper bounds; lower is a recomputed witness ratio (default search settings). GNP:
gradient-norm preserving (orthogonal square weights and sorting activations), whose true
constant is exactly 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the lipcert of this tree, not another install
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from results_md import publish  # noqa: E402

SECTION = "## Lipschitz-by-design networks"


def networks():
    import torch
    from deel import torchlip as tl
    from torch.nn.utils import parametrizations
    from zoo import GroupSort  # tests/zoo.py: the same module the tests use

    def orth(n_in: int, n_out: int | None = None):
        return parametrizations.orthogonal(torch.nn.Linear(n_in, n_out or n_in))

    def gnp(act, depth: int = 4, width: int = 32):
        layers = []
        for _ in range(depth - 1):
            layers += [orth(width), act()]
        return torch.nn.Sequential(*layers, orth(width))

    flat = torch.nn.Flatten
    # (name, kind, activation, pooling, weights, builder, input shape, GNP)
    return [
        ("orth GroupSort2 32x4", "dense", "GroupSort2", "-", "orthogonal", lambda: gnp(lambda: GroupSort(2)), (1, 32), True),
        ("orth FullSort 32x4", "dense", "FullSort", "-", "orthogonal", lambda: gnp(lambda: GroupSort(32)), (1, 32), True),
        ("orth GroupSort4 64x3", "dense", "GroupSort(4)", "-", "orthogonal", lambda: gnp(lambda: GroupSort(4), 3, 64), (1, 64), True),
        ("orth MaxMin", "dense", "MaxMin", "-", "orthogonal", lambda: torch.nn.Sequential(orth(16), tl.MaxMin(), orth(32, 16), tl.MaxMin(), orth(32, 10)), (1, 16), False),
        ("spectral GroupSort2", "dense", "GroupSort2", "-", "spectral", lambda: tl.Sequential(tl.SpectralLinear(32, 64), tl.GroupSort2(), tl.SpectralLinear(64, 64), tl.GroupSort2(), tl.SpectralLinear(64, 10)), (1, 32), False),
        ("spectral ReLU", "dense", "ReLU", "-", "spectral", lambda: tl.Sequential(tl.SpectralLinear(32, 64), torch.nn.ReLU(), tl.SpectralLinear(64, 64), torch.nn.ReLU(), tl.SpectralLinear(64, 10)), (1, 32), False),
        ("Frobenius FullSort", "dense", "FullSort", "-", "Frobenius", lambda: tl.Sequential(tl.SpectralLinear(16, 16), tl.FullSort(), tl.FrobeniusLinear(16, 1)), (1, 16), False),
        ("conv GroupSort2 avg-pool", "conv", "GroupSort2", "ScaledAvgPool2d", "spectral", lambda: tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledAvgPool2d(2), flat(), tl.SpectralLinear(64, 10)), (1, 1, 8, 8), False),
        ("conv ReLU L2-pool", "conv", "ReLU", "ScaledL2NormPool2d", "spectral", lambda: tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), torch.nn.ReLU(), tl.ScaledL2NormPool2d(2), flat(), tl.SpectralLinear(64, 10)), (1, 1, 8, 8), False),
        ("conv FullSort global L2-pool", "conv", "FullSort", "global L2-norm", "Frobenius", lambda: tl.Sequential(tl.FrobeniusConv2d(1, 4, 3, padding=1), tl.FullSort(), tl.ScaledAdaptativeL2NormPool2d(), flat(), tl.SpectralLinear(4, 2)), (1, 1, 8, 8), False),
        ("conv MaxMin global avg-pool", "conv", "MaxMin", "global average", "spectral", lambda: tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), tl.MaxMin(), tl.ScaledAdaptiveAvgPool2d((1, 1)), flat(), tl.SpectralLinear(8, 2)), (1, 1, 8, 8), False),
        ("conv GroupSort2 x2 L2-pool", "conv", "GroupSort2", "ScaledL2NormPool2d", "spectral", lambda: tl.Sequential(tl.SpectralConv2d(2, 4, 3, padding=1), tl.GroupSort2(), tl.SpectralConv2d(4, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledL2NormPool2d(2), flat(), tl.SpectralLinear(64, 10)), (1, 2, 8, 8), False),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    import lipcert
    from lipcert.config import Settings
    from lipcert.estimators import ESTIMATORS, estimate

    torch.set_num_threads(2)
    torch.set_default_dtype(torch.float64)  # orthogonal / normalised to 1e-15, so the construction's 1 is exact to 1e-6
    rows = []
    for k, (name, kind, act, pool, weights, build, shape, is_gnp) in enumerate(networks()):
        torch.manual_seed(k)
        module = build().eval()
        start = time.perf_counter()
        graph = lipcert.load(module, shape)
        load_s = time.perf_counter() - start
        row = {"name": name, "kind": kind, "act": act, "pool": pool, "weights": weights, "gnp": is_gnp, "load_s": load_s, "construction": 1.0}
        for method in ("naive", "sdp", "lower"):
            reason = ESTIMATORS[method].accepts(graph, Settings())
            if reason is not None:
                row[method] = None
                row[f"{method}_why"] = reason
                continue
            r = estimate(graph, method, Settings())
            row[method], row[f"{method}_s"] = r.value, r.time_s
        rows.append(row)
        print(f"{name:32s} naive {row['naive']:.10f}  sdp {row['sdp'] if row['sdp'] is None else format(row['sdp'], '.10f')}  "
              f"lower {row['lower']:.6f}", file=sys.stderr, flush=True)

    def cell(v, digits=10):
        return "-" if v is None else f"{v:.{digits}f}"

    load = os.getloadavg()
    lines = [SECTION, "",
             f"`python benchmarks/bench_bydesign.py`, {time.strftime('%Y-%m-%d')}, CPU, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"torch {torch.__version__}, deel-torchlip {__import__('deel.torchlip', fromlist=['__version__']).__version__}; "
             f"load average {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} at the end (the machine was shared). "
             "Untrained networks with fixed seeds, 1-Lipschitz in l2 by construction (column `construction`); loaded as torch modules "
             "(parametrisations frozen on a copy). naive and sdp: proven l2 upper bounds (SAFETY margin 1e-9 per layer); lower: the "
             "recomputed witness ratio of the default search. GNP: gradient-norm preserving (orthogonal square weights, sorting "
             "activations), true constant exactly 1.", "",
             "| network | layers | activation | pooling | weights | GNP | naive | sdp | lower | construction | naive / construction |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['act']} | {r['pool']} | {r['weights']} | {'yes' if r['gnp'] else 'no'} | "
                     f"{cell(r['naive'])} | {cell(r['sdp'])} | {cell(r['lower'], 6)} | {r['construction']:g} | {r['naive'] / r['construction']:.10f} |")
    proven = [v for r in rows for v in (r["naive"], r["sdp"]) if v is not None]
    worst = max(v / 1.0 for v in proven)
    gnp_low = min(r["lower"] for r in rows if r["gnp"])
    lines += ["", f"Largest proven bound / construction: {worst:.10f} (must be <= 1 + 1e-6); smallest lower bound on the GNP "
              f"networks: {gnp_low:.6f} (must be >= 0.99). Proven bounds below the construction's 1 are real: a spectral layer "
              "followed by a layer that does not align with it, pooling and narrow outputs make the network less than 1-Lipschitz."]
    skipped = {r["name"]: r.get("sdp_why") for r in rows if r["sdp"] is None}
    if skipped:
        lines += ["", "sdp not applicable: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
