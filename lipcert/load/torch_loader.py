"""torch.nn.Module -> Graph, through an in-memory ONNX export and the ONNX converters.

The module is exported with torch's TorchScript-based exporter (``dynamo=False``), which ships
with torch itself; the newer exporter needs the optional ``onnxscript`` package. The resulting
graph is checked against the module on random inputs.

Weight parametrisations (``torch.nn.utils.parametrize``: orthogonal, spectral_norm, weight_norm,
deel-torchlip's spectral and Björck layers, any user parametrisation; and the older hook-based
``spectral_norm`` / ``weight_norm``) are frozen on a deep copy in eval mode: each weight becomes the
tensor the module uses at inference. The user's module is never modified, nor even called.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import torch

from ..errors import InputError, ModelError, UnsupportedModelError
from ..graph import Graph
from .onnx_loader import onnx_to_graph


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy in eval mode whose parametrised weights are plain tensors (the values the module
    uses at inference)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    try:
        frozen = copy.deepcopy(module)
    except Exception as exc:
        raise ModelError(f"the module cannot be copied ({type(exc).__name__}: {str(exc)[:200]})", type(module).__name__,
                         "lipcert works on a copy so as to leave your module untouched; export it to ONNX yourself") from None
    frozen.eval()
    with torch.no_grad():
        for m in frozen.modules():
            for hook in list(m._forward_pre_hooks.values()):
                if isinstance(hook, SpectralNorm):
                    torch.nn.utils.remove_spectral_norm(m, hook.name)
                elif isinstance(hook, WeightNorm):
                    torch.nn.utils.remove_weight_norm(m, hook.name)
            if parametrize.is_parametrized(m):
                # not parametrize.remove_parametrizations: it deletes the property from the
                # parametrised class, which the copy shares with the user's module
                values = {name: getattr(m, name).detach().clone() for name in m.parametrizations.keys()}
                m.__class__ = type(m).__bases__[0]
                del m._modules["parametrizations"]
                for name, value in values.items():
                    m.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    return frozen


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def module_to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[onnx.ModelProto, bool]:
    """Export a module (frozen first: see ``frozen_copy``) to an in-memory ONNX model; and whether
    the trace turned a tensor into a Python value (control flow that may depend on the input;
    deel-torchlip's shape checks do it too, so it is a hint for the cross-check, not a refusal)."""
    module = frozen_copy(module)
    where = type(module).__name__
    example = torch.zeros(input_shape, dtype=_dtype(module))
    tried = f"an input of shape {tuple(input_shape)} (the batch axis included)"
    try:
        with torch.no_grad():
            out = module(example)
    except Exception as exc:
        hint = (f"input_shape is the shape of a whole batch, batch axis first: for examples of shape {tuple(input_shape)} "
                f"pass {(1, *input_shape)}; check that module(torch.zeros(input_shape)) runs")
        raise ModelError(f"the module cannot be evaluated on {tried}: {type(exc).__name__}: {str(exc)[:300]}", where, hint) from None
    if not isinstance(out, torch.Tensor):  # a dict, tuple or list of outputs: which one to bound is the user's choice
        pick = f"[{next(iter(out))!r}]" if isinstance(out, dict) and out else "[0]"
        raise UnsupportedModelError([("(output)", where, f"forward returns a {type(out).__name__}, not one tensor; lipcert bounds a module "
                                      f"whose forward returns the one tensor to bound (wrap it, e.g. forward(x) = model(x){pick})")])
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17, input_names=["input"], output_names=["output"])
    except Exception as exc:
        raise ModelError(
            f"torch could not export the module to ONNX on {tried} ({type(exc).__name__}: {str(exc)[:300]})",
            where,
            "the module runs, but torch.onnx.export (TorchScript) cannot trace it: replace the layer named in the "
            "message, or export the model to ONNX yourself and load the file",
        ) from None
    branch = any(issubclass(w.category, torch.jit.TracerWarning) and "Python" in str(w.message) for w in caught)
    return onnx.load_from_string(buffer.getvalue()), branch


