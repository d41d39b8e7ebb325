"""The float64 re-verification of LipSDP multipliers: the part every SDP bound rests on."""

from __future__ import annotations

import numpy as np
import torch
import pytest

import lipcert
from lipcert.sdp.problem import LipSDPProblem, problem_from_graph, verify
from zoo import one_hidden_relu, single_linear


def _best_scalar(problem: LipSDPProblem) -> float:
    values = [verify(problem, [np.array([lam])]) for lam in np.logspace(-2, 3, 80)]
    return min(v.value for v in values if v.ok)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verified_value_is_above_the_exact_constant(seed):
    z = one_hidden_relu(seed)
    problem = problem_from_graph(lipcert.load(z.module, z.input_shape))
    value = _best_scalar(problem)
    naive = lipcert.bound(lipcert.load(z.module, z.input_shape)).value
    assert z.exact["2"] <= value <= naive * (1 + 1e-9)


def test_negative_or_zero_multipliers_are_rejected():
    z = one_hidden_relu()
    problem = problem_from_graph(lipcert.load(z.module, z.input_shape))
    assert not verify(problem, [np.zeros(5)]).ok
    assert not verify(problem, [np.full(5, np.nan)]).ok
    assert not verify(problem, [np.ones(3)]).ok  # wrong size


def test_tampered_multipliers_never_give_a_smaller_bound_than_exact():
    z = one_hidden_relu(3)
    problem = problem_from_graph(lipcert.load(z.module, z.input_shape))
    rng = np.random.default_rng(0)
    for _ in range(200):
        lam = rng.exponential(scale=rng.uniform(0.01, 50), size=5)
        v = verify(problem, [lam])
        if v.ok:
            assert v.value >= z.exact["2"]


def test_linear_network_is_not_an_sdp_problem():
    z = single_linear()
    assert isinstance(problem_from_graph(lipcert.load(z.module, z.input_shape)), str)


def test_residual_network_is_refused_with_a_reason(tmp_path):
    class Residual(torch.nn.Module):  # x + relu(W x): the branch is not linear, the graph not a chain
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    reason = problem_from_graph(lipcert.load(Residual(), (1, 3)))
    assert isinstance(reason, str) and "chain" in reason


@pytest.mark.parametrize("seed", range(4))
def test_block_cholesky_decides_definiteness_like_the_eigenvalues(seed):
    """The proof factorises M block by block (it is block-tridiagonal): on random block-tridiagonal
    matrices, shifted just above and just below their smallest eigenvalue, it succeeds exactly
    when the whole matrix is positive definite, also where every diagonal block is."""
    from lipcert.sdp.problem import _block_cholesky_ok, block_tridiagonal

    rng = np.random.default_rng(seed)
    sizes = [5, 3, 7, 4][: 2 + seed % 3]
    A = [(lambda G: G @ G.T + n * np.eye(n))(rng.normal(size=(n, n))) for n in sizes]
    B = [2.0 * rng.normal(size=(m, n)) for n, m in zip(sizes, sizes[1:])]
    low = float(np.linalg.eigvalsh(block_tridiagonal(A, B))[0])
    shift = lambda t: [Ak - t * np.eye(len(Ak)) for Ak in A]  # noqa: E731
    assert _block_cholesky_ok(shift(low - 1e-6 * abs(low) - 1e-9), B)
    assert not _block_cholesky_ok(shift(low + 1e-6 * abs(low) + 1e-9), B)
    # the diagonal blocks alone stay positive definite just above the smallest eigenvalue
    assert min(float(np.linalg.eigvalsh(Ak)[0]) for Ak in A) > low + 1e-6 * abs(low) + 1e-9
