"""cli: `raijac compute | plan | inspect | verify` — thin click commands over the public API.

Errors raijac raises on purpose print as one line on stderr with exit status 1 (click's
own usage errors exit 2); `--debug` shows the traceback instead. Heavy imports (torch,
Ray, Zarr) happen inside the commands so `raijac --help` is instant.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

MODE_CHOICES = ["auto", "rev", "fwd", "rev-repeat", "fwd-repeat", "loop", "chain", "chain-fwd"]
DTYPE_CHOICES = ["float16", "float32", "float64"]


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
            click.echo("interrupted: finished tiles are recorded; rerun with --resume to continue.", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug or an environment problem: still one line unless --debug
            if debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)

    return click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")(wrapper)


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by compute and plan."""
    for option in reversed(
        [
            click.option(
                "--mode",
                type=click.Choice(MODE_CHOICES),
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
@click.option("--resume", is_flag=True, help="Finish an interrupted run, skipping tiles already written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing raijac store at --out.")
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

    result = run(spec, out, progress=False if no_progress else None, check_blocks=not no_block_check, **options)
    s = result.summary
    report = None
    if check:
        from raijac.verify import verify

        report = verify(out)
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
            f"(mode {s['mode']}; {s['tiles_computed']} tiles computed, {s['tiles_skipped']} skipped, "
            f"{s['workers']} workers)"
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
    """Show a store's metadata, completion, shapes, size, compression, timings and versions."""
    from raijac.plan import format_size
    from raijac.reader import Jacobian

    jac = Jacobian(path, allow_partial=True)
    if sample is not None and not plot_to:
        from raijac.errors import RaijacError

        raise RaijacError("--sample picks the sample to draw; pass it together with --plot FILE.png.")
    drawn = None
    if plot_to:  # first, so a refused plot prints only its error
        from raijac.plot import plot_jacobian

        drawn = plot_jacobian(jac, plot_to, sample=sample)
    stored = _stored_bytes(jac)
    raw = jac.array.nbytes
    lead = [jac.shape[0]] if jac.batched else []
    runs = jac.meta.get("runs") or []
    info = {
        "path": path,
        "complete": jac.complete,
        "tiles_done": jac.tiles_done,
        "tiles_total": jac.n_tiles,
        "shape": list(jac.shape),
        "unflattened_shape": lead + list(jac.output_shape) + list(jac.input_shape),
        "dtype": str(jac.dtype),
        "chunks": list(jac.array.chunks),
        "bytes": raw,
        "bytes_stored": stored,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        **{
            k: jac.meta.get(k)
            for k in (
                "kind",
                "hessian",
                "mode",
                "requested_mode",
                "mode_reason",
                "batched",
                "wrt",
                "input_shape",
                "output_shape",
                "compute_dtype",
                "compressor",
                "spec",
                "fingerprint",
                "created",
                "finished",
                "seconds",
                "versions",
            )
        },
        "sparse": jac.meta.get("sparse"),
        "runs": len(runs),
        "compute_seconds": round(sum(r.get("compute_seconds") or 0 for r in runs), 3),
        "write_seconds": round(sum(r.get("write_seconds") or 0 for r in runs), 3),
    }
    if drawn is not None:
        info["plot"] = {
            "path": plot_to,
            "pixels": list(drawn.absmax.shape),
            "block": list(drawn.factor),
            "density": drawn.density,
        }
    if as_json:
        click.echo(json.dumps(info))
        return
    state = "complete" if jac.complete else "INCOMPLETE"
    click.echo(f"{path}: {state}, {jac.tiles_done}/{jac.n_tiles} tiles")
    click.echo(f"  jacobian  {tuple(jac.shape)} {jac.dtype}, chunks {tuple(jac.array.chunks)}")
    per = " per sample" if info["batched"] else ""
    click.echo(
        f"  shapes    output {tuple(info['output_shape'])} x input {tuple(info['input_shape'])}{per} "
        f"(w.r.t. {info['wrt']}); unflattened {tuple(info['unflattened_shape'])}"
    )
    if info["hessian"]:
        of = "a loss w.r.t. the module's parameters" if info["kind"] == "hessian-params" else "a scalar f"
        click.echo(f"  kind      Hessian of {of} (the Jacobian of its gradient); `raijac verify` checks its symmetry")
    click.echo(f"  mode      {info['mode']} ({info['mode_reason']})")
    if info["sparse"]:
        sp = info["sparse"]
        axis = "columns" if sp["axis"] == "cols" else "rows"
        dense = "; dense jacobian stored too" if sp.get("dense") else ""
        click.echo(f"  sparse    {sp['nnz']} non-zeros per sample; {sp['colours']} colours of {axis} ({sp['colouring']}){dense}")
    ratio = f"{raw / stored:.2f}x" if stored else "n/a"
    click.echo(f"  size      {format_size(raw)} raw, {format_size(stored)} on disk (compression {ratio})")
    click.echo(f"  spec      {info['spec'] or '(none: computed from a Python Problem)'}")
    if info["seconds"] is not None:
        click.echo(
            f"  time      {info['seconds']} s over {info['runs']} run(s): {info['compute_seconds']} s computing, "
            f"{info['write_seconds']} s writing (summed over workers)"
        )
    versions = info["versions"] or {}
    click.echo("  versions  " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if drawn is not None:
        click.echo(f"  plot      {plot_to} ({drawn.absmax.shape[0]} x {drawn.absmax.shape[1]} pixels)")


@cli.command()
@click.argument("path")
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
def verify(path: str, probes: int, rtol: float | None, seed: int, as_json: bool) -> None:
    """Check the stored J against fresh JVPs (J v) and VJPs (u^T J) at random probes; exit 1 past --rtol."""
    from raijac.verify import verify as check

    report = check(path, probes=probes, rtol=rtol, seed=seed)
    click.echo(json.dumps(report.to_dict()) if as_json else str(report))
    if not report.ok:
        sys.exit(1)


def _stored_bytes(jac: Any) -> int:
    from raijac.store import stored_bytes

    if jac.sparse:
        names = ("values", "rows", "cols", "row_ptr", "colours", "compressed", "jacobian")
        return sum(stored_bytes(jac.path, name) for name in names if name in jac.group)
    return stored_bytes(jac.path)


def main() -> None:
    cli(prog_name="raijac")


if __name__ == "__main__":
    main()
