"""Local constants and local certified radii: pre-activation bounds contain every sampled value,
local constants are never below a sampled Jacobian norm or difference quotient in the region,
they are exact where the answer is known, and an attack never flips a point inside a certified
radius."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import lipcert
from lipcert.attack import attack
from lipcert.certify import certified_radius
from lipcert.errors import InputError
from lipcert.local import (Region, chain_of, jacobian_intervals, local_bound, margin_constants, margin_rows, masked_product,
                           preactivation_bounds, whole_constant)
from conftest import SHARED_MODELS
from zoo import one_hidden_relu

DUAL = {"2": 2, "inf": 1, "1": np.inf}
ACTS = {"relu": torch.nn.ReLU, "leaky": lambda: torch.nn.LeakyReLU(0.125), "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh,
        "softplus": torch.nn.Softplus}


def mlp(seed: int, widths: tuple[int, ...], act: str = "relu") -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = torch.nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=torch.float64) / np.sqrt(a))
            lin.bias.copy_(torch.randn(b, generator=gen, dtype=torch.float64) * 0.3)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(ACTS[act]())
    return torch.nn.Sequential(*layers)


def sample_region(region: Region, n: int, rng: np.random.Generator) -> np.ndarray:
    """Points of the region, many on its boundary (where bounds are attained)."""
    d = region.center.size
    if region.kind == "box":
        u = rng.uniform(size=(n, d))
        u[: n // 2] = rng.integers(0, 2, size=(n // 2, d))  # corners
        return region.lo + u * (region.hi - region.lo)
    if region.norm == "inf":
        v = rng.uniform(-1, 1, size=(n, d))
        v[: n // 2] = np.sign(v[: n // 2])
    elif region.norm == "2":
        v = rng.normal(size=(n, d))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v[n // 2:] *= rng.uniform(size=(n - n // 2, 1)) ** (1 / d)
    else:
        v = rng.laplace(size=(n, d))
        v /= np.abs(v).sum(1, keepdims=True)
        v[: n // 4] = 0
        v[np.arange(n // 4), rng.integers(0, d, n // 4)] = rng.choice([-1.0, 1.0], n // 4)
    return region.center + region.radius * v


def hidden_values(graph: lipcert.Graph, x: np.ndarray) -> list[np.ndarray]:
    """Every hidden pre-activation of the merged chain at the points x."""
    g = graph.merge_linear()
    names = [n.inputs[0] for n in g.nodes if isinstance(n, lipcert.graph.Activation)]
    xs = torch.from_numpy(x.reshape(-1, *graph.input_shape))
    return [g.forward(xs, upto=name).reshape(len(x), -1).numpy() for name in names]


def jacobians(graph: lipcert.Graph, x: np.ndarray) -> np.ndarray:
    xs = torch.from_numpy(x.reshape(-1, *graph.input_shape))
    f = lambda t: graph.forward(t.reshape(1, *graph.input_shape)).reshape(-1)  # noqa: E731
    return np.stack([torch.autograd.functional.jacobian(f, xi).reshape(graph.output_dim, -1).numpy() for xi in xs])


def op_norm(J: np.ndarray, norm: str) -> float:
    return float(np.linalg.norm(J, {"2": 2, "inf": np.inf, "1": 1}[norm]))


REGIONS = [("ball", "2"), ("ball", "inf"), ("ball", "1"), ("box", None)]


def make_region(kind: str, norm: str | None, center: np.ndarray, radius: float, rng: np.random.Generator) -> Region:
    if kind == "box":
        lo = center - radius * rng.uniform(0.2, 1.0, center.size)
        return Region.box(lo, center + radius * rng.uniform(0.2, 1.0, center.size))
    return Region.ball(center, radius, norm)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), act=st.sampled_from(list(ACTS)), where=st.sampled_from(REGIONS),
       radius=st.sampled_from([0.01, 0.1, 0.5, 2.0]), method=st.sampled_from(["ibp", "crown"]))
def test_preactivation_bounds_contain_every_sampled_value(seed, act, where, radius, method):
    graph = lipcert.load(mlp(seed, (5, 8, 7, 3), act), (1, 5))
    rng = np.random.default_rng(seed)
    region = make_region(*where, rng.normal(size=5), radius, rng)
    b = preactivation_bounds(chain_of(graph), region, method)
    for z, l, u in zip(hidden_values(graph, sample_region(region, 400, rng)), b.lower, b.upper):
        assert (z >= l).all() and (z <= u).all()


def test_crown_is_never_looser_than_intervals():
    graph = lipcert.load(mlp(3, (6, 20, 20, 20, 4)), (1, 6))
    region = Region.ball(np.random.default_rng(0).normal(size=6), 0.3, 2)
    ibp, crown = (preactivation_bounds(chain_of(graph), region, m) for m in ("ibp", "crown"))
    for li, ui, lc, uc in zip(ibp.lower, ibp.upper, crown.lower, crown.upper):
        assert (lc >= li).all() and (uc <= ui).all()
    assert sum(crown.unstable()) <= sum(ibp.unstable())
    assert (crown.upper[-1] - crown.lower[-1]).sum() < (ibp.upper[-1] - ibp.lower[-1]).sum()  # strictly tighter somewhere


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), act=st.sampled_from(list(ACTS)), where=st.sampled_from(REGIONS),
       radius=st.sampled_from([0.05, 0.3, 1.5]))
def test_local_constant_is_never_below_a_sampled_jacobian_or_difference_quotient(seed, act, where, radius):
    graph = lipcert.load(mlp(seed, (4, 9, 6, 3), act), (1, 4))
    rng = np.random.default_rng(seed)
    region = make_region(*where, rng.normal(size=4), radius, rng)
    norm = where[1] or rng.choice(["2", "inf", "1"])
    chain = chain_of(graph)
    b = preactivation_bounds(chain, region)
    K, _ = whole_constant(chain, b, norm)
    pts = sample_region(region, 200, rng)
    sampled = max(op_norm(J, norm) for J in jacobians(graph, pts[:60]))
    assert sampled <= K
    assert sampled <= masked_product(chain, b, norm)  # each candidate on its own, not only the smaller
    lo, hi = jacobian_intervals(chain, b, np.eye(3))
    assert sampled <= op_norm(np.maximum(np.abs(lo), np.abs(hi)), norm)
    f = graph.forward(torch.from_numpy(pts.reshape(-1, 1, 4))).reshape(len(pts), -1).numpy()
    out_norm = {"2": 2, "inf": np.inf, "1": 1}[norm]
    dist = np.linalg.norm(pts[::2] - pts[1::2], out_norm, axis=1)
    diff = np.linalg.norm(f[::2] - f[1::2], out_norm, axis=1)[dist > 0] / dist[dist > 0]
    assert diff.max() <= K
    # per margin: the dual norm of every sampled margin gradient
    _, rows = margin_rows(3, 0)
    grads = np.einsum("mk,nki->nmi", rows, jacobians(graph, pts[:30]))
    for masked in (False, True):
        Km, _ = margin_constants(chain, b, norm, rows, masked=masked)
        assert (np.linalg.norm(grads, DUAL[norm], axis=2) <= Km).all()
    # and never above the global naive bound (the masked product is at most the full product)
    assert K <= lipcert.bound(graph, "naive", norm=norm).value * (1 + 1e-9)


@pytest.mark.parametrize("norm", ["2", "inf", "1"])
def test_local_constant_is_exact_where_every_neuron_is_stable(norm):
    """Around a point whose neurons are all far from 0, the network is affine on a small ball:
    the local constant is the norm of that one Jacobian (brute force on one_hidden_relu)."""
    net = one_hidden_relu(seed=4)
    graph = lipcert.load(net.module, net.input_shape)
    x = np.random.default_rng(1).normal(size=6)
    b = preactivation_bounds(chain_of(graph), Region.ball(x, 1e-4, norm))
    assert sum(b.unstable()) == 0
    K = local_bound(graph, x, 1e-4, norm=norm).value
    J = jacobians(graph, x[None])[0]
    assert op_norm(J, norm) <= K <= op_norm(J, norm) * (1 + 1e-7)
    assert K <= net.exact[norm] * (1 + 1e-9)
    # a huge ball sees every pattern: the bound covers the exact global constant
    assert local_bound(graph, x, 1e4, norm=norm).value >= net.exact[norm]


def test_local_sdp_is_proven_and_not_looser_than_local_naive():
    graph = lipcert.load(mlp(7, (5, 12, 10, 3)), (1, 5))
    rng = np.random.default_rng(7)
    x = rng.normal(size=5)
    naive = local_bound(graph, x, 0.5, norm=2, method="naive")
    sdp = local_bound(graph, x, 0.5, norm=2, method="sdp")
    assert sdp.certified and sdp.value <= naive.value
    pts = sample_region(Region.ball(x, 0.5, "2"), 100, rng)
    assert max(op_norm(J, "2") for J in jacobians(graph, pts)) <= sdp.value
    assert sdp.details["region"] == {"kind": "ball", "norm": "2", "radius": 0.5, "center_dim": 5}


def test_local_bound_refuses_what_it_cannot_bound():
    graph = lipcert.load(mlp(0, (3, 4, 2)), (1, 3))
    with pytest.raises(InputError, match="centre and a radius"):
        local_bound(graph, np.zeros(3))
    with pytest.raises(InputError, match="l2 norm only"):
        local_bound(graph, np.zeros(3), 0.1, norm="inf", method="sdp")
    with pytest.raises(InputError, match="dimension 4"):
        local_bound(graph, np.zeros(4), 0.1)
    with pytest.raises(InputError, match="radius must be"):
        local_bound(graph, np.zeros(3), -1.0)
    with pytest.raises(InputError, match="'bounds' parameter of local_bound"):  # not preactivation_bounds()'s 'method'
        local_bound(graph, np.zeros(3), 0.1, bounds="foo")
    for bad in (np.nan, np.inf):  # a NaN centre gave a "proven" constant
        with pytest.raises(InputError, match="centre contains NaN or infinite"):
            local_bound(graph, np.array([bad, 0.0, 0.0]), 0.1)
        with pytest.raises(InputError, match="radius must be"):
            local_bound(graph, np.zeros(3), bad)
    with pytest.raises(InputError, match="lo <= hi"):
        local_bound(graph, box=(np.ones(3), np.zeros(3)))


def test_local_bound_refuses_a_residual_network():
    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    with pytest.raises(InputError, match="not a chain"):
        local_bound(lipcert.load(Res(), (1, 3)), np.zeros(3), 0.1)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["2", "inf"]), act=st.sampled_from(["relu", "tanh"]))
def test_attack_never_flips_a_point_inside_its_local_certified_radius(seed, norm, act):
    graph = lipcert.load(mlp(seed, (4, 16, 16, 3), act), (1, 4))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, 4))
    certs = certified_radius(graph, x, norm=norm, method="naive", local=True)
    assert (certs.radii >= certs.global_radii).all()
    found = attack(graph, x, certs.predicted, norm=norm, steps=30, restarts=2, search=10, seed=seed)
    assert (found.radii >= certs.radii).all()
    # random points inside the certified ball keep their class too
    for xi, r, y in zip(x, certs.radii, certs.predicted):
        pts = sample_region(Region.ball(xi, r, norm), 300, rng)
        pred = graph.forward(torch.from_numpy(pts.reshape(-1, 1, 4))).reshape(len(pts), -1).argmax(1).numpy()
        assert (pred == y).all()


def test_attack_witnesses_are_real_flips():
    graph = lipcert.load(mlp(1, (4, 16, 3)), (1, 4))
    x = np.random.default_rng(2).normal(size=(8, 4))
    labels = graph.forward(torch.from_numpy(x.reshape(-1, 1, 4))).reshape(8, -1).argmax(1).numpy()
    res = attack(graph, x, labels, norm=2, steps=20, search=6)
    ok = np.isfinite(res.radii)
    assert ok.any()
    adv = res.adversarial[ok].reshape(-1, 1, 4)
    assert (graph.forward(torch.from_numpy(adv)).reshape(len(adv), -1).argmax(1).numpy() != labels[ok]).all()
    assert np.allclose(np.linalg.norm(adv.reshape(len(adv), -1) - x[ok], axis=1), res.radii[ok])
    assert res.robust_accuracy(0.0) == 1.0 and res.robust_accuracy(np.inf) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("norm, factor", [("2", 10.0), ("inf", 100.0)])
def test_mnist_local_radius_beats_global_and_stays_below_the_attack(norm, factor):
    graph = lipcert.load(SHARED_MODELS / "vnncomp2021" / "mnist-net_256x2.onnx")
    data = np.load(SHARED_MODELS.parent / "data" / "mnistfc15.npz")
    x, y = data["x"][:2].astype(np.float64), data["y"][:2]
    certs = certified_radius(graph, x, y, norm=norm, method="naive", local=True)
    assert (certs.radii >= factor * certs.global_radii).all()
    found = attack(graph, x, y, norm=norm, steps=40, restarts=1, search=8)
    assert (found.radii >= certs.radii).all()


# --- command line ---------------------------------------------------------------------------

def _cli(*args):
    from click.testing import CliRunner

    from lipcert.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _tiny_model(tmp_path):
    graph_module = mlp(2, (4, 8, 3))
    path = tmp_path / "m.onnx"
    torch.onnx.export(graph_module.float(), torch.zeros(1, 4), str(path), dynamo=False)
    return path


def test_cli_bound_over_a_ball_and_a_box(tmp_path):
    import json

    model = _tiny_model(tmp_path)
    x = np.random.default_rng(0).normal(size=(2, 4))
    np.savez(tmp_path / "c.npz", x=x)
    np.savez(tmp_path / "lo.npz", x=x - 0.1)
    np.savez(tmp_path / "hi.npz", x=x + 0.1)
    res = _cli("bound", model, "--center", tmp_path / "c.npz", "--radius", 0.1, "--index", 1, "--method", "all", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["region"] == {"kind": "ball", "norm": "2", "radius": 0.1, "center_dim": 4}
    values = {r["method"]: r["value"] for r in out["results"]}
    assert set(values) == {"local-naive", "local-sdp"} and all(r["certified"] for r in out["results"])
    assert values["local-naive"] == pytest.approx(local_bound(lipcert.load(str(model)), x[1], 0.1).value)
    res = _cli("bound", model, "--box", tmp_path / "lo.npz", tmp_path / "hi.npz", "--norm", "inf")
    assert res.exit_code == 0 and "local-naive" in res.output and "box" in res.output
    # the box [x - 0.1, x + 0.1] is the linf ball of radius 0.1
    box = float(res.output.split("local-naive")[1].split()[2])
    assert box == pytest.approx(local_bound(lipcert.load(str(model)), x[0], 0.1, norm="inf").value, rel=1e-5)


def test_cli_local_bound_errors(tmp_path):
    model = _tiny_model(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.zeros((1, 4)))
    for args, text in [((["--center", tmp_path / "c.npz"]), "both --center and --radius"),
                       ((["--center", tmp_path / "c.npz", "--radius", 1, "--method", "gram"]), "no local version"),
                       ((["--center", tmp_path / "c.npz", "--radius", 1, "--index", 3]), "out of range"),
                       ((["--center", tmp_path / "c.npz", "--radius", 1, "--norm", "inf", "--method", "sdp"]), "l2 norm only")]:
        res = _cli("bound", model, *args)
        assert res.exit_code == 1 and text in res.output and "What to do" in res.output, res.output


def test_cli_certify_local(tmp_path):
    import json

    model = _tiny_model(tmp_path)
    x = np.random.default_rng(3).normal(size=(5, 4))
    graph = lipcert.load(str(model))
    y = graph.forward(torch.from_numpy(x.reshape(-1, 1, 4))).reshape(5, -1).argmax(1).numpy()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    res = _cli("certify", model, "--data", tmp_path / "d.npz", "--local", "--norm", "inf", "--method", "naive", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    radii = np.array([p["radius"] for p in out["points"]])
    assert out["local"] and len(out["how"]) == 5 and (radii >= np.array(out["pairwise_radii"])).all()
    assert any(h.startswith("local") for h in out["how"])
    text = _cli("certify", model, "--data", tmp_path / "d.npz", "--local").output
    assert "without local constants" in text


@pytest.mark.slow
def test_report_local_draws_global_local_and_attack_curves(tmp_path):
    from conftest import MODELS

    out = tmp_path / "r.html"
    data = np.load(MODELS / "spiral_test.npz")
    np.savez(tmp_path / "d.npz", x=data["x"][:8], y=data["y"][:8])
    res = _cli("report", MODELS / "mlp_spiral.onnx", "--data", tmp_path / "d.npz", "-o", out, "--local", "-q")
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "Local constants and an attack" in html and "--local" in html
    assert html.count("<svg") >= 5


def test_channelwise_prelu_after_a_convolution_gets_global_and_local_bounds():
    """PReLU's per-channel slopes (C, 1, 1) broadcast over the C x H x W neurons of a convolution:
    LipSDP and the local bounds used to fail on the shapes; every bound stays above the sampled
    stretches (global: witnessed lower bound; local: Jacobians in the ball)."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2), torch.nn.PReLU(2), torch.nn.Flatten(), torch.nn.Linear(8, 8),
                                 torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        module[1].weight.copy_(torch.tensor([-3.0, 0.5]))
    graph = lipcert.load(module, (1, 1, 3, 3))
    low = lipcert.lower_bound(graph, norm=2, starts=8, steps=30).value
    sdp = lipcert.bound(graph, "sdp", norm=2)
    assert sdp.certified and low <= sdp.value <= lipcert.bound(graph, "naive", norm=2).value * (1 + 1e-9)
    rng = np.random.default_rng(0)
    center = rng.normal(size=9)
    region = Region.ball(center, 0.5, "2")
    local = local_bound(graph, center, 0.5, norm=2)
    sampled = max(op_norm(J, "2") for J in jacobians(graph, sample_region(region, 60, rng)))
    assert sampled <= local.value
    # at a point (radius 0) every neuron is stable: per-channel slopes, not the widest interval
    point = local_bound(graph, center, np.float32(0.0), norm=2)  # a numpy scalar radius is a number
    assert point.details["unstable_neurons"] == [0, 0]
    assert op_norm(jacobians(graph, center[None])[0], "2") <= point.value <= sdp.value
