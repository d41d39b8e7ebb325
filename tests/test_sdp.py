"""LipSDP: proven, tighter than naive, solver-independent after verification, clear on failure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import lipcert
import lipcert.estimators.sdp as sdp
import lipcert.sdp.solve as sdp_solve
from lipcert.cli import format_results, main
from lipcert.config import Settings
from lipcert.estimators import ESTIMATORS
from lipcert.estimators.sdp import pairwise_lipschitz
from lipcert.sdp.problem import LipSDPProblem, problem_from_graph, verify
from lipcert.sdp.solve import solve_cvxpy
from conftest import MODELS, SHARED_MODELS
from zoo import one_hidden_relu, single_linear

SPIRAL = MODELS / "mlp_spiral.onnx"
BARS = MODELS / "cnn_bars.onnx"
VNN = SHARED_MODELS / "vnncomp2021"
ACTS = {"relu": torch.nn.ReLU, "leaky": lambda: torch.nn.LeakyReLU(0.2), "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid, "elu": torch.nn.ELU, "softplus": torch.nn.Softplus}


@pytest.fixture(scope="module")
def spiral():
    return lipcert.load(SPIRAL)


def sampled_lower(graph: lipcert.Graph, n: int = 200, seed: int = 0, scale: float = 2.0, rows=None) -> float:
    """max ||J(x)||_2 over random points (torch autograd on the float64 forward) and max
    ||f(x) - f(y)|| / ||x - y|| over random nearby pairs: a valid lower bound on L.
    ``rows``: a (k x m) matrix applied to the output (e.g. e_y - e_j for a pairwise constant)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand((n, *graph.input_shape), generator=gen, dtype=torch.float64) * 2 - 1) * scale
    R = None if rows is None else torch.as_tensor(np.atleast_2d(rows), dtype=torch.float64)

    def f(t: torch.Tensor) -> torch.Tensor:
        out = graph.forward(t).flatten(1)
        return out if R is None else out @ R.T

    best = 0.0
    for xi in x[: min(n, 100)]:
        jac = torch.autograd.functional.jacobian(lambda t: f(t[None])[0], xi).reshape(f(xi[None]).shape[1], -1)
        best = max(best, float(torch.linalg.matrix_norm(jac, 2)))
    y = x + 1e-3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ratios = (f(x) - f(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    return max(best, float(ratios.max()))


def random_net(widths: list[int], act: str, seed: int, n_in: int = 3, n_out: int = 2) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for w in [*widths, n_out]:
        lin = torch.nn.Linear(n_in, w)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, n_in, generator=gen))
            lin.bias.copy_(torch.randn(w, generator=gen))
        layers += [lin, ACTS[act]()]
        n_in = w
    return torch.nn.Sequential(*layers[:-1])


# --- known answers --------------------------------------------------------------------------


def test_single_linear_layer_equals_exact_norm():
    z = single_linear(seed=2)
    r = lipcert.bound(z.module, method="sdp", input_shape=z.input_shape)
    assert r.certified and r.status == "ok" and r.value >= z.exact["2"]
    assert r.value == pytest.approx(z.exact["2"], rel=1e-8)
    assert any("no activation" in w and "svd" in w for w in r.warnings)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_one_hidden_layer_brute_force(seed):
    z = one_hidden_relu(seed)
    graph = lipcert.load(z.module, z.input_shape)
    r = lipcert.bound(graph, method="sdp")
    assert r.certified and r.kind == "upper" and r.status == "ok"
    assert z.exact["2"] <= r.value <= lipcert.bound(graph).value
    # both numbers are kept, and the result says how it was obtained
    d = r.details
    assert d["solver_value"] is not None and d["verified_value"] == r.value
    assert d["variant"] == "neuron" and d["lmi_rows"] == [6 + 5] and d["sections"][0]["time_s"] >= 0
    assert r.settings["solver"] and r.settings["safety_margin"] > 0


@pytest.mark.parametrize("name", ["test_nano.onnx", "test_tiny.onnx", "test_small.onnx"])
def test_shared_test_networks(name, reference):
    graph = lipcert.load(VNN / name)
    r, naive = lipcert.bound(graph, method="sdp"), lipcert.bound(graph)
    ref = reference[f"vnncomp2021/{name}"]
    lower = max(ref["lower_l2"], sampled_lower(graph))
    assert r.certified and lower * (1 - 1e-9) <= r.value <= naive.value * (1 + 1e-9)


def test_spiral_between_sampled_lower_and_naive(spiral):
    r = lipcert.bound(spiral, method="sdp")
    assert r.certified
    assert sampled_lower(spiral) <= r.value <= lipcert.bound(spiral).value
    assert r.value < 0.6 * lipcert.bound(spiral).value  # LipSDP is much tighter here


