"""LipSDP (Fazlyab et al. 2019): the tightest proven l2 bound lipcert computes.

The network is cut into sections: maximal runs of affine layers and slope-restricted activations
in which each node feeds only the next. Every run with an activation becomes one LipSDP problem
(see sdp_problem.py); everything else (max-pooling, residual sums, concatenations, lone affine
layers) keeps its own exact constant, and the sections are composed as in the naive bound
(products along chains, sums over branches). A solver only proposes multipliers: a section's bound
is what ``verify`` proves for them in float64, whatever the solver reported.

Solvers: ``settings.solver`` None uses lipcert's structured solver (lipsdp_fast) when it imports,
falling back to the best installed generic cvxpy solver for small problems; a cvxpy solver name
(or "lipcert-fast") forces that solver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import tempfile
import time
import warnings as _warnings
import weakref
from typing import Any

import numpy as np

from .. import progress
from ..config import Settings
from ..errors import InputError
from ..graph import Activation, Affine, Graph, Node, Sort
from ..result import Result
from .base import SAFETY, register
from .naive import node_lipschitz_bounds
from ..graph.rewrite import expand_pair_sorts
from .sdp_problem import LipSDPProblem, Verified, layer_scales, problem_from_graph, scaled, unscale_multipliers, verify

log = logging.getLogger(__name__)

FAST = "lipcert-fast"
# Generic solvers in order of preference, by measurement (issue #3: a 208 x 208 LipSDP-Neuron
# problem took 5 s with SDPA, 11.5 s with CVXOPT, 410 s with SCS, 750 s with Clarabel; re-measured
# in benchmarks/RESULTS.md "Methods side by side"). SDPA reports optimal_inaccurate even on easy
# problems; that is harmless here, because only the verified value of its multipliers is used.
# MOSEK (commercial, not installed here so not measured) comes first when the user has it.
SOLVER_PREFERENCE = ("MOSEK", "SDPA", "CVXOPT", "CLARABEL", "SCS")
# Largest matrix inequality (rows) handed to a generic cvxpy solver by default: models/cnn_bars.onnx
# (448 rows) takes about 1-2 minutes with SDPA or CVXOPT on 2 cores; pass --solver to go beyond.
CVXPY_MAX_DIM = 500
# Largest matrix inequality built densely at all: verification holds a few d x d float64 matrices
# (0.8 GB each at d = 10^4) and factors them; larger sections are refused (accepts()).
LMI_MAX_DIM = 10_000


def installed_solvers() -> list[str]:
    import cvxpy as cp

    return list(cp.installed_solvers())


def fast_solver_available() -> bool:
    try:
        from . import lipsdp_fast  # noqa: F401
    except ImportError:
        return False
    return True


def default_solver() -> str:
    """The best installed generic cvxpy solver for LipSDP."""
    installed = installed_solvers()
    for name in SOLVER_PREFERENCE:
        if name in installed:
            return name
    raise InputError("no SDP solver is installed for cvxpy", None, "pip install sdpa-python (or cvxopt, clarabel, scs)")


def check_solver(solver: str | None) -> str | None:
    """The canonical solver name for ``--solver`` (None: automatic), or InputError listing the choices."""
    if solver is None:
        return None
    if solver.lower() in (FAST, "fast"):
        if not fast_solver_available():
            raise InputError("solver 'lipcert-fast' is not available in this installation", None, f"choose one of: {', '.join(installed_solvers())}")
        return FAST
    name = solver.upper()
    installed = installed_solvers()
    if name not in installed:
        choices = ", ".join([FAST] * fast_solver_available() + installed)
        raise InputError(f"solver {solver!r} is not installed for cvxpy", None, f"choose one of: {choices}")
    return name


def solver_label(settings: Settings) -> str:
    solver = check_solver(settings.solver)
    if solver is not None:
        return solver
    return FAST if fast_solver_available() else default_solver()


# --------------------------------------------------------------------------------------------
# One LipSDP problem: solve, then verify
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Solved:
    """One LipSDP solve: the solver's claim and what was proven from it."""

    value: float | None  # verified bound (None when it failed)
    solver_value: float | None  # sqrt of the solver's rho, in original units: never a bound
    status: str  # "ok", "solver_failed: ...", "not_verified: ...", "too_large: ..."
    solver: str
    solver_status: str
    time_s: float  # solve + verify
    verify_time_s: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    multipliers: list[np.ndarray] | None = None  # the proposed multipliers that were verified (a warm start)


