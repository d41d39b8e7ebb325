"""Methods side by side: every registered method on the shipped networks (models/) and the real
networks of ../shared/models, then the LipSDP solvers against each other on the problems a
generic cvxpy solver can take.

    python benchmarks/bench_methods.py                        # both tables, writes RESULTS.md
    python benchmarks/bench_methods.py --cap 60               # per-run time cap (s)
    python benchmarks/bench_methods.py --models spiral,test_  # a subset (substrings of file names)
    python benchmarks/bench_methods.py --no-solvers           # only the methods table
    python benchmarks/bench_methods.py --render               # rewrite the section from the saved JSON

Every (network, method) and (problem, solver) pair runs in its own process with a hard time cap,
so one slow method cannot stall the rest. Upper bounds are proven (re-verified in float64 for
LipSDP), lower bounds come with a witness, "power" is an estimate. Nothing here is timed in the
tests.
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
sys.path.insert(0, str(ROOT))  # benchmark the lipcert of this tree, not another install
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_md import publish  # noqa: E402
SHARED = ROOT.parent / "shared" / "models" / "vnncomp2021"
LOCAL = ROOT / "models"
DEFAULT_JSON = Path("/tmp/lipcert_bench_methods.json")
SECTION = "## Methods side by side"
SOLVERS = ["lipcert-fast", "SDPA", "CVXOPT", "CLARABEL", "SCS"]


def model_files(filters: list[str] | None) -> list[Path]:
    files = sorted(LOCAL.glob("*.onnx")) + sorted(SHARED.glob("*.onnx"))
    return [f for f in files if not filters or any(s in f.name for s in filters)]


def solver_problems(filters: list[str] | None) -> list[str]:
    """Problems small enough for the generic solvers: the shipped networks, the test_* networks,
    a 16-64-64-64-10 LeakyReLU MLP (the 208-row problem of issue #3) and one ACAS Xu net."""
    names = ["models/mlp_spiral.onnx", "models/cnn_bars.onnx", "shared/test_small.onnx", "mlp208", "shared/ACASXU_run2a_1_1_batch_2000.onnx"]
    return [n for n in names if not filters or any(s in n for s in filters)]


# ---------------------------------------------------------------------------------------------
# one run (child process)
# ---------------------------------------------------------------------------------------------


def _graph(name: str):
    import lipcert

    if name == "mlp208":
        import torch

        torch.manual_seed(0)
        layers = []
        for a, b in [(16, 64), (64, 64), (64, 64)]:
            layers += [torch.nn.Linear(a, b), torch.nn.LeakyReLU(0.1)]
        return lipcert.load(torch.nn.Sequential(*layers, torch.nn.Linear(64, 10)), (1, 16))
    if name.startswith("models/"):
        return lipcert.load(LOCAL / name.removeprefix("models/"))
    if name.startswith("shared/"):
        return lipcert.load(SHARED / name.removeprefix("shared/"))
    return lipcert.load(name)


def run_method(model: str, method: str) -> dict:
    import lipcert
    from lipcert.config import Settings
    from lipcert.estimators import ESTIMATORS

    t0 = time.perf_counter()
    graph = _graph(model)
    load_s = time.perf_counter() - t0
    reason = ESTIMATORS[method].accepts(graph, Settings())
    if reason is not None:
        return {"status": "n/a", "reason": reason, "load_s": load_s, "input_dim": graph.input_dim}
    r = lipcert.bound(graph, method=method)
    out = {"status": r.status, "value": r.value, "certified": r.certified, "kind": r.kind, "time_s": r.time_s,
           "load_s": load_s, "input_dim": graph.input_dim, "warnings": r.warnings}
    if method == "sdp":
        out["lmi_rows"] = r.details.get("lmi_rows")
        out["solvers"] = sorted({s["solver"] for s in r.details.get("sections", [])})
    return out


def run_solver(model: str, solver: str) -> dict:
    from lipcert.config import Settings
    from lipcert.estimators.sdp import plan
    from lipcert.sdp.solve import solve_problem

    graph = _graph(model)
    problems = [s.problem for s in plan(graph)[1] if s.problem is not None]
    if len(problems) != 1:
        return {"status": "n/a", "reason": f"{len(problems)} LipSDP sections"}
    p = problems[0]
    s = solve_problem(p, Settings(solver=solver))
    return {"status": s.status, "solver_status": s.solver_status, "solver_value": s.solver_value, "value": s.value,
            "time_s": s.time_s, "verify_time_s": s.verify_time_s, "dim": p.dim}


def child(kind: str, model: str, what: str, cap: float) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, model, what]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({cap:g} s)", "wall_s": cap}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"crashed: {tail[:120]}", "wall_s": wall}
    return {**json.loads(lines[-1]), "wall_s": wall}


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _cell(r: dict) -> str:
    if r.get("value") is not None:
        return f"{_fmt(r['value'])} ({r['time_s']:.1f} s)"
    status = r.get("status", "?")
    return "n/a" if status == "n/a" else status.split(":")[0]


