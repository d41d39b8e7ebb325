"""The estimator protocol and registry: one registry, in order of preference."""

from __future__ import annotations

from typing import Callable, Protocol

from ..config import SAFETY, Settings  # noqa: F401  (SAFETY: imported from here by the estimators)
from ..graph import Graph
from ..result import Result



class Estimator(Protocol):
    name: str
    kind: str  # "upper", "estimate" or "lower"
    description: str

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        """None if the method applies to this graph and settings, else the reason it does not."""

    def run(self, graph: Graph, settings: Settings) -> Result:
        """Compute the bound (never raises for a numerical failure: returns a failed Result)."""


ESTIMATORS: dict[str, Estimator] = {}


def register(cls: Callable[[], Estimator]) -> Callable[[], Estimator]:
    inst = cls()
    if inst.name in ESTIMATORS:
        raise RuntimeError(f"estimator {inst.name} registered twice")
    ESTIMATORS[inst.name] = inst
    return cls
