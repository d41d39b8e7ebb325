"""Fast defaults (issue 14): `lipcert certify` with its defaults (the class pairs that decide a
radius, certify's default budget: 150 s) against the full-pairwise run of main (every one of the 45 class pairs by
LipSDP, no budget), and `lipcert report` on every network in ../shared/models within its budget.

    python benchmarks/bench_certify.py --only certify            # certify: defaults, and --method naive
    python benchmarks/bench_certify.py --only nobudget --nets 256x2,256x4   # the binding pairs without a budget
    python benchmarks/bench_certify.py --only full --main /work/main   # main's full-pairwise run (slow)
    python benchmarks/bench_certify.py --only report             # report on every shared network
    python benchmarks/bench_certify.py --render                  # write the RESULTS.md section from the saved JSON

Every run is the command line in its own process (`python -m lipcert ...`), timed from outside
(wall clock, loading included). Results accumulate in a JSON file, so the parts can run at
different times (each under the shared CPU lock).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT))
from results_md import publish  # noqa: E402

from lipcert.budget import CERTIFY_BUDGET_S, DEFAULT_BUDGET_S  # noqa: E402

SHARED = ROOT.parent / "shared"
NETS = SHARED / "models" / "vnncomp2021"
MNIST = SHARED / "data" / "mnistfc15.npz"
DEFAULT_JSON = Path("/tmp/lipcert_bench_certify.json")
SECTION = "## Fast defaults: certify and report within a budget"
CERTIFY = ["mnist-net_256x2", "mnist-net_256x4", "mnist-net_256x6", "cifar_base_kw"]
# main's full-pairwise run of mnist-net_256x4, as measured in issue 14 (2 cores): not re-run here
ISSUE_256X4 = {"time_s": 1994.0, "median": 6.19e-5, "source": "issue 14"}


def cifar_points(path: Path, n: int = 20, seed: int = 0) -> Path:
    """20 test points for cifar_base_kw (no CIFAR data ships with the project): uniform random
    images in [0, 1], each pushed by 40 signed-gradient steps (step 0.01, kept in [0, 1]) toward
    class i mod 10, so that the points fall into several classes (plain noise is all one class);
    labelled with the network's own prediction."""
    import lipcert
    import torch

    graph = lipcert.load(NETS / "cifar_base_kw.onnx")
    x = torch.from_numpy(np.random.default_rng(seed).uniform(0.0, 1.0, size=(n, *graph.input_shape)))
    target = torch.arange(n) % 10
    for _ in range(40):
        x.requires_grad_(True)
        logits = graph.forward(x).reshape(n, -1)
        (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum() - logits.logsumexp(1).sum(), x)
        x = (x.detach() + 0.01 * g.sign()).clamp(0.0, 1.0)
    with torch.no_grad():
        y = graph.forward(x).reshape(n, -1).argmax(1).numpy()
    np.savez(path, x=x.numpy(), y=y)
    return path


def run_cli(args: list[str], pythonpath: Path, cap: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "lipcert", *args], capture_output=True, text=True, env=env, timeout=cap)
    except subprocess.TimeoutExpired:
        return {"time_s": time.perf_counter() - start, "error": f"stopped after {cap:.0f} s"}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"time_s": wall, "error": (proc.stderr or proc.stdout).strip()[-300:]}
    return {"time_s": wall, "stdout": proc.stdout}


def certify_row(net: str, data: Path, extra: list[str], tree: Path, cap: float) -> dict:
    out = run_cli(["certify", str(NETS / f"{net}.onnx"), "--data", str(data), "--json", *extra], tree, cap)
    if "stdout" in out:
        res = json.loads(out.pop("stdout"))
        radii = [p["radius"] for p in res["points"]]
        lip = res["lipschitz"]
        out.update(radii=radii, median=float(np.median(radii)), tightened=len(lip.get("tightened", [])), pair_solves=lip.get("pair_solves"),
                   global_bound=lip["global_bound"], cut=res.get("budget", {}).get("cut", []), hows=sorted(set(lip["how"].values())))
    return out


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"certify": {}, "report": {}, "meta": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["certify", "nobudget", "full", "report"], action="append")
    ap.add_argument("--nets", default="", help="comma-separated substrings of network names")
    ap.add_argument("--main", type=Path, default=Path("/work/main"), help="the tree whose full-pairwise run is 'today's' (--only full)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--cap", type=float, default=3000.0, help="hard cap per run (s)")
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--notes", default="", help="a paragraph to add under the tables (what was not run, and why)")
    args = ap.parse_args()
    store = load_json(args.json)
    parts = args.only or []
    pick = lambda names: [n for n in names if not args.nets or any(s in n for s in args.nets.split(","))]  # noqa: E731
    cifar = cifar_points(Path("/tmp/lipcert_cifar20.npz")) if set(parts) & {"certify", "nobudget", "full"} else Path("/tmp/lipcert_cifar20.npz")
    data = {n: (cifar if n.startswith("cifar") else MNIST) for n in CERTIFY}
    store["meta"].setdefault("load", {})
    for part in parts:
        store["meta"]["load"][part] = os.getloadavg()
    if "certify" in parts:
        for net in pick(CERTIFY):
            runs = [("default", []), ("naive", ["--method", "naive"])]
            if net == "mnist-net_256x4":  # the budget the other commands default to, for comparison
                runs.insert(1, (f"--budget {DEFAULT_BUDGET_S:g}", ["--budget", f"{DEFAULT_BUDGET_S:g}"]))
            for key, extra in runs:
                row = certify_row(net, data[net], extra, ROOT, args.cap)
                store["certify"].setdefault(net, {})[key] = row
                print(net, key, {k: v for k, v in row.items() if k != "radii"}, flush=True)
                args.json.write_text(json.dumps(store, indent=1))
    if "nobudget" in parts:
        for net in pick(CERTIFY):
            row = certify_row(net, data[net], ["--budget", "0"], ROOT, args.cap)
            store["certify"].setdefault(net, {})["binding, no budget"] = row
            print(net, "no budget", {k: v for k, v in row.items() if k != "radii"}, flush=True)
            args.json.write_text(json.dumps(store, indent=1))
    if "full" in parts:
        for net in pick(CERTIFY):
            row = certify_row(net, data[net], [], args.main, args.cap)
            store["certify"].setdefault(net, {})["main full pairwise"] = row
            print(net, "main", {k: v for k, v in row.items() if k != "radii"}, flush=True)
            args.json.write_text(json.dumps(store, indent=1))
    if "report" in parts:
        for f in sorted(NETS.glob("*.onnx")):
            if not pick([f.stem]):
                continue
            row = run_cli(["report", str(f), "-o", f"/tmp/lipcert_report_{f.stem}.html", "-q"], ROOT, args.cap)
            row.pop("stdout", None)
            store["report"][f.stem] = row
            print(f.stem, row, flush=True)
            args.json.write_text(json.dumps(store, indent=1))
    store["meta"]["date"] = datetime.date.today().isoformat()
    store["meta"]["end_load"] = os.getloadavg()
    args.json.write_text(json.dumps(store, indent=1))
    if args.render or parts:
        publish(SECTION, render(store) + (f"\n{args.notes.strip()}\n" if args.notes else ""), write=not args.no_write)


