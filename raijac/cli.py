"""cli: `raijac compute | plan | inspect | verify` — thin click commands over the public API.

Errors raijac raises on purpose print as one line on stderr with exit status 1 (click's
own usage errors exit 2); `--debug` shows the traceback instead. Heavy imports (torch,
Ray, Zarr) happen inside the commands so `raijac --help` is instant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import click

from raijac.modes import CHOICES

DTYPE_CHOICES = ["float16", "float32", "float64"]


def _interrupted(out: str | None) -> str:
    """What a Ctrl-C left: resumable tiles at `out`, a finished store, or nothing."""
    from raijac import store

    try:
        meta = store.read_meta(out) if out else None
    except Exception:
        meta = None
    if meta is None:
        return "interrupted before any tile was written: nothing to resume."
    if meta.get("complete"):
        return f"interrupted: {out} holds a complete store; nothing to resume."
    return f"interrupted: finished tiles are recorded in {out}; rerun with --resume to continue."


def _errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn raijac's errors into one line and exit 1; `--debug` re-raises them."""

    @functools.wraps(command)
    def wrapper(*args: Any, debug: bool = False, **kwargs: Any) -> Any:
        from raijac.errors import RaijacError

        try:
            return command(*args, **kwargs)
        except RaijacError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(_interrupted(kwargs.get("out") if command.__name__ == "compute" else None), err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an environment problem: still one line unless --debug
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")(wrapper)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Warnings as `warning: ...` lines on stderr, like errors, not Python's file:line form.
    raijac's own are UserWarnings; the libraries' deprecation notices stay hidden, as Python
    hides them outside `__main__` (torch.jit.script's showed on every run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # under any filters the caller had
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
        yield


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by compute and plan."""
    for option in reversed(
        [
            click.option(
                "--mode",
                type=click.Choice(CHOICES),
                default="auto",
                show_default=True,
                help="How blocks are computed; auto picks rev or fwd and falls back when needed.",
            ),
            click.option(
                "--workers",
                type=click.IntRange(min=1),
                default=None,
                help="CPU actors (default: one per core, at most 8); GPUs get one actor each.",
            ),
            click.option(
                "--memory-budget",
                default=None,
                metavar="SIZE",
                help="Memory per worker, e.g. 512MB or 2GiB, or one per worker, e.g. 256MB,1GiB (default: a share of free RAM / 80% of GPU memory).",
            ),
            click.option(
                "--block-size",
                type=click.IntRange(min=1),
                default=None,
                metavar="K",
                help="Force K seeds per block (rounded to whole chunks).",
            ),
            click.option(
                "--dtype", type=click.Choice(DTYPE_CHOICES), default=None, help="Storage dtype (default: the output's dtype)."
            ),
        ]
    ):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "RAIJAC"})
@click.version_option(package_name="raijac")
def cli() -> None:
    """raijac: Jacobians too large for one device, on Ray, into Zarr."""


@cli.command()
@click.argument("spec")
@click.option("--out", required=True, metavar="PATH", help="Zarr store to write.")
@_common
@click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray).")
# Options that write into or delete an existing store are never read from RAIJAC_* variables:
# a variable left set in a shell must not turn a later run destructive.
@click.option(
    "--resume", is_flag=True, allow_from_autoenv=False, help="Finish an interrupted run, skipping tiles already written."
)
@click.option("--overwrite", is_flag=True, allow_from_autoenv=False, help="Replace an existing raijac store at --out.")
@click.option(
    "--compressor",
    type=click.Choice(["auto", "zstd", "blosc", "none"]),
    default="auto",
    show_default=True,
    help="Chunk compression; auto picks zstd when a sample block compresses 1.5x or better, else none.",
)
@click.option("--compression-level", type=int, default=None, help="The codec's level (zstd default 1, blosc 3).")
@click.option("--dense", is_flag=True, help="For a sparse problem, also store the dense jacobian array (M x N, mostly zeros).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--no-block-check",
    is_flag=True,
    allow_from_autoenv=False,  # switching off a safety check takes an explicit flag, never an env var
    help="Skip the check of every block against a plain autograd VJP before it is written (about one backward per block).",
)
@click.option(
    "--verify", "check", is_flag=True, help="Check the finished store with `raijac verify` (8 probes); exit 1 if it fails."
)
@_errors
def compute(spec: str, out: str, as_json: bool, no_progress: bool, no_block_check: bool, check: bool, **options: Any) -> None:
    """Compute the Jacobian SPEC names (path/to/file.py:NAME or package.module:NAME) into --out."""
    from raijac.api import compute as run

    with _warnings_as_lines():
        result = run(spec, out, progress=False if no_progress else None, check_blocks=not no_block_check, **options)
    s = result.summary
    report = None
    if check:
        from raijac.verify import verify

        report = verify(out, spec=spec)  # the spec this command was given: the store's own name is never run
        s = {**s, "verify": report.to_dict()}
    if as_json:
        click.echo(json.dumps(s))
    else:
        shape = " x ".join(map(str, s["shape"]))
        sparse = s.get("sparse")
        what = f"sparse ({sparse['nnz']} non-zeros, {sparse['colours']} colours) " if sparse else ""
        noun = "Hessian" if result.meta.get("hessian") else "Jacobian"
        click.echo(
            f"wrote {shape} {s['dtype']} {what}{noun} to {out} in {s['seconds']:.2f} s "
            f"(mode {s['mode']}; {_plural(s['tiles_computed'], 'tile')} computed, {s['tiles_skipped']} skipped, "
            f"{_plural(s['workers'], 'worker')})"
        )
        if report is not None:
            click.echo(f"verify: {report.verdict()}")
    if report is not None and not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("spec")
@_common
@_errors
def plan(spec: str, **options: Any) -> None:
    """Print the plan for SPEC (mode and why, triage, tiles, chunks, memory) without computing."""
    from raijac.api import plan as make

    the_plan = make(spec, **options)  # before any output: a refused plan prints only its error
    click.echo(f"plan for {spec}")
    click.echo(str(the_plan))


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@click.option("--plot", "plot_to", default=None, metavar="FILE.png", help="Draw |J| (log colours) and its sparsity pattern.")
@click.option("--sample", type=int, default=None, metavar="I", help="Which sample of a batched store to draw (default 0).")
@_errors
def inspect(path: str, as_json: bool, plot_to: str | None, sample: int | None) -> None:
    """Show what a store holds: completion, shapes, sparsity, parameters, size, timings and versions."""
    from raijac.reader import Jacobian

    jac = Jacobian(path, allow_partial=True)
    if sample is not None and not plot_to:
        from raijac.errors import RaijacError

        raise RaijacError("--sample picks the sample to draw; pass it together with --plot FILE.png.")
    drawn = None
    if plot_to:  # first, so a refused plot prints only its error
        from raijac.plot import plot_jacobian

        drawn = plot_jacobian(jac, plot_to, sample=sample)
    info = {**jac.info(), "path": path}
    if drawn is not None:
        info["plot"] = {
            "path": plot_to,
            "pixels": list(drawn.absmax.shape),
            "block": list(drawn.factor),
            "density": drawn.density,
        }
    click.echo(json.dumps(info) if as_json else _describe(info))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _describe(info: dict[str, Any]) -> str:
    """`raijac inspect`'s text: `Jacobian.info()` as aligned lines."""
    from raijac.planner import format_size
    from raijac.plot import percent

    lines = []
    total = info["tiles_total"]
    state = "complete" if info["complete"] else "INCOMPLETE"
    lines.append(f"{info['path']}: {state}, {info['tiles_done']}/{total} {'tile' if total == 1 else 'tiles'}")
    if info["tiles_pending"]:
        spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in info["pending"][:8])
        more = ", ..." if len(info["pending"]) > 8 else ""
        lines.append(f"  pending   {_plural(info['tiles_pending'], 'tile')} ({spans}{more}); finish with --resume")
    shape, dtype = tuple(info["shape"]), info["dtype"]
    sp = info["sparse"]
    if sp:
        axis = "columns" if sp["axis"] == "cols" else "rows"
        dense = "; dense jacobian stored too" if sp["dense_stored"] else ""
        lines.append(f"  jacobian  sparse {shape} {dtype}, stored as its non-zeros (values, CSR pattern)")
        lines.append(
            f"  sparse    {sp['nnz']} non-zeros per sample; {sp['colours']} colours of {axis} ({sp['colouring']}); "
            f"pattern density {percent(sp['density'])}{dense}"
        )
    else:
        lines.append(f"  jacobian  {shape} {dtype}, chunks {tuple(info['chunks'])}")
    per = " per sample" if info["batched"] else ""
    lines.append(
        f"  shapes    output {tuple(info['output_shape'])} x input {tuple(info['input_shape'])}{per} "
        f"(w.r.t. {info['wrt']}); unflattened {tuple(info['unflattened_shape'])}"
    )
    if info["params"]:
        shown = ", ".join(f"{p['name']} {tuple(p['shape'])}" for p in info["params"][:6])
        more = f", ... ({len(info['params'])} in all)" if len(info["params"]) > 6 else ""
        lines.append(f"  params    {_plural(len(info['params']), 'tensor')}, columns in this order: {shown}{more}")
    if info["hessian"]:
        of = "a loss w.r.t. the module's parameters" if info["kind"] == "hessian-params" else "a scalar f"
        lines.append(f"  kind      Hessian of {of} (the Jacobian of its gradient); `raijac verify` checks its symmetry")
    lines.append(f"  mode      {info['mode']} ({info['mode_reason']})")
    checked = info.get("block_check") or {}
    if checked.get("enabled") and checked.get("unchecked"):
        lines.append(
            f"  checked   every block but {_plural(checked['unchecked'], 'block')} that plain autograd could not "
            "differentiate f for (no reference to compare with)"
        )
    elif checked.get("enabled"):
        worst = info.get("block_check_max_rel_err")
        seen = f"; worst relative error {worst:.2g}" if worst is not None else ""
        lines.append(
            f"  checked   every block, against a plain autograd VJP before it was written (rtol {checked['rtol']:g}{seen})"
        )
    elif checked:
        lines.append("  checked   not every block (a run had the block check turned off)")
    if info.get("random"):
        lines.append(f"  random    f draws random numbers: every forward pass replayed generator seed {info['random']['seed']}")
    raw, stored = format_size(info["bytes"]), format_size(info["bytes_stored"])
    what = " (non-zeros, pattern, colours, compressed product)" if sp else ""
    if info["complete"]:
        ratio = f"{info['compression_ratio']:.2f}x" if info["compression_ratio"] else "n/a"
        size = f"{raw} raw{what}, {stored} on disk (compression {ratio})"
    else:
        size = f"{raw} raw{what} when complete; {stored} on disk so far ({info['tiles_done']}/{total} written)"
    if sp:
        size += f"; a dense J would take {format_size(info['dense_bytes'])}"
    lines.append(f"  size      {size}")
    lines.append(f"  spec      {info['spec'] or '(none: computed from a Python Problem)'}")
    if info["seconds"] is not None:
        lines.append(
            f"  time      {info['seconds']} s over {_plural(info['runs'], 'run')}: {info['compute_seconds']} s computing, "
            f"{info['write_seconds']} s writing (summed over workers)"
        )
    versions = info["versions"] or {}
    lines.append("  versions  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if "plot" in info:
        p, q = info["plot"]["pixels"]
        lines.append(f"  plot      {info['plot']['path']} ({p} x {q} pixels)")
    return "\n".join(lines)


@cli.command()
@click.argument("path")
@click.option(
    "--spec",
    default=None,
    metavar="FILE:NAME",
    help="The spec to rebuild f from; a spec file must be the one the store was computed from (sha256), wherever it is now.",
)
@click.option(
    "--trust-spec", is_flag=True, help="Run the spec the store names instead (it runs that file's code; printed first)."
)
@click.option("--probes", type=click.IntRange(min=1), default=8, show_default=True, metavar="K", help="Random probes.")
@click.option(
    "--rtol",
    type=click.FloatRange(min=0),
    default=None,
    metavar="R",
    help="Relative error allowed (default: 1e-4 float32, 2e-3 float16, 1e-9 float64).",
)
@click.option("--seed", type=int, default=0, show_default=True, metavar="S", help="Seeds the probes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_errors
def verify(path: str, spec: str | None, trust_spec: bool, probes: int, rtol: float | None, seed: int, as_json: bool) -> None:
    """Check the stored J against fresh JVPs (J v) and VJPs (u^T J) at random probes; exit 1 past --rtol.

    f is rebuilt from --spec; a store never runs code on its own (--trust-spec runs the spec it names).
    """
    from raijac.reader import Jacobian
    from raijac.verify import checked_spec, stored_spec
    from raijac.verify import verify as check

    if spec is not None and trust_spec:
        from raijac.errors import RaijacError

        raise RaijacError("--spec and --trust-spec contradict each other; pass --spec FILE:NAME, or --trust-spec alone.")
    if trust_spec:
        meta = Jacobian(path, allow_partial=True).meta  # "not a raijac store" before anything else
        spec = checked_spec(path, meta, None, trust_spec=True)  # refusals before anything runs
        digest = stored_spec(meta)[1]
        sha = f" (sha256 {digest[:12]}...)" if digest else ""
        click.echo(f"--trust-spec: running {spec}{sha}, the spec {path} names", err=True)
    report = check(path, probes=probes, rtol=rtol, seed=seed, spec=spec)
    click.echo(json.dumps(report.to_dict()) if as_json else str(report))
    if not report.ok:
        sys.exit(1)


def main() -> None:
    cli(prog_name="raijac")


if __name__ == "__main__":
    main()