def test_cnn_between_sampled_lower_and_naive():
    graph = lipcert.load(BARS)
    r = lipcert.bound(graph, method="sdp")
    assert r.certified, r.status
    assert sampled_lower(graph, n=100, scale=1.0) <= r.value <= lipcert.bound(graph).value * (1 + 1e-9)


# --- solvers --------------------------------------------------------------------------------


def test_solvers_agree_after_verification(spiral):
    values = {s: lipcert.bound(spiral, method="sdp", solver=s) for s in ("CLARABEL", "SCS", "SDPA", "CVXOPT", "lipcert-fast")}
    assert all(r.certified for r in values.values()), {s: r.status for s, r in values.items()}
    ref = values["CLARABEL"].value
    for s, r in values.items():
        # SCS is a first-order method (eps 1e-4 by default): within 1e-3; the interior-point ones 1e-6
        assert r.value == pytest.approx(ref, rel=1e-3 if s == "SCS" else 1e-6), s
        assert r.settings["solver"] == s


def test_optimal_inaccurate_is_verified_and_said(spiral):
    r = lipcert.bound(spiral, method="sdp", solver="SDPA")
    assert r.details["sections"][0]["solver_status"] in ("optimal", "optimal_inaccurate")
    if r.details["sections"][0]["solver_status"] == "optimal_inaccurate":
        assert r.certified and any("optimal_inaccurate" in w and "verified" in w for w in r.warnings)


def test_neuron_is_tighter_than_layer(spiral):
    neuron = lipcert.bound(spiral, method="sdp", sdp_variant="neuron")
    layer = lipcert.bound(spiral, method="sdp", sdp_variant="layer", solver="CVXOPT")
    assert layer.details["sections"][0]["multipliers"] == 2 and layer.settings["variant"] == "layer"
    assert neuron.value <= layer.value * (1 + 1e-6) <= lipcert.bound(spiral).value * (1 + 1e-6)


def test_scaling_does_not_change_the_verified_value():
    # ReLU is positively homogeneous: W1 -> c W1, W2 -> W2 / c leaves the function unchanged,
    # and a badly scaled problem must give the same verified value as the balanced one
    z = one_hidden_relu(5)
    problem = problem_from_graph(lipcert.load(z.module, z.input_shape))
    W1, W2 = problem.weights
    skewed = LipSDPProblem([W1 * 1e3, W2 / 1e3], problem.alphas, problem.betas)
    ref = verify(problem, solve_cvxpy(problem, "neuron", "CLARABEL", scale=False)[0]).value
    for p in (problem, skewed):
        lams, _ = solve_cvxpy(p, "neuron", "CLARABEL")
        assert verify(p, lams).value == pytest.approx(ref, rel=1e-7)
    big = problem.with_last(W2 * 1e4)
    assert verify(big, solve_cvxpy(big, "neuron", "CLARABEL")[0]).value == pytest.approx(1e4 * ref, rel=1e-7)


def test_real_network_with_multipliers_over_many_decades(reference):
    # ACAS Xu: weights and multipliers span many decades; naive says 2.9e7
    name = "ACASXU_run2a_1_1_batch_2000.onnx"
    graph = lipcert.load(VNN / name)
    r = lipcert.bound(graph, method="sdp")
    assert r.certified, r.status
    assert reference[f"vnncomp2021/{name}"]["lower_l2"] <= r.value <= 1e-2 * lipcert.bound(graph).value


def test_unknown_solver_is_refused_with_the_installed_list():
    with pytest.raises(lipcert.InputError, match="not installed") as exc:
        lipcert.bound(SPIRAL, method="sdp", solver="NOPE")
    assert "CLARABEL" in exc.value.message()
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "sdp", "--solver", "nope"])
    assert res.exit_code == 1 and "not installed" in res.output and "Traceback" not in res.output


def test_installed_solver_that_cannot_solve_sdps_is_refused_and_not_offered():
    """cvxpy's LP/QP solvers (OSQP, GLPK, HIGHS, ...) cannot solve LipSDP: naming one is refused
    at once, and the list of choices holds only SDP solvers (it offered OSQP, which then failed)."""
    import cvxpy

    from lipcert.catalog import SDP_SOLVER_MODULES

    non_sdp = [s for s in cvxpy.installed_solvers() if s not in SDP_SOLVER_MODULES]
    with pytest.raises(lipcert.InputError) as exc:
        lipcert.bound(SPIRAL, method="sdp", solver="NOPE")
    assert not any(s in exc.value.message() for s in non_sdp), exc.value.message()
    if non_sdp:
        with pytest.raises(lipcert.InputError, match="cannot solve semidefinite") as exc:
            lipcert.bound(SPIRAL, method="sdp", solver=non_sdp[0].lower())
        assert "CLARABEL" in exc.value.message()


