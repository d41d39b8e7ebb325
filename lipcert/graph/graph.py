"""Graph: the one internal form of a network that every estimator reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ModelError
from .linear import Composed, LinearOp
from .nodes import Activation, Affine, Concat, Extremum, MaxPool, Node, NormPool, Sort, Sum, finite


WEIGHT_RANGE = (1e-100, 1e100)  # largest |weight| of a layer, where float64 squares stay normal


@dataclass
class Graph:
    """A DAG of typed nodes with static shapes, in topological order.

    ``input_shape`` is the network's input tensor shape (the ONNX shape, batch axis included);
    ``forward`` takes a batch of such inputs, shape ``(B, *input_shape)``.
    """

    INPUT = "input"

    nodes: list[Node]
    input_shape: tuple[int, ...]
    output: str
    source: str | None = None  # file path or description
    sha256: str | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_name = {n.name: n for n in self.nodes}
        if len(self._by_name) != len(self.nodes) or self.INPUT in self._by_name:
            raise ValueError("node names must be unique and differ from 'input'")
        seen = {self.INPUT}
        for n in self.nodes:
            missing = [i for i in n.inputs if i not in seen]
            if missing:
                raise ValueError(f"node {n.name} reads {missing} before they are computed")
            seen.add(n.name)
        if self.output not in seen:
            raise ValueError(f"output {self.output} is not a node")

    # --- structure -------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self._by_name[name]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.input_shape if name == self.INPUT else self._by_name[name].out_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shape_of(self.output)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def output_dim(self) -> int:
        return int(np.prod(self.output_shape))

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {self.INPUT: []}
        for n in self.nodes:
            out.setdefault(n.name, [])
            for i in n.inputs:
                out[i].append(n.name)
        return out

    def is_chain(self) -> bool:
        """True when every node has one input and feeds the next one only."""
        prev = self.INPUT
        for n in self.nodes:
            if n.inputs != [prev]:
                return False
            prev = n.name
        return prev == self.output

    def op_counts(self) -> Counter:
        return Counter(type(n).__name__ for n in self.nodes)

    # --- evaluation --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | np.ndarray, upto: str | None = None) -> torch.Tensor:
        """Evaluate the network in float64 on a batch of shape (B, *input_shape)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if tuple(x.shape[1:]) != self.input_shape:
            if tuple(x.shape) == self.input_shape:
                x = x.unsqueeze(0)
            else:
                raise ValueError(f"input batch has shape {tuple(x.shape)}, expected (B, *{self.input_shape})")
        values = {self.INPUT: x}
        target = upto or self.output
        for n in self.nodes:
            values[n.name] = n.forward(*(values[i] for i in n.inputs))
            if n.name == target:
                break
        return values[target]

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.forward(x)

    # --- transformations ---------------------------------------------------------------------
    def merge_linear(self) -> Graph:
        """Fuse chains of consecutive affine nodes into one affine node each.

        Exact norms of the fused map are never larger than the product of the parts' norms, so
        bounds can only get tighter; the function computed is unchanged.
        """
        consumers = self.consumers()
        merged: list[Node] = []
        for n in self.nodes:
            prev = merged[-1] if merged else None
            # prev's name is always its chain's last original node, so consumers[] applies to it
            if (
                isinstance(n, Affine)
                and isinstance(prev, Affine)
                and n.inputs == [prev.name]
                and consumers[prev.name] == [n.name]
                and prev.name != self.output
            ):
                bias = None if prev.bias is None else n.lin.apply(prev.bias.unsqueeze(0))[0]
                if n.bias is not None:
                    bias = n.bias if bias is None else bias + n.bias
                merged[-1] = Affine(
                    name=n.name, op=f"{prev.op}+{n.op}", inputs=prev.inputs, out_shape=n.out_shape,
                    lin=Composed([prev.lin, n.lin]), bias=bias,
                )
            else:
                merged.append(n)
        return Graph(merged, self.input_shape, self.output, self.source, self.sha256, list(self.warnings))

    def check(self) -> None:
        """Raise ModelError naming every node with non-finite parameters, or with weights whose squares
        would leave float64 (WEIGHT_RANGE)."""
        bad = [f"{n.name} ({n.op})" for n in self.nodes if not all(finite(t) for t in n.parameters())]
        if bad:
            raise ModelError(
                f"the model has NaN or infinite weights in {len(bad)} node(s): {', '.join(bad)}",
                self.source,
                "retrain or repair the model; no bound can be computed for non-finite weights",
            )
        # the proofs square weights in float64: a layer whose weights are all below 1e-100 (or one
        # above 1e100) would underflow (overflow) there, and a bound of 0 is not a proof
        extreme = []
        for n in self.nodes:
            if isinstance(n, Affine):
                top = max((float(t.abs().max()) for t in n.lin.parameters() if t.numel()), default=0.0)
                if top != 0.0 and not WEIGHT_RANGE[0] <= top <= WEIGHT_RANGE[1]:
                    extreme.append(f"{n.name} ({n.op}, largest weight {top:.3g})")
        if extreme:
            raise ModelError(
                f"the model has layers whose largest weight lies outside [{WEIGHT_RANGE[0]:g}, {WEIGHT_RANGE[1]:g}] in "
                f"{len(extreme)} node(s): {', '.join(extreme)}",
                self.source,
                "rescale those layers (multiply one by a power of ten and divide the next by it); float64 proofs "
                "would underflow or overflow on them",
            )

    def summary(self) -> list[dict]:
        """One row per node: name, op, type, input(s), output shape, details."""
        rows = []
        for n in self.nodes:
            detail = ""
            if isinstance(n, Affine):
                detail = n.lin.describe() + (" + bias" if n.bias is not None else "")
            elif isinstance(n, Activation):
                a, b = n.slope_interval
                detail = f"{n.kind}, slope in [{a:g}, {b:g}]"
            elif isinstance(n, MaxPool):
                detail = f"kernel {n.kernel}, strides {n.strides}"
            elif isinstance(n, Sum):
                detail = f"coefficients {n.coeffs}"
            elif isinstance(n, Concat):
                detail = f"axis {n.axis}"
            elif isinstance(n, (Sort, NormPool)):
                detail = n.describe()
            elif isinstance(n, Extremum):
                detail = f"elementwise {n.mode} of {len(n.inputs)} tensors"
            rows.append({"name": n.name, "op": n.op, "type": type(n).__name__, "inputs": n.inputs, "out_shape": list(n.out_shape), "detail": detail})
        return rows


__all__ = ["Graph", "Node", "Affine", "Activation", "MaxPool", "Sum", "Concat", "Sort", "NormPool", "Extremum", "LinearOp"]
