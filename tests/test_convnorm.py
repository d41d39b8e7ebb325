"""Convolution norms without dense matrices (lipcert/graph/convnorm.py), against dense SVDs.

Soundness: every proven value >= the exact norm of the dense matrix. Tightness: the values the
per-layer table reports are within 1% of it (exact for 1x1 and small layers); the circular
embedding bound is exact for circular convolutions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipcert.graph import convnorm
from lipcert.graph.linear import Composed, Conv, Pad, Scale, as_conv

SAFE = 1 + 1e-9  # rounding allowance of the dense reference
# (c_in, c_out, n, k, stride, dilation, groups, pad)
ZERO_PADDED = [
    (2, 3, 5, 3, 1, 1, 1, 1), (4, 4, 6, 3, 2, 1, 2, 1), (3, 5, 7, 2, 2, 1, 1, 0), (2, 2, 7, 3, 1, 2, 1, 2),
    (4, 4, 6, 3, 1, 1, 4, 1), (3, 4, 6, 5, 2, 1, 1, 2), (3, 4, 5, 4, 3, 1, 1, 1), (6, 4, 8, 3, 1, 1, 2, 1),
]
TRANSPOSED = [(3, 2, 4, 3, 2, 1, 1, 1), (4, 4, 5, 4, 2, 2, 1, 0), (2, 3, 3, 3, 1, 1, 0, 0)]  # (ci, co, n, k, s, g, pad, out_pad)


def exact(op) -> float:
    return float(np.linalg.norm(op._dense, 2))


def circular_dense(w: torch.Tensor, ci: int, n: int, stride: int, dilation: int, groups: int) -> np.ndarray:
    keff = (w.shape[-1] - 1) * dilation + 1
    size = ci * n * n
    eye = torch.eye(size, dtype=torch.float64).reshape(size, ci, n, n)
    wrapped = F.pad(eye, (0, keff - 1, 0, keff - 1), mode="circular")
    y = F.conv2d(wrapped, w, stride=stride, dilation=dilation, groups=groups)[..., : n // stride, : n // stride]
    return y.reshape(size, -1).T.numpy()


@pytest.mark.parametrize("ci,co,n,k,s,d,g", [(2, 3, 6, 3, 1, 1, 1), (4, 4, 8, 3, 2, 1, 2), (3, 5, 6, 2, 2, 1, 1),
                                              (2, 2, 9, 3, 3, 1, 1), (4, 6, 8, 3, 1, 2, 2), (3, 4, 6, 5, 2, 1, 1)])
def test_circular_convolution_norm_is_exact(ci, co, n, k, s, d, g):
    rng = np.random.default_rng(k * 100 + n)
    w = torch.from_numpy(rng.normal(size=(co, ci // g, k, k)))
    ref = float(np.linalg.norm(circular_dense(w, ci, n, s, d, g), 2))
    conv = Conv((1, ci, n, n), w.numpy(), (s, s), (0, 0, 0, 0), (d, d), g)
    value, _ = convnorm.circular_conv_norm(convnorm.grouped_kernel(conv), [n, n], (s, s))
    assert ref <= value * SAFE
    assert value <= ref * (1 + 1e-6)


def test_circular_norm_of_large_blocks_through_the_gram_eigenvalue():
    """Many blocks wider than SVD_SIZE: the top eigenvalue of the likely largest blocks' Gram
    matrices, proven for the others by Cholesky: sound and equal to the SVD's value up to the
    rounding allowance."""
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.normal(size=(1, 80, 72, 3, 3)))
    value, exact_flag = convnorm.circular_conv_norm(w, [5, 5], (1, 1))
    spec = torch.fft.fftn(w[0], s=[5, 5], dim=(2, 3)).permute(2, 3, 0, 1).reshape(-1, 80, 72)
    ref = float(torch.linalg.svdvals(spec)[:, 0].max())
    assert exact_flag
    assert ref <= value * SAFE <= ref * (1 + 4e-9)


@pytest.mark.parametrize("complex_blocks", [False, True])
def test_few_large_blocks_are_exact(complex_blocks):
    rng = np.random.default_rng(4)
    mats = torch.from_numpy(rng.normal(size=(3, 90, 70)))
    if complex_blocks:
        mats = mats + 1j * torch.from_numpy(rng.normal(size=(3, 90, 70)))
    value, exact_flag = convnorm.max_singular(mats)
    ref = float(torch.linalg.svdvals(mats)[:, 0].max())
    assert exact_flag
    assert ref <= value * SAFE <= ref * (1 + 4e-9)


@pytest.mark.parametrize("spread", [0.0, 1e-7, 1e-3])
def test_cholesky_certificate_is_sound_on_clustered_spectra(spread):
    """Blocks whose top eigenvalues are equal or nearly so (the hard case for the estimate): the
    proven value is never below the largest singular value."""
    rng = np.random.default_rng(11)
    q, _ = np.linalg.qr(rng.normal(size=(8, 72, 72)) + 1j * rng.normal(size=(8, 72, 72)))
    sing = np.sort(rng.uniform(0.1, 1.0, size=(8, 72)))
    sing[:, -8:] = 1.0 - spread * np.arange(8)[::-1]
    mats = torch.from_numpy(q * sing[:, None, :] @ np.conj(np.swapaxes(q, 1, 2)))
    value, _ = convnorm.max_singular(mats)
    ref = float(torch.linalg.svdvals(mats)[:, 0].max())
    assert ref <= value * SAFE <= ref * (1 + 4e-9)


@pytest.mark.parametrize("misrank", ["reversed", "flat"])
def test_cholesky_certificate_falls_back_when_the_ranking_is_wrong(monkeypatch, misrank):
    """Estimates that rank the blocks wrongly (the true largest last, or all equal): the blocks
    above the solved one fail their factorisation and get an eigensolve, so the value is still
    the true top."""
    rng = np.random.default_rng(12)
    a = torch.from_numpy(rng.normal(size=(10, 70, 70)) * np.linspace(0.5, 1.5, 10)[:, None, None])
    gram = a.mT @ a
    tops = torch.linalg.eigvalsh(gram)[:, -1]
    wrong = -tops if misrank == "reversed" else torch.ones_like(tops)
    monkeypatch.setattr(convnorm, "_ritz_estimates", lambda g: wrong)
    value = convnorm._top_eig_certified(gram)
    true_top = float(tops.max())
    assert true_top <= value * SAFE <= true_top * (1 + 1e-9)


@pytest.mark.parametrize("ci,co,n,k,s,d,g,p", ZERO_PADDED)
def test_zero_padded_bounds_are_sound_and_reported_values_tight(ci, co, n, k, s, d, g, p):
    rng = np.random.default_rng(ci * 10 + n)
    conv = Conv((1, ci, n, n), rng.normal(size=(co, ci // g, k, k)), (s, s), (p, p, p, p), (d, d), g)
    ref = exact(conv)
    assert ref <= convnorm.circular_embedding_bound(conv)[0] * SAFE  # the large-layer route
    value, is_exact, how = conv.norm_bound("2")
    assert ref <= value * SAFE <= ref * 1.01, how
    dense_value, dense_exact = convnorm.grouped_dense_norm(conv)  # all groups probed at once
    assert ref <= dense_value * SAFE <= ref * (1 + 4e-9)


@pytest.mark.parametrize("ci,co,n,k,s,g,p,op", TRANSPOSED)
def test_transposed_convolutions(ci, co, n, k, s, g, p, op):
    rng = np.random.default_rng(n + k)
    conv = Conv((1, ci, n, n), rng.normal(size=(ci, co // g, k, k)), (s, s), (p, p, p, p), (1, 1), g,
                transposed=True, output_padding=(op, op))
    ref = exact(conv)
    assert ref <= convnorm.circular_embedding_bound(conv)[0] * SAFE
    value, _, how = conv.norm_bound("2")
    assert ref <= value * SAFE <= ref * 1.01, how


@pytest.mark.parametrize("stride,pad", [(1, 0), (2, 0), (2, 1)])
def test_one_by_one_is_exact(stride, pad):
    rng = np.random.default_rng(stride)
    conv = Conv((1, 4, 5, 5), rng.normal(size=(6, 4, 1, 1)), (stride, stride), (pad,) * 4, (1, 1))
    value, is_exact, how = conv.norm_bound("2")
    assert is_exact and "1x1" in how
    assert value == pytest.approx(exact(conv), rel=1e-12)


def test_large_layer_bound_against_witness():
    """A layer too large for the dense route: the bound is >= a witnessed ||A v|| / ||v||."""
    rng = np.random.default_rng(5)
    conv = Conv((1, 32, 24, 24), rng.normal(size=(32, 32, 3, 3)), (1, 1), (1, 1, 1, 1), (1, 1))
    assert not convnorm.dense_is_cheap(conv)
    value, is_exact, how = conv.norm_bound("2")
    assert not is_exact and "circular" in how
    v = torch.randn((1, *conv.in_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(60):
        v = conv.adjoint(conv.apply(v))
        v = v / v.norm()
    witnessed = float(conv.apply(v).norm())
    assert witnessed <= value
    assert value <= witnessed * 1.05  # a 24x24 grid: the circular embedding is close


def test_batch_norm_and_padding_fold_into_the_kernel():
    rng = np.random.default_rng(7)
    conv = Conv((1, 4, 6, 6), rng.normal(size=(5, 4, 3, 3)), (1, 1), (0, 0, 0, 0), (1, 1))
    ops = [Scale((1, 4, 4, 4), rng.normal(size=(1, 4, 1, 1))), Pad((1, 4, 4, 4), (0, 0, 1, 1), (0, 0, 1, 1)), conv,
           Scale((1, 5, 4, 4), rng.normal(size=(1, 5, 1, 1)))]
    comp = Composed(ops)
    folded = as_conv(comp)
    assert folded is not None
    x = torch.randn((3, 1, 4, 4, 4), dtype=torch.float64)
    assert torch.allclose(comp.apply(x), folded.apply(x), atol=1e-12)
    for p in ("2", "inf", "1"):
        value, is_exact, _ = comp.norm_bound(p)
        assert is_exact
        assert value == pytest.approx(float(np.linalg.norm(comp._dense, {"2": 2, "inf": np.inf, "1": 1}[p])), rel=1e-9)
    # a scale that varies over space is not a channel scale: no folding
    assert as_conv(Composed([conv, Scale((1, 5, 4, 4), rng.normal(size=(1, 5, 4, 4)))])) is None


def test_cuda_request_falls_back_to_cpu():
    with convnorm.on_device("cuda") as notes:
        assert convnorm.current_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert notes and "CPU" in notes[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
@pytest.mark.parametrize("method", ["naive", "gram", "power"])
def test_device_cuda_falls_back_with_a_note(method):
    import json

    from click.testing import CliRunner

    from lipcert.cli import main

    out = CliRunner().invoke(main, ["bound", "models/cnn_bars.onnx", "--method", method, "--device", "cuda", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)["results"][0]
    assert result["settings"]["device"] == "cuda"
    assert any("CPU" in w for w in result["warnings"])
    ref = CliRunner().invoke(main, ["bound", "models/cnn_bars.onnx", "--method", method, "--json"])
    assert json.loads(ref.output)["results"][0]["value"] == pytest.approx(result["value"], rel=1e-12)


@pytest.mark.parametrize("g,co,ci,taps,grid", [(1, 40, 24, (3, 3), [6, 6]), (1, 24, 40, (3, 3), [7, 5]), (2, 20, 30, (2, 3), [5, 6]),
                                               (1, 30, 20, (3,), [9]), (1, 18, 17, (1, 2), [4, 4])])
def test_autocorrelation_gram_equals_the_dense_gram(g, co, ci, taps, grid):
    """The Gram matrices built from the kernel's autocorrelation equal W(f)^H W(f) (or W W^H,
    whichever side is smaller) formed from the frequency blocks, and the proven value of the
    Gram route is >= the largest singular value of every block (and within 1e-8 of it)."""
    rng = np.random.default_rng(sum(taps) + co)
    w = torch.from_numpy(rng.normal(size=(g, co, ci, *taps)))
    blocks = convnorm._spectrum(w, grid)  # (g * F, co, ci)
    side = w if co >= ci else w.transpose(1, 2)
    r, diffs = convnorm._autocorrelation(side)
    freqs = convnorm._unique_frequencies(grid).to(torch.float64)
    angle = 2 * np.pi * (diffs / torch.tensor(grid, dtype=torch.float64)) @ freqs.T
    gram = torch.einsum("df,gdij->gfij", torch.polar(torch.ones_like(angle), -angle), r.to(torch.complex128)).reshape(-1, *r.shape[2:])
    dense = blocks.mH @ blocks if co >= ci else (blocks @ blocks.mH).conj()
    assert torch.allclose(gram, dense, atol=1e-10 * float(dense.abs().max()))
    ref = float(torch.linalg.svdvals(blocks)[:, 0].max())
    value, exact_flag = convnorm.gram_route_norm(w, grid)
    assert exact_flag and ref <= value <= ref * (1 + 1e-8)


def test_layer_norms_side_by_side_match_one_at_a_time():
    """prefetch_l2_norms (threads, single-threaded torch) caches the same values as computing
    each layer's norm alone (up to rounding), and restores torch's thread count."""
    rng = np.random.default_rng(11)
    shapes = [(1, 20, 9, 9), (1, 24, 7, 7), (1, 18, 12, 12)]
    convs = [Conv(s, rng.normal(size=(22, s[1], 3, 3)), (1, 1), (1, 1, 1, 1), (1, 1)) for s in shapes]
    fresh = [Conv(c.in_shape, c.weight.numpy(), (1, 1), (1, 1, 1, 1), (1, 1)) for c in convs]
    threads = torch.get_num_threads()
    convnorm.prefetch_l2_norms(convs)
    assert torch.get_num_threads() == threads
    assert all("_l2" in c.__dict__ for c in convs)
    for c, f in zip(convs, fresh):  # the same route; the value up to the last bits (BLAS thread count)
        (a, ea, ha), (b, eb, hb) = c.norm_bound("2"), f.norm_bound("2")
        assert (ea, ha) == (eb, hb) and a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("ci,co,n,k,s,d,g,pad", ZERO_PADDED)
def test_conv_adjoint_by_transposed_convolution(ci, co, n, k, s, d, g, pad):
    """Conv.adjoint (a transposed convolution, padding cut away) equals autograd's A^T y."""
    from lipcert.graph.linear import vjp_linear

    rng = np.random.default_rng(n * 7 + k)
    conv = Conv((1, ci, n, n), rng.normal(size=(co, ci // g, k, k)), (s, s), (pad, pad, 0, pad + 1), (d, d), g)
    y = torch.from_numpy(rng.normal(size=(3, *conv.out_shape)))
    assert torch.allclose(conv.adjoint(y), vjp_linear(conv.apply, conv.in_shape, y), atol=1e-12)


def test_large_real_dense_matrix_through_the_gram_eigenvalue():
    """A real matrix whose smaller side exceeds REAL_SVD_SIDE: Gram matrix + eigvalsh, proven
    (>= the SVD's value) and within the rounding allowance of it."""
    rng = np.random.default_rng(8)
    mats = torch.from_numpy(rng.normal(size=(1, 700, convnorm.REAL_SVD_SIDE + 40)))
    value, exact_flag = convnorm.max_singular(mats)
    ref = float(torch.linalg.svdvals(mats)[:, 0].max())
    assert exact_flag
    assert ref <= value * SAFE <= ref * (1 + 1e-6)


@pytest.mark.parametrize("ci,co,n,k,s,d,g,pad", ZERO_PADDED)
def test_dense_matrix_from_the_kernel_equals_the_probed_one(ci, co, n, k, s, d, g, pad):
    """grouped_dense_norm builds small layers' matrices from the kernel entries: the same norm as
    the matrix probed through the convolution (LinearOp._dense)."""
    rng = np.random.default_rng(n * 3 + k)
    conv = Conv((1, ci, n, n), rng.normal(size=(co, ci // g, k, k)), (s, s), (pad, pad, 0, pad + 1), (d, d), g)
    value, exact_flag = convnorm.grouped_dense_norm(conv)
    ref = exact(conv)
    assert exact_flag and ref <= value * SAFE and value <= ref * (1 + 1e-9)


# --- the tight route (method gram): exact norms on small grids ---------------------------------
# (c_in, c_out, n, k, stride, dilation, groups, pad): small grids, where the circular embedding is
# loose; the stride-2 layers use their output side, the grouped one a Gram matrix per group
TIGHT = [(8, 12, 4, 3, 1, 1, 1, 1), (12, 8, 6, 3, 2, 1, 1, 1), (6, 6, 5, 3, 1, 2, 1, 2), (8, 8, 4, 3, 1, 1, 2, 1),
         (4, 6, 5, 4, 1, 1, 1, 1), (4, 4, 8, 3, 1, 1, 1, 1)]


def _tight_case(ci, co, n, k, s, d, g, p):
    rng = np.random.default_rng(ci * 31 + n * 7 + k)
    return Conv((1, ci, n, n), rng.normal(size=(co, ci // g, k, k)), (s, s), (p, p, p, p), (d, d), g)


@pytest.fixture(params=[convnorm.MIN_BAND, 1], ids=["bands", "one-row-bands"])
def min_band(request, monkeypatch):
    """The default bands (small layers: one) and one-row bands (the banded proof on every case)."""
    monkeypatch.setattr(convnorm, "MIN_BAND", request.param)
    return request.param


@pytest.mark.parametrize("case", TIGHT)
def test_side_gram_equals_the_dense_gram_within_its_error_bound(case, min_band):
    conv = _tight_case(*case)
    side_gram = convnorm.SideGram(conv)
    gram, err = side_gram.dense(), side_gram.err_fro
    dense = conv._dense  # (out, in), groups included
    g = conv.groups
    a = torch.from_numpy(dense)
    full = a.T @ a if conv.in_dim <= conv.out_dim else a @ a.T
    # the same matrix up to the order of the coordinates: position-major, channels inside, per group
    side = "in" if conv.in_dim <= conv.out_dim else "out"
    shape = conv.in_shape if side == "in" else conv.out_shape
    c, m = shape[1], math.prod(shape[2:])
    order = torch.arange(c * m).reshape(c, m).T  # channel-major index of (position, channel)
    per = c // g
    for k in range(g):
        idx = order[:, k * per : (k + 1) * per].reshape(-1)
        ref = full[idx][:, idx]
        assert float(torch.linalg.norm(gram[k] - ref)) <= max(err, 1e-300)
        # the proof factors only the bands within ``width`` of each other: the rest must be zero
        edges = np.cumsum([0] + side_gram.sizes)
        for r in range(len(side_gram.sizes)):
            for t in range(len(side_gram.sizes)):
                if abs(r - t) > side_gram.width:
                    assert not ref[edges[r] : edges[r + 1], edges[t] : edges[t + 1]].any()
    assert err > 0


@pytest.mark.parametrize("case", TIGHT)
def test_tight_route_is_exact_and_never_below_the_dense_norm(case, min_band):
    conv = _tight_case(*case)
    ref = exact(conv)
    circ = convnorm.circular_embedding_bound(conv)[0]
    assert circ > ref * 1.01  # the circular embedding is loose on these grids
    out = convnorm.tight_conv_norm(conv, circ)
    assert out is not None
    value, is_exact, how = out
    assert is_exact and "Cholesky" in how
    assert ref <= value * SAFE <= ref * (1 + 1e-5)


@pytest.mark.parametrize("sizes, width", [([200], 1), ([60, 80, 60], 1), ([50, 40, 60, 50, 40], 2), ([30] * 6, 3)])
def test_cholesky_proof_refuses_below_the_top_eigenvalue(sizes, width):
    """The proof, whole or over bands of a block-banded matrix: accepts just above the largest
    eigenvalue, refuses just below it, and refuses when the claimed rounding error of the matrix
    exceeds the gap."""
    rng = np.random.default_rng(5)
    n = sum(sizes)
    edges = np.cumsum([0] + sizes)
    band = np.zeros((n, n), dtype=bool)
    for r in range(len(sizes)):
        band[edges[r] : edges[r + 1], edges[max(r - width, 0)] : edges[min(r + width + 1, len(sizes))]] = True
    a = rng.normal(size=(n + 50, n))
    gram = torch.from_numpy(np.where(band, a.T @ a, 0.0) + n * np.eye(n) * 0.5)[None]
    top = float(torch.linalg.eigvalsh(gram[0])[-1])
    block = lambda r, s: gram[:, edges[r] : edges[r + 1], edges[s] : edges[s + 1]].clone()  # noqa: E731
    assert convnorm.proven_top(block, sizes, top * (1 + 1e-7), 0.0, width)
    assert not convnorm.proven_top(block, sizes, top * (1 - 1e-7), 0.0, width)
    assert not convnorm.proven_top(block, sizes, top * (1 + 1e-7), top * 1e-6, width)


@pytest.mark.parametrize("case", TIGHT)
def test_tight_route_keeps_the_circular_bound_when_lanczos_misses_the_top(case, min_band, monkeypatch):
    """A Ritz value below the top (a bad estimate: 1% under the exact norm's square) fails both
    proofs, whole or banded: the route gives up and the layer keeps its circular bound; never a
    value below the norm."""
    conv = _tight_case(*case)
    ref = exact(conv)
    monkeypatch.setattr(convnorm, "_lanczos_top", lambda matvec, n: (ref**2 * 0.99, 0.0))
    assert convnorm.tight_conv_norm(conv, convnorm.circular_embedding_bound(conv)[0]) is None


def test_gram_method_is_exact_on_small_grids_where_naive_is_loose(monkeypatch):
    """Through the estimators: with the dense route off (as for a layer too large for it), naive
    reports the circular bound and gram the exact norm of each convolution (within 1e-5), so
    gram's product is lower; both stay above the exact per-layer norms."""
    monkeypatch.setattr(convnorm, "DENSE_ENTRIES", 0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, stride=2, padding=1),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    import lipcert

    naive = lipcert.bound(net, method="naive", input_shape=(1, 8, 4, 4))
    gram = lipcert.bound(net, method="gram", input_shape=(1, 8, 4, 4))
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    refs = []
    for m, shape in zip(convs, [(1, 8, 4, 4), (1, 16, 4, 4)]):
        conv = Conv(shape, m.weight.detach().numpy(), m.stride, (1, 1, 1, 1), (1, 1))
        refs.append(exact(conv))
    naive_convs = [lay for lay in naive.layers if lay.op == "Conv"]
    gram_convs = [lay for lay in gram.layers if lay.op == "Conv"]
    assert len(naive_convs) == len(gram_convs) == 2
    for ref, a, b in zip(refs, naive_convs, gram_convs):
        assert ref <= b.value <= a.value
        assert b.exact and b.value <= ref * (1 + 1e-5), b.how
        assert a.value > ref * 1.01
    assert gram.certified and gram.value < naive.value
    assert any("2 convolution(s) on small grids" in w and "--method gram" in w for w in naive.warnings)


def test_gram_at_a_passed_deadline_keeps_the_circular_bounds_and_says_so(monkeypatch):
    """gram stops early like LipSDP: with its deadline passed (a budget spent), no exact route is
    started; the layers keep naive's proven bounds, the result says how many, and the budget
    records the cut. A later run without a deadline is not served the cut values."""
    import time as _time

    import lipcert
    from lipcert.estimators import was_cut

    monkeypatch.setattr(convnorm, "DENSE_ENTRIES", 0)
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(256, 10)).double()
    graph = lipcert.load(net, (1, 8, 4, 4))
    naive = lipcert.bound(graph, method="naive")
    cut = lipcert.bound(graph, method="gram", extra={"deadline": _time.perf_counter()})
    conv_layers = [[lay.value for lay in r.layers if lay.op == "Conv"] for r in (naive, cut)]
    assert conv_layers[0] == conv_layers[1] and len(conv_layers[0]) == 1
    assert cut.value == pytest.approx(naive.value, rel=1e-8)  # the dense layer: Gram iteration against an SVD
    assert cut.details["exact_route_cut"] == 1 and was_cut(cut)
    assert any(convnorm.CUT_NOTE in w for w in cut.warnings)
    full = lipcert.bound(graph, method="gram")
    assert full.details["exact_route_cut"] == 0 and not was_cut(full)
    assert full.value < naive.value * 0.99


@pytest.mark.parametrize("spatial,k,stride", [((5,), 3, 1), ((6,), 3, 2), ((5, 3, 3), 3, 1)])
def test_tight_route_in_one_and_three_dimensions(spatial, k, stride):
    """1-d and 3-d convolutions: the bands run along the first spatial axis (a 2-d slice per row
    in 3-d); exact and never below the dense norm."""
    rng = np.random.default_rng(len(spatial) * 10 + k + stride)
    nd = len(spatial)
    conv = Conv((1, 6, *spatial), rng.normal(size=(8, 6, *([k] * nd))), (stride,) * nd, (1,) * (2 * nd), (1,) * nd)
    ref = exact(conv)
    circ = convnorm.circular_embedding_bound(conv)[0]
    out = convnorm.tight_conv_norm(conv, circ * 1.1)  # the route runs even where the circular bound is close
    assert out is not None and out[1]
    assert ref <= out[0] * SAFE <= ref * (1 + 1e-5)


# --- circular padding (torch's padding_mode="circular": slices and concatenations, then a Conv) ---
@pytest.mark.parametrize("nd, k, stride, dilation, n", [(2, 3, 1, 1, 6), (2, 3, 2, 1, 6), (2, 3, 1, 2, 6), (2, 5, 1, 1, 6),
                                                        (1, 3, 1, 1, 9), (2, 3, 1, 1, 16)])
def test_circularly_padded_convolution_is_one_exact_circular_convolution(nd, k, stride, dilation, n):
    """Node by node the circular padding alone counts up to 2 (its corners are copied four
    times); fused into one circular convolution, every norm is the exact one of the dense
    Jacobian (l2 from the FFT, l1 and linf from |kernel|), and never below it."""
    import lipcert
    from lipcert.graph.linear import CircularConv

    torch.manual_seed(k * 10 + n)
    conv_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}[nd]
    conv = conv_cls(2, 3, k, stride=stride, dilation=dilation, padding=dilation * (k // 2), padding_mode="circular").double()
    shape = (1, 2) + (n,) * nd
    graph = lipcert.load(torch.nn.Sequential(conv, torch.nn.ReLU()), shape)
    lin = graph.nodes[0].lin
    assert isinstance(lin, CircularConv) and len(graph.nodes) == 2
    jac = torch.autograd.functional.jacobian(lambda x: conv(x.reshape(shape)).reshape(-1), torch.zeros(math.prod(shape), dtype=torch.float64))
    for p, order in (("2", 2), ("inf", math.inf), ("1", 1)):
        ref = float(torch.linalg.matrix_norm(jac, order))
        value, is_exact, _ = lin.norm_bound(p)
        assert is_exact and ref <= value * SAFE <= ref * (1 + 1e-8)
        assert lipcert.bound(graph, "naive", norm=p).value >= ref


def test_batch_norm_after_a_circular_convolution_is_folded_into_its_kernel(tmp_path):
    """An eval-mode batch-norm that the export leaves after a circular convolution (exported
    without constant folding): the two merge into one layer whose norms are the exact ones of
    conv + batch-norm (a product of the two norms before), in l2, l1 and linf."""
    import lipcert
    from lipcert.graph.linear import Composed

    torch.manual_seed(3)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False).double()
    bn = torch.nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.1, 2.0, 5.0]))
        bn.running_mean.normal_()
        bn.weight.copy_(torch.tensor([1.5, -0.3, 0.8]))
    net = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()
    shape = (1, 2, 6, 6)
    torch.onnx.export(net.float(), torch.zeros(shape), str(tmp_path / "m.onnx"), dynamo=False, do_constant_folding=False)
    net.double()
    graph = lipcert.load(tmp_path / "m.onnx")
    assert [n.op for n in graph.nodes][:2] == ["Conv(circular padding)", "BatchNormalization"]
    jac = torch.autograd.functional.jacobian(lambda x: bn(conv(x.reshape(shape))).reshape(-1), torch.zeros(72, dtype=torch.float64))
    for p, order in (("2", 2), ("inf", math.inf), ("1", 1)):
        ref = float(torch.linalg.matrix_norm(jac, order))
        first = lipcert.bound(graph, "naive", norm=p).layers[0]
        assert isinstance(graph.merge_linear().nodes[0].lin, Composed) and first.exact
        assert "(scales folded into the kernel)" in first.how  # not a dense probe: any size
        assert ref <= first.value * SAFE <= ref * (1 + 1e-8)


def test_single_threaded_reaches_numpy_and_scipy_blas():
    """torch.set_num_threads does not reach the OpenBLAS of numpy and scipy (scipy's eigh spin-waited
    on a loaded machine: 124 s instead of 2.4 s); single_threaded limits them too, and restores."""
    import scipy.linalg  # noqa: F401  (its OpenBLAS loaded)
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    with convnorm.single_threaded():
        assert blas_threads() and set(blas_threads()) == {1}
    assert blas_threads() == before


class _PaddedConv(torch.nn.Module):
    def __init__(self, pads) -> None:
        super().__init__()
        self.pads, self.conv = pads, torch.nn.Conv2d(2, 2, 5).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pads(x))


@pytest.mark.parametrize("pads", [lambda x: F.pad(F.pad(x, (1, 1, 1, 1)), (1, 1, 1, 1), mode="circular"),
                                  lambda x: F.pad(F.pad(x, (1, 1, 1, 1), mode="circular"), (1, 1, 1, 1))])
def test_zero_padding_next_to_a_circular_padding_is_not_fused(pads):
    """A zero pad next to a circular one leaves entries with no source (index -1): not a circular
    convolution, and no crash (np.unravel_index(-1) raised a ValueError at load)."""
    import lipcert
    from lipcert.graph.linear import CircularConv

    torch.manual_seed(0)
    module = _PaddedConv(pads)
    graph = lipcert.load(module, (1, 2, 5, 5))
    assert not any(isinstance(getattr(n, "lin", None), CircularConv) for n in graph.nodes)
    jac = torch.autograd.functional.jacobian(lambda x: module(x.reshape(1, 2, 5, 5)).reshape(-1), torch.zeros(50, dtype=torch.float64))
    for p, order in (("2", 2), ("inf", math.inf), ("1", 1)):
        assert lipcert.bound(graph, "naive", norm=p).value >= float(torch.linalg.matrix_norm(jac, order))


class _MaxMinLastAxisConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(2, 4, 3, padding=1).double(), torch.nn.Conv2d(2, 2, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(torch.cat([torch.maximum(h[:, :2], h[:, 2:]), torch.minimum(h[:, :2], h[:, 2:])], -1))


def test_a_convolution_after_a_rank_changing_reshape_is_no_circular_candidate():
    """MaxMin along the last axis ends in a reshape from the 5-d pairs to the 4-d concat layout,
    a selection read by the convolution alone: the circular-padding check indexed the grid axes of
    the output with the input's rank (IndexError at load)."""
    import lipcert

    torch.manual_seed(0)
    module = _MaxMinLastAxisConv()
    graph = lipcert.load(module, (1, 2, 3, 3))
    points = torch.randn(8, 18, dtype=torch.float64)
    for p, order in (("2", 2), ("inf", math.inf), ("1", 1)):
        ref = max(float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(lambda x: module(x.reshape(1, 2, 3, 3)).reshape(-1), z), order))
                  for z in points)
        assert lipcert.bound(graph, "naive", norm=p).value >= ref


def test_circular_padding_of_one_axis_is_one_exact_circular_convolution():
    """Kernel (3, 1) with padding (1, 0): torch pads one axis and exports a Concat of one tensor
    for the other, which blocked the fusion (1.349 for an exact 0.976); now an alias."""
    import lipcert
    from lipcert.graph.linear import CircularConv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, (3, 1), padding=(1, 0), padding_mode="circular").double()
    graph = lipcert.load(torch.nn.Sequential(conv, torch.nn.ReLU()), (1, 2, 5, 4))
    assert isinstance(graph.nodes[0].lin, CircularConv)
    jac = torch.autograd.functional.jacobian(lambda x: conv(x.reshape(1, 2, 5, 4)).reshape(-1), torch.zeros(40, dtype=torch.float64))
    for p, order in (("2", 2), ("inf", math.inf), ("1", 1)):
        ref = float(torch.linalg.matrix_norm(jac, order))
        assert ref <= lipcert.bound(graph, "naive", norm=p).value * SAFE <= ref * (1 + 1e-8)


def test_a_circular_padding_shared_by_two_convolutions_is_absorbed_by_both(monkeypatch):
    """F.pad(x, circular) read by a block's first convolution and by its shortcut: each becomes a
    circular convolution (neither was: the padding had two readers), so the block takes the exact
    per-layer norms (naive 4.37 -> 2.31 here) and compose's Fourier block step (1.81); every
    bound stays above witnessed Jacobian norms."""
    import lipcert
    from lipcert.config import Settings
    from lipcert.estimators import compose
    from lipcert.graph.linear import CircularConv
    from zoo import jacobian_lower

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.short = torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 4, 3)
            self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")

        def forward(self, x):
            p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular")
            return self.short(p) + self.c2(torch.relu(self.c1(p)))

    torch.manual_seed(0)
    graph = lipcert.load(Shared().double(), (1, 4, 8, 8))
    assert sum(isinstance(getattr(n, "lin", None), CircularConv) for n in graph.nodes) == 3 and len(graph.nodes) == 5
    lower = jacobian_lower(graph, 50)
    naive = lipcert.bound(graph, "naive").value
    monkeypatch.setattr(compose, "DENSE_STATE", 40)  # the Fourier block step, as on a large network
    block = compose.Compose().run(graph, Settings())
    assert block.details["rules"].get("residual block inequality (Fourier domain)") == 1
    assert lower <= block.value < naive
