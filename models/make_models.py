"""Train the small example networks that ship in models/, on synthetic data made here.

    python models/make_models.py

Deterministic (fixed seeds, 2 threads); runs in well under a minute on 2 CPU cores. Writes
mlp_spiral.onnx + spiral_test.npz and cnn_bars.onnx + bars_test.npz, and checks each ONNX file
against the torch model with onnxruntime.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

HERE = Path(__file__).resolve().parent


def spiral(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Three interleaved noisy spiral arms in [-1, 1]^2."""
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
    """8x8 images of one bar: horizontal, vertical, diagonal or anti-diagonal (4 classes)."""
    x = rng.normal(0, 0.1, (n, 1, 8, 8))
    y = rng.integers(0, 4, n)
    idx = np.arange(8)
    for i in range(n):
        k = rng.integers(1, 7)
        if y[i] == 0:
            x[i, 0, k, :] += 1.0
        elif y[i] == 1:
            x[i, 0, :, k] += 1.0
        elif y[i] == 2:
            x[i, 0, idx, idx] += 1.0
        else:
            x[i, 0, idx, 7 - idx] += 1.0
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(yt), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: torch.nn.Module, x_test: np.ndarray, name: str) -> Path:
    path = HERE / f"{name}.onnx"
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for xi in x_test[:50]:
            ref = model(torch.from_numpy(xi[None])).numpy()
            out = sess.run(None, {"input": xi[None]})[0]
            assert np.abs(ref - out).max() < 1e-4, f"{name}: onnxruntime disagrees with torch"
    return path


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)

    x, y = spiral(300, rng)
    x_train, y_train, x_test, y_test = x[:600], y[:600], x[600:], y[600:]
    mlp = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.LeakyReLU(0.1),
        torch.nn.Linear(32, 32), torch.nn.LeakyReLU(0.1),
        torch.nn.Linear(32, 3),
    )
    train(mlp, x_train, y_train, epochs=300, lr=3e-3)
    path = export(mlp, x_test, "mlp_spiral")
    np.savez(HERE / "spiral_test.npz", x=x_test, y=y_test)
    print(f"{path.name}: test accuracy {accuracy(mlp, x_test, y_test):.3f}, {path.stat().st_size} bytes")

    x, y = bars(1000, rng)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4),
    )
    train(cnn, x[:800], y[:800], epochs=40, lr=3e-3)
    path = export(cnn, x[800:], "cnn_bars")
    np.savez(HERE / "bars_test.npz", x=x[800:], y=y[800:])
    print(f"{path.name}: test accuracy {accuracy(cnn, x[800:], y[800:]):.3f}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
