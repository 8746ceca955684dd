"""record: what a run writes about itself (after executor, beside store): the store's metadata
when it is created, the checks a resumed store must pass, the sparse decompression, and the
run summary, built once and written both to the store's run list and to `Jacobian.summary`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import platform
import time
from typing import Any

import numpy as np
import torch

from raijac import store
from raijac.errors import ProblemError, StoreError
from raijac.guard import REPLAY_SEED, outputs_agree
from raijac.kernels import check_rtol
from raijac.planner import Plan
from raijac.problem import Problem
from raijac.sparsity import Colouring, resolve_pattern
from raijac.spec import portable_spec, spec_digest, spec_key


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One run's figures: `Jacobian.summary` (as a dict) and, in part, the store's run record."""

    out: str
    mode: str
    requested_mode: str
    reason: str
    shape: list[int]
    dtype: str
    complete: bool
    tiles_total: int
    tiles_skipped: int
    tiles_computed: int
    workers: int
    seconds: float
    bytes: int
    compute_seconds: float
    write_seconds: float
    tiles_requeued: int
    tiles_by_worker: dict[str, int]
    nodes: list[str]
    all_finite: bool
    peak_rss_growth: int | None
    oom_splits: int
    random: dict[str, Any] | None
    block_check: dict[str, Any] | None
    block_check_max_rel_err: float | None
    sparse: dict[str, Any] | None = None
    blocks: int = 0  # worker calls: tiles merged into one block count once (NOTE: [merged calls])

    @classmethod
    def of(cls, plan: Plan, stats: dict[str, Any], **fields: Any) -> RunSummary:
        """The summary of a run of `plan` whose executor reported `stats`."""
        return cls(
            shape=list(plan.shape),
            tiles_total=plan.n_tiles,
            tiles_computed=stats["tiles_computed"],
            workers=len(plan.workers),
            bytes=stats["bytes"],
            compute_seconds=round(stats["compute_s"], 3),
            write_seconds=round(stats["write_s"], 3),
            tiles_requeued=stats["tiles_requeued"],
            tiles_by_worker=stats["by_worker"],
            nodes=stats["nodes"],
            all_finite=stats["finite"],
            peak_rss_growth=stats["rss_growth"],
            oom_splits=stats["oom_splits"],
            block_check_max_rel_err=stats.get("check_max_rel_err"),
            blocks=stats.get("blocks", 0),
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["sparse"] is None:
            del out["sparse"]
        return out

    def run_record(self) -> dict[str, Any]:
        """What the store's `runs` list keeps of this run."""
        keys = (
            "seconds", "tiles_computed", "tiles_skipped", "compute_seconds", "write_seconds", "tiles_by_worker",
            "tiles_requeued", "nodes", "block_check_max_rel_err",
        )  # fmt: skip
        return {
            "finished": now(),
            "block_check": bool((self.block_check or {}).get("enabled")),
            **{k: getattr(self, k) for k in keys},
        }


def random_meta(problem: Problem) -> dict[str, Any] | None:
    """What the store and summary say of a function that draws random numbers (NOTE: [replay])."""
    return {"replayed": True, "seed": REPLAY_SEED} if problem.random else None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy for the store: bfloat16, which numpy lacks, is kept as float32 (exact)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def stored_colouring(meta: dict, out: str, digest: str) -> Colouring:
    """The colouring a store was computed with (resume keeps it: finished tiles used it)."""
    sparse = meta.get("sparse")
    if not sparse and "compressed" in store.open_group(out):
        raise StoreError(
            f"resume=True (--resume) refused: {out} was interrupted while it was being created, before any tile ran; "
            "use overwrite=True (--overwrite) to start it again."
        )
    if not sparse:
        raise StoreError(
            f"resume=True (--resume) refused: {out} holds a dense Jacobian but this problem is sparse; use "
            "overwrite=True (--overwrite) or a new out."
        )
    if sparse.get("pattern") != digest:
        raise StoreError(
            f"resume=True (--resume) refused: the sparsity pattern differs from the one {out} was computed with; use "
            "the same pattern, or overwrite=True (--overwrite) / a new out."
        )
    colours = store.open_group(out)["colours"][...]
    return Colouring(sparse["axis"], colours, int(sparse["colours"]), sparse["colouring"])


def create_sparse(group, problem: Problem, the_plan: Plan, colouring: Colouring, dense: bool, codec: str, level) -> None:
    pattern = resolve_pattern(problem)
    store.create_sparse(
        group,
        rows=pattern.rows,
        cols=pattern.cols,
        row_ptr=pattern.row_ptr(),
        colours=colouring.colours,
        shape=pattern.shape,
        batch_size=problem.batch_size,
        dtype=the_plan.dtype,
        dense=dense,
        compressor=codec,
        level=level,
    )
    store.update_meta(
        group,
        sparse={
            "nnz": pattern.nnz,
            "axis": colouring.axis,
            "colours": colouring.n_colours,
            "colouring": colouring.method,
            "pattern": pattern.digest(),
            "order": "row-major",
            "dense": bool(dense),
            "decompressed": False,
        },
    )


def decompress(group, out: str, the_plan: Plan) -> None:
    """Turn the finished compressed product into the stored non-zeros; refuse a pattern that misses some."""
    t0 = time.perf_counter()
    strays, first = store.decompress(group, axis=the_plan.seed_axis)
    sparse = {**group.attrs[store.ATTR]["sparse"], "decompress_seconds": round(time.perf_counter() - t0, 3)}
    if strays:
        b, line, colour = first
        where = f"output row {line}" if the_plan.seed_axis == "cols" else f"input column {line}"
        axis = "columns" if the_plan.seed_axis == "cols" else "rows"
        sample = f"sample {b}, " if the_plan.batched else ""
        store.update_meta(group, complete=False, sparse={**sparse, "strays": strays})
        raise ProblemError(
            f"the sparsity pattern misses non-zeros of J: {strays} entries of the compressed product are non-zero where "
            f"the pattern has none (first: {sample}{where}, {axis} of colour {colour}); fix the pattern or use "
            f"sparsity='detect'. The computed tiles are kept in {out}, marked incomplete."
        )
    store.update_meta(group, sparse={**sparse, "decompressed": True})


def fingerprint_parts(problem: Problem, *, mode: str, dtype: str) -> dict[str, str | None]:
    """What the fingerprint covers, piece by piece, so a refused resume can name what differs."""

    def digest(*items: Any) -> str:
        h = hashlib.sha256()
        for item in items:
            if isinstance(item, torch.Tensor):
                h.update(item.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(json.dumps(item, sort_keys=True).encode())
        return h.hexdigest()[:16]

    x = problem.x
    params = problem.params
    shapes = {
        "kind": problem.kind,
        "batched": problem.batched,
        "batch_aware": problem.batch_aware,
        "wrt": problem.wrt,
        "input_shape": list(problem.input_shape),
        "output_shape": list(problem.output_shape),
        "dtype": str(problem.dtype),
        "sparse": getattr(problem, "sparsity", None) is not None,
    }
    parts = {
        "mode": mode,
        "dtype": dtype,
        "spec": spec_key(problem.spec),
        "x": digest([list(x.shape), str(x.dtype)], x),
        "parameters": None if params is None else digest([[i.name, list(i.shape)] for i in problem.param_info], params),
        "shapes": digest(shapes),
    }
    consts = problem.constants
    if consts:  # only then: a problem without them keeps the parts older stores hold
        parts["constants"] = digest([[list(t.shape), str(t.dtype)] for t in consts], *consts)
    return parts


# What each part is called in a refusal: the option (Python argument and CLI flag) or input.
_PART_NAMES = {
    "mode": "mode (mode= / --mode)",
    "dtype": "storage dtype (dtype= / --dtype)",
    "spec": "spec",
    "x": "point x",
    "parameters": "parameters",
    "shapes": "shapes or problem kind (batched, wrt, input/output shapes, output dtype, sparsity)",
    "constants": "set of inputs that are neither differentiated nor per sample (shared=, an unbatched f's other inputs)",
}


def differences(stored: dict, now: dict) -> list[str]:
    """What two fingerprints' parts name differently (a store's and this run's, a driver's and a worker's)."""
    out = []
    for key, name in _PART_NAMES.items():
        a, b = stored.get(key), now.get(key)
        if a != b:
            shown = f" (stored {a}, this run {b})" if key in ("mode", "dtype", "spec") else ""
            out.append(name + shown)
    return out


def spec_meta(problem: Problem) -> dict[str, str | None]:
    """How the store names the problem's spec: relative to the working folder, with the file's
    digest. Made before Ray is joined: a `ray job` driver's working folder, where a relative
    path is resolved, can be removed under it once its runtime environment changes."""
    return {"spec": portable_spec(problem.spec), "spec_sha256": spec_digest(problem.spec) if problem.spec else None}


def check_resumable(meta: dict, out: str, fingerprint: str, parts: dict, problem: Problem) -> None:
    if meta.get("fingerprint") != fingerprint:
        stored = meta.get("fingerprint_parts")
        differs = differences(stored, parts) if isinstance(stored, dict) else []
        if differs:
            raise StoreError(
                f"resume=True (--resume) refused: {out} was computed with another {'; another '.join(differs)}; "
                "resume with the same ones, or use overwrite=True (--overwrite) / a new out."
            )
        raise StoreError(  # a store from before the parts were recorded: only the whole fingerprint is known
            f"resume=True (--resume) refused: {out} was computed for another problem or options (fingerprint "
            f"{meta.get('fingerprint')} != {fingerprint}); use the same spec, x, parameters, mode and dtype, or "
            "overwrite=True (--overwrite) / a new out."
        )
    stored_y = store.open_group(out)["y"][...]
    if not same_y(stored_y, to_numpy(problem.y)):
        raise StoreError(
            f"resume=True (--resume) refused: f(x) differs from the y stored in {out}, so f changed since the run "
            "started; use overwrite=True (--overwrite) or a new out."
        )


def same_y(a: np.ndarray, y: np.ndarray) -> bool:
    """Whether two evaluations of f(x) (another run's, another process's) are the same function's."""
    # float64 runs agree to ~1e-15 across processes: a 1e-5 tolerance let an f whose weights
    # moved by 2e-7 resume, mixing two Jacobians in one store.
    # The absolute floor comes from the finite entries: an inf in y made it inf, so any y passed.
    finite = np.abs(y[np.isfinite(y)])
    rtol, atol = (1e-10, 1e-10 * float(finite.max(initial=0.0))) if y.dtype == np.float64 else (1e-5, 1e-6)
    return a.shape == y.shape and bool(np.allclose(a, y, rtol=rtol, atol=atol, equal_nan=True))


Y_SKETCH = 512  # entries of y a worker that builds the problem itself compares (NOTE: [built apart])


def y_sketch(problem: Problem) -> dict[str, Any]:
    """Evenly spaced entries of y and, for an input Jacobian, of one fixed VJP of f (all of
    small ones): what a worker that built the problem from its spec compares its own with
    (NOTE: [built apart] in raijac.worker)."""
    sketch = {"y": _picked(problem.y)}
    if problem.wrt == "input":
        try:
            sketch["vjp"] = _picked(problem.probe_vjp())
        except Exception:  # f has no plain backward (a jvp-only Function): its y alone is compared
            pass
    return sketch


def _picked(t: torch.Tensor) -> dict[str, Any]:
    flat = to_numpy(t).reshape(-1)
    picks = np.unique(np.linspace(0, flat.size - 1, num=min(flat.size, Y_SKETCH)).astype(np.int64))
    # Plain bytes: a worker host compares its calls' arguments with ==, which arrays do not answer.
    return {"shape": list(t.shape), "dtype": str(flat.dtype), "picks": picks.tobytes(), "values": flat[picks].tobytes()}


def _unpicked(picked: dict[str, Any], t: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(t's entries at the picks, the sketch's), or None where shape or dtype differ."""
    flat = to_numpy(t).reshape(-1)
    if list(t.shape) != picked["shape"] or str(flat.dtype) != picked["dtype"]:
        return None
    return flat[np.frombuffer(picked["picks"], dtype=np.int64)], np.frombuffer(picked["values"], dtype=flat.dtype)


def sketch_agrees(sketch: dict[str, Any], problem: Problem) -> bool:
    """Whether this process's problem gives the sketch's y (the same to rounding) and VJP (the
    same to another thread count's rounding: `outputs_agree`)."""
    ys = _unpicked(sketch["y"], problem.y)
    if ys is None or not same_y(*ys):
        return False
    if "vjp" not in sketch:
        return True
    gs = _unpicked(sketch["vjp"], problem.probe_vjp())
    return gs is not None and outputs_agree(torch.from_numpy(gs[0].copy()), torch.from_numpy(gs[1].copy()))


def arrays(problem: Problem) -> dict[str, tuple[np.ndarray, bool]]:
    """The store's x, y (and params) as (data, batched): what no plan decides."""
    data = {
        "x": (to_numpy(problem.x), problem.batched),
        "y": (to_numpy(problem.y), problem.batched),
    }
    if problem.params is not None:
        data["params"] = (to_numpy(problem.params), False)
    return data


def create(
    out: str,
    problem: Problem,
    the_plan: Plan,
    ids: dict,
    codec: tuple,
    started: float,
    block_check: dict,
    staged: store.Staged | None = None,
):
    """The new store at `out`: made whole, or finished from `staged` (NOTE: [staged store] in raijac.store)."""
    compressor, codec_reason, level = codec
    meta = {
        "complete": False,
        "mode": the_plan.mode,
        "requested_mode": the_plan.requested_mode,
        "mode_reason": the_plan.reason,
        "triage": [list(t) for t in the_plan.triage],
        "kind": problem.kind,
        "hessian": problem.kind.startswith("hessian"),
        "batched": problem.batched,
        "batch_size": problem.batch_size,
        "wrt": problem.wrt,
        "input_shape": list(problem.input_shape),
        "output_shape": list(problem.output_shape),
        "x_shape": list(problem.x.shape),
        "dtype": the_plan.dtype,
        "compute_dtype": str(problem.dtype).replace("torch.", ""),
        "random": random_meta(problem),
        **ids,  # the fingerprint and its parts
        "seed_axis": the_plan.seed_axis,
        "n_tiles": the_plan.n_tiles,
        "layout": {"chunks": list(the_plan.chunks), "tile_samples": the_plan.tile_samples, "tile_seeds": the_plan.tile_seeds},
        "compressor": compressor,
        "compression_level": level,
        "compressor_reason": codec_reason,
        "block_check": block_check,
        "params": [i.to_dict() for i in problem.param_info],
        "inputs": [leaf.to_dict() for leaf in problem.in_leaves],
        "outputs": [leaf.to_dict() for leaf in problem.out_leaves],
        "argnums": list(problem.argnums) if isinstance(problem.argnums, tuple) else problem.argnums,
        "versions": versions(),
        "created": now(),
        "started": _dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(timespec="seconds"),
    }
    group = staged.place() if staged is not None else store.create_group(out, arrays(problem))
    return store.add_jacobian(
        group,
        name="compressed" if the_plan.sparse else "jacobian",
        shape=the_plan.array_shape,
        chunks=the_plan.chunks,
        dtype=the_plan.dtype,
        n_tiles=the_plan.n_tiles,
        meta=meta,
        compressor=compressor,
        level=level,
    )


def block_check_meta(enabled: bool, problem: Problem) -> dict[str, Any]:
    """What the store records of the per-block check (NOTE: [block check] in raijac.kernels)."""
    return {"enabled": bool(enabled), "rtol": check_rtol(problem.dtype) if enabled else None, "reference": "autograd.grad VJP"}


def versions() -> dict[str, str]:
    import numcodecs
    import ray
    import zarr

    from raijac import __version__

    return {
        "raijac": __version__,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
