"""Estimators behind one protocol, registered in order of preference."""

from __future__ import annotations

from typing import Callable

from ..config import Settings
from ..errors import InputError, LipcertError
from ..graph import Graph
from ..result import Result
from . import naive, compose, sdp, gram, power, lower  # noqa: F401  (registers, in order of preference)
from .base import ESTIMATORS, SAFETY, Estimator

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


def estimate_all(graph: Graph, settings: Settings, note: Callable[[str], None] | None = None) -> tuple[list[Result], dict[str, str]]:
    """Every registered estimator that applies, in order of preference: (results, skipped), where
    skipped maps a method that does not apply to the reason. A method that fails with a
    LipcertError becomes a result without a value whose status says why, so that one failure does
    not take the others down."""
    results: list[Result] = []
    skipped: dict[str, str] = {}
    for name, est in ESTIMATORS.items():
        reason = est.accepts(graph, settings)
        if reason is not None:
            skipped[name] = reason
            continue
        if note:
            note(f"running {name} ...")
        try:
            results.append(est.run(graph, settings))
        except LipcertError as exc:
            results.append(Result(name, est.kind, settings.norm, None, False, 0.0, status=f"error: {exc.message()}",
                                  model=graph.source, sha256=graph.sha256))
    return results, skipped
