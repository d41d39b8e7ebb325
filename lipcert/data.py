"""User data in: .npz files of inputs (and labels), and input arrays checked against a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError


def load_npz(path: str | Path, labels: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs ``x`` (float64) and, with ``labels``, one integer label per input ``y`` from an
    .npz file; (x, None) without."""
    p = Path(path)
    names = ("x", "y") if labels else ("x",)
    wanted = " and ".join(f"an array '{n}'" for n in names)
    if not p.exists():
        raise InputError(f"data file not found: {p}", None, f"give an .npz file with {wanted}")
    try:
        npz = np.load(p)
    except Exception as exc:
        raise InputError(f"could not read {p.name} as an .npz file ({exc})", str(p), "save the data with numpy.savez(path, x=inputs, y=labels)") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # np.load reads an .npy file as one bare array
        raise InputError(f"{p.name} is an .npy file (one array without a name); lipcert reads an .npz file with {wanted}", str(p),
                         "save the data with numpy.savez(path, x=inputs, y=labels)")
    with npz:
        missing = [n for n in names if n not in npz.files]
        if missing:
            raise InputError(f"{p.name} has no array {' or '.join(repr(m) for m in missing)} (it has: {', '.join(npz.files) or 'nothing'})",
                             str(p), "save the data with numpy.savez(path, x=inputs, y=labels)")
        try:
            x, y = npz["x"], (npz["y"] if labels else None)
        except ValueError:  # an object array: reading it would need pickle, never enabled for data files
            raise InputError(f"{p.name} holds an object array (Python objects, not numbers), which lipcert does not load", str(p),
                             "save numeric arrays: numpy.savez(path, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))") from None
        x, y = np.asarray(x, np.float64), (None if y is None else np.asarray(y))
    if y is not None and (not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x)):
        raise InputError(f"{p.name}: y must be one integer label per input (x has {len(x)} rows, y has shape {y.shape})", str(p), "check the arrays")
    return x, y


def input_batch(graph: Any, x: Any) -> np.ndarray:
    """``x`` as a float64 batch (N, *input_shape) for ``graph``: each row must hold exactly one
    input (a single 1-D input of the right size is a batch of one), finite, at least one row."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1 and arr.size == graph.input_dim:
        arr = arr[None]
    if arr.ndim < 2 or int(np.prod(arr.shape[1:])) != graph.input_dim:
        raise InputError(f"an input array of shape {list(arr.shape)} does not fit the model's input shape {list(graph.input_shape)}", graph.source,
                         f"give an array of shape (N, {', '.join(map(str, graph.input_shape))}) or (N, {graph.input_dim})")
    if len(arr) == 0:
        raise InputError("the input array is empty", graph.source, "give at least one input")
    if not np.isfinite(arr).all():
        raise InputError("the inputs contain NaN or infinite values", graph.source, "give finite inputs")
    return arr.reshape(-1, *graph.input_shape)
