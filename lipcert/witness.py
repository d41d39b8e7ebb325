"""Lower-bound witnesses: two inputs whose outputs are far apart, checkable by anyone.

A witness is ``{"x": ..., "y": ...}`` (nested lists in the network's input shape). Its value is
``||f(x) - f(y)|| / ||x - y||``, a lower bound on the Lipschitz constant of f for that norm.

- ``check_witness(graph, witness, claimed)`` recomputes it with lipcert's own float64 evaluation
  of the loaded graph and raises ``WitnessError`` unless it reproduces ``claimed``.
- ``check_witness_onnxruntime(path, witness, claimed)`` recomputes it independently of lipcert,
  with onnxruntime on the ONNX file. When every op of the model has a float64 kernel there, the
  model is run as a float64 copy (initializers and tensor types converted) and must agree to 1e-6;
  otherwise (onnxruntime has no float64 Conv, for example) the file runs as it is, in float32, and
  must agree within 2% plus an estimate of float32 rounding in ``f(x) - f(y)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LipcertError

ORD = {"2": 2, "inf": np.inf, "1": 1}


class WitnessError(LipcertError):
    """A witness does not reproduce the value claimed for it."""


def _norm(a: np.ndarray, norm: str) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64).ravel(), ORD[norm]))


def ratio(fx: np.ndarray, fy: np.ndarray, x: np.ndarray, y: np.ndarray, norm: str) -> float:
    """||f(x) - f(y)|| / ||x - y|| in the given norm, in float64."""
    den = _norm(np.asarray(x, np.float64) - np.asarray(y, np.float64), norm)
    if den == 0:
        raise WitnessError("the witness points coincide", None, "a witness needs two distinct inputs")
    return _norm(np.asarray(fx, np.float64) - np.asarray(fy, np.float64), norm) / den


def _pair(witness: dict[str, Any], shape: tuple[int, ...] | list[int], dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(witness["x"], dtype).reshape(shape)
        y = np.asarray(witness["y"], dtype).reshape(shape)
    except (KeyError, ValueError, TypeError) as exc:
        raise WitnessError(f"the witness is malformed ({exc})", None, f"give x and y as arrays of the input shape {list(shape)}") from None
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise WitnessError("the witness has non-finite entries", None, "give finite inputs")
    return x, y


def recompute(graph: Any, witness: dict[str, Any], norm: str) -> float:
    """Evaluate the loaded graph at the witness in float64 and return the ratio."""
    x, y = _pair(witness, graph.input_shape)
    out = graph.forward(torch.from_numpy(np.stack([x, y]))).numpy()
    return ratio(out[0], out[1], x, y, norm)


def check_witness(graph: Any, witness: dict[str, Any], claimed: float, norm: str = "2", rtol: float = 1e-9) -> float:
    """Raise WitnessError unless the witness reproduces ``claimed`` (relative tolerance ``rtol``)
    with lipcert's float64 evaluation of ``graph``; return the recomputed value."""
    value = recompute(graph, witness, norm)
    if not abs(value - claimed) <= rtol * max(abs(claimed), 1e-300):
        raise WitnessError(
            f"the witness gives ||f(x) - f(y)|| / ||x - y|| = {value:.12g}, not the claimed {claimed:.12g}",
            getattr(graph, "source", None),
            "the lower bound is not reproducible: recompute it (lipcert lower) rather than trusting this value",
        )
    return value


# --- independent check with onnxruntime ------------------------------------------------------------
def float64_model(model: Any) -> Any:
    """A copy of an ONNX model with float32 initializers, constants, casts and tensor types made
    float64 (the computation is unchanged up to rounding)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for info in [*g.input, *g.output, *g.value_info]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return m


def _session(path: str | Path, precision: str) -> tuple[Any, str]:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if precision in ("auto", "float64"):
        try:
            proto = float64_model(onnx.load(str(path)))
            return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers), "float64"
        except Exception:  # an op without a float64 kernel in onnxruntime (Conv, LeakyRelu, ...)
            if precision == "float64":
                raise
    return ort.InferenceSession(str(path), opts, providers=providers), "float32"


def onnxruntime_ratio(path: str | Path, witness: dict[str, Any], norm: str = "2", precision: str = "auto") -> tuple[float, str, float]:
    """The witness ratio evaluated by onnxruntime on the ONNX file: (ratio, precision used, an
    estimate of its rounding error). ``precision``: "auto" (float64 when onnxruntime can run the
    model in float64, else the file as it is), "float64" or "float32"."""
    sess, used = _session(path, precision)
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    dtype = np.float64 if used == "float64" else np.float32
    x, y = _pair(witness, shape, dtype)
    fx, fy = (sess.run(None, {inp.name: a})[0] for a in (x, y))
    value = ratio(fx, fy, x, y, norm)
    eps = float(np.finfo(dtype).eps)
    error = 1e3 * eps * (_norm(fx, norm) + _norm(fy, norm)) / _norm(x.astype(np.float64) - y, norm)
    return value, used, error


def check_witness_onnxruntime(path: str | Path, witness: dict[str, Any], claimed: float, norm: str = "2") -> float:
    """Raise WitnessError unless onnxruntime on the ONNX file reproduces ``claimed``: to 1e-6 in
    float64, or within 2% plus the float32 rounding estimate when only float32 can run."""
    value, used, error = onnxruntime_ratio(path, witness, norm)
    tol = 1e-6 * abs(claimed) if used == "float64" else 2e-2 * abs(claimed) + error
    if not abs(value - claimed) <= tol:
        raise WitnessError(
            f"onnxruntime ({used}) gives ||f(x) - f(y)|| / ||x - y|| = {value:.9g}, not the claimed {claimed:.9g}",
            str(path),
            "the witness does not reproduce on the ONNX file: the value is not a valid lower bound for it",
        )
    return value
