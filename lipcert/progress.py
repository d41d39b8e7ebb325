"""Progress reporting on stderr: a bar when stderr is a terminal, silent otherwise or when quiet."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Iterator

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


class _Line:
    """One line on stderr that redraws in place (a terminal only)."""

    def __init__(self, label: str) -> None:
        self.label, self.start, self.shown = label, time.perf_counter(), False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def draw(self, text: str) -> None:
        if not _enabled():
            return
        sys.stderr.write("\r" + text)
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and _enabled():
            sys.stderr.write("\n")
            sys.stderr.flush()


class Bar(_Line):
    """A minimal text progress bar; ``update(done)`` redraws it."""

    def __init__(self, label: str, total: int) -> None:
        super().__init__(label)
        self.total = max(total, 1)

    def update(self, done: int, eta: float | None = None) -> None:
        """Redraw at ``done`` of ``total``; ``eta``: seconds left when the caller knows better than
        the average time per item so far (which is used otherwise)."""
        frac = min(done / self.total, 1.0)
        width = 30
        fill = int(width * frac)
        if eta is None and 0 < done < self.total:
            eta = self.elapsed() / done * (self.total - done)
        left = f", {eta_text(eta)}" if eta is not None and done < self.total else ""
        self.draw(f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {self.elapsed():.1f}s{left}\033[K")


def eta_text(seconds: float) -> str:
    """'about 40 s left', 'about 3 min left'."""
    if seconds < 90:
        return f"about {max(seconds, 1):.0f} s left"
    return f"about {seconds / 60:.0f} min left"


@contextmanager
def bar(label: str, total: int) -> Iterator[Bar]:
    b = Bar(label, total)
    b.update(0)
    try:
        yield b
    finally:
        b.close()


class Status(_Line):
    """A one-line status that redraws in place (a terminal only): ``update(text)``."""

    def update(self, text: str) -> None:
        self.draw(f"{self.label}: {text} ({self.elapsed():.0f} s)\033[K")


@contextmanager
def status(label: str) -> Iterator[Status]:
    s = Status(label)
    try:
        yield s
    finally:
        s.close()


def note(message: str) -> None:
    """A one-line status message on stderr (shown even when not a terminal, unless quiet)."""
    if not _quiet:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


class ConvergenceEta:
    """Time left for an iteration that stops when its gap reaches ``tol`` or at ``limit`` seconds:
    the recent time per step times the steps that the recent rate of decrease of log(gap) still
    needs (an interior-point method shrinks its gap by a roughly steady factor per step); before
    the gap is known, ``typical`` steps in all."""

    def __init__(self, tol: float, limit: float | None = None, typical: int = 25) -> None:
        self.tol, self.limit, self.typical = tol, limit, typical
        self.start = time.perf_counter()
        self.history: list[tuple[float, float]] = []  # (time, gap) per step

    def update(self, gap: float) -> float | None:
        """Record one step's gap; return the estimated seconds left (None: not yet known)."""
        now = time.perf_counter()
        self.history.append((now, gap))
        steps = len(self.history) - 1
        if steps < 1:
            return None
        per_step = (now - self.history[max(0, steps - 3)][0]) / min(steps, 3)
        recent = [(t, g) for t, g in self.history[-4:] if math.isfinite(g) and g > 0]
        left_steps = float(max(self.typical - steps, 1))
        if len(recent) >= 2 and recent[0][1] > recent[-1][1]:
            rate = math.log(recent[0][1] / recent[-1][1]) / (len(recent) - 1)
            left_steps = max(math.log(max(recent[-1][1], self.tol) / self.tol) / rate, 0.0)
        eta = left_steps * per_step
        if self.limit is not None:
            eta = min(eta, max(self.limit - (now - self.start), 0.0))
        return eta
