"""Local certificates: certified radii from global (pairwise) constants and from local constants
over the ball B(x, r) itself, against the smallest flip a PGD attack finds, on the VNN-COMP 2021
MNIST networks and the 15 images of ../shared/data/mnistfc15.npz.

    python benchmarks/bench_local.py                      # 256x2, 256x4, 256x6; l2 and linf
    python benchmarks/bench_local.py --models 256x2       # a subset (substrings of file names)
    python benchmarks/bench_local.py --no-write           # print the section, leave RESULTS.md

Global constants: naive pairwise (`lipcert certify --method naive`); with --global-method sdp, LipSDP
pairwise for l2 (the `lipcert certify` default: 45 LipSDP solves per network, over 15 minutes on
256x2 on the shared 2-core machine).
Local: `certified_radius(..., local=True)` (CROWN pre-activation bounds, interval Jacobian,
bisection on r). Attack: lipcert.attack (PGD, 50 steps, 2 restarts, 12 bisection rounds on the
radius, no clipping to [0, 1], as the certificates cover the whole ball).
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

SHARED = ROOT.parent / "shared"
SECTION = "## Local certificates"
MODELS = ("mnist-net_256x2", "mnist-net_256x4", "mnist-net_256x6")
JSON_PATH = Path("/tmp/lipcert_bench_local.json")  # the raw per-point results of the last run (for --render)


def run(name: str, norm: str, global_method: str) -> dict:
    import numpy as np

    import lipcert
    from lipcert.certify import certified_radius, pairwise_constants

    graph = lipcert.load(SHARED / "models" / "vnncomp2021" / f"{name}.onnx")
    data = np.load(SHARED / "data" / "mnistfc15.npz")
    x, y = data["x"].astype(np.float64), data["y"]
    method = "sdp" if norm == "2" and global_method == "sdp" else "naive"
    t = time.perf_counter()
    consts = pairwise_constants(graph, norm, method)
    t_consts = time.perf_counter() - t
    t = time.perf_counter()
    certs = certified_radius(graph, x, y, norm=norm, constants=consts, local=True)
    t_local = time.perf_counter() - t
    t = time.perf_counter()
    att = lipcert.attack(graph, x, y, norm=norm)
    t_attack = time.perf_counter() - t
    row = {
        "network": name, "norm": norm, "points": len(x), "global_method": f"{method} pairwise",
        "global_median": float(np.median(certs.pairwise_radii)), "local_median": float(np.median(certs.radii)),
        "attack_median": float(np.median(att.radii)), "constants_s": t_consts, "local_s_per_point": t_local / len(x),
        "attack_s_per_point": t_attack / len(x), "radii": certs.radii.tolist(), "pairwise_radii": certs.pairwise_radii.tolist(),
        "attack_radii": att.radii.tolist(), "how": certs.how,
        "below_attack": bool((certs.radii <= att.radii).all()),
    }
    print(f"{name} l{norm}: global {row['global_median']:.3g}  local {row['local_median']:.3g}  attack {row['attack_median']:.3g}  "
          f"{row['local_s_per_point']:.2f} s/point (constants {t_consts:.1f} s)", file=sys.stderr, flush=True)
    return row


def render(rows: list[dict], command: str, load: str, date: str) -> str:
    lines = [
        SECTION, "",
        f"`{command}` on {platform.node() or 'this machine'} ({os.cpu_count()} CPU cores shared with other jobs), "
        f"{date}, load average before the run {load}.",
        "The 15 MNIST images of `../shared/data/mnistfc15.npz` (centres of the VNN-COMP 2021 mnistfc properties). Certified radius",
        "median over the 15 points: *global* = today's certificate with the pairwise constants named in the table (issue 13 quotes",
        "0.0031 for l2 with LipSDP pairwise on 256x2, and 8.5e-6 for linf);",
        "*local* = `lipcert certify --local` (local constants over the ball B(x, r) itself; never below global). *Attack* = median",
        "of the smallest flip PGD finds (an upper bound on each point's true robust radius); every local radius was checked to be",
        "below its point's attack radius. Times: local search per point (bisection, about 10 bound computations), the pairwise",
        "constants once per network, the attack per point.", "",
        "| network | norm | global by | global median | local median | local / global | attack median | local s/point | constants s | attack s/point |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["local_median"] / r["global_median"] if r["global_median"] > 0 else float("inf")
        lines.append(f"| {r['network']} | l{r['norm']} | {r['global_method']} | {r['global_median']:.3g} | {r['local_median']:.3g} | {ratio:.0f}x | "
                     f"{r['attack_median']:.3g} | {r['local_s_per_point']:.2f} | {r['constants_s']:.1f} | {r['attack_s_per_point']:.2f} |")
    bad = [f"{r['network']} l{r['norm']}" for r in rows if not r["below_attack"]]
    lines += ["", "Local radius above its attack radius (would be a soundness failure): " + (", ".join(bad) if bad else "none") + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated substrings of network names")
    ap.add_argument("--norms", default="2,inf")
    ap.add_argument("--global-method", default="naive", choices=["naive", "sdp"],
                    help="pairwise constants for the global radii (sdp: LipSDP for l2, 45 solves per network: slow)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render", default=None, metavar="JSON", help=f"write the section from a saved run ({JSON_PATH})")
    ap.add_argument("--load", default=None, help="with --render: the load average measured before that run")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        if isinstance(saved, list):  # a run saved before the provenance fields were added
            saved = {"rows": saved, "command": "python benchmarks/bench_local.py", "load": "n/a",
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(Path(args.render).stat().st_mtime))}
        publish(SECTION, render(saved["rows"], saved["command"], args.load or saved["load"], saved["date"]), write=not args.no_write)
        return
    import torch

    torch.set_num_threads(2)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    names = [m for m in MODELS if not args.models or any(f in m for f in args.models.split(","))]
    rows = [run(m, n, args.global_method) for m in names for n in args.norms.split(",")]
    command = "python benchmarks/bench_local.py" + " ".join([""] + [a for a in sys.argv[1:] if a != "--no-write"])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    JSON_PATH.write_text(json.dumps({"rows": rows, "command": command, "load": load, "date": date}, indent=1))
    publish(SECTION, render(rows, command, load, date), write=not args.no_write)


if __name__ == "__main__":
    main()
