"""Witnessed lower bounds: exact on known answers, below every proven upper bound, reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import lipcert
from lipcert.cli import main
from lipcert.witness import WitnessError, check_witness, onnxruntime_ratio
from conftest import MODELS, SHARED_MODELS, shared_model_files
from zoo import one_hidden_relu, single_linear

VNN = SHARED_MODELS / "vnncomp2021"
FAST = dict(starts=16, steps=10)


def test_single_linear_layer_reaches_top_singular_value():
    z = single_linear(seed=4)
    r = lipcert.lower_bound(z.module, input_shape=z.input_shape, **FAST)
    assert r.kind == "lower" and not r.certified
    assert r.value == pytest.approx(z.exact["2"], rel=1e-6)
    assert r.value <= z.exact["2"] * (1 + 1e-9)


@pytest.mark.parametrize("norm", ["2", "inf"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_hidden_relu_reaches_brute_force(norm, seed):
    z = one_hidden_relu(seed)
    r = lipcert.lower_bound(z.module, norm=norm, input_shape=z.input_shape, starts=32, steps=20)
    assert r.value == pytest.approx(z.exact[norm], rel=1e-6)
    assert r.value <= z.exact[norm] * (1 + 1e-9)


def test_tampered_witness_fails_loudly():
    graph = lipcert.load(MODELS / "mlp_spiral.onnx")
    r = lipcert.lower_bound(graph, **FAST)
    check_witness(graph, r.witness, r.value)
    tampered = dict(r.witness, y=(np.asarray(r.witness["y"]) + 1e-3).tolist())
    with pytest.raises(WitnessError, match="not the claimed"):
        check_witness(graph, tampered, r.value)
    with pytest.raises(WitnessError, match="coincide"):
        check_witness(graph, dict(r.witness, y=r.witness["x"]), r.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", shared_model_files())
def test_shared_networks_beat_reference_and_stay_below_upper(name, reference):
    graph = lipcert.load(VNN / name)
    ref = reference[f"vnncomp2021/{name}"]
    for norm in ("2", "inf"):
        r = lipcert.lower_bound(graph, norm=norm, starts=32, steps=20)
        assert r.value >= 0.97 * ref[f"lower_l{norm}"], (norm, r.value, ref[f"lower_l{norm}"])
        assert r.value <= lipcert.bound(graph, norm=norm).value
        # independent check: onnxruntime on the ONNX file (float32, so to float32 accuracy)
        assert onnxruntime_ratio(VNN / name, r.witness, norm) == pytest.approx(r.value, rel=2e-2)


def test_cli_lower_json_and_device_fallback():
    res = CliRunner().invoke(main, ["lower", str(MODELS / "mlp_spiral.onnx"), "--json", "--starts", "8", "--steps", "5", "--device", "cuda"])
    assert res.exit_code == 0, res.output
    (r,) = json.loads(res.stdout)["results"]
    assert r["kind"] == "lower" and np.asarray(r["witness"]["x"]).size == 2
    import torch

    if not torch.cuda.is_available():
        assert "CUDA" in res.stderr


def test_cli_lower_with_data_and_bad_data(tmp_path):
    res = CliRunner().invoke(main, ["lower", str(MODELS / "mlp_spiral.onnx"), "--data", str(MODELS / "spiral_test.npz"), "--starts", "8", "--steps", "3"])
    assert res.exit_code == 0, res.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros((3, 2)))
    res = CliRunner().invoke(main, ["lower", str(MODELS / "mlp_spiral.onnx"), "--data", str(bad)])
    assert res.exit_code == 1 and "no array 'x'" in res.output
    np.savez(bad, x=np.zeros((3, 5)))
    res = CliRunner().invoke(main, ["lower", str(MODELS / "mlp_spiral.onnx"), "--data", str(bad)])
    assert res.exit_code == 1 and "does not fit" in res.output
    res = CliRunner().invoke(main, ["lower", str(MODELS / "mlp_spiral.onnx"), "--norm", "1"])
    assert res.exit_code == 2
