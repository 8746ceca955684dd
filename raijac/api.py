"""api: `raijac.plan` and `raijac.compute`, wiring problem -> probe -> plan -> executor -> store -> reader.

Everything that can be checked before work starts is checked first (spec, mode, budget,
output location, fingerprint), so bad input never touches an existing store.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import time
import warnings
from typing import Any

import numpy as np
import torch

from raijac import blas, modes, store
from raijac.chain import may_chain
from raijac.errors import BudgetError, ModeError, ProblemError, RaijacError, StoreError
from raijac.executor import RayExecutor, default_workers
from raijac.guard import REPLAY_SEED, keep_caller_state
from raijac.kernels import Kernel, check_rtol, make_target
from raijac.modes import check_mode, seed_axis
from raijac.planner import Plan, WorkerCost, format_size, make_plan, parse_budgets
from raijac.probe import default_budget, measure_cost, resolve_mode, sample_block, seed_bytes, stackable
from raijac.problem import Problem, load_problem, spec_key
from raijac.reader import Jacobian
from raijac.reader import open as open_store
from raijac.sparsity import Colouring, choose, resolve_pattern
from raijac.verify import portable_spec, spec_digest
from raijac.worker import TORCH_DTYPES

STORE_DTYPES = ("float16", "float32", "float64")


def _problem(problem_or_spec: Problem | str) -> Problem:
    if isinstance(problem_or_spec, Problem):
        return problem_or_spec
    if isinstance(problem_or_spec, str | os.PathLike):
        return load_problem(os.fspath(problem_or_spec))
    raise ProblemError(f"expected a raijac.Problem or a spec string, but got {type(problem_or_spec).__name__}.")


def _keeps_caller_state(run: Any) -> Any:
    """Run `plan`/`compute` with the caller's modules and generators given back as they were:
    triage and probes run f here (batch norm in training mode moves its running statistics,
    a GPU probe moves the module); the workers change only their own copies."""

    @functools.wraps(run)
    def wrapper(problem_or_spec: Problem | str, *args: Any, **kwargs: Any) -> Any:
        problem = _problem(problem_or_spec)
        with keep_caller_state(problem):
            return run(problem, *args, **kwargs)

    return wrapper


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy for the store: bfloat16, which numpy lacks, is kept as float32 (exact)."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _random_meta(problem: Problem) -> dict[str, Any] | None:
    """What the store and summary say of a function that draws random numbers (NOTE: [replay])."""
    return {"replayed": True, "seed": REPLAY_SEED} if problem.random else None


def _store_dtype(problem: Problem, dtype: str | torch.dtype | None) -> str:
    name = str(problem.dtype if dtype is None else dtype).replace("torch.", "")
    if name not in STORE_DTYPES:
        raise ProblemError(f"cannot store the Jacobian as {name}; choose dtype= (--dtype) from {', '.join(STORE_DTYPES)}.")
    return name


def _sparse_plan_args(problem: Problem, colouring: Colouring | None) -> dict[str, Any]:
    if colouring is None:
        return {}
    return {"colours": colouring.n_colours, "nnz": resolve_pattern(problem).nnz, "colouring": colouring.method}


def _check_block_size(block_size: int | None) -> None:
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise RaijacError(f"block_size (--block-size) must be a positive number of seeds, but got {block_size!r}.")


def _may_chain(problem: Problem, mode: str) -> bool:
    """Whether workers should find the chain while the driver triages: for a chain mode, or
    for auto where f may be one (a function is traced there and here at once: raijac.peel)."""
    return (mode != "auto" and modes.get(mode).chain) or (mode == "auto" and may_chain(problem, auto=True))


def _triage_rows(reports: list) -> tuple:
    return tuple((r.mode, r.status, r.note) for r in reports)


def _sparse_mode(problem: Problem, mode: str, *, try_all: bool = False) -> tuple[str, str, list, Colouring]:
    """Mode and colouring of a sparse problem: `auto` seeds the axis with fewer colours and
    falls back along it (fwd -> fwd-repeat, rev -> rev-repeat -> loop), then to the other axis."""
    if mode != "auto" and not modes.get(mode).sparse:
        raise ModeError(f"mode {mode} has no compressed (sparse) form; use auto, rev or fwd for sparse problems.")
    first, second = choose(resolve_pattern(problem), mode)
    if mode != "auto":
        chosen, reason, reports = resolve_mode(problem, mode)
        return chosen, f"requested; {first.n_colours} colours ({first.method})", reports, first
    order = [m for c in (first, second) for m in modes.along(c.axis, stackable=stackable(problem)) if modes.get(m).sparse]
    why = (
        f"sparse: {first.n_colours} colours of {'columns' if first.axis == 'cols' else 'rows'} ({first.method}) vs "
        f"{second.n_colours} of {'columns' if second.axis == 'cols' else 'rows'}"
    )
    chosen, reason, reports = resolve_mode(problem, "auto", try_all=try_all, order=order, why=why)
    return chosen, reason, reports, first if seed_axis(chosen) == first.axis else second


def _plan_for(problem: Problem, mode: str, reason: str, dtype: str, costs: list[WorkerCost], **kw: Any) -> Plan:
    return make_plan(
        mode=mode,
        reason=reason,
        batch_size=problem.batch_size,
        n_out=problem.n_out,
        n_in=problem.n_in,
        seed_axis=seed_axis(mode),
        dtype=dtype,
        itemsize=np.dtype(dtype).itemsize,
        workers=costs,
        **kw,
    )


@_keeps_caller_state
def plan(
    problem_or_spec: Problem | str,
    *,
    mode: str = "auto",
    workers: int | None = None,
    memory_budget: str | int | None = None,
    block_size: int | None = None,
    dtype: str | None = None,
) -> Plan:
    """The plan a run would follow on this machine, computing nothing but small probes.

    Every candidate mode runs one small block (the pre-flight triage shown in the plan), and
    the chosen mode's memory per seed is measured here, on this machine's CPU or first GPU.
    """
    problem = _problem(problem_or_spec)
    check_mode(mode, allow_auto=True)
    blas.requested()  # a bad RAIJAC_BLAS fails here, not on the workers
    budgets = parse_budgets(memory_budget)
    _check_block_size(block_size)
    store_dtype = _store_dtype(problem, dtype)
    colouring = None
    if resolve_pattern(problem) is not None:
        chosen, reason, reports, colouring = _sparse_mode(problem, mode, try_all=True)
    else:
        chosen, reason, reports = resolve_mode(problem, mode, try_all=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        n = torch.cuda.device_count()
    else:
        n = workers or (len(budgets) if budgets and len(budgets) > 1 else default_workers(os.cpu_count() or 1))
    if budgets and len(budgets) not in (1, n):  # as compute refuses it (executor.boot)
        raise BudgetError(
            f"memory_budget (--memory-budget) lists {len(budgets)} budgets for {n} workers; give one, or one per worker."
        )
    cost = measure_cost(Kernel(make_target(problem, device), chosen), device)
    other = problem.n_in if seed_axis(chosen) == "rows" else problem.n_out
    per_seed = seed_bytes(cost.per_seed, other, np.dtype(store_dtype).itemsize)
    per_worker = budgets * n if budgets and len(budgets) == 1 else budgets or [default_budget(device, n)] * n
    costs = [WorkerCost(f"{device.type}{i}", device.type, b, cost.base, per_seed) for i, b in enumerate(per_worker)]
    the_plan = _plan_for(
        problem,
        chosen,
        reason,
        store_dtype,
        costs,
        requested_mode=mode,
        block_size=block_size,
        triage=_triage_rows(reports),
        **_sparse_plan_args(problem, colouring),
    )
    too_big = _budget_beyond_memory(budgets, device)
    return dataclasses.replace(the_plan, notes=(*the_plan.notes, too_big)) if too_big else the_plan


def _budget_beyond_memory(budgets: list[int] | None, device: torch.device) -> str | None:
    """A warning when a budget exceeds this machine's memory (RAM, or the GPU's): blocks sized
    for it would not fit, and the run would swap or be killed."""
    if not budgets:
        return None
    if device.type == "cuda":
        total, where = torch.cuda.get_device_properties(device).total_memory, "GPU's"
    else:
        import psutil

        total, where = psutil.virtual_memory().total, "machine's"
    if max(budgets) <= total:
        return None
    return (
        f"memory budget {format_size(max(budgets))} is more than this {where} {format_size(total)} of memory; "
        "blocks sized for it will not fit: give each worker a share of what is free (or leave the default)."
    )


@_keeps_caller_state
def compute(
    problem_or_spec: Problem | str,
    out: str | os.PathLike,
    *,
    mode: str = "auto",
    workers: int | None = None,
    memory_budget: str | int | None = None,
    block_size: int | None = None,
    address: str | None = None,
    dtype: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    compressor: str = "auto",
    compression_level: int | None = None,
    dense: bool = False,
    check_blocks: bool = True,
) -> Jacobian:
    """Compute the Jacobian on Ray workers into a Zarr store at `out` and open it.

    Arguments:
        problem_or_spec: a `Problem`, or a spec `path/to/file.py:NAME` / `package.module:NAME`.
        out: the Zarr v3 group to write; an existing one needs `resume` or `overwrite`.
        mode: `auto`, `rev`, `fwd`, `rev-repeat`, `fwd-repeat` or `loop`.
        workers: CPU actors (default: one per core, at most 8); one actor per GPU when the
            cluster has GPUs.
        memory_budget: bytes per worker (`"512MB"`, `"2GiB"`), or one per worker (`"256MB,1GiB"`
            or a list); default: a share of free RAM, or 80% of each GPU's free memory.
        block_size: force this many seeds per block (rounded to whole chunks).
        address: a Ray cluster to join; default `RAY_ADDRESS`, else an embedded local Ray.
            A Ray the caller already initialised is used as is and left running.
        dtype: storage dtype (float16/32/64); default: the output's dtype.
        resume: finish an interrupted run, computing only tiles not recorded as done; `mode`
            left at `auto` and `dtype` at None take the stored ones, and a store computed
            with other options or inputs is refused naming what differs.
        overwrite: replace an existing raijac store at `out`.
        progress: show a progress bar (default: when stderr is a terminal).
        compressor: `auto` (zstd when a sample block compresses 1.5x or better, else none),
            `zstd`, `blosc` or `none`; `compression_level` sets the codec's level.
        dense: for a sparse problem, also store the dense `jacobian` (M x N, mostly zeros).
        check_blocks: check every block on its worker against a plain autograd VJP before
            it is written, and fail the tile (writing nothing) when they differ; costs about
            one backward pass of f per block.

    Returns:
        The opened `Jacobian`; its `summary` holds the run's figures.
    """
    started = time.time()
    out = os.fspath(out)
    if not store.is_url(out):
        out = os.path.abspath(out)  # workers may start in other folders
    problem = _problem(problem_or_spec)
    check_mode(mode, allow_auto=True)
    blas.requested()  # a bad RAIJAC_BLAS fails here, not on the workers
    budgets = parse_budgets(memory_budget)
    _check_block_size(block_size)
    store.compressor_codec("zstd" if compressor == "auto" else compressor, compression_level)  # bad names/levels fail now
    prior = store.read_meta(out) if resume else None
    if prior is not None:  # a resumed run keeps the options it was started with unless told otherwise
        mode = prior.get("requested_mode", mode) if mode == "auto" else mode
        dtype = prior.get("dtype") if dtype is None else dtype
    store_dtype = _store_dtype(problem, dtype)
    if not (address or os.environ.get("RAY_ADDRESS")):  # a cluster's nodes are not this machine
        too_big = _budget_beyond_memory(budgets, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if too_big:
            warnings.warn(too_big, UserWarning, stacklevel=2)
    fp_args = {"mode": mode, "dtype": store_dtype}
    fingerprint = problem.fingerprint(**fp_args)  # evaluates f(x) and validates it
    pattern = resolve_pattern(problem)  # traced or checked now: a bad pattern fails before any work
    if dense and pattern is None:
        raise ProblemError("dense=True (--dense) applies to sparse problems only; a dense problem always stores jacobian.")
    existing = store.check_out(out, resume=resume, overwrite=overwrite)
    colouring: Colouring | None = None
    if existing is not None:
        _check_resumable(existing, out, fingerprint, fingerprint_parts(problem, **fp_args), problem)
        if pattern is not None:
            colouring = _stored_colouring(existing, out, pattern.digest())
    if progress is None:
        progress = _is_terminal()
    source: str | Problem = problem.spec if problem.spec else problem

    with RayExecutor(address=address, workers=workers, spec=problem.spec) as executor:
        # The actors start and load the problem while the driver triages (NOTE: [boot] in executor).
        chain = _may_chain(problem, existing["mode"] if existing else mode)
        executor.preload(source, budgets=budgets, fingerprint=fingerprint, fingerprint_args=fp_args, chain=chain)
        if existing is not None:
            chosen, reason, reports = existing["mode"], existing["mode_reason"], []
            if modes.get(chosen).chain:  # workers trust the driver's check of a traced chain: made here too
                Kernel(make_target(problem, "cpu"), chosen)
        elif pattern is not None:
            chosen, reason, reports, colouring = _sparse_mode(problem, mode)
        else:
            chosen, reason, reports = resolve_mode(problem, mode)
        codec = {"choice": (compressor, "requested")}

        def sample_codec() -> None:  # runs while the workers build and probe (after the problem is shipped)
            if existing is None and compressor == "auto":
                codec["choice"] = _auto_codec(problem, chosen, store_dtype, colouring)

        costs = executor.start(
            source,
            fingerprint=fingerprint,
            fingerprint_args=fp_args,
            mode=chosen,
            dtype=store_dtype,
            budgets=budgets,
            while_probing=sample_codec,
            check_blocks=check_blocks,
        )
        the_plan = _plan_for(
            problem,
            chosen,
            reason,
            store_dtype,
            costs,
            requested_mode=mode,
            block_size=block_size,
            grid=existing.get("layout") if existing else None,
            triage=_triage_rows(reports),
            **_sparse_plan_args(problem, colouring),
        )
        if existing is not None:
            store.clean_partial(out)
            group = store.open_group(out, "r+")
            # A resumed store's blocks are all checked only if every run checked them.
            checked = check_blocks and bool((existing.get("block_check") or {}).get("enabled"))
            store.update_meta(group, block_check=_block_check_meta(checked, problem))
        else:
            if store.is_empty_dir(out):
                store.remove_empty_dir(out)  # an empty folder made for the output
            elif store.exists(out):  # --overwrite of a recognised raijac store, now that all checks passed
                store.remove(out)
            codec_name, codec_reason = codec["choice"]
            ids = {"fingerprint": fingerprint, "fingerprint_parts": fingerprint_parts(problem, **fp_args)}
            codec_args = (codec_name, codec_reason, compression_level)
            group = _create(out, problem, the_plan, ids, codec_args, started, _block_check_meta(check_blocks, problem))
            if colouring is not None:
                _create_sparse(group, problem, the_plan, colouring, dense, codec_name, compression_level)
        ledger = store.Ledger(group)
        pending = ledger.pending()
        skipped = the_plan.n_tiles - len(pending)
        stats = executor.run(the_plan, out, pending, ledger.mark, progress=bool(progress))
    done = not ledger.pending()  # the driver's copy: it wrote every record
    if done and colouring is not None:
        _decompress(group, out, the_plan)
    seconds = time.time() - started
    meta = store.update_meta(
        group,
        complete=done,
        finished=_now(),
        seconds=round(seconds, 3),
        workers=[w.__dict__ for w in the_plan.workers],
        runs=[*group.attrs[store.ATTR].get("runs", []), _run_record(stats, skipped, seconds, check_blocks)],
    )
    result = open_store(out, allow_partial=not done)
    result.summary = {
        "out": out,
        "mode": meta["mode"],
        "requested_mode": mode,
        "reason": meta["mode_reason"],
        "shape": list(the_plan.shape),
        "dtype": store_dtype,
        "complete": done,
        "tiles_total": the_plan.n_tiles,
        "tiles_skipped": skipped,
        "tiles_computed": stats["tiles_computed"],
        "workers": len(the_plan.workers),
        "seconds": round(seconds, 3),
        "bytes": stats["bytes"],
        "compute_seconds": round(stats["compute_s"], 3),
        "write_seconds": round(stats["write_s"], 3),
        "tiles_requeued": stats["tiles_requeued"],
        "tiles_by_worker": stats["by_worker"],
        "nodes": stats["nodes"],
        "all_finite": stats["finite"],
        "peak_rss_growth": stats["rss_growth"],
        "oom_splits": stats["oom_splits"],
        "random": _random_meta(problem),
        "block_check": meta.get("block_check"),
        "block_check_max_rel_err": stats.get("check_max_rel_err"),
    }
    if colouring is not None:
        result.summary["sparse"] = {
            "nnz": the_plan.nnz,
            "colours": the_plan.colours,
            "seed_axis": the_plan.seed_axis,
            "colouring": the_plan.colouring,
            "decompress_seconds": group.attrs[store.ATTR].get("sparse", {}).get("decompress_seconds"),
        }
    return result


def _auto_codec(problem: Problem, mode: str, dtype: str, colouring: Colouring | None) -> tuple[str, str]:
    """`--compressor auto`: try zstd on a real sample block (the first seeds of sample 0)."""
    seeds = None if colouring is None else torch.from_numpy(colouring.colours.astype(np.int64))
    return store.choose_compressor(sample_block(problem, mode, TORCH_DTYPES[dtype], colours=seeds).numpy())


def _stored_colouring(meta: dict, out: str, digest: str) -> Colouring:
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


def _create_sparse(group, problem: Problem, the_plan: Plan, colouring: Colouring, dense: bool, codec: str, level) -> None:
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


def _decompress(group, out: str, the_plan: Plan) -> None:
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
    return {
        "mode": mode,
        "dtype": dtype,
        "spec": spec_key(problem.spec),
        "x": digest([list(x.shape), str(x.dtype)], x),
        "parameters": None if params is None else digest([[i.name, list(i.shape)] for i in problem.param_info], params),
        "shapes": digest(shapes),
    }


# What each part is called in a refusal: the option (Python argument and CLI flag) or input.
_PART_NAMES = {
    "mode": "mode (mode= / --mode)",
    "dtype": "storage dtype (dtype= / --dtype)",
    "spec": "spec",
    "x": "point x",
    "parameters": "parameters",
    "shapes": "shapes or problem kind (batched, wrt, input/output shapes, output dtype, sparsity)",
}


def _differences(stored: dict, now: dict) -> list[str]:
    out = []
    for key, name in _PART_NAMES.items():
        a, b = stored.get(key), now.get(key)
        if a != b:
            shown = f" (stored {a}, this run {b})" if key in ("mode", "dtype", "spec") else ""
            out.append(name + shown)
    return out


def _check_resumable(meta: dict, out: str, fingerprint: str, parts: dict, problem: Problem) -> None:
    if meta.get("fingerprint") != fingerprint:
        stored = meta.get("fingerprint_parts")
        differs = _differences(stored, parts) if isinstance(stored, dict) else []
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
    y = _numpy(problem.y)
    if stored_y.shape != y.shape or not np.allclose(stored_y, y, rtol=1e-5, atol=1e-6, equal_nan=True):
        raise StoreError(
            f"resume=True (--resume) refused: f(x) differs from the y stored in {out}, so f changed since the run "
            "started; use overwrite=True (--overwrite) or a new out."
        )


def _create(out: str, problem: Problem, the_plan: Plan, ids: dict, codec: tuple, started: float, block_check: dict):
    compressor, codec_reason, level = codec
    arrays = {
        "x": (_numpy(problem.x), problem.batched),
        "y": (_numpy(problem.y), problem.batched),
    }
    if problem.params is not None:
        arrays["params"] = (_numpy(problem.params), False)
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
        "random": _random_meta(problem),
        "spec": portable_spec(problem.spec),
        "spec_sha256": spec_digest(problem.spec) if problem.spec else None,
        **ids,  # the fingerprint and its parts
        "seed_axis": the_plan.seed_axis,
        "n_tiles": the_plan.n_tiles,
        "layout": {"chunks": list(the_plan.chunks), "tile_samples": the_plan.tile_samples, "tile_seeds": the_plan.tile_seeds},
        "compressor": compressor,
        "compression_level": level,
        "compressor_reason": codec_reason,
        "block_check": block_check,
        "params": [{"name": i.name, "shape": list(i.shape), "offset": i.offset} for i in problem.param_info],
        "inputs": [leaf.to_dict() for leaf in problem.in_leaves],
        "outputs": [leaf.to_dict() for leaf in problem.out_leaves],
        "versions": _versions(),
        "created": _now(),
        "started": _dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(timespec="seconds"),
    }
    return store.create(
        out,
        name="compressed" if the_plan.sparse else "jacobian",
        shape=the_plan.array_shape,
        chunks=the_plan.chunks,
        dtype=the_plan.dtype,
        n_tiles=the_plan.n_tiles,
        arrays=arrays,
        meta=meta,
        compressor=compressor,
        level=level,
    )


def _block_check_meta(enabled: bool, problem: Problem) -> dict[str, Any]:
    """What the store records of the per-block check (NOTE: [block check] in raijac.kernels)."""
    return {"enabled": bool(enabled), "rtol": check_rtol(problem.dtype) if enabled else None, "reference": "autograd.grad VJP"}


def _run_record(stats: dict, skipped: int, seconds: float, check_blocks: bool = True) -> dict:
    return {
        "block_check": bool(check_blocks),
        # The worst relative error of this run's blocks, once the executor gathers the workers' records' field.
        "block_check_max_rel_err": stats.get("check_max_rel_err"),
        "finished": _now(),
        "seconds": round(seconds, 3),
        "tiles_computed": stats["tiles_computed"],
        "tiles_skipped": skipped,
        "compute_seconds": round(stats["compute_s"], 3),
        "write_seconds": round(stats["write_s"], 3),
        "tiles_by_worker": stats["by_worker"],
        "tiles_requeued": stats["tiles_requeued"],
        "nodes": stats["nodes"],
    }


def _versions() -> dict[str, str]:
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


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()
