"""The lipcert command line: bound, info, ops, methods."""

from __future__ import annotations

import functools
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from . import progress
from .budget import CERTIFY_BUDGET_S
from .config import NORMS, Settings
from .errors import LipcertError
from .result import Result, best_proven


def _parse_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
        if not shape or any(n <= 0 for n in shape):
            raise ValueError
        return shape
    except ValueError:
        raise click.BadParameter(f"expected positive integers separated by commas, like 1,3,32,32; got {value!r}") from None


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and inf. click's FloatRange lets nan through (every
    comparison with nan is False), and nan would reach the output as a number."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def _describe_range(self) -> str:  # click's hook for the help text: nothing to say when unbounded
        return "" if self.min is None and self.max is None else super()._describe_range()


def model_options(fn: Callable) -> Callable:
    """MODEL argument plus --input-shape."""
    fn = click.option("--input-shape", callback=_parse_shape, metavar="N,C,H,W", help="Input shape with the batch axis, when the model does not fix it.")(fn)
    return click.argument("model", type=click.Path(dir_okay=False))(fn)


def output_options(fn: Callable) -> Callable:
    """--json and --quiet, shared by every command that prints results."""
    fn = click.option("--quiet", "-q", is_flag=True, help="No progress or notes on stderr.")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of a table.")(fn)


def budget_option(default: float | None, extra: str = "") -> Callable:
    """--budget SECONDS: the time the command may take (0: no limit)."""
    shown = f"  [default: {default:g}]" if default else ""
    return click.option("--budget", type=FiniteFloat(min=0), default=default, metavar="SECONDS",
                        help=f"Time allowed in all; slow methods (LipSDP) stop at it with a proven, looser bound, and the output "
                             f"says what was cut; LipSDP is skipped where it cannot beat a bound already proven. 0: no limit.{extra}{shown}")


def jobs_option(fn: Callable) -> Callable:
    """--jobs N: pairwise LipSDP problems solved at once, one worker process each."""
    return click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Pairwise LipSDP problems solved at once, one process each (1: in this process).  "
                             "[default: one per core when a pair takes seconds, else 1]")(fn)


def _budget_lines(budget: Any) -> list[str]:
    """What the budget cut and how to get more, for the table output (empty when nothing was cut)."""
    if budget is None or not budget.cut:
        return []
    return [f"budget: {'; '.join(budget.cut)}.", f"budget: {budget.advice()}."]


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def echo_json(obj: Any) -> None:
    """Strict JSON on stdout: a non-finite number (the infinite radius of a point whose margins do
    not depend on the input) is written as null; json.dumps would write Infinity, which JSON
    parsers other than Python's refuse."""
    click.echo(json.dumps(_finite_or_none(obj), allow_nan=False))


def _budget_json(budget: Any) -> dict[str, Any]:
    return {"seconds": budget.seconds, "elapsed_s": round(budget.elapsed(), 2), "cut": list(budget.cut),
            "advice": budget.advice() if budget.cut else None}


def friendly_errors(fn: Callable) -> Callable:
    """Turn lipcert's errors into one message on stderr and exit code 1 (never a traceback); with
    --json, stdout also gets one JSON object, {"error": {"type", "what", "where", "hint"}}."""

    def fail(kind: str, what: str, where: str | None, hint: str | None, message: str, as_json: bool) -> None:
        if as_json:
            echo_json({"error": {"type": kind, "what": what, "where": where, "hint": hint}})
        click.echo(f"Error: {message}", err=True)
        sys.exit(1)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except LipcertError as exc:
            fail(type(exc).__name__, exc.what, exc.where, exc.hint, exc.message(), as_json)
        except MemoryError:
            hint = "use a method that needs less memory (e.g. --method naive) or a smaller model"
            fail("MemoryError", "out of memory", None, hint, f"out of memory. What to do: {hint}.", as_json)

    return wrapper


