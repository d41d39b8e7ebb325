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
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x) or x.ndim == 0:
        raise InputError(f"{p.name}: x must be an array of real numbers, not {x.dtype} of shape {x.shape}", str(p), "save the inputs as a float array")
    x = np.asarray(x, np.float64)
    return x, None if y is None else labels_array(y, len(x), f"y in {p.name}", str(p))


def labels_array(y: Any, n: int, what: str = "labels", where: str | None = None) -> np.ndarray:
    """``y`` as n int64 class labels. Integer-valued floats (labels saved as floats) and booleans
    (classes 0 and 1) are accepted; other floats and strings are refused: a cast would truncate 0.5
    to class 0."""
    y = np.asarray(y)
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if y.dtype.kind == "f":
        flat = y.ravel()
        whole = np.isfinite(flat) & (flat == np.round(flat))
        if not whole.all():
            raise InputError(f"{what} must hold integer labels (class indices); it has non-integer values such as {float(flat[~whole][0])!r}",
                             where, "give one integer class index per input")
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"{what} must hold integer labels (class indices), not values of type {y.dtype}", where,
                         "give one integer class index per input")
    if y.ndim != 1:
        one_hot = y.ndim == 2 and len(y) == n and y.shape[1] > 1
        hint = "for one-hot labels, give y.argmax(1)" if one_hot else "give a 1-D array: one integer class index per input (e.g. y.ravel())"
        raise InputError(f"{what} must be a 1-D array of integer labels, one per input, not of shape {y.shape}", where, hint)
    if len(y) != n:
        raise InputError(f"{what} has {len(y)} labels for {n} inputs", where, "give one integer class index per input")
    return y.astype(np.int64)


def point_shapes(input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shapes one input may come in: the model's input shape, without its leading batch axis
    of 1, or flat; the natural one (without the batch axis) first."""
    shape = tuple(input_shape)
    natural = shape[1:] if shape and shape[0] == 1 else shape
    return list(dict.fromkeys([natural, shape, (int(np.prod(shape)),)]))


def _permutation(have: tuple[int, ...], want: tuple[int, ...]) -> tuple[int, ...] | None:
    """Axes p with have[p] == want (a transpose), when ``have`` is a reordering of ``want``."""
    if len(have) != len(want) or sorted(have) != sorted(want) or have == want:
        return None
    left, order = list(range(len(have))), []
    for n in want:
        order.append(next(i for i in left if have[i] == n))
        left.remove(order[-1])
    return tuple(order)


def _batch_of(shape: tuple[int, ...]) -> str:
    return "(N" + "".join(f", {n}" for n in shape) + (")" if shape else ",)")


def input_batch(graph: Any, x: Any) -> np.ndarray:
    """``x`` as a float64 batch (N, *input_shape) for ``graph``: each input in one of
    ``point_shapes`` (a single flat input is a batch of one), finite, at least one row. Other
    shapes are refused, not reshaped: channels-last images reshaped to channels-first would be
    scrambled silently."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the inputs are not an array of numbers ({exc})", graph.source, "give a float array") from None
    if arr.ndim == 1 and arr.size == graph.input_dim:
        arr = arr[None]
    shapes = point_shapes(graph.input_shape)
    if arr.ndim == 0 or arr.shape[1:] not in shapes:
        suggest = dict.fromkeys([shapes[0], (graph.input_dim,)])  # without the batch axis, and flat
        hint = f"give an array of shape {' or '.join(_batch_of(s) for s in suggest)}"
        perm = next((p for p in (_permutation(arr.shape[1:], s) for s in shapes) if p is not None), None)
        if perm is not None:
            axes = ", ".join(str(a) for a in (0, *(i + 1 for i in perm)))
            hint = f"each input's axes look reordered (channels-last vs channels-first?): x.transpose({axes}) puts them in the model's order; or {hint}"
        raise InputError(f"an input array of shape {list(arr.shape)} (inputs of shape {list(arr.shape[1:])}) does not fit the model's input shape "
                         f"{list(graph.input_shape)}", graph.source, hint)
    if len(arr) == 0:
        raise InputError("the input array is empty", None, "give at least one input")
    if not np.isfinite(arr).all():
        raise InputError("the inputs contain NaN or infinite values", None, "give finite inputs")
    return arr.reshape(-1, *graph.input_shape)
