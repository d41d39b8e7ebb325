"""Pairs that matter and budgets (issue 14): certify tightens only the class pairs that decide a
radius, and gets exactly the radii of tightening every pair; radii are never below the naive
pairwise ones, under any budget; --budget cuts LipSDP with a proven bound and says so."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lipcert
from lipcert.budget import CERTIFY_BUDGET_S, Budget, settings_with_deadline
from lipcert.certify import PAIR_TOL, SETTLE, binding_pairs, certified_radius
from lipcert.cli import main
from lipcert.config import Settings
from lipcert.estimators import ESTIMATORS, estimate_all, sdp
from conftest import MODELS


@pytest.fixture(scope="module")
def tenclass():
    """A seeded 12-24-24-10 ReLU classifier (45 class pairs) and 40 inputs."""
    gen = torch.Generator().manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Linear(24, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6)
    graph = lipcert.load(net, (1, 12))
    x = np.random.default_rng(3).normal(size=(40, 12))
    return graph, x


@pytest.fixture(scope="module")
def radii(tenclass):
    graph, x = tenclass
    out = {name: certified_radius(graph, x, method=method, pairs=pairs)
           for name, method, pairs in [("naive", "naive", "binding"), ("binding", "sdp", "binding"), ("all", "sdp", "all")]}
    # every pair solved to a duality gap of 1e-9: the radii of the optimal LipSDP pair bounds
    tight = Settings(norm="2", extra={"solver_opts": {"tol": 1e-9}})
    out["optimal"] = certified_radius(graph, x, pairs="all", settings=tight)
    return out


def test_binding_pairs_are_the_minimisers():
    K = np.array([[0, 1.0, 2.0], [1.0, 0, 4.0], [2.0, 4.0, 0]])
    logits = np.array([[3.0, 2.0, 1.0],    # class 0: margins 1 (j=1, /1) and 2 (j=2, /2): a tie, both bind
                       [0.0, 5.0, 1.0],    # class 1: 5/1 = 5 and 4/4 = 1: j = 2
                       [0.0, 1.0, 1.0],    # a tie between classes 1 and 2: radius 0, nothing to tighten
                       [9.0, 0.0, 8.5]])   # class 0, but labelled 2: misclassified
    out = binding_pairs(K, logits, np.array([0, 1, 1, 2]))
    assert out == {(0, 1): [0], (0, 2): [0], (1, 2): [1]}


def test_binding_radii_match_the_optimal_pair_radii_with_fewer_solves(tenclass, radii):
    graph, x = tenclass
    b, a, opt = radii["binding"], radii["all"], radii["optimal"]
    assert len(a.constants.tightened) == 45
    assert 0 < len(b.constants.tightened) < 45
    np.testing.assert_array_equal(b.predicted, a.predicted)
    # "all": each pair is solved to PAIR_TOL (its bound within sqrt(1 - PAIR_TOL) of its optimum);
    # "binding": each point is settled at SETTLE x the radius that the pairs' dual bounds allow.
    # Neither goes above the optimal pairs' radius (which ``opt`` holds up to its gap of 1e-9).
    for r, floor in ((a.radii, math.sqrt(1 - PAIR_TOL)), (b.radii, SETTLE)):
        assert (r >= floor * opt.radii * (1 - 1e-9)).all()
        assert (r <= opt.radii * (1 + 1e-6)).all()
    assert b.constants.solves < 45


def test_binding_radii_never_below_naive_pairwise_and_sound(tenclass, radii):
    graph, x = tenclass
    b, naive = radii["binding"], radii["naive"]
    ok = b.radii > 0
    assert ok.sum() >= 20
    assert (b.radii >= naive.radii * (1 - 1e-12)).all()
    assert np.median(b.radii[ok] / naive.radii[ok]) > 1.05  # LipSDP does help here
    # sound: the constant of every pair is at least the largest slope an attack finds for its margin
    xs = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out = graph.forward(xs.reshape(len(x), 1, 12)).reshape(len(x), -1)
    for y, j in b.constants.tightened:
        (g,) = torch.autograd.grad((out[:, y] - out[:, j]).sum(), xs, retain_graph=True)
        assert g.norm(dim=1).max().item() <= b.constants.matrix[y, j]


@pytest.mark.parametrize("seconds", [1e-3, 0.3])
def test_any_budget_keeps_radii_between_naive_and_all_pairs(tenclass, radii, seconds):
    graph, x = tenclass
    budget = Budget(seconds)
    cut = certified_radius(graph, x, budget=budget)
    assert (cut.radii >= radii["naive"].radii * (1 - 1e-12)).all()
    # looser constants than the unlimited run (solves stopped early give larger, still proven values)
    assert (cut.radii <= radii["all"].radii * (1 + 1e-9)).all()
    if seconds == 1e-3:
        assert budget.cut and "--budget" in budget.advice()


def test_budget_zero_means_no_limit():
    assert Budget(0).seconds is None and not Budget(0).limited and math.isinf(Budget(None).remaining())
    with pytest.raises(lipcert.InputError, match="'seconds' parameter of Budget"):
        Budget(-1)


QUICK = Settings(starts=1, steps=0, iterations=5)  # the lower-bound search and Gram iteration kept short


def test_lipsdp_stopped_by_a_deadline_still_proves_a_bound(tenclass):
    graph, _ = tenclass
    full = ESTIMATORS["sdp"].run(graph, Settings())
    naive = ESTIMATORS["naive"].run(graph, Settings())
    cut = ESTIMATORS["sdp"].run(graph, settings_with_deadline(Settings(), time.perf_counter()))
    assert cut.certified and full.value <= cut.value <= naive.value * (1 + 1e-9)
    assert cut.details["sections"][0]["solver_status"] == "time_limit"
    # estimate_all: the methods that stop early run last and share what the budget leaves, the
    # one that can stop at once (sdp-wide) first with half; LipSDP gets what it leaves
    budget = Budget(600)
    results, skipped = estimate_all(graph, QUICK, budget=budget)
    assert not skipped and [r.method for r in results] == list(ESTIMATORS) and not budget.cut
    wide, lipsdp = (next(r for r in results if r.method == m) for m in ("sdp-wide", "sdp"))
    assert 125 < wide.settings["search_time_limit"] <= 150  # half of its share
    assert 550 < lipsdp.settings["budget_s"] <= 600


def test_a_method_that_cannot_start_within_the_budget_is_skipped(tenclass, monkeypatch):
    graph, _ = tenclass
    from lipcert.sdp import solve

    monkeypatch.setattr(solve, "START_S_PER_ROW3", 1e6)
    budget = Budget(30)
    results, skipped = estimate_all(graph, QUICK, budget=budget)
    assert "sdp" in skipped and "--budget" in skipped["sdp"] and "sdp skipped" in budget.cut
    assert [r.method for r in results] == [m for m in ESTIMATORS if m != "sdp"]


def test_lipsdp_gets_what_the_methods_that_stop_at_once_leave(tenclass, monkeypatch):
    """LipSDP's least time above half of the budget, below all of it: sdp-wide (which can stop at
    once) runs first with its half, and LipSDP gets what it leaves (on cifar_base_kw, 2 cores:
    sdp-wide 3 s, LipSDP 53 s at least), instead of being skipped."""
    graph, _ = tenclass
    from lipcert.estimators import sdp as sdp_est
    from lipcert.sdp import solve

    dim = sum(s.problem.dim for s in sdp_est.plan(graph)[1] if s.problem is not None)
    monkeypatch.setattr(solve, "START_S_PER_ROW3", 20.0 / dim**3)  # least time about 20 s
    budget = Budget(30)
    results, skipped = estimate_all(graph, QUICK, budget=budget)
    assert "sdp" not in skipped and not budget.cut
    lipsdp = next(r for r in results if r.method == "sdp")
    assert 20 <= lipsdp.settings["budget_s"] <= 30 and lipsdp.certified


def test_least_time_and_verification_reserve_count_the_threads_of_large_solves(tenclass, monkeypatch):
    """A solve of at least fast.PARALLEL_DIM rows runs on every core: its least time (which decides
    whether LipSDP starts within a budget) and the time kept back for its float64 proof shrink with
    them (on 2 cores, cifar_base_kw's LipSDP was skipped by `bound --method all` for a 93 s estimate
    where its start and proof take 32 s); one thread below, as before."""
    graph, _ = tenclass
    from lipcert.sdp import fast, solve

    dim = sum(s.problem.dim for s in sdp.plan(graph)[1] if s.problem is not None)
    one = solve.least_solve_seconds(dim)
    assert ESTIMATORS["sdp"].min_seconds(graph, QUICK) == pytest.approx(one)
    monkeypatch.setattr(fast, "PARALLEL_DIM", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert ESTIMATORS["sdp"].min_seconds(graph, QUICK) == pytest.approx(one / 2**solve.THREAD_EXPONENT)
    deadline = settings_with_deadline(Settings(norm="2"), time.perf_counter() + 100.0, 100.0)
    limit = solve._fast_opts({}, deadline, 10_000)["time_limit"]
    assert limit == pytest.approx(100.0 - solve.verify_seconds(10_000) / 2**solve.THREAD_EXPONENT, abs=0.5)


def test_certify_skips_lipsdp_that_cannot_fit_in_the_budget(tenclass, radii, monkeypatch):
    """When one LipSDP solve cannot fit in what is left of the budget (its start and float64
    verification alone), certify keeps the cheap proven constants (naive, compose) and says so,
    on time."""
    from lipcert.sdp import solve

    graph, x = tenclass
    monkeypatch.setattr(solve, "START_S_PER_ROW3", 1e6)
    budget = Budget(30)
    start = time.perf_counter()
    out = certified_radius(graph, x, budget=budget)
    assert time.perf_counter() - start < 30
    assert any(c.startswith("LipSDP skipped") for c in budget.cut)
    # the cheap constants: naive's, or compose's global bound where it is smaller
    assert (out.radii >= radii["naive"].radii * (1 - 1e-12)).all()
    assert out.constants.global_method in ("naive", "compose") and out.constants.solves == 0


def test_certify_gives_the_global_lipsdp_all_the_budget_when_no_large_pair_can_follow(tenclass, monkeypatch):
    """Pairs of LONG_DIM rows or more follow the global solve only when the budget's other half
    holds one pair's least time; otherwise the global LipSDP gets the whole budget (cifar_base_kw:
    a pair needs about 93 s of a 150 s budget), where it had half and the rest went unused."""
    import importlib

    from lipcert.sdp import solve

    certify_mod = importlib.import_module("lipcert.certify")  # the package exports a function of that name
    graph, x = tenclass
    dim = sum(s.problem.dim for s in sdp.plan(graph)[1] if s.problem is not None)
    monkeypatch.setattr(sdp, "LONG_DIM", 1)
    shares = []
    real = certify_mod._global_sdp

    def spy(graph, solver, settings, budget):
        shares.append(settings.extra["budget_s"])
        return real(graph, solver, settings, budget)

    monkeypatch.setattr(certify_mod, "_global_sdp", spy)
    for least, share in ((6.0, (0.9, 1.0)), (1.0, (0.45, 0.5))):  # seconds of a 10 s budget
        monkeypatch.setattr(solve, "START_S_PER_ROW3", least / dim**3)
        monkeypatch.setattr(solve, "VERIFY_S_PER_ROW3", 0.0)
        shares.clear()
        certified_radius(graph, x[:5], budget=Budget(10))
        assert share[0] * 10 <= shares[0] <= share[1] * 10


@pytest.mark.parametrize("act", [torch.nn.ReLU, torch.nn.Sigmoid, torch.nn.Tanh])
def test_lipsdp_floor_is_below_every_lipsdp_bound(tenclass, act):
    """LipSDP.floor (its sections' linear parts at the top slopes, composed) never exceeds what a
    run proves, also on a residual network; with the slope 1 in place of sigmoid's 1/4 it would."""
    gen = torch.Generator().manual_seed(3)
    body = torch.nn.Sequential(torch.nn.Linear(16, 16), act(), torch.nn.Linear(16, 16))

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.body, self.out = torch.nn.Linear(8, 16), body, torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            return self.out(h + self.body(h))

    nets = [(torch.nn.Sequential(torch.nn.Linear(8, 24), act(), torch.nn.Linear(24, 24), act(), torch.nn.Linear(24, 4)), (1, 8)),
            (Residual(), (1, 8))]
    for net, shape in nets:
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        graph = lipcert.load(net.eval(), shape)
        floor = ESTIMATORS["sdp"].floor(graph, Settings())
        value = ESTIMATORS["sdp"].run(graph, Settings()).value
        assert 0 < floor <= value


def test_a_budget_skips_lipsdp_when_it_cannot_beat_a_proven_bound(tenclass, monkeypatch):
    """Under a budget LipSDP is not run when its floor is not below the best proven bound already
    there (resnet_2b: at least 364.9 against compose's 169.9, 80 s saved); without a budget it runs."""
    graph, _ = tenclass
    real = ESTIMATORS["sdp"].floor(graph, QUICK)
    results, skipped = estimate_all(graph, QUICK, budget=Budget(600))
    assert "sdp" not in skipped and real < min(r.value for r in results if r.kind == "upper")
    monkeypatch.setattr(type(ESTIMATORS["sdp"]), "floor", lambda self, graph, settings: 1e30)
    results, skipped = estimate_all(graph, QUICK, budget=Budget(600))
    assert "cannot beat" in skipped["sdp"] and "--budget 0" in skipped["sdp"] and "sdp" not in [r.method for r in results]
    results, skipped = estimate_all(graph, QUICK, budget=Budget(0))
    assert "sdp" not in skipped and next(r for r in results if r.method == "sdp").certified


def test_cli_budget_is_reported(tmp_path):
    spiral, data = str(MODELS / "mlp_spiral.onnx"), str(MODELS / "spiral_test.npz")
    res = CliRunner().invoke(main, ["certify", spiral, "--data", data, "--budget", "0.0001"])
    assert res.exit_code == 0, res.output
    assert "budget:" in res.stdout and "--budget 0: no limit" in res.stdout
    res = CliRunner().invoke(main, ["certify", spiral, "--data", data, "--json"])
    out = json.loads(res.stdout)
    assert out["budget"]["seconds"] == CERTIFY_BUDGET_S and out["budget"]["cut"] == [] and out["lipschitz"]["tightened"]
    res = CliRunner().invoke(main, ["bound", spiral, "--method", "all", "--budget", "0.0001", "--json"])
    out = json.loads(res.stdout)
    assert out["budget"]["cut"] == ["lower stopped early (a witnessed, smaller lower bound)", "sdp skipped"]
    assert "--budget" in out["skipped"]["sdp"]
    assert next(r for r in out["results"] if r["method"] == "naive")["certified"]
    res = CliRunner().invoke(main, ["bound", spiral, "--method", "sdp", "--json"])
    assert json.loads(res.stdout)["budget"]["seconds"] is None
    # no budget, but a solver time limit: LipSDP is cut, the budget has nothing to say
    res = CliRunner().invoke(main, ["bound", spiral, "--method", "all", "--budget", "0", "--time-limit", "0.000001", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["budget"] == {"seconds": None, "elapsed_s": json.loads(res.stdout)["budget"]["elapsed_s"], "cut": [], "advice": None}
    assert "no budget limit" in Budget(0).advice()
    res = CliRunner().invoke(main, ["certify", spiral, "--data", data, "--budget", "-1"])
    assert res.exit_code == 2


def test_time_left_from_the_rate_of_the_duality_gap(monkeypatch):
    from lipcert import progress

    clock = iter(range(100))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    eta = progress.ConvergenceEta(tol=1e-6, limit=None, typical=25)  # starts at t = 0
    assert eta.update(math.inf) is None  # step 0 at t = 1: nothing to go on
    assert eta.update(math.inf) == 24.0  # 1 s a step, 25 typical steps, 1 done
    eta.update(1e-1)
    # the gap falls by 10x a step (1 s): 1e-2 -> 1e-6 takes 4 more steps
    assert eta.update(1e-2) == pytest.approx(4.0)
    capped = progress.ConvergenceEta(tol=1e-6, limit=4.0)  # starts at t = 5
    capped.update(1e-1), capped.update(1e-2)  # t = 6, 7
    assert capped.update(1e-3) == pytest.approx(1.0)  # t = 8: 3 steps to go, but the limit leaves 1 s
    assert progress.eta_text(40) == "about 40 s left" and progress.eta_text(300) == "about 5 min left"


def test_pair_stopped_at_a_target_is_proven_and_resumes(tenclass):
    """lipcert-fast's ``target``: a pair's solve stops once its value is below the target; the
    verified bound is still at least the pair's LipSDP optimum (so at least every gradient norm of
    the margin), and the solve resumes from those multipliers to the optimum."""
    graph, x = tenclass
    solver = sdp.PairSolver(graph, Settings())
    tight = Settings(extra={"solver_opts": {"tol": 1e-9}})
    optimum = solver.pair(2, 7, tight)
    assert solver.solved.solver_status == "optimal"
    cold = solver.pair(2, 7, Settings(extra={"solver_opts": {"tol": 1e-9, "max_iter": 0}}))  # the start
    target = optimum + 0.5 * (cold - optimum)
    stopped = solver.pair(2, 7, Settings(extra={"solver_opts": {"tol": 1e-9, "target": target}}))
    assert solver.solved.solver_status == "target" and optimum <= stopped <= target * (1 + 1e-6)
    mult = solver.solved.multipliers
    resumed = solver.pair(2, 7, Settings(extra={"solver_opts": {"tol": 1e-9, "init": mult, "start_factor": 1.1}}))
    assert solver.solved.solver_status == "optimal" and resumed == pytest.approx(optimum, rel=1e-6) and resumed >= optimum * (1 - 1e-9)
    # sound: above the largest gradient norm of the margin over many points
    xs = torch.tensor(np.random.default_rng(0).normal(size=(4000, 12)) * 2, requires_grad=True)
    out = graph.forward(xs.reshape(len(xs), 1, 12)).reshape(len(xs), -1)
    (g,) = torch.autograd.grad((out[:, 2] - out[:, 7]).sum(), xs)
    assert g.norm(dim=1).max().item() <= min(optimum, stopped, resumed)


@pytest.mark.slow
def test_pairs_solved_in_worker_processes_give_the_same_constants(tenclass, radii):
    """--jobs 2: pairs solved two at a time in worker processes. "all": the very constants of the
    one-process run (the same solves); "binding": chosen as pairs finish, radii still between
    SETTLE x the optimal pairs' radii and those radii, never below naive."""
    graph, x = tenclass
    every = certified_radius(graph, x, pairs="all", jobs=2)
    np.testing.assert_allclose(every.constants.matrix, radii["all"].constants.matrix, rtol=1e-9)
    b = certified_radius(graph, x, jobs=2)
    opt = radii["optimal"].radii
    assert (b.radii >= SETTLE * opt * (1 - 1e-9)).all() and (b.radii <= opt * (1 + 1e-6)).all()
    assert (b.radii >= radii["naive"].radii * (1 - 1e-12)).all()
    assert 0 < b.constants.solves < 45


@pytest.mark.slow
def test_worker_processes_do_not_rerun_a_script_without_a_main_guard(tmp_path):
    """A user's script without `if __name__ == "__main__":` calls certify with --jobs 2: the
    spawned workers must not run the script again (they would start the pool again, and fail)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import numpy as np, torch, lipcert\n"
        "from lipcert.certify import certified_radius\n"
        "net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "graph = lipcert.load(net, (1, 4))\n"
        "out = certified_radius(graph, np.random.default_rng(0).normal(size=(5, 4)), jobs=2)\n"
        "print('RUNS', len(out.radii))\n")
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lipcert.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("RUNS") == 1


def test_jobs_follow_the_problem_size_and_memory(monkeypatch):
    from lipcert.sdp import pool

    assert pool.jobs_for(200) == 1 and pool.jobs_for(200, jobs=3) == 3
    monkeypatch.setattr(pool, "cores", lambda: 8)
    monkeypatch.setattr(pool, "_available_bytes", lambda: 64e9)
    assert pool.jobs_for(1300) == pool.MAX_AUTO_JOBS
    monkeypatch.setattr(pool, "_available_bytes", lambda: 1.5e9)  # two workers of 1300 rows fit (0.62 GB each), not three
    assert pool.jobs_for(1300) == 2
    monkeypatch.setattr(pool, "_available_bytes", lambda: 1e8)
    assert pool.jobs_for(6000) == 1
