"""LipSDP problems solved side by side in worker processes (certify's pairwise constants).

The solver runs one BLAS thread below ``lipcert.sdp.fast.PARALLEL_DIM`` rows (many threads
spin-wait on a shared machine), so a machine with several cores is used by solving several problems
at once, one per process. Workers are spawned (not forked: torch's thread pools do not survive a
fork) with one BLAS thread each; a worker's start costs about 3 s (importing torch), so pools are
only worth it for problems whose solve takes seconds (``jobs_for``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import sys
import time
import types
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable

from ..budget import settings_with_deadline
from ..config import Settings
from .problem import LipSDPProblem

# below this many rows a solve takes about a second or less: one process
PARALLEL_DIM = 1000
# at most this many workers when the caller does not say (memory grows with each)
MAX_AUTO_JOBS = 4
# memory of one worker: the interpreter with torch, and about this many d x d float64 matrices
WORKER_BASE_BYTES = 400e6
WORKER_MATRICES = 16
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _available_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def jobs_for(dim: int, jobs: int | None = None) -> int:
    """How many problems of ``dim`` rows to solve at once: ``jobs`` when given, else one per core
    (at most MAX_AUTO_JOBS, and as many as the available memory holds) for problems of at least
    PARALLEL_DIM rows, one below."""
    if jobs is not None:
        return max(1, int(jobs))
    if dim < PARALLEL_DIM:
        return 1
    n = min(cores(), MAX_AUTO_JOBS)
    avail = _available_bytes()
    if avail is not None:
        n = min(n, int(avail // (WORKER_BASE_BYTES + WORKER_MATRICES * 8.0 * dim * dim)))
    return max(1, n)


def _solve_job(problem: LipSDPProblem, settings: Settings, seconds_left: float | None):
    from .solve import solve_problem

    if seconds_left is not None:  # deadlines are perf_counter values, which are per process
        settings = settings_with_deadline(settings, time.perf_counter() + seconds_left)
    return solve_problem(problem, settings)


class SolvePool:
    """``submit(problem, settings)`` -> a Future of ``lipcert.sdp.solve.solve_problem``'s Solved,
    run in one of ``jobs`` worker processes. Progress callbacks are dropped (they cannot cross
    processes) and a deadline in ``settings`` is passed on as the seconds left."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None
        self._env: dict[str, str | None] = {}

    def __enter__(self) -> "SolvePool":
        # the workers inherit the environment at their start: one BLAS thread each
        self._env = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"))
        # Start every worker now, with the caller's __main__ hidden: a spawned process otherwise
        # re-runs the caller's script first (a script without `if __name__ == "__main__":` would
        # then start its work again in each worker, and fail); the workers need nothing from it.
        # An executor starts one process per task submitted while none is idle.
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            started = [self._pool.submit(int) for _ in range(self.jobs)]
        finally:
            if main is not None:
                sys.modules["__main__"] = main
        for fut in started:
            fut.result()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True, cancel_futures=True)
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def submit(self, problem: LipSDPProblem, settings: Settings) -> Future:
        assert self._pool is not None, "use SolvePool as a context manager"
        extra = dict(settings.extra)
        deadline = extra.pop("deadline", None)
        opts = dict(extra.get("solver_opts", {}))
        opts["progress"] = None  # no status line from a worker either
        extra["solver_opts"] = opts
        worker_settings = dataclasses.replace(settings, extra=extra)
        left = None if deadline is None else max(deadline - time.perf_counter(), 0.0)
        return self._pool.submit(_solve_job, problem, worker_settings, left)


def done_future(fn: Callable[[], Any]) -> Future:
    """A Future that already holds ``fn()`` (the one-process path of the same loop)."""
    fut: Future = Future()
    try:
        fut.set_result(fn())
    except Exception as exc:  # re-raised by .result(), as a worker's would be
        fut.set_exception(exc)
    return fut


@contextlib.contextmanager
def pool_or_none(jobs: int):
    """A SolvePool for jobs > 1, else None."""
    if jobs <= 1:
        yield None
        return
    with SolvePool(jobs) as pool:
        yield pool
