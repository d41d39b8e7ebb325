"""Certified radii: exact on linear classifiers, never beaten by an attack, pairwise never worse
than the global constant; `lipcert certify` with JSON and bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lipcert
from lipcert.certify import certified_radius, certify, pairwise_constants
from lipcert.config import Settings
from lipcert.cli import main
from conftest import MODELS, SHARED_MODELS

DUAL = {"2": 2, "inf": 1}


def linear_classifier(seed: int = 0, n_in: int = 4, k: int = 3):
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(n_in, k).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(k, n_in, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("method", ["naive", "sdp"])
def test_linear_classifier_radius_is_the_distance_to_the_decision_boundary(norm, method):
    layer = linear_classifier()
    graph = lipcert.load(torch.nn.Sequential(layer.float()), (1, 4))
    W = layer.weight.detach().double().numpy()
    bias = layer.bias.detach().double().numpy()
    x = np.random.default_rng(1).normal(size=(40, 4))
    certs = certified_radius(graph, x, norm=norm, method=method)
    for xi, r, y in zip(x, certs.radii, certs.predicted):
        logits = W @ xi + bias
        # the exact distance to the boundary of class y in the given norm: over the competing
        # classes, the margin divided by the dual norm of the row difference
        exact = min((logits[y] - logits[j]) / np.linalg.norm(W[y] - W[j], DUAL[norm]) for j in range(3) if j != y)
        assert r <= exact * (1 + 1e-7)  # sound: never beyond the boundary
        assert r >= exact * (1 - 1e-6)  # and tight: it is the exact distance
    assert (certs.radii >= certs.global_radii * (1 - 1e-12)).all()


def test_misclassified_points_get_radius_zero():
    layer = linear_classifier(seed=2)
    graph = lipcert.load(torch.nn.Sequential(layer.float()), (1, 4))
    x = np.random.default_rng(3).normal(size=(30, 4))
    predicted = certified_radius(graph, x).predicted
    wrong = (predicted + 1) % 3
    labels = np.where(np.arange(30) % 2 == 0, predicted, wrong)
    certs = certified_radius(graph, x, labels)
    assert (certs.radii[labels != predicted] == 0).all()
    assert (certs.radii[labels == predicted] > 0).all()
    out = certify(graph, x, labels, [0.0])
    assert out["clean_accuracy"] == pytest.approx(0.5)
    assert all(p["certified"] is (p["label"] == p["predicted"]) for p in out["points"])
    with pytest.raises(lipcert.InputError, match="labels must lie in") as exc:
        certified_radius(graph, x, np.full(30, 7))
    assert "30 label(s)" in exc.value.message() and "7" in exc.value.what  # which labels, not only the range
    with pytest.raises(lipcert.InputError, match="labels for"):
        certified_radius(graph, x, labels[:3])
    with pytest.raises(lipcert.InputError, match="'jobs' parameter of certified_radius"):
        certified_radius(graph, x, jobs="a")
    assert len(certified_radius(graph, x, jobs=np.int64(1)).radii) == 30  # numpy integers are integers
    # constants reused from another norm would give radii in the wrong norm: refused
    linf = pairwise_constants(graph, "inf", "naive")
    with pytest.raises(lipcert.InputError, match="constants given are for the inf norm"):
        certified_radius(graph, x, norm=2, constants=linf)
    assert np.allclose(certified_radius(graph, x, norm="inf", constants=linf).radii, certified_radius(graph, x, norm="inf", method="naive").radii)


@pytest.fixture(scope="module")
def spiral():
    graph = lipcert.load(MODELS / "mlp_spiral.onnx")
    data = np.load(MODELS / "spiral_test.npz")
    return graph, data["x"], data["y"]


def test_pairwise_constants_are_at_most_the_global_fallback(spiral):
    graph, _, _ = spiral
    for method in ("naive", "sdp"):
        c = pairwise_constants(graph, "2", method)
        off = ~np.eye(c.matrix.shape[0], dtype=bool)
        assert (c.matrix[off] <= math.sqrt(2) * c.global_bound * (1 + 1e-12)).all()
        assert (c.matrix[off] > 0).all() and np.allclose(c.matrix, c.matrix.T)
    sdp = pairwise_constants(graph, "2", "sdp")
    assert "LipSDP pairwise" in sdp.how.values() and sdp.global_method == "sdp"
    # a pair's constant is still at least what a witnessed search finds for that margin
    lower = lipcert.lower_bound(graph, starts=16, steps=10).value
    assert sdp.global_bound >= lower


def _pgd(graph, x, y, radius, norm, steps=60):
    """Projected gradient ascent on the largest competing margin within the ball: True where a
    class change was found."""
    x0 = torch.as_tensor(x, dtype=torch.float64).reshape(len(x), *graph.input_shape)
    r = torch.as_tensor(radius, dtype=torch.float64).view(-1, *[1] * (x0.dim() - 1))
    gen = torch.Generator().manual_seed(0)
    delta = (torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1) * r * 0.5
    labels = torch.as_tensor(y)
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = graph.forward(x0 + delta).reshape(len(x), -1)
        flipped |= logits.argmax(1) != labels
        own = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        other = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -math.inf).max(1).values
        (g,) = torch.autograd.grad((other - own).sum(), delta)
        with torch.no_grad():
            if norm == "2":
                step = g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(r)
                delta = delta + 0.1 * r * step
                delta = delta * torch.clamp(r / delta.flatten(1).norm(dim=1).clamp_min(1e-30).view_as(r), max=1.0)
            else:
                delta = torch.maximum(torch.minimum(delta + 0.1 * r * g.sign(), r), -r)
    with torch.no_grad():
        flipped |= graph.forward(x0 + delta).reshape(len(x), -1).argmax(1) != labels
    return flipped.numpy()


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_no_attack_flips_a_certified_point(spiral, norm):
    graph, x, y = spiral
    certs = certified_radius(graph, x, y, norm=norm)
    ok = certs.radii > 0
    assert ok.sum() > 100
    assert not _pgd(graph, x[ok], y[ok], certs.radii[ok], norm).any()
    # the attack is real: given a larger ball it does flip points
    assert _pgd(graph, x[ok], y[ok], np.maximum(certs.radii[ok] * 20, 0.2), norm).mean() > 0.2


def test_pairwise_radii_never_below_the_global_ones(spiral):
    graph, x, y = spiral
    certs = certified_radius(graph, x, y, norm="2", method="sdp")
    ok = certs.radii > 0
    assert (certs.radii[ok] >= certs.global_radii[ok] * (1 - 1e-12)).all()
    assert np.median(certs.radii[ok] / certs.global_radii[ok]) > 1.0  # and in fact larger


def run(*args):
    return CliRunner().invoke(main, ["certify", *map(str, args)])


def test_cli_certify_json(spiral):
    res = run(MODELS / "mlp_spiral.onnx", "--data", MODELS / "spiral_test.npz", "--eps", "0.02", "--eps", "0.01", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out["certified_accuracy"]) == {"0.01", "0.02"}
    assert 0 < out["certified_accuracy"]["0.02"] <= out["certified_accuracy"]["0.01"] <= out["clean_accuracy"] <= 1
    p = out["points"][0]
    assert set(p) >= {"index", "label", "predicted", "radius", "certified"}
    assert len(out["points"]) == len(spiral[1])
    assert out["lipschitz"]["global_method"] == "sdp" and len(out["lipschitz"]["pairwise"]) == 3
    assert len(out["curve"]["radius"]) == len(out["curve"]["certified_accuracy"])


def test_bad_arguments_are_named_as_the_user_passed_them():
    """Not as the internal functions they reach: pairwise_constants()'s 'method', Budget()'s 'seconds'."""
    x, y = np.zeros((3, 2)), np.zeros(3, int)
    for func in (certified_radius, certify):
        name = func.__name__
        with pytest.raises(lipcert.InputError, match=f"'method' parameter of {name}\\(\\)"):
            func(MODELS / "mlp_spiral.onnx", x, y, method="foo")
        with pytest.raises(lipcert.InputError, match=f"'budget' parameter of {name}\\(\\)"):
            func(MODELS / "mlp_spiral.onnx", x, y, budget=math.nan)
    with pytest.raises(lipcert.InputError, match="'norm' parameter of certify"):
        certify(MODELS / "mlp_spiral.onnx", x, y, norm="l3")
    with pytest.raises(lipcert.InputError, match="'eps' parameter of certify"):
        certify(MODELS / "mlp_spiral.onnx", x, y, eps=[math.nan], method="naive")


def test_single_output_model_is_refused(tmp_path):
    nano = str(SHARED_MODELS / "vnncomp2021" / "test_nano.onnx")  # one input, one output
    with pytest.raises(lipcert.InputError, match="at least 2 outputs"):
        certified_radius(nano, np.zeros((5, 1)), np.zeros(5, int))
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 1)), y=np.zeros(5, int))
    res = run(nano, "--data", tmp_path / "d.npz")
    assert res.exit_code == 1 and "at least 2 outputs" in res.output and "Traceback" not in res.output


def test_cli_certify_table_and_bad_input(tmp_path):
    res = run(MODELS / "cnn_bars.onnx", "--data", MODELS / "bars_test.npz", "--eps", "0.01", "--norm", "inf", "--method", "naive")
    assert res.exit_code == 0, res.output
    assert "certified accuracy" in res.stdout and "naive pairwise" in res.stdout
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((3, 2)))
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "no array 'x'" in res.output and "Traceback" not in res.output
    np.savez(bad, x=np.zeros((3, 2)), y=np.array([0.5, 1, 2]))
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "integer label" in res.output
    np.savez(bad, x=np.zeros((3, 5)), y=np.array([0, 1, 2]))
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "does not fit" in res.output and "shape (N, 2)" in res.output
    np.savez(bad, x=np.zeros((3, 4)), y=np.array([0, 1, 2]))  # 12 numbers: would reshape, must not
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "does not fit" in res.output
    np.savez(bad, x=np.full((3, 2), np.nan), y=np.array([0, 1, 2]))
    res = run(MODELS / "mlp_spiral.onnx", "--data", bad)
    assert res.exit_code == 1 and "NaN" in res.output
    res = run(MODELS / "mlp_spiral.onnx", "--data", tmp_path / "missing.npz")
    assert res.exit_code == 1 and "not found" in res.output
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    res = run(MODELS / "mlp_spiral.onnx", "--data", tmp_path / "junk.npz")
    assert res.exit_code == 1 and "could not read" in res.output
    res = run(MODELS / "mlp_spiral.onnx", "--data", MODELS / "spiral_test.npz", "--eps", "-1")
    assert res.exit_code == 2 and "radii must be >= 0" in res.output
    res = run(MODELS / "mlp_spiral.onnx")
    assert res.exit_code == 2 and "--data" in res.output


def test_input_shape_hint_is_the_model_shape_without_its_batch_axis():
    mnist = lipcert.load(SHARED_MODELS / "vnncomp2021" / "mnist-net_256x2.onnx")  # input (1, 784, 1)
    with pytest.raises(lipcert.InputError, match=r"shape \(N, 784, 1\) or \(N, 784\)$"):
        certified_radius(mnist, np.zeros((15, 700, 1)), method="naive")
    with pytest.raises(lipcert.InputError, match=r"shape \(N, 1, 8, 8\) or \(N, 64\)$"):
        certified_radius(MODELS / "cnn_bars.onnx", np.zeros((3, 8, 9)), method="naive")


def test_channels_last_data_is_refused_not_reshaped(tmp_path):
    """bars_test.npz as channels-last images (N, 8, 8, 1) was reshaped into (N, 1, 8, 8) without a word;
    only the model's shape (with or without its batch axis) and flat inputs are taken."""
    data = np.load(MODELS / "bars_test.npz")
    x, y = data["x"][:10], data["y"][:10]
    np.savez(tmp_path / "nhwc.npz", x=x.transpose(0, 2, 3, 1), y=y)
    res = run(MODELS / "cnn_bars.onnx", "--data", tmp_path / "nhwc.npz", "--method", "naive")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "[10, 8, 8, 1]" in res.output and "[1, 1, 8, 8]" in res.output and "x.transpose(0, 3, 1, 2)" in res.output
    with pytest.raises(lipcert.InputError, match=r"transpose\(0, 3, 1, 2\)"):  # a 3-channel model, channels last
        certified_radius(SHARED_MODELS / "vnncomp2021" / "cifar_base_kw.onnx", np.zeros((4, 32, 32, 3)), method="naive")
    graph = lipcert.load(MODELS / "cnn_bars.onnx")
    same = [certified_radius(graph, a, y, method="naive").radii for a in (x, x[:, None], x.reshape(10, -1))]
    assert all(np.array_equal(same[0], r) for r in same[1:])


