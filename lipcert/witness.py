"""Lower-bound witnesses: two inputs whose outputs are far apart, checkable by anyone."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import LipcertError

ORD = {"2": 2, "inf": np.inf, "1": 1}


class WitnessError(LipcertError):
    """A witness does not reproduce the value claimed for it."""


def ratio(fx: np.ndarray, fy: np.ndarray, x: np.ndarray, y: np.ndarray, norm: str) -> float:
    """||f(x) - f(y)|| / ||x - y|| in the given norm, in float64."""
    num = np.linalg.norm((np.asarray(fx, np.float64) - np.asarray(fy, np.float64)).ravel(), ORD[norm])
    den = np.linalg.norm((np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel(), ORD[norm])
    if den == 0:
        raise WitnessError("the witness points coincide", None, "a witness needs two distinct inputs")
    return float(num / den)


def recompute(graph: Any, witness: dict[str, Any], norm: str) -> float:
    """Evaluate the loaded graph at the witness in float64 and return the ratio."""
    x = np.asarray(witness["x"], np.float64).reshape(graph.input_shape)
    y = np.asarray(witness["y"], np.float64).reshape(graph.input_shape)
    out = graph.forward(torch.from_numpy(np.stack([x, y]))).numpy()
    return ratio(out[0], out[1], x, y, norm)


def check_witness(graph: Any, witness: dict[str, Any], claimed: float, norm: str = "2", rtol: float = 1e-9) -> float:
    """Raise WitnessError unless the witness reproduces ``claimed`` (relative tolerance ``rtol``)."""
    value = recompute(graph, witness, norm)
    if not abs(value - claimed) <= rtol * max(abs(claimed), 1e-300):
        raise WitnessError(
            f"the witness gives ||f(x) - f(y)|| / ||x - y|| = {value:.12g}, not the claimed {claimed:.12g}",
            getattr(graph, "source", None),
            "the lower bound is not reproducible: recompute it (lipcert lower) rather than trusting this value",
        )
    return value


def onnxruntime_ratio(path: str, witness: dict[str, Any], norm: str = "2") -> float:
    """The witness ratio evaluated by onnxruntime on the ONNX file itself (in the model's dtype)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.asarray(witness["x"], dtype).reshape(shape)
    y = np.asarray(witness["y"], dtype).reshape(shape)
    fx, fy = sess.run(None, {inp.name: x})[0], sess.run(None, {inp.name: y})[0]
    return ratio(fx, fy, x, y, norm)