@contextlib.contextmanager
def _quiet_solver():
    """Solvers print from C code (SDPA: "Strange behavior : primal < dual"): capture file
    descriptor 1 in a temporary file, so that stdout stays clean JSON, and log it at debug level."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read(4000).decode(errors="replace").strip()
            if text:
                log.debug("solver output: %s", text)


def solve_cvxpy(problem: LipSDPProblem, variant: str, solver: str, opts: dict[str, Any] | None = None, scale: bool = True) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    """Solve LipSDP with a generic cvxpy solver; return the original problem's multipliers.

    With ``scale`` (the default) every weight is divided by its spectral norm first, which keeps
    the data within a few decades for the solver; rho and the multipliers are mapped back."""
    import cvxpy as cp

    c = layer_scales(problem) if scale else [1.0] * len(problem.weights)
    p = scaled(problem, c)
    widths = p.widths
    lams = [cp.Variable(n, nonneg=True) if variant == "neuron" else cp.Variable(nonneg=True) for n in widths[1:]]
    rho = cp.Variable(nonneg=True)
    L = len(widths)
    # C(lambda) = C0 + sum_i lambda_i C_i, block-tridiagonal (sdp_problem.LipSDPProblem.assemble)
    blocks: list[list[Any]] = [[np.zeros((widths[i], widths[j])) for j in range(L)] for i in range(L)]
    for j in range(1, L):
        W = p.weights[j - 1]
        a, b = p.alphas[j - 1], p.betas[j - 1]
        lam = lams[j - 1] if variant == "neuron" else lams[j - 1] * np.ones(widths[j])
        blocks[j - 1][j - 1] = blocks[j - 1][j - 1] + W.T @ cp.diag(cp.multiply(-2.0 * a * b, lam)) @ W
        cross = W.T @ cp.diag(cp.multiply(a + b, lam))
        blocks[j - 1][j] = blocks[j - 1][j] + cross
        blocks[j][j - 1] = blocks[j][j - 1] + cross.T
        blocks[j][j] = blocks[j][j] + cp.diag(-2.0 * lam)
    Wl = p.weights[-1]
    blocks[L - 1][L - 1] = blocks[L - 1][L - 1] + Wl.T @ Wl
    blocks[0][0] = blocks[0][0] - rho * np.eye(widths[0])
    M = cp.bmat(blocks)
    prob = cp.Problem(cp.Minimize(rho), [(M + M.T) / 2 << 0])
    info: dict[str, Any] = {"status": "not run"}
    try:
        with _quiet_solver():
            prob.solve(solver=solver, **(opts or {}))
    except MemoryError:
        info["status"] = "out of memory"
        return None, info
    except Exception as exc:  # noqa: BLE001 - cvxpy.SolverError, or a solver's own error: a failed solve
        info["status"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        return None, info
    info["status"] = str(prob.status)
    stats = prob.solver_stats
    if stats is not None and stats.num_iters is not None:
        info["iterations"] = int(stats.num_iters)
    if rho.value is not None and np.isfinite(rho.value):
        info["solver_value"] = math.sqrt(max(float(rho.value), 0.0)) * float(np.prod(c))
    if prob.status not in ("optimal", "optimal_inaccurate") or any(lam.value is None for lam in lams):
        return None, info
    values = [np.broadcast_to(np.asarray(lam.value, np.float64), (n,)).copy() for lam, n in zip(lams, widths[1:])]
    return unscale_multipliers(values, c), info


def _propose(problem: LipSDPProblem, variant: str, solver: str, opts: dict[str, Any]) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    if solver != FAST:
        return solve_cvxpy(problem, variant, solver, opts)
    from . import lipsdp_fast

    try:
        return lipsdp_fast.solve(problem, variant=variant, **opts)
    except MemoryError:
        return None, {"status": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - a solver bug must end in a failed status, not a crash
        return None, {"status": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}


def _attempt(problem: LipSDPProblem, variant: str, solver: str, opts: dict[str, Any]) -> Solved:
    start = time.perf_counter()
    lams, info = _propose(problem, variant, solver, opts)
    solver_status = str(info.get("status", "unknown"))
    solver_value = info.get("solver_value")
    solved_at = time.perf_counter()
    if lams is None:
        return Solved(None, solver_value, f"solver_failed: {solver} returned no multipliers (status {solver_status})", solver, solver_status, solved_at - start, 0.0, info)
    checked = verify_best(problem, lams, info.get("interior"))
    done = time.perf_counter()
    if not checked.ok:
        return Solved(None, solver_value, f"not_verified: {solver} (status {solver_status}): {checked.reason}", solver, solver_status, done - start, done - solved_at, info)
    info = {**info, "verification": checked.reason}
    return Solved(checked.value, solver_value, "ok", solver, solver_status, done - start, done - solved_at, info, multipliers=lams)


# the margin on rho below which a verified value is as good as the solver's (tol 1e-6 on rho)
GOOD_MARGIN = 1e-7
INTERIOR_STEPS = (1e-6, 1e-5, 1e-4, 1e-3)


def verify_best(problem: LipSDPProblem, lams: list[np.ndarray], interior: list[np.ndarray] | None = None) -> Verified:
    """verify(lams), and where the proof needed more than a tiny margin, multipliers moved a little
    toward a strictly feasible ``interior`` point; the smallest verified value wins.

    An interior-point solver ends where the matrix inequality is nearly singular, also in hidden
    directions that no margin on rho can repair; the float64 proof then needs rho 1e-5..1e-3
    larger (seen on MNIST 256x2). lambda_t = (1 - t) lambda + t interior is feasible for
    (1 - t) rho + t rho_interior (the feasible set is convex) and keeps t times the interior
    point's distance from singularity, which the proof can see."""
    def good(v: Verified) -> bool:
        return v.ok and v.margin is not None and v.margin <= GOOD_MARGIN

    best = verify(problem, lams)
    if interior is None or good(best):
        return best
    lams = [np.asarray(v, np.float64) for v in lams]
    for t in INTERIOR_STEPS:
        moved = [(1.0 - t) * a + t * np.asarray(b, np.float64) for a, b in zip(lams, interior)]
        cand = verify(problem, moved)
        if cand.ok and (not best.ok or cand.value < best.value):
            best = dataclasses.replace(cand, reason=f"{cand.reason}, after moving the multipliers {t:g} of the way to the solver's interior start")
        if good(best):
            break
    return best


