"""Every proven l2 method side by side on every network of ../shared/models (and a ResNet-18 at
CIFAR size from cnn_zoo.py): value, time and peak memory, with the published anchor figures.

    python benchmarks/bench_compose.py                       # everything, writes the RESULTS.md section
    python benchmarks/bench_compose.py --only mlp            # a subset: mlp, conv, resnet18
    python benchmarks/bench_compose.py --render              # rewrite the section from the saved JSON

Each (network, method) runs in its own process (its own peak memory, a hard time cap), with one
BLAS thread (OPENBLAS_NUM_THREADS=1 and torch's own setting): on the shared 2-core machine
multi-threaded BLAS under load was measured 10-40x slower (a 256-channel FFT conv bound: 154 s with
threads, 3.6 s without). Times are the estimator's ``run`` (loading the model is not included).
Nothing here is timed in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import publish  # noqa: E402

MODELS = ROOT.parent / "shared" / "models" / "vnncomp2021"
DEFAULT_JSON = Path("/tmp/lipcert_bench_compose.json")
SECTION = "## Compositional bounds: every method side by side"
MLP = ["test_nano", "test_tiny", "test_small", "ACASXU_run2a_1_1_batch_2000", "ACASXU_run2a_2_3_batch_2000", "ACASXU_run2a_5_9_batch_2000",
       "mnist-net_256x2", "mnist-net_256x4", "mnist-net_256x6", "ffnnSIGMOID__Point_6x200", "mnist_relu_9_200"]
CONV = ["cifar10_small", "cifar_base_kw", "cifar_deep_kw", "resnet_2b", "Convnet_avgpool", "Convnet_maxpool"]
RESNET18 = ["resnet18_cifar"]
METHODS = ["naive", "compose", "sdp"]
# LipSDP on the networks this script does not solve (issue 12, measured 2026-11-26 on this machine)
NOT_RUN = {"cifar_deep_kw": "not run: over an hour estimated (d = 9828) [issue 12]", "resnet_2b": "no bound in 90 s [issue 12]",
           "resnet18_cifar": "not run (no LipSDP section fits: 65536-neuron layers)"}


def _load(net: str):
    import lipcert

    if net == "resnet18_cifar":
        from cnn_zoo import resnet18_cifar

        module, shape = resnet18_cifar()
        return lipcert.load(module, shape, crosscheck=False)
    return lipcert.load(str(MODELS / f"{net}.onnx"))


def worker(spec: dict) -> dict:
    from lipcert.config import Settings
    from lipcert.estimators import ESTIMATORS

    graph = _load(spec["net"])
    extra = {"fast_time_limit": spec["sdp_time_limit"]} if spec["method"] == "sdp" else {}
    est = ESTIMATORS[spec["method"]]
    settings = Settings(extra=extra)
    reason = est.accepts(graph, settings)
    if reason is not None:
        return {"value": None, "status": f"refused: {reason}", "time_s": None, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    start = time.perf_counter()
    r = est.run(graph, settings)
    out = {"value": r.value, "status": r.status, "time_s": time.perf_counter() - start,
           "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if spec["method"] == "compose":
        out["rules"] = r.details.get("rules")
        out["compositional_value"] = r.details.get("compositional_value")
    if spec["method"] == "sdp":
        secs = r.details.get("sections", [])
        lows = [a.get("lower_value") for s in secs for a in s.get("attempts", [])]
        out["lower_value"] = lows[0] if len(secs) == 1 and lows and lows[0] is not None else None
    return out


def run(spec: dict, cap: float) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, timeout=cap, env=env)
    except subprocess.TimeoutExpired:
        return {"value": None, "status": f"stopped after {cap:.0f} s", "time_s": None, "rss_mb": None}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"value": None, "status": f"failed: {p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else p.returncode}", "time_s": None, "rss_mb": None}
    return json.loads(lines[-1])


def machine() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "cores": os.cpu_count(), "load": os.getloadavg()}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.7g}"


def _cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r.get("value") is None:
        return r.get("status", "no bound")
    t = r.get("time_s")
    return f"{_fmt(r['value'])} ({t:.2f} s, {r['rss_mb']:.0f} MB)" if t is not None else _fmt(r["value"])


def earlier_sdp() -> dict[str, str]:
    """LipSDP rows of the "LipSDP at scale" section of RESULTS.md (bench_sdp_scale.py): network ->
    "bound (time, peak RSS)", for the networks this run does not solve again."""
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    if "## LipSDP at scale" not in text:
        return {}
    section = text.split("## LipSDP at scale", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and cells[0] in MLP + CONV and cells[8] not in ("", "-"):
            out[cells[0]] = f"{cells[8]} ({cells[3].split(' (')[0]}, {cells[6]})"
    return out


def render(results: dict) -> str:
    m = results.get("machine", {})
    ref = json.loads((MODELS.parent / "reference.json").read_text())
    earlier = earlier_sdp()
    lines = [SECTION, "",
             f"Script: `python benchmarks/bench_compose.py` (date {m.get('date')}; 2 cores shared with other jobs, python {m.get('python')}, "
             f"torch 2.13.0+cpu; load average {', '.join(f'{x:.1f}' for x in m.get('load', []))} at the end of the run). "
             f"{results.get('notes', '')}".rstrip(),
             "",
             "Each cell: proven l2 bound (time of the method, peak RSS of its process). `compose` is the compositional method "
             "(lipcert/estimators/compose.py: one closed-form matrix inequality per layer, residual blocks as one inequality, "
             "each proven in float64); `sdp` is LipSDP-Neuron with lipcert-fast (`--time-limit` "
             f"{results.get('sdp_time_limit', 0):.0f} s where this run solved it; the dual bound, where the solver has one, in its own column); "
             "cells marked [earlier run] are not from this run but from the \"LipSDP at scale\" section below (bench_sdp_scale.py, "
             "2026-11-26, the same solver code, unchanged on this branch; 900 s limit on the convolutional networks), and [issue 12] "
             "quotes the issue. "
             "Lower: `lower_l2` of ../shared/models/reference.json (a witnessed lower bound, random points, no search).",
             "",
             "| network | naive | compose | sdp | compose / naive | sdp dual bound (LipSDP optimum >=) | lower (reference) |",
             "|---|---|---|---|---|---|---|"]
    for net in MLP + CONV + RESNET18:
        row = results.get("runs", {}).get(net)
        if not row:
            continue
        nv, cv = (row.get("naive") or {}).get("value"), (row.get("compose") or {}).get("value")
        ratio = f"{cv / nv:.3f}" if nv and cv else "-"
        low = ref.get(f"vnncomp2021/{net}.onnx", {}).get("lower_l2")
        dual = (row.get("sdp") or {}).get("lower_value")
        sdp = _cell(row["sdp"]) if row.get("sdp") else (f"{earlier[net]} [earlier run]" if net in earlier else NOT_RUN.get(net, "not run"))
        lines.append(f"| {net} | {_cell(row.get('naive'))} | {_cell(row.get('compose'))} | {sdp} | {ratio} | {_fmt(dual)} | {_fmt(low)} |")
    lines += ["",
              "Published anchors (other tools, other machines, other networks; quoted from the papers, not re-run here):",
              "- GLipSDP (Pauli, Gramlich, Allgower, arXiv 2405.01125; MATLAB + MOSEK): the LipSDP-Neuron values on 64-wide x 64-layer "
              "MNIST MLPs in 65.9 s (LipSDP 830 s); 16 convolutional layers x 32 channels on 14x14 inputs (about 100k neurons) in 548 s.",
              "- ECLipsE / ECLipsE-Fast (Xu and Sivaranjani, NeurIPS 2024): compositional, linear in depth; 100 layers in about 157 s "
              "(ECLipsE), the Fast variant in closed form, about 0 s; bounds between naive and LipSDP.",
              "- LipDiff (Wang et al., ICLR 2024): LipSDP in eigenvalue form by a first-order method with Lanczos, on GPU: 3.3% above LipSDP, "
              "4.8x faster than MOSEK, and networks of ImageNet scale.",
              ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="mlp,conv,resnet18", help="comma-separated subset of mlp, conv, resnet18")
    ap.add_argument("--methods", default=",".join(METHODS), help="which methods to run (others keep their saved results)")
    ap.add_argument("--nets", default="", help="comma-separated networks to run (default: all of the chosen groups)")
    ap.add_argument("--sdp-time-limit", type=float, default=120.0, help="lipcert-fast's --time-limit, seconds")
    ap.add_argument("--cap", type=float, default=400.0, help="hard cap per process, seconds")
    ap.add_argument("--notes", default=None, help="a sentence under the script line")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    results = json.loads(args.json.read_text()) if args.json.exists() else {"runs": {}}
    if not args.render:
        groups = {"mlp": MLP, "conv": CONV, "resnet18": RESNET18}
        methods = args.methods.split(",")
        for g in args.only.split(","):
            for net in groups[g]:
                if args.nets and net not in args.nets.split(","):
                    continue
                for method in methods:
                    if net == "resnet18_cifar" and method == "sdp":
                        continue
                    spec = {"net": net, "method": method, "sdp_time_limit": args.sdp_time_limit}
                    r = run(spec, args.cap)
                    results["runs"].setdefault(net, {})[method] = r
                    print(net, method, _cell(r), file=sys.stderr, flush=True)
                    args.json.write_text(json.dumps(results, indent=1))
        results["machine"] = machine()
        results["sdp_time_limit"] = args.sdp_time_limit
    if args.notes is not None:
        results["notes"] = args.notes
    args.json.write_text(json.dumps(results, indent=1))
    publish(SECTION, render(results), write=not args.no_write)


if __name__ == "__main__":
    main()
