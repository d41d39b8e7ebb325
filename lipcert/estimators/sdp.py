"""LipSDP (Fazlyab et al. 2019): the tightest proven l2 bound lipcert computes.

The network is cut into runs of affine layers and slope-restricted activations; every run with an
activation becomes one LipSDP problem (see sdp_problem.py), the rest (max-pooling, residual sums,
concatenations) is composed as in the naive bound. A solver only proposes multipliers: the bound
is what ``verify`` proves for them in float64, whatever the solver reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import InputError
from ..graph import Activation, Affine, Graph, Node
from ..result import LayerNorm, Result
from .base import SAFETY, register
from .naive import node_lipschitz_bounds
from .sdp_problem import LipSDPProblem, layer_scales, problem_from_graph, scaled, unscale_multipliers, verify

# Generic solvers in order of preference, by measurement on this machine (issue #3: a 208 x 208
# LipSDP-Neuron problem took 5 s with SDPA, 11.5 s with CVXOPT, 410 s with SCS, 750 s with Clarabel).
# SDPA is fastest but reports optimal_inaccurate even on easy problems and prints to stdout from
# C code; CVXOPT is the default generic solver.
SOLVER_PREFERENCE = ("CVXOPT", "SDPA", "CLARABEL", "SCS")
# Largest matrix inequality (rows) handed to a generic cvxpy solver by default: CVXOPT needs
# about 150 s at 448 rows on this machine (models/cnn_bars.onnx); pass --solver to go beyond.
CVXPY_MAX_DIM = 300


def installed_solvers() -> list[str]:
    import cvxpy as cp

    return list(cp.installed_solvers())


def default_solver() -> str:
    installed = installed_solvers()
    for name in SOLVER_PREFERENCE:
        if name in installed:
            return name
    raise InputError("no SDP solver is installed for cvxpy", None, "pip install clarabel (or scs, cvxopt, sdpa-python)")


def fast_solver_available() -> bool:
    try:
        from . import lipsdp_fast  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class Solved:
    """One LipSDP solve: the solver's claim and what was proven from it."""

    value: float | None  # verified bound (None when it failed)
    solver_value: float | None
    status: str
    solver: str
    time_s: float
    reason: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _quiet_solver():
    """Solvers print from C code: send file descriptor 1 to stderr so stdout stays clean JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def solve_cvxpy(problem: LipSDPProblem, variant: str, solver: str, opts: dict[str, Any] | None = None) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    """Solve the layer-normalised LipSDP with cvxpy; return the original problem's multipliers."""
    import cvxpy as cp

    c = layer_scales(problem)
    p = scaled(problem, c)
    widths = p.widths
    lams = [cp.Variable(n, nonneg=True) if variant == "neuron" else cp.Variable(nonneg=True) for n in widths[1:]]
    rho = cp.Variable(nonneg=True)
    L = len(widths)
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
    info: dict[str, Any] = {"solver": solver, "dim": p.dim, "multipliers": sum(widths[1:]) if variant == "neuron" else L - 1}
    try:
        with _quiet_solver():
            prob.solve(solver=solver, **(opts or {}))
    except cp.error.SolverError as exc:
        info["status"] = f"solver_error: {str(exc)[:200]}"
        return None, info
    except MemoryError:
        info["status"] = "out_of_memory"
        return None, info
    info["status"] = str(prob.status)
    if rho.value is not None:
        info["solver_value"] = math.sqrt(max(float(rho.value), 0.0)) * float(np.prod(c))
    if prob.status not in ("optimal", "optimal_inaccurate") or any(lam.value is None for lam in lams):
        return None, info
    values = [np.broadcast_to(np.asarray(lam.value, np.float64), (n,)).copy() for lam, n in zip(lams, widths[1:])]
    return unscale_multipliers(values, c), info