def solve_problem(problem: LipSDPProblem, settings: Settings) -> Solved:
    """Propose multipliers with the chosen solver, then verify them in float64.

    Automatic choice (``settings.solver`` None): the structured solver, and if it fails the best
    generic solver when the problem is small enough for it."""
    variant = settings.sdp_variant
    opts = dict(settings.extra.get("solver_opts", {}))
    forced = check_solver(settings.solver)
    if forced is not None:
        out = _attempt_fast(problem, variant, opts, settings) if forced == FAST else _attempt(problem, variant, forced, opts)
        out.attempts = [_attempt_record(out)]
        return out
    attempts: list[Solved] = []
    if fast_solver_available():
        attempts.append(_attempt_fast(problem, variant, opts, settings))
    if not attempts or attempts[-1].value is None:
        generic = default_solver()
        if problem.dim <= CVXPY_MAX_DIM:
            attempts.append(_attempt(problem, variant, generic, {}))
        elif not attempts:
            attempts.append(Solved(None, None, f"too_large: a matrix inequality of {problem.dim} rows is more than {CVXPY_MAX_DIM} for a generic solver by default", generic, "not run", 0.0))
    out = next((a for a in attempts if a.value is not None), attempts[-1])
    if out.value is None and len(attempts) > 1:
        out = dataclasses.replace(out, status="; ".join(a.status for a in attempts))
    out.attempts = [_attempt_record(a) for a in attempts]
    out.time_s = sum(a.time_s for a in attempts)
    return out


# above this many rows a solve takes seconds: show its progress; above LONG_DIM say it takes minutes
PROGRESS_DIM = 1000
LONG_DIM = 3000


