"""Witnessed lower bounds: an adversarial search for the inputs where the network stretches most.

``||J(x)||`` at any point where f is differentiable is a lower bound on the Lipschitz constant, and
so is ``||f(x) - f(y)|| / ||x - y||`` for any pair. The search runs on many points at once, as
batches through the graph (CPU or GPU, no per-point Python loops):

1. **Screening.** Random points (uniform in [0, 1]^n and Gaussian at scales 0.5, 1, 3, 10), the
   user's data, and points along the top right singular vector of the first linear layer (from
   the power method of the upper bounds). At each, the exact Jacobian (m vector-Jacobian
   products in one backward pass) gives ``||J(x)||``: the top singular value (l2) or the largest
   absolute row sum (linf), with the output direction ``u`` that attains it. The best points start
   the next phase.
2. **Ascent.** For each start, Adam ascent on ``x`` of ``||J_s(x)^T u||`` (l2: u follows the top
   left singular vector by one power step on ``J_s J_s^T`` per step, so this is the adversarial
   power iteration on ``J^T J``, the Hessian of ``||f(x + r) - f(x)||^2`` at r = 0, seen from the
   small output side; linf: u = e_i for the row with the largest l1 norm). ``J_s`` is the Jacobian
   of a smoothed copy of the network: every kink (ReLU, LeakyReLU, PReLU, Clip) becomes a softplus
   and max-pooling a log-sum-exp, rounded over a width that is a fraction of the spread of that
   node's input, annealed geometrically from 1 to 1e-3, because a piecewise-linear network has a
   piecewise-constant Jacobian that gives ascent no slope. Alongside, the real network is probed
   at the ascent points and at random proposals around the best point of each start (a move is
   kept when ``||J(x')^T u||``, itself a lower bound on ``||J(x')||``, beats the best so far), and
   every few steps the exact ``||J||`` of the best points is recomputed.
3. **Witness.** For the best points, in float64 on the loaded graph: the exact Jacobian, its top
   input direction v (top right singular vector; linf: the signs of the heaviest row), and pairs
   ``(x, x + t v)`` over a grid of steps t. The pair kept has the largest ratio after subtracting an
   estimate of float64 rounding (so a tiny t whose ratio is noise is never preferred), and among
   near-equal ones the longest segment. Its ratio, recomputed by plain evaluation of the loaded
   network in float64 (``lipcert.witness.recompute``), is the reported value.

The search itself runs in float32 when the network has convolutions or pooling (several times
faster on CPUs and GPUs) and in float64 otherwise; the reported value never depends on it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import progress
from ..config import Settings
from ..data import input_batch, load_npz
from ..errors import InputError
from ..graph import Activation, Affine, Graph, MaxPool
from ..graph.linear import AvgPool, CircularConv, Composed, Conv, LinearOp, MatMul
from ..result import Result
from ..witness import check_witness, recompute
from .base import register

log = logging.getLogger(__name__)

Fn = Callable[[torch.Tensor], torch.Tensor]

KINKED = ("relu", "leaky_relu", "prelu", "clip")  # activations whose kinks the search smooths
GAUSSIAN_SCALES = (0.1, 0.3, 1.0, 3.0, 10.0)
WIDTHS = (1.0, 1e-3)  # smoothing width, relative to each node's input spread: first and last step
LEARNING_RATE = 0.05  # Adam step, relative to each start's scale (decays to a tenth)
PROPOSAL_SCALES = (0.3, 1e-3)  # random proposals around the best points, relative to their scale
PROPOSALS = 3  # per start and step
REFRESH = 10  # exact Jacobians of the best points every REFRESH steps
WITNESS_CANDIDATES = 8
WITNESS_STEPS = torch.logspace(-1, -10, 19, dtype=torch.float64)  # t / (1 + max |x|)
ROUNDING = 1e3  # float64 error of f(x) - f(y) taken as ROUNDING * eps * (|f(x)| + |f(y)|)


# --- device and precision --------------------------------------------------------------------
def choose_device(requested: str) -> tuple[torch.device, list[str]]:
    """The device to search on, and a note when "cuda" was asked for but none is there."""
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda"), []
    if requested == "cuda":
        return torch.device("cpu"), ["no CUDA device is available: the search ran on the CPU"]
    return torch.device("cpu"), []


def _has_conv(graph: Graph) -> bool:
    def conv_like(lin: Any) -> bool:
        if isinstance(lin, Composed):
            return any(conv_like(op) for op in lin.ops)
        return isinstance(lin, (Conv, CircularConv, AvgPool))

    return any(isinstance(n, MaxPool) or (isinstance(n, Affine) and conv_like(n.lin)) for n in graph.nodes)


def graph_copy(graph: Graph, dtype: torch.dtype, device: torch.device) -> Graph:
    """The graph with every floating-point tensor parameter in ``dtype`` on ``device`` (a deep copy;
    the graph itself when nothing changes)."""
    if dtype == torch.float64 and device.type == "cpu":
        return graph
    g = copy.deepcopy(graph)
    seen: set[int] = set()

    def move(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for o in obj:
                move(o)
            return
        attrs = obj if isinstance(obj, dict) else getattr(obj, "__dict__", None)
        if attrs is None:
            return
        for key, value in list(attrs.items()):
            if isinstance(value, torch.Tensor):
                attrs[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            elif isinstance(value, (dict, list, tuple)) or hasattr(value, "__dict__"):
                move(value)

    for n in g.nodes:
        move(n)
    return g


# --- the network and its smoothed copies -------------------------------------------------------
def _soft_activation(node: Activation, z: torch.Tensor, width: float) -> torch.Tensor:
    """softplus rounding of the kinks over ``width`` (width * softplus(z / width) -> relu(z))."""
    sp = lambda t: width * F.softplus(t / width)  # noqa: E731
    if node.kind == "relu":
        return sp(z)
    if node.kind == "leaky_relu":
        a = float(node.params["alpha"])
        return a * z + (1 - a) * sp(z)
    if node.kind == "prelu":
        a = node.params["slope"].to(z.device, z.dtype)
        return a * z + (1 - a) * sp(z)
    if node.kind == "clip":
        lo, hi = node.params.get("min"), node.params.get("max")
        out = z
        if lo is not None:
            out = lo + sp(out - lo)
        if hi is not None:
            out = hi - sp(hi - out)
        return out
    return node.forward(z)


def _soft_maxpool(node: MaxPool, z: torch.Tensor, width: float) -> torch.Tensor:
    """Max-pooling with each window's max replaced by width * logsumexp(values / width) (2-D)."""
    if len(node.kernel) != 2:
        return node.forward(z)
    lead = z.shape[:2]
    x = node._padded(z.reshape(-1, *node.in_shape[1:]), -1e30)
    cols = F.unfold(x, node.kernel, dilation=node.dilations, stride=node.strides)
    k = int(np.prod(node.kernel))
    cols = cols.view(x.shape[0], x.shape[1], k, -1)
    y = width * (torch.logsumexp(cols / width, dim=2) - math.log(k))
    return y.reshape(*lead, *node.out_shape[1:])


