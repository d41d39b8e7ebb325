"""Conformance suite: every registered estimator against every known-answer network.

upper (certified) >= exact >= lower; estimates are never certified; results are complete and
deterministic under a seed. New estimators are picked up from the registry automatically.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lipcert
from lipcert.config import Settings
from lipcert.estimators import ESTIMATORS, estimate
from zoo import all_nets

NETS = {z.name: z for z in all_nets()}
GRAPHS = {name: lipcert.load(z.module, z.input_shape) for name, z in NETS.items()}


def _cases():
    for method in ESTIMATORS:
        for name in NETS:
            for p in ("2", "inf"):
                yield pytest.param(method, name, p, id=f"{method}-{name}-l{p}")


@pytest.mark.parametrize("method,net,p", list(_cases()))
def test_estimator_brackets_the_exact_constant(method, net, p):
    est, graph, exact = ESTIMATORS[method], GRAPHS[net], NETS[net].exact[p]
    s = Settings(norm=p, seed=0, starts=16, steps=10)  # small search budget: the suite stays fast
    if est.accepts(graph, s) is not None:
        pytest.skip(f"{method} does not apply: {est.accepts(graph, s)}")
    r = estimate(graph, method, s)
    assert r.method == method and r.kind == est.kind and r.norm == p
    assert r.time_s >= 0 and isinstance(r.settings, dict)
    if r.value is None:
        assert not r.certified and r.status != "ok"
        return
    assert math.isfinite(r.value)
    if r.kind == "upper" and r.certified:
        assert r.value >= exact * (1 - 1e-12), f"{method} upper bound {r.value} below exact {exact}"
    if r.kind == "lower":
        assert r.value <= exact * (1 + 1e-9), f"{method} lower bound {r.value} above exact {exact}"
        assert r.witness is not None
    if r.kind == "estimate":
        assert not r.certified


@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_estimator_is_deterministic_under_a_seed(method):
    graph = GRAPHS["one_hidden_relu"]
    s = Settings(norm="2", seed=3, starts=16, steps=10)
    if ESTIMATORS[method].accepts(graph, s) is not None:
        pytest.skip("does not apply")
    a, b = estimate(graph, method, s), estimate(graph, method, s)
    assert a.value == b.value


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    act=st.sampled_from(["relu", "leaky", "tanh", "sigmoid", "elu", "softplus"]),
    seed=st.integers(0, 10_000),
)
def test_naive_upper_is_above_sampled_ratios(widths, act, seed):
    """On random small networks, no sampled pair stretches more than the naive bound."""
    gen = torch.Generator().manual_seed(seed)
    acts = {"relu": torch.nn.ReLU, "leaky": lambda: torch.nn.LeakyReLU(0.3), "tanh": torch.nn.Tanh,
            "sigmoid": torch.nn.Sigmoid, "elu": lambda: torch.nn.ELU(1.5), "softplus": torch.nn.Softplus}
    layers, n_in = [], 3
    for w in widths:
        lin = torch.nn.Linear(n_in, w)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, n_in, generator=gen))
        layers += [lin, acts[act]()]
        n_in = w
    layers.append(torch.nn.Linear(n_in, 2))
    graph = lipcert.load(torch.nn.Sequential(*layers), (1, 3))
    upper = lipcert.bound(graph).value
    x = torch.randn((256, 1, 3), generator=gen, dtype=torch.float64) * 3
    y = x + torch.randn((256, 1, 3), generator=gen, dtype=torch.float64) * 0.5
    ratios = (graph.forward(x) - graph.forward(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratios.max()) <= upper
