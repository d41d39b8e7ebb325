"""Known-answer networks: each comes with its exact Lipschitz constant per norm.

Every estimator is checked against these: an upper bound must be >= exact, a lower bound <= exact.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lipcert.graph.linear import dense_norm


@dataclass
class ZooNet:
    name: str
    module: torch.nn.Module
    input_shape: tuple[int, ...]
    exact: dict[str, float]  # norm -> exact Lipschitz constant


def _linear(n_in: int, n_out: int, gen: torch.Generator) -> torch.nn.Linear:
    layer = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=gen))
        layer.bias.copy_(torch.randn(n_out, generator=gen) * 0.3)
    return layer


def single_linear(seed: int = 0, n_in: int = 7, n_out: int = 5) -> ZooNet:
    gen = torch.Generator().manual_seed(seed)
    layer = _linear(n_in, n_out, gen)
    w = layer.weight.detach().double().numpy()
    return ZooNet("single_linear", torch.nn.Sequential(layer), (1, n_in), {p: dense_norm(w, p) for p in ("2", "inf", "1")})


def one_hidden_relu(seed: int = 0, n_in: int = 6, hidden: int = 5, n_out: int = 3) -> ZooNet:
    """hidden <= n_in: generic hyperplanes then realise all 2^hidden activation patterns, so the
    Lipschitz constant is exactly the largest ||W2 D W1|| over diagonal 0/1 patterns D."""
    assert hidden <= n_in
    gen = torch.Generator().manual_seed(seed)
    l1, l2 = _linear(n_in, hidden, gen), _linear(hidden, n_out, gen)
    w1, w2 = l1.weight.detach().double().numpy(), l2.weight.detach().double().numpy()
    exact = {}
    for p in ("2", "inf", "1"):
        exact[p] = max(dense_norm(w2 @ np.diag(d) @ w1, p) for d in itertools.product([0.0, 1.0], repeat=hidden))
    return ZooNet("one_hidden_relu", torch.nn.Sequential(l1, torch.nn.ReLU(), l2), (1, n_in), exact)


def diagonal_chain(seed: int = 0, n: int = 4) -> ZooNet:
    """Diagonal weights with ReLU: the constant is the product of the largest |entries| (l2, linf, l1)."""
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = torch.rand(n, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    l1, l2 = torch.nn.Linear(n, n), torch.nn.Linear(n, n)
    with torch.no_grad():
        l1.weight.copy_(torch.diag(d1)); l1.bias.zero_()
        l2.weight.copy_(torch.diag(d2)); l2.bias.zero_()
    # coordinatewise x_i -> d2_i relu(d1_i x_i): the constant is max_i d1_i d2_i for every norm
    value = float(max(float(d1[i]) * float(d2[i]) for i in range(n)))  # in float64, as lipcert computes
    return ZooNet("diagonal_chain", torch.nn.Sequential(l1, torch.nn.ReLU(), l2), (1, n), {p: value for p in ("2", "inf", "1")})


class _Residual(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.lin = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(3) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x)


def residual_scaled(scale: float = 0.5) -> ZooNet:
    """x + s*x = (1 + s) x: the residual bound 1 + L(g) is exact here."""
    return ZooNet("residual_scaled", _Residual(scale), (1, 3), {p: 1.0 + scale for p in ("2", "inf", "1")})


def all_nets() -> list[ZooNet]:
    return [single_linear(), one_hidden_relu(), diagonal_chain(), residual_scaled()]


def jacobian_lower(graph, n: int = 200, seed: int = 0) -> float:
    """max ||J(x)||_2 over random points: a witnessed lower bound on the Lipschitz constant."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(n):
        x = torch.randn((1, *graph.input_shape), generator=gen, dtype=torch.float64) * 2
        J = torch.autograd.functional.jacobian(lambda t: graph.forward(t).flatten(), x).reshape(graph.output_dim, -1)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


class GroupSort(torch.nn.Module):
    """GroupSort activation (Anil et al. 2019): sorts consecutive groups of ``size`` features
    (size 2: MaxMin). Used by the by-design tests and benchmarks/bench_bydesign.py."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x):
        g = x.reshape(x.shape[0], -1, self.size)
        if self.size == 2:
            return torch.cat([g.min(-1, keepdim=True)[0], g.max(-1, keepdim=True)[0]], -1).reshape(x.shape)
        return torch.sort(g, -1)[0].reshape(x.shape)
