"""lipcert: proven bounds on the Lipschitz constant of neural networks.

    >>> import lipcert
    >>> graph = lipcert.load("models/mlp_spiral.onnx")          # doctest: +SKIP
    >>> lipcert.bound(graph, method="naive", norm=2).value      # doctest: +SKIP
"""

import importlib
import logging
import sys
import types
from typing import Any

# Public names -> the module that defines them. They are imported on first use (PEP 562), so
# `import lipcert` and `lipcert --help` do not pay for torch, onnx and cvxpy up front.
_LAZY = {
    "bound": "api", "methods": "api", "Certificates": "certify", "certified_radius": "certify", "certify": "certify",
    "lower_bound": "estimators.lower", "InputError": "errors", "LipcertError": "errors", "ModelError": "errors",
    "SolverError": "errors", "UnsupportedModelError": "errors", "Graph": "graph", "load": "load",
    "supported_ops": "load", "Result": "result", "local_bound": "local", "attack": "attack",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lipcert' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps the public functions ``certify`` and ``attack`` bound to the package when their
    submodules of the same name are first imported (the import system then sets the package
    attribute to the submodule, which would shadow the function)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "load", "bound", "lower_bound", "local_bound", "attack", "certified_radius", "certify", "Certificates", "methods", "supported_ops", "Graph", "Result",
    "LipcertError", "ModelError", "UnsupportedModelError", "InputError", "SolverError", "__version__",
]
