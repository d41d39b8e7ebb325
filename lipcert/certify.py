"""Robustness certificates from proven Lipschitz bounds.

For a classifier with logits f and predicted class y, the class cannot change within

    radius(x) = min_{j != y} (f_y(x) - f_j(x)) / L_yj,

where L_yj is a proven bound on the Lipschitz constant of the margin f_y - f_j. lipcert bounds
each pair separately: with h the network up to its last affine layer W (and p the input norm,
q its dual), |g(x) - g(x')| <= ||W_y - W_j||_q ||h(x) - h(x')||_p <= ||W_y - W_j||_q L_p(h) ||x - x'||_p,
and for l2 also by LipSDP on the network whose last layer is the row difference. The smaller of
the pairwise bound and the global fallback (sqrt(2) L for l2, 2 L for linf, L for l1: the margin
of a vector a moves by at most that times the change of a) is used, so pairwise radii are never
smaller than the global ones.
"""

from __future__ import annotations

import math
import numbers
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import progress
from .budget import Budget, settings_with_deadline
from .config import Settings, check_choice, check_range, normalize_norm
from .data import input_batch, labels_array, load_npz
from .errors import InputError, LipcertError
from .estimators import estimate
from .estimators.base import SAFETY
from .estimators.naive import node_lipschitz_bounds
from .graph import Affine, Graph
from .result import Result, best_proven

DUAL = {"2": 2, "inf": 1, "1": np.inf}
GLOBAL_FACTOR = {"2": math.sqrt(2.0), "inf": 2.0, "1": 1.0}


@dataclass
class PairwiseConstants:
    """Proven bounds K[y, j] on the Lipschitz constant of f_y - f_j (K[y, y] = 0)."""

    norm: str
    matrix: np.ndarray
    global_bound: float  # a proven bound on L of the whole network
    global_method: str
    how: dict[str, str] = field(default_factory=dict)  # per pair "y,j" -> which bound was smaller
    tightened: list[tuple[int, int]] = field(default_factory=list)  # pairs (y < j) solved by pairwise LipSDP
    solves: int = 0  # pairwise LipSDP solves (a pair stopped once it no longer decided a radius may resume)

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "pairwise": self.matrix.tolist(), "global_bound": self.global_bound,
                "global_method": self.global_method, "global_factor": GLOBAL_FACTOR[self.norm], "how": self.how,
                "tightened": [[int(y), int(j)] for y, j in self.tightened], "pair_solves": self.solves}


def _naive_pairwise(graph: Graph, norm: str) -> np.ndarray | None:
    merged = graph.merge_linear()
    last = merged.node(merged.output)
    if not isinstance(last, Affine):
        return None
    W = last.lin.dense()
    if W is None:
        return None
    total, _ = node_lipschitz_bounds(merged, norm)
    inner = total[last.inputs[0]]
    k = W.shape[0]
    out = np.zeros((k, k))
    for y in range(k):
        for j in range(k):
            if y != j:
                out[y, j] = np.linalg.norm(W[y] - W[j], DUAL[norm]) * inner * (1 + SAFETY)
    return out


# Relative duality gap on rho at which a pair's LipSDP stops: the pair's bound is then within
# 1 - sqrt(1 - 0.05) = 2.5% of its LipSDP optimum, so a radius decided by it is at least 97.5% of the
# radius that the optimal pair bounds give. Measured on mnist-net_256x4 (pairs from a cold start):
# 14-15 steps (once 18) instead of 17-19 at 1e-3.
PAIR_TOL = 5e-2
# Relative duality gap of the global LipSDP when pairs follow: its bound is then the fallback of the
# pairs that decide no radius, and within 0.05% of the default tolerance's (a few steps fewer than
# the 22 of mnist-net_256x4 at the default 1e-6).
GLOBAL_TOL = 1e-3
# A point is settled when its radius is at least this fraction of the radius that optimal LipSDP
# bounds of every pair would give (bounded from above with the solvers' dual bounds); <= the
# sqrt(1 - PAIR_TOL) = 0.975 that a pair solved to PAIR_TOL reaches.
SETTLE = 0.96
# A pair that decides again later resumes from its own multipliers, its start rho this factor above
# theirs (instead of lipcert-fast's START_FACTOR, which gives half the progress back).
RESUME_FACTOR = 1.1