def _load(model: str, input_shape: tuple[int, ...] | None):
    from .load import load

    progress.note(f"loading {model} ...")
    return load(model, input_shape)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_results(results: list[Result], layers: bool = False, best: str | None = None) -> str:
    rows = []
    for r in results:
        value = "failed" if r.value is None else f"{r.value:.6g}"
        proof = "proven" if r.certified else ("witnessed" if r.kind == "lower" and r.value is not None else "no")
        if r.method == best:
            proof += " (best)"
        rows.append([r.method, r.kind, f"l{r.norm}", value, proof, f"{r.time_s:.2f}s", r.status])
    out = _table(rows, ["method", "kind", "norm", "value", "certified", "time", "status"])
    for r in results:
        if layers and r.layers:
            lrows = [
                [layer.name, layer.op[:40], f"{layer.value:.6g}", "exact" if layer.exact else ("estimate" if r.kind == "estimate" else "bound"), layer.how,
                 "" if layer.cumulative is None else f"{layer.cumulative:.6g}"]
                for layer in r.layers
            ]
            out += f"\n\nper-layer norms ({r.method}, l{r.norm}):\n" + _table(lrows, ["node", "op", "norm", "exact?", "how", "bound so far"])
        for w in r.warnings:
            out += f"\nnote ({r.method}): {w}"
    return out


