"""The command line: exit codes, JSON schema, one clear message per bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from lipcert.cli import main
from conftest import MODELS, SHARED_MODELS
from onnx_helpers import f32, graph_model, one_node_model

VNN = SHARED_MODELS / "vnncomp2021"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def test_bound_json_schema():
    res = run("bound", VNN / "mnist-net_256x2.onnx", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    (r,) = out["results"]
    for key in ("method", "norm", "kind", "value", "certified", "time_s", "layers", "settings", "sha256"):
        assert key in r
    assert r["method"] == "naive" and r["kind"] == "upper" and r["certified"] is True and r["norm"] == "2"


def test_bound_table_with_layers_and_inf_norm():
    res = run("bound", VNN / "ACASXU_run2a_1_1_batch_2000.onnx", "--norm", "inf", "--layers")
    assert res.exit_code == 0, res.output
    assert "proven" in res.stdout and "per-layer norms" in res.stdout and "linf" in res.stdout


def test_power_layers_are_called_estimates_not_bounds():
    """power iteration's per-layer norms approach from below: the --layers table called them 'bound'."""
    res = run("bound", MODELS / "mlp_spiral.onnx", "--method", "power", "--layers")
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if "power iteration (" in line]
    assert rows and all(" estimate " in line and " bound " not in line for line in rows), rows


def test_info_and_ops_and_methods():
    res = run("info", VNN / "resnet_2b.onnx")
    assert res.exit_code == 0 and "Sum" in res.stdout and "Conv" in res.stdout
    res = run("info", VNN / "resnet_2b.onnx", "--json")
    assert json.loads(res.stdout)["input_shape"] == [1, 3, 32, 32]
    res = run("ops")
    assert res.exit_code == 0 and "Conv" in res.stdout.split()
    res = run("methods")
    assert res.exit_code == 0 and "naive" in res.stdout


def test_ops_and_methods_tables_match_their_registries():
    """`lipcert ops` and `methods` print static copies (lipcert/catalog.py) so that they need not
    import onnx, torch and cvxpy; the copies must equal the live registries (if this fails:
    `python -m lipcert.catalog` prints the fresh tables)."""
    import cvxpy

    from lipcert import catalog
    from lipcert.api import methods
    from lipcert.load import supported_ops

    assert list(catalog.OPS) == supported_ops()
    assert catalog.METHODS == methods()
    installed = set(cvxpy.installed_solvers())
    assert set(catalog.sdp_solvers()) == installed & set(catalog.SDP_SOLVER_MODULES)
    assert json.loads(run("methods", "--json").stdout)["sdp_solvers"][0] == "lipcert-fast"


def test_ops_and_methods_do_not_import_the_heavy_packages():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from lipcert.cli import main; "
            "[CliRunner().invoke(main, [c]) for c in ('ops', 'methods', '--help')]; "
            "print(sorted(m for m in ('torch', 'onnx', 'cvxpy', 'onnxruntime', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _error(res, *needles: str) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    text = res.output
    assert [line.startswith("Error:") for line in text.splitlines()].count(True) == 1
    for n in needles:
        assert n in text, text


def test_json_errors_are_one_json_object_on_stdout(tmp_path):
    """With --json a refused input still leaves one JSON object on stdout (it left stdout empty,
    which a script reading the JSON could not parse), and the message on stderr."""
    p = tmp_path / "model.onnx"
    p.write_text("hello")
    for args in (["bound", p, "--json"], ["lower", p, "--json"], ["info", p, "--json"],
                 ["certify", MODELS / "mlp_spiral.onnx", "--data", tmp_path / "none.npz", "--json"]):
        res = run(*args)
        _error(res, "What to do")
        err = json.loads(res.stdout)["error"]
        assert err["type"] in ("ModelError", "InputError") and err["what"] and err["hint"], err
        assert "Error:" in res.stderr and "{" not in res.stderr


def test_refuses_unsupported_op(tmp_path):
    nodes = [helper.make_node("Sin", ["x"], ["a"], name="bad_sin"), helper.make_node("Softmax", ["a"], ["y"], name="bad_softmax")]
    _error(run("bound", save(graph_model(nodes, [1, 3], {}), tmp_path / "m.onnx")), "bad_sin", "bad_softmax", "What to do")


def test_refuses_truncated_file(tmp_path):
    p = tmp_path / "cut.onnx"
    data = (VNN / "mnist-net_256x2.onnx").read_bytes()
    p.write_bytes(data[:1000])
    _error(run("bound", p), "could not read", "cut.onnx", "What to do")


