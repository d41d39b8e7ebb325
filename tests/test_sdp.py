"""LipSDP: proven, tighter than naive, solver-independent after verification, clear on failure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import lipcert
from lipcert.cli import main
from lipcert.config import Settings
from lipcert.estimators.sdp import pairwise_lipschitz, solve_cvxpy
from lipcert.estimators.sdp_problem import problem_from_graph, verify
from conftest import MODELS, SHARED_MODELS
from zoo import one_hidden_relu, single_linear

SPIRAL = MODELS / "mlp_spiral.onnx"


def test_single_linear_layer_equals_exact_norm():
    z = single_linear(seed=2)
    r = lipcert.bound(z.module, method="sdp", input_shape=z.input_shape)
    assert r.certified and r.value >= z.exact["2"]
    assert r.value == pytest.approx(z.exact["2"], rel=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_hidden_layer_brute_force(seed):
    z = one_hidden_relu(seed)
    graph = lipcert.load(z.module, z.input_shape)
    sdp = lipcert.bound(graph, method="sdp")
    assert sdp.certified and sdp.kind == "upper"
    assert z.exact["2"] <= sdp.value <= lipcert.bound(graph).value
    assert sdp.details["solver_value"] is not None  # both numbers are kept


@pytest.mark.parametrize("path", [SPIRAL, SHARED_MODELS / "vnncomp2021" / "test_small.onnx", SHARED_MODELS / "vnncomp2021" / "test_tiny.onnx"])
def test_sdp_between_sampled_lower_and_naive(path):
    graph = lipcert.load(path)
    sdp, naive = lipcert.bound(graph, method="sdp"), lipcert.bound(graph)
    x = torch.rand((2000, *graph.input_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 2
    jac_lower = 0.0
    for xi in x[:200]:
        j = torch.autograd.functional.jacobian(lambda t: graph.forward(t[None])[0].flatten(), xi).reshape(graph.output_dim, -1)
        jac_lower = max(jac_lower, float(torch.linalg.matrix_norm(j, 2)))
    assert jac_lower <= sdp.value <= naive.value * (1 + 1e-9)


def test_two_solvers_agree_after_verification():
    graph = lipcert.load(SPIRAL)
    values = {s: lipcert.bound(graph, method="sdp", solver=s).value for s in ("CLARABEL", "SCS", "CVXOPT")}
    ref = values["CLARABEL"]
    for s, v in values.items():
        assert v == pytest.approx(ref, rel=2e-3), (s, values)  # SCS is a first-order method


def test_neuron_is_tighter_than_layer():
    graph = lipcert.load(SPIRAL)
    neuron = lipcert.bound(graph, method="sdp", sdp_variant="neuron").value
    layer = lipcert.bound(graph, method="sdp", sdp_variant="layer").value
    assert neuron <= layer * (1 + 1e-6)


def test_scaling_does_not_change_the_verified_value():
    z = one_hidden_relu(5)
    problem = problem_from_graph(lipcert.load(z.module, z.input_shape))
    big = problem.with_last(problem.weights[-1] * 1e4)
    lams, info = solve_cvxpy(big, "neuron", "CLARABEL")
    lams_small, _ = solve_cvxpy(problem, "neuron", "CLARABEL")
    assert verify(big, lams).value == pytest.approx(1e4 * verify(problem, lams_small).value, rel=1e-5)


def test_solver_failure_is_a_clear_status_never_a_number():
    graph = lipcert.load(SPIRAL)
    r = lipcert.bound(graph, method="sdp", solver="SCS", extra={"solver_opts": {"max_iters": 1}})
    assert r.value is None and not r.certified
    assert "failed" in r.status
    r = lipcert.bound(graph, method="sdp", solver="CLARABEL", extra={"solver_opts": {"max_iter": 1}})
    assert r.value is None and not r.certified and "failed" in r.status


def test_cli_sdp_failure_exits_nonzero_and_all_keeps_going(monkeypatch):
    import lipcert.estimators.sdp as sdp

    def broken(problem, variant, solver, opts=None):
        return None, {"status": "infeasible"}

    monkeypatch.setattr(sdp, "solve_cvxpy", broken)
    monkeypatch.setattr(sdp, "fast_solver_available", lambda: False)
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "sdp"])
    assert res.exit_code == 1 and "infeasible" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "all", "--json"])
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    by_method = {r["method"]: r for r in out["results"]}
    assert by_method["sdp"]["value"] is None and by_method["naive"]["value"] > 0


def test_method_all_marks_the_best_proven_bound():
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "all", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    proven = [r for r in out["results"] if r["kind"] == "upper" and r["certified"]]
    best = min(proven, key=lambda r: r["value"])
    assert out["best_upper"] == best["method"] == "sdp"
    table = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "all"]).stdout
    assert "best" in table


def test_unknown_solver_is_refused():
    with pytest.raises(lipcert.InputError, match="not installed"):
        lipcert.bound(SPIRAL, method="sdp", solver="NOPE")


def test_pairwise_bounds_are_below_sqrt2_times_L():
    graph = lipcert.load(SPIRAL)
    full = lipcert.bound(graph, method="sdp").value
    pairs = pairwise_lipschitz(graph, [(0, 1), (0, 2), (1, 2), (1, 0)], Settings())
    assert pairs[(0, 1)] == pairs[(1, 0)]
    for v in pairs.values():
        assert v is not None and v <= np.sqrt(2) * full * (1 + 1e-6)


def _random_net(widths, act, seed):
    gen = torch.Generator().manual_seed(seed)
    acts = {"relu": torch.nn.ReLU, "leaky": lambda: torch.nn.LeakyReLU(0.2), "tanh": torch.nn.Tanh,
            "sigmoid": torch.nn.Sigmoid, "elu": torch.nn.ELU, "softplus": torch.nn.Softplus}
    layers, n_in = [], 3
    for w in widths:
        lin = torch.nn.Linear(n_in, w)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, n_in, generator=gen))
            lin.bias.copy_(torch.randn(w, generator=gen))
        layers += [lin, acts[act]()]
        n_in = w
    layers.append(torch.nn.Linear(n_in, 2))
    return torch.nn.Sequential(*layers)


@settings(max_examples=12, deadline=None)
@given(widths=st.lists(st.integers(2, 5), min_size=1, max_size=2),
       act=st.sampled_from(["relu", "leaky", "tanh", "sigmoid", "elu", "softplus"]), seed=st.integers(0, 1000))
def test_property_verified_sdp_above_sampled_lower_bound(widths, act, seed):
    graph = lipcert.load(_random_net(widths, act, seed), (1, 3))
    sdp = lipcert.bound(graph, method="sdp", solver="CLARABEL")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((300, 1, 3), generator=gen, dtype=torch.float64) * 2
    best = 0.0
    for xi in x[:60]:
        j = torch.autograd.functional.jacobian(lambda t: graph.forward(t[None])[0].flatten(), xi).reshape(2, 3)
        best = max(best, float(torch.linalg.matrix_norm(j, 2)))
    y = x + 1e-2 * torch.randn_like(x)
    ratios = (graph.forward(x) - graph.forward(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert max(best, float(ratios.max())) <= sdp.value
