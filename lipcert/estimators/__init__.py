"""Estimators behind one protocol, registered in order of preference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..config import Settings
from ..errors import InputError, LipcertError
from ..graph import Graph
from ..result import Result
from . import naive, compose, sdp, widesdp, gram, power, lower  # noqa: F401  (registers, in order of preference)
from .base import ESTIMATORS, SAFETY, Estimator

if TYPE_CHECKING:
    from ..budget import Budget

__all__ = ["ESTIMATORS", "SAFETY", "Estimator", "estimate", "estimate_all"]


def estimate(graph: Graph, method: str, settings: Settings) -> Result:
    """Run one registered estimator, after checking that it applies."""
    if method not in ESTIMATORS:
        raise InputError(f"The 'method' parameter of bound() must be one of {{{', '.join(ESTIMATORS)}}}. Got {method!r} instead.")
    est = ESTIMATORS[method]
    reason = est.accepts(graph, settings)
    if reason is not None:
        raise InputError(f"method '{method}' does not apply to this model: {reason}", graph.source)
    return est.run(graph, settings)


# the part of the time left that a method which finishes on its own may take before the parts
# of it that can stop early do (the others, and the methods that stop at a deadline, share the rest)
EARLY_SHARE = 0.5


def estimate_all(graph: Graph, settings: Settings, note: Callable[[str], None] | None = None,
                 budget: "Budget | None" = None) -> tuple[list[Result], dict[str, str]]:
    """Every registered estimator that applies, in order of preference: (results, skipped), where
    skipped maps a method that does not apply to the reason. A method that fails with a
    LipcertError becomes a result without a value whose status says why, so that one failure does
    not take the others down.

    ``budget`` (lipcert.budget.Budget): methods that can stop early with a proven value (LipSDP)
    run after the others and share what is left of the budget, those that can stop at once first
    (sdp-wide, then LipSDP, which gets what sdp-wide leaves; gram, whose ``budget_weight`` is 0,
    last, with what they leave); one whose least time is more than its share is skipped, with
    the reason, and so is one whose ``floor`` (a value none of its runs goes below) is not below a
    proven bound already found."""
    from ..budget import settings_with_deadline

    results: dict[str, Result] = {}
    skipped: dict[str, str] = {}
    accepted = []
    for name, est in ESTIMATORS.items():
        reason = est.accepts(graph, settings)
        if reason is not None:
            skipped[name] = reason
        else:
            accepted.append((name, est))
    # the methods that stop at a deadline last, so that the others' time is not taken from them,
    # the one that can stop soonest first (what it leaves goes to the next: on cifar_base_kw,
    # sdp-wide takes 3 s of its half, LipSDP needs 53 s); those with a budget weight of 0 (gram) last
    def weight(est) -> float:
        return float(getattr(est, "budget_weight", 1.0)) if getattr(est, "stops_early", False) else 0.0

    early = [a for a in accepted if not getattr(a[1], "stops_early", False)]
    late = [a for a in accepted if a not in early]
    least = {name: _least_seconds(est, graph, settings) for name, est in late} if budget is not None and budget.limited else {}
    order = early + sorted(late, key=lambda a: (weight(a[1]) == 0, least.get(a[0], 0.0)))
    for i, (name, est) in enumerate(order):
        run_settings = settings
        if budget is not None and budget.limited and (reason := _cannot_beat(est, graph, settings, results)) is not None:
            skipped[name] = reason
            continue
        if budget is not None and budget.limited and getattr(est, "stops_early", False):
            weights_left = sum(weight(e) for _, e in order[i:])  # this one and those after it
            fraction = weight(est) / weights_left if weight(est) > 0 else 1.0
            share = budget.remaining() * fraction
            need = least[name]
            if need > share:
                why = (f"the budget leaves {share:.0f} s and it needs at least about {need:.0f} s here" if share >= 1
                       else f"the {budget.seconds:g} s budget was spent before it could start")
                skipped[name] = f"{why} (give --budget {max(10 * need, 600):.0f}, or --budget 0 for no limit)"
                budget.note_cut(f"{name} skipped")
                continue
            run_settings = settings_with_deadline(settings, budget.deadline(fraction), share)
        elif budget is not None and budget.limited:
            # the methods that finish on their own still get a deadline, for the parts that can end
            # early (the lower-bound search's ascent, compose's multiplier search after pooling):
            # on a loaded machine they took 98 s and 128 s of a 60 s budget
            run_settings = settings_with_deadline(settings, budget.deadline(EARLY_SHARE))
        if note:
            note(f"running {name} ..." + (f" (budget: {budget.remaining():.0f} s left)" if budget is not None and budget.limited else ""))
        try:
            results[name] = est.run(graph, run_settings)
        except LipcertError as exc:
            results[name] = Result(name, est.kind, settings.norm, None, False, 0.0, status=f"error: {exc.message()}",
                                   model=graph.source, sha256=graph.sha256)
        if budget is not None and budget.limited and was_cut(results[name]):
            budget.note_cut(cut_note(results[name]))
    return [results[name] for name in ESTIMATORS if name in results], skipped


def _cannot_beat(est, graph: Graph, settings: Settings, results: dict[str, Result]) -> str | None:
    """Why ``est`` cannot improve on the proven upper bounds in ``results`` (its ``floor``, a value
    none of its runs goes below, is not below the best of them), or None."""
    proven = [r for r in results.values() if r.kind == "upper" and r.certified and r.value is not None]
    if not hasattr(est, "floor") or not proven:
        return None
    best = min(proven, key=lambda r: r.value)
    floor = est.floor(graph, settings)
    if floor < best.value:
        return None
    return (f"it cannot beat {best.method}'s proven {best.value:.6g} here: its bound is at least {floor:.6g} "
            f"({getattr(est, 'floor_means', 'its least possible value')}); --budget 0 runs it anyway")


def _least_seconds(est, graph: Graph, settings: Settings) -> float:
    """The least time a run of ``est`` takes however early it stops (0 where it can stop at once)."""
    return est.min_seconds(graph, settings) if hasattr(est, "min_seconds") else 0.0


def cut_note(result: Result) -> str:
    """What the budget's cut of ``result`` means, for the budget's notes."""
    return f"{result.method} stopped early ({'a witnessed, smaller lower bound' if result.kind == 'lower' else 'a proven, looser bound'})"


def was_cut(result: Result) -> bool:
    """Whether a LipSDP solve (or sdp-wide's multiplier search, or gram's exact route) in ``result``
    stopped at its time limit."""
    return (any(s.get("solver_status") == "time_limit" for s in result.details.get("sections", []))
            or any(w.get("stopped_at_limit") for w in result.details.get("wide_sdp", []))
            or bool(result.details.get("exact_route_cut"))
            or bool(result.details.get("stopped_at_deadline")))