def test_cli_refuses_npy_and_object_arrays_with_one_message(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((3, 2)))
    res = run(MODELS / "mlp_spiral.onnx", "--data", tmp_path / "d.npy", "--method", "naive")
    assert res.exit_code == 1 and "is an .npy file" in res.output and "savez" in res.output and "Traceback" not in res.output
    np.savez(tmp_path / "o.npz", x=np.array([np.zeros(2), "a", None], dtype=object), y=np.array([0, 1, 2]))
    res = run(MODELS / "mlp_spiral.onnx", "--data", tmp_path / "o.npz", "--method", "naive")
    assert res.exit_code == 1 and "object array" in res.output and "Traceback" not in res.output


def test_labels_saved_as_whole_floats_are_accepted_other_types_refused(tmp_path):
    x, y = np.load(MODELS / "spiral_test.npz")["x"][:20], np.load(MODELS / "spiral_test.npz")["y"][:20]
    np.savez(tmp_path / "f.npz", x=x, y=y.astype(float))
    res = run(MODELS / "mlp_spiral.onnx", "--data", tmp_path / "f.npz", "--method", "naive", "--json")
    assert res.exit_code == 0, res.output
    assert [p["label"] for p in json.loads(res.stdout)["points"]] == y.tolist()
    for bad, needle in ((y + 0.5, "non-integer values such as 0.5"), (y.astype(str), "not values of type <U"), (y[:, None], "1-D array")):
        np.savez(tmp_path / "b.npz", x=x, y=bad)
        res = run(MODELS / "mlp_spiral.onnx", "--data", tmp_path / "b.npz", "--method", "naive")
        assert res.exit_code == 1 and needle in res.output and "shape (20,)" not in res.output, res.output
    with pytest.raises(lipcert.InputError, match="non-integer"):  # the API truncated 0.5 to class 0
        certified_radius(MODELS / "mlp_spiral.onnx", x, y + 0.5, method="naive")