def test_external_data_is_read_beside_the_model_and_a_missing_file_is_named(tmp_path):
    p = tmp_path / "ext.onnx"
    onnx.save(onnx.load(str(MODELS / "mlp_spiral.onnx")), str(p), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert run("bound", p).exit_code == 0  # read from the model's folder, not the working directory
    (tmp_path / "ext.data").unlink()
    _error(run("bound", p), "missing: ext.data", "What to do")


def test_refuses_non_onnx_file(tmp_path):
    p = tmp_path / "model.onnx"
    p.write_text("hello")
    _error(run("bound", p), "could not read", "What to do")


def test_refuses_nan_weights(tmp_path):
    w = f32(np.random.default_rng(0), 2, 3)
    w[0, 0] = np.inf
    _error(run("bound", save(one_node_model("Gemm", [1, 3], {"W": w}, ["W"], transB=1), tmp_path / "nan.onnx")), "NaN or infinite", "the_gemm")


def test_refuses_dynamic_shape_and_accepts_input_shape(tmp_path):
    p = save(one_node_model("Relu", [1, "n"]), tmp_path / "dyn.onnx")
    _error(run("bound", p), "dynamic dimension", "--input-shape")
    assert run("bound", p, "--input-shape", "1,4").exit_code == 0


def test_refuses_two_inputs(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])], "two",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3]), helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    _error(run("bound", save(helper.make_model(g), tmp_path / "two.onnx")), "2 inputs")


def test_missing_file():
    _error(run("bound", "no/such/model.onnx"), "not found")


@pytest.mark.parametrize("args", [["--norm", "3"], ["--method", "magic"], ["--input-shape", "a,b"], ["--seed", "-1"]])
def test_bad_flags_exit_nonzero_with_a_message(args):
    res = run("bound", VNN / "test_nano.onnx", *args)
    assert res.exit_code == 2 and "Invalid value" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args", [["certify", "--data", MODELS / "spiral_test.npz", "--eps", "nan"], ["bound", "--method", "sdp", "--time-limit", "nan"],
                                  ["bound", "--budget", "nan"], ["bound", "--center", MODELS / "spiral_test.npz", "--radius", "nan"],
                                  ["report", "-o", "OUT", "--budget", "inf"], ["certify", "--data", MODELS / "spiral_test.npz", "--eps", "inf"]])
def test_float_flags_refuse_nan_and_inf(args, tmp_path):
    res = run(args[0], MODELS / "mlp_spiral.onnx", *[tmp_path / "r.html" if a == "OUT" else a for a in args[1:]])
    assert res.exit_code == 2 and "is not a finite number" in res.output and "Traceback" not in res.output, res.output


def test_help_teaches():
    for cmd in ([], ["bound"], ["info"], ["ops"], ["methods"]):
        res = run(*cmd, "--help")
        assert res.exit_code == 0 and "Usage" in res.output
    assert "Examples" in run("bound", "--help").output


def test_flags_that_do_not_apply_to_the_method_are_named_as_ignored():
    res = CliRunner().invoke(main, ["bound", str(MODELS / "mlp_spiral.onnx"), "--solver", "SCS", "--time-limit", "3"])
    assert res.exit_code == 0 and "--solver and --time-limit only apply to LipSDP" in res.stderr
    res = CliRunner().invoke(main, ["certify", str(MODELS / "mlp_spiral.onnx"), "--data", str(MODELS / "spiral_test.npz"),
                                    "--method", "naive", "--pairs", "all"])
    assert res.exit_code == 0 and "--pairs only applies to pairwise LipSDP" in res.stderr
    res = CliRunner().invoke(main, ["bound", str(MODELS / "mlp_spiral.onnx"), "--method", "sdp", "--solver", "SCS"])
    assert "ignored" not in res.stderr


def test_a_bad_flag_with_json_gets_a_json_error_too():
    res = CliRunner().invoke(main, ["bound", str(MODELS / "mlp_spiral.onnx"), "--norm", "7", "--json"])
    assert res.exit_code == 2 and "Invalid value for '--norm'" in res.stderr
    err = json.loads(res.stdout)["error"]
    assert err["type"] == "UsageError" and "--norm" in err["what"]
    res = CliRunner().invoke(main, ["bound", str(MODELS / "mlp_spiral.onnx"), "--norm", "7"])
    assert res.exit_code == 2 and res.stdout == ""