def _cheap_constants(graph: Graph, norm: str, glob: Result) -> PairwiseConstants:
    """The naive pairwise constants and the global fallback, whichever is smaller per pair."""
    k = graph.output_dim
    best = np.full((k, k), GLOBAL_FACTOR[norm] * glob.value)
    np.fill_diagonal(best, 0.0)
    label = f"{GLOBAL_FACTOR[norm]:.4g} x L ({glob.method})"
    how = {f"{y},{j}": label for y in range(k) for j in range(k) if y != j}
    naive = _naive_pairwise(graph, norm)
    if naive is not None:
        for y in range(k):
            for j in range(k):
                if y != j and naive[y, j] < best[y, j]:
                    best[y, j], how[f"{y},{j}"] = naive[y, j], "naive pairwise"
    return PairwiseConstants(norm, best, glob.value, glob.method, how)


def binding_pairs(matrix: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """The pairs (y, j), y < j, that decide some point's radius under the constants ``matrix``:
    for a correctly classified point of class y with positive margins, every j that attains
    min_j (f_y - f_j) / K[y, j]; mapped to the indices of the points they bind."""
    out: dict[tuple[int, int], list[int]] = {}
    predicted = logits.argmax(1)
    for i, (row, y, label) in enumerate(zip(logits, predicted, labels)):
        if y != label:
            continue  # misclassified: radius 0 whatever the constants
        margins = row[y] - row
        margins[y] = np.inf
        if margins.min() <= 0:
            continue  # a tie: radius 0 whatever the constants
        with np.errstate(divide="ignore"):
            ratios = np.where(np.arange(len(row)) == y, np.inf, margins / matrix[y])
        for j in np.flatnonzero(ratios == ratios.min()):
            y_, j_ = int(y), int(j)
            out.setdefault((min(y_, j_), max(y_, j_)), []).append(i)
    return out


def pairwise_constants(graph: Graph, norm: str = "2", method: str = "sdp", settings: Settings | None = None,
                       proven: list[Result] | None = None, *, points: tuple[np.ndarray, np.ndarray] | None = None,
                       budget: Budget | float | None = None, jobs: int | None = None) -> PairwiseConstants:
    """Proven bounds on the Lipschitz constant of every margin f_y - f_j, once per model.

    Every pair gets the smaller of the naive pairwise bound and the global fallback (a factor
    times a proven global bound). With ``method="sdp"`` and the l2 norm, pairs are then tightened
    by LipSDP on the network whose last layer is the row difference: all of them, or, with
    ``points`` = (logits, labels), only the pairs that decide some point's radius (see
    ``binding_pairs``), one at a time and each only as far as needed, until every point's
    radius is at least SETTLE x the radius of optimal pair bounds (see ``_tighten``).

    ``proven``: results already computed for this graph and norm (e.g. by a report); the best
    proven one is the global bound, instead of solving for it again. ``budget`` (seconds, or a
    ``lipcert.budget.Budget``; None or 0: no limit): LipSDP stops at it with proven, looser values,
    and tightening stops when the next pair would not fit; what was cut is in ``budget.cut``.
    ``jobs``: pairs solved at once in worker processes (None: one per core when a pair's solve
    takes seconds; 1: in this process)."""
    norm = normalize_norm(norm, "pairwise_constants")
    check_choice("pairwise_constants", "method", method, ("sdp", "naive"))
    budget = budget if isinstance(budget, Budget) else Budget(budget)
    s = settings or Settings(norm=norm)
    known = best_proven([r for r in proven or [] if r.norm == norm])
    if method != "sdp" or norm != "2":
        return _cheap_constants(graph, norm, known or estimate(graph, "naive", Settings(norm=norm)))
    from .estimators import ESTIMATORS, sdp
    from .estimators.sdp import PairSolver
    from .sdp.solve import FAST, solver_label

    solver_opts = dict(s.extra.get("solver_opts", {}))
    if solver_label(s) == FAST:
        # pairs start cold (lipcert-fast's layer-wise start): measured on mnist-net_256x4, 17-18 steps
        # to tol 1e-3 where twice the global multipliers (strictly feasible) took 17-58
        solver_opts.setdefault("tol", PAIR_TOL)
    sdp_settings = Settings(norm="2", solver=s.solver, sdp_variant=s.sdp_variant, extra={**s.extra, "solver_opts": solver_opts})
    if ESTIMATORS["sdp"].accepts(graph, sdp_settings) is not None:  # e.g. residual networks
        return _cheap_constants(graph, norm, known or _cheap_global(graph, budget))
    try:
        solver: PairSolver | None = PairSolver(graph, sdp_settings)
    except InputError as exc:  # the output is not a LipSDP section or an affine layer
        progress.note(f"pairwise LipSDP skipped: {exc.message()}")
        solver = None
    from .sdp.pool import jobs_for
    from .sdp.solve import least_solve_seconds

    # one solve of the output section, however early it stops (start and verification): a budget
    # that cannot hold it skips it instead of overrunning
    least = least_solve_seconds(solver.dim) if solver is not None and solver.dim else 0.0
    glob, global_s, global_job = known, 0.0, None
    if glob is None and budget.limited and budget.remaining() < least:
        glob = _cheap_global(graph, budget)
        budget.note_cut(f"LipSDP skipped: one solve of its {solver.dim}-row matrix inequality takes at least about {least:.0f} s, "
                        f"the budget left {budget.remaining():.0f} s")
        return _cheap_constants(graph, norm, glob)
    if glob is None:
        glob = _cheap_global(graph, budget)  # compose: far below LipSDP's chains composed like naive on residual networks
        # the global LipSDP bound: the fallback of every pair not tightened. Half the budget when
        # pairs follow (about one pair's time; at least what one solve needs), all of it when they
        # cannot: large pairs follow only under a budget whose other half holds one pair's least
        # time (cifar_base_kw: 93 s a pair against 150 s in all, so the global gets all of it)
        pairs_follow = solver is not None and (solver.dim < sdp.LONG_DIM or (budget.limited and 2 * least <= budget.remaining()))
        share = 0.5 if pairs_follow else 1.0
        if budget.limited and budget.remaining() > 0:
            share = min(1.0, max(share, least / budget.remaining()))
        start = time.perf_counter()
        # when pairs follow, to GLOBAL_TOL (the bound within 0.05% of `lipcert bound --method sdp`'s,
        # a few steps fewer); else at the default tolerance, the same bound
        global_extra = s.extra
        if pairs_follow and solver_label(s) == FAST and "tol" not in s.extra.get("solver_opts", {}):
            global_extra = {**s.extra, "solver_opts": {**s.extra.get("solver_opts", {}), "tol": GLOBAL_TOL}}
        global_settings = Settings(norm="2", solver=s.solver, sdp_variant=s.sdp_variant, extra=global_extra)
        if budget.limited:
            global_settings = settings_with_deadline(global_settings, budget.deadline(share), budget.remaining() * share)
        if pairs_follow and points is not None and 0 < solver.dim < sdp.LONG_DIM and jobs_for(solver.dim, jobs) > 1:
            # solved in a worker beside the first pairs (chosen from the naive fallback meanwhile);
            # larger problems get the machine to themselves first
            global_job = global_settings
        else:
            full = _global_sdp(graph, solver, global_settings, budget)
            global_s = time.perf_counter() - start
            if full is not None and full < glob.value:
                glob = Result("sdp", "upper", "2", full, True, global_s)
    consts = _cheap_constants(graph, norm, glob)
    if solver is None:
        return consts
    k = graph.output_dim
    if solver.dim >= sdp.LONG_DIM and not budget.limited:
        progress.note(f"pairwise LipSDP skipped: a matrix inequality of {solver.dim} rows per pair takes minutes; "
                      "the global LipSDP bound is used (give --budget SECONDS to tighten pairs within it)")
        return consts
    _tighten(consts, solver, sdp_settings, budget, points, k, global_s, jobs, global_job, least)
    return consts


def _cheap_global(graph: Graph, budget: Budget | None = None) -> Result:
    """The global l2 bound without LipSDP (the fallback when it does not apply or does not fit,
    and the start it must improve on): the smaller of naive and compose (seconds; compose bounds
    residual blocks as blocks: on a CIFAR ResNet-18 126x below naive). Under a budget, compose
    starts no block step after half of what is left."""
    naive = estimate(graph, "naive", Settings(norm="2"))
    settings = Settings(norm="2")
    if budget is not None and budget.limited:
        settings = settings_with_deadline(settings, budget.deadline(0.5))
    try:
        comp = estimate(graph, "compose", settings)
    except LipcertError as exc:
        progress.note(f"compose skipped: {exc.message()}")
        return naive
    return comp if comp.value is not None and naive.value is not None and comp.value < naive.value else naive


GLOBAL = (-1, -1)  # the key of the global LipSDP solve among the pairs in flight


def _global_arrived(consts: PairwiseConstants, value: float | None) -> None:
    """The global LipSDP bound, solved beside the pairs: the fallback of every pair it improves."""
    if value is None or value >= consts.global_bound:
        return
    factor = GLOBAL_FACTOR[consts.norm]
    label = f"{factor:.4g} x L (sdp)"
    consts.global_bound, consts.global_method = value, "sdp"
    k = consts.matrix.shape[0]
    for y in range(k):
        for j in range(k):
            if y != j and factor * value < consts.matrix[y, j]:
                consts.matrix[y, j], consts.how[f"{y},{j}"] = factor * value, label


def _global_sdp(graph: Graph, solver: Any, settings: Settings, budget: Budget) -> float | None:
    """The global LipSDP bound (through the pair solver when there is one: the same sections)."""
    progress.note(f"global LipSDP bound ({_left(budget)}) ...")
    if solver is not None:
        value = solver.last_layer(solver.W, settings)
    else:
        value = estimate(graph, "sdp", settings).value
    if budget.limited and budget.expired():
        budget.note_cut("the global LipSDP stopped early (a proven, looser bound)")
    return value


def _left(budget: Budget) -> str:
    return f"budget: {budget.remaining():.0f} s left" if budget.limited else "no budget limit"


def _tighten(consts: PairwiseConstants, solver: Any, settings: Settings, budget: Budget,
             points: tuple[np.ndarray, np.ndarray] | None, k: int, pair_s: float, jobs: int | None = None,
             global_job: Settings | None = None, least_s: float = 0.0) -> None:
    """Tighten the pairs that matter (all pairs without ``points``) by LipSDP, in place.

    With ``points``, pairs are chosen one at a time. Every solve gives, besides its proven bound K,
    the solver's dual bound on the pair's LipSDP optimum (no LipSDP multipliers prove less); so for
    a point, r_up = min_j margin_j / dual_j bounds the radius that optimal LipSDP bounds of all
    pairs would give. A point is settled when its radius is at least SETTLE x r_up. The pair that
    decides the radius of the most unsettled points is solved next: to PAIR_TOL, or only until
    its bound settles those points (lipcert-fast's ``target``) when they have an r_up already; a
    pair stopped at a target resumes from its own multipliers if it decides again. A pair solved
    to PAIR_TOL settles the points it decides (sqrt(1 - PAIR_TOL) >= SETTLE), so the loop ends, and
    then every radius is at least SETTLE x the optimal pairs' radius (the dual bounds are the
    solver's floating-point claims: they decide when to stop, never a reported value).

    ``jobs`` pairs are solved at once, in worker processes (``lipcert.sdp.pool``; None: one per
    core for pair problems of seconds, see ``jobs_for``): the next pair is chosen whenever one
    finishes, from what is known then. ``global_job``: the settings of the global LipSDP, solved
    in a worker beside the first pairs; its bound replaces the fallback when it arrives. Under a
    budget, no pair starts with less than ``least_s`` (one solve's least time) or half a typical
    pair's time left."""
    from .sdp.pool import done_future, jobs_for, pool_or_none

    times: list[float] = [pair_s] if pair_s > 0 else []
    n_jobs = jobs_for(solver.dim, jobs) if solver.dim else 1
    all_pairs = [(y, j) for y in range(k) for j in range(y + 1, k)]
    if points is not None:
        logits, labels = points
    lower = np.zeros_like(consts.matrix)  # dual bounds on each pair's LipSDP optimum (0: none yet)
    final: set[tuple[int, int]] = set()  # solved to PAIR_TOL (or as far as the solver got)
    resume: dict[tuple[int, int], list[np.ndarray]] = {}
    inflight: dict[tuple[int, int], tuple[Any, float]] = {}  # pair -> (future, start time)
    name = "pairwise LipSDP" + (f" ({n_jobs} at once)" if n_jobs > 1 else "")
    with progress.bar(name, 1) as bar, pool_or_none(n_jobs) as pool:
        redraw = lambda *_: bar.update(consts.solves, eta=_eta(times, len(todo), budget, n_jobs))  # noqa: E731

        def submit(pair: tuple[int, int], opts: dict[str, Any]):
            pair_settings = _pair_settings(settings, budget, redraw, opts)
            if pool is None:
                return done_future(lambda: (solver.pair(*pair, pair_settings), solver.solved))
            return pool.submit(solver.output_problem(np.atleast_2d(solver.W[pair[0]] - solver.W[pair[1]])), pair_settings)

        if global_job is not None and pool is not None:
            progress.note(f"global LipSDP bound, beside the first pairs ({_left(budget)}) ...")
            inflight[GLOBAL] = (pool.submit(solver.output_problem(solver.W), global_job), time.perf_counter())
        while True:
            if points is None:
                todo = {p: [] for p in all_pairs if p not in final and p not in inflight}
            else:
                binding = _unsettled(consts.matrix, lower, logits, labels)
                todo = {p: idx for p, idx in binding.items() if p not in final and p not in inflight}
            bar.total = max(consts.solves + len(todo) + len(inflight), 1)
            bar.update(consts.solves, eta=_eta(times, len(todo) + len(inflight), budget, n_jobs))
            typical = float(np.median(times)) if times else 0.0
            if budget.limited and (budget.expired() or budget.remaining() < max(0.5 * typical, least_s)):
                if not inflight:
                    if todo:
                        what = "that decide radii " if points is not None else ""
                        budget.note_cut(f"pairwise LipSDP: {len(todo)} pair(s) {what}were not tightened")
                    return
                todo = {}
            if not todo and not inflight:
                return
            while todo and len(inflight) < n_jobs:
                # the pair that decides the most points first: a point's radius moves only once every
                # competitor LipSDP would bring below it is tightened (on mnist-net_256x4: all nine, for 14 of its 15 images),
                # and a pair serves the points of both its classes (measured against finishing the
                # points with the fewest competitors left, or the furthest below their expected
                # radius, in a replay of 45 measured pair solves: as many or more points finished)
                (y, j), idx = max(todo.items(), key=lambda kv: (len(kv[1]), -kv[0][0], -kv[0][1]))
                del todo[(y, j)]
                opts: dict[str, Any] = {}
                if points is not None:
                    target = _settle_value(consts.matrix, lower, logits, (y, j), idx)
                    if target > 0:
                        opts["target"] = target
                    if (y, j) in resume:
                        opts.update(init=resume[(y, j)], start_factor=RESUME_FACTOR)
                inflight[(y, j)] = (submit((y, j), opts), time.perf_counter())
            (y, j) = _first_done(inflight)
            fut, start = inflight.pop((y, j))
            if (y, j) == GLOBAL:
                solved = fut.result()
                _global_arrived(consts, solver.compose(solved))
                if solved.solver_status == "time_limit":
                    budget.note_cut("the global LipSDP stopped early (a proven, looser bound)")
                continue
            if pool is None:
                value, solved = fut.result()
            else:
                solved = fut.result()
                value = solver.compose(solved)
            times.append(time.perf_counter() - start)
            consts.solves += 1
            if (y, j) not in consts.tightened:
                consts.tightened.append((y, j))
            improved = value is not None and value < consts.matrix[y, j]
            if improved:
                consts.matrix[y, j] = consts.matrix[j, y] = value
                consts.how[f"{y},{j}"] = consts.how[f"{j},{y}"] = "LipSDP pairwise"
            low = _dual_bound(solved, value)
            at_target = solved is not None and solved.solver_status == "target"
            if low > lower[y, j]:
                lower[y, j] = lower[j, y] = low
            if points is not None and improved and at_target and solved.multipliers is not None:
                resume[(y, j)] = solved.multipliers
            else:
                final.add((y, j))  # solved to PAIR_TOL, or the solver can do no better here
            if budget.limited and budget.expired():
                budget.note_cut("pairwise LipSDP stopped early (proven, looser pair bounds)")


def _first_done(inflight: dict[tuple[int, int], tuple[Any, float]]) -> tuple[int, int]:
    """The in-flight pair whose solve ends first (waiting for it)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    futures = {fut: pair for pair, (fut, _) in inflight.items()}
    done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
    return min(futures[f] for f in done)


def margin_radius(margins: np.ndarray, constants: np.ndarray | float) -> float:
    """min_j margins_j / constants_j: the radius within which no margin can reach 0. A zero
    constant (a margin that does not depend on the input) never flips: inf while its margin is
    positive; a margin at or below 0 gives radius 0 whatever its constant."""
    margins, constants = np.broadcast_arrays(np.asarray(margins, float), np.asarray(constants, float))
    if len(margins) == 0 or np.any(margins <= 0):
        return 0.0
    with np.errstate(divide="ignore"):
        return float(np.min(np.where(constants > 0, margins / np.maximum(constants, 1e-300), np.inf)))


def _margins(row: np.ndarray) -> tuple[int, np.ndarray]:
    y = int(row.argmax())
    margins = row[y] - row
    return y, margins


def _unsettled(matrix: np.ndarray, lower: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """``binding_pairs`` restricted to the points not yet settled: radius < SETTLE x r_up, where
    r_up = min_j margin_j / lower[y, j] (inf while no pair of the point has a dual bound)."""
    out: dict[tuple[int, int], list[int]] = {}
    for pair, idx in binding_pairs(matrix, logits, labels).items():
        keep = []
        for i in idx:
            y, margins = _margins(logits[i])
            others = [c for c in range(len(margins)) if c != y]
            radius = margin_radius(margins[others], matrix[y, others])
            r_up = margin_radius(margins[others], lower[y, others])
            if radius < SETTLE * r_up:
                keep.append(i)
        if keep:
            out[pair] = keep
    return out


def _settle_value(matrix: np.ndarray, lower: np.ndarray, logits: np.ndarray, pair: tuple[int, int], idx: list[int]) -> float:
    """The bound for ``pair`` at which it settles the points ``idx`` (those it decides now): its
    radius margin / K reaches SETTLE x r_up for each; 0 when some point has no r_up yet (the
    pair is then solved to PAIR_TOL)."""
    out = math.inf
    for i in idx:
        y, margins = _margins(logits[i])
        other = pair[1] if pair[0] == y else pair[0]
        others = [c for c in range(len(margins)) if c != y]
        r_up = margin_radius(margins[others], lower[y, others])
        if not math.isfinite(r_up) or r_up <= 0:
            return 0.0
        out = min(out, margins[other] / (SETTLE * r_up))
    return float(out) if math.isfinite(out) else 0.0


def _dual_bound(solved: Any, value: float | None) -> float:
    """A lower bound on the pair's LipSDP optimum in the units of ``value`` (the composed pair
    bound): the solver's dual bound on the output section, scaled as its proven bound was (the
    composition is a product, or a sum with it, so the scaled value stays below the composed
    optimum). 0 when the solver has none."""
    if solved is None or value is None or not solved.value:
        return 0.0
    low = solved.info.get("lower_value")
    if low is None or not math.isfinite(low) or low <= 0:
        return 0.0
    return float(value) * min(float(low) / float(solved.value), 1.0)


def _pair_settings(settings: Settings, budget: Budget, redraw: Any, opts: dict[str, Any] | None = None) -> Settings:
    """One pair's solve: up to the budget's end, redrawing the pairs' bar at each solver step (in
    place of the solver's own status line); ``opts``: more lipcert-fast options (target, init)."""
    from .sdp.solve import FAST, solver_label

    if solver_label(settings) == FAST:
        settings = dataclasses.replace(settings, extra={**settings.extra, "solver_opts": {**settings.extra.get("solver_opts", {}), **(opts or {}), "progress": redraw}})
    return settings_with_deadline(settings, budget.deadline()) if budget.limited else settings


