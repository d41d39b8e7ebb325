"""A wall-clock budget shared by the steps of one command (``--budget SECONDS``).

A step asks for its share of what is left (``share``) and passes the resulting deadline to the
work that can stop early with a proven result: LipSDP stops its solver at the deadline and proves
the bound of the multipliers it has (sdp.py reads ``settings.extra["deadline"]``); certify stops
tightening pairwise constants. Work that cannot stop early (naive, Gram, power, the lower-bound
search: seconds at most) runs first, so that its time is not taken from a slow step's share. Every
cut is recorded (``cut``), so that the output can say what was cut and how to get more.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .config import check_range

DEFAULT_BUDGET_S = 120.0
# certify's default: its pairwise LipSDP is one solve per class pair. On mnist-net_256x4 (45 pairs of
# 1280 rows, 2 cores, 2026-12-05) the pairs that decide the 15 images' radii settle (every radius
# at least 96% of that of optimal pair bounds) after about 127 s; at 120 s one to three of them were
# cut and their points kept 0.6 of their radius. Networks that settle sooner end sooner.
CERTIFY_BUDGET_S = 150.0


@dataclass
class Budget:
    """``seconds``: the allowance (None or 0: no limit), counted from construction."""

    seconds: float | None = DEFAULT_BUDGET_S
    start: float = field(default_factory=time.perf_counter)
    cut: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.seconds is not None:
            check_range("Budget", "seconds", self.seconds, 0.0, kind=float)
            if self.seconds == 0:
                self.seconds = None

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left (inf without a limit; never negative)."""
        return math.inf if self.seconds is None else max(self.seconds - self.elapsed(), 0.0)

    def deadline(self, fraction: float = 1.0) -> float | None:
        """A ``time.perf_counter()`` value: now plus ``fraction`` of what is left (None: no limit)."""
        return None if self.seconds is None else time.perf_counter() + fraction * self.remaining()

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def child(self, fraction: float) -> "Budget":
        """A budget of ``fraction`` of what is left, whose cuts are recorded here too."""
        return Budget(None if self.seconds is None else max(fraction * self.remaining(), 1e-3), cut=self.cut)

    def note_cut(self, what: str) -> None:
        """Record that ``what`` was cut short by the budget (said once in the output)."""
        if what not in self.cut:
            self.cut.append(what)

    def advice(self) -> str:
        """One sentence on how to get more than the budget allowed."""
        if self.seconds is None:
            return "no budget limit was set; --time-limit or a solver limit cut this short"
        more = f"{max(4 * self.seconds, 600):.0f}"
        return f"the {self.seconds:g} s budget cut this short; for tighter results give --budget {more} (or --budget 0: no limit)"


def settings_with_deadline(settings, deadline: float | None, share_s: float | None = None):
    """A copy of ``settings`` whose LipSDP solves stop at ``deadline`` (a perf_counter value)."""
    import dataclasses

    if deadline is None:
        return settings
    extra = {**settings.extra, "deadline": deadline}
    if share_s is not None:
        extra["budget_s"] = round(share_s, 1)
    return dataclasses.replace(settings, extra=extra)