_BRANCH_HINT = ("the module turns a tensor into a Python value in forward (an `if` on the input, .item(), ...): "
                "the export follows the branch taken at zeros only")


def torch_to_graph(module: torch.nn.Module, input_shape: tuple[int, ...] | None) -> Graph:
    if input_shape is None:
        raise InputError("loading a torch module needs input_shape", type(module).__name__, "pass input_shape=(1, C, H, W) (the batch axis included)")
    shape = tuple(int(n) for n in input_shape)
    model, branch = module_to_onnx(module, shape)
    # ONNX keeps float attributes in float32; a float64 module's own values reach the converters
    exact = _float64_attributes(module) if _dtype(module) == torch.float64 else None
    graph = onnx_to_graph(model, shape, source=f"torch module {type(module).__name__}", exact_floats=exact)
    crosscheck_module(graph, frozen_copy(module), hint=branch)
    return graph


# the ONNX float attributes a torch layer holds in float64: (op, attribute) -> (layer type, its name there)
_FLOAT_ATTRIBUTES = {
    ("LeakyRelu", "alpha"): (torch.nn.LeakyReLU, "negative_slope"),
    ("Elu", "alpha"): (torch.nn.ELU, "alpha"),
    ("BatchNormalization", "epsilon"): (torch.nn.modules.batchnorm._BatchNorm, "eps"),
}


def _float64_attributes(module: torch.nn.Module) -> dict[tuple[str, str], dict[float, float]]:
    """A float64 module's float attributes by their float32 rounding, which is all ONNX keeps
    (Context.exact_float). Without them a LeakyReLU(1/3) is bounded with a slope interval that
    misses the module's slope, and batch-norm's eps = 1e-3 with a running variance near zero gives
    a scale 2e-8 of itself too small; the float64 cross-check refuses both. Two values with one
    rounding are left out (the shortest decimal is tried; the cross-check confirms or refuses)."""
    out: dict[tuple[str, str], dict[float, float]] = {}
    for key, (layer, attribute) in _FLOAT_ATTRIBUTES.items():
        values = {float(getattr(m, attribute)) for m in module.modules() if isinstance(m, layer)}
        rounded = [float(np.float32(v)) for v in values]
        out[key] = {r: v for r, v in zip(rounded, values) if rounded.count(r) == 1}
    return out


# input scales of the cross-check: the export is a trace at zeros, and control flow on the input
# (``if x.abs().max() > 3``) is caught only by inputs that take the other branch
CHECK_SCALES = (1.0, 1e-3, 10.0, 1e3)


def crosscheck_module(graph: Graph, module: torch.nn.Module, samples: int = 8, seed: int = 0, hint: bool = False) -> None:
    """Compare the graph with ``module`` (which is put in eval mode: pass a copy) on random
    inputs at the scales CHECK_SCALES. ``hint``: the trace saw a tensor turned into a Python
    value (the message then says so)."""
    rng = np.random.default_rng(seed)
    dtype = _dtype(module)
    module.eval()
    for k in range(samples):
        x = rng.normal(size=graph.input_shape) * CHECK_SCALES[k % len(CHECK_SCALES)]
        with torch.no_grad():
            ref = module(torch.as_tensor(x, dtype=dtype)).double().numpy()
        if not np.isfinite(ref).all():
            continue  # the module overflowed in its own precision at this scale: nothing to compare
        ours = graph.forward(torch.from_numpy(x)[None])[0].numpy()
        scale = max(1.0, float(np.abs(ref).max()))
        tol = 1e-4 if dtype == torch.float32 else 1e-9
        if ref.shape != ours.shape or float(np.abs(ref - ours).max()) / scale > tol:
            if hint:
                raise ModelError(f"lipcert's graph disagrees with the torch module on a random input: {_BRANCH_HINT}", graph.source,
                                 "remove the input-dependent control flow from forward, or bound each branch as its own module")
            raise ModelError("lipcert's graph disagrees with the torch module on a random input", graph.source, "please report this module: a converter is wrong")