class _Lipcert(click.Group):
    """With --json, a bad flag also gets one JSON error object on stdout (click prints its usage
    message on stderr and exits 2, as without --json), so that a script parsing stdout sees why."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["json"] = "--json" in args
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if ctx.meta.get("json"):
                echo_json({"error": {"type": "UsageError", "what": exc.format_message(), "where": None,
                                     "hint": "see the command's --help"}})
            raise


@click.group(cls=_Lipcert, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lipcert")
def main() -> None:
    """lipcert: proven bounds on the Lipschitz constant of a neural network.

    \b
    Typical use:
      lipcert info models/mlp_spiral.onnx          what lipcert sees in the model
      lipcert bound models/mlp_spiral.onnx         a proven l2 upper bound
      lipcert bound model.onnx --norm inf --json   the linf bound, as JSON
      lipcert bound model.onnx --method all        every method, best proven bound marked
      lipcert lower model.onnx                     a witnessed lower bound (two inputs)
      lipcert certify model.onnx --data test.npz   certified radii and accuracy
      lipcert report model.onnx -o report.html     everything, as one HTML file
      lipcert ops                                  the ONNX ops lipcert can bound
    """


class _LazyChoice(click.Choice):
    """A click.Choice whose choices are computed on first use: the method registry imports
    torch, which `lipcert --help` should not wait for."""

    def __init__(self, load: Callable[[], list[str]]) -> None:
        self._load, self._choices = load, None
        self.case_sensitive = True

    @property
    def choices(self):  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices

    @choices.setter
    def choices(self, value) -> None:
        self._choices = tuple(value)


def _method_names() -> list[str]:
    from .estimators import ESTIMATORS

    return [*ESTIMATORS, "all"]


@main.command()
@model_options
@click.option("--method", "-m", type=_LazyChoice(_method_names), default="naive", show_default=True, help="How to bound: see `lipcert methods`. 'all' runs every method that applies.")
@click.option("--norm", "-p", type=click.Choice(list(NORMS)), default="2", show_default=True, help="Vector norm on input and output.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (iterative methods).")
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True, help="Iterations of power / Gram iteration.")
@click.option("--solver", default=None, help="Solver for --method sdp: a cvxpy solver name (see `lipcert methods`) or lipcert-fast; default: lipcert-fast, else the fastest installed (SDPA, CVXOPT, CLARABEL, SCS).")
@click.option("--sdp-variant", type=click.Choice(["neuron", "layer"]), default="neuron", show_default=True, help="LipSDP multipliers: one per neuron or one per layer.")
@click.option("--time-limit", type=FiniteFloat(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Stop lipcert-fast after this long per LipSDP section; its multipliers so far are still verified, so the bound stays proven (only looser). Default: none.")
@click.option("--layers", is_flag=True, help="Also print the per-layer norms and their running product.")
@budget_option(None, " Default: 120 with --method all, no limit for one method.")
@click.option("--center", type=click.Path(dir_okay=False), default=None, help="Local bound: an .npz file whose array x holds the centre of the region (row --index).")
@click.option("--radius", type=FiniteFloat(min=0), default=None, help="Local bound: the radius of the --norm ball around --center.")
@click.option("--box", type=(click.Path(dir_okay=False), click.Path(dir_okay=False)), default=None, metavar="LO.npz HI.npz", help="Local bound over the box [lo, hi] (arrays x in two .npz files).")
@click.option("--index", type=click.IntRange(min=0), default=0, show_default=True, help="Which row of the --center / --box arrays.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True, help="Where naive, gram, power and lower run their tensors; cuda falls back to the CPU with a note.")
@output_options
@friendly_errors
def bound(model: str, input_shape, method: str, norm: str, seed: int, iterations: int, solver: str | None, sdp_variant: str, time_limit: float | None, layers: bool,
          budget: float | None, center: str | None, radius: float | None, box: tuple[str, str] | None, index: int, device: str, as_json: bool, quiet: bool) -> None:
    """Bound the Lipschitz constant of MODEL (an .onnx file).

    A value marked 'proven' is a mathematical upper bound on the Lipschitz constant
    (||f(x) - f(y)|| <= value * ||x - y|| for all x, y); an 'estimate' is not.

    \b
    Examples:
      lipcert bound models/mlp_spiral.onnx
      lipcert bound models/cnn_bars.onnx --norm inf --layers
      lipcert bound model.onnx --method all --json
      lipcert bound model.onnx --method sdp --time-limit 60
      lipcert bound model.onnx --center x.npz --radius 0.05     over a ball only
    """
    from .budget import DEFAULT_BUDGET_S, Budget, settings_with_deadline
    from .estimators import cut_note, estimate, estimate_all, was_cut

    progress.set_quiet(quiet or as_json)
    allowance = Budget(budget if budget is not None else (DEFAULT_BUDGET_S if method == "all" else None))
    graph = _load(model, input_shape)
    if center is not None or radius is not None or box is not None:  # local constants (lipcert/local.py)
        _local_bound(model, graph, method, norm, center, radius, box, index, as_json)
        return
    ignored = [flag for flag, given in (("--solver", solver is not None), ("--time-limit", time_limit is not None),
                                        ("--sdp-variant", sdp_variant != "neuron")) if given]
    if ignored and method not in ("sdp", "all"):
        progress.note(f"{' and '.join(ignored)} only apply to LipSDP (--method sdp or all): ignored for --method {method}")
    settings = Settings(norm=norm, seed=seed, iterations=iterations, solver=solver, sdp_variant=sdp_variant, device=device,
                        extra={"fast_time_limit": time_limit} if time_limit else {})
    if method == "all":
        results, skipped = estimate_all(graph, settings, progress.note, allowance)
    else:
        progress.note(f"running {method} ...")
        one = settings_with_deadline(settings, allowance.deadline(), allowance.seconds)
        results, skipped = [estimate(graph, method, one)], {}
        if allowance.limited and was_cut(results[0]):
            allowance.note_cut(cut_note(results[0]))
    best = getattr(best_proven(results), "method", None)
    if as_json:
        rows = [{**r.to_dict(), "best": r.method == best} for r in results]
        echo_json({"model": model, "sha256": graph.sha256, "best_upper": best, "results": rows, "skipped": skipped,
                   "budget": _budget_json(allowance)})
    else:
        out = format_results(results, layers=layers, best=best if len(results) > 1 else None)
        for name, reason in skipped.items():
            out += f"\nskipped {name}: {reason}"
        click.echo("\n".join([out, *_budget_lines(allowance)]))
    if method != "all" and results[0].value is None:
        click.echo(f"Error: {method} gave no bound: {results[0].status}. What to do: try another --solver or --method naive.", err=True)
        sys.exit(1)


def _row(path: str, index: int, graph: Any) -> np.ndarray:
    from .data import input_batch, load_npz
    from .errors import InputError

    x, _ = load_npz(path, labels=False)
    rows = input_batch(graph, x)
    if index >= len(rows):
        raise InputError(f"--index {index} is out of range: {path} holds {len(rows)} input(s)", path, f"give --index between 0 and {len(rows) - 1}")
    return rows[index]


def _local_bound(model: str, graph: Any, method: str, norm: str, center: str | None, radius: float | None, box: tuple[str, str] | None,
                 index: int, as_json: bool) -> None:
    from .errors import InputError
    from .local import LOCAL_METHODS, local_bound

    if box is not None and (center is not None or radius is not None):
        raise InputError("give either --center with --radius, or --box, not both", None, "choose one region")
    if box is None and (center is None or radius is None):
        raise InputError("a local bound needs both --center and --radius", None, "e.g. --center x.npz --radius 0.05")
    names = [m for m in LOCAL_METHODS if m != "sdp" or norm == "2"] if method == "all" else [method]
    if names[0] not in LOCAL_METHODS:
        raise InputError(f"--method {method} has no local version", None, f"choose one of: {', '.join(LOCAL_METHODS)}, all")
    kw = {"box": (_row(box[0], index, graph), _row(box[1], index, graph))} if box else {"center": _row(center, index, graph), "radius": radius}
    progress.note(f"local bound over the {'box' if box else f'l{norm} ball of radius {radius:g}'} ...")
    results = [local_bound(graph, norm=norm, method=m, **kw) for m in names]
    region = results[0].details["region"]
    if as_json:
        echo_json({"model": model, "sha256": graph.sha256, "region": region, "results": [r.to_dict() for r in results]})
        return
    click.echo(format_results(results))
    where = f"box ({box[0]}, {box[1]})" if box else f"l{norm} ball of radius {radius:g} around {center}"
    for r in results:
        click.echo(f"region: {where}[{index}]; {r.method}: {r.details['how']}; unstable neurons per layer: {r.details['unstable_neurons']} of {r.details['neurons']}")


@main.command()
@model_options
@output_options
@friendly_errors
def info(model: str, input_shape, as_json: bool, quiet: bool) -> None:
    """Show the layer graph lipcert builds from MODEL: nodes, shapes, slopes."""
    progress.set_quiet(quiet or as_json)
    graph = _load(model, input_shape)
    rows = graph.summary()
    if as_json:
        echo_json({"model": model, "sha256": graph.sha256, "input_shape": list(graph.input_shape), "output_shape": list(graph.output_shape), "nodes": rows})
        return
    click.echo(f"model:  {model}\nsha256: {graph.sha256}\ninput:  {list(graph.input_shape)}  output: {list(graph.output_shape)}\nnodes:  {len(rows)}\n")
    click.echo(_table([[r["name"], r["op"], r["type"], ",".join(r["inputs"]), "x".join(map(str, r["out_shape"])), r["detail"]] for r in rows], ["node", "op", "type", "inputs", "output", "detail"]))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def ops(as_json: bool) -> None:
    """List the ONNX ops lipcert can load and bound."""
    from .catalog import OPS  # a copy of the converter registry: no onnx or torch import

    if as_json:
        echo_json(list(OPS))
    else:
        click.echo("\n".join(OPS))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def methods(as_json: bool) -> None:
    """List the bounding methods (in order of preference) and the SDP solvers for --method sdp."""
    from .catalog import METHODS, sdp_solvers  # copies of the registries: no torch or cvxpy import

    solvers = sdp_solvers()
    if as_json:
        echo_json({"methods": METHODS, "sdp_solvers": ["lipcert-fast", *solvers]})
        return
    for name, text in METHODS.items():
        click.echo(f"{name:<10} {text}")
    click.echo(f"\nSDP solvers (--solver): lipcert-fast (built in, the default){''.join(', ' + s for s in solvers)}")


@main.command()
@model_options
@click.option("--norm", "-p", type=click.Choice(["2", "inf"]), default="2", show_default=True, help="Vector norm on input and output.")
@click.option("--starts", type=click.IntRange(min=1), default=None, help="Points improved at once (4-16x as many are screened first)  [default: 64, fewer for networks too large to search in about half a minute]")
@click.option("--steps", type=click.IntRange(min=0), default=None, help="Ascent steps per point  [default: 200 for dense networks, 50 with convolutions or pooling]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True, help="Where the search runs; cuda falls back to the CPU with a warning.")
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="An .npz file whose array x holds inputs to start from.")
@output_options
@friendly_errors
def lower(model: str, input_shape, norm: str, starts: int | None, steps: int | None, seed: int, device: str, data: str | None, as_json: bool, quiet: bool) -> None:
    """A witnessed lower bound on the Lipschitz constant of MODEL.

    Searches for inputs x, y where the network stretches most; the value printed is
    ||f(x) - f(y)|| / ||x - y|| for the pair found (the witness, in the JSON output),
    recomputed by evaluating the network in float64.

    \b
    Examples:
      lipcert lower models/mlp_spiral.onnx
      lipcert lower models/cnn_bars.onnx --data models/bars_test.npz --json
    """
    from .estimators.lower import lower_bound

    progress.set_quiet(quiet or as_json)
    graph = _load(model, input_shape)
    result = lower_bound(graph, norm=norm, starts=starts, steps=steps, seed=seed, device=device, data=data)
    if as_json:
        echo_json({"model": model, "sha256": graph.sha256, "results": [result.to_dict()]})
    else:
        click.echo(format_results([result]))
        click.echo(f"witness: x = {np.round(np.asarray(result.witness['x']).ravel()[:6], 6).tolist()}{' ...' if graph.input_dim > 6 else ''}, y = x + {result.witness['t']:.3g} v")


def _eps_list(ctx: click.Context, param: click.Parameter, value: tuple[float, ...]) -> list[float]:
    if any(e < 0 for e in value):
        raise click.BadParameter("radii must be >= 0")
    return sorted(value)


@main.command()
@model_options
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="An .npz file with inputs x and integer labels y.")
@click.option("--eps", multiple=True, type=FiniteFloat(), callback=_eps_list, default=(), help="Radius at which to report certified accuracy (repeatable).")
@click.option("--norm", "-p", type=click.Choice(list(NORMS)), default="2", show_default=True, help="Norm of the perturbation.")
@click.option("--method", type=click.Choice(["sdp", "naive"]), default="sdp", show_default=True, help="How the pairwise margin constants are bounded (sdp: LipSDP for l2 where it applies).")
@click.option("--pairs", type=click.Choice(["binding", "all"]), default="binding", show_default=True,
              help="With --method sdp: tighten by LipSDP only the class pairs that decide some point's radius, as far as needed (radii at least 96% of those of optimal pair bounds), or every pair.")
@budget_option(CERTIFY_BUDGET_S, " The default holds one LipSDP solve per class pair of an MNIST MLP of 4 x 256 neurons on 2 cores.")
@jobs_option
@click.option("--local", "local", is_flag=True, help="Also certify each point with local constants over the ball B(x, r) itself (dense chains; larger radii).")
@output_options
@friendly_errors
def certify(model: str, input_shape, data: str, eps: list[float], norm: str, method: str, pairs: str, budget: float, jobs: int | None, local: bool, as_json: bool, quiet: bool) -> None:
    """Certified radii and certified accuracy of MODEL on a data set.

    A point is certified at radius eps when it is classified correctly and no perturbation of
    norm <= eps can change its class, as proven by the margin divided by a proven Lipschitz
    bound of each logit difference.

    \b
    Examples:
      lipcert certify models/mlp_spiral.onnx --data models/spiral_test.npz --eps 0.01 --eps 0.02
      lipcert certify models/cnn_bars.onnx --data models/bars_test.npz --norm inf --method naive --json
      lipcert certify model.onnx --data test.npz --local
    """
    from .budget import Budget
    from .certify import certify as run_certify, load_dataset

    progress.set_quiet(quiet or as_json)
    allowance = Budget(budget)
    graph = _load(model, input_shape)
    x, y = load_dataset(data)
    if method != "sdp" and (pairs != "binding" or jobs is not None):
        progress.note(f"{'--pairs' if pairs != 'binding' else '--jobs'} only applies to pairwise LipSDP (--method sdp): ignored for --method {method}")
    progress.note("computing the pairwise margin constants" + (f" (budget {budget:g} s) ..." if allowance.limited else " ..."))
    out = run_certify(graph, x, y, eps, norm=norm, method=method, budget=allowance, pairs=pairs, local=local, jobs=jobs)
    if as_json:
        echo_json({"model": model, "sha256": graph.sha256, "data": data, **out, "budget": _budget_json(allowance)})
        return
    radii = np.array([p["radius"] for p in out["points"]])
    click.echo(f"{len(radii)} points, clean accuracy {out['clean_accuracy']:.3f}, l{norm} norm")
    click.echo(f"certified radius: median {np.median(radii):.4g}, max {radii.max():.4g}")
    if local:
        click.echo(f"without local constants: median {np.median(out['pairwise_radii']):.4g}; local constants certified {sum(h.startswith('local') for h in out['how'])} point(s)")
    rows = [[e, f"{a:.3f}"] for e, a in out["certified_accuracy"].items()]
    if rows:
        click.echo(_table(rows, ["eps", "certified accuracy"]))
    lip = out["lipschitz"]
    click.echo(f"margin constants: {', '.join(sorted(set(lip['how'].values())))} (global bound {lip['global_bound']:.6g} by {lip['global_method']})")
    if lip["tightened"]:
        which = "those that decide a radius" if pairs == "binding" else "all"
        click.echo(f"pairwise LipSDP: {len(lip['tightened'])} of {len(lip['how']) // 2} class pairs tightened ({which})")
    for line in _budget_lines(allowance):
        click.echo(line)


def _writable_output(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--output, refused at once when it cannot be written: the report takes minutes to compute.
    The folders it lacks are created by render; the nearest one that exists is probed."""
    path = Path(value)
    folder = next(f for f in [path.parent, *path.parent.parents] if f.exists())
    if not folder.is_dir():
        raise click.BadParameter(f"cannot write {value}: {folder} is a file, not a folder")
    try:
        if path.exists():
            open(path, "a").close()  # appends nothing: the file is kept as it is until the report replaces it
        else:
            tempfile.NamedTemporaryFile(dir=folder).close()
    except OSError as exc:
        raise click.BadParameter(f"cannot write {value} ({exc.strerror or exc}); choose a file in a folder you can write to") from None
    return value