def _eta(times: list[float], left: int, budget: Budget, jobs: int = 1) -> float | None:
    """Seconds left: the median pair time so far times the pairs left (over the pairs solved at
    once), at most the budget left."""
    if not times:
        return None
    eta = float(np.median(times)) * math.ceil(left / max(jobs, 1))
    return min(eta, budget.remaining())


@dataclass
class Certificates:
    """Certified radii for a batch of points."""

    radii: np.ndarray
    predicted: np.ndarray
    labels: np.ndarray
    constants: PairwiseConstants
    global_radii: np.ndarray  # the same radii from the global fallback constant only
    how: list[str] | None = None  # with local=True: which constant certified each point
    pairwise_radii: np.ndarray | None = None  # with local=True: the radii before the local search

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    def certified_accuracy(self, eps: float, global_only: bool = False) -> float:
        """Fraction of points classified correctly with a radius strictly larger than eps (with
        ``global_only``: the radius from the global constant alone)."""
        radii = self.global_radii if global_only else self.radii
        return float(np.mean(self.correct & (radii > eps))) if len(radii) else 0.0

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.radii if dtype is None else self.radii.astype(dtype)


def certified_radius(model: Any, x: Any, label: Any = None, norm: Any = 2, method: str = "sdp",
                     input_shape: tuple[int, ...] | None = None, constants: PairwiseConstants | None = None,
                     proven: list[Result] | None = None, pairs: str = "binding", budget: Budget | float | None = None,
                     settings: Settings | None = None, local: bool = False, jobs: int | None = None) -> Certificates:
    """Certified radii for a batch of inputs ``x`` (shape (N, *input_shape)).

    ``label``: the true classes (None: certify the predicted class). Misclassified points get
    radius 0. ``method``: "sdp" (LipSDP pairwise constants for l2 where it applies, else the naive
    pairwise ones) or "naive". The returned object holds the radii (``np.asarray`` works on it),
    the predictions, and the constants used and how each was obtained. ``constants``: reuse
    constants computed before; ``proven``: results already computed for this model and norm
    (see ``pairwise_constants``). ``pairs``: "binding" tightens by LipSDP only the pairs that
    decide a radius of these points (radii at least SETTLE = 0.96 x those of optimal pair
    bounds; "all" tightens every pair to PAIR_TOL: see ``pairwise_constants``). ``budget``: seconds (None or 0: no limit) or a Budget; what it cut
    is in ``budget.cut``. ``settings``: solver settings for LipSDP (solver, variant, options).
    ``local``: also search, per point, the largest radius r that local constants over the ball
    B(x, r) certify (lipcert.local; dense chains only), and keep the larger radius;
    ``Certificates.how`` then says which constant certified each point. ``jobs``: pairwise
    LipSDP problems solved at once (see ``pairwise_constants``).
    """
    from .load import load

    norm = _check_arguments("certified_radius", norm, method, pairs, budget, jobs)
    graph = load(model, input_shape)  # a Graph comes back as is
    if graph.output_dim < 2:  # a radius is a margin between two classes' scores
        raise InputError(f"certified radii need a classifier with at least 2 outputs (one score per class); this model has {graph.output_dim}",
                         graph.source, "certify a classifier whose output holds one score per class")
    xs = torch.from_numpy(input_batch(graph, x))
    with torch.no_grad():
        logits = graph.forward(xs).reshape(len(xs), -1).numpy()
    predicted = logits.argmax(1)
    labels = predicted.copy() if label is None else labels_array(label, len(xs), "label", graph.source)
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        bad = labels[(labels < 0) | (labels >= logits.shape[1])]
        raise InputError(f"labels must lie in 0..{logits.shape[1] - 1} (one per output of the model); {bad.size} label(s) do not, "
                         f"such as {int(bad[0])}", graph.source, "check the labels: class indices counted from 0 (1-based labels: give y - 1)")
    if constants is not None and (constants.norm != norm or constants.matrix.shape != (logits.shape[1],) * 2):
        raise InputError(f"the constants given are for the {constants.norm} norm and {len(constants.matrix)} classes, "
                         f"not the {norm} norm and {logits.shape[1]} classes", graph.source,
                         "pass constants computed by pairwise_constants for this model and norm")
    consts = constants or pairwise_constants(graph, norm, method, settings, proven=proven, budget=budget,
                                             points=(logits, labels) if pairs == "binding" else None, jobs=jobs)
    radii, global_radii = np.zeros(len(xs)), np.zeros(len(xs))
    gfactor = GLOBAL_FACTOR[norm] * consts.global_bound
    for i, (row, y) in enumerate(zip(logits, predicted)):
        if labels[i] != y:
            continue  # misclassified: radius 0
        others = [j for j in range(len(row)) if j != y]
        margins = np.array([row[y] - row[j] for j in others])
        radii[i] = margin_radius(margins, consts.matrix[y, others])
        global_radii[i] = margin_radius(margins, gfactor)
    how, before = None, None
    if local:  # local constants over the ball itself (lipcert/local.py)
        from .local import local_radii

        before = radii.copy()
        with progress.bar("local radii", len(xs)) as bar:
            radii, how = local_radii(graph, xs.numpy(), labels, logits, norm, radii, on_point=lambda i: bar.update(i + 1))
    return Certificates(radii, predicted, labels, consts, global_radii, how, before)


