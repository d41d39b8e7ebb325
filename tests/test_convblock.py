"""Residual blocks of convolutions bounded in the Fourier domain (estimators/convblock.py): the
inequality proven at every frequency holds for the real, zero-padded block's dense matrices, and
the compositional bound that uses it stays above witnessed lower bounds and below naive."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import lipcert
from lipcert.estimators import compose as C
from lipcert.estimators.convblock import block_factor, full_weight
from lipcert.graph import Activation, Affine, Sum
from zoo import jacobian_lower


class Block(torch.nn.Module):
    """x -> S x + conv2(relu(conv1(x))), S the identity or a convolution with conv1's stride."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, k: int, stride: int, pad: int, shortcut_k: int | None, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(c_in, c_mid, k, stride=stride, padding=pad)
        self.conv2 = torch.nn.Conv2d(c_mid, c_out, k, padding=pad, bias=False)
        self.short = None if shortcut_k is None else torch.nn.Conv2d(c_in, c_out, shortcut_k, stride=stride, padding=shortcut_k // 2, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)

    def forward(self, x):
        return (x if self.short is None else self.short(x)) + self.conv2(torch.relu(self.conv1(x)))


def _parts(graph):
    """(W1, W2, shortcut or None) of the one residual block of a merged graph."""
    g = graph.merge_linear()
    add = next(n for n in g.nodes if isinstance(n, Sum))
    node = lambda name: None if name == g.INPUT else g.node(name)  # noqa: E731
    k = next(i for i, name in enumerate(add.inputs) if isinstance(node(name), Affine) and isinstance(node(g.node(name).inputs[0]), Activation))
    w2 = g.node(add.inputs[k])
    w1 = g.node(g.node(w2.inputs[0]).inputs[0])
    other = add.inputs[1 - k]
    return w1.lin, w2.lin, None if other == w1.inputs[0] else g.node(other).lin


def _circular_dense(conv, grid: list[int]) -> np.ndarray:
    """The dense matrix of the circular convolution on ``grid`` that the Fourier step models:
    output j reads the input at (j s + t - begin) mod grid (channel-major layout, as lipcert's)."""
    K = full_weight(conv).numpy()
    co, ci, k1, k2 = K.shape
    (s1, s2), (b1, b2) = conv.strides, conv.begins[:2]
    n1, n2 = grid
    m1, m2 = n1 // s1, n2 // s2
    out = np.zeros((co, m1, m2, ci, n1, n2))
    for j1, j2, t1, t2 in itertools.product(range(m1), range(m2), range(k1), range(k2)):
        out[:, j1, j2, :, (s1 * j1 + t1 - b1) % n1, (s2 * j2 + t2 - b2) % n2] += K[:, :, t1, t2]
    return out.reshape(co * m1 * m2, ci * n1 * n2)


CASES = {  # c_in, c_mid, c_out, k, stride, pad, shortcut kernel, input size
    "identity 3x3": (3, 4, 3, 3, 1, 1, None, (6, 6)),
    "identity 3x3, non-square": (2, 3, 2, 3, 1, 1, None, (5, 7)),
    "stride 2, 1x1 shortcut": (2, 4, 3, 3, 2, 1, 1, (8, 8)),
    "stride 2, 3x3 shortcut, odd size": (2, 3, 3, 3, 2, 1, 3, (7, 7)),
    "5x5, no padding of the shortcut": (2, 3, 2, 5, 1, 2, 1, (10, 10)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_the_fourier_inequality_holds_for_the_dense_zero_padded_block(case, seed):
    """N - y B^T B >= 0 with the dense matrices of the real layers, at the multiplier and y that
    the Fourier step proved: a wrong alignment of the layers' phases or a wrong periodic grid
    would prove a y that the real block violates. And y is close to the best y for that
    multiplier on the dense block (the circular embedding loses little)."""
    c_in, c_mid, c_out, k, stride, pad, sk, size = CASES[case]
    graph = lipcert.load(Block(c_in, c_mid, c_out, k, stride, pad, sk, seed).double(), (1, c_in, *size))
    w1, w2, s = _parts(graph)
    info: dict = {}
    y = block_factor(w1, w2, s, 0.5, 1.0, 1.0, info)
    assert y is not None and y > 0
    W1, W2 = w1.dense(), w2.dense()
    S = np.eye(W1.shape[1]) if s is None else s.dense()
    n, h = W1.shape[1], W1.shape[0]
    t = np.repeat(info["t"], h // len(info["t"]))  # one multiplier per hidden channel, at every position
    N = np.block([[np.eye(n), -0.5 * W1.T * t[None, :]], [-0.5 * t[:, None] * W1, np.diag(t)]])
    B = np.hstack([S, W2])
    M = N - y * B.T @ B
    assert np.linalg.eigvalsh(M).min() >= -1e-9 * np.abs(M).max()
    best_dense = 1.0 / np.linalg.eigvalsh(B @ np.linalg.solve(N, B.T)).max()
    assert y <= best_dense * (1 + 1e-9) and y >= 0.5 * best_dense
    # the periodic grid holds every layer's padded input, so that no output it keeps wraps around
    for i, (n_in, st) in enumerate(zip(size, w1.strides)):
        assert info["grid"][i] % st == 0 and info["grid"][i] >= n_in + w1.begins[i] + w1.ends[i]
        assert info["grid"][i] // st >= w2.in_shape[2 + i] + w2.begins[i] + w2.ends[i]
        assert s is None or info["grid"][i] >= n_in + s.begins[i] + s.ends[i]
    # the frequency blocks are exactly the circular block's: the same y as its dense matrices give
    Wc1, Wc2 = _circular_dense(w1, info["grid"]), _circular_dense(w2, [g // st for g, st in zip(info["grid"], w1.strides)])
    Sc = np.eye(Wc1.shape[1]) if s is None else _circular_dense(s, info["grid"])
    tc = np.repeat(info["t"], Wc1.shape[0] // len(info["t"]))
    Nc = np.block([[np.eye(Wc1.shape[1]), -0.5 * Wc1.T * tc[None, :]], [-0.5 * tc[:, None] * Wc1, np.diag(tc)]])
    Bc = np.hstack([Sc, Wc2])
    circular = 1.0 / np.linalg.eigvalsh(Bc @ np.linalg.solve(Nc, Bc.T)).max()
    assert abs(y / circular - 1.0) < 1e-5
    # the block's constant: at least the Jacobian norm anywhere (a witnessed lower bound)
    assert y ** -0.5 >= jacobian_lower(graph, 30) * (1 - 1e-9)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("stride,groups", [(1, 1), (2, 1), (1, 4), (2, 2)])
def test_a_plain_pair_of_convolutions_holds_for_the_dense_zero_padded_layers(seed, stride, groups):
    """y = W2 relu(W1 u) with no shortcut (c_s = 0, VGG's conv-relu-conv; with groups, MobileNet's
    expansion then depthwise convolution): the proven y satisfies the inequality with the real
    layers' dense matrices and equals the circular pair's best y."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, stride=stride, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, padding=1, groups=groups)).double()
    graph = lipcert.load(net, (1, 2, 8, 8))
    g = graph.merge_linear()
    w1, w2 = (n.lin for n in g.nodes if isinstance(n, Affine))
    info: dict = {}
    y = block_factor(w1, w2, None, 0.5, 0.0, 1.0, info)
    assert y is not None and y > 0
    W1, W2 = w1.dense(), w2.dense()
    n, h = W1.shape[1], W1.shape[0]
    t = np.repeat(info["t"], h // len(info["t"]))
    N = np.block([[np.eye(n), -0.5 * W1.T * t[None, :]], [-0.5 * t[:, None] * W1, np.diag(t)]])
    B = np.hstack([np.zeros((W2.shape[0], n)), W2])
    M = N - y * B.T @ B
    assert np.linalg.eigvalsh(M).min() >= -1e-9 * np.abs(M).max()
    Wc1, Wc2 = _circular_dense(w1, info["grid"]), _circular_dense(w2, [q // stride for q in info["grid"]])
    tc = np.repeat(info["t"], Wc1.shape[0] // len(info["t"]))
    Nc = np.block([[np.eye(Wc1.shape[1]), -0.5 * Wc1.T * tc[None, :]], [-0.5 * tc[:, None] * Wc1, np.diag(tc)]])
    Bc = np.hstack([np.zeros((Wc2.shape[0], Wc1.shape[1])), Wc2])
    circular = 1.0 / np.linalg.eigvalsh(Bc @ np.linalg.solve(Nc, Bc.T)).max()
    assert abs(y / circular - 1.0) < 1e-5
    assert y ** -0.5 >= jacobian_lower(graph, 30) * (1 - 1e-9)


@pytest.mark.parametrize("groups", [2, 6])
def test_a_grouped_convolution_is_its_full_weight_with_zeros_between_groups(groups):
    conv = torch.nn.Conv2d(6, 12, 3, padding=1, groups=groups).double()
    lin = lipcert.load(torch.nn.Sequential(conv), (1, 6, 5, 5)).merge_linear().nodes[0].lin
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    ungrouped = torch.nn.functional.conv2d(x, full_weight(lin), padding=1)
    assert torch.allclose(ungrouped, torch.nn.functional.conv2d(x, conv.weight, padding=1, groups=groups), atol=1e-12)


def test_compose_bounds_plain_convolution_pairs_in_the_fourier_domain(monkeypatch):
    """A VGG-like chain conv-relu-conv-relu-conv-relu-linear whose layers are too large for dense
    forms (forced): the pairs take the Fourier step, above a witnessed lower bound, below naive."""
    monkeypatch.setattr(C, "DENSE_STATE", 40)
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3)).double()
    graph = lipcert.load(net, (1, 2, 6, 6))
    r = C.Compose().run(graph, lipcert.config.Settings())
    assert r.details["rules"].get("two-convolution inequality (Fourier domain)", 0) >= 1
    assert r.value >= jacobian_lower(graph, 50)
    assert r.details["compositional_value"] < 0.9 * r.details["naive_value"]


def _resnet(seed: int, act=torch.nn.ReLU) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(2, 4, 3, padding=1)
            self.a1, self.a2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.b1, self.b2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.Conv2d(6, 6, 3, padding=1)
            self.bs = torch.nn.Conv2d(4, 6, 1, stride=2, bias=False)
            self.act = act()
            self.head = torch.nn.Linear(6 * 5 * 5, 3)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
                self.bn.running_mean.copy_(torch.randn(4, generator=gen))
                self.bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)

        def forward(self, x):
            x = self.act(self.stem(x))
            x = self.act(x + self.a2(self.act(self.bn(self.a1(x)))))
            x = self.act(self.bs(x) + self.b2(self.act(self.b1(x))))
            return self.head(x.flatten(1))

    return Net().double().eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_compose_bounds_conv_residual_blocks_in_the_fourier_domain(seed, monkeypatch):
    """Blocks too large for a dense form (forced here with a small DENSE_STATE) take the Fourier
    step: the bound stays above a witnessed lower bound and far below naive."""
    monkeypatch.setattr(C, "DENSE_STATE", 40)
    graph = lipcert.load(_resnet(seed), (1, 2, 10, 10))
    r = C.Compose().run(graph, lipcert.config.Settings())
    assert r.details["rules"].get("residual block inequality (Fourier domain)") == 2
    assert r.value >= jacobian_lower(graph, 50)
    assert r.details["compositional_value"] < 0.8 * r.details["naive_value"]


def test_a_leaky_activation_does_not_take_the_fourier_step(monkeypatch):
    """Outside the input window the embedded block's neurons are constant (slope 0), which a
    slope interval [alpha, beta] with alpha > 0 does not contain: such blocks keep the naive rules."""
    monkeypatch.setattr(C, "DENSE_STATE", 40)
    graph = lipcert.load(_resnet(0, lambda: torch.nn.LeakyReLU(0.125)), (1, 2, 10, 10))
    r = C.Compose().run(graph, lipcert.config.Settings())
    assert "residual block inequality (Fourier domain)" not in r.details["rules"]
    assert r.value >= jacobian_lower(graph, 30)


def test_a_block_is_solved_once_per_network(monkeypatch):
    """sdp-wide walks the network as compose does: the second walk reuses the proven value."""
    from lipcert.estimators import convblock

    graph = lipcert.load(Block(2, 3, 2, 3, 1, 1, None, 0).double(), (1, 2, 6, 6))
    w1, w2, s = _parts(graph)
    calls = []
    real = convblock._block_factor
    monkeypatch.setattr(convblock, "_block_factor", lambda *a: calls.append(a) or real(*a))
    first, info = block_factor(w1, w2, s, 0.5, 1.0, 1.0), {}
    assert block_factor(w1, w2, s, 0.5, 1.0, 1.0, info) == first and len(calls) == 1 and "t" in info
    assert block_factor(w1, w2, s, 0.5, 1.0, -1.0) is not None and len(calls) == 2  # another block


def test_no_fourier_step_starts_after_the_deadline(monkeypatch):
    """certify gives compose a deadline (half of the budget left): past it, blocks keep the naive
    rule, still proven."""
    import time

    from lipcert.budget import settings_with_deadline

    monkeypatch.setattr(C, "DENSE_STATE", 40)
    graph = lipcert.load(_resnet(1), (1, 2, 10, 10))
    late = C.Compose().run(graph, settings_with_deadline(lipcert.config.Settings(), time.perf_counter()))
    assert "residual block inequality (Fourier domain)" not in late.details["rules"]
    assert jacobian_lower(graph, 30) <= late.value <= late.details["naive_value"]


class CircularBlock(torch.nn.Module):
    """x -> S x + conv2(relu(conv1(x))) with torch's circular padding (``pads``: F.pad's order,
    left, right, top, bottom; asymmetric ones shift the taps), S the identity or an unpadded 1x1
    convolution with conv1's stride."""

    def __init__(self, c: int, c_mid: int, stride: int, pads: tuple[int, int, int, int], shortcut: bool, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.pads = pads
        self.conv1 = torch.nn.Conv2d(c, c_mid, 3, stride=stride)
        self.conv2 = torch.nn.Conv2d(c_mid, c, 3, padding=1, padding_mode="circular", bias=False)
        self.short = torch.nn.Conv2d(c, c, 1, stride=stride, bias=False) if shortcut else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)

    def forward(self, x):
        h = self.conv1(torch.nn.functional.pad(x, self.pads, mode="circular"))
        return (x if self.short is None else self.short(x)) + self.conv2(torch.relu(h))


@pytest.mark.parametrize("stride,pads,shortcut", [(1, (1, 1, 1, 1), False), (1, (2, 0, 0, 2), False), (2, (1, 1, 1, 1), True)])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_circular_block_is_bounded_exactly_on_its_own_grid(stride, pads, shortcut, seed):
    """Circular convolutions (torch's padding_mode="circular", loaded as CircularConv) take the
    Fourier step on their own grid, without an embedding: the proven y is the best y of the
    dense block's inequality for the same multipliers (a wrong tap offset would give another y,
    above it: unsound), and the block's bound stays above witnessed Jacobian norms."""
    from lipcert.graph.linear import CircularConv

    graph = lipcert.load(CircularBlock(3, 4, stride, pads, shortcut, seed).double(), (1, 3, 6, 6))
    w1, w2, s = _parts(graph)
    assert isinstance(w1, CircularConv) and isinstance(w2, CircularConv)
    _check_exact_on_the_dense_block(graph, w1, w2, s, [6, 6])


def _check_exact_on_the_dense_block(graph, w1, w2, s, grid):
    """The proven y is the best y of the dense block inequality (the layers' own matrices) for the
    multipliers the step chose, and y^-1/2 is above witnessed Jacobian norms."""
    info: dict = {}
    y = block_factor(w1, w2, s, 0.5, 1.0, 1.0, info)
    assert y is not None and info["grid"] == grid
    W1, W2 = w1.dense(), w2.dense()
    S = np.eye(W1.shape[1]) if s is None else s.dense()
    t = np.repeat(info["t"], W1.shape[0] // len(info["t"]))
    N = np.block([[np.eye(W1.shape[1]), -0.5 * W1.T * t[None, :]], [-0.5 * t[:, None] * W1, np.diag(t)]])
    B = np.hstack([S, W2])
    best_dense = 1.0 / np.linalg.eigvalsh(B @ np.linalg.solve(N, B.T)).max()
    assert best_dense * (1 - 1e-5) <= y <= best_dense * (1 + 1e-9)
    assert y ** -0.5 >= jacobian_lower(graph, 30) * (1 - 1e-9)


def test_a_batch_norm_left_after_a_circular_convolution_is_folded_for_the_block(tmp_path):
    """An export without constant folding keeps the batch-norm after conv1: the layer is
    conv + channel scale, taken as its folded circular convolution (the block was bounded
    node by node: 2.69 against 1.87 on an 8-channel example)."""
    from lipcert.graph.linear import Composed

    class WithNorm(CircularBlock):
        def __init__(self) -> None:
            super().__init__(3, 4, 1, (1, 1, 1, 1), False, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            with torch.no_grad():
                self.bn.running_var.copy_(torch.tensor([0.3, 1.0, 2.0, 0.5]))
                self.bn.weight.copy_(torch.tensor([1.2, -0.7, 0.4, 0.9]))

        def forward(self, x):
            h = self.bn(self.conv1(torch.nn.functional.pad(x, self.pads, mode="circular")))
            return x + self.conv2(torch.relu(h))

    torch.onnx.export(WithNorm().eval(), torch.zeros(1, 3, 6, 6), str(tmp_path / "m.onnx"), dynamo=False, do_constant_folding=False)
    graph = lipcert.load(tmp_path / "m.onnx")
    w1, w2, s = _parts(graph)
    assert isinstance(w1, Composed) and w1.circular is not None
    _check_exact_on_the_dense_block(graph, w1, w2, s, [6, 6])


def test_zero_and_circular_padding_in_one_block_do_not_take_the_fourier_step():
    """A block mixing a circular and a zero-padded 3x3 convolution is periodic on no grid."""

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")
            self.conv2 = torch.nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            return x + self.conv2(torch.relu(self.conv1(x)))

    w1, w2, s = _parts(lipcert.load(Mixed().double(), (1, 2, 6, 6)))
    assert block_factor(w1, w2, s, 0.5, 1.0, 1.0) is None