@main.command()
@model_options
@click.option("--data", type=click.Path(dir_okay=False), default=None, help="An .npz file with x and y: adds certified accuracy and radii.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True, callback=_writable_output, help="The HTML file to write, e.g. reports/model.html.")
@click.option("--norm", "-p", type=click.Choice(list(NORMS)), default="2", show_default=True, help="Vector norm on input and output.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed (iterative methods).")
@budget_option(120.0)
@jobs_option
@click.option("--local", "local", is_flag=True, help="With --data: also local certified radii and a PGD attack, drawn against the global ones.")
@click.option("--quiet", "-q", is_flag=True, help="No progress on stderr.")
@friendly_errors
def report(model: str, input_shape, data: str | None, output: str, norm: str, seed: int, budget: float, jobs: int | None, local: bool, quiet: bool) -> None:
    """Write a self-contained HTML report on MODEL: the interval [lower, upper], every method,
    per-layer norms, the witness and, with --data, certified accuracy.

    \b
    Example:
      lipcert report models/mlp_spiral.onnx --data models/spiral_test.npz -o reports/mlp_spiral.html
    """
    from .certify import certify as run_certify, load_dataset
    from .report import collect, render

    from .budget import Budget

    if local and data is None:  # --local certifies the points of --data: alone it would do nothing
        raise click.UsageError("--local needs --data (the points whose local radii and attacks are drawn): give --data test.npz, or leave out --local")
    progress.set_quiet(quiet)
    # a fifth of the budget is kept back for start-up, the page (figures) and steps that end past a deadline
    total = Budget(budget)
    allowance = total.child(0.8)
    graph = _load(model, input_shape)
    settings = Settings(norm=norm, seed=seed)
    # with data, the methods get half the budget and the certificates what is left
    results, skipped = collect(graph, settings, progress.note, allowance.child(0.5) if data is not None else allowance)
    cert = None
    if data is not None:
        x, y = load_dataset(data)
        progress.note("certifying the data ...")
        cert = run_certify(graph, x, y, [0.01, 0.02, 0.05, 0.1], norm=norm, proven=results, budget=allowance, local=local, jobs=jobs)  # reuse the bounds just computed
        if local:
            from .attack import attack

            progress.note("attacking the data (PGD) ...")
            cert["attack_radii"] = attack(graph, x, y, norm=norm, seed=seed).radii.tolist()
    command = "lipcert report " + " ".join([model] + (["--data", data] if data else []) + ["-o", output] + (["--norm", norm] if norm != "2" else [])
                                           + (["--seed", str(seed)] if seed else []) + (["--budget", f"{budget:g}"] if budget != 120 else [])
                                           + (["--local"] if local else []))
    path = render(graph, results, output, command, skipped, cert, data_name=data or "", seed=seed, notes=_budget_lines(total))
    click.echo(f"wrote {path}")
    for line in _budget_lines(total):
        progress.note(line)
