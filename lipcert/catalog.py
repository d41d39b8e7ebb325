"""What `lipcert ops` and `lipcert methods` print, as plain data: those commands answer in a
fraction of a second instead of importing onnx, torch and cvxpy to ask the registries.

The tables are copies of the converter registry (lipcert/load) and the method registry
(lipcert/estimators); tests/test_cli.py fails when a copy differs from its registry, and
`python -m lipcert.catalog` prints fresh tables to paste here."""

from __future__ import annotations

import importlib.util

# ONNX ops with a converter (lipcert.load.supported_ops())
OPS: tuple[str, ...] = (
    'Abs', 'Add', 'AveragePool', 'BatchNormalization', 'Cast', 'Clip', 'Concat', 'Constant',
    'Conv', 'ConvTranspose', 'DepthToSpace', 'Div', 'Dropout', 'Elu', 'Flatten', 'Gemm',
    'GlobalAveragePool', 'GlobalMaxPool', 'Identity', 'LeakyRelu', 'MatMul', 'Max', 'MaxPool',
    'Min', 'Mul', 'Neg', 'PRelu', 'Pad', 'Pow', 'ReduceMax', 'ReduceMean', 'ReduceMin',
    'ReduceSum', 'Relu', 'Reshape', 'Sigmoid', 'Slice', 'Softplus', 'SpaceToDepth', 'Squeeze',
    'Sub', 'Tanh', 'TopK', 'Transpose', 'Unsqueeze',
)

# Methods in order of preference with their kind and description (lipcert.api.methods())
METHODS: dict[str, str] = {
    'naive': '[upper] product of exact per-layer operator norms (sum over residual branches); proven',
    'compose': '[upper] compositional layer-by-layer matrix inequalities (ECLipsE-Fast style, residual blocks as blocks, convolution blocks and conv-relu-conv pairs in the Fourier domain, a short multiplier search after max-pooling); proven l2 bound, seconds to a few minutes',
    'sdp': '[upper] LipSDP (neuron or layer multipliers), solver multipliers re-verified in float64; proven l2 bound',
    'sdp-wide': '[upper] the compositional walk, with LipSDP-Neuron over each wide layer (activations, max-pooling) before a narrow linear map, posed in the small dimension; proven l2 bound, minutes',
    'gram': "[upper] per-layer Gram-iteration bounds (l2; convolutions on small grids exact by a Cholesky proof, where naive's are looser), composed like naive; proven",
    'power': '[estimate] product of per-layer power-iteration norms (l2); converges from below: an estimate, not a bound',
    'lower': '[lower] adversarial Jacobian search (screening, smoothed ascent with power steps on J J^T, real-network proposals); witnessed lower bound',
}

# cvxpy solvers that take semidefinite constraints (LipSDP), in lipcert's order of preference,
# and the module cvxpy imports to find each one
SDP_SOLVER_MODULES: dict[str, str] = {"MOSEK": "mosek", "SDPA": "sdpap", "CVXOPT": "cvxopt", "CLARABEL": "clarabel", "SCS": "scs"}


def sdp_solvers() -> list[str]:
    """The cvxpy SDP solvers whose packages are installed, found without importing cvxpy."""
    return [name for name, module in SDP_SOLVER_MODULES.items() if importlib.util.find_spec(module) is not None]


def _fresh_tables() -> str:
    from .api import methods
    from .load import supported_ops

    return f"OPS = {tuple(supported_ops())!r}\nMETHODS = {methods()!r}"


if __name__ == "__main__":
    print(_fresh_tables())
