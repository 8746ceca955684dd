"""cli: `raijac compute | plan | inspect` — thin click commands over the public API.

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

MODE_CHOICES = ["auto", "rev", "fwd", "rev-repeat", "fwd-repeat", "loop"]
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
                help="Memory per worker, e.g. 512MB or 2GiB (default: a share of free RAM / 80% of GPU memory).",
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
    "--compressor", type=click.Choice(["zstd", "blosc", "none"]), default=None, help="Chunk compression (default: zstd level 1)."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary as the last line of stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_errors
def compute(spec: str, out: str, as_json: bool, no_progress: bool, **options: Any) -> None:
    """Compute the Jacobian SPEC names (path/to/file.py:NAME or package.module:NAME) into --out."""
    from raijac.api import compute as run

    result = run(spec, out, progress=False if no_progress else None, **options)
    s = result.summary
    if as_json:
        click.echo(json.dumps(s))
    else:
        shape = " x ".join(map(str, s["shape"]))
        click.echo(
            f"wrote {shape} {s['dtype']} Jacobian to {out} in {s['seconds']:.2f} s "
            f"(mode {s['mode']}; {s['tiles_computed']} tiles computed, {s['tiles_skipped']} skipped, "
            f"{s['workers']} workers)"
        )


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
@_errors
def inspect(path: str, as_json: bool) -> None:
    """Show a store's metadata, completion, size and compression."""
    from raijac.plan import format_size
    from raijac.reader import Jacobian

    jac = Jacobian(path, allow_partial=True)
    stored = _stored_bytes(jac)
    raw = jac.array.nbytes
    info = {
        "path": path,
        "complete": jac.complete,
        "tiles_done": jac.tiles_done,
        "tiles_total": jac.n_tiles,
        "shape": list(jac.shape),
        "dtype": str(jac.dtype),
        "chunks": list(jac.array.chunks),
        "bytes": raw,
        "bytes_stored": stored,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        **{
            k: jac.meta.get(k)
            for k in (
                "mode",
                "requested_mode",
                "mode_reason",
                "batched",
                "wrt",
                "input_shape",
                "output_shape",
                "spec",
                "fingerprint",
                "seconds",
                "versions",
            )
        },
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    state = "complete" if jac.complete else "INCOMPLETE"
    click.echo(f"{path}: {state}, {jac.tiles_done}/{jac.n_tiles} tiles")
    click.echo(f"  jacobian  {tuple(jac.shape)} {jac.dtype}, chunks {tuple(jac.array.chunks)}")
    click.echo(
        f"  shapes    output {tuple(info['output_shape'])} x input {tuple(info['input_shape'])}"
        + (" per sample" if info["batched"] else "")
        + f" (w.r.t. {info['wrt']})"
    )
    click.echo(f"  mode      {info['mode']} ({info['mode_reason']})")
    ratio = f"{raw / stored:.2f}x" if stored else "n/a"
    click.echo(f"  size      {format_size(raw)} raw, {format_size(stored)} on disk (compression {ratio})")
    click.echo(f"  spec      {info['spec']}")
    if info["seconds"] is not None:
        click.echo(f"  time      {info['seconds']} s")
    versions = info["versions"] or {}
    click.echo("  versions  " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def _stored_bytes(jac: Any) -> int:
    """Bytes of the jacobian's chunks on disk (its zarr.json is metadata, not compressed data)."""
    import os

    root = os.path.join(jac.path, "jacobian")
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files if f != "zarr.json")


def main() -> None:
    cli(prog_name="raijac")


if __name__ == "__main__":
    main()
