"""lipcert: proven bounds on the Lipschitz constant of neural networks.

    >>> import lipcert
    >>> graph = lipcert.load("models/mlp_spiral.onnx")          # doctest: +SKIP
    >>> lipcert.bound(graph, method="naive", norm=2).value      # doctest: +SKIP
"""

import logging

from .api import bound, methods
from .certify import Certificates, certified_radius, certify
from .estimators.lower import lower_bound
from .errors import InputError, LipcertError, ModelError, SolverError, UnsupportedModelError
from .graph import Graph
from .local import local_bound
from .attack import attack
from .load import load, supported_ops
from .result import Result

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "load", "bound", "lower_bound", "local_bound", "attack", "certified_radius", "certify", "Certificates", "methods", "supported_ops", "Graph", "Result",
    "LipcertError", "ModelError", "UnsupportedModelError", "InputError", "SolverError", "__version__",
]
