"""One-node ONNX models per converter: lipcert's graph must match onnxruntime, and every linear
node's norms must equal (or, where marked as bounds, exceed) the norms of its dense matrix."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import lipcert
from lipcert.graph import Affine
from lipcert.graph.linear import dense_norm
from onnx_helpers import f32, graph_model, one_node_model
from onnx import helper

RNG = np.random.default_rng(0)


def run_both(model, in_shape, samples: int = 3):
    graph = lipcert.load(model)  # loading itself cross-checks against onnxruntime
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for _ in range(samples):
        x = RNG.normal(size=in_shape).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        ours = graph.forward(torch.from_numpy(x.astype(np.float64))[None])[0].numpy()
        np.testing.assert_allclose(ours.reshape(ref.shape), ref, rtol=1e-4, atol=1e-4)
    return graph


def check_norms(graph):
    """Every affine node: exact norms equal the dense matrix's; bounds are never below them."""
    for node in graph.nodes:
        if not isinstance(node, Affine):
            continue
        a = node.lin.dense()
        assert a is not None
        for p in ("2", "inf", "1"):
            value, exact, _ = node.lin.norm_bound(p)
            truth = dense_norm(a, p)
            if exact:
                assert value == pytest.approx(truth, rel=1e-10, abs=1e-12)
            else:
                assert value >= truth * (1 - 1e-12)


