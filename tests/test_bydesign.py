"""Lipschitz-by-design networks: sorting, L2-norm pooling, maxima, parametrised weights.

Each new op is checked against onnxruntime, each constant against pairs that attain it (so a
constant that became too small fails), and 1-Lipschitz networks must get a proven bound of 1.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import lipcert
from lipcert.config import Settings
from lipcert.errors import ModelError, UnsupportedModelError
from lipcert.estimators import estimate
from lipcert.graph import Extremum, NormPool, Sort
from onnx_helpers import graph_model, one_node_model
from test_onnx_ops import run_both
from zoo import GroupSort

RNG = np.random.default_rng(7)
NORMS = ("2", "inf", "1")
TOL = 1e-8  # a few SAFETY margins (1e-9 per layer) above the exact constant


def vec_norm(v: np.ndarray, p: str) -> float:
    return float(np.linalg.norm(v.ravel(), {"2": 2, "inf": np.inf, "1": 1}[p]))


def ratio(graph, x: np.ndarray, y: np.ndarray, p: str) -> float:
    fx, fy = graph.forward(torch.from_numpy(np.stack([x, y])))
    return vec_norm((fx - fy).numpy(), p) / vec_norm(x - y, p)


def naive(graph, p: str = "2") -> float:
    return estimate(graph, "naive", Settings(norm=p)).value


def export(module: torch.nn.Module, shape) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buffer, dynamo=False, opset_version=17, input_names=["x"])
    return onnx.load_from_string(buffer.getvalue())


# --- single ops against onnxruntime ---------------------------------------------------------------
@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([2], 0), ([1, 2], 1), ([-1, 1], 0), (None, 1)])
def test_reduce_extremum_matches_onnxruntime(op, axes, keepdims):
    attrs = {"keepdims": keepdims} | ({"axes": axes} if axes is not None else {})
    graph = run_both(one_node_model(op, [1, 3, 4, 2], opset=17, **attrs), (1, 3, 4, 2))
    assert any(isinstance(n, Sort) for n in graph.nodes)
    for p in NORMS:  # one order statistic per disjoint group: 1 in every norm
        assert naive(graph, p) == pytest.approx(1.0, rel=TOL)


def test_reduce_max_with_axes_as_input_opset18():
    model = one_node_model("ReduceMax", [1, 3, 4], {"axes": np.array([2], np.int64)}, ["axes"], opset=18, keepdims=0)
    run_both(model, (1, 3, 4))


@pytest.mark.parametrize("k,largest,axis", [(4, 1, -1), (2, 1, 1), (3, 0, -1)])
def test_topk_matches_onnxruntime(k, largest, axis):
    nodes = [helper.make_node("TopK", ["x", "k"], ["y", "idx"], axis=axis, largest=largest)]
    model = graph_model(nodes, [1, 3, 4], {"k": np.array([k], np.int64)})
    graph = run_both(model, (1, 3, 4))
    assert naive(graph) == pytest.approx(1.0, rel=TOL)


def test_topk_whose_indices_are_used_is_refused():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "idx"], name="the_topk"), helper.make_node("Cast", ["idx"], ["c"], to=1),
             helper.make_node("Add", ["v", "c"], ["y"])]
    model = graph_model(nodes, [1, 4], {"k": np.array([2], np.int64)})
    with pytest.raises(UnsupportedModelError, match="the_topk.*Indices"):
        lipcert.load(model)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_of_branches_and_of_constants(op):
    w = RNG.normal(size=(5, 5)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node(op, ["a", "b", "x"], ["y"])]
    graph = run_both(graph_model(nodes, [1, 5], {"w": w}), (1, 5))
    assert any(isinstance(n, Extremum) for n in graph.nodes)
    lw = np.linalg.norm(w, 2)
    assert naive(graph) == pytest.approx(math.sqrt(lw**2 + 2), rel=1e-6)  # composed like a Concat
    c = RNG.normal(size=(5,)).astype(np.float32)
    graph = run_both(one_node_model(op, [1, 5], {"c": c}, ["c"]), (1, 5))
    for p in NORMS:
        assert naive(graph, p) == pytest.approx(1.0, rel=TOL)


def test_abs_and_pow_one():
    graph = run_both(graph_model([helper.make_node("Pow", ["x", "one"], ["a"]), helper.make_node("Abs", ["a"], ["y"])],
                                 [1, 6], {"one": np.array(1.0, np.float32)}), (1, 6))
    assert naive(graph) == pytest.approx(1.0, rel=TOL)


@pytest.mark.parametrize("op,attrs,shape", [("DepthToSpace", {"mode": "DCR"}, (1, 8, 2, 3)), ("DepthToSpace", {"mode": "CRD"}, (1, 8, 2, 3)),
                                            ("SpaceToDepth", {}, (1, 2, 4, 6))])
def test_depth_space_permutations(op, attrs, shape):
    graph = run_both(one_node_model(op, list(shape), blocksize=2, **attrs), shape)
    assert naive(graph) == pytest.approx(1.0, rel=TOL)


def test_slice_and_reduce_mean():
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a"], ["c"]), helper.make_node("ReduceMean", ["c"], ["m"], axes=[1]),
             helper.make_node("Sub", ["c", "m"], ["y"])]
    inits = {"s": np.array([1], np.int64), "e": np.array([-1], np.int64), "a": np.array([1], np.int64)}
    graph = run_both(graph_model(nodes, [1, 7], inits), (1, 7))
    # c - mean(c) is one linear map (a projection): norm 1, not 1 + 1 for two branches
    assert naive(graph) == pytest.approx(1.0, rel=TOL)


@pytest.mark.parametrize("axis", [None, 1])
def test_branches_fallback_bounds_are_never_below_the_exact_norm(axis, monkeypatch):
    from lipcert.graph import linear
    from lipcert.graph.linear import Branches, MatMul, Reshape

    ops = [MatMul((1, 5), RNG.normal(size=(4, 5))), MatMul((1, 5), RNG.normal(size=(4, 5))), Reshape((1, 5), (1, 5))]
    ops = ops[:2] if axis is None else [ops[0], ops[1]]
    lin = Branches(ops, (1.0, -2.0) if axis is None else None, axis=axis)
    exact = {p: lin.norm_bound(p) for p in NORMS}
    assert all(e[1] for e in exact.values())
    monkeypatch.setattr(linear, "DENSE_LIMIT", 0)
    fresh = Branches(ops, (1.0, -2.0) if axis is None else None, axis=axis)
    for p in NORMS:
        value, is_exact, _ = fresh.norm_bound(p)
        assert not is_exact and value >= exact[p][0] * (1 - 1e-12)


@pytest.mark.parametrize("refused,pattern", [("Sqrt", "Sqrt.*not Lipschitz at 0"), ("Sign", "Sign")])
def test_unsupported_parts_are_refused_with_node_and_hint(refused, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        lipcert.load(one_node_model(refused, [1, 4]))
    with pytest.raises(UnsupportedModelError, match="the_pow.*L2-norm pooling"):
        lipcert.load(one_node_model("Pow", [1, 4], {"e": np.array(2.0, np.float32)}, ["e"]))


# --- L2-norm pooling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 1), (2, 1)])
def test_l2_norm_pool_is_one_node_with_attained_constants(kernel, stride):
    module = torch.nn.Sequential(torch.nn.LPPool2d(2, kernel, stride))
    model = export(module, (1, 2, 5, 5))
    assert {"Pow", "Sign", "AveragePool"} <= {n.op_type for n in model.graph.node}
    graph = run_both(model, (1, 2, 5, 5))
    (node,) = graph.nodes
    assert isinstance(node, NormPool)
    x = np.zeros((1, 2, 5, 5))
    for p in NORMS:
        bound = naive(graph, p)
        # every pair's ratio stays below; the witness of each proof attains it (from x = 0)
        for _ in range(20):
            a, b = RNG.normal(size=(2, 1, 2, 5, 5))
            assert ratio(graph, a, b, p) <= bound * (1 + 1e-12)
        if p == "inf":
            y = np.zeros_like(x)
            y[0, 0, :kernel, :kernel] = 1.0
        else:
            y = np.zeros_like(x)
            y[0, 0, 2, 2] = 1.0  # the centre entry is in the most windows
        assert ratio(graph, x, y, p) == pytest.approx(bound / (1 + 1e-9), rel=1e-9)
    if stride == kernel:
        assert naive(graph) == pytest.approx(1.0, rel=TOL)


def test_l2_norm_pool_with_a_reader_outside_the_idiom_is_refused():
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]), helper.make_node("AveragePool", ["sq"], ["avg"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sqrt", ["avg"], ["r"], name="the_sqrt"), helper.make_node("Add", ["r", "avg"], ["y"])]
    with pytest.raises(UnsupportedModelError, match="the_sqrt"):
        lipcert.load(graph_model(nodes, [1, 1, 4, 4], {"two": np.array(2.0, np.float32)}))


# --- 1-Lipschitz networks by construction ------------------------------------------------------------
def orthogonal_linear(n: int, m: int | None = None, seed: int = 0) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    layer = torch.nn.Linear(n, m or n).double()
    with torch.no_grad():
        layer.weight.copy_(q[: m or n])
        layer.bias.normal_(generator=gen)
    return layer


class MaxMin(torch.nn.Module):
    def forward(self, x):
        return torch.cat([torch.relu(x), torch.relu(-x)], 1)


@pytest.mark.parametrize("act", ["gs2", "full", "gs4", "maxmin", "chunk-maxmin"])
def test_gradient_norm_preserving_network_bound_is_one(act):
    layer = {"gs2": GroupSort(2), "full": GroupSort(8), "gs4": GroupSort(4), "maxmin": MaxMin(), "chunk-maxmin": ChunkMaxMin()}[act]
    width = 16 if act == "maxmin" else 8
    module = torch.nn.Sequential(orthogonal_linear(8), layer, orthogonal_linear(width, 8, 1), GroupSort(2) if act != "maxmin" else torch.nn.Identity(),
                                 orthogonal_linear(8, 8, 2))
    graph = lipcert.load(module, (1, 8))
    assert any(isinstance(n, Sort) for n in graph.nodes)
    for p in NORMS:
        if p != "2":
            continue  # orthogonal matrices are 1-Lipschitz in l2 only
        bound = naive(graph, p)
        assert 1.0 <= bound <= 1.0 + TOL, bound
    sdp = estimate(graph, "sdp", Settings(norm="2"))
    assert sdp.certified and 1.0 <= sdp.value <= 1.0 + 1e-6
    low = estimate(graph, "lower", Settings(norm="2", starts=8, steps=20))
    if act != "maxmin":  # an isometry almost everywhere: any point witnesses ~1
        assert low.value >= 0.99
    assert low.value <= 1.0 + 1e-9


def test_sorting_constant_is_attained_and_never_exceeded_in_every_norm():
    module = torch.nn.Sequential(GroupSort(3))
    graph = lipcert.load(module.double(), (1, 6))
    for p in NORMS:
        bound = naive(graph, p)
        assert bound == pytest.approx(1.0, rel=TOL)
        for _ in range(50):
            a, b = RNG.normal(size=(2, 1, 6))
            assert ratio(graph, a, b, p) <= bound
        a = np.array([[0.0, 1.0, 2.0, 0.0, 1.0, 2.0]])
        b = a.copy()
        b[0, 2] += 0.5
        assert ratio(graph, a, b, p) == pytest.approx(1.0)


def test_lipsdp_rewrites_pair_sorts_and_beats_the_product():
    """GroupSort2 as b + relu(a - b): LipSDP spans it and can prove less than the product of norms."""
    gen = torch.Generator().manual_seed(3)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), GroupSort(2), torch.nn.Linear(8, 8), GroupSort(2), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for layer in module[::2]:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64))
    graph = lipcert.load(module, (1, 6))
    sdp = estimate(graph, "sdp", Settings(norm="2"))
    low = estimate(graph, "lower", Settings(norm="2", starts=8, steps=30))
    nv = naive(graph)
    assert sdp.certified and low.value <= sdp.value <= nv * (1 + 1e-9)
    assert sdp.value < 0.95 * nv  # it is one LipSDP section across both sorts, not three products
    assert len(sdp.details["sections"]) == 1


# --- the PyTorch loader: parametrisations ---------------------------------------------------------------
def parametrised_module() -> torch.nn.Module:
    from torch.nn.utils import parametrizations as P

    torch.manual_seed(0)
    m = torch.nn.Sequential(P.orthogonal(torch.nn.Linear(20, 20)), GroupSort(2), P.spectral_norm(torch.nn.Linear(20, 10)), torch.nn.ReLU(),
                            P.weight_norm(torch.nn.Linear(10, 6)), torch.nn.utils.spectral_norm(torch.nn.Linear(6, 3)))
    return m


def test_parametrised_module_loads_and_is_left_untouched():
    m = parametrised_module()
    m.train()
    before = copy.deepcopy(m.state_dict())
    graph = lipcert.load(m, (1, 20))  # crosschecked against the module in eval mode
    assert m.training and type(m[0]).__name__ == "ParametrizedLinear"
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m[0].weight.shape == (20, 20)  # the parametrisation still works (its class was not altered)
    lipcert.load(m, (1, 20))  # and loads a second time
    # the product of the frozen layers' norms (spectral normalisation in eval mode divides by the
    # power-iteration estimate it has stored, so those layers are close to 1, not exactly 1)
    frozen = copy.deepcopy(m).eval()
    with torch.no_grad():
        frozen(torch.zeros(1, 20))  # the old-style spectral_norm hook sets .weight during a forward pass
        norms = [float(torch.linalg.matrix_norm(frozen[k].weight, 2)) for k in (0, 2, 4, 5)]
    assert norms[0] == pytest.approx(1.0, abs=1e-5)
    assert naive(graph) <= math.prod(norms) * (1 + 1e-6)
    assert naive(graph) >= estimate(graph, "lower", Settings(starts=8, steps=10)).value


def test_nan_in_a_parametrised_module_is_refused():
    from torch.nn.utils import parametrizations as P

    m = torch.nn.Sequential(P.orthogonal(torch.nn.Linear(4, 4)), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        m[0].parametrizations.weight.original.fill_(float("nan"))
    with pytest.raises(ModelError, match="NaN"):
        lipcert.load(m, (1, 4))


def test_shape_error_names_the_shape_and_the_batch_axis():
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(27, 2))
    with pytest.raises(ModelError, match=r"\(2, 5, 5\) \(the batch axis included\)") as err:
        lipcert.load(conv, (2, 5, 5))
    assert "(1, 2, 5, 5)" in err.value.message()
    lipcert.load(conv, (1, 2, 5, 5))


# --- certificates ------------------------------------------------------------------------------------
def test_certified_radii_of_a_one_lipschitz_classifier_are_margin_over_sqrt2():
    module = torch.nn.Sequential(orthogonal_linear(6), GroupSort(2), orthogonal_linear(6, 6, 1), GroupSort(2), orthogonal_linear(6, 3, 2))
    graph = lipcert.load(module, (1, 6))
    x = RNG.normal(size=(20, 1, 6))
    certs = lipcert.certified_radius(graph, x, method="naive")
    logits = graph.forward(torch.from_numpy(x)).reshape(20, -1).numpy()
    top2 = np.sort(logits, 1)[:, -2:]
    expected = (top2[:, 1] - top2[:, 0]) / math.sqrt(2)
    assert np.all(certs.radii <= expected * (1 + 1e-12))
    assert np.allclose(certs.radii, expected, rtol=1e-8)


# --- every deel-torchlip layer type, through vanilla_export() + ONNX and as a module -------------------
def torchlip_networks():
    """(name, builder, input shape, construction's l2 bound or None): the layers deel-torchlip offers."""
    tl = pytest.importorskip("deel.torchlip")

    class Residual(torch.nn.Module):  # LipResidual mixes x and f(x): alpha x + (1 - alpha) f(x)
        def __init__(self) -> None:
            super().__init__()
            self.f, self.mix = torch.nn.Sequential(tl.SpectralLinear(8, 8), tl.GroupSort2()), tl.LipResidual()

        def forward(self, x):
            return self.mix(x, self.f(x))

    flat = torch.nn.Flatten
    return [
        ("dense GroupSort2", lambda: tl.Sequential(tl.SpectralLinear(8, 16), tl.GroupSort2(), tl.SpectralLinear(16, 4)), (1, 8), 1.0),
        ("dense FullSort", lambda: tl.Sequential(tl.SpectralLinear(8, 16), tl.FullSort(), tl.SpectralLinear(16, 4)), (1, 8), 1.0),
        ("dense GroupSort(4)", lambda: tl.Sequential(tl.SpectralLinear(8, 8), tl.GroupSort(4), tl.SpectralLinear(8, 4)), (1, 8), 1.0),
        ("dense MaxMin", lambda: tl.Sequential(tl.SpectralLinear(8, 8), tl.MaxMin(), tl.SpectralLinear(16, 4)), (1, 8), 1.0),
        ("dense LPReLU", lambda: tl.Sequential(tl.SpectralLinear(8, 8), tl.LPReLU(), tl.SpectralLinear(8, 2)), (1, 8), 1.0),
        ("Frobenius", lambda: tl.Sequential(tl.FrobeniusLinear(8, 1)), (1, 8), 1.0),
        ("centering", lambda: tl.Sequential(tl.SpectralLinear(8, 8), tl.BatchCentering(8), tl.ScaleBiasLayer(), tl.GroupSort2(), tl.SpectralLinear(8, 2)), (1, 8), 1.0),
        ("layer centering", lambda: tl.Sequential(tl.SpectralLinear(8, 8), tl.LayerCentering(), tl.GroupSort2(), tl.SpectralLinear(8, 2)), (1, 8), 1.0),
        ("residual", lambda: torch.nn.Sequential(tl.SpectralLinear(8, 8), Residual(), tl.SpectralLinear(8, 2)), (1, 8), 1.0),
        ("conv ReLU L2-pool", lambda: tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), torch.nn.ReLU(), tl.ScaledL2NormPool2d(2), flat(), tl.SpectralLinear(16, 3)), (1, 1, 4, 4), 1.0),
        ("conv GroupSort2 avg-pool", lambda: tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledAvgPool2d(2), flat(), tl.SpectralLinear(16, 3)), (1, 1, 4, 4), 1.0),
        ("conv Frobenius global L2-pool", lambda: tl.Sequential(tl.FrobeniusConv2d(2, 4, 3, padding=1), tl.GroupSort2(), tl.ScaledAdaptativeL2NormPool2d(), flat(), tl.SpectralLinear(4, 2)), (1, 2, 4, 4), 1.0),
        ("conv global avg-pool", lambda: tl.Sequential(tl.SpectralConv2d(2, 4, 3, padding=1), tl.FullSort(), tl.ScaledAdaptiveAvgPool2d((1, 1)), flat(), tl.SpectralLinear(4, 2)), (1, 2, 4, 4), 1.0),
        ("conv1d", lambda: tl.Sequential(tl.SpectralConv1d(2, 4, 3, padding=1), tl.GroupSort2(), flat(), tl.SpectralLinear(24, 2)), (1, 2, 6), 1.0),
        ("conv transpose MaxMin", lambda: tl.Sequential(tl.SpectralConvTranspose2d(2, 4, 3, padding=1), tl.MaxMin(), flat(), tl.SpectralLinear(128, 2)), (1, 2, 4, 4), 1.0),
        ("invertible down/up sampling", lambda: tl.Sequential(tl.InvertibleDownSampling(2), tl.SpectralConv2d(8, 8, 1), tl.InvertibleUpSampling(2), flat(), tl.SpectralLinear(32, 2)), (1, 2, 4, 4), 1.0),
        ("circular padding", lambda: tl.Sequential(tl.SpectralConv2d(2, 4, 3, padding=1, padding_mode="circular"), tl.GroupSort2(), flat(), tl.SpectralLinear(64, 2)), (1, 2, 4, 4), None),
    ]


