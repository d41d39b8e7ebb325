"""LipSDP at scale: lipcert's structured solver (lipsdp_fast) against cvxpy + SDPA / CVXOPT /
Clarabel, side by side in one run, on small trained MLPs of growing size; then the structured
solver alone on the real networks (ACAS Xu, MNIST 256xk) of ../shared/models.

    python benchmarks/bench_sdp_scale.py                 # everything, writes the RESULTS.md section
    python benchmarks/bench_sdp_scale.py --cap 120       # per-run time cap for the generic solvers
    python benchmarks/bench_sdp_scale.py --only acas     # a subset (mlp, acas, mnist, extra, conv)
    python benchmarks/bench_sdp_scale.py --render        # rewrite the section from the saved JSON

Every run is a separate process (its own peak memory, and a hard time cap for the generic
solvers). Every value in the tables is re-verified in float64 by sdp_problem.verify after the
solver returned. Nothing here is timed in the tests.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the lipcert of this tree, not another install
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import publish  # noqa: E402
MODELS = ROOT.parent / "shared" / "models"
DEFAULT_JSON = Path("/tmp/lipcert_bench_sdp_scale.json")
SECTION = "## LipSDP at scale"
GENERIC = ["SDPA", "CVXOPT", "CLARABEL"]
# a solve that takes less than REPEAT_BELOW seconds is timed REPEATS times (the median is reported):
# single runs of one 0.06 s solve took 0.061 s and 0.11 s on this machine
REPEAT_BELOW = 2.0
REPEATS = 3

# trained MLPs (16 inputs, 10 classes, synthetic data): (name, widths, activation)
MLPS = [
    ("leaky 16-48-48-10", [16, 48, 48, 10], "leaky"),
    ("tanh 16-48-48-10", [16, 48, 48, 10], "tanh"),
    ("leaky 16-64-64-10", [16, 64, 64, 10], "leaky"),
    ("tanh 16-64-64-10", [16, 64, 64, 10], "tanh"),
    ("leaky 16-64-64-64-10", [16, 64, 64, 64, 10], "leaky"),
    ("tanh 16-64-64-64-10", [16, 64, 64, 64, 10], "tanh"),
    ("leaky 16-96x3-10", [16, 96, 96, 96, 10], "leaky"),
    ("leaky 16-128x3-10", [16, 128, 128, 128, 10], "leaky"),
    ("leaky 16-192x3-10", [16, 192, 192, 192, 10], "leaky"),
    ("leaky 16-256x3-10", [16, 256, 256, 256, 10], "leaky"),
]
ACAS = ["ACASXU_run2a_1_1_batch_2000", "ACASXU_run2a_2_3_batch_2000", "ACASXU_run2a_5_9_batch_2000"]
MNIST = ["mnist-net_256x2", "mnist-net_256x4", "mnist-net_256x6"]
EXTRA = ["ffnnSIGMOID__Point_6x200", "mnist_relu_9_200"]
# convolutional networks (oval21), convolutions as dense matrices: the cost of a step grows as d^3
CONV = ["cifar10_small", "cifar_base_kw"]
# the real-network groups, in table order
REAL = {"acas": ACAS, "mnist": MNIST, "extra": EXTRA, "conv": CONV}
# not run: (name, why)
CONV_NOT_RUN = [
    ("cifar_deep_kw", "d = 9828 (8804 after input compression), 6756 neurons: from the d^3 growth of a step, about 4x the time of cifar_base_kw per step, over an hour in all"),
    ("Convnet_avgpool", "d = 24112 (23328 neurons in one layer): one dense d x d matrix is 4.7 GB and the solver keeps several; refused (more than 10000 rows)"),
    ("Convnet_maxpool", "max-pool: split into sections; the first is 24112 rows, refused as above"),
]


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------


def train_mlp(widths: list[int], act: str, seed: int = 0, steps: int = 300) -> list[np.ndarray]:
    """A small MLP trained with Adam on synthetic 10-class data (Gaussian clusters): weights with
    the spread of singular values of a trained net, in a few seconds."""
    import torch

    torch.set_num_threads(1)  # a busy shared machine: spin-waiting threads cost far more than they give
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(widths[-1], widths[0], generator=g) * 2.0
    layers: list[torch.nn.Module] = []
    for k in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[k], widths[k + 1]))
        if k < len(widths) - 2:
            layers.append(torch.nn.LeakyReLU(0.01) if act == "leaky" else torch.nn.Tanh())
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        y = torch.randint(0, widths[-1], (256,), generator=g)
        x = centres[y] + torch.randn(256, widths[0], generator=g)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [m.weight.detach().double().numpy() for m in net if isinstance(m, torch.nn.Linear)]


def load_problem(spec: dict):
    from lipcert.sdp.problem import LipSDPProblem, problem_from_graph

    if spec["kind"] == "mlp":
        data = np.load(spec["path"])
        weights = [data[f"w{k}"] for k in range(len(data.files))]
        a = 0.01 if spec["act"] == "leaky" else 0.0
        return LipSDPProblem(weights, [np.full(w.shape[0], a) for w in weights[:-1]], [np.ones(w.shape[0]) for w in weights[:-1]])
    import lipcert

    return problem_from_graph(lipcert.load(str(MODELS / "vnncomp2021" / f"{spec['name']}.onnx")))


# ---------------------------------------------------------------------------------------------
# one run (in its own process)
# ---------------------------------------------------------------------------------------------


def worker(spec: dict) -> dict:
    from lipcert.sdp import fast as lipsdp_fast
    from lipcert.sdp.solve import verify_best

    problem = load_problem(spec)
    out: dict = {"d": problem.dim, "m": problem.n_hidden}
    _warm_up(spec["method"])
    from lipcert.sdp.solve import solve_cvxpy

    def once():
        t0 = time.perf_counter()
        if spec["method"] == "fast":
            result = lipsdp_fast.solve(problem, spec.get("variant", "neuron"), time_limit=spec.get("time_limit"))
        else:
            result = solve_cvxpy(problem, spec.get("variant", "neuron"), spec["method"])
        return time.perf_counter() - t0, result

    # runs under REPEAT_BELOW seconds are repeated, for every solver alike: the median of REPEATS
    t, (lams, info) = once()
    times = [t]
    while times[0] < REPEAT_BELOW and len(times) < REPEATS:
        t, (lams, info) = once()
        times.append(t)
    if spec["method"] == "fast":
        out.update(iterations=info["iterations"], gap=info["gap"], lower_value=info["lower_value"], start_value=info.get("start_value"), restarted=info.get("restarted"), dropped=info.get("dropped"))
    out["time_s"] = float(np.median(times))
    out["runs"] = len(times)
    out["time_limit"] = spec.get("time_limit")
    out["status"] = str(info.get("status"))
    out["solver_value"] = info.get("solver_value")
    if lams is not None:
        t1 = time.perf_counter()
        v = verify_best(problem, lams, info.get("interior"))  # what `lipcert bound --method sdp` reports
        out["verify_s"] = time.perf_counter() - t1
        out["verified"] = v.value if v.ok else None
        out["verify_reason"] = v.reason
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def _warm_up(method: str) -> None:
    """One tiny solve first, so that library loading (MKL, the cvxpy solver interface) is not
    charged to the first timed solve; the same for every method."""
    from lipcert.sdp.problem import LipSDPProblem

    rng = np.random.default_rng(0)
    tiny = LipSDPProblem([rng.normal(size=(3, 2)), rng.normal(size=(2, 3))], [np.zeros(3)], [np.ones(3)])
    if method == "fast":
        from lipcert.sdp import fast as lipsdp_fast

        lipsdp_fast.solve(tiny)
    else:
        from lipcert.sdp.solve import solve_cvxpy

        solve_cvxpy(tiny, "neuron", method)


def run(spec: dict, cap: float | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"stopped after {cap:.0f} s", "time_s": None, "timeout": True}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": f"crashed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}", "time_s": time.perf_counter() - t0}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def main_run(args) -> None:
    results = json.loads(args.json.read_text()) if args.json.exists() and not args.fresh else {}
    results["machine"] = machine()
    if args.notes:
        results["notes"] = args.notes
    tmp = Path("/tmp/lipcert_bench_nets")
    tmp.mkdir(exist_ok=True)

    def save():
        args.json.write_text(json.dumps(results, indent=1))

    if "mlp" in args.only:
        stopped: dict[str, str] = {}
        mlp = results.setdefault("mlp", {})
        for name, widths, act in MLPS:
            path = tmp / f"{name.replace(' ', '_')}.npz"
            if not path.exists():
                ws = train_mlp(widths, act)
                np.savez(path, **{f"w{k}": w for k, w in enumerate(ws)})
            row = mlp.setdefault(name, {})
            spec = {"kind": "mlp", "path": str(path), "act": act, "name": name}
            if "fast" in args.methods:
                row["fast"] = run({**spec, "method": "fast"}, None)
                print(name, "fast", row["fast"], flush=True)
            for solver in GENERIC:
                if solver not in args.methods:
                    if row.get(solver, {}).get("timeout"):
                        stopped[solver] = f"exceeded {args.cap:.0f} s on {name}"
                    continue
                if solver == "CLARABEL" and act == "tanh":
                    row[solver] = {"status": "not run (time: Clarabel runs on the LeakyReLU nets only)", "time_s": None}
                    continue
                if solver in stopped:
                    row[solver] = {"status": f"not run: {stopped[solver]}", "time_s": None, "skipped": True}
                    continue
                row[solver] = run({**spec, "method": solver}, args.cap)
                print(name, solver, row[solver], flush=True)
                if row[solver].get("timeout"):
                    stopped[solver] = f"exceeded {args.cap:.0f} s on {name}"
            save()
    for group, names in REAL.items():
        if group not in args.only:
            continue
        res = results.setdefault(group, {})
        for name in names:
            if args.nets and name not in args.nets:
                continue
            row = res.setdefault(name, {})
            spec = {"kind": "onnx", "name": name}
            if "fast" in args.methods:
                # conv: what `lipcert bound --method sdp --time-limit T` gives (a proven bound at the stop)
                limit = {"time_limit": args.conv_time_limit} if group == "conv" else {}
                row["fast"] = run({**spec, "method": "fast", **limit}, None)
                print(name, "fast", row["fast"], flush=True)
            if group == "acas" and name == ACAS[0]:  # the generic solvers on one ACAS Xu network
                for solver in [s for s in ("SDPA", "CVXOPT") if s in args.methods]:
                    row[solver] = run({**spec, "method": solver}, args.cap)
                    print(name, solver, row[solver], flush=True)
            save()
    save()


def machine() -> dict:
    import cvxpy
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cvxpy": cvxpy.__version__,
        "load_avg_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d"),
    }


# ---------------------------------------------------------------------------------------------
# the RESULTS.md section
# ---------------------------------------------------------------------------------------------


def _t(r: dict | None) -> str:
    if not r:
        return "-"
    if r.get("time_s") is None:
        return r.get("status", "-")
    return f"{r['time_s']:.3f} s" if r["time_s"] < 1 else f"{r['time_s']:.2f} s"


def _status(r: dict) -> str:
    status = r.get("status")
    if status in (None, "optimal"):
        return ""
    if status == "time_limit" and r.get("time_limit"):
        return f" (stopped at its {r['time_limit']:.0f} s time limit)"
    return f" ({status})"


def _v(r: dict | None) -> float | None:
    if not r:
        return None
    return r.get("verified")


def _fmt(x: float | None, digits: int = 7) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def render(results: dict) -> str:
    ref = json.loads((MODELS / "reference.json").read_text())
    mach = results.get("machine", {})
    out = [SECTION, ""]
    out.append(
        f"Script: `python benchmarks/bench_sdp_scale.py` (date {mach.get('date', '?')}; {mach.get('cores', '?')} cores, "
        f"python {mach.get('python', '?')}, torch {mach.get('torch', '?')}, cvxpy {mach.get('cvxpy', '?')}; "
        f"the machine was shared with other jobs, load average {', '.join(f'{x:.1f}' for x in mach.get('load_avg_at_end', []))} at the end of the run). "
        "Solver `lipcert-fast` is `lipcert.sdp.fast` (primal-dual interior point on the (rho, lambda) "
        "space with the rank-two structure of each multiplier, block-tridiagonal S, rescaled layers; one BLAS thread). "
        "The generic solvers run the project's cvxpy formulation (`lipcert.sdp.solve.solve_cvxpy`, layer-normalised) in separate "
        "processes with a hard time cap. Times are the solver call (problem construction included for cvxpy; "
        f"the median of {REPEATS} runs for every solver when one takes under {REPEAT_BELOW:.0f} s); the "
        "float64 re-verification is not included (its time is listed for the real networks). Every value is "
        "`sqrt(rho)` re-verified in float64 after the solver returned, as `lipcert bound --method sdp` does (`lipcert.sdp.solve.verify_best`: "
        "`sdp_problem.verify`, and for lipcert-fast, multipliers moved 1e-6..1e-3 toward its interior start when the proof "
        "needs a margin). LipSDP-Neuron throughout.",
    )
    if results.get("notes"):  # how this set of results was put together (several invocations)
        out.append("")
        out.append(results["notes"])
    out.append("")
    mlp = results.get("mlp", {})
    if mlp:
        out.append("### Trained MLPs, side by side (LipSDP-Neuron)")
        out.append("")
        out.append("| network | d | multipliers | lipcert-fast | SDPA | CVXOPT | Clarabel | value (lipcert-fast) | rel. diff. to best generic | speed-up vs SDPA | vs CVXOPT | vs Clarabel |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, row in mlp.items():
            fast = row.get("fast", {})
            vf = _v(fast)
            gens = {s: row.get(s) for s in GENERIC}
            gv = [_v(r) for r in gens.values() if _v(r) is not None]
            best = min(gv) if gv else None
            diff = "-" if best is None or vf is None else f"{(vf - best) / best:+.1e}"

            def speed(s):
                r = gens.get(s) or {}
                if fast.get("time_s") is None:
                    return "-"
                if r.get("time_s") is not None:
                    ratio = r["time_s"] / fast["time_s"]
                    return f"{ratio:.1f}x" if ratio < 20 else f"{ratio:.0f}x"
                if r.get("timeout"):
                    return f"> {float(r['status'].split()[2]) / fast['time_s']:.0f}x"
                return "-"

            cells = []
            for s in GENERIC:
                r = gens.get(s) or {}
                cell = _t(r)
                if r.get("time_s") is not None:
                    cell += "" if _v(r) is not None else f" ({r.get('status')}, not verified)"
                cells.append(cell)
            out.append(f"| {name} | {fast.get('d', '-')} | {fast.get('m', '-')} | {_t(fast)} | {' | '.join(cells)} | {_fmt(vf)} | {diff} | {speed('SDPA')} | {speed('CVXOPT')} | {speed('CLARABEL')} |")
        out.append("")
    real = [(g, n, r) for g in REAL for n, r in results.get(g, {}).items()]
    if real:
        out.append("### Real networks (../shared/models), lipcert-fast alone (LipSDP-Neuron)")
        out.append("")
        out.append("| network | d | multipliers | time | iterations | duality gap | peak RSS | verify() | LipSDP bound | layer-wise start | naive | lower (reference) | LipSDP / lower | naive / lower | generic solvers |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for _g, name, row in real:
            r = row.get("fast", {})
            rf = ref.get(f"vnncomp2021/{name}.onnx", {})
            v = _v(r)
            lower, naive = rf.get("lower_l2"), rf.get("naive_l2")
            mult = f"{r.get('m', '-')}" + (f" ({r['dropped']} never read: dropped)" if r.get("dropped") else "")
            gen = "; ".join(f"{s}: {(_t(row[s]) + ', ' + str(row[s].get('status'))) if row[s].get('time_s') is not None else row[s].get('status')}" + ("" if _v(row[s]) is None else f", {_fmt(_v(row[s]))}") for s in ("SDPA", "CVXOPT") if s in row)
            out.append(
                f"| {name} | {r.get('d', '-')} | {mult} | {_t(r)}{_status(r)} | "
                f"{r.get('iterations', '-')}{' (restarted)' if r.get('restarted') else ''} | {_fmt(r.get('gap'), 2)} | "
                f"{_fmt(r.get('peak_rss_mb'), 4)} MB | {'ok' if r.get('verified') else 'rejected'} ({_fmt(r.get('verify_s'), 2)} s) | {_fmt(v)} | {_fmt(r.get('start_value'))} | {_fmt(naive)} | {_fmt(lower)} | "
                f"{'-' if v is None or not lower else f'{v / lower:.3g}'} | {'-' if not naive or not lower else f'{naive / lower:.3g}'} | {gen or '-'} |"
            )
        out.append("")
    if "conv" in results:
        out.append("Convolutional networks not run: " + "; ".join(f"{n}: {why}" for n, why in CONV_NOT_RUN) + ".")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=240.0, help="time cap per generic-solver run, seconds")
    ap.add_argument("--only", default="mlp,acas,mnist,extra", help="comma-separated subset of mlp, acas, mnist, extra, conv (conv: about 2 x --conv-time-limit)")
    ap.add_argument("--conv-time-limit", type=float, default=900.0, help="lipcert-fast's time limit on the convolutional networks, seconds")
    ap.add_argument("--notes", default="", help="a sentence printed under the script line: how the saved results were put together")
    ap.add_argument("--nets", default="", help="comma-separated real networks to run (default: all of the chosen groups)")
    ap.add_argument("--methods", default="fast,SDPA,CVXOPT,CLARABEL", help="which solvers to run (others keep their saved results)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the raw results are kept")
    ap.add_argument("--fresh", action="store_true", help="ignore saved results")
    ap.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from --json")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    args.only = set(args.only.split(","))
    args.methods = set(args.methods.split(","))
    args.nets = set(filter(None, args.nets.split(",")))
    if not args.render:
        main_run(args)
    elif args.notes:  # a provenance sentence for results already saved
        saved = json.loads(args.json.read_text())
        saved["notes"] = args.notes
        args.json.write_text(json.dumps(saved, indent=1))
    text = render(json.loads(args.json.read_text()))
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