def solve_problem(problem: LipSDPProblem, settings: Settings) -> Solved:
    """Propose multipliers with the chosen solver, then verify them in float64."""
    start = time.perf_counter()
    variant = settings.sdp_variant
    opts = dict(settings.extra.get("solver_opts", {}))
    if settings.solver is None and fast_solver_available():
        from . import lipsdp_fast

        name = "lipcert-fast"
        lams, info = lipsdp_fast.solve(problem, variant=variant, **opts)
    else:
        name = (settings.solver or default_solver()).upper()
        if name not in installed_solvers():
            raise InputError(f"solver {settings.solver!r} is not installed for cvxpy", None, f"choose one of: {', '.join(installed_solvers())}")
        if settings.solver is None and problem.dim > CVXPY_MAX_DIM:
            return Solved(None, None, "too_large", name, time.perf_counter() - start, f"matrix inequality of size {problem.dim} > {CVXPY_MAX_DIM} for a generic solver")
        lams, info = solve_cvxpy(problem, variant, name, opts)
    elapsed = time.perf_counter() - start
    status = str(info.get("status", "unknown"))
    if lams is None:
        return Solved(None, info.get("solver_value"), f"solver_failed: {status}", name, elapsed, f"{name} returned no multipliers (status {status})", info)
    checked = verify(problem, lams)
    elapsed = time.perf_counter() - start
    if not checked.ok:
        return Solved(None, info.get("solver_value"), f"not_verified: {checked.reason}", name, elapsed, checked.reason, info)
    info["verification"] = checked.reason
    return Solved(checked.value, info.get("solver_value"), "ok" if status == "optimal" else f"ok ({status}; multipliers verified)", name, elapsed, "", info)


def _runs(graph: Graph) -> list[list[Node]]:
    """Maximal chains of affine/activation nodes in which each node feeds only the next."""
    consumers = graph.consumers()
    runs: list[list[Node]] = []
    for n in graph.nodes:
        if isinstance(n, (Affine, Activation)):
            if runs and runs[-1] and isinstance(runs[-1][-1], (Affine, Activation)) and n.inputs == [runs[-1][-1].name] and consumers[runs[-1][-1].name] == [n.name]:
                runs[-1].append(n)
                continue
            runs.append([n])
        else:
            runs.append([n])
    return runs


def _run_problem(run: list[Node], graph: Graph) -> LipSDPProblem | str:
    first = run[0]
    nodes = [dataclasses.replace(first, inputs=[Graph.INPUT])] + run[1:]
    sub = Graph(nodes, graph.shape_of(first.inputs[0]), run[-1].name)
    return problem_from_graph(sub)


def plan(graph: Graph, settings: Settings) -> tuple[Graph, list[tuple[list[Node], LipSDPProblem | str]]]:
    merged = graph.merge_linear()
    return merged, [(run, _run_problem(run, merged) if len(run) > 1 else "single node") for run in _runs(merged)]


