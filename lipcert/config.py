"""Settings shared by every estimator, and the one parameter-validation message format."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InputError

# Relative safety margin applied to every floating-point norm that enters a proven bound. The
# backward error of an SVD or a sum in float64 is a small multiple of n * 2.2e-16 relative,
# far below 1e-9 for the sizes lipcert builds densely (n <= 1e5).
SAFETY = 1e-9
# float64 machine epsilon, and gamma_k = k eps / (1 - k eps): the relative error bound of a sum or
# dot product of k terms (Higham), used by every float64 proof (Gram matrices, Cholesky checks)
EPS = 2.0**-52


def gamma(k: int) -> float:
    return k * EPS / (1.0 - k * EPS)


def gram_norm_margin(big: int, rank: int) -> float:
    """The factor that covers rounding when a norm is taken as sqrt(lambda_max(W^H W)) with the
    Gram matrix formed in float64 from W (big x rank, big >= rank): its entries move by at most
    (big + 2) eps |W|^H |W|, of norm at most rank ||W||^2; doubled."""
    return 1.0 + 2.0 * (big + 2) * rank * EPS

NORMS = ("2", "inf", "1")


def check_choice(func: str, param: str, value: Any, choices: tuple | list) -> None:
    if value not in choices:
        raise InputError(f"The '{param}' parameter of {func}() must be one of {{{', '.join(map(str, choices))}}}. Got {value!r} instead.")


def check_range(func: str, param: str, value: Any, low: float, high: float = math.inf, kind: type = int) -> None:
    # numbers.Real / Integral: numpy scalars (np.float32(0.1), np.int64(4)) count as numbers too
    if isinstance(value, bool) or not isinstance(value, numbers.Real if kind is float else numbers.Integral) or not low <= value <= high:
        bounds = f"[{low}, {'inf' if high == math.inf else high}]"
        raise InputError(f"The '{param}' parameter of {func}() must be {'an int' if kind is int else 'a number'} in {bounds}. Got {value!r} instead.")


def normalize_norm(norm: Any, func: str = "bound") -> str:
    """Accept 2, '2', 'l2', inf, 'inf', 'linf', 1, '1', 'l1' and return '2', 'inf' or '1'."""
    text = str(norm).lower().removeprefix("l")
    if isinstance(norm, float) and math.isinf(norm):
        text = "inf"
    text = {"2.0": "2", "1.0": "1", "infinity": "inf"}.get(text, text)
    check_choice(func, "norm", text, NORMS)
    return text


@dataclass
class Settings:
    """Everything that decides a result; recorded in ``Result.settings`` for reproduction."""

    norm: str = "2"
    seed: int = 0
    iterations: int = 100  # power / Gram iterations
    solver: str | None = None  # cvxpy solver name for LipSDP
    sdp_variant: str = "neuron"
    device: str = "cpu"
    starts: int | None = None  # lower-bound search starts (None: 64, fewer for large networks)
    steps: int | None = None  # lower-bound ascent steps (None: 200 for dense networks, 50 with convolutions)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.norm = normalize_norm(self.norm, "Settings")
        check_range("Settings", "seed", self.seed, 0)
        check_range("Settings", "iterations", self.iterations, 1)
        if self.starts is not None:
            check_range("Settings", "starts", self.starts, 1)
        if self.steps is not None:
            check_range("Settings", "steps", self.steps, 0)
        check_choice("Settings", "sdp_variant", self.sdp_variant, ("neuron", "layer"))
        check_choice("Settings", "device", self.device, ("cpu", "cuda", "auto"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
