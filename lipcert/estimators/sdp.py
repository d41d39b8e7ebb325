"""LipSDP (Fazlyab et al. 2019): the tightest proven l2 bound lipcert computes.

The network is cut into sections: maximal runs of affine layers and slope-restricted activations
in which each node feeds only the next. Every run with an activation becomes one LipSDP problem
(see lipcert/sdp/problem.py); everything else (max-pooling, residual sums, concatenations, lone affine
layers) keeps its own exact constant, and the sections are composed as in the naive bound
(products along chains, sums over branches). A solver only proposes multipliers: a section's bound
is what ``verify`` proves for them in float64, whatever the solver reported.

Solvers (lipcert/sdp/solve.py): ``settings.solver`` None uses lipcert's structured solver (lipcert.sdp.fast) when it imports,
falling back to the best installed generic cvxpy solver for small problems; a cvxpy solver name
(or "lipcert-fast") forces that solver.
"""

from __future__ import annotations

import dataclasses
import logging
import time
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
from ..sdp.problem import LipSDPProblem, problem_from_graph
from ..sdp.solve import (
    CVXPY_MAX_DIM, LMI_MAX_DIM, LONG_DIM, Solved, check_solver, fast_solver_available, least_solve_seconds, solve_problem, solver_label,
)

log = logging.getLogger(__name__)


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


def _linear_norm_below(problem: LipSDPProblem, iterations: int = 30) -> float:
    """||W_l B_{l-1} W_{l-1} ... B_0 W_0|| from below (B_k = diag(betas[k])) by power iteration
    (its value is ||A v|| for a unit v, at most ||A||), less a hair for rounding."""
    import torch

    from .power import power_iteration

    ws = [torch.from_numpy(np.asarray(w, np.float64)) for w in problem.weights]
    bs = [torch.from_numpy(np.asarray(b, np.float64)) for b in problem.betas]

    def apply(v: torch.Tensor) -> torch.Tensor:  # a batch of inputs, one per row
        for k, w in enumerate(ws):
            v = v @ w.T
            if k < len(bs):
                v = v * bs[k]
        return v

    def adjoint(u: torch.Tensor) -> torch.Tensor:
        for k in range(len(ws) - 1, -1, -1):
            if k < len(bs):
                u = u * bs[k]
            u = u @ ws[k]
        return u

    sigma, _ = power_iteration(apply, adjoint, (problem.widths[0],), iterations)
    return sigma * (1.0 - 1e-9)


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
        section's start (about two solver steps) and its float64 verification (see verify_seconds),
        on the BLAS threads the solver takes for its size (lipcert.sdp.fast.default_threads)."""
        from ..sdp.fast import default_threads

        _, sections = plan(graph)
        return sum(least_solve_seconds(s.problem.dim, default_threads(s.problem.dim)) for s in sections if s.problem is not None)

    floor_means = "the norm of its sections' linear parts with every activation at its top slope, composed"

    def floor(self, graph: Graph, settings: Settings) -> float:
        """A value no run can go below, in well under a second: LipSDP's certificate also holds for
        the linear network with every activation at its upper slope (such a map meets every
        neuron's slope constraint), so each section's bound is at least that network's norm (here
        from below, by power iteration), and run() composes the sections monotonically. 0 with
        sorting layers (run() may report the plain product there). A budget skips LipSDP when this
        is not below a proven bound it already has (resnet_2b: 364.1 against compose's 169.9)."""
        if any(isinstance(n, Sort) for n in graph.nodes):
            return 0.0
        merged, sections = plan(graph)
        bounds = {s.nodes[-1].name: (_linear_norm_below(s.problem), "") for s in sections if s.problem is not None}
        return _compose(merged, sections, bounds)[0] if bounds else 0.0

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
        if self._others() is None:
            return None
        if self.out_section.problem is None:
            return self._composed(float(np.linalg.norm(rows, 2)) * (1.0 + SAFETY))
        return self.compose(solve_problem(self.output_problem(rows), settings or self.settings))

    def output_problem(self, rows: np.ndarray) -> LipSDPProblem:
        """The output section's LipSDP problem with last linear map ``rows`` (to be solved elsewhere,
        e.g. in a worker process, and handed to ``compose``)."""
        assert self.out_section.problem is not None, "the output is a lone affine layer: use last_layer"
        return self.out_section.problem.with_last(rows)

    def compose(self, solved: Solved) -> float | None:
        """The proven bound of the whole network from a solve of ``output_problem`` (the other
        sections are solved here on first use)."""
        self.solved = solved
        if solved.multipliers is not None:
            self.multipliers = solved.multipliers
        return None if solved.value is None or self._others() is None else self._composed(solved.value)

    def _composed(self, value: float) -> float:
        assert self._bounds is not None
        return _compose(self.merged, self.sections, {**self._bounds, self.last.name: (value, "pairwise")})[0]