def test_bounds_already_computed_are_reused_not_solved_again(spiral, monkeypatch):
    import sys

    certify_module = sys.modules["lipcert.certify"]  # lipcert.certify is also the function

    graph = spiral[0]
    fresh = pairwise_constants(graph, "2", "sdp")
    results = [lipcert.bound(graph, method=m) for m in ("naive", "sdp")]
    calls = []
    real = certify_module.estimate
    monkeypatch.setattr(certify_module, "estimate", lambda g, m, s: calls.append(m) or real(g, m, s))
    reused = pairwise_constants(graph, "2", "sdp", proven=results)
    assert calls == []
    # the global bound: solved here to GLOBAL_TOL (pairs follow), reused at the default tolerance
    assert reused.global_bound == pytest.approx(fresh.global_bound, rel=certify_module.GLOBAL_TOL) and reused.global_method == "sdp"
    # the pairs: both within the pairs' duality-gap tolerance of the optimum
    np.testing.assert_allclose(reused.matrix, fresh.matrix, rtol=certify_module.PAIR_TOL)
    # results for another norm are not taken for this one
    linf = pairwise_constants(graph, "inf", "naive", proven=results)
    assert calls == ["naive"] and linf.global_method == "naive"


def test_pairwise_lipsdp_is_skipped_with_a_note_on_large_networks(spiral, monkeypatch, capsys):
    from lipcert.estimators import sdp

    graph = spiral[0]
    monkeypatch.setattr(sdp, "LONG_DIM", 10)  # mlp_spiral's 66 rows count as large
    with pytest.raises(lipcert.InputError, match="pairwise LipSDP would solve 3 matrix inequalities"):
        sdp.pairwise_lipschitz(graph, [(0, 1), (1, 0), (0, 2), (1, 2)], Settings())
    c = pairwise_constants(graph, "2", "sdp")
    assert "pairwise LipSDP skipped" in capsys.readouterr().err
    assert "LipSDP pairwise" not in c.how.values() and c.global_method == "sdp"  # the global LipSDP bound still counts


