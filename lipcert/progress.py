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


class Bar:
    """A minimal text progress bar; ``update(done)`` redraws it."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.start = label, max(total, 1), time.perf_counter()

    def update(self, done: int) -> None:
        if not _enabled():
            return
        frac = min(done / self.total, 1.0)
        width = 30
        fill = int(width * frac)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} {elapsed:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if _enabled():
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextmanager
def bar(label: str, total: int) -> Iterator[Bar]:
    b = Bar(label, total)
    b.update(0)
    try:
        yield b
    finally:
        b.close()


class Status:
    """A one-line status that redraws in place (a terminal only): ``update(text)``."""

    def __init__(self, label: str) -> None:
        self.label, self.start, self.shown = label, time.perf_counter(), False

    def update(self, text: str) -> None:
        if not _enabled():
            return
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.label}: {text} ({elapsed:.0f} s)\033[K")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown and _enabled():
            sys.stderr.write("\n")
            sys.stderr.flush()


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
