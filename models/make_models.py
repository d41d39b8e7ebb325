"""Train the small example networks that ship in models/, on synthetic data made here.

    python models/make_models.py

Deterministic (fixed seeds, 2 threads; rerunning rewrites byte-identical files); about 30 s on
2 CPU cores. Writes mlp_spiral.onnx + spiral_test.npz and cnn_bars.onnx + bars_test.npz, and
checks each ONNX file against its torch model with onnxruntime on every test input.
Nothing is downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent
ONNX_TOLERANCE = 1e-4  # max abs difference allowed between torch and onnxruntime logits


def spiral(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three interleaved noisy spiral arms in [-1, 1]^2 (radius <= 1), shuffled."""
    xs, ys = [], []
    for c in range(3):
        r = np.linspace(0.1, 1.0, n_per_class)
        t = 1.75 * np.pi * r + c * 2 * np.pi / 3 + rng.normal(0, 0.12, n_per_class)
        xs.append(np.stack([r * np.cos(t), r * np.sin(t)], 1))
        ys.append(np.full(n_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm].astype(np.int64)


def bars(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1x8x8 images holding one bar at a random position, plus noise, clipped to [0, 1].

    Classes: 0 horizontal (random row), 1 vertical (random column), 2 main-diagonal and
    3 anti-diagonal (each shifted off the centre diagonal by -2..2, so 6 to 8 pixels long).
    """
    x = rng.normal(0, 0.1, (n, 1, 8, 8))
    y = rng.integers(0, 4, n)
    idx = np.arange(8)
    for i in range(n):
        if y[i] < 2:
            k = rng.integers(1, 7)  # row / column 1..6
            if y[i] == 0:
                x[i, 0, k, :] += 1.0
            else:
                x[i, 0, :, k] += 1.0
        else:
            off = rng.integers(-2, 3)
            cols = idx + off if y[i] == 2 else 7 - idx + off
            keep = (cols >= 0) & (cols < 8)
            x[i, 0, idx[keep], cols[keep]] += 1.0
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> None:
    """Adam on cross-entropy, minibatches of 64 in a seeded order."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: torch.nn.Module, x_test: np.ndarray, name: str) -> tuple[Path, float]:
    """Export with a fixed batch of 1; return the path and the worst |torch - onnxruntime|."""
    path = HERE / f"{name}.onnx"
    model.eval()
    with warnings.catch_warnings():
        # dynamo=False: the TorchScript exporter (the new one needs onnxscript); it warns that
        # it is deprecated, and that is all it warns about.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), str(path), dynamo=False,
                          opset_version=13, input_names=["input"], output_names=["logits"])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for xi in x_test:  # batch axis is fixed to 1: one input at a time
            ref = model(torch.from_numpy(xi[None])).numpy()
            out = sess.run(["logits"], {"input": xi[None]})[0]
            worst = max(worst, float(np.abs(ref - out).max()))
    if worst >= ONNX_TOLERANCE:
        raise AssertionError(f"{name}: onnxruntime differs from torch by {worst:.2e}")
    return path, worst


def ship(model: torch.nn.Module, x_test: np.ndarray, y_test: np.ndarray, name: str, data: str) -> None:
    """Export model and test set, check them, and print one summary line."""
    acc = accuracy(model, x_test, y_test)
    if acc <= 0.9:
        raise AssertionError(f"{name}: test accuracy {acc:.3f} is not above 0.9")
    path, worst = export(model, x_test, name)
    npz = HERE / f"{data}.npz"
    np.savez(npz, x=x_test, y=y_test)
    print(f"{name}: test accuracy {acc:.3f} on {len(y_test)} points, "
          f"onnxruntime max |diff| {worst:.1e}; {path.name} {path.stat().st_size} B, "
          f"{npz.name} {npz.stat().st_size} B")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)

    # 1. spiral: 900 points, 600 train / 300 test
    x, y = spiral(300, rng)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.LeakyReLU(0.1),
        torch.nn.Linear(32, 32), torch.nn.LeakyReLU(0.1),
        torch.nn.Linear(32, 3),
    )
    train(mlp, x[:600], y[:600], epochs=300, lr=3e-3)
    ship(mlp, x[600:], y[600:], "mlp_spiral", "spiral_test")

    # 2. bars: 1000 images, 800 train / 200 test
    x, y = bars(1000, rng)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4),
    )
    train(cnn, x[:800], y[:800], epochs=40, lr=3e-3)
    ship(cnn, x[800:], y[800:], "cnn_bars", "bars_test")


if __name__ == "__main__":
    main()