def test_only_l2_and_small_enough_sections_are_accepted():
    est = ESTIMATORS["sdp"]
    g = lipcert.load(SPIRAL)
    assert "l2" in est.accepts(g, Settings(norm="inf"))
    big = lipcert.load(VNN / "Convnet_avgpool.onnx")
    assert "rows" in est.accepts(big, Settings())


# --- failures end in a clear status, never a number ------------------------------------------


@pytest.mark.parametrize("solver,opts", [("SCS", {"max_iters": 1}), ("CLARABEL", {"max_iter": 1})])
def test_solver_failure_is_a_clear_status_never_a_number(spiral, solver, opts):
    r = lipcert.bound(spiral, method="sdp", solver=solver, extra={"solver_opts": opts})
    assert r.value is None and not r.certified
    assert r.status.startswith(("solver_failed:", "not_verified:")) and solver in r.status


def test_bad_multipliers_are_rejected(spiral, monkeypatch):
    monkeypatch.setattr(sdp_solve, "solve_cvxpy", lambda p, v, s, o=None, scale=True: ([np.zeros(n) for n in p.widths[1:]], {"status": "optimal", "solver_value": 1.0}))
    r = lipcert.bound(spiral, method="sdp", solver="CVXOPT")
    assert r.value is None and not r.certified and r.status.startswith("not_verified:")
    assert r.details["solver_value"] == 1.0  # the claim is kept for the record, never as the bound


def test_fast_solver_failure_falls_back_to_a_generic_solver(spiral, monkeypatch):
    from lipcert.sdp import fast as lipsdp_fast

    def broken(problem, variant="neuron", **opts):
        raise RuntimeError("boom")

    monkeypatch.setattr(lipsdp_fast, "solve", broken)
    r = lipcert.bound(spiral, method="sdp")
    attempts = r.details["sections"][0]["attempts"]
    assert r.certified and attempts[0]["solver"] == "lipcert-fast" and "boom" in attempts[0]["status"]
    assert attempts[1]["solver"] == sdp_solve.default_solver() and attempts[1]["status"] == "ok"
    monkeypatch.setattr(sdp_solve, "solve_cvxpy", lambda *a, **k: (None, {"status": "infeasible"}))
    r = lipcert.bound(spiral, method="sdp")
    assert r.value is None and "boom" in r.status and "infeasible" in r.status


def test_cli_sdp_failure_exits_nonzero_and_all_keeps_going(monkeypatch):
    monkeypatch.setattr(sdp_solve, "solve_cvxpy", lambda *a, **k: (None, {"status": "infeasible"}))
    for module in (sdp, sdp_solve):
        monkeypatch.setattr(module, "fast_solver_available", lambda: False)
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "sdp"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "infeasible" in res.stderr and res.stderr.count("Error") == 1
    monkeypatch.delitem(ESTIMATORS, "lower", raising=False)  # slow, and not what this test is about
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "all", "--json"])
    assert res.exit_code == 0, res.output
    by_method = {r["method"]: r for r in json.loads(res.stdout)["results"]}
    assert by_method["sdp"]["value"] is None and by_method["sdp"]["certified"] is False
    assert by_method["naive"]["value"] > 0


@pytest.mark.slow
def test_method_all_marks_the_best_proven_bound():
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "all", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    proven = [r for r in out["results"] if r["kind"] == "upper" and r["certified"]]
    assert out["best_upper"] == min(proven, key=lambda r: r["value"])["method"] == "sdp"
    assert [r["method"] for r in out["results"] if r.get("best")] == ["sdp"]
    assert {"naive", "sdp"} <= {r["method"] for r in out["results"]}
    results = [lipcert.Result(**{k: v for k, v in r.items() if k not in ("layers", "best")}) for r in out["results"]]
    table = format_results(results, best="sdp")
    assert any(line.startswith("sdp") and "best" in line for line in table.splitlines())


# --- sections: residual blocks and max-pooling ------------------------------------------------


class _ResNet(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.inp, self.a, self.b, self.out = (torch.nn.Linear(*s) for s in [(4, 6), (6, 8), (8, 6), (6, 3)])
        for lin in (self.inp, self.a, self.b, self.out):
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = h + self.b(torch.tanh(self.a(h)))
        return self.out(torch.relu(h))


def _maxpool_cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(8, 6), torch.nn.LeakyReLU(0.1), torch.nn.Linear(6, 3))


