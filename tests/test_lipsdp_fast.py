"""The structure-aware LipSDP solver: agreement with a reference cvxpy formulation, soundness of
what it returns (re-verified in float64), the rescaling it relies on, and the real networks."""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch

import lipcert
from lipcert.sdp import fast as lipsdp_fast
from lipcert.sdp.problem import LipSDPProblem, expand_multipliers, problem_from_graph, verify
from conftest import SHARED_MODELS

SLOPES = {"relu": (0.0, 1.0), "leaky": (0.1, 1.0), "tanh": (0.0, 1.0), "sigmoid": (0.0, 0.25)}


def random_problem(widths: list[int], act: str, seed: int, per_neuron: bool = False) -> LipSDPProblem:
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=(widths[k + 1], widths[k])) / math.sqrt(widths[k]) * rng.uniform(0.5, 3.0) for k in range(len(widths) - 1)]
    a, b = SLOPES[act]
    if per_neuron:  # every neuron its own interval [a_i, b_i]
        alphas = [rng.uniform(-0.2, 0.3, size=n) for n in widths[1:-1]]
        betas = [al + rng.uniform(0.2, 1.5, size=al.size) for al in alphas]
    else:
        alphas = [np.full(n, a) for n in widths[1:-1]]
        betas = [np.full(n, b) for n in widths[1:-1]]
    return LipSDPProblem(weights, alphas, betas)


def reference_multipliers(problem: LipSDPProblem, variant: str) -> list[np.ndarray]:
    """LipSDP written directly in cvxpy (dense, no scaling) and solved by Clarabel."""
    widths, d, n0 = problem.widths, problem.dim, problem.widths[0]
    off = np.concatenate([[0], np.cumsum(widths)])
    lams = [cp.Variable(n if variant == "neuron" else 1, nonneg=True) for n in widths[1:]]
    rho = cp.Variable()
    M = -rho * np.diag((np.arange(d) < n0).astype(float))
    for j in range(1, len(widths)):
        a, b, W = problem.alphas[j - 1], problem.betas[j - 1], problem.weights[j - 1]
        lam = lams[j - 1] if variant == "neuron" else lams[j - 1] * np.ones(widths[j])
        U = np.zeros((widths[j], d))
        U[:, off[j - 1] : off[j]] = W
        E = np.zeros((widths[j], d))
        E[:, off[j] : off[j + 1]] = np.eye(widths[j])
        M = M + U.T @ cp.diag(cp.multiply(-2 * a * b, lam)) @ U + U.T @ cp.diag(cp.multiply(a + b, lam)) @ E + E.T @ cp.diag(cp.multiply(a + b, lam)) @ U - 2 * E.T @ cp.diag(lam) @ E
    last = np.zeros((problem.weights[-1].shape[0], d))
    last[:, off[-2] :] = problem.weights[-1]
    M = M + last.T @ last
    cp.Problem(cp.Minimize(rho), [(M + M.T) / 2 << 0]).solve(solver="CLARABEL")
    return [np.broadcast_to(np.asarray(lam.value, float), (n,)).copy() for lam, n in zip(lams, widths[1:])]


CASES = [([4, 8, 6, 3], "relu", 0), ([5, 10, 10, 10, 2], "leaky", 1), ([6, 12, 12, 4], "tanh", 2), ([3, 7, 5], "sigmoid", 3), ([8, 16, 16, 1], "relu", 4)]


@pytest.mark.parametrize("variant", ["neuron", "layer"])
@pytest.mark.parametrize("widths,act,seed", CASES)
def test_agrees_with_a_cvxpy_reference(widths, act, seed, variant):
    problem = random_problem(widths, act, seed)
    lams, info = lipsdp_fast.solve(problem, variant)
    assert info["status"] == "optimal", info
    ours = verify(problem, lams)
    ref = verify(problem, reference_multipliers(problem, variant))
    assert ours.ok and ref.ok
    assert abs(ours.value - ref.value) <= 1e-4 * ref.value
    # the solver's dual bound: no multipliers of this variant can do better
    assert info["lower_value"] <= ref.value * (1 + 1e-7)
    assert info["lower_value"] <= ours.value <= info["solver_value"] * (1 + 1e-6)
    assert info["gap"] <= 1e-6
    assert ours.value <= info["start_value"] * (1 + 1e-6)  # the layer-wise start is feasible, looser
    if variant == "layer":
        assert all(np.ptp(lam) == 0 for lam in lams)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_neuron_slope_intervals(seed):
    problem = random_problem([4, 9, 7, 2], "relu", seed, per_neuron=True)
    lams, info = lipsdp_fast.solve(problem)
    ours = verify(problem, lams)
    ref = verify(problem, reference_multipliers(problem, "neuron"))
    assert info["status"] == "optimal" and ours.ok
    assert abs(ours.value - ref.value) <= 1e-4 * ref.value