def test_public_functions_are_not_shadowed_by_their_submodules():
    # lipcert.certify and lipcert.attack are both submodules and public functions; importing the
    # submodules (as this file does above) must leave the functions on the package
    import lipcert
    import lipcert.attack  # noqa: F401

    assert callable(lipcert.certify) and callable(lipcert.attack)
    assert lipcert.certify.__name__ == "certify" and lipcert.attack.__name__ == "attack"


def test_residual_networks_get_their_global_bound_from_compose():
    """LipSDP does not apply to a residual network: certify's global bound is then the smaller of
    naive and compose (which bounds residual blocks as blocks), so its radii are at least the
    naive ones, and a certified radius holds at random points of the ball."""
    from test_convblock import _resnet

    graph = lipcert.load(_resnet(0), (1, 2, 10, 10))
    x = np.random.default_rng(0).normal(size=(6, 2, 10, 10))
    naive = certified_radius(graph, x, method="naive")
    best = certified_radius(graph, x, method="sdp")
    assert best.constants.global_method == "compose"
    assert best.constants.global_bound < naive.constants.global_bound
    assert (best.radii >= naive.radii * (1 - 1e-12)).all() and (best.radii > naive.radii).any()
    rng = np.random.default_rng(1)
    for xi, r, y in zip(x, best.radii, best.predicted):
        d = rng.normal(size=(200, *xi.shape))
        d *= (0.999 * r / np.linalg.norm(d.reshape(200, -1), axis=1))[:, None, None, None]
        with torch.no_grad():
            out = graph.forward(torch.from_numpy(xi[None] + d)[:, None]).reshape(200, -1).numpy()
        assert (out.argmax(1) == y).all()