def network(graph: Graph, width: float | None = None, spreads: dict[str, float] | None = None) -> Fn:
    """f as a function of a batch (B, *input_shape) -> (B, m): the real network (width None) or
    the copy whose kinks are rounded over ``width`` times the spread of each kinked node's input."""

    def f(x: torch.Tensor) -> torch.Tensor:
        values = {Graph.INPUT: x}
        for n in graph.nodes:
            args = [values[i] for i in n.inputs]
            if width is not None and isinstance(n, Activation) and n.kind in KINKED:
                values[n.name] = _soft_activation(n, args[0], width * spreads[n.name])
            elif width is not None and isinstance(n, MaxPool):
                values[n.name] = _soft_maxpool(n, args[0], width * spreads[n.name])
            else:
                values[n.name] = n.forward(*args)
        return values[graph.output].reshape(x.shape[0], -1)

    return f


def input_spreads(graph: Graph, x: torch.Tensor) -> dict[str, float]:
    """Standard deviation of the input of every activation and max-pooling node over a batch."""
    values = {Graph.INPUT: x}
    out = {}
    with torch.no_grad():
        for n in graph.nodes:
            args = [values[i] for i in n.inputs]
            if isinstance(n, (Activation, MaxPool)):
                out[n.name] = float(args[0].std().clamp_min(1e-12)) if args[0].numel() > 1 else 1.0
            values[n.name] = n.forward(*args)
    return out