def _attempt_fast(problem: LipSDPProblem, variant: str, opts: dict[str, Any], settings: Settings) -> Solved:
    """lipcert-fast, with a status line (step, value, gap) on large problems."""
    opts = _fast_opts(opts, settings, problem.dim)
    if problem.dim < PROGRESS_DIM or "progress" in opts:
        return _attempt(problem, variant, FAST, opts)
    if problem.dim >= LONG_DIM and not opts.get("time_limit"):
        progress.note(f"LipSDP: a matrix inequality of {problem.dim} rows, {problem.n_hidden} neurons: this takes minutes "
                      "(the cost of a step grows as rows^3); --time-limit SECONDS stops early with a looser, still proven bound")
    eta = progress.ConvergenceEta(float(opts.get("tol", 1e-6)), opts.get("time_limit"))
    with progress.status(f"LipSDP ({problem.dim} rows)") as line:
        def report(it: int, value: float, gap: float) -> None:
            text = f"step {it}, {value:.6g} (not yet verified)"
            text = f"{text}, duality gap {gap:.1e}" if math.isfinite(gap) else text
            left = eta.update(gap)
            line.update(text if left is None else f"{text}, {progress.eta_text(left)}")

        return _attempt(problem, variant, FAST, {**opts, "progress": report})


def _fast_opts(opts: dict[str, Any], settings: Settings, dim: int = 0) -> dict[str, Any]:
    """lipcert-fast's options, with the user's time limit (``--time-limit``) when one is set, and
    the time left before ``settings.extra["deadline"]`` (a ``time.perf_counter()`` value set by a
    budget, see lipcert/budget.py), less the time the float64 verification will take."""
    if "time_limit" in opts:
        return opts
    limits = [float(v) for v in [settings.extra.get("fast_time_limit")] if v]
    deadline = settings.extra.get("deadline")
    if deadline is not None:
        limits.append(max(float(deadline) - time.perf_counter() - verify_seconds(dim), 0.0))
    return {**opts, "time_limit": min(limits)} if limits else opts


def _section_deadline(settings: Settings, section: Section, sections: list[Section]) -> Settings:
    """With a deadline, ``section`` gets the share of the time left that its size (rows^3) has
    among itself and the sections after it, so that a first large section does not take it all."""
    deadline = settings.extra.get("deadline")
    if deadline is None:
        return settings
    after = sections[sections.index(section):]
    weights = [float(s.problem.dim) ** 3 for s in after if s.problem is not None]
    share = float(section.problem.dim) ** 3 / sum(weights) if section.problem is not None and sum(weights) > 0 else 1.0
    now = time.perf_counter()
    return dataclasses.replace(settings, extra={**settings.extra, "deadline": now + share * max(float(deadline) - now, 0.0)})


# Seconds per (rows)^3 of lipcert-fast's start (layer-wise multipliers, a centred S^-1: about two
# steps) on this project's machine: 0.7 s a step at 1808 rows (mnist-net_256x4).
START_S_PER_ROW3 = 2.4e-10
# Seconds per (rows)^3 of verify_best on this project's machine (2 cores, one busy): 0.78 s at 1808
# rows (mnist-net_256x4), 14 s at 6244 (cifar_base_kw); the constant fits the smaller one, which
# over-estimates the larger: a budget keeps this much time back for the proof.
VERIFY_S_PER_ROW3 = 1.4e-10


def verify_seconds(dim: int) -> float:
    """A rough (generous) estimate of the float64 verification time of a ``dim``-row LipSDP."""
    return VERIFY_S_PER_ROW3 * float(dim) ** 3


def _attempt_record(s: Solved) -> dict[str, Any]:
    return {"solver": s.solver, "status": s.status, "solver_status": s.solver_status, "solver_value": s.solver_value,
            "verified_value": s.value, "time_s": s.time_s, "verify_time_s": s.verify_time_s,
            # lower_value: the solver's dual bound (sqrt); no multipliers of this variant prove less
            **{k: v for k, v in s.info.items() if k in ("iterations", "gap", "lower_value", "restarted", "dropped")}}


# --------------------------------------------------------------------------------------------
# Sections of a graph
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Section:
    nodes: list[Node]
    dim: int  # rows of its matrix inequality (0 when it is not a LipSDP section)
    problem: LipSDPProblem | None = None
    reason: str = ""  # why it is not a LipSDP problem

    @property
    def label(self) -> str:
        return self.nodes[0].name if len(self.nodes) == 1 else f"{self.nodes[0].name}..{self.nodes[-1].name}"