TORCHLIP = [pytest.param(n, id=n[0]) for n in (torchlip_networks() if __import__("importlib.util").util.find_spec("deel") else [])]


@pytest.mark.slow
@pytest.mark.parametrize("net", TORCHLIP)
def test_deel_torchlip_layers_load_both_ways_and_get_their_bound(net):
    name, build, shape, construction = net
    torch.manual_seed(0)
    module = build().eval()
    vanilla = module.vanilla_export() if hasattr(module, "vanilla_export") else module
    from_onnx = lipcert.load(export(vanilla, shape))  # cross-checked against onnxruntime
    from_module = lipcert.load(module, shape)  # cross-checked against the (frozen) module
    low = estimate(from_module, "lower", Settings(starts=4, steps=5)).value
    for graph in (from_onnx, from_module):
        bound = naive(graph)
        assert low <= bound
        if construction is not None:  # deel-torchlip's Björck/spectral steps are float32: 1e-6
            assert bound <= construction * (1 + 1e-6), (name, bound)


def test_householder_activation_is_refused_with_its_nodes():
    tl = pytest.importorskip("deel.torchlip")
    torch.manual_seed(0)
    module = tl.Sequential(tl.SpectralLinear(8, 8), tl.HouseHolder(8), tl.SpectralLinear(8, 2)).eval()
    with pytest.raises(UnsupportedModelError, match=r"Split\s+/1/Split") as err:
        lipcert.load(module, (1, 8))
    assert "comparisons are not continuous" in err.value.message()