# --- Jacobians -----------------------------------------------------------------------------------
def jacobian(f: Fn, x: torch.Tensor, m: int) -> torch.Tensor:
    """The Jacobian at each point, (B, m, n): m vector-Jacobian products in one backward pass."""
    b = x.shape[0]
    with torch.enable_grad():
        xr = x.detach().repeat_interleave(m, 0).requires_grad_(True)
        out = f(xr).reshape(b, m, m)
        (g,) = torch.autograd.grad(out.diagonal(dim1=1, dim2=2).sum(), xr)
    return g.reshape(b, m, -1)


def jacobian_norm(jac: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||J||, input direction v, output direction u) per point, for J of shape (B, m, n).

    l2: the top singular value, from the m x m matrix J J^T; v = J^T u / ||J^T u||.
    inf: the largest absolute row sum; v = the signs of that row, u = e_row.
    """
    if norm == "inf":
        val, idx = jac.abs().sum(2).max(1)
        row = jac[torch.arange(len(idx), device=jac.device), idx]
        return val, torch.sign(row), F.one_hot(idx, jac.shape[1]).to(jac.dtype)
    _, vecs = torch.linalg.eigh(jac @ jac.transpose(1, 2))
    u = vecs[:, :, -1]
    w = (u.unsqueeze(1) @ jac).squeeze(1)
    val = w.norm(dim=1)
    return val, w / val.clamp_min(1e-300).unsqueeze(1), u


POWER_OUTPUTS, POWER_STEPS = 64, 12  # l2 with more outputs than this: power steps, not the full J


def power_norm(f: Fn, x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """jacobian_norm for l2 by POWER_STEPS power steps on J J^T per point (three passes each)
    instead of m backward passes: ||J^T u|| <= ||J||, converging from below."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn((len(x), m), generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    u = u / u.norm(dim=1, keepdim=True)
    for _ in range(POWER_STEPS):
        _, _, u = ascent_direction(f, x, u, "2")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((f(xr) * u).sum(), xr)
    w = g.flatten(1)
    val = w.norm(dim=1)
    return val, w / val.clamp_min(1e-300).unsqueeze(1), u