@pytest.mark.parametrize("make,shape", [(_ResNet, (1, 4)), (_maxpool_cnn, (1, 1, 4, 4))], ids=["residual", "maxpool"])
def test_sections_are_composed_and_said(make, shape):
    graph = lipcert.load(make(0), shape)
    r, naive = lipcert.bound(graph, method="sdp"), lipcert.bound(graph)
    assert r.certified and r.status == "ok", r.status
    assert any("sections" in w and "composed" in w for w in r.warnings)
    assert len(r.details["sections"]) >= 2
    assert sampled_lower(graph, n=100) <= r.value <= naive.value * (1 + 1e-9)


def test_a_failed_section_fails_the_whole_bound(monkeypatch):
    graph = lipcert.load(_ResNet(1), (1, 4))
    calls = []
    real = sdp.solve_problem

    def second_fails(problem, settings):
        calls.append(problem.dim)
        out = real(problem, settings)
        return out if len(calls) != 2 else sdp_solve.Solved(None, None, "solver_failed: test", "X", "failed", 0.0)

    monkeypatch.setattr(sdp, "solve_problem", second_fails)
    r = lipcert.bound(graph, method="sdp")
    assert r.value is None and not r.certified and "solver_failed: test" in r.status and "section" in r.status


# --- pairwise bounds for certificates -------------------------------------------------------


def test_pairwise_bounds(spiral):
    full = lipcert.bound(spiral, method="sdp").value
    pairs = pairwise_lipschitz(spiral, [(0, 1), (0, 2), (1, 2), (1, 0)], Settings())
    assert pairs[(0, 1)] == pairs[(1, 0)]
    for (y, j), v in pairs.items():
        e = np.zeros((1, 3))
        e[0, y], e[0, j] = 1.0, -1.0
        assert v is not None and sampled_lower(spiral, n=100, rows=e) <= v <= np.sqrt(2) * full * (1 + 1e-6)


def test_pairwise_on_linear_and_residual_networks():
    z = single_linear(seed=1)
    g = lipcert.load(z.module, z.input_shape)
    W = z.module[0].weight.detach().double().numpy()
    out = pairwise_lipschitz(g, [(0, 3)], Settings())
    assert out[(0, 3)] == pytest.approx(np.linalg.norm(W[0] - W[3]), rel=1e-8) and out[(0, 3)] >= np.linalg.norm(W[0] - W[3])
    g = lipcert.load(_ResNet(2), (1, 4))
    L = lipcert.bound(g, method="sdp").value
    e = np.array([[0.0, 1.0, -1.0]])
    v = pairwise_lipschitz(g, [(1, 2)], Settings())[(1, 2)]
    assert sampled_lower(g, n=100, rows=e) <= v <= np.sqrt(2) * L * (1 + 1e-6)


# --- property: verified LipSDP is never below a sampled lower bound ----------------------------


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(2, 5), min_size=1, max_size=3), act=st.sampled_from(sorted(ACTS)),
       solver=st.sampled_from([None, "SDPA", "CVXOPT", "SCS", "CLARABEL"]), variant=st.sampled_from(["neuron", "layer"]),
       seed=st.integers(0, 10_000))
def test_property_verified_sdp_above_sampled_lower_bound(widths, act, solver, variant, seed):
    graph = lipcert.load(random_net(widths, act, seed), (1, 3))
    r = lipcert.bound(graph, method="sdp", solver=solver, sdp_variant=variant)
    if r.value is None:  # a solver may fail; then it must say so and claim nothing
        assert not r.certified and r.status.startswith(("solver_failed", "not_verified"))
        return
    assert r.certified
    assert sampled_lower(graph, n=120, seed=seed) <= r.value <= lipcert.bound(graph).value * (1 + 1e-9)


def test_time_limit_stops_early_with_a_proven_looser_bound():
    graph = lipcert.load(SHARED_MODELS / "vnncomp2021" / "ACASXU_run2a_1_1_batch_2000.onnx")
    full = lipcert.bound(graph, method="sdp")
    cut = ESTIMATORS["sdp"].run(graph, Settings(extra={"fast_time_limit": 1e-6}))
    (section,) = cut.details["sections"]
    assert section["solver_status"] == "time_limit" and cut.certified
    assert cut.value >= full.value * (1 - 1e-9)  # a stop never makes it tighter than the optimum
    assert cut.value <= lipcert.bound(graph, method="naive").value
    assert any("time_limit" in w for w in cut.warnings)
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "sdp", "--time-limit", "0"])
    assert res.exit_code == 2 and "--time-limit" in res.output
    res = CliRunner().invoke(main, ["bound", str(SPIRAL), "--method", "sdp", "--time-limit", "30", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["results"][0]["settings"]["time_limit"] == 30