def render(data: dict) -> str:
    methods = data["methods"]
    lines = [SECTION, "",
             f"`python benchmarks/bench_methods.py --cap {data['cap']:g}`, {data['date']}, on {data['machine']} "
             f"(load average at the start: {data['load']}). Each cell is the value and the method's own time; every run is a "
             f"separate process capped at {data['cap']:g} s. naive, gram and sdp are proven upper bounds (sdp re-verified in "
             "float64 after the solver), power is an estimate, lower is a witnessed lower bound. "
             "sdp/naive and sdp/lower show how much LipSDP tightens the interval. "
             "n/a: the method refuses the network (reason below).", ""]
    header = ["network", "input", *methods, "sdp / naive", "sdp / lower"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes: dict[str, str] = {}
    for model, row in data["rows"].items():
        cells = [model, str(next((r.get("input_dim") for r in row.values() if r.get("input_dim")), "?"))]
        for m in methods:
            r = row.get(m, {})
            cell = _cell(r)
            if m == "sdp" and r.get("lmi_rows"):
                cell += f" [{'+'.join(map(str, r['lmi_rows']))} rows]"
            if r.get("status") == "n/a":
                notes.setdefault(f"{m}: {r.get('reason', '')}", model)
            cells.append(cell)
        sdp, naive, lower = (row.get(k, {}).get("value") for k in ("sdp", "naive", "lower"))
        cells.append(f"{sdp / naive:.3f}" if sdp and naive else "-")
        cells.append(f"{sdp / lower:.2f}" if sdp and lower else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Refusals (first network each):"]
        lines += [f"- {model}: {text}" for text, model in notes.items()]
    checks = []
    for model, row in data["rows"].items():
        lo, sd, na = (row.get(k, {}).get("value") for k in ("lower", "sdp", "naive"))
        if lo is not None and sd is not None and not lo <= sd * (1 + 1e-12):
            checks.append(f"{model}: lower {lo} > sdp {sd}")
        if sd is not None and na is not None and not sd <= na * (1 + 1e-9):
            checks.append(f"{model}: sdp {sd} > naive {na}")
    lines += ["", "Order check lower <= sdp <= naive: " + ("holds on every network where both ends ran." if not checks else "VIOLATED: " + "; ".join(checks))]
    if data.get("solvers"):
        lines += ["", "### LipSDP solvers on the same problems", "",
                  f"Time to propose multipliers and verify them (LipSDP-Neuron, default options, capped at {data.get('solver_cap', data['cap']):g} s); the solver's own value "
                  "sqrt(rho) and the verified bound. Default order when no --solver is given: lipcert-fast, then SDPA, "
                  "CVXOPT, Clarabel, SCS (generic solvers only up to 500 rows by default).", ""]
        header = ["problem", "rows", *SOLVERS]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, row in data["solvers"].items():
            dim = next((r.get("dim") for r in row.values() if r.get("dim")), "?")
            cells = [model, str(dim)]
            for s in SOLVERS:
                r = row.get(s, {})
                if r.get("value") is not None:
                    cells.append(f"{r['time_s']:.1f} s: {r['value']:.7g}" + (f" ({r['solver_status']})" if r.get("solver_status") not in (None, "optimal") else ""))
                else:
                    cells.append(r.get("status", "-").split(" (")[0][:40])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    mem = next((int(line.split()[1]) / 2**20 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0.0)
    return f"{os.cpu_count()} CPU cores, {mem:.0f} GiB, no GPU used, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=float, default=120.0, help="time cap per method run, seconds")
    ap.add_argument("--solver-cap", type=float, default=120.0, help="time cap per solver run, seconds")
    ap.add_argument("--models", default=None, help="comma-separated substrings of network file names")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    ap.add_argument("--no-solvers", action="store_true", help="skip the solver table")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the raw results go")
    ap.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from --json")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    ap.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, model, what = args.child
        print(json.dumps(run_method(model, what) if kind == "method" else run_solver(model, what)), flush=True)
        return
    if args.render:
        data = json.loads(args.json.read_text())
    else:
        from lipcert.estimators import ESTIMATORS

        filters = args.models.split(",") if args.models else None
        methods = args.methods.split(",") if args.methods else list(ESTIMATORS)
        data = {"cap": args.cap, "solver_cap": args.solver_cap, "date": time.strftime("%Y-%m-%d"), "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
                "machine": _machine(),
                "methods": methods, "rows": {}, "solvers": {}}
        for f in model_files(filters):
            name = f"models/{f.name}" if f.parent == LOCAL else f"shared/{f.name}"
            data["rows"][f.stem] = {}
            for m in methods:
                r = child("method", name, m, args.cap)
                data["rows"][f.stem][m] = r
                print(f"{f.stem:34s} {m:6s} {_cell(r)}", file=sys.stderr, flush=True)
            args.json.write_text(json.dumps(data, indent=1))
        if not args.no_solvers:
            for p in solver_problems(filters):
                data["solvers"][p.split("/")[-1].removesuffix(".onnx")] = row = {}
                for s in SOLVERS:
                    row[s] = r = child("solver", p, s, args.solver_cap)
                    print(f"{p:40s} {s:12s} {r.get('status')} {_fmt(r.get('value'))} {r.get('time_s', r.get('wall_s', 0)):.1f}s", file=sys.stderr, flush=True)
                args.json.write_text(json.dumps(data, indent=1))
    text = render(data)
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