def _runs(graph: Graph) -> list[list[Node]]:
    """Maximal chains of affine/activation nodes in which each node feeds only the next."""
    consumers = graph.consumers()
    runs: list[list[Node]] = []
    for n in graph.nodes:
        prev = runs[-1][-1] if runs else None
        if (isinstance(n, (Affine, Activation)) and isinstance(prev, (Affine, Activation)) and n.inputs == [prev.name]
                and consumers[prev.name] == [n.name] and prev.name != graph.output):
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def _section(run: list[Node], graph: Graph) -> Section:
    if len(run) == 1 or not any(isinstance(n, Activation) for n in run):
        return Section(run, 0, reason="no activation between linear maps" if len(run) > 1 else "single node")
    n0 = int(np.prod(graph.shape_of(run[0].inputs[0])))
    dim = n0 + sum(int(np.prod(n.out_shape)) for n in run if isinstance(n, Activation))
    if dim > LMI_MAX_DIM:
        return Section(run, dim, reason=f"its matrix inequality would have {dim} rows (more than {LMI_MAX_DIM})")
    sub = Graph([dataclasses.replace(run[0], inputs=[Graph.INPUT]), *run[1:]], graph.shape_of(run[0].inputs[0]), run[-1].name)
    problem = problem_from_graph(sub)
    if isinstance(problem, str):
        return Section(run, dim, reason=problem)
    return Section(run, problem.dim, problem)


_PLANS: dict[int, tuple[weakref.ref, Graph, list[Section]]] = {}


def plan(graph: Graph) -> tuple[Graph, list[Section]]:
    """The merged graph and its sections (cached for the last graphs seen: accepts() then run())."""
    key = id(graph)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is graph:
        return hit[1], hit[2]
    merged = expand_pair_sorts(graph).merge_linear()  # GroupSort2 / MaxMin as affine, (identity | ReLU), affine
    sections = [_section(run, merged) for run in _runs(merged)]
    if len(_PLANS) >= 2:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (weakref.ref(graph), merged, sections)
    return merged, sections


def _compose(merged: Graph, sections: list[Section], bounds: dict[str, tuple[float, str]]) -> tuple[float, list]:
    """Compose section bounds (keyed by a section's last node) with every other node's exact
    constant (enlarged by SAFETY) over the graph: product along chains, sum over branches."""
    inner = {n.name for s in sections if s.nodes[-1].name in bounds for n in s.nodes[:-1]}

    def node_norm(node: Node, p: str) -> tuple[float, bool, str]:
        if node.name in inner:
            return 1.0, True, "inside a LipSDP section"
        if node.name in bounds:
            value, how = bounds[node.name]
            return value, False, how
        value, exact, how = node.lipschitz(p)
        return value * (1.0 + SAFETY), exact, how

    total, layers = node_lipschitz_bounds(merged, "2", node_norm, margin=0.0)
    return total[merged.output], [layer for layer in layers if layer.name not in inner]


def _check_norm(settings: Settings) -> str | None:
    return None if settings.norm == "2" else "LipSDP bounds the l2 norm only"


