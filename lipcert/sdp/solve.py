"""Solving one LipSDP problem: lipcert's interior-point solver (``fast``) or a generic cvxpy
solver proposes multipliers, and ``problem.verify`` proves what they are worth in float64 (the
only value ever reported). Solver choice and checks, time limits from a budget's deadline, the
status line of long solves, and the record of every attempt."""

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
from typing import Any

import numpy as np

from .. import progress
from ..config import Settings
from ..errors import InputError
from .problem import LipSDPProblem, Verified, layer_scales, scaled, unscale_multipliers, verify

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
        from . import fast  # noqa: F401
    except ImportError:
        return False
    return True


def installed_sdp_solvers() -> list[str]:
    """The installed cvxpy solvers that can solve LipSDP (not OSQP, GLPK, ...), best first."""
    installed = installed_solvers()
    return [name for name in SOLVER_PREFERENCE if name in installed]


def default_solver() -> str:
    """The best installed generic cvxpy solver for LipSDP."""
    sdp = installed_sdp_solvers()
    if sdp:
        return sdp[0]
    raise InputError("no SDP solver is installed for cvxpy", None, "pip install sdpa-python (or cvxopt, clarabel, scs)")


def check_solver(solver: str | None) -> str | None:
    """The canonical solver name for ``--solver`` (None: automatic), or InputError listing the choices."""
    if solver is None:
        return None
    if solver.lower() in (FAST, "fast"):
        if not fast_solver_available():
            raise InputError("solver 'lipcert-fast' is not available in this installation", None, f"choose one of: {', '.join(installed_sdp_solvers())}")
        return FAST
    name = solver.upper()
    sdp = installed_sdp_solvers()
    if name not in sdp:
        choices = ", ".join([FAST] * fast_solver_available() + sdp)
        why = "cannot solve semidefinite programs (LipSDP)" if name in installed_solvers() else "is not installed for cvxpy"
        raise InputError(f"solver {solver!r} {why}", None, f"choose one of: {choices}")
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
    # C(lambda) = C0 + sum_i lambda_i C_i, block-tridiagonal (lipcert.sdp.problem.LipSDPProblem.assemble)
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
    try:
        return unscale_multipliers(values, c), info
    except OverflowError:
        info["status"] = "the layer norms span more decades than float64 holds: the multipliers overflow"
        return None, info