@pytest.mark.parametrize("act", list(SLOPES))
def test_neuron_is_never_worse_than_layer(act):
    problem = random_problem([6, 14, 14, 14, 3], act, 7)
    neuron = verify(problem, lipsdp_fast.solve(problem, "neuron")[0])
    layer = verify(problem, lipsdp_fast.solve(problem, "layer")[0])
    assert neuron.ok and layer.ok
    assert neuron.value <= layer.value * (1 + 1e-6)


def test_multipliers_keep_the_hidden_block_negative_definite():
    problem = random_problem([5, 12, 12, 12, 2], "relu", 11)
    lams, _ = lipsdp_fast.solve(problem)
    assert all(np.all(lam > 0) for lam in lams)
    C = problem.assemble(lams)
    n0 = problem.widths[0]
    assert np.linalg.eigvalsh(C[n0:, n0:])[-1] < 0


def test_rescaling_is_a_congruence():
    """Working problem: W'_k = W_k s_k / s_{k+1}, W'_l = W_l s_l / kappa; then
    D S(rho, lambda) D = kappa^2 S'(rho', lambda') with rho = kappa^2 rho' and
    lambda_j = kappa^2 lambda'_j / s_j^2, D = diag(1, s_1, ..., s_l)."""
    rng = np.random.default_rng(5)
    problem = random_problem([4, 6, 5, 3], "leaky", 5)  # n0 <= n1: no input compression
    problem.weights[1] *= 1e4  # magnitudes that need rescaling
    problem.weights[2] *= 1e-3
    work = lipsdp_fast._working_problem(problem, scale=True)
    lam_w = rng.uniform(0.1, 2.0, size=work.m)
    rho_w = 3.0
    lam = np.concatenate(work.to_original(lam_w))
    rho = work.kappa2 * rho_w
    S_w = work.S(rho_w, lam_w).numpy()
    C = problem.assemble(expand_multipliers(problem, lam))
    S = -C
    S[: problem.widths[0], : problem.widths[0]] += rho * np.eye(problem.widths[0])
    D = np.concatenate([np.ones(problem.widths[0])] + work.scales)
    np.testing.assert_allclose(D[:, None] * S * D[None, :], work.kappa2 * S_w, rtol=1e-10, atol=1e-10 * np.abs(work.kappa2 * S_w).max())
    assert np.allclose(np.concatenate(expand_multipliers(problem, work.to_original(work.from_original(work.to_original(lam_w))))), lam)


def test_scaling_does_not_change_the_answer():
    problem = random_problem([5, 10, 10, 3], "tanh", 8)
    a = verify(problem, lipsdp_fast.solve(problem, scale=True)[0])
    b = verify(problem, lipsdp_fast.solve(problem, scale=False)[0])
    assert abs(a.value - b.value) <= 1e-5 * a.value


def test_input_compression_for_wide_inputs():
    problem = random_problem([40, 6, 6, 2], "relu", 9)  # n0 > n1: the input block is compressed
    lams, info = lipsdp_fast.solve(problem)
    ours = verify(problem, lams)
    ref = verify(problem, reference_multipliers(problem, "neuron"))
    assert ours.ok and abs(ours.value - ref.value) <= 1e-4 * ref.value


def test_warm_start_from_the_layer_solution():
    problem = random_problem([5, 12, 12, 2], "relu", 3)
    layer, _ = lipsdp_fast.solve(problem, "layer")
    cold = verify(problem, lipsdp_fast.solve(problem)[0])
    lams, info = lipsdp_fast.solve(problem, init=layer)
    assert info["status"] == "optimal"
    assert abs(verify(problem, lams).value - cold.value) <= 1e-5 * cold.value


