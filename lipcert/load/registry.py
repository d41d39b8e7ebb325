"""The ONNX converter registry: one function per op type, keyed by (op, since opset)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import onnx


class ConverterKey(NamedTuple):
    op: str
    since: int


class Unsupported(Exception):
    """Raised by a converter: this node, with these attributes, cannot be bounded."""


Converter = Callable[..., None]
_REGISTRY: dict[ConverterKey, Converter] = {}


def converter(*ops: str, since: int = 1) -> Callable[[Converter], Converter]:
    """Register ``fn`` as the converter of ``ops`` from opset version ``since`` on."""

    def register(fn: Converter) -> Converter:
        for op in ops:
            key = ConverterKey(op, since)
            if key in _REGISTRY:
                raise RuntimeError(f"converter for {op} since opset {since} registered twice")
            _REGISTRY[key] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    return sorted({k.op for k in _REGISTRY})


def find_converter(op: str, opset: int) -> Converter | None:
    """The converter for ``op`` in a model of default-domain opset ``opset``."""
    candidates = sorted((k.since, fn) for k, fn in _REGISTRY.items() if k.op == op)
    if not candidates:
        return None
    try:
        version = onnx.defs.get_schema(op, max_inclusive_version=opset).since_version
    except Exception:  # op unknown to this onnx version: use the newest converter
        version = opset
    chosen = [fn for since, fn in candidates if since <= version]
    return chosen[-1] if chosen else candidates[0][1]
