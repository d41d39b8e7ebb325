"""Progress reporting on stderr: a bar when stderr is a terminal, silent otherwise or when quiet."""

from __future__ import annotations

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