def test_options_are_checked():
    problem = random_problem([3, 4, 2], "relu", 0)
    with pytest.raises(ValueError, match="variant"):
        lipsdp_fast.solve(problem, "neurons")
    with pytest.raises(TypeError, match="unknown option"):
        lipsdp_fast.solve(problem, tolerance=1e-3)
    lams, info = lipsdp_fast.solve(problem, max_iter=1)
    assert info["status"] == "max_iter" and info["iterations"] == 1 and lams is not None
    assert verify(problem, lams).ok  # every iterate is strictly feasible


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verify_stays_sound_for_any_multipliers(seed):
    problem = random_problem([5, 10, 8, 3], "leaky", seed)
    lams, _ = lipsdp_fast.solve(problem)
    best = verify(problem, lams)
    assert best.ok
    rng = np.random.default_rng(seed)
    for _ in range(50):  # any multipliers: never below the LipSDP optimum
        lam = [rng.exponential(rng.uniform(0.01, 10), size=n) for n in problem.widths[1:]]
        v = verify(problem, lam)
        assert not v.ok or v.value >= best.value * (1 - 1e-4)
    assert not verify(problem, [np.zeros(n) for n in problem.widths[1:]]).ok


@pytest.mark.parametrize("act", ["leaky", "tanh"])
def test_the_paths_for_large_problems_give_the_same_answer(monkeypatch, act):
    """Above DENSE_DIM rows S is block-tridiagonal and built layer by layer, above EXACT_STEP_DIM
    step lengths come from Lanczos: forced on a small problem, the same optimum."""
    problem = random_problem([6, 14, 12, 10, 3], act, 4)
    small, _ = lipsdp_fast.solve(problem)
    work = lipsdp_fast._working_problem(problem, scale=True)
    lam = np.random.default_rng(0).uniform(0.2, 2.0, size=work.m)
    S_dense = work.S(1.5, lam)
    monkeypatch.setattr(lipsdp_fast, "DENSE_DIM", 0)
    monkeypatch.setattr(lipsdp_fast, "EXACT_STEP_DIM", 0)
    layered = lipsdp_fast._working_problem(problem, scale=True)
    assert layered.U is None
    np.testing.assert_allclose(layered.S(1.5, lam), S_dense, atol=1e-12)
    np.testing.assert_allclose(layered.S_bt(1.5, lam).dense(), S_dense, atol=1e-12)
    Z = torch.from_numpy(np.random.default_rng(1).normal(size=S_dense.shape))
    Z = Z + Z.T
    (tr_a, c_a), (tr_b, c_b) = work.apply_C(Z), layered.apply_C(Z)
    assert tr_a == pytest.approx(tr_b) and np.allclose(c_a, c_b, atol=1e-12)
    assert np.allclose(c_a, lipsdp_fast._diag_C(work.quad(Z)), atol=1e-12)  # <C_i, Z> by definition
    large, info = lipsdp_fast.solve(problem)
    assert info["status"] == "optimal"
    a, b = verify(problem, small), verify(problem, large)
    assert a.ok and b.ok and abs(a.value - b.value) <= 1e-5 * a.value


def test_step_length_estimates_are_never_too_short():
    """Estimated extreme eigenvalues lie inside the spectrum (Ritz values), so an estimated step is
    at least the exact one: the solver confirms it by a factorisation."""
    rng = np.random.default_rng(3)
    for d in (30, 120, 200):
        B = torch.from_numpy(rng.normal(size=(d, d)))
        B = (B + B.T) / 2 + torch.diag(torch.from_numpy(rng.exponential(size=d)))
        ev = torch.linalg.eigvalsh(B)
        lo, hi = lipsdp_fast._extremes(B, exact=False)
        assert float(ev[0]) - 1e-10 <= lo <= hi <= float(ev[-1]) + 1e-10
        assert lipsdp_fast._extremes(B, exact=True) == pytest.approx((float(ev[0]), float(ev[-1])))
        L = torch.linalg.cholesky(B @ B.T + torch.eye(d, dtype=torch.float64))
        assert lipsdp_fast._max_step(L, -B) >= lipsdp_fast._max_step(L, -B, exact=True) * (1 - 1e-12)