def _constant_classifier(tmp_path):
    """A classifier whose logits do not depend on the input (zero weights, bias picks class 2)."""
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    labels = np.array([2, 0, 2, 1])
    np.savez(tmp_path / "data.npz", x=x, y=labels)
    return torch.nn.Sequential(layer), x, labels


def test_a_margin_that_does_not_depend_on_the_input_has_infinite_radius(tmp_path):
    """Every constant is 0: correct points can never flip (radius inf), the others get 0, with no
    division warnings, and the CLI's JSON stays strict (null, not Infinity)."""
    net, x, labels = _constant_classifier(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        certs = certified_radius(lipcert.load(net, (1, 4)), x, labels, method="naive")
        out = certify(net, x, labels, eps=[0.1], method="naive", input_shape=(1, 4))
    assert certs.radii.tolist() == [math.inf, 0.0, math.inf, 0.0]
    assert out["certified_accuracy"] == {"0.1": 0.5} and all(math.isfinite(r) for r in out["curve"]["radius"])
    path = tmp_path / "const.onnx"
    torch.onnx.export(net, torch.zeros(1, 4), str(path), dynamo=False)
    res = run(path, "--data", tmp_path / "data.npz", "--method", "naive", "--json")
    assert res.exit_code == 0, res.output
    points = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))["points"]
    assert [p["radius"] for p in points] == [None, 0.0, None, 0.0] and [p["certified"] for p in points] == [True, False, True, False]