def _check_arguments(func: str, norm: Any, method: str, pairs: str, budget: Any, jobs: Any = None) -> str:
    """The arguments certify and certified_radius pass on, checked under the name the user called
    (the functions they reach would name themselves: pairwise_constants(), Budget()); the norm."""
    check_choice(func, "method", method, ("sdp", "naive"))
    check_choice(func, "pairs", pairs, ("binding", "all"))
    if budget is not None and not isinstance(budget, Budget):
        check_range(func, "budget", budget, 0.0, kind=float)
    if jobs is not None:
        check_range(func, "jobs", jobs, 1)
    return normalize_norm(norm, func)


def load_dataset(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An .npz file with inputs ``x`` and integer labels ``y``."""
    x, y = load_npz(path, labels=True)
    assert y is not None
    return x, y


def certify(model: Any, x: Any, y: Any, eps: list[float] | None = None, norm: Any = 2, method: str = "sdp",
            input_shape: tuple[int, ...] | None = None, proven: list[Result] | None = None,
            budget: Budget | float | None = None, settings: Settings | None = None, pairs: str = "binding",
            local: bool = False, jobs: int | None = None) -> dict[str, Any]:
    """Certified radii and certified accuracy of a data set, as a JSON-ready dict. ``proven``:
    results already computed for this model and norm (see ``pairwise_constants``); ``budget``,
    ``settings``, ``pairs``, ``local``, ``jobs``: see ``certified_radius``."""
    from .load import load

    _check_arguments("certify", norm, method, pairs, budget, jobs)
    for e in eps or []:  # a NaN radius would give a certified accuracy of 0 at "nan"
        if not (isinstance(e, numbers.Real) and math.isfinite(e) and e >= 0):
            raise InputError(f"The 'eps' parameter of certify() must hold finite numbers >= 0. Got {e!r} instead.")
    graph = load(model, input_shape)  # a Graph comes back as is
    certs = certified_radius(graph, x, y, norm=norm, method=method, proven=proven, budget=budget, settings=settings,
                             pairs=pairs, local=local, jobs=jobs)
    eps = sorted(eps) if eps else []
    finite = certs.radii[np.isfinite(certs.radii)]  # inf: a margin no perturbation changes (L_yj = 0)
    top = float(finite.max()) if len(finite) else 0.0
    grid = np.linspace(0.0, top * 1.05 if top > 0 else 1.0, 41)
    return {
        "norm": certs.constants.norm,
        "points": [{"index": i, "label": int(l), "predicted": int(p), "radius": float(r), "certified": bool(l == p and r > 0)}
                   for i, (l, p, r) in enumerate(zip(certs.labels, certs.predicted, certs.radii))],
        "clean_accuracy": float(np.mean(certs.correct)),
        "certified_accuracy": {str(e): certs.certified_accuracy(e) for e in eps},
        "curve": {"radius": grid.tolist(), "certified_accuracy": [certs.certified_accuracy(r) for r in grid]},
        "global_curve": [certs.certified_accuracy(r, global_only=True) for r in grid],
        "lipschitz": certs.constants.to_dict(),
        **({"local": True, "how": certs.how, "pairwise_radii": certs.pairwise_radii.tolist()} if certs.how is not None else {}),
    }
