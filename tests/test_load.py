"""Loading real networks and torch modules; known-answer bounds; refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import lipcert
from lipcert.errors import InputError, ModelError, UnsupportedModelError
from conftest import MODELS, SHARED_MODELS, shared_model_files
from onnx_helpers import f32, graph_model, one_node_model
from onnx import helper
from zoo import all_nets, one_hidden_relu, single_linear

VNN = SHARED_MODELS / "vnncomp2021"


@pytest.mark.parametrize("name", shared_model_files())
def test_shared_network_loads_and_naive_matches_reference(name, reference):
    """Every VNN-COMP network loads (forward checked against onnxruntime inside load) and the naive
    bounds are never above the reference per-node product (+1e-6) nor below the reference lower bound."""
    graph = lipcert.load(VNN / name)
    ref = reference[f"vnncomp2021/{name}"]
    for p in ("2", "inf"):
        value = lipcert.bound(graph, norm=p).value
        if f"naive_l{p}" in ref:
            assert value <= ref[f"naive_l{p}"] * (1 + 1e-6)
        assert value >= ref[f"lower_l{p}"]


@pytest.mark.parametrize("net", all_nets(), ids=lambda z: z.name)
@pytest.mark.parametrize("p", ["2", "inf", "1"])
def test_naive_is_above_exact_constant_of_zoo(net, p):
    result = lipcert.bound(lipcert.load(net.module, net.input_shape), norm=p)
    assert result.certified and result.kind == "upper"
    assert result.value >= net.exact[p]


def test_single_gemm_is_exact_top_singular_value():
    z = single_linear(seed=3, n_in=9, n_out=6)
    value = lipcert.bound(z.module, input_shape=z.input_shape).value
    assert value == pytest.approx(z.exact["2"], rel=1e-8)
    assert value >= z.exact["2"]


def test_residual_block_bound_is_one_plus_branch():
    from zoo import residual_scaled

    z = residual_scaled(0.25)
    result = lipcert.bound(z.module, input_shape=z.input_shape)
    assert result.value == pytest.approx(1.25, rel=1e-8) and result.value >= 1.25
    # both branches are linear in the input: one layer, x -> 1.25 x (no sum of branch bounds)
    assert len(lipcert.load(z.module, input_shape=z.input_shape).nodes) == 1


def test_one_hidden_relu_brute_force_is_below_naive():
    for seed in range(3):
        z = one_hidden_relu(seed)
        assert lipcert.bound(z.module, input_shape=z.input_shape).value >= z.exact["2"]


def test_batchnorm_is_folded_into_a_scale_and_conv_norm_is_dense():
    rng = np.random.default_rng(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 4))
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.copy_(torch.tensor(rng.normal(size=3)))
        bn.running_var.copy_(torch.tensor(rng.uniform(0.2, 2, size=3)))
        bn.weight.copy_(torch.tensor(rng.normal(size=3)))
    model.eval()
    graph = lipcert.load(model, (1, 2, 5, 5))  # cross-checked against the module
    merged = graph.merge_linear()
    conv_bn = merged.nodes[0]
    # the conv and the batch-norm are one affine map whose norm is that of its dense matrix
    w = model[0].weight.detach().double()
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    dense = []
    for i in range(2 * 5 * 5):
        e = torch.zeros(1, 2, 5, 5, dtype=torch.float64).flatten()
        e[i] = 1
        out = torch.nn.functional.conv2d(e.reshape(1, 2, 5, 5), w, padding=1) * scale.reshape(1, 3, 1, 1)
        dense.append(out.flatten())
    expected = np.linalg.norm(torch.stack(dense, 1).numpy(), 2)
    # (the exporter may fuse conv and batch-norm in float32: agreement to float32 precision)
    assert conv_bn.lin.norm_bound("2")[0] == pytest.approx(expected, rel=1e-6)


def test_torch_module_with_residual_and_pooling_matches_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(2, 2, 3, padding=1)
            self.pool = torch.nn.MaxPool2d(2)
            self.avg = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(2, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            h = h + torch.tanh(self.conv2(h))
            h = self.avg(self.pool(h))
            return self.fc(torch.flatten(h, 1))

    graph = lipcert.load(Net(), (1, 1, 6, 6))
    assert lipcert.bound(graph).value > 0


@pytest.mark.parametrize("alpha", [0.1, 1 / 3])
def test_float64_module_keeps_its_float64_activation_parameters(alpha):
    # ONNX stores LeakyRelu's and Elu's alpha in float32; a float64 module's value must come back
    # (1/3 differs from its float32 rounding by 1e-8: the graph was refused, or bounded with a
    # slope interval that missed the module's slope)
    class Functional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.nn.functional.leaky_relu(self.a(x), 0.2))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LeakyReLU(alpha), torch.nn.Linear(8, 8), torch.nn.ELU(alpha),
                              torch.nn.Linear(8, 2)).double()
    graph = lipcert.load(net, (1, 4))
    assert [n.slope_interval for n in graph.nodes if isinstance(n, lipcert.graph.Activation)] == [(alpha, 1.0), (0.0, 1.0)]
    assert [n.params["alpha"] for n in graph.nodes if isinstance(n, lipcert.graph.Activation)] == [alpha, alpha]
    functional = lipcert.load(Functional().double(), (1, 4))
    assert [n.params["alpha"] for n in functional.nodes if isinstance(n, lipcert.graph.Activation)] == [0.2]


def test_float64_module_keeps_its_float64_batchnorm_epsilon():
    # ONNX stores BatchNormalization's epsilon in float32: 1e-3 arrives as 1.0000000475e-3, and with
    # a running variance near zero the scale 1 / sqrt(var + eps) was 2e-8 of itself too small (a
    # bound below the module's) and the float64 cross-check refused the module
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3, eps=1e-3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[1].running_var.copy_(torch.tensor([1e-7, 2e-6, 1.0], dtype=torch.float64))
    net.eval()
    graph = lipcert.load(net, (1, 4))
    x = torch.randn(5, 1, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(graph.forward(x)[:, 0], net(x[:, 0]), rtol=1e-13, atol=0)


def test_torch_module_needs_input_shape():
    with pytest.raises(InputError, match="input_shape"):
        lipcert.load(torch.nn.Linear(2, 2))


# --- refusals -------------------------------------------------------------------------------------------


def test_torch_module_must_return_one_tensor():
    class Outputs(torch.nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.lin, self.wrap = torch.nn.Linear(4, 3), wrap

        def forward(self, x):
            return self.wrap(self.lin(x))

    for wrap, said in ((lambda y: {"logits": y}, "returns a dict, not one tensor"), (lambda y: (y,), "returns a tuple")):
        with pytest.raises(UnsupportedModelError, match=said):
            lipcert.load(Outputs(wrap), input_shape=(1, 4))


def test_bound_names_unknown_keywords_and_lists_the_valid_ones():
    with pytest.raises(InputError, match="unknown keyword argument.*: time_limit") as err:
        lipcert.bound(MODELS / "mlp_spiral.onnx", time_limit=5)
    assert "seed, iterations, solver" in err.value.message() and "fast_time_limit" in err.value.message()
    with pytest.raises(InputError, match=r"'seed' parameter of bound\(\)"):  # not of Settings()
        lipcert.bound(MODELS / "mlp_spiral.onnx", seed=-1)


def test_unsupported_ops_are_all_listed():
    nodes = [
        helper.make_node("Sin", ["x"], ["a"], name="first_bad"),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Softmax", ["b"], ["y"], name="second_bad"),
    ]
    with pytest.raises(UnsupportedModelError) as info:
        lipcert.load(graph_model(nodes, [1, 3], {}))
    text = str(info.value)
    assert "first_bad" in text and "second_bad" in text and "Sin" in text and "logits" in text
    assert "Supported ops" in text


def test_product_of_two_variables_is_refused():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["x", "a"], ["y"], name="square")]
    with pytest.raises(UnsupportedModelError, match="square"):
        lipcert.load(graph_model(nodes, [1, 3], {}))


def test_nan_weights_are_refused():
    w = f32(np.random.default_rng(0), 3, 4)
    w[1, 2] = np.nan
    with pytest.raises(ModelError, match="NaN"):
        lipcert.load(one_node_model("Gemm", [1, 4], {"W": w}, ["W"], transB=1))


@pytest.mark.parametrize("scale", [1e-165, 1e165])
def test_layers_whose_squares_leave_float64_are_refused(scale):
    """A layer whose largest weight is 1e-165 squares to 0 in float64 (a bound of 0 for a map that
    is not constant); 1e165 overflows: both refused with the node and what to do."""
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).double()
    with torch.no_grad():
        module[0].weight.mul_(scale)
    with pytest.raises(ModelError, match="largest weight"):
        lipcert.load(module, (1, 3))


def test_dynamic_shape_needs_an_input_shape():
    model = one_node_model("Relu", [1, "n"])
    with pytest.raises(ModelError, match="dynamic"):
        lipcert.load(model)
    assert lipcert.load(model, input_shape=(1, 4)).input_shape == (1, 4)


def test_symbolic_batch_axis_is_fixed_to_one():
    graph = lipcert.load(VNN / "cifar10_small.onnx")
    assert graph.input_shape == (1, 32, 32, 3)


def test_two_inputs_are_refused():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "two",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3]), helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    with pytest.raises(UnsupportedModelError, match="2 inputs"):
        lipcert.load(helper.make_model(graph))


def test_truncated_and_foreign_files_are_refused(tmp_path):
    data = (VNN / "mnist-net_256x2.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="could not read"):
        lipcert.load(truncated)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a network")
    with pytest.raises(ModelError):
        lipcert.load(text)
    with pytest.raises(InputError, match="not found"):
        lipcert.load(tmp_path / "missing.onnx")


def test_graph_disagreeing_with_onnxruntime_is_refused(monkeypatch):
    """If a converter were wrong, the cross-check must refuse the graph rather than bound it."""
    from lipcert.graph import nodes

    monkeypatch.setattr(nodes.Activation, "forward", lambda self, x: x)  # a broken ReLU
    with pytest.raises(ModelError, match="disagrees with onnxruntime"):
        lipcert.load(one_node_model("Relu", [1, 8]))


def test_double_precision_onnx_is_cross_checked_on_a_float32_copy(tmp_path, monkeypatch):
    """onnxruntime has no double Conv kernel: a float64 export was refused as "cannot run this
    model"; its float32 copy is cross-checked instead, and still catches a wrong converter."""
    from lipcert.graph import nodes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(48, 2)).double()
    path = tmp_path / "double.onnx"
    torch.onnx.export(net, torch.zeros(1, 2, 4, 4, dtype=torch.float64), str(path), dynamo=False)
    graph = lipcert.load(path)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert torch.allclose(graph.forward(x[None])[0], net(x), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(nodes.Activation, "forward", lambda self, x: x)  # a broken ReLU
    with pytest.raises(ModelError, match="disagrees with onnxruntime"):
        lipcert.load(path)


def test_linear_branches_of_the_graph_input_are_one_exact_layer():
    """x - conv(x) with x the network's input: the two branches (one of them the input itself)
    are one linear map whose exact norm is taken, not the sum of the branches' norms."""

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1, bias=False)

        def forward(self, x):
            return x - self.conv(x)

    torch.manual_seed(0)
    module = Residual().double()
    graph = lipcert.load(module, (1, 2, 5, 5))
    jac = torch.autograd.functional.jacobian(lambda x: module(x.reshape(1, 2, 5, 5)).reshape(-1), torch.zeros(50, dtype=torch.float64))
    exact = float(torch.linalg.matrix_norm(jac, 2))
    assert len(graph.nodes) == 1
    assert exact <= lipcert.bound(graph, "naive").value <= exact * (1 + 1e-8)


def test_a_module_with_a_branch_on_the_input_is_refused_with_the_reason():
    """The export traces at zeros: `if x.abs().max() > 3` keeps the branch taken there, and the
    graph (naive 0.65) missed the other (a pair stretched by 907). The cross-check's inputs at
    several scales take it, and the message names the cause."""

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            if x.abs().max() > 3:
                return 1000 * self.lin(x)
            return self.lin(x)

    with pytest.raises(ModelError, match="turns a tensor into a Python value"):
        lipcert.load(Branchy(), (1, 4))


def test_a_cross_check_that_compares_nothing_refuses_the_model():
    """onnxruntime's float32 outputs overflow on every random input (|x| summed by weights 3e38):
    its NaN deviations passed the cross-check, which then compared nothing; now refused."""
    m = graph_model([helper.make_node("Abs", ["x"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["y"])], [1, 64],
                    {"w": np.full((64, 2), 3e38, np.float32)})
    with pytest.raises(ModelError, match="not finite on any random input"):
        lipcert.load(m)