def test_shipped_one_lipschitz_classifier_and_its_readme_numbers():
    from click.testing import CliRunner

    from conftest import MODELS, ROOT
    from lipcert.cli import main

    graph = lipcert.load(MODELS / "gnp_spiral.onnx")
    assert 1.0 <= naive(graph) <= 1.0 + 1e-5  # float32 weights: orthogonal to ~5e-7 per layer
    example = (ROOT / "README.md").read_text().split("## Lipschitz-by-design networks", 1)[1].split("## Supported ONNX ops", 1)[0]
    args = ["certify", str(MODELS / "gnp_spiral.onnx"), "--data", str(MODELS / "spiral_test.npz"), "--eps", "0.01", "--eps", "0.02",
            "--eps", "0.05", "--method", "naive"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for line in res.stdout.strip().splitlines():
        assert line in example, line
    # the `bound --method all` table: one row per method, with the value printed today (it lacked
    # compose and sdp-wide, and showed gram's 1.00123 from before gram's bound became 1)
    import json
    import re

    res = CliRunner().invoke(main, ["bound", str(MODELS / "gnp_spiral.onnx"), "--method", "all", "--json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)["results"]
    table = example.split("$ lipcert bound models/gnp_spiral.onnx --method all", 1)[1].split("$ lipcert certify", 1)[0]
    assert len(re.findall(r"^\S+\s+(?:upper|estimate|lower)\s", table, flags=re.M)) == len(results)
    for r in results:
        row = re.search(rf"^{r['method']}\s+{r['kind']}\s+l2\s+(\S+)", table, flags=re.M)
        assert row and abs(float(row.group(1)) - r["value"]) <= 1e-4 * r["value"], (r["method"], r["value"])


class ChunkMaxMin(torch.nn.Module):
    """MaxMin written with plain torch: the max and the min of the two halves, concatenated."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)


class TwoSourceMinMax(torch.nn.Module):
    """The min and the max of two different activations' outputs: a sort of pairs whose two
    sides are not affine in one tensor (the pairs stay a Concat)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = torch.nn.Linear(4, 5), torch.nn.Linear(4, 5), torch.nn.Linear(10, 3)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.tanh(self.b(x))
        return self.out(torch.cat([torch.minimum(a, b), torch.maximum(b, a)], 1))


@pytest.mark.parametrize("net", ["chunk-maxmin", "groupsort3", "lppool", "two-source-minmax"])
def test_every_method_bounds_sorting_pooling_and_extremum_networks(net):
    """Every method of ``--method all`` runs (the compositional walk has a rule for Sort, NormPool
    and elementwise Max/Min) and every proven bound lies above the witnessed lower bound; l2
    certificates run on them too."""
    from lipcert.estimators import estimate_all

    torch.manual_seed(3)
    module, shape = {
        "chunk-maxmin": (torch.nn.Sequential(torch.nn.Linear(4, 6), ChunkMaxMin(), torch.nn.Linear(6, 3)), (1, 4)),
        "groupsort3": (torch.nn.Sequential(torch.nn.Linear(4, 6), GroupSort(3), torch.nn.Linear(6, 3)), (1, 4)),
        "lppool": (torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.LPPool2d(2, 2), torch.nn.Flatten(),
                                       torch.nn.Linear(16, 3)), (1, 2, 4, 4)),
        "two-source-minmax": (TwoSourceMinMax(), (1, 4)),
    }[net]
    graph = lipcert.load(module.double(), shape)
    assert any(isinstance(n, (Sort, NormPool, Extremum)) for n in graph.nodes)
    results, _ = estimate_all(graph, Settings(norm="2", starts=8, steps=30))
    low = max(r.value for r in results if r.kind == "lower")
    uppers = {r.method: r.value for r in results if r.kind == "upper"}
    assert {"naive", "compose", "sdp-wide"} <= set(uppers) and all(r.status == "ok" for r in results)
    assert all(v >= low for v in uppers.values()), (uppers, low)
    x = np.random.default_rng(0).normal(size=(4, *shape[1:]))
    certs = lipcert.certified_radius(graph, x)
    assert np.all(np.isfinite(certs.radii)) and np.all(certs.radii >= 0)