def test_a_step_estimate_that_is_too_long_falls_back_to_the_exact_one(monkeypatch):
    problem = random_problem([6, 50, 50, 4], "tanh", 2)  # d = 106: block Krylov estimates
    plain, _ = lipsdp_fast.solve(problem)
    exact_extremes = lipsdp_fast._extremes

    fallbacks = []

    def too_long(B, exact):  # estimates 10x too close to zero: steps 10x too long
        lo, hi = exact_extremes(B, exact)
        fallbacks.append(exact)
        return (lo, hi) if exact else (lo / 10, hi / 10)

    monkeypatch.setattr(lipsdp_fast, "_extremes", too_long)
    lams, info = lipsdp_fast.solve(problem)
    assert info["status"] == "optimal" and any(fallbacks)
    assert abs(verify(problem, lams).value - verify(problem, plain).value) <= 1e-5 * verify(problem, plain).value


def test_a_restart_after_a_stall_still_converges(monkeypatch):
    problem = random_problem([5, 10, 10, 10, 2], "leaky", 1)
    plain, _ = lipsdp_fast.solve(problem)
    monkeypatch.setattr(lipsdp_fast, "STALL_STEPS", 1)  # any short step counts as a stall
    lams, info = lipsdp_fast.solve(problem)
    assert info["restarted"] and info["status"] == "optimal"
    assert abs(verify(problem, lams).value - verify(problem, plain).value) <= 1e-5 * verify(problem, plain).value


def test_progress_is_reported_at_every_step():
    problem = random_problem([4, 8, 6, 3], "relu", 0)
    seen = []
    _, info = lipsdp_fast.solve(problem, progress=lambda it, value, gap: seen.append((it, value, gap)))
    assert [it for it, _, _ in seen] == list(range(info["iterations"] + 1))
    assert seen[-1][2] == info["gap"] and math.isclose(seen[-1][1], info["solver_value"])


def test_neurons_no_layer_reads_are_dropped_and_given_back_a_tiny_multiplier():
    problem = random_problem([5, 12, 12, 12, 3], "leaky", 6)
    problem.weights[2][:, [0, 4, 7]] = 0.0  # three neurons of hidden layer 2 are never read ...
    problem.weights[1][:, 5] = 0.0  # ... and one of layer 1 only by a dropped neuron:
    problem.weights[1][[1, 2, 3, 5, 6, 8, 9, 10, 11], 3] = 0.0  # neuron 3 of layer 1 feeds only 0, 4, 7
    lams, info = lipsdp_fast.solve(problem)
    assert info["dropped"] == 5 and info["status"] == "optimal"
    assert [lam.shape for lam in lams] == [(12,), (12,), (12,)] and all(np.all(lam > 0) for lam in lams)
    ours = verify(problem, lams)
    ref = verify(problem, reference_multipliers(problem, "neuron"))
    assert ours.ok and ours.value <= ref.value * (1 + 1e-6)  # as tight as the reference on the whole problem
    assert ours.value >= info["lower_value"] * (1 - 1e-9)  # and never below the dual bound
    layer, info = lipsdp_fast.solve(problem, "layer")  # one multiplier per layer: nothing is dropped
    assert "dropped" not in info and all(np.ptp(lam) == 0 for lam in layer)


def nearly_singular(problem: LipSDPProblem, lams: list[np.ndarray]) -> list[np.ndarray]:
    """lams scaled down until the hidden block is within 1e-13 of singular (bisection on s)."""
    n0 = problem.widths[0]

    def definite(s: float) -> bool:
        C = problem.assemble([s * v for v in lams])
        return np.linalg.eigvalsh(C[n0:, n0:])[-1] < 0

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if definite(mid) else (mid, hi)
    return [hi * v for v in lams]


