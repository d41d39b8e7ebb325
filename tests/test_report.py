"""HTML reports: self-contained, escaped, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lipcert.cli import main
from conftest import MODELS

EXTERNAL = [
    re.compile(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:|//|file:|ftp:)""", re.I),
    re.compile(r"""url\(\s*["']?\s*(?:https?:|//)""", re.I),
    re.compile(r"@import", re.I),
    re.compile(r"<(?:link|iframe|object|embed)\b", re.I),
    re.compile(r"<script\b[^>]*\bsrc\s*=", re.I),
]


@pytest.fixture(scope="module")
def spiral_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "mlp_spiral.html"
    res = CliRunner().invoke(main, ["report", str(MODELS / "mlp_spiral.onnx"), "--data", str(MODELS / "spiral_test.npz"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout
    return out


def test_report_answers_first_and_has_every_section(spiral_report):
    html = spiral_report.read_text()
    m = re.search(r'<div class="interval">([\d.]+) \u2264 L \u2264 ([\d.]+)</div>', html)
    assert m, "the interval [lower, upper] is the first thing in the report"
    low, up = map(float, m.groups())
    assert 0 < low < up
    assert html.index('class="interval"') < html.index("<h2>Methods</h2>")
    for text in ("Proven: for all inputs", "(best proven)", "estimate, not a bound", "witnessed lower bound",
                 "Per-layer norms", "Witness of the lower bound", "Certified robustness", "Reproduce",
                 "lipcert report", "sha256 5b48", "seed 0", "torch "):
        assert text in html, text
    assert html.count("<svg") == 4  # methods, layers, certified accuracy curve, radius histogram


def test_report_has_no_external_resource(spiral_report):
    html = spiral_report.read_text()
    for pattern in EXTERNAL:
        assert not pattern.search(html), pattern.pattern


def test_model_name_with_html_characters_is_escaped(tmp_path):
    evil = tmp_path / "<img src=x onerror=alert(1)>.onnx"
    shutil.copy(MODELS / "mlp_spiral.onnx", evil)
    out = tmp_path / "evil.html"
    from lipcert import load
    from lipcert.config import Settings
    from lipcert.report import collect, render

    graph = load(evil)
    results, skipped = collect(graph, Settings(), None)
    render(graph, [r for r in results if r.method != "lower"], out, command=f"lipcert report {evil}", skipped=skipped)
    html = out.read_text()
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;.onnx" in html


def test_per_layer_section_shows_the_tighter_of_naive_and_gram(tmp_path, monkeypatch):
    """On a network whose convolutions gram proves exact (naive keeps circular bounds: the dense
    route is switched off as for layers too large for it), the per-layer section is gram's; on
    the spiral MLP (gram's Gram iteration is no tighter than naive's SVDs) it is naive's."""
    import torch

    from lipcert import bound, load
    from lipcert.graph import convnorm
    from lipcert.report import render

    monkeypatch.setattr(convnorm, "DENSE_ENTRIES", 0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)).double()
    for graph, expected in ((load(net, (1, 8, 4, 4)), "gram"), (load(MODELS / "mlp_spiral.onnx"), "naive")):
        results = [bound(graph, method=m) for m in ("naive", "gram")]
        html = render(graph, results, tmp_path / f"{expected}.html").read_text()
        assert f"<h2>Per-layer norms ({expected})</h2>" in html


def test_report_without_a_proven_bound_says_so(tmp_path):
    from lipcert import load
    from lipcert.report import render

    graph = load(MODELS / "mlp_spiral.onnx")
    html = render(graph, [], tmp_path / "empty.html").read_text()
    assert "no proven bound" in html


def test_local_report_does_not_call_local_radii_pairwise(tmp_path):
    """With local constants the certified radii are the larger of the pairwise and the local ones:
    the accuracy curve and the sentence above it say so (they said "pairwise constants" only,
    under a curve that reached 100x the radii pairwise constants certify)."""
    from lipcert import bound, certify, load
    from lipcert.report import render

    graph = load(MODELS / "mlp_spiral.onnx")
    data = np.load(MODELS / "spiral_test.npz")
    x, y = data["x"][:20], data["y"][:20]
    results = [bound(graph, method="naive", norm="inf")]
    cert = certify(graph, x, y, [0.05], norm="inf", method="naive", local=True)
    assert max(p["radius"] for p in cert["points"]) > 10 * max(cert["pairwise_radii"])
    html = render(graph, results, tmp_path / "local.html", certificates=cert, data_name="spiral").read_text()
    head = html.split("<h3>Local constants and an attack</h3>")[0].split("Certified robustness")[1]
    assert "local constants" in head and ">pairwise constants<" not in head.replace("<!-- ", ">").replace(" -->", "<")
    plain = render(graph, results, tmp_path / "plain.html", certificates=certify(graph, x, y, [0.05], norm="inf", method="naive"),
                   data_name="spiral").read_text()
    assert "<!-- pairwise constants -->" in plain


def test_report_bad_flags():
    res = CliRunner().invoke(main, ["report", str(MODELS / "mlp_spiral.onnx")])
    assert res.exit_code == 2 and "--output" in res.output
    res = CliRunner().invoke(main, ["report", str(MODELS / "missing.onnx"), "-o", "x.html"])
    assert res.exit_code == 1 and "Traceback" not in res.output


def test_report_local_without_data_is_a_bad_flag_combination(tmp_path):
    res = CliRunner().invoke(main, ["report", str(MODELS / "mlp_spiral.onnx"), "--local", "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and "--local needs --data" in res.output and not (tmp_path / "r.html").exists()


def test_report_refuses_an_unwritable_output_before_computing(tmp_path, monkeypatch):
    import lipcert.report

    monkeypatch.setattr(lipcert.report, "collect", lambda *a, **k: pytest.fail("computed before checking --output"))
    (tmp_path / "file").write_text("")
    outputs = [tmp_path / "file" / "r.html", tmp_path / "file" / "new" / "r.html"] + ([Path("/proc/r.html")] if Path("/proc/self").exists() else [])
    for out in outputs:
        res = CliRunner().invoke(main, ["report", str(MODELS / "mlp_spiral.onnx"), "-o", str(out)])
        assert res.exit_code == 2 and "cannot write" in res.output and "Traceback" not in res.output, res.output


# --- a real browser -------------------------------------------------------------------------------
def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed here with apt-get when missing (root only), else a skip."""
    path = _find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        path = _find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed and could not be installed with apt-get (needs root and Debian's package index)")
    return path


def _headless(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=180)


def test_report_renders_in_headless_chromium(spiral_report, chromium, tmp_path):
    url = spiral_report.resolve().as_uri()
    dom = _headless(chromium, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Lipschitz report: mlp_spiral.onnx" in dom.stdout and "\u2264 L \u2264" in dom.stdout
    shot = tmp_path / "shot.png"
    res = _headless(chromium, "--window-size=1100,2600", f"--screenshot={shot}", url)
    assert shot.exists(), res.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (2600, 1100)
    # the answer box and the plots are drawn: the report's blue (#1f5fa8) covers a visible area
    blue = (abs(img - np.array([0x1F, 0x5F, 0xA8])).sum(2) < 30).mean()
    assert blue > 0.01, blue
    assert img.std() > 20  # not a blank page


def test_report_of_a_constant_network_renders(tmp_path):
    """Bounds 0 <= L <= 0 and points with an infinite radius: no division by zero, no log axis of
    zeros, the infinite radii counted in the histogram's label."""
    import torch

    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    model = tmp_path / "const.onnx"
    torch.onnx.export(torch.nn.Sequential(layer), torch.zeros(1, 4), str(model), dynamo=False)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32), y=np.array([2, 0, 2, 1]))
    out = tmp_path / "const.html"
    res = CliRunner().invoke(main, ["report", str(model), "--data", str(tmp_path / "data.npz"), "-o", str(out), "--budget", "30"])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "0 \u2264 L \u2264 0" in html and "the network is constant" in html
    assert "2 infinite, not shown" in html
