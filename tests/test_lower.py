"""Witnessed lower bounds: exact on known answers, below every proven upper bound, reproducible
by lipcert and independently by onnxruntime, and beyond the reference figures on real networks."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

import lipcert
from lipcert.cli import main
from lipcert.estimators.lower import graph_copy, input_spreads, network
from lipcert.witness import WitnessError, check_witness, check_witness_onnxruntime, onnxruntime_ratio
from conftest import MODELS, SHARED_MODELS, shared_model_files
from zoo import one_hidden_relu, single_linear

VNN = SHARED_MODELS / "vnncomp2021"
FAST = dict(starts=16, steps=10)


def _graph(z):
    return lipcert.load(z.module, z.input_shape)


@pytest.mark.parametrize("seed", [0, 4])
def test_single_linear_layer_gives_its_top_singular_value(seed):
    z = single_linear(seed=seed)
    r = lipcert.lower_bound(_graph(z), **FAST)
    assert r.kind == "lower" and not r.certified and r.norm == "2"
    assert r.value == pytest.approx(z.exact["2"], rel=1e-6)
    assert r.value <= z.exact["2"] * (1 + 1e-9)
    assert np.shape(r.witness["x"]) == np.shape(r.witness["y"]) == z.input_shape


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_hidden_relu_reaches_the_brute_force_constant(norm, seed):
    z = one_hidden_relu(seed)
    r = lipcert.lower_bound(_graph(z), norm=norm, starts=32, steps=20)
    assert r.value == pytest.approx(z.exact[norm], rel=1e-6)
    assert r.value <= z.exact[norm] * (1 + 1e-9)


def test_value_is_the_recomputed_witness_ratio_and_is_reproducible():
    graph = lipcert.load(MODELS / "mlp_spiral.onnx")
    a = lipcert.lower_bound(graph, seed=3, **FAST)
    b = lipcert.lower_bound(graph, seed=3, **FAST)
    assert a.value == b.value and a.witness["x"] == b.witness["x"]
    x, y = (torch.tensor(a.witness[k], dtype=torch.float64) for k in ("x", "y"))
    fx, fy = graph.forward(torch.stack([x, y]))
    assert a.value == pytest.approx(float((fx - fy).norm() / (x - y).norm()), rel=1e-12)
    assert a.details["jacobian_norm_at_witness"] >= a.value * (1 - 1e-6)  # a secant never beats the local slope here
    assert a.settings["seed"] == 3 and a.settings["starts"] == 16 and "smoothing" in a.settings


def test_tampered_witness_fails_loudly():
    graph = lipcert.load(MODELS / "mlp_spiral.onnx")
    r = lipcert.lower_bound(graph, **FAST)
    assert check_witness(graph, r.witness, r.value) == r.value
    tampered = dict(r.witness, y=(np.asarray(r.witness["y"]) + 1e-3).tolist())
    with pytest.raises(WitnessError, match="not the claimed"):
        check_witness(graph, tampered, r.value)
    with pytest.raises(WitnessError, match="not the claimed"):
        check_witness(graph, r.witness, r.value * 1.001)
    with pytest.raises(WitnessError, match="coincide"):
        check_witness(graph, dict(r.witness, y=r.witness["x"]), r.value)
    with pytest.raises(WitnessError, match="malformed"):
        check_witness(graph, {"x": [1.0, 2.0, 3.0], "y": [0.0]}, r.value)
    # the independent check on the ONNX file rejects it too
    with pytest.raises(WitnessError, match="onnxruntime"):
        check_witness_onnxruntime(MODELS / "mlp_spiral.onnx", r.witness, r.value * 1.5)


def test_a_network_that_ignores_its_input_has_the_witnessed_lower_bound_zero(tmp_path):
    """mlp_spiral with its first weight set to 0: no direction stretches, and the search ended with
    "the witness points coincide"; two distinct inputs with equal outputs witness 0."""
    model = onnx.load(str(MODELS / "mlp_spiral.onnx"))
    first = next(i for i in model.graph.initializer if i.name == "0.weight")
    first.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(first)), first.name))
    path = tmp_path / "blind.onnx"
    onnx.save(model, str(path))
    for norm in ("2", "inf"):
        r = lipcert.lower_bound(path, norm=norm, **FAST)
        assert r.value == 0.0 and r.status == "ok"
        assert not np.array_equal(np.asarray(r.witness["x"]), np.asarray(r.witness["y"]))
        assert check_witness_onnxruntime(path, r.witness, 0.0, norm) == 0.0


def test_onnxruntime_runs_float64_copies_where_it_can():
    path = VNN / "mnist-net_256x2.onnx"
    r = lipcert.lower_bound(path, **FAST)
    value, used, _ = onnxruntime_ratio(path, r.witness)
    assert used == "float64" and value == pytest.approx(r.value, rel=1e-6)
    _, used, _ = onnxruntime_ratio(MODELS / "cnn_bars.onnx", r.witness | {"x": np.zeros((1, 1, 8, 8)).tolist(), "y": np.ones((1, 1, 8, 8)).tolist()})
    assert used == "float32"  # onnxruntime has no float64 Conv


def test_smoothed_network_tends_to_the_real_one():
    graph = lipcert.load(VNN / "Convnet_maxpool.onnx")
    x = torch.rand((4, *graph.input_shape), dtype=torch.float64)
    spreads = input_spreads(graph, x)
    exact = graph.forward(x).flatten(1)
    gaps = [float((network(graph, w, spreads)(x) - exact).abs().max()) for w in (1.0, 1e-2, 1e-4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 * float(exact.abs().max())
    g32 = graph_copy(graph, torch.float32, torch.device("cpu"))
    assert float((network(g32)(x.float()).double() - exact).abs().max()) < 1e-4 * float(exact.abs().max())


def test_user_data_starts(tmp_path):
    spiral = np.load(MODELS / "spiral_test.npz")["x"]
    r = lipcert.lower_bound(MODELS / "mlp_spiral.onnx", data=spiral, **FAST)
    assert r.settings["data"] is True and r.value > 0
    with pytest.raises(lipcert.InputError, match="does not fit"):
        lipcert.lower_bound(MODELS / "mlp_spiral.onnx", data=np.zeros((3, 5)), **FAST)
    with pytest.raises(lipcert.InputError, match="does not fit"):  # 12 numbers: must not be read as 6 inputs
        lipcert.lower_bound(MODELS / "mlp_spiral.onnx", data=np.zeros((3, 4)), **FAST)
    with pytest.raises(lipcert.InputError, match="empty"):
        lipcert.lower_bound(MODELS / "mlp_spiral.onnx", data=np.zeros((0, 2)), **FAST)
    with pytest.raises(lipcert.InputError, match="'starts' parameter of lower_bound"):
        lipcert.lower_bound(MODELS / "mlp_spiral.onnx", starts=0)
    with pytest.raises(lipcert.InputError, match="'norm' parameter of lower_bound"):
        lipcert.lower_bound(MODELS / "mlp_spiral.onnx", norm="l3")
    with pytest.raises(lipcert.InputError, match="'norm' parameter of lower_bound"):  # not the CLI's --norm
        lipcert.lower_bound(MODELS / "mlp_spiral.onnx", norm=1)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("name", shared_model_files())
def test_shared_networks_beat_the_reference_and_stay_below_proven_bounds(name, norm, reference):
    """At least 97% of the reference lower figure (in fact far above it on most networks), never
    above the proven naive bound, and reproduced by onnxruntime on the ONNX file (float64 copy
    where onnxruntime can run one, else float32 with its rounding; see lipcert/witness.py)."""
    path = VNN / name
    graph = lipcert.load(path)
    ref = reference[f"vnncomp2021/{name}"][f"lower_l{norm}"]
    r = lipcert.lower_bound(graph, norm=norm)  # the defaults users get
    assert r.value >= 0.97 * ref, (r.value, ref)
    upper = lipcert.bound(graph, method="naive", norm=norm)
    assert upper.certified and r.value <= upper.value
    check_witness(graph, r.witness, r.value, norm)
    check_witness_onnxruntime(path, r.witness, r.value, norm)


def run(*args: str):
    return CliRunner().invoke(main, ["lower", *map(str, args)])


def test_cli_lower_json():
    res = run(MODELS / "mlp_spiral.onnx", "--json", "--starts", "8", "--steps", "5", "--norm", "inf")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    (r,) = out["results"]
    assert r["method"] == "lower" and r["kind"] == "lower" and r["norm"] == "inf" and r["certified"] is False
    assert np.shape(r["witness"]["x"]) == (1, 2) and np.shape(r["witness"]["y"]) == (1, 2)
    graph = lipcert.load(MODELS / "mlp_spiral.onnx")
    check_witness(graph, r["witness"], r["value"], "inf")


def test_cli_lower_table_and_cuda_fallback():
    res = run(MODELS / "mlp_spiral.onnx", "--starts", "8", "--steps", "5", "--device", "cuda")
    assert res.exit_code == 0, res.output
    assert "witnessed" in res.stdout and "witness:" in res.stdout
    if not torch.cuda.is_available():  # said once, as the table's note
        assert res.stdout.count("no CUDA device") == 1 and "no CUDA device" not in res.stderr


def test_cli_lower_data_and_bad_values(tmp_path):
    res = run(MODELS / "mlp_spiral.onnx", "--data", MODELS / "spiral_test.npz", "--starts", "8", "--steps", "3")
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((3, 2)))
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "no array 'x'" in res.output and "Traceback" not in res.output
    np.savez(bad, x=np.zeros((3, 5)))
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "does not fit" in res.output
    for flag, value in (("--norm", "1"), ("--starts", "0"), ("--steps", "-1"), ("--device", "tpu"), ("--seed", "x")):
        res = run(MODELS / "mlp_spiral.onnx", flag, value)
        assert res.exit_code == 2 and f"Invalid value for '{flag}'" in res.output, (flag, res.output)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run where one is lent)")
def test_cuda_search_gives_a_valid_witness():
    graph = lipcert.load(VNN / "cifar_base_kw.onnx")
    r = lipcert.lower_bound(graph, device="cuda", **FAST)
    assert r.details["device"].startswith("cuda") and not r.warnings
    check_witness(graph, r.witness, r.value)


# --- search sized to the network --------------------------------------------------------------------
def _conv_net(width: int, size: int, outputs: int = 10) -> lipcert.Graph:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(width * size * size, outputs)).double()
    return lipcert.load(module, (1, 3, size, size))


def test_small_networks_get_the_full_default_search():
    from lipcert.config import Settings
    from lipcert.estimators.lower import DEFAULT_STARTS, PROPOSALS, plan_search

    graph = _conv_net(4, 8)
    starts, steps, proposals, _, note = plan_search(graph, Settings(), torch.device("cpu"))
    assert (starts, steps, proposals, note) == (DEFAULT_STARTS, 50, PROPOSALS, None)


def test_circular_convolutions_count_as_convolutions_in_the_search_plan():
    """A circularly padded convolution (one CircularConv after loading) gets the convolutional
    search: float32, 50 steps, its flops counted (it got the dense networks' 200 float64 steps:
    58 s instead of 1.6 s on a 3x6x6 input)."""
    from lipcert.estimators import lower

    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    graph = lipcert.load(torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2)), (1, 3, 6, 6))
    assert lower.resolve_steps(graph, None) == lower.CONV_STEPS
    assert lower.forward_flops(graph) >= 2 * 144 * 27


def test_the_search_stops_at_a_budget_deadline():
    """Under --budget every method gets a deadline (estimate_all: half the time left for those that
    finish on their own); the search stops its ascent there with a witnessed value and says so,
    and the budget's notes say the lower bound (not a proven one) was cut. It took 98 s of a
    60 s budget on Convnet_maxpool under load."""
    from lipcert.budget import Budget
    from lipcert.config import Settings
    from lipcert.estimators import estimate_all

    graph = _conv_net(4, 8)
    budget = Budget(0.01)
    results, _ = estimate_all(graph, Settings(), budget=budget)
    low = next(r for r in results if r.method == "lower")
    assert low.details["stopped_at_deadline"] and any("after 1 of 50 ascent steps" in w for w in low.warnings)
    assert "lower stopped early (a witnessed, smaller lower bound)" in budget.cut
    assert 0 < low.value <= min(r.value for r in results if r.kind == "upper")
    assert not lipcert.lower_bound(graph, steps=3).details["stopped_at_deadline"]  # no budget, no deadline


def test_large_networks_get_a_search_that_fits_the_work_budget(monkeypatch):
    """A network whose full default search would exceed SEARCH_FLOPS gets fewer starts and steps
    and a note; the user's --starts is kept as given."""
    from lipcert.config import Settings
    from lipcert.estimators import lower

    graph = _conv_net(16, 16)
    full = lower.search_work(graph, "2", 64, 50, lower.PROPOSALS)
    monkeypatch.setitem(lower.SEARCH_FLOPS, "cpu", full / 20)
    starts, steps, proposals, screen, note = lower.plan_search(graph, Settings(), torch.device("cpu"))
    assert starts < 64 and steps < 50 and proposals == 1 and note and "--starts" in note
    assert lower.search_work(graph, "2", starts, steps, proposals, screen) <= full / 20
    assert lower.plan_search(graph, Settings(starts=64), torch.device("cpu"))[:3] == (64, 50, lower.PROPOSALS)
    r = lipcert.lower_bound(graph, steps=3)  # sized starts, the user's steps; still a witnessed value
    assert r.settings["steps"] == 3 and r.settings["starts"] < 64 and any("large" in w for w in r.warnings)
    assert r.value <= lipcert.bound(graph, method="naive").value


def test_power_norm_for_many_outputs_is_below_and_near_the_exact_norm():
    from lipcert.estimators.lower import graph_copy, jacobian, jacobian_norm, network, power_norm

    graph = graph_copy(_conv_net(4, 6, outputs=100), torch.float64, torch.device("cpu"))
    f = network(graph)
    x = torch.randn((3, 3, 6, 6), dtype=torch.float64, generator=torch.Generator().manual_seed(1)).reshape(3, 1, 3, 6, 6)
    exact, _, _ = jacobian_norm(jacobian(f, x, 100), "2")
    est, v, _ = power_norm(f, x, 100)
    assert bool((est <= exact * (1 + 1e-9)).all()) and bool((est >= 0.9 * exact).all())
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64))