def test_verify_best_moves_nearly_singular_multipliers_inside():
    from lipcert.sdp.solve import verify_best

    problem = random_problem([5, 10, 10, 3], "relu", 4)
    lams, info = lipsdp_fast.solve(problem)
    edge = nearly_singular(problem, lams)
    plain = verify(problem, edge)
    best = verify_best(problem, edge, info["interior"])
    assert best.ok and "interior start" in best.reason
    assert not plain.ok or best.value < plain.value
    # still a sound bound: never below the optimum (the solver's dual bound)
    assert best.value >= info["lower_value"]
    # and with good multipliers it changes nothing
    assert verify_best(problem, lams, info["interior"]) == verify(problem, lams)
    # past a budget's deadline no other point is tried once one is proven (each try is a float64
    # proof: seconds on large problems); without a proof the tries go on
    near = [(1 - 1e-9) * a + 1e-9 * np.asarray(b) for a, b in zip(edge, info["interior"])]
    first = verify(problem, near)
    assert first.ok and first.margin > 1e-7 and verify_best(problem, near, info["interior"]).value < first.value
    assert verify_best(problem, near, info["interior"], deadline=0.0) == first
    assert not plain.ok and verify_best(problem, edge, info["interior"], deadline=0.0).ok


ACAS = ["ACASXU_run2a_1_1_batch_2000.onnx", "ACASXU_run2a_2_3_batch_2000.onnx", "ACASXU_run2a_5_9_batch_2000.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ACAS)
def test_acas_xu_between_the_reference_bounds(name, reference):
    path = SHARED_MODELS / "vnncomp2021" / name
    problem = problem_from_graph(lipcert.load(str(path)))
    lams, info = lipsdp_fast.solve(problem)
    assert info["status"] == "optimal", info
    ref = reference[f"vnncomp2021/{name}"]
    naive = lipcert.bound(str(path)).value
    checked = verify(problem, lams)
    assert checked.ok, checked.reason
    value = checked.value
    assert ref["lower_l2"] <= info["lower_value"] <= value <= naive
    assert value <= info["solver_value"] * (1 + 1e-4)


@pytest.mark.slow
def test_acas_xu_verified_by_verify():
    """The ACAS Xu multipliers span ten decades: verify's balanced (power-of-two) scaling proves them."""
    problem = problem_from_graph(lipcert.load(str(SHARED_MODELS / "vnncomp2021" / ACAS[0])))
    lams, _ = lipsdp_fast.solve(problem)
    assert verify(problem, lams).ok


@pytest.mark.slow
def test_mixed_precision_hands_over_where_float64_refuses_the_float32_point(reference):
    """On mnist_relu_9_200 the float32 phase ends at a point whose S is positive definite in float32
    but not in float64; the hand-over moves rho up a little instead of stopping (it stopped there,
    'stalled' at a duality gap of 4e-3, before), and the solve ends optimal."""
    name = "mnist_relu_9_200.onnx"
    problem = problem_from_graph(lipcert.load(str(SHARED_MODELS / "vnncomp2021" / name)))
    lams, info = lipsdp_fast.solve(problem)
    assert info["single_steps"] > 0
    assert info["status"] == "optimal" and info["gap"] <= 1e-6, info
    checked = verify(problem, lams)
    assert checked.ok, checked.reason
    assert reference[f"vnncomp2021/{name}"]["lower_l2"] <= info["lower_value"] <= checked.value


def test_mixed_precision_reaches_the_double_precision_optimum(monkeypatch):
    """Above DENSE_DIM rows the first steps run in float32 (forced here on a small problem): the
    same verified optimum as float64 throughout, and a dual bound (recomputed in float64) that is
    not above it, also when the solver stops inside the float32 phase."""
    monkeypatch.setattr(lipsdp_fast, "DENSE_DIM", 0)
    problem = random_problem([12, 20, 16, 16, 4], "leaky", 7)
    double, info_d = lipsdp_fast.solve(problem, precision="double")
    mixed, info_m = lipsdp_fast.solve(problem)
    assert info_d["single_steps"] == 0 and info_m["single_steps"] > 0
    assert info_m["status"] == info_d["status"] == "optimal"
    a, b = verify(problem, double), verify(problem, mixed)
    assert a.ok and b.ok and abs(a.value - b.value) <= 1e-6 * a.value
    assert info_m["lower_value"] <= a.value
    early, info_e = lipsdp_fast.solve(problem, tol=1e-1)  # stops on a float32 gap, checked in float64
    assert info_e["status"] == "optimal" and info_e["gap"] <= 1e-1
    assert info_e["lower_value"] <= a.value <= verify(problem, early).value
    cut, info_c = lipsdp_fast.solve(problem, max_iter=2)  # stopped inside the float32 phase
    assert info_c["single_steps"] == 2 and verify(problem, cut).ok
    assert info_c["lower_value"] is None or info_c["lower_value"] <= a.value
    with pytest.raises(ValueError, match="precision"):
        lipsdp_fast.solve(problem, precision="half")


def test_large_solves_use_every_core_small_ones_one():
    """One BLAS thread below PARALLEL_DIM rows (spin-waiting threads on small operations), the
    caller's torch thread count above (a few d^3 products per step)."""
    assert lipsdp_fast.default_threads(lipsdp_fast.PARALLEL_DIM - 1) == 1
    assert lipsdp_fast.default_threads(lipsdp_fast.PARALLEL_DIM) == torch.get_num_threads()


def _network_covariance(work, rng: np.random.Generator, samples: int = 200) -> torch.Tensor:
    """The covariance of (input, hidden layers) of the working network with an activation whose
    slopes are a and b (biases random): a feasible point of the dual (certificate) problem."""
    y = rng.normal(size=(samples, work.n0))
    stack = [y]
    for j in range(1, work.layers + 1):
        h = work.hidden(j)
        a, b = work.sab[h] - work.dba[h], work.sab[h] + work.dba[h]  # 2a, 2b
        v = stack[-1] @ work.weights[j - 1].T + rng.normal(size=h.stop - h.start)
        stack.append(0.5 * (a * np.minimum(v, 0) + b * np.maximum(v, 0)))
    s = np.concatenate(stack, axis=1)
    s -= s.mean(axis=0)
    return torch.from_numpy(s.T @ s / samples)


@pytest.mark.parametrize("widths,act,seed", [([4, 8, 6, 3], "relu", 0), ([5, 10, 10, 10, 2], "leaky", 1), ([3, 7, 5], "sigmoid", 3)])
def test_a_repaired_infeasible_iterate_is_feasible_and_bounds_the_optimum_from_below(widths, act, seed):
    """repair_scales makes a positive semidefinite Z that breaks constraints (a feasible point
    plus noise) into a feasible X' = D Z D; its value <C0, X'> / tr X'_00 is a dual bound: never
    above the optimum."""
    problem = random_problem(widths, act, seed)
    work = lipsdp_fast._working_problem(problem, True)
    lams, _ = lipsdp_fast.solve(problem, "neuron")
    optimum = verify(problem, lams).value
    rng = np.random.default_rng(seed)
    feasible = _network_covariance(work, rng)
    assert np.all(work.apply_C(feasible)[1] >= -1e-12)
    plain = work.c0(feasible) / float(torch.trace(feasible[: work.n0, : work.n0]))
    assert work.repaired_bound(feasible) == pytest.approx(plain, rel=1e-9)
    repaired = 0
    for trial in range(20):
        scale = np.sqrt(np.diag(feasible.numpy()))
        if trial % 2:  # noise on every entry, on each coordinate's scale
            A = rng.normal(size=(work.dim, work.dim)) * scale[:, None]
            noise = torch.from_numpy(A @ A.T) / work.dim
        else:  # the hidden coordinates' variances only (leaky ReLU tolerates little else)
            noise = torch.diag(torch.from_numpy(np.r_[np.zeros(work.n0), scale[work.n0 :] ** 2]))
        Z = feasible + 10 ** rng.uniform(-4, -0.5) * noise
        assert np.any(work.apply_C(Z)[1] < 0)  # breaks constraints: something to repair
        D = work.repair_scales(Z)
        if D is None:
            continue
        X = D[:, None] * Z * D[None, :]
        assert np.all(work.apply_C(X)[1] >= -1e-10 * float(X.abs().max()))
        assert torch.all(D >= 0)
        assert math.sqrt(work.repaired_bound(Z) * work.kappa2) <= optimum * (1 + 1e-9)
        repaired += 1
    assert repaired >= 5