def _propose(problem: LipSDPProblem, variant: str, solver: str, opts: dict[str, Any]) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    if solver != FAST:
        return solve_cvxpy(problem, variant, solver, opts)
    from . import fast as lipsdp_fast

    try:
        return lipsdp_fast.solve(problem, variant=variant, **opts)
    except MemoryError:
        return None, {"status": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - a solver bug must end in a failed status, not a crash
        return None, {"status": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}


def _attempt(problem: LipSDPProblem, variant: str, solver: str, opts: dict[str, Any], deadline: float | None = None) -> Solved:
    """Propose multipliers with ``solver``, then verify them (verify_best, until ``deadline``)."""
    start = time.perf_counter()
    lams, info = _propose(problem, variant, solver, opts)
    solver_status = str(info.get("status", "unknown"))
    solver_value = info.get("solver_value")
    solved_at = time.perf_counter()
    if lams is None:
        return Solved(None, solver_value, f"solver_failed: {solver} returned no multipliers (status {solver_status})", solver, solver_status, solved_at - start, 0.0, info)
    checked = verify_best(problem, lams, info.get("interior"), deadline)
    done = time.perf_counter()
    if not checked.ok:
        return Solved(None, solver_value, f"not_verified: {solver} (status {solver_status}): {checked.reason}", solver, solver_status, done - start, done - solved_at, info)
    info = {**info, "verification": checked.reason}
    return Solved(checked.value, solver_value, "ok", solver, solver_status, done - start, done - solved_at, info, multipliers=lams)


# the margin on rho below which a verified value is as good as the solver's (tol 1e-6 on rho)
GOOD_MARGIN = 1e-7
INTERIOR_STEPS = (1e-6, 1e-5, 1e-4, 1e-3)


def verify_best(problem: LipSDPProblem, lams: list[np.ndarray], interior: list[np.ndarray] | None = None,
                deadline: float | None = None) -> Verified:
    """verify(lams), and where the proof needed more than a tiny margin, multipliers moved a little
    toward a strictly feasible ``interior`` point; the smallest verified value wins. Past
    ``deadline`` (a time.perf_counter() value) no further point is tried once one is proven: each
    is a float64 proof (7 s at cifar10_small's 5640 rows; five of them took 36 s of a 120 s budget).

    An interior-point solver ends where the matrix inequality is nearly singular, also in hidden
    directions that no margin on rho can repair; the float64 proof then needs rho 1e-5..1e-3
    larger (seen on MNIST 256x2). lambda_t = (1 - t) lambda + t interior is feasible for
    (1 - t) rho + t rho_interior (the feasible set is convex) and keeps t times the interior
    point's distance from singularity, which the proof can see."""
    def good(v: Verified) -> bool:
        return v.ok and v.margin is not None and v.margin <= GOOD_MARGIN

    best = verify(problem, lams)
    if interior is None:
        return best
    lams = [np.asarray(v, np.float64) for v in lams]
    for t in INTERIOR_STEPS:
        if good(best) or (best.ok and deadline is not None and time.perf_counter() >= deadline):
            break
        moved = [(1.0 - t) * a + t * np.asarray(b, np.float64) for a, b in zip(lams, interior)]
        cand = verify(problem, moved)
        if cand.ok and (not best.ok or cand.value < best.value):
            best = dataclasses.replace(cand, reason=f"{cand.reason}, after moving the multipliers {t:g} of the way to the solver's interior start")
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
    deadline = settings.extra.get("deadline")
    if problem.dim < PROGRESS_DIM or "progress" in opts:
        return _attempt(problem, variant, FAST, opts, deadline)
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

        return _attempt(problem, variant, FAST, {**opts, "progress": report}, deadline)


def _fast_opts(opts: dict[str, Any], settings: Settings, dim: int = 0) -> dict[str, Any]:
    """lipcert-fast's options, with the user's time limit (``--time-limit``) when one is set, and
    the time left before ``settings.extra["deadline"]`` (a ``time.perf_counter()`` value set by a
    budget, see lipcert/budget.py), less the time the float64 verification will take."""
    if "time_limit" in opts:
        return opts
    from .fast import default_threads

    limits = [float(v) for v in [settings.extra.get("fast_time_limit")] if v]
    deadline = settings.extra.get("deadline")
    if deadline is not None:
        limits.append(max(float(deadline) - time.perf_counter() - verify_seconds(dim, default_threads(dim)), 0.0))
    return {**opts, "time_limit": min(limits)} if limits else opts


# Seconds per (rows)^3 of lipcert-fast's start (layer-wise multipliers, a centred S^-1: about two
# steps) on this project's machine: 0.7 s a step at 1808 rows (mnist-net_256x4).
START_S_PER_ROW3 = 2.4e-10
# Seconds per (rows)^3 of verify_best on this project's machine (2 cores, one busy): 0.78 s at 1808
# rows (mnist-net_256x4), 14 s at 6244 (cifar_base_kw) with the dense proof; the constant fits the
# smaller one, which over-estimates the larger: a budget keeps this much time back for the proof.
# The block proof (2026-12-04) takes 0.45 s and 9 s there; the constant was kept: smaller ones
# shrank certify's global LipSDP share on cifar_base_kw until it stopped at its start.
VERIFY_S_PER_ROW3 = 1.4e-10


# Speed-up on t BLAS threads over one: t ** THREAD_EXPONENT (cifar_base_kw, 6244 rows, 2 cores:
# 18.5 s a solver step instead of 32 s, 1.73x; 2 ** 0.8 = 1.74)
THREAD_EXPONENT = 0.8


def verify_seconds(dim: int, threads: int = 1) -> float:
    """A rough (generous) estimate of the float64 verification time of a ``dim``-row LipSDP on
    ``threads`` BLAS threads."""
    return VERIFY_S_PER_ROW3 * float(dim) ** 3 / max(1, threads) ** THREAD_EXPONENT


def least_solve_seconds(dim: int, threads: int = 1) -> float:
    """A rough estimate of the least time one lipcert-fast solve of ``dim`` rows takes on
    ``threads`` BLAS threads, however early it stops: its start (about two steps) and its float64
    verification."""
    return START_S_PER_ROW3 * float(dim) ** 3 / max(1, threads) ** THREAD_EXPONENT + verify_seconds(dim, threads)


def _attempt_record(s: Solved) -> dict[str, Any]:
    return {"solver": s.solver, "status": s.status, "solver_status": s.solver_status, "solver_value": s.solver_value,
            "verified_value": s.value, "time_s": s.time_s, "verify_time_s": s.verify_time_s,
            # lower_value: the solver's dual bound (sqrt); no multipliers of this variant prove less
            **{k: v for k, v in s.info.items() if k in ("iterations", "gap", "lower_value", "restarted", "dropped")}}