def exact_norms(f: Fn, x: torch.Tensor, m: int, norm: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """jacobian_norm at every point of x, ``chunk`` points per backward pass (for l2 with more
    than POWER_OUTPUTS outputs, the power_norm estimate)."""
    def one(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return power_norm(f, xs, m) if norm == "2" and m > POWER_OUTPUTS else jacobian_norm(jacobian(f, xs, m), norm)

    parts = [one(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def probe(f: Fn, x: torch.Tensor, u: torch.Tensor, norm: str) -> torch.Tensor:
    """||J(x)^T u||_2 (l2, ||u|| = 1) or ||J(x)^T e_i||_1 (inf): a lower bound on ||J(x)|| from
    one backward pass."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad((f(x) * u).sum(), x)
    g = g.flatten(1)
    return g.norm(dim=1) if norm == "2" else g.abs().sum(1)


def ascent_direction(f: Fn, x: torch.Tensor, u: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The objective ||J(x)^T u|| per point, its gradient in x, and (l2) u after one power step on
    J J^T (through the double-backward trick: the gradient of <J^T u, w> in u is J w)."""
    x = x.detach().requires_grad_(True)
    u = u.detach().requires_grad_(norm == "2")
    with torch.enable_grad():
        (g,) = torch.autograd.grad((f(x) * u).sum(), x, create_graph=True)
        flat = g.flatten(1)
        obj = flat.norm(dim=1) if norm == "2" else flat.abs().sum(1)
        if norm == "2":
            (jw,) = torch.autograd.grad((g * g.detach()).sum(), u, retain_graph=True)
            u_next = jw / jw.norm(dim=1, keepdim=True).clamp_min(1e-300)
        else:
            u_next = u
        # a linear network's Jacobian does not depend on x: no gradient at all
        (dx,) = torch.autograd.grad(obj.sum(), x, allow_unused=True) if obj.requires_grad else (None,)
    dx = torch.zeros_like(x) if dx is None else torch.nan_to_num(dx)
    return obj.detach(), dx.detach(), u_next.detach()


# --- starting points -------------------------------------------------------------------------------
def starting_points(graph: Graph, n: int, seed: int) -> torch.Tensor:
    """n points in float64 taken in turn from: uniform in [0, 1]^n, Gaussian at GAUSSIAN_SCALES,
    and (a few) +-s times the first linear layer's top right singular vector (power method)."""
    gen = torch.Generator().manual_seed(seed)
    shape = graph.input_shape
    fams = [torch.rand((n, *shape), generator=gen, dtype=torch.float64)]
    fams += [torch.randn((n, *shape), generator=gen, dtype=torch.float64) * s for s in GAUSSIAN_SCALES]
    pts = torch.stack(fams, 1).reshape(-1, *shape)[:n]
    hint = _power_direction(graph, seed)
    if hint is not None and n >= 64:
        k = min(8, n // 16)
        scales = torch.tensor([0.5, 1.0, 3.0, 10.0] * k, dtype=torch.float64)[:k] * torch.tensor([1.0, -1.0] * k, dtype=torch.float64)[:k]
        pts[-k:] = scales.view(-1, *[1] * len(shape)) * hint
    return pts


def _power_direction(graph: Graph, seed: int) -> torch.Tensor | None:
    """The first linear layer's top right singular vector (from the power method), in input shape."""
    try:
        from .power import layer_power

        first = graph.merge_linear().nodes[0]
        if not isinstance(first, Affine) or first.inputs != [Graph.INPUT] or first.lin.in_shape != graph.input_shape:
            return None
        _, v = layer_power(first.lin, 30, seed)
        return v / v.norm().clamp_min(1e-300)
    except Exception:  # only a hint: never let it stop the search
        log.debug("no power-method direction for the lower-bound search", exc_info=True)
        return None


def _numbers_per_point(graph: Graph) -> int:
    """Numbers one forward pass holds per input point (the input and every node's output)."""
    return sum(int(np.prod(n.out_shape)) for n in graph.nodes) + graph.input_dim


def _chunk(graph: Graph, m: int, budget: int = 20_000_000) -> int:
    """Points per full-Jacobian pass so that the activations stay within ``budget`` numbers."""
    return max(1, budget // max(_numbers_per_point(graph) * m, 1))


DENSE_STEPS, CONV_STEPS = 200, 50
DEFAULT_STARTS = 64
# Work of one default search, in floating-point operations: about 20 s of float32 convolutions
# on 2 CPU cores (measured: 5-15 GFLOP/s through the smoothed network's double backward); a GPU
# gets about 70x more. Larger networks get fewer starts, proposals and steps (never below
# MIN_STARTS and MIN_STEPS); --starts and --steps override it.
SEARCH_FLOPS = {"cpu": 3e11, "cuda": 2e13}
MIN_STARTS, MIN_STEPS = 2, 8


def _op_flops(op: LinearOp) -> float:
    """Multiply-adds x 2 of one linear map on one point (data movement counted as one per number)."""
    if isinstance(op, Conv):
        ci = op.weight.shape[1] if not op.transposed else op.weight.shape[0] // op.groups
        taps = int(np.prod(op.weight.shape[2:]))
        return 2.0 * float(np.prod(op.out_shape if not op.transposed else op.in_shape)) * ci * taps
    if isinstance(op, MatMul):
        return 2.0 * float(np.prod(op.out_shape)) * op.weight.shape[1]
    if isinstance(op, CircularConv):
        return _op_flops(op.pad) + _op_flops(op.conv)
    parts = getattr(op, "ops", None)
    if parts:
        return sum(_op_flops(p) for p in parts)
    return float(op.in_dim + op.out_dim)


def forward_flops(graph: Graph) -> float:
    """Floating-point operations of one forward pass of one point (linear maps dominate)."""
    return sum(_op_flops(n.lin) if isinstance(n, Affine) else float(np.prod(n.out_shape)) for n in graph.nodes)


def jacobian_flops(graph: Graph, norm: str) -> float:
    """Operations of one point's exact_norms: a forward and m backward passes (a backward pass
    costing about two forward ones), or the power steps."""
    f, m = forward_flops(graph), max(graph.output_dim, 1)
    if norm == "2" and m > POWER_OUTPUTS:
        return f * 3 * (POWER_STEPS + 1)
    return f * (1 + 2 * m)


def search_work(graph: Graph, norm: str, starts: int, steps: int, proposals: int, screen: int | None = None) -> float:
    """Operations of a search: screening and refreshes take exact Jacobians (a forward pass and
    m backward ones, a backward pass costing about two forward ones); every ascent step a smoothed
    forward-backward pass with a power step, and a forward-backward probe per proposal."""
    f, m = forward_flops(graph), max(graph.output_dim, 1)
    jac = jacobian_flops(graph, norm)
    screen = (_screen_size(graph, m, starts) if screen is None else screen) * jac
    ascent = steps * starts * 3 * f * (1 + proposals + 1)
    refresh = -(-steps // REFRESH) * 2 * starts * jac
    return screen + ascent + refresh


def plan_search(graph: Graph, settings: Settings, device: torch.device) -> tuple[int, int, int, int, str | None]:
    """(starts, steps, proposals, screened points, note): what the user asked for; by default 64
    starts and resolve_steps() steps, shrunk until the search fits SEARCH_FLOPS (screening to a
    third of it and one proposal first, then starts and steps together), with a note saying so."""
    m = max(graph.output_dim, 1)
    starts = settings.starts if settings.starts is not None else DEFAULT_STARTS
    steps, proposals = resolve_steps(graph, settings.steps), PROPOSALS
    screen = _screen_size(graph, m, starts)
    budget = SEARCH_FLOPS["cuda" if device.type == "cuda" else "cpu"]
    if settings.starts is not None or search_work(graph, settings.norm, starts, steps, proposals, screen) <= budget:
        return starts, steps, proposals, screen, None
    proposals = 1
    jacobian = jacobian_flops(graph, settings.norm)
    while True:
        screen = max(starts, min(_screen_size(graph, m, starts), int(budget / 3 / jacobian)))
        if search_work(graph, settings.norm, starts, steps, proposals, screen) <= budget:
            break
        if starts <= MIN_STARTS and (settings.steps is not None or steps <= MIN_STEPS):
            break
        starts = max(MIN_STARTS, starts // 2)
        if settings.steps is None:
            steps = max(MIN_STEPS, int(steps * 0.75))
    work = search_work(graph, settings.norm, starts, steps, proposals, screen)
    note = (f"the network is large for a full default search: {screen} points screened, {starts} starts, {steps} steps, "
            f"{proposals} proposal per step (about {work:.1e} operations); give --starts and --steps for a longer search")
    return starts, steps, proposals, screen, note


def resolve_steps(graph: Graph, steps: int | None) -> int:
    """Ascent steps: as given, or by default 200 for dense networks (cheap per step, and deep ReLU
    MLPs keep climbing: 119 -> 236 on mnist-net_256x6 from 50 to 200 steps) and 50 with
    convolutions or pooling."""
    if steps is not None:
        return steps
    return CONV_STEPS if _has_conv(graph) else DENSE_STEPS


def _screen_size(graph: Graph, m: int, starts: int, budget: float = 2e8) -> int:
    """Points to screen: 16 per start (4 for large inputs), and more while a full Jacobian is
    cheap (at most 4096), because ||J(x)|| of a deep ReLU net is heavy-tailed over random x."""
    per_point = _numbers_per_point(graph) * max(m, 1)
    base = (16 if graph.input_dim <= 64 else 4) * starts
    return int(max(base, min(4096, budget // per_point)))


# --- the search --------------------------------------------------------------------------------------
def search(graph: Graph, settings: Settings, data: np.ndarray | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Screen, climb, and return the best witness (x, y, t, value) and details of the run."""
    norm, m, shape = settings.norm, graph.output_dim, graph.input_shape
    if norm not in ("2", "inf"):
        raise InputError("the lower-bound search supports --norm 2 and inf", graph.source)
    device, notes = choose_device(settings.device)
    dtype = torch.float32 if _has_conv(graph) else torch.float64
    g = graph_copy(graph, dtype, device)
    real = network(g)
    chunk = _chunk(graph, m)
    starts, steps, proposals, n_screen, sized = plan_search(graph, settings, device)
    if sized:
        notes.append(sized)
    timer = {"start": time.perf_counter()}
    deadline = settings.extra.get("deadline")
    stop = False

    # 1. screening
    pool = starting_points(graph, n_screen, settings.seed).to(device, dtype)
    vals, _, us = exact_norms(real, pool, m, norm, chunk)
    order = torch.argsort(vals, descending=True)
    if data is not None:  # half the starts from the user's data, the best of them by ||J||
        d = torch.as_tensor(np.asarray(data, np.float64).reshape(-1, *shape)).to(device, dtype)
        dvals, _, dus = exact_norms(real, d, m, norm, chunk)
        dorder = torch.argsort(dvals, descending=True)[: max(1, starts // 2)]
        take = order[: starts - len(dorder)]
        x = torch.cat([d[dorder], pool[take]])
        best_val, best_u = torch.cat([dvals[dorder], vals[take]]), torch.cat([dus[dorder], us[take]])
    else:
        take = order[:starts]
        x, best_val, best_u = pool[take].clone(), vals[take].clone(), us[take].clone()
    screened = float(best_val.max())
    spreads = input_spreads(g, torch.cat([x, pool[: 256]]))
    timer["screen"] = time.perf_counter()

    # 2. ascent on the smoothed network, with proposals checked on the real one
    b = len(x)
    best_x, u = x.clone(), best_u.clone()
    scale = x.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-2).view(-1, *[1] * len(shape))
    mom, sq = torch.zeros_like(x), torch.zeros_like(x)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    probes = 0
    with progress.bar("lower-bound search", steps) as bar:
        for k in range(steps):
            frac = k / max(steps - 1, 1)
            width = WIDTHS[0] * (WIDTHS[1] / WIDTHS[0]) ** frac
            _, grad, u = ascent_direction(network(g, width, spreads), x, u, norm)
            mom = 0.9 * mom + 0.1 * grad
            sq = 0.999 * sq + 0.001 * grad * grad
            adam = (mom / (1 - 0.9 ** (k + 1))) / ((sq / (1 - 0.999 ** (k + 1))).sqrt() + 1e-12)
            x = (x + LEARNING_RATE * (1 - 0.9 * frac) * scale * adam).detach()
            sigma = PROPOSAL_SCALES[0] * (PROPOSAL_SCALES[1] / PROPOSAL_SCALES[0]) ** frac
            noise = torch.randn((proposals, *x.shape), generator=gen, dtype=torch.float64).to(device, dtype)
            cand = torch.cat([x.unsqueeze(0), best_x.unsqueeze(0) + sigma * scale * noise])
            cu = torch.cat([u.unsqueeze(0), best_u.unsqueeze(0).expand(proposals, *best_u.shape)])
            est = probe(real, cand.reshape(-1, *shape), cu.reshape(-1, m), norm).view(proposals + 1, b)
            probes += est.numel()
            top, idx = est.max(0)
            better = top > best_val
            if bool(better.any()):
                pick = cand[idx, torch.arange(b, device=device)]
                best_x[better], best_val[better] = pick[better], top[better]
            # past the budget's deadline (settings.extra, set under --budget): refresh and stop here
            stop = deadline is not None and k < steps - 1 and time.perf_counter() > deadline
            if k % REFRESH == REFRESH - 1 or k == steps - 1 or stop:
                both = torch.cat([best_x, x])
                v_all, _, u_all = exact_norms(real, both, m, norm, chunk)
                probes += len(both)
                best_val, best_u = torch.maximum(best_val, v_all[:b]), u_all[:b]
                if norm == "inf":  # the explorer follows its own heaviest row
                    u = u_all[b:]
                better = v_all[b:] > best_val
                best_x[better], best_val[better], best_u[better] = x[better], v_all[b:][better], u_all[b:][better]
            bar.update(k + 1)
            if stop:
                notes.append(f"the search stopped at the budget's deadline after {k + 1} of {steps} ascent steps")
                break
    timer["ascent"] = time.perf_counter()

    # 3. witnesses, in float64 on the loaded graph
    g64 = graph_copy(graph, torch.float64, device)
    cand_x = best_x.to(torch.float64)
    if sized is not None:  # a large network: float64 Jacobians of the most promising points only
        cand_x = cand_x[torch.argsort(best_val, descending=True)[:WITNESS_CANDIDATES]]
    vals64, dirs64, _ = exact_norms(network(g64), cand_x, m, norm, chunk)
    best: dict[str, Any] | None = None
    n_witness = WITNESS_CANDIDATES if sized is None else 2  # each costs 38 float64 forward passes
    for i in torch.argsort(vals64, descending=True)[:n_witness].tolist():
        w = witness_pair(graph, cand_x[i].cpu(), dirs64[i].reshape(shape).cpu(), norm, WITNESS_STEPS if sized is None else WITNESS_STEPS[::2])
        w["jacobian_norm"] = float(vals64[i])
        if best is None or w["score"] > best["score"]:
            best = w
    assert best is not None
    timer["witness"] = time.perf_counter()
    evaluations = n_screen + (0 if data is None else len(data)) + probes + steps * b
    details = {
        "best_after_screening": screened,
        "best_jacobian_norm": float(vals64.max()),
        "screened_points": n_screen,
        "jacobian_evaluations": evaluations,
        "points_per_s": evaluations / max(timer["ascent"] - timer["start"], 1e-9),
        "time_screen_s": timer["screen"] - timer["start"],
        "time_ascent_s": timer["ascent"] - timer["screen"],
        "time_witness_s": timer["witness"] - timer["ascent"],
        "device": str(device),
        "starts": starts,
        "steps": steps,
        "proposals": proposals,
        "search_dtype": str(dtype).removeprefix("torch."),
        "stopped_at_deadline": stop,
        "notes": notes,
    }
    return best, details


def witness_pair(graph: Graph, x: torch.Tensor, v: torch.Tensor, norm: str, steps: torch.Tensor = WITNESS_STEPS) -> dict[str, Any]:
    """The best pair (x, x + t v) or (x - t v, x) over the grid of steps t, recomputed in float64.

    Each pair's ratio r is scored as r minus an estimate of its float64 rounding error, so that a
    tiny t never wins by noise; among pairs within 1e-7 of the best score, the longest is kept
    (robust to rounding, and checkable in lower precision)."""
    order = 2 if norm == "2" else math.inf
    if not bool(v.any()) or not bool(torch.isfinite(v).all()):
        # no direction of stretch (a zero Jacobian: a network that ignores its input): any two
        # distinct inputs witness the honest lower bound, 0 for a constant network
        v = torch.zeros_like(v)
        v.view(-1)[0] = 1.0
    if norm == "2":
        v = v / v.norm().clamp_min(1e-300)
    t = (steps * (1.0 + float(x.abs().max()))).view(-1, *[1] * x.dim())
    lo = torch.cat([x.expand_as(t * v), x - t * v])
    hi = torch.cat([x + t * v, x.expand_as(t * v)])
    with torch.no_grad():
        f_lo, f_hi = graph.forward(lo), graph.forward(hi)
    num = torch.linalg.vector_norm((f_hi - f_lo).flatten(1), order, dim=1)
    den = torch.linalg.vector_norm((hi - lo).flatten(1), order, dim=1)
    size = torch.linalg.vector_norm(f_lo.flatten(1), order, dim=1) + torch.linalg.vector_norm(f_hi.flatten(1), order, dim=1)
    valid = den > 0
    r = torch.where(valid, num / den.clamp_min(1e-300), torch.zeros_like(num))
    score = r - ROUNDING * torch.finfo(torch.float64).eps * size / den.clamp_min(1e-300)
    score = torch.where(valid, score, torch.full_like(score, -math.inf))
    top = float(score.max())
    near = torch.nonzero(score >= top - 1e-7 * abs(top)).flatten()
    j = int(near[torch.argmax(den[near])])
    witness = {"x": lo[j].numpy(), "y": hi[j].numpy()}
    value = recompute(graph, witness, norm)
    return {**witness, "value": value, "score": top, "t": float(den[j])}


# --- public API and registry -----------------------------------------------------------------------
def lower_bound(model: Any, norm: Any = 2, starts: int | None = None, steps: int | None = None, seed: int = 0, device: str = "cpu",
                data: np.ndarray | str | Path | None = None, input_shape: tuple[int, ...] | None = None) -> Result:
    """A witnessed lower bound on the Lipschitz constant of ``model``.

    Args:
        model: path to an .onnx file, onnx.ModelProto, torch.nn.Module (with ``input_shape``) or Graph.
        norm: 2 or "inf" (the same vector norm on input and output).
        starts: points improved at once (4x as many, 16x for inputs of at most 64 numbers, are
            screened first); steps: ascent steps. None: 64 starts and 200 steps for dense networks,
            50 with convolutions or pooling, fewer of both for networks too large to search that
            long in about 20 s of CPU (the result's warnings say so); seed: random seed (results
            are reproducible).
        device: "cpu", "cuda" (falls back to the CPU with a warning) or "auto".
        data: inputs to start from as well (an array in the input's shape, or an .npz file with ``x``).
        input_shape: the input shape, batch axis included, for torch modules or dynamic ONNX shapes.

    Returns:
        A Result of kind "lower" whose value is ||f(x) - f(y)|| / ||x - y|| for the witness pair
        in ``result.witness`` (``x``, ``y`` in the input's shape), recomputed in float64.

    Example:
        >>> import lipcert
        >>> r = lipcert.lower_bound("models/mlp_spiral.onnx", norm=2)   # doctest: +SKIP
        >>> r.value, r.witness["x"], r.witness["y"]                     # doctest: +SKIP
    """
    from ..config import check_choice, check_range, normalize_norm
    from ..load import load

    for name, value, low in (("starts", starts, 1), ("steps", steps, 0), ("seed", seed, 0)):
        if value is not None or name == "seed":
            check_range("lower_bound", name, value, low)
    check_choice("lower_bound", "device", device, ("cpu", "cuda", "auto"))
    norm = normalize_norm(norm, "lower_bound")
    check_choice("lower_bound", "norm", norm, ("2", "inf"))  # the search's own refusal names the CLI's --norm
    s = Settings(norm=norm, starts=starts, steps=steps, seed=seed, device=device)
    graph = load(model, input_shape)  # a Graph comes back as is
    if isinstance(data, (str, Path)):
        data = load_npz(data, labels=False)[0]
    return LowerSearch().run(graph, s, data)


@register
class LowerSearch:
    name = "lower"
    kind = "lower"
    description = "adversarial Jacobian search (screening, smoothed ascent with power steps on J J^T, real-network proposals); witnessed lower bound"

    def accepts(self, graph: Graph, settings: Settings) -> str | None:
        return None if settings.norm in ("2", "inf") else "the lower-bound search supports l2 and linf"

    def run(self, graph: Graph, settings: Settings, data: np.ndarray | None = None) -> Result:
        start = time.perf_counter()
        if data is not None:
            data = input_batch(graph, data)
        best, details = search(graph, settings, data)
        witness = {"x": best["x"].tolist(), "y": best["y"].tolist(), "t": best["t"], "direction_norm": 1.0, "norm": settings.norm}
        value = check_witness(graph, witness, best["value"], settings.norm)
        details["jacobian_norm_at_witness"] = best["jacobian_norm"]
        notes = details.pop("notes")  # the Result's warnings: printed once, as the table's notes
        return Result(
            method=self.name, kind="lower", norm=settings.norm, value=value, certified=False,
            time_s=time.perf_counter() - start,
            settings={"starts": details["starts"], "steps": details["steps"], "seed": settings.seed, "device": settings.device,
                      "data": data is not None, "search_dtype": details["search_dtype"],
                      "smoothing": f"softplus / log-sum-exp over {WIDTHS[0]:g} -> {WIDTHS[1]:g} x each node's input spread, geometric",
                      "proposals": details["proposals"], "learning_rate": LEARNING_RATE},
            warnings=list(notes), model=graph.source, sha256=graph.sha256, witness=witness, details=details,
        )
