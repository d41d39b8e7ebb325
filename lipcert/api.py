"""The Python API: load a model, bound its Lipschitz constant."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import Settings, normalize_norm
from .errors import InputError
from .estimators import ESTIMATORS, estimate
from .load import load
from .result import Result


def bound(
    model: Any,
    method: str = "naive",
    norm: Any = 2,
    input_shape: tuple[int, ...] | None = None,
    **settings: Any,
) -> Result:
    """Bound the Lipschitz constant of ``model`` with one method.

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto``, a ``torch.nn.Module`` (give
            ``input_shape``) or a loaded ``Graph``.
        method: a registered estimator (``lipcert.methods()`` lists them), e.g. ``"naive"``.
        norm: 2, "inf" or 1: the vector norm on input and output.
        input_shape: the input shape, batch axis included, when the model does not fix it.
        **settings: further fields of ``lipcert.config.Settings`` (seed, iterations, solver, ...).

    Returns:
        A ``Result``: ``value`` is a proven upper bound when ``kind == "upper"`` and
        ``certified`` is True, an estimate when ``kind == "estimate"``, and a witnessed lower
        bound when ``kind == "lower"``.

    Example:
        >>> import lipcert
        >>> r = lipcert.bound("models/mlp_spiral.onnx", method="naive", norm=2)  # doctest: +SKIP
        >>> r.value, r.certified  # doctest: +SKIP
    """
    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "norm"]
    unknown = [k for k in settings if k not in fields]
    if unknown:  # named here, not as Settings.__init__()'s TypeError
        raise InputError(f"bound() got unknown keyword argument(s): {', '.join(unknown)}", None,
                         f"use bound()'s model, method, norm, input_shape, or a Settings field: {', '.join(fields)} "
                         "(LipSDP's time limit in seconds: extra={'fast_time_limit': 60})")
    try:
        s = Settings(norm=normalize_norm(norm), **settings)
    except InputError as exc:  # Settings' checks, said of the function the user called
        raise InputError(exc.what.replace("of Settings()", "of bound()"), exc.where, exc.hint) from None
    graph = load(model, input_shape)  # a Graph comes back as is
    return estimate(graph, method, s)


def methods() -> dict[str, str]:
    """Registered methods in order of preference, with their kind and description."""
    return {name: f"[{e.kind}] {e.description}" for name, e in ESTIMATORS.items()}