@register
class LipSDP:
    name = "sdp"
    kind = "upper"
    description = "LipSDP (neuron or layer multipliers), solver multipliers re-verified in float64; proven l2 bound"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        if settings.norm != "2":
            return "LipSDP bounds the l2 norm only"
        _, sections = plan(graph, settings)
        problems = [p for _, p in sections if isinstance(p, LipSDPProblem)]
        if problems and settings.solver is None and not fast_solver_available() and all(p.dim > CVXPY_MAX_DIM for p in problems):
            return f"every LipSDP section is larger than {CVXPY_MAX_DIM} rows for a generic solver"
        return None

    def run(self, graph: Graph, settings: Settings) -> Result:
        start = time.perf_counter()
        merged, sections = plan(graph, settings)
        section_bound: dict[str, tuple[float, bool, str]] = {}
        details: list[dict[str, Any]] = []
        warnings: list[str] = []
        failed: list[str] = []
        for run, problem in sections:
            if not isinstance(problem, LipSDPProblem):
                continue
            solved = solve_problem(problem, settings)
            details.append({"nodes": [n.name for n in run], "dim": problem.dim, "solver": solved.solver, "status": solved.status,
                            "solver_value": solved.solver_value, "verified_value": solved.value, "time_s": solved.time_s,
                            **{k: v for k, v in solved.info.items() if k in ("iterations", "gap", "multipliers")}})
            if solved.value is None:
                failed.append(f"{run[0].name}..{run[-1].name}: {solved.status}")
                continue
            section_bound[run[-1].name] = (solved.value, False, f"LipSDP-{settings.sdp_variant} over {len(run)} nodes ({solved.solver})")
        if failed:
            status = "failed: " + "; ".join(failed)
            return Result(self.name, "upper", "2", None, False, time.perf_counter() - start, self._settings(settings),
                          warnings=[f"LipSDP failed, no bound is given: {f}" for f in failed], status=status,
                          model=graph.source, sha256=graph.sha256, details={"sections": details})
        in_run = {n.name for run, p in sections if isinstance(p, LipSDPProblem) for n in run}
        # compose: a solved run acts as one node whose constant is its verified bound
        composed_nodes = []
        for run, problem in sections:
            if isinstance(problem, LipSDPProblem):
                composed_nodes.append(_RunNode(name=run[-1].name, op=f"LipSDP[{run[0].name}..{run[-1].name}]", inputs=run[0].inputs, out_shape=run[-1].out_shape, bound=section_bound[run[-1].name]))
            else:
                composed_nodes.extend(run)
        composed = Graph(composed_nodes, merged.input_shape, merged.output)
        total, layers = node_lipschitz_bounds(composed, "2", _section_norm, margin=0.0)
        layers = [LayerNorm(l.name, l.op, l.value * (1 + SAFETY) if l.name not in section_bound else l.value, l.exact, l.how, l.cumulative) for l in layers]
        if not section_bound:
            warnings.append("no activation between linear layers: the bound is the product of exact layer norms")
        elif len(section_bound) > 1 or len(in_run) < len(merged.nodes):
            warnings.append(f"the network was split into {len(sections)} sections; LipSDP bounds {len(section_bound)} of them and the sections' bounds are composed (products along chains, sums over branches)")
        solver_values = [d["solver_value"] for d in details]
        return Result(
            self.name, "upper", "2", _compose_with_margin(composed), True, time.perf_counter() - start, self._settings(settings),
            layers=layers, warnings=warnings, status=details[0]["status"] if len(details) == 1 else "ok",  # noqa: E501
            model=graph.source, sha256=graph.sha256,
            details={"sections": details, "solver_value": solver_values[0] if len(solver_values) == 1 else None},
        )

    @staticmethod
    def _settings(settings: Settings) -> dict[str, Any]:
        return {"variant": settings.sdp_variant, "solver": settings.solver or ("lipcert-fast" if fast_solver_available() else default_solver()), "safety_margin": SAFETY}


@dataclasses.dataclass
class _RunNode(Affine):
    """A solved LipSDP section standing in the composition as one node with a proven constant."""

    bound: tuple[float, bool, str] = (0.0, False, "")

    def lipschitz(self, p: str) -> tuple[float, bool, str]:
        return self.bound


def _section_norm(node: Node, norm: str) -> tuple[float, bool, str]:
    return node.lipschitz(norm)


def _compose_with_margin(composed: Graph) -> float:
    # verified sections already carry their margin; the other nodes get SAFETY like naive
    def norm(node: Node, p: str) -> tuple[float, bool, str]:
        value, exact, how = node.lipschitz(p)
        return (value if isinstance(node, _RunNode) else value * (1 + SAFETY)), exact, how

    total, _ = node_lipschitz_bounds(composed, "2", norm, margin=0.0)
    return total[composed.output]


def pairwise_lipschitz(graph: Graph, pairs: list[tuple[int, int]], settings: Settings) -> dict[tuple[int, int], float | None]:
    """Proven l2 bounds on the Lipschitz constant of f_y - f_j for each pair (y, j), by LipSDP on
    the network with its last layer replaced by the row difference. None where it failed."""
    problem = problem_from_graph(graph)
    if not isinstance(problem, LipSDPProblem):
        raise InputError(f"pairwise LipSDP needs a chain network: {problem}", graph.source)
    out: dict[tuple[int, int], float | None] = {}
    W = problem.weights[-1]
    for y, j in pairs:
        if (j, y) in out:
            out[(y, j)] = out[(j, y)]
            continue
        solved = solve_problem(problem.with_last(W[y] - W[j]), settings)
        out[(y, j)] = solved.value
    return out
