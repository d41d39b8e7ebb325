"""The compositional method (estimators/compose.py): sound against exact constants, LipSDP and
witnessed lower bounds, never above naive, and its float64 checks reject what they must."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import lipcert
from lipcert.config import Settings
from lipcert.estimators import ESTIMATORS
from lipcert.estimators import compose as C
from zoo import jacobian_lower as _jacobian_lower


def _mlp(widths: list[int], act: str, seed: int) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    make = {"relu": torch.nn.ReLU, "leaky": lambda: torch.nn.LeakyReLU(0.125), "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[act]
    layers: list[torch.nn.Module] = []
    for k, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) / math.sqrt(a))
        layers.append(lin)
        if k < len(widths) - 2:
            layers.append(make())
    return torch.nn.Sequential(*layers).double()


def _compose(graph):
    return ESTIMATORS["compose"].run(graph, Settings())


# --- the float64 check --------------------------------------------------------------------------


def test_proven_psd_accepts_definite_and_rejects_barely_indefinite():
    gen = np.random.default_rng(0)
    Q, _ = np.linalg.qr(gen.standard_normal((40, 40)))
    eig = np.linspace(1e-3, 2.0, 40)
    A = (Q * eig) @ Q.T
    assert C.proven_psd(A)
    eig[0] = -1e-9  # one slightly negative eigenvalue: never proven
    assert not C.proven_psd((Q * eig) @ Q.T)
    # an error allowance larger than the smallest eigenvalue makes the proof fail
    assert not C.proven_psd(A, err_fro=1e-2)


def test_chain_step_is_proven_and_a_larger_state_is_not():
    gen = np.random.default_rng(1)
    X = np.eye(6) * 2.0
    W = gen.standard_normal((5, 6))
    Y = C.chain_dense(X, W, 0.5, 0.0)
    assert Y is not None
    s = C._lam_max(W @ np.linalg.inv(X) @ W.T)
    lam = 1.0 / (2 * 0.25 * s)

    def N(Yc):
        top = np.hstack([X, -0.5 * lam * W.T])
        return np.vstack([top, np.hstack([-0.5 * lam * W, lam * np.eye(5) - Yc])])

    assert C.proven_psd(N(Y))
    assert not C.proven_psd(N(Y + 1e-4 * lam * np.eye(5)))  # the closed form is tight: more is false


def test_scalar_of_is_below_the_smallest_eigenvalue():
    X = np.diag([3.0, 0.5, 7.0])
    mu = C.scalar_of(X)
    assert 0.5 * (1 - 1e-6) <= mu <= 0.5


# --- soundness on networks -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_hidden_layer_is_above_the_exact_constant(seed):
    """hidden <= n_in, generic weights: every ReLU pattern is realised and the exact constant is
    the largest ||W2 D W1|| over 0/1 diagonals D."""
    net = _mlp([6, 5, 3], "relu", seed)
    w1, w2 = net[0].weight.detach().numpy(), net[2].weight.detach().numpy()
    exact = max(np.linalg.norm(w2 @ np.diag(d) @ w1, 2) for d in itertools.product([0.0, 1.0], repeat=5))
    graph = lipcert.load(net, (1, 6))
    r = _compose(graph)
    assert r.certified and r.value >= exact * (1 - 1e-12)
    assert r.value <= r.details["naive_value"]


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("seed", [0, 1])
def test_residual_block_is_bounded_as_a_block_and_above_the_exact_constant(shortcut, seed):
    """y = S x + W2 relu(W1 x) with hidden <= n: the exact constant is max_D ||S + W2 D W1||."""
    gen = torch.Generator().manual_seed(seed)
    n, h = 5, 4
    W1, W2 = torch.randn(h, n, generator=gen, dtype=torch.float64), torch.randn(n, h, generator=gen, dtype=torch.float64) * 0.5
    S = torch.eye(n, dtype=torch.float64) if shortcut == "identity" else torch.randn(n, n, generator=gen, dtype=torch.float64)
    b1 = torch.randn(h, generator=gen, dtype=torch.float64)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.s = torch.nn.Linear(n, h), torch.nn.Linear(h, n, bias=False), torch.nn.Linear(n, n, bias=False)
            with torch.no_grad():
                self.l1.weight.copy_(W1), self.l1.bias.copy_(b1), self.l2.weight.copy_(W2), self.s.weight.copy_(S)

        def forward(self, x):
            skip = x if shortcut == "identity" else self.s(x)
            return skip + self.l2(torch.relu(self.l1(x)))

    exact = max(np.linalg.norm(S.numpy() + W2.numpy() @ np.diag(d) @ W1.numpy(), 2) for d in itertools.product([0.0, 1.0], repeat=h))
    graph = lipcert.load(Block().double(), (1, n))
    r = _compose(graph)
    assert r.details["rules"].get("residual block inequality") == 1
    assert r.value >= exact * (1 - 1e-12)
    assert r.details["compositional_value"] < r.details["naive_value"]  # better than 1 + L(g) here


@pytest.mark.parametrize("act", ["relu", "leaky", "tanh", "sigmoid"])
@pytest.mark.parametrize("dense_state", [4096, 12, 3])
def test_mlp_between_lipsdp_and_naive(act, dense_state, monkeypatch):
    """Every path (dense forms, to and from scalar forms, scalar fallbacks) on a small MLP: the
    bound is >= the LipSDP-Neuron bound (compositional certificates are LipSDP-Layer feasible),
    >= a witnessed lower bound and <= naive."""
    monkeypatch.setattr(C, "DENSE_STATE", dense_state)
    graph = lipcert.load(_mlp([8, 16, 10, 12, 3], act, 3), (1, 8))
    r = _compose(graph)
    sdp = ESTIMATORS["sdp"].run(graph, Settings()).value
    assert r.value >= sdp * (1 - 1e-6)
    assert r.value >= _jacobian_lower(graph, 50)
    assert r.value <= r.details["naive_value"]
    if dense_state == 4096:
        assert r.details["compositional_value"] < r.details["naive_value"]


def test_conv_net_is_sound_and_below_naive():
    gen = torch.Generator().manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 5)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    graph = lipcert.load(net, (1, 2, 7, 7))
    r = _compose(graph)
    sdp = ESTIMATORS["sdp"].run(graph, Settings()).value
    assert sdp * (1 - 1e-6) <= r.value <= r.details["naive_value"]
    assert r.value >= _jacobian_lower(graph, 50)


def test_large_layers_fall_back_to_proven_norms(monkeypatch):
    """A layer above DENSE_STATE never gets a dense form; the bound stays proven and <= naive."""
    monkeypatch.setattr(C, "DENSE_STATE", 40)
    gen = torch.Generator().manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.4)
    graph = lipcert.load(net, (1, 1, 6, 6))
    r = _compose(graph)
    assert "layer inequality (to a scalar form)" in r.details["rules"] or "naive: slope x proven layer norm" in r.details["rules"]
    assert _jacobian_lower(graph, 50) <= r.value <= r.details["naive_value"]


def test_real_network_acas_is_between_lipsdp_and_naive():
    """ACAS Xu 1_1 (../shared/models): LipSDP-Neuron 88258.82, naive 2.878694e7 (RESULTS.md)."""
    graph = lipcert.load("../shared/models/vnncomp2021/ACASXU_run2a_1_1_batch_2000.onnx")
    r = _compose(graph)
    assert 88258.82 * (1 - 1e-6) <= r.value < 0.5 * 2.878694e7


def test_a_block_that_cannot_be_proven_falls_back_to_its_branches(monkeypatch):
    """When the block inequality is not proven, the branch nodes are bounded one by one and summed."""
    gen = torch.Generator().manual_seed(6)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(5, 4), torch.nn.Linear(4, 5)

        def forward(self, x):
            return x + self.l2(torch.relu(self.l1(x)))

    net = Block().double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    graph = lipcert.load(net, (1, 5))
    blocked = _compose(graph).value
    monkeypatch.setattr(C, "block_dense", lambda *args: None)
    r = _compose(graph)
    assert r.details["rules"].get("naive: sum over branches") == 1 and "residual block inequality" not in r.details["rules"]
    assert _jacobian_lower(graph, 100) <= blocked <= r.value <= r.details["naive_value"]


@pytest.mark.parametrize("act", ["relu", "leaky", "sigmoid"])
def test_wide_layer_then_narrow_output_is_one_inequality(act, monkeypatch):
    """A hidden layer wider than DENSE_STATE before a narrow output (as Convnet_avgpool's 23328
    neurons before 10 outputs): one two-layer inequality in n + r rows; LipSDP <= it < naive."""
    monkeypatch.setattr(C, "DENSE_STATE", 6)
    graph = lipcert.load(_mlp([4, 30, 3], act, 7), (1, 4))
    r = _compose(graph)
    assert r.details["rules"].get("two-layer inequality (wide layer, narrow output)") == 1
    sdp = ESTIMATORS["sdp"].run(graph, Settings()).value
    assert sdp * (1 - 1e-6) <= r.value < r.details["naive_value"]
    assert r.value >= _jacobian_lower(graph, 100)



def test_a_tiny_prefix_does_not_overflow_into_a_bound_of_zero():
    """17 orthogonal layers scaled by 1e-10, then 17 by 1e10 (tanh between: about linear near 0,
    constant about 1): the prefix's scalar state 1 / L^2 = 1e340 used to overflow to inf, read as
    "constant", and compose reported 0. Capped, it stays a proof above the witness."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(34):
        lin = torch.nn.Linear(3, 3).double()
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
            lin.weight.copy_(q * (1e-10 if i < 17 else 1e10))
            lin.bias.zero_()
        layers += [lin, torch.nn.Tanh()] if i < 33 else [lin]
    graph = lipcert.load(torch.nn.Sequential(*layers), (1, 3))
    x = torch.ones(1, 1, 3, dtype=torch.float64)
    witnessed = float((graph.forward(x) - graph.forward(0 * x)).norm() / x.norm())
    assert witnessed > 0.99
    for method in ("compose", "sdp-wide"):
        assert lipcert.bound(graph, method).value >= witnessed


def test_a_network_that_ignores_its_input_is_bounded_by_zero_without_numpy_warnings():
    """A first layer of zeros: every later state is "constant" (inf), whose dense form inf * I was
    NaN off the diagonal (a RuntimeWarning; the Cholesky check refused it anyway)."""
    net = _mlp([2, 8, 8, 3], "leaky", 0)
    with torch.no_grad():
        net[0].weight.zero_()
    graph = lipcert.load(net, (1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for method in ("compose", "sdp-wide"):
            assert lipcert.bound(graph, method).value == 0.0