@register
class LipSDP:
    name = "sdp"
    kind = "upper"
    description = "LipSDP (neuron or layer multipliers), solver multipliers re-verified in float64; proven l2 bound"
    stops_early = True  # at settings.extra["deadline"], with the proven bound of the multipliers so far

    def min_seconds(self, graph: Graph, settings: Settings) -> float:
        """A rough estimate of the least time a run takes, however early its solves stop: each
        section's start (about two solver steps) and its float64 verification (see verify_seconds)."""
        _, sections = plan(graph)
        return sum(START_S_PER_ROW3 * float(s.problem.dim) ** 3 + verify_seconds(s.problem.dim) for s in sections if s.problem is not None)

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        if (reason := _check_norm(settings)) is not None:
            return reason
        forced = check_solver(settings.solver)
        _, sections = plan(graph)
        for s in sections:
            if s.problem is None and s.dim > 0:
                return f"section {s.label} cannot be posed as LipSDP: {s.reason}"
        if forced is None and not fast_solver_available():
            big = [s for s in sections if s.problem is not None and s.dim > CVXPY_MAX_DIM]
            if big:
                return (f"section {big[0].label} has a matrix inequality of {big[0].dim} rows, more than {CVXPY_MAX_DIM} "
                        "for a generic solver by default (name one with --solver to try anyway)")
        return None

    def run(self, graph: Graph, settings: Settings) -> Result:
        start = time.perf_counter()
        merged, sections = plan(graph)
        if (reason := _check_norm(settings)) is not None:
            raise InputError(reason, graph.source)
        label = solver_label(settings)
        run_settings = {"norm": "2", "variant": settings.sdp_variant, "solver": label, "safety_margin": SAFETY,
                        "solver_opts": dict(settings.extra.get("solver_opts", {})), "time_limit": settings.extra.get("fast_time_limit")}
        if settings.extra.get("budget_s") is not None:  # the share of a --budget this run had
            run_settings["budget_s"] = settings.extra["budget_s"]
        bounds: dict[str, tuple[float, str]] = {}
        records: list[dict[str, Any]] = []
        failures: list[tuple[Section, Solved]] = []
        warnings: list[str] = []
        for s in sections:
            if s.problem is None:
                continue
            solved = solve_problem(s.problem, _section_deadline(settings, s, sections))
            records.append({"section": s.label, "nodes": [n.name for n in s.nodes], "dim": s.problem.dim,
                            "widths": s.problem.widths, "multipliers": s.problem.n_hidden if settings.sdp_variant == "neuron" else len(s.problem.widths) - 1,
                            "solver": solved.solver, "status": solved.status, "solver_status": solved.solver_status,
                            "solver_value": solved.solver_value, "verified_value": solved.value, "time_s": solved.time_s,
                            "verify_time_s": solved.verify_time_s, "verification": solved.info.get("verification", ""),
                            "attempts": solved.attempts})
            if solved.value is None:
                failures.append((s, solved))
                break  # one unproven section leaves the whole network unproven
            if solved.solver_status != "optimal":
                warnings.append(f"{solved.solver} reported '{solved.solver_status}' on section {s.label}: its multipliers were verified "
                                "in float64 and the verified value is the bound (it may be looser than the LipSDP optimum)")
            bounds[s.nodes[-1].name] = (solved.value, f"LipSDP-{settings.sdp_variant} over {len(s.nodes)} nodes ({solved.solver}), verified")
        n_sdp = sum(s.problem is not None for s in sections)
        details: dict[str, Any] = {
            "variant": settings.sdp_variant, "solver": label, "sections": records, "lmi_rows": [r["dim"] for r in records],
            "solver_value": records[0]["solver_value"] if len(records) == 1 else None,
            "verified_value": records[0]["verified_value"] if len(records) == 1 else None,
        }
        if failures:
            failed, solved = failures[0]
            status = solved.status if len(sections) == 1 else f"{solved.status} (section {failed.label})"
            return Result(self.name, "upper", "2", None, False, time.perf_counter() - start, run_settings, status=status,
                          model=graph.source, sha256=graph.sha256, details=details)
        value, layers = _compose(merged, sections, bounds)
        if any(isinstance(n, Sort) for n in graph.nodes):
            # a sort of pairs enters LipSDP through identity neurons (slope [1, 1]) whose matrix
            # inequality is tight in many directions: on a network that is 1-Lipschitz by
            # construction the float64 proof needs a visible margin, and the plain product is smaller
            plain = graph.merge_linear()
            totals, plain_layers = node_lipschitz_bounds(plain, "2")
            product = totals[plain.output]
            if product < value:
                warnings.append(f"the product of the layer norms ({product:.6g}) is smaller than the verified LipSDP bound "
                                f"({value:.6g}) on this network with sorting layers: it is reported")
                value, layers = product, plain_layers
        if n_sdp == 0:
            hows = sorted({layer.how for layer in layers})
            warnings.append(f"no activation between linear layers: the bound is the linear map's norm ({', '.join(hows)}), as in naive")
        elif len(sections) > 1:
            warnings.append(f"the network was split into {len(sections)} sections (residual branches, max-pooling or lone layers); "
                            f"LipSDP bounds {n_sdp} of them and the sections' bounds are composed (products along chains, sums over branches)")
        return Result(self.name, "upper", "2", value, True, time.perf_counter() - start, run_settings, layers=layers,
                      warnings=warnings, status="ok", model=graph.source, sha256=graph.sha256, details=details)


# --------------------------------------------------------------------------------------------
# Pairwise bounds for certificates
# --------------------------------------------------------------------------------------------