CASES = {
    "gemm": lambda: (one_node_model("Gemm", [1, 5], {"W": f32(RNG, 4, 5), "b": f32(RNG, 4)}, ["W", "b"], transB=1, alpha=0.5, beta=2.0), [1, 5]),
    "gemm_noT": lambda: (one_node_model("Gemm", [1, 5], {"W": f32(RNG, 5, 3)}, ["W"]), [1, 5]),
    "matmul_right": lambda: (one_node_model("MatMul", [2, 5], {"W": f32(RNG, 5, 3)}, ["W"]), [2, 5]),
    "add_const": lambda: (one_node_model("Add", [1, 4], {"c": f32(RNG, 4)}, ["c"]), [1, 4]),
    "sub_const": lambda: (one_node_model("Sub", [1, 4], {"c": f32(RNG, 1, 4)}, ["c"]), [1, 4]),
    "mul_const": lambda: (one_node_model("Mul", [1, 3, 2, 2], {"c": f32(RNG, 3, 1, 1)}, ["c"]), [1, 3, 2, 2]),
    "div_const": lambda: (one_node_model("Div", [1, 4], {"c": np.array([2.0, -4.0, 0.5, 1.0], np.float32)}, ["c"]), [1, 4]),
    "conv2d": lambda: (one_node_model("Conv", [1, 2, 7, 6], {"W": f32(RNG, 3, 2, 3, 3), "b": f32(RNG, 3)}, ["W", "b"], pads=[1, 0, 2, 1], strides=[2, 1]), [1, 2, 7, 6]),
    "conv2d_dilated_groups": lambda: (one_node_model("Conv", [1, 4, 8, 8], {"W": f32(RNG, 6, 2, 3, 3)}, ["W"], group=2, dilations=[2, 2], pads=[2, 2, 2, 2]), [1, 4, 8, 8]),
    "conv2d_same": lambda: (one_node_model("Conv", [1, 1, 5, 5], {"W": f32(RNG, 2, 1, 2, 2)}, ["W"], auto_pad="SAME_UPPER"), [1, 1, 5, 5]),
    "conv1d": lambda: (one_node_model("Conv", [1, 2, 9], {"W": f32(RNG, 3, 2, 4)}, ["W"], strides=[2], pads=[1, 1]), [1, 2, 9]),
    "conv_transpose": lambda: (one_node_model("ConvTranspose", [1, 2, 4, 4], {"W": f32(RNG, 2, 3, 3, 3)}, ["W"], strides=[2, 2], pads=[1, 1, 1, 1]), [1, 2, 4, 4]),
    "batchnorm": lambda: (one_node_model("BatchNormalization", [1, 3, 2, 2], {"s": f32(RNG, 3), "b": f32(RNG, 3), "m": f32(RNG, 3), "v": np.abs(f32(RNG, 3)) + 0.1}, ["s", "b", "m", "v"], epsilon=1e-3), [1, 3, 2, 2]),
    "avgpool": lambda: (one_node_model("AveragePool", [1, 2, 6, 6], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), [1, 2, 6, 6]),
    "avgpool_count_pad": lambda: (one_node_model("AveragePool", [1, 2, 6, 6], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1), [1, 2, 6, 6]),
    "global_avgpool": lambda: (one_node_model("GlobalAveragePool", [1, 3, 4, 5]), [1, 3, 4, 5]),
    "maxpool": lambda: (one_node_model("MaxPool", [1, 2, 6, 6], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), [1, 2, 6, 6]),
    "flatten": lambda: (one_node_model("Flatten", [1, 2, 3, 4], axis=2), [1, 2, 3, 4]),
    "reshape": lambda: (one_node_model("Reshape", [1, 2, 3, 4], {"s": np.array([0, -1, 4], np.int64)}, ["s"]), [1, 2, 3, 4]),
    "transpose": lambda: (one_node_model("Transpose", [1, 2, 3, 4], perm=[0, 3, 1, 2]), [1, 2, 3, 4]),
    "squeeze": lambda: (one_node_model("Squeeze", [1, 3, 1, 2], {"a": np.array([2], np.int64)}, ["a"]), [1, 3, 1, 2]),
    "unsqueeze": lambda: (one_node_model("Unsqueeze", [1, 3], {"a": np.array([1, -1], np.int64)}, ["a"]), [1, 3]),
    "pad": lambda: (one_node_model("Pad", [1, 2, 3, 3], {"p": np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64)}, ["p"]), [1, 2, 3, 3]),
    "pad_value": lambda: (one_node_model("Pad", [1, 2, 3], {"p": np.array([0, 1, 1, 0, 0, 2], np.int64), "v": np.array(1.5, np.float32)}, ["p", "v"]), [1, 2, 3]),
    "identity": lambda: (graph_model([helper.make_node("Identity", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], [1, 3], {}), [1, 3]),
    "dropout": lambda: (graph_model([helper.make_node("Dropout", ["x"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])], [1, 3], {}), [1, 3]),
    "relu": lambda: (one_node_model("Relu", [1, 5]), [1, 5]),
    "leaky_relu": lambda: (one_node_model("LeakyRelu", [1, 5], alpha=0.2), [1, 5]),
    "prelu": lambda: (one_node_model("PRelu", [1, 3, 2], {"s": np.array([[0.1], [0.5], [-0.2]], np.float32)}, ["s"]), [1, 3, 2]),
    "sigmoid": lambda: (one_node_model("Sigmoid", [1, 5]), [1, 5]),
    "tanh": lambda: (one_node_model("Tanh", [1, 5]), [1, 5]),
    "elu": lambda: (one_node_model("Elu", [1, 5], alpha=0.7), [1, 5]),
    "softplus": lambda: (one_node_model("Softplus", [1, 5]), [1, 5]),
    "clip": lambda: (one_node_model("Clip", [1, 5], {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}, ["lo", "hi"]), [1, 5]),
    "concat": lambda: (graph_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Tanh", ["x"], ["b"]), helper.make_node("Concat", ["a", "b"], ["y"], axis=1)], [1, 3], {}), [1, 3]),
    "residual_add": lambda: (graph_model([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Add", ["x", "b"], ["y"])], [1, 4], {"W": f32(RNG, 4, 4)}), [1, 4]),
    "branch_sub": lambda: (graph_model([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sub", ["x", "a"], ["y"])], [1, 4], {}), [1, 4]),
    "constant_node": lambda: (graph_model([helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", 1, [3], [1.0, 2.0, 3.0])), helper.make_node("Mul", ["x", "c"], ["y"])], [1, 3], {}), [1, 3]),
    "neg": lambda: (one_node_model("Neg", [1, 3]), [1, 3]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converter_matches_onnxruntime(case):
    model, in_shape = CASES[case]()
    graph = run_both(model, in_shape)
    check_norms(graph)


def test_fft_bound_for_large_convolution_is_above_dense_norm():
    """A conv too large for the dense limit falls back to the circular-convolution FFT bound."""
    from lipcert.graph.linear import Conv, fft_conv_bound

    w = RNG.normal(size=(4, 3, 3, 3))
    conv = Conv((1, 3, 10, 10), w, (1, 1), (1, 1, 1, 1), (1, 1))
    truth = dense_norm(conv.dense(), "2")
    bound = fft_conv_bound(conv)
    assert truth <= bound * (1 + 1e-12)
    assert bound <= truth * 1.3  # and not absurdly loose
    strided = Conv((1, 3, 10, 10), w, (2, 2), (1, 1, 1, 1), (1, 1))
    assert dense_norm(strided.dense(), "2") <= fft_conv_bound(strided) * (1 + 1e-12)
    grouped = Conv((1, 4, 9, 9), RNG.normal(size=(6, 2, 3, 3)), (1, 1), (0, 0, 2, 2), (2, 2), groups=2)
    assert dense_norm(grouped.dense(), "2") <= fft_conv_bound(grouped) * (1 + 1e-12)
    transposed = Conv((1, 2, 4, 4), RNG.normal(size=(2, 3, 3, 3)), (2, 2), (1, 1, 1, 1), (1, 1), transposed=True)
    assert dense_norm(transposed.dense(), "2") <= fft_conv_bound(transposed) * (1 + 1e-12)


def test_large_conv_uses_exact_linf_and_proven_l2_bound(monkeypatch):
    from lipcert.graph import linear

    w = RNG.normal(size=(4, 3, 3, 3))
    conv = linear.Conv((1, 3, 10, 10), w, (1, 1), (1, 1, 1, 1), (1, 1))
    a = conv.dense()
    from lipcert.graph import convnorm

    monkeypatch.setattr(linear, "DENSE_LIMIT", 10)
    monkeypatch.setattr(convnorm, "DENSE_FLOPS", 0)  # the l2 route: no dense matrix
    fresh = linear.Conv((1, 3, 10, 10), w, (1, 1), (1, 1, 1, 1), (1, 1))
    for p in ("inf", "1"):
        value, exact, _ = fresh.norm_bound(p)
        assert exact and value == pytest.approx(dense_norm(a, p), rel=1e-12)
    value, exact, how = fresh.norm_bound("2")
    assert not exact and value >= dense_norm(a, "2") and "fft" in how


def test_adjoint_identity_for_every_linear_node():
    """<A x, y> = <x, A^T y> for each converter's linear part."""
    for case in sorted(CASES):
        model, _ = CASES[case]()
        graph = lipcert.load(model)
        for node in graph.nodes:
            if isinstance(node, Affine):
                x = torch.randn((2, *node.lin.in_shape), dtype=torch.float64)
                y = torch.randn((2, *node.lin.out_shape), dtype=torch.float64)
                lhs = (node.lin.apply(x) * y).sum()
                rhs = (x * node.lin.adjoint(y)).sum()
                assert float(lhs) == pytest.approx(float(rhs), rel=1e-10, abs=1e-10), case


def test_maxpool_overlap_bound_is_sound():
    """Overlapping 3x3/stride-1 windows: each entry is in up to 9 windows; l2 bound sqrt(9) = 3."""
    model, shape = CASES["maxpool"]()
    graph = lipcert.load(model)
    node = graph.nodes[0]
    assert node.max_windows_per_entry == 9
    assert node.lipschitz("2")[0] == pytest.approx(3.0)
    # sampled ratios never exceed the bound
    x = torch.randn((200, *shape), dtype=torch.float64)
    y = x + 1e-3 * torch.randn_like(x)
    num = (graph.forward(x) - graph.forward(y)).flatten(1).norm(dim=1)
    den = (x - y).flatten(1).norm(dim=1)
    assert float((num / den).max()) <= 3.0
