"""Convolutional networks: naive, gram, power and lower on the networks of cnn_zoo.py, next to
today's naive (the code of another checkout, default /work/main) on the same network.

    python benchmarks/bench_cnn.py                                  # every network, writes RESULTS.md
    python benchmarks/bench_cnn.py --nets resnet18_cifar --cap 300  # a subset, per-run cap (s)
    python benchmarks/bench_cnn.py --baseline /work/main --baseline-cap 600
    python benchmarks/bench_cnn.py --render                         # rewrite the section from the saved JSON

Each (network, method) pair runs in its own process with a hard time cap; its time (the method
alone, after loading), its peak resident memory (the whole process, loading included) and its
value are recorded. Upper bounds are proven, "power" is an estimate, "lower" is witnessed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import publish  # noqa: E402

SECTION = "## Convolutional networks"
DEFAULT_JSON = Path("/tmp/lipcert_bench_cnn.json")
METHODS = ["naive", "gram", "power", "lower"]
NETS = ["resnet18_cifar", "resnet34_cifar", "resnet50_imagenet", "vgg11_cifar", "mobilenetv2_cifar"]

CHILD = r"""
import json, resource, sys, time
sys.path[:0] = [{root!r}, {bench!r}]  # the checkout under test first: its lipcert, not the installed one
import torch
from cnn_zoo import ZOO
import lipcert
if not lipcert.__file__.startswith({root!r}):
    raise SystemExit("imported lipcert from " + lipcert.__file__ + ", not from " + {root!r})
module, shape = ZOO[{net!r}]()
graph = lipcert.load(module, input_shape=shape)
start = time.perf_counter()
if {method!r} == "lower":
    r = lipcert.lower_bound(graph, norm=2)
else:
    r = lipcert.bound(graph, method={method!r}, norm=2)
elapsed = time.perf_counter() - start
exact = sum(1 for layer in r.layers if layer.exact)
print("RESULT " + json.dumps({{"value": r.value, "time_s": elapsed, "kind": r.kind, "layers": len(r.layers), "exact_layers": exact,
      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lipcert": lipcert.__file__}}))
"""


def run_one(net: str, method: str, cap: float, lipcert_root: Path) -> dict:
    """One (network, method) run in a child process that imports lipcert from ``lipcert_root``
    (PYTHONPATH and the front of sys.path, run from that directory: an installed or the
    current directory's lipcert cannot shadow it); the networks always come from this checkout."""
    root = str(lipcert_root.resolve())
    code = CHILD.format(root=root, bench=str(ROOT / "benchmarks"), net=net, method=method)
    env = {**os.environ, "PYTHONPATH": root}
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=cap, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        return {"status": f"> {cap:.0f} s (cap)"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[7:]), "wall_s": time.perf_counter() - start}
    return {"status": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:120]}


def _commit(path: str) -> str:
    if not path:
        return "-"
    out = subprocess.run(["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def render(data: dict) -> str:
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_cnn.py {data['args']}` (commit {data.get('commit', '?')}) on {data['machine']}, {data['date']}, load average "
        f"{data['load']} at the start (2 cores shared with other jobs: times are upper estimates of an idle machine's).",
        "Networks from `benchmarks/cnn_zoo.py` (plain torch, random weights, batch-norm with non-trivial statistics).",
        "Time: the method alone after loading; memory: peak resident memory of the process (loading included);",
        f"`today` is the naive method of the baseline checkout {data.get('baseline_dir', '?')} (commit {data.get('baseline_commit', '?')}), "
        "imported from there, on the same network. naive and gram are proven upper bounds,",
        "power an estimate (per-layer power iteration), lower a witnessed lower bound.",
        "",
        "| network | method | value | time | peak memory | layer norms exact | today's naive |",
        "|---|---|---|---|---|---|---|",
    ]
    for net, rows in data["results"].items():
        base = data["baseline"].get(net, {})
        today = f"{base['time_s']:.1f} s (value {base['value']:.4g})" if base.get("status") == "ok" else base.get("status", "not run")
        for method, r in rows.items():
            if r.get("status") == "ok":
                value = "-" if r["value"] is None else f"{r['value']:.4g}"
                lines.append(f"| {net} | {method} | {value} | {r['time_s']:.1f} s | {r['peak_mb'] / 1024:.2f} GB | "
                             f"{r['exact_layers']}/{r['layers']} | {today if method == 'naive' else ''} |")
            else:
                lines.append(f"| {net} | {method} | {r['status']} | | | | {today if method == 'naive' else ''} |")
    lines += [""] + [f"- {note}" for note in data.get("notes", [])]  # added to the JSON by hand, kept by --render
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cap", type=float, default=600.0)
    ap.add_argument("--baseline", default="/work/main", help="checkout whose naive is 'today's method', e.g. a worktree "
                    "of an older commit (`git worktree add DIR COMMIT`); '' to skip")
    ap.add_argument("--baseline-cap", type=float, default=600.0)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.render:
        publish(SECTION, render(json.loads(args.json.read_text())), write=not args.no_write)
        return
    data = {
        "args": " ".join(sys.argv[1:]), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": f"{os.getloadavg()[0]:.1f}",
        "results": {}, "baseline": {}, "baseline_dir": args.baseline, "baseline_commit": _commit(args.baseline),
        "commit": _commit(str(ROOT)),
    }
    for net in args.nets.split(","):
        data["results"][net] = {}
        for method in args.methods.split(","):
            data["results"][net][method] = run_one(net, method, args.cap, ROOT)
            print(net, method, data["results"][net][method], flush=True)
            args.json.write_text(json.dumps(data, indent=1))
        if args.baseline:
            data["baseline"][net] = run_one(net, "naive", args.baseline_cap, Path(args.baseline))
            print(net, "baseline naive", data["baseline"][net], flush=True)
            args.json.write_text(json.dumps(data, indent=1))
    publish(SECTION, render(data), write=not args.no_write)


if __name__ == "__main__":
    main()
