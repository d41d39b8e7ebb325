"""Train the 1-Lipschitz example classifier that ships in models/, on the spiral data of make_models.py.

    python models/make_gnp_spiral.py

A gradient-norm-preserving network built from torch's own parametrisations: orthogonal weights
(``torch.nn.utils.parametrizations.orthogonal``: orthonormal columns for the 2 -> 64 layer,
orthogonal 64 x 64 matrices, orthonormal rows for the 64 -> 3 output) and GroupSort2 activations,
so it is 1-Lipschitz in l2 by construction. Trained with a multi-class hinge loss (margin 0.1) on
3000 spiral points made here (seed 1; the shipped test set spiral_test.npz comes from seed 0).
Exported through lipcert's own loader path (parametrisations frozen on a copy), and checked against
onnxruntime on every test input. Deterministic (fixed seeds, 2 threads); about 6 minutes of CPU
time. Nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch.nn.utils import parametrizations

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from make_models import ONNX_TOLERANCE, spiral  # noqa: E402

WIDTH = 64
MARGIN = 0.1
EPOCHS = 300


class GroupSort2(torch.nn.Module):
    """Sort each consecutive pair (exports as Reshape, ReduceMin, ReduceMax, Concat, Reshape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.reshape(x.shape[0], -1, 2)
        return torch.cat([g.min(-1, keepdim=True)[0], g.max(-1, keepdim=True)[0]], -1).reshape(x.shape)


def network() -> torch.nn.Module:
    def orth(n_in: int, n_out: int) -> torch.nn.Module:
        return parametrizations.orthogonal(torch.nn.Linear(n_in, n_out))

    return torch.nn.Sequential(orth(2, WIDTH), GroupSort2(), orth(WIDTH, WIDTH), GroupSort2(), orth(WIDTH, WIDTH), GroupSort2(), orth(WIDTH, 3))


def hinge(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over points and wrong classes of relu(MARGIN - (f_y - f_j))."""
    true = logits.gather(1, y[:, None])
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -torch.inf)
    return torch.relu(MARGIN - (true - others)).mean()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y = spiral(1000, np.random.default_rng(1))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = network()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(yt)).split(500):
            opt.zero_grad()
            hinge(model(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    model.eval()

    from lipcert.load.torch_loader import module_to_onnx

    proto = module_to_onnx(model, (1, 2))
    path = HERE / "gnp_spiral.onnx"
    onnx.save(proto, path)
    test = np.load(HERE / "spiral_test.npz")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(test["x"])).numpy()
    ours = np.concatenate([sess.run(None, {"input": row[None]})[0] for row in test["x"]])
    assert np.abs(ref - ours).max() < ONNX_TOLERANCE, np.abs(ref - ours).max()
    print(f"gnp_spiral.onnx: train accuracy {float((model(xt).argmax(1) == yt).float().mean()):.3f}, "
          f"test accuracy {float((ref.argmax(1) == test['y']).mean()):.3f}")


if __name__ == "__main__":
    main()