def _ratio_line(r: list[float], ref: list[float]) -> str:
    a, b = np.asarray(r), np.asarray(ref)
    ok = b > 0
    return f"{np.min(a[ok] / b[ok]):.3f}" if ok.any() else "-"


def render(store: dict) -> str:
    meta = store.get("meta", {})
    lines = [SECTION, "",
             f"`python benchmarks/bench_certify.py --only certify`, `--only full` and `--only report`, {meta.get('date', '')}, "
             f"{platform.processor() or platform.machine()}, 2 cores shared with other jobs (load average at the start of each part: "
             + ", ".join(f"{k} {v[0]:.1f}" for k, v in meta.get("load", {}).items()) + "), Python " + platform.python_version() + ". "
             "Every run is the command line in its own process, timed from outside (loading included). default: `lipcert certify "
             "MODEL --data DATA` (l2, --method sdp, only the class pairs that decide a radius are tightened, "
             f"--budget {CERTIFY_BUDGET_S:g}); "
             "no budget: the same with --budget 0; main full pairwise: main's code (every one of the 45 pairs by LipSDP, no budget). "
             "MNIST: the 15 images of ../shared/data/mnistfc15.npz; cifar_base_kw: 20 points the script makes "
             "(random images pushed toward class i mod 10 by 40 signed-gradient steps, labelled with the network's prediction). min ratio: the smallest per-point radius ratio to main's full pairwise "
             "run, or where that was not run, to this branch's binding pairs without a budget (whose radii are those of tightening "
             "every pair); points with radius 0 there left out.", "",
             "| network | run | time | median radius | pairs tightened | min radius ratio | speed-up vs main | cut by the budget |",
             "|---|---|---|---|---|---|---|---|"]
    for net, rows in store.get("certify", {}).items():
        ref = rows.get("main full pairwise")
        # per-point radii to compare with: main's run, else this branch's run of the binding pairs
        # without a budget (the radii of tightening all pairs, see tests/test_fastdefaults.py)
        ref_radii = next((r for r in (ref, rows.get("binding, no budget")) if r and "radii" in r), None)
        ref_name = "main" if ref_radii is ref else "no budget"
        ref_time = ref["time_s"] if ref and "error" not in ref else (ISSUE_256X4["time_s"] if net == "mnist-net_256x4" else None)
        for key in ["default", f"--budget {DEFAULT_BUDGET_S:g}", "binding, no budget", "naive", "main full pairwise"]:
            r = rows.get(key)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {net} | {key} | {r['time_s']:.0f} s | {r['error']} | | | | |")
                continue
            ratio = (f"{_ratio_line(r['radii'], ref_radii['radii'])} (vs {ref_name})"
                     if ref_radii and r is not ref_radii and key != "main full pairwise" else "-")
            speed = f"{ref_time / r['time_s']:.1f}x" if ref_time and key != "main full pairwise" else "-"
            lines.append(f"| {net} | {key} | {r['time_s']:.1f} s | {r['median']:.4g} | {r.get('tightened', 0)} | {ratio} | {speed} | "
                         f"{'; '.join(r.get('cut', [])) or '-'} |")
        if net == "mnist-net_256x4" and not ref:
            lines.append(f"| {net} | main full pairwise (issue 14, not re-run) | {ISSUE_256X4['time_s']:.0f} s | {ISSUE_256X4['median']:.4g} | 45 | - | - | - |")
    rep = store.get("report", {})
    if rep:
        lines += ["", f"`lipcert report MODEL -o OUT.html` (defaults: every method, --budget {DEFAULT_BUDGET_S:g}; no --data), wall time:", "",
                  f"| network | time | within {DEFAULT_BUDGET_S:g} s + 10% |", "|---|---|---|"]
        for net, r in rep.items():
            lines.append(f"| {net} | {r['time_s']:.1f} s{' (' + r['error'][:80] + ')' if 'error' in r else ''} | {'yes' if r['time_s'] <= 1.1 * DEFAULT_BUDGET_S and 'error' not in r else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
