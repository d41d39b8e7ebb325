"""Estimators behind one protocol, registered in order of preference."""

from __future__ import annotations

from ..config import Settings
from ..errors import InputError
from ..graph import Graph
from ..result import Result
from . import naive, sdp, gram, power, lower  # noqa: F401  (registers, in order of preference)
from .base import ESTIMATORS, SAFETY, Estimator

__all__ = ["ESTIMATORS", "SAFETY", "Estimator", "estimate"]


def estimate(graph: Graph, method: str, settings: Settings) -> Result:
    """Run one registered estimator, after checking that it applies."""
    if method not in ESTIMATORS:
        raise InputError(f"The 'method' parameter of bound() must be one of {{{', '.join(ESTIMATORS)}}}. Got {method!r} instead.")
    est = ESTIMATORS[method]
    reason = est.accepts(graph, settings)
    if reason is not None:
        raise InputError(f"method '{method}' does not apply to this model: {reason}", graph.source)
    return est.run(graph, settings)
