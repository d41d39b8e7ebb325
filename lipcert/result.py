"""The one result type every estimator returns, and its JSON form."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["upper", "estimate", "lower"]
KINDS: tuple[str, ...] = ("upper", "estimate", "lower")


@dataclass
class LayerNorm:
    """One node's contribution to a per-layer bound."""

    name: str
    op: str
    value: float
    exact: bool  # True: the exact operator norm; False: a proven upper bound on it
    how: str  # e.g. "svd", "max row sum", "dense svd", "fft bound", "slope"
    cumulative: float | None = None  # proven bound from the network input to this node's output


@dataclass
class Result:
    """A bound on the Lipschitz constant, with everything needed to reproduce it.

    ``kind`` is ``"upper"`` for a proven upper bound (then ``certified`` is True unless the
    verification failed), ``"estimate"`` for a number that is neither (power iteration), and
    ``"lower"`` for a lower bound that comes with a ``witness``.  ``value`` is None when the
    method failed; ``status`` then says why.
    """

    method: str
    kind: Kind
    norm: str  # "2", "inf" or "1"
    value: float | None
    certified: bool
    time_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerNorm] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    status: str = "ok"
    model: str | None = None
    sha256: str | None = None
    witness: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Result.kind must be one of {KINDS}, got {self.kind!r}")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError(f"Result.value must be finite or None, got {self.value!r}")
        if self.certified and self.kind == "estimate":
            raise ValueError("an estimate can never be certified")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        value = "failed" if self.value is None else f"{self.value:.6g}"
        tag = "proven" if self.certified else ("witnessed" if self.kind == "lower" else "estimate")
        return f"{self.method} ({self.kind}, l{self.norm}, {tag}): {value}"


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples into plain JSON types."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def best_proven(results: list[Result]) -> Result | None:
    """The result with the smallest proven upper bound, if any."""
    proven = [r for r in results if r.kind == "upper" and r.certified and r.value is not None]
    return min(proven, key=lambda r: r.value) if proven else None