def pairwise_lipschitz(graph: Graph, pairs: list[tuple[int, int]], settings: Settings) -> dict[tuple[int, int], float | None]:
    """Proven l2 bounds on the Lipschitz constant of f_y - f_j for each pair (y, j).

    The section that produces the output gets its last linear map replaced by the row difference
    (e_y - e_j)^T W_l and is solved and verified per pair (LipSDP), or, when that section is a
    lone affine layer, takes the exact norm of the row difference; the other sections are bounded
    once and composed as in ``LipSDP.run``. None where no proven bound was found (solver failure);
    InputError when the network's output section admits no pairwise bound (e.g. a residual sum or
    max-pooling produces the output) or a section is too large."""
    solver = PairSolver(graph, settings)
    distinct = len({(min(y, j), max(y, j)) for y, j in pairs if y != j})
    if solver.dim >= LONG_DIM and distinct > 1:
        raise InputError(f"pairwise LipSDP would solve {distinct} matrix inequalities of {solver.dim} rows, "
                         "minutes each; the global LipSDP bound is used instead", graph.source)
    out: dict[tuple[int, int], float | None] = {}
    with progress.bar("pairwise LipSDP", len(pairs)) as bar:
        for done, (y, j) in enumerate(pairs, 1):
            bar.update(done - 1)
            out[(y, j)] = out[(j, y)] if (j, y) in out else solver.pair(y, j)
        bar.update(len(pairs))
    return out


class PairSolver:
    """Proven l2 bounds on the Lipschitz constant of f_y - f_j, one pair at a time (see
    ``pairwise_lipschitz``): the sections that do not produce the output are solved once, on
    first use; ``pair(y, j, settings)`` solves the output section with the row difference."""

    def __init__(self, graph: Graph, settings: Settings) -> None:
        if (reason := LipSDP().accepts(graph, settings)) is not None:
            raise InputError(f"pairwise LipSDP does not apply: {reason}", graph.source)
        self.graph, self.settings = graph, settings
        self.merged, self.sections = plan(graph)
        self.out_section = next(s for s in self.sections if s.nodes[-1].name == self.merged.output)
        last = self.last = self.out_section.nodes[-1]
        if self.out_section.problem is None and not (len(self.out_section.nodes) == 1 and isinstance(last, Affine)):
            raise InputError(f"pairwise bounds need the output to come from a linear layer or a LipSDP section; {last.name} is a {type(last).__name__}", graph.source)
        if self.out_section.problem is None:
            W = last.lin.dense()
            if W is None:
                raise InputError(f"the output layer {last.name} is too large for a dense matrix", graph.source)
        else:
            W = self.out_section.problem.weights[-1]
        self.W = W
        self.n_out = W.shape[0]
        self._bounds: dict[str, tuple[float, str]] | None = None
        self.multipliers: list[np.ndarray] | None = None  # of the output section's last successful solve
        self.solved: Solved | None = None  # the output section's last solve (its solver status, e.g. "target")

    @property
    def dim(self) -> int:
        """Rows of the matrix inequality solved per pair (0: the output is a lone affine layer)."""
        return 0 if self.out_section.problem is None else self.out_section.problem.dim

    def _others(self) -> dict[str, tuple[float, str]] | None:
        if self._bounds is None:
            bounds: dict[str, tuple[float, str]] = {}
            for s in self.sections:
                if s.problem is not None and s is not self.out_section:
                    solved = solve_problem(s.problem, self.settings)
                    if solved.value is None:
                        return None
                    bounds[s.nodes[-1].name] = (solved.value, "LipSDP")
            self._bounds = bounds
        return self._bounds

    def pair(self, y: int, j: int, settings: Settings | None = None) -> float | None:
        """The proven bound for f_y - f_j (0 when y == j; None when no proof was found)."""
        if not (0 <= y < self.n_out and 0 <= j < self.n_out):
            raise InputError(f"class pair {(y, j)} is out of range for {self.n_out} outputs")
        if y == j:
            return 0.0
        return self.last_layer(np.atleast_2d(self.W[y] - self.W[j]), settings)

    def last_layer(self, rows: np.ndarray, settings: Settings | None = None) -> float | None:
        """The proven bound of the network whose last linear map is ``rows`` (e.g. a row difference)."""
        bounds = self._others()
        if bounds is None:
            return None
        if self.out_section.problem is None:
            value: float | None = float(np.linalg.norm(rows, 2)) * (1.0 + SAFETY)
        else:
            solved = self.solved = solve_problem(self.out_section.problem.with_last(rows), settings or self.settings)
            value = solved.value
            if solved.multipliers is not None:
                self.multipliers = solved.multipliers
        if value is None:
            return None
        return _compose(self.merged, self.sections, {**bounds, self.last.name: (value, "pairwise")})[0]
