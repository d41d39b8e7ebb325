"""Witnessed lower bounds: value against the reference lower figures of ../shared/models, time,
and search throughput (points whose Jacobian or Jacobian-vector product was evaluated per second).

    python benchmarks/bench_lower.py                    # every shared network, l2 and linf, CPU
    python benchmarks/bench_lower.py --device cuda      # on a GPU (falls back to the CPU without one)
    python benchmarks/bench_lower.py --models mnist     # a subset (substrings of file names)
    python benchmarks/bench_lower.py --no-write         # print the section instead of writing RESULTS.md

Default search settings (64 starts; 200 ascent steps on dense networks, 50 with convolutions).
Every value is a recomputed witness ratio; nothing here is timed in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the lipcert of this tree, not another install
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import publish  # noqa: E402
SHARED = ROOT.parent / "shared" / "models"
SECTION = "## Lower bounds"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default=None, help="comma-separated substrings of file names")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    import lipcert

    reference = json.loads((SHARED / "reference.json").read_text())
    filters = args.models.split(",") if args.models else None
    rows = []
    lipcert.lower_bound(ROOT / "models" / "mlp_spiral.onnx", starts=4, steps=2)  # imports and warm-up, not timed
    for key, ref in reference.items():
        path = SHARED / key
        if filters and not any(f in path.name for f in filters):
            continue
        graph = lipcert.load(path)
        row = {"network": path.stem, "input": graph.input_dim}
        for norm in ("2", "inf"):
            r = lipcert.lower_bound(graph, norm=norm, device=args.device)
            row[norm] = {"value": r.value, "ref": ref[f"lower_l{norm}"], "time_s": r.time_s,
                         "points_per_s": r.details["points_per_s"], "evaluations": r.details["jacobian_evaluations"],
                         "screened": r.details["screened_points"], "steps": r.settings["steps"], "device": r.details["device"]}
            print(f"{path.stem:34s} l{norm:3s} {r.value:12.6g}  ref {row[norm]['ref']:12.6g}  x{r.value / row[norm]['ref']:.2f}  "
                  f"{r.time_s:6.1f} s  {row[norm]['points_per_s']:9.0f} points/s", file=sys.stderr, flush=True)
        rows.append(row)

    device = "GPU " + torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else "CPU"
    lines = [SECTION, "", f"`python benchmarks/bench_lower.py{' --device cuda' if args.device == 'cuda' else ''}`, {time.strftime('%Y-%m-%d')}, "
             f"{device}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. "
             "Default settings (64 starts; 200 ascent steps for dense networks, 50 with convolutions). "
             "value: the recomputed witness ratio; ref: the reference lower figure in ../shared/models/reference.json "
             "(best ||J(x)|| over random points, no ascent); points/s: Jacobian or Jacobian-vector-product evaluations "
             "per second during screening and ascent.", "",
             "| network | input | l2 value | l2 / ref | l2 time | linf value | linf / ref | linf time | points/s (l2) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a, b = row["2"], row["inf"]
        lines.append(f"| {row['network']} | {row['input']} | {a['value']:.5g} | {a['value'] / a['ref']:.2f} | {a['time_s']:.1f} s | "
                     f"{b['value']:.5g} | {b['value'] / b['ref']:.2f} | {b['time_s']:.1f} s | {a['points_per_s']:.0f} |")
    worst = min(min(r["2"]["value"] / r["2"]["ref"], r["inf"]["value"] / r["inf"]["ref"]) for r in rows)
    lines += ["", f"Smallest ratio to the reference: {worst:.2f}."]
    text = "\n".join(lines) + "\n"
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
