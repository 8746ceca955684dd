"""api: `raijac.plan` and `raijac.compute`, wiring problem -> probe -> plan -> executor -> store -> reader.

Everything that can be checked before work starts is checked first (spec, mode, budget,
output location, fingerprint), so bad input never touches an existing store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import warnings
from typing import Any

import numpy as np
import torch

from raijac import blas, modes, record, store
from raijac.chain import may_chain
from raijac.errors import (
    BlockCheckError,
    BudgetError,
    KernelError,
    ModeError,
    ProblemError,
    RaijacError,
    WorkerError,
    first_line,
)
from raijac.executor import RayExecutor, WrongBlocks, default_workers, merge_stats
from raijac.guard import keep_caller_state
from raijac.kernels import Kernel, make_target
from raijac.modes import check_mode, seed_axis
from raijac.planner import BOUND_NOTE, Plan, WorkerCost, format_size, make_plan, parse_budgets
from raijac.probe import (
    ModeReport,
    default_budget,
    measure_cost,
    memo_get,
    memo_put,
    next_mode,
    resolve_mode,
    sample_block,
    seed_bytes,
    stackable,
)
from raijac.problem import Problem, load_problem
from raijac.reader import Jacobian
from raijac.sparsity import Colouring, Pattern, choose, resolve_pattern
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
            try:
                return run(problem, *args, **kwargs)
            except (ModeError, KernelError, WorkerError) as exc:
                try:
                    problem.recheck()  # f's checks, taken on trust from an earlier run, may say why
                except ProblemError as found:
                    raise found from exc
                raise

    return wrapper


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


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Everything `plan` and `compute` check before any work: the problem (f evaluated and
    validated), the mode asked for, the storage dtype, budgets, and a sparse problem's pattern."""

    problem: Problem
    mode: str
    dtype: str
    budgets: list[int] | None
    block_size: int | None
    pattern: Pattern | None

    @property
    def fingerprint_args(self) -> dict[str, str]:
        return {"mode": self.mode, "dtype": self.dtype}

    def remembered(self, *, memo: bool) -> str | None:
        """The mode an earlier run's triage of this f chose, or None: what `choose(memo=True)`
        will answer, known before the workers load, so that they trace f as a chain only
        when it may run as one (8 ms of a warm odeint run)."""
        kept = self._kept_choice(memo)
        return None if kept is None else kept[0]

    def _kept_choice(self, memo: bool) -> tuple[str, str, tuple] | None:
        """(mode, reason, reports) of an earlier run's triage of this f (NOTE: [triage memo]
        in memo), where `memo` allows one (runs whose every block is checked)."""
        if not memo or self.pattern is not None or self.problem.reverse_mode_error is not None:
            return None
        kept = memo_get(self.problem, self.mode)
        return kept["choice"] if kept is not None and "choice" in kept else None

    def choose(self, *, try_all: bool = False, memo: bool = False) -> tuple[str, str, list[ModeReport], Colouring | None]:
        """The mode to run, why, the triage's reports and (sparse problems) the colouring;
        `memo`: reuse an earlier run's triage of the same f (NOTE: [triage memo] in memo),
        only for runs whose every block is checked."""
        if self.pattern is not None:
            return _sparse_mode(self.problem, self.mode, try_all=try_all)
        if self.problem.reverse_mode_error is not None:  # only fwd without block checks gets here (`prepare`)
            return self.mode, "requested; its trial blocks are not compared with torch's reverse mode, wrong for this f", [], None
        kept = self._kept_choice(memo and not try_all)
        if kept is not None:
            mode, reason, reports = kept
            return mode, reason + REMEMBERED, list(reports), None
        mode, reason, reports = resolve_mode(self.problem, self.mode, try_all=try_all)
        if memo:
            _remember(self.problem, self.mode, mode, reason, reports)
        return mode, reason, reports, None


REMEMBERED = " (the triage of an earlier run of this f)"


def _remember(problem: Problem, requested: str, mode: str, reason: str, reports: list[ModeReport]) -> None:
    """Keep a triage's answer for the next run of the same f (NOTE: [triage memo]), without
    the trial blocks' tensors."""
    light = tuple(dataclasses.replace(r, samples=()) for r in reports)
    memo_put(problem, requested, choice=(mode, reason.replace(REMEMBERED, ""), light))


# NOTE: [kept costs] A run of the same f at the same shapes (the triage memo's key: NOTE:
# [triage memo] in raijac.memo) needs the same memory per block: the cost the last run's
# workers measured, per mode, seed axis, storage dtype and device kind, is used again and
# the workers skip their probe block (0.1-0.2 s of a warm ResNet-18 run). Only the cost is
# kept: each worker's budget is its own, a bound that binds is measured exactly again, and
# a block that still runs out of memory is split (NOTE: [OOM] in raijac.worker).
@dataclasses.dataclass(frozen=True)
class _Cost:
    base: int
    per_seed: int
    bound: bool

    def on(self, worker: WorkerCost) -> WorkerCost:
        return dataclasses.replace(worker, base=self.base, per_seed=self.per_seed, bound=self.bound)


def _kept_cost(problem: Problem, requested: str, key: tuple) -> _Cost | None:
    kept = memo_get(problem, requested)
    return None if kept is None else kept.get("costs", {}).get(key)


def _keep_cost(problem: Problem, requested: str, key: tuple, cost: WorkerCost) -> None:
    if cost.per_seed > 0:
        costs = (memo_get(problem, requested) or {}).get("costs", {})
        memo_put(problem, requested, costs={**costs, key: _Cost(cost.base, cost.per_seed, cost.bound)})


def prepare(
    problem: Problem,
    *,
    mode: str = "auto",
    memory_budget: str | int | None = None,
    block_size: int | None = None,
    dtype: str | None = None,
    resumed: dict[str, Any] | None = None,
    check_blocks: bool = True,
) -> Prepared:
    """Check the options and the problem once, for `plan` and `compute` alike; `resumed` (a
    store's metadata) supplies the mode and dtype left at their defaults."""
    check_mode(mode, allow_auto=True)
    blas.requested()  # a bad RAIJAC_BLAS fails here, not on the workers
    budgets = parse_budgets(memory_budget)
    _check_block_size(block_size)
    if resumed is not None:  # a resumed run keeps the options it was started with unless told otherwise
        # The mode the store runs in, named (as `inspect` shows it), is the one its requested mode chose.
        mode = resumed.get("requested_mode", mode) if mode in ("auto", resumed.get("mode")) else mode
        dtype = resumed.get("dtype") if dtype is None else dtype
    store_dtype = _store_dtype(problem, dtype)  # evaluates f(x) and validates it
    wrong = problem.reverse_mode_error  # NOTE: [adjoint test] in raijac.guard
    if wrong is not None and not (mode == "fwd" and not check_blocks and wrong.fwd_works):
        raise ProblemError(str(wrong))
    pattern = resolve_pattern(problem)  # traced or checked now: a bad pattern fails before any work
    return Prepared(problem, mode, store_dtype, budgets, block_size, pattern)


def _plan_for(
    problem: Problem, mode: str, reason: str, dtype: str, costs: list[WorkerCost], axis: str | None = None, **kw: Any
) -> Plan:
    """The plan for `mode`, its tiles along `axis` (default: the mode's own seed axis)."""
    return make_plan(
        mode=mode,
        reason=reason,
        batch_size=problem.batch_size,
        n_out=problem.n_out,
        n_in=problem.n_in,
        seed_axis=axis or seed_axis(mode),
        dtype=dtype,
        itemsize=np.dtype(dtype).itemsize,
        workers=costs,
        **kw,
    )


def _unbounded(costs: list[WorkerCost]) -> list[WorkerCost]:
    """The costs as if memory were free: the plan load balance alone would make."""
    return [dataclasses.replace(c, base=0, per_seed=1, bound=False) for c in costs]


# NOTE: [merge worth] Merging adjacent tiles into one call saves a call's overhead (a few ms:
# a Ray round trip and a store open) per tile. Above this many bytes a tile's own compute and
# write take far longer, so fewer tiles per call changes nothing worth a full measurement,
# which runs a probe block of f on every worker (3 s on ResNet-18's parameters).
MERGE_WORTH = 64 * 2**20


def _budget_binds(bounded: Plan, free: Plan) -> bool:
    """Whether the plan from upper-bound costs (NOTE: [quick probe] in raijac.probe) differs
    from the one memory would not limit: then the exact costs are worth measuring."""
    merge_matters = bounded.tile_samples * bounded.tile_seeds * bounded.n_other * bounded.itemsize < MERGE_WORTH

    def layout(p: Plan) -> tuple:
        blocks = p.blocks if merge_matters else ()
        return (p.chunks, p.tile_samples, p.tile_seeds, blocks, [n for n in p.notes if n != BOUND_NOTE])

    return any(c.bound for c in bounded.workers) and layout(bounded) != layout(free)


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
    ready = prepare(_problem(problem_or_spec), mode=mode, memory_budget=memory_budget, block_size=block_size, dtype=dtype)
    problem, budgets, store_dtype = ready.problem, ready.budgets, ready.dtype
    chosen, reason, reports, colouring = ready.choose(try_all=True)
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
    keep_ray: bool = True,
) -> Jacobian:
    """Compute the Jacobian on Ray workers into a Zarr store at `out` and open it.

    Arguments:
        problem_or_spec: a `Problem`, or a spec `path/to/file.py:NAME` / `package.module:NAME`.
        out: the Zarr v3 group to write; an existing one needs `resume` or `overwrite`.
        mode: `auto` or one of `raijac.MODES` (the registry in `raijac.modes` says what each needs).
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
        keep_ray: keep the embedded local Ray this call starts (when no Ray is running and
            no address is given) for later calls in this process, shut down at exit; False
            stops it when the call returns.

    Returns:
        The opened `Jacobian`; its `summary` holds the run's figures.
    """
    started = time.time()
    out = os.fspath(out)
    if not store.is_url(out):
        out = os.path.abspath(out)  # workers may start in other folders
    problem = _problem(problem_or_spec)
    store.compressor_codec("zstd" if compressor == "auto" else compressor, compression_level)  # bad names/levels fail now
    resumed = store.read_meta(out) if resume else None
    if check_blocks:
        problem.reuse_checks()  # NOTE: [checked before] in raijac.problem
    ready = prepare(
        problem,
        mode=mode,
        memory_budget=memory_budget,
        block_size=block_size,
        dtype=dtype,
        resumed=resumed,
        check_blocks=check_blocks,
    )
    mode, budgets, store_dtype, pattern = ready.mode, ready.budgets, ready.dtype, ready.pattern
    if not (address or os.environ.get("RAY_ADDRESS")):  # a cluster's nodes are not this machine
        too_big = _budget_beyond_memory(budgets, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if too_big:
            warnings.warn(too_big, UserWarning, stacklevel=2)
    fp_args = ready.fingerprint_args
    fingerprint = problem.fingerprint(**fp_args)
    parts = record.fingerprint_parts(problem, **fp_args)
    # What workers check; one that builds the problem from its spec also compares f(x) (NOTE: [built apart] in worker).
    worker_ids = dict(fingerprint=fingerprint, fingerprint_args=fp_args, fingerprint_parts=parts)
    if problem.spec:
        worker_ids["y_sketch"] = record.y_sketch(problem)
    named = record.spec_meta(problem)  # before Ray is joined (record.spec_meta)
    if dense and pattern is None:
        raise ProblemError("dense=True (--dense) applies to sparse problems only; a dense problem always stores jacobian.")
    existing = store.check_out(out, resume=resume, overwrite=overwrite)
    colouring: Colouring | None = None
    if existing is not None:
        record.check_resumable(existing, out, fingerprint, parts, problem)
        if pattern is not None:
            colouring = record.stored_colouring(existing, out, pattern.digest())
    if progress is None:
        progress = _is_terminal()
    source: str | Problem = problem.spec if problem.spec else problem
    removing = None  # the overwritten store's deletion (NOTE: [removed aside] in store)
    ray_session = RayExecutor(address=address, workers=workers, spec=problem.spec, keep_ray=keep_ray)
    with ray_session as executor, _stage(out, problem, existing) as staged:
        # The actors start and load the problem while the driver triages (NOTE: [boot] in executor).
        chain = _may_chain(problem, existing["mode"] if existing else ready.remembered(memo=check_blocks) or mode)
        executor.preload(source, budgets=budgets, chain=chain, **worker_ids)
        if existing is not None:
            chosen, reason, reports = existing["mode"], existing["mode_reason"], []
            if modes.get(chosen).chain:  # workers trust the driver's check of a traced chain: made here too
                Kernel(make_target(problem, "cpu"), chosen)
        else:
            chosen, reason, reports, colouring = ready.choose(memo=check_blocks)
        codec = {"choice": (compressor, "requested")}

        def sample_codec() -> None:  # runs while the workers build and probe (after the problem is shipped)
            if existing is None and compressor == "auto":
                kept = memo_get(problem, mode) if check_blocks and colouring is None else None
                if kept is not None and "codec" in kept:
                    codec["choice"] = kept["codec"]
                else:
                    codec["choice"] = _auto_codec(problem, chosen, store_dtype, colouring, reports)
                    if check_blocks and colouring is None:
                        memo_put(problem, mode, codec=codec["choice"])

        # A store that a crossed fallback finished keeps its tiles' axis (NOTE: [crossed fallback]).
        axis = (existing or {}).get("seed_axis") or seed_axis(chosen)

        def start(run_mode: str, measure: str, while_probing: Any = None) -> list[WorkerCost]:
            """The workers in `run_mode`, with their memory costs (NOTE: [quick probe]), or
            those an earlier run of this f measured (NOTE: [kept costs])."""
            kept = _kept_cost(problem, mode, (run_mode, axis, store_dtype, executor.device, colouring is None))
            if kept is not None and kept.bound and measure == "full":
                kept = None  # an upper bound does not stand in for the exact cost asked for
            costs = executor.start(
                source,
                **worker_ids,
                mode=run_mode,
                dtype=store_dtype,
                budgets=budgets,
                while_probing=while_probing,
                check_blocks=check_blocks,
                measure="none" if kept else measure,
                axis=axis,
            )
            return costs if kept is None else [kept.on(c) for c in costs]

        tried, fell_early = [chosen], []
        while True:
            try:
                costs = start(chosen, "quick", sample_codec)
                break
            except KernelError as exc:  # NOTE: [worker-only failure] in executor
                chosen, reason, fell = _fall_back(
                    problem,
                    mode,
                    tried,
                    reports,
                    exc,
                    reason=reason,
                    axis=axis,
                    crossing=existing is not None,
                    sparse=colouring is not None,
                    remember=check_blocks,
                )
                if existing is None:  # no tiles yet: the store this run makes takes the new mode's axis
                    axis = seed_axis(chosen)
                fell_early.append(fell)
        plan_args = dict(
            axis=axis,
            requested_mode=mode,
            block_size=block_size,
            grid=existing.get("layout") if existing else None,
            triage=_triage_rows(reports),
            **_sparse_plan_args(problem, colouring),
        )
        try:
            the_plan = _plan_for(problem, chosen, reason, store_dtype, costs, **plan_args)
            free = _plan_for(problem, chosen, reason, store_dtype, _unbounded(costs), **plan_args)
            binds = _budget_binds(the_plan, free)
        except BudgetError:  # at the upper bound: the exact cost decides
            binds = any(c.bound for c in costs)
            if not binds:
                raise
        if binds:
            costs = executor.measure()
            the_plan = _plan_for(problem, chosen, reason, store_dtype, costs, **plan_args)
        _keep_cost(problem, mode, (chosen, axis, store_dtype, executor.device, colouring is None), costs[0])
        if existing is not None:
            store.clean_partial(out)
            group = store.open_group(out, "r+")
            # A resumed store's blocks are all checked only if every run checked them.
            checked = check_blocks and bool((existing.get("block_check") or {}).get("enabled"))
            store.update_meta(group, block_check=record.block_check_meta(checked, problem))
        else:
            if store.is_empty_dir(out):
                store.remove_empty_dir(out)  # an empty folder made for the output
            elif store.exists(out):  # --overwrite of a recognised raijac store, now that all checks passed
                removing = store.remove(out, wait=False)  # NOTE: [removed aside] in store
            codec_name, codec_reason = codec["choice"]
            ids = {**named, "fingerprint": fingerprint, "fingerprint_parts": parts}
            codec_args = (codec_name, codec_reason, compression_level)
            checks = record.block_check_meta(check_blocks, problem)
            group = record.create(out, problem, the_plan, ids, codec_args, started, checks, staged)
            if fell_early:
                store.update_meta(group, fallbacks=fell_early)
            if colouring is not None:
                record.create_sparse(group, problem, the_plan, colouring, dense, codec_name, compression_level)
        ledger = store.Ledger(group)
        pending = ledger.pending()
        skipped = the_plan.n_tiles - len(pending)
        stats: dict[str, Any] | None = None
        while True:
            try:
                stats = merge_stats(stats, executor.run(the_plan, out, pending, ledger.mark, progress=bool(progress)))
                break
            except WrongBlocks as exc:
                # NOTE: [fallback] A block that failed its check was not written; the tiles
                # finished in this mode were checked and stay. auto goes on with the next mode
                # along the same seed axis (same tiles, same store layout) for what is left.
                stats = merge_stats(stats, exc.stats)
                chosen, reason, fell = _fall_back(
                    problem,
                    mode,
                    tried,
                    reports,
                    exc,
                    reason=reason,
                    axis=axis,
                    crossing=True,
                    sparse=colouring is not None,
                    remember=check_blocks,
                )
                meta = group.attrs[store.ATTR]
                store.update_meta(group, mode=chosen, mode_reason=reason, fallbacks=[*meta.get("fallbacks", []), fell])
                costs = start(chosen, "full")
                grid = {"chunks": list(the_plan.chunks), "tile_samples": the_plan.tile_samples, "tile_seeds": the_plan.tile_seeds}
                the_plan = _plan_for(problem, chosen, reason, store_dtype, costs, **{**plan_args, "grid": grid})
                pending = ledger.pending()
    if removing is not None:
        removing.join()
    done = not ledger.pending()  # the driver's copy: it wrote every record
    if done and colouring is not None:
        record.decompress(group, out, the_plan)
    sparse = None
    if colouring is not None:
        sparse = {
            "nnz": the_plan.nnz,
            "colours": the_plan.colours,
            "seed_axis": the_plan.seed_axis,
            "colouring": the_plan.colouring,
            "decompress_seconds": group.attrs[store.ATTR].get("sparse", {}).get("decompress_seconds"),
        }
    meta = group.attrs[store.ATTR]
    if stats["check_unchecked"]:  # blocks f gave no autograd reference for: the store must not say "every block"
        checked = meta.get("block_check") or {}
        unchecked = int(checked.get("unchecked") or 0) + stats["check_unchecked"]
        meta = store.update_meta(group, block_check={**checked, "unchecked": unchecked})
    summary = record.RunSummary.of(
        the_plan,
        stats,
        out=out,
        mode=meta["mode"],
        requested_mode=mode,
        reason=meta["mode_reason"],
        dtype=store_dtype,
        complete=done,
        tiles_skipped=skipped,
        seconds=round(time.time() - started, 3),
        random=record.random_meta(problem),
        block_check=meta.get("block_check"),
        sparse=sparse,
    )
    meta = store.update_meta(
        group,
        complete=done,
        finished=record.now(),
        seconds=summary.seconds,
        workers=[w.__dict__ for w in the_plan.workers],
        runs=[*meta.get("runs", []), summary.run_record()],
    )
    if done and colouring is not None:
        _probe_sparse(group, out, problem)
    result = Jacobian.written(out, meta, ledger.done, allow_partial=not done)
    result.summary = summary.to_dict()
    return result


def _probe_sparse(group: Any, out: str, problem: Problem) -> None:
    """Check a finished sparse store's J against one fresh JVP and VJP of f (`raijac verify`
    with one probe); refuse it, marked incomplete, where they differ.

    NOTE: [sparse probe] A pattern that misses a non-zero sharing a colour with a pattern
    entry cannot show in the compressed product (decompress's stray check): its value is
    added into that entry, and a periodic stencil given a tridiagonal pattern was stored
    1e-4 off in float64 without an error. A random probe of the whole J sees it; it cost
    0.03 s of a 4 s run on a 300 x 300 grid, 0.3 s of 3 s at 10^6 unknowns.
    """
    from raijac.verify import verify  # verify reads stores: imported here, as the CLI does

    report = verify(out, problem=problem, probes=1)
    if not report.ok:
        store.update_meta(group, complete=False)
        raise ProblemError(
            f"the stored J fails a random probe against f: {report.verdict().removeprefix('FAILED: ')} The computed "
            f"tiles are kept in {out}, marked incomplete."
        )


def _stage(out: str, problem: Problem, existing: dict | None) -> contextlib.AbstractContextManager:
    """A new local store's x, y and params, written while the workers load and deleted if the
    run fails before its store is made (NOTE: [staged store] in raijac.store); else nothing."""
    if existing is None and not store.is_url(out):
        return store.Staged(out, record.arrays(problem))
    return contextlib.nullcontext()


def _fall_back(
    problem: Problem,
    requested: str,
    tried: list[str],
    reports: list[ModeReport],
    failed: Exception,
    *,
    reason: str,
    axis: str,
    crossing: bool,
    sparse: bool,
    remember: bool,
) -> tuple[str, str, dict[str, Any]]:
    """After a block of `tried[-1]` failed its check or raised on a worker (NOTE: [fallback],
    [worker-only failure] in executor): the mode auto goes on in (appended to `tried`, its
    triage to `reports`), the reason now, and the store's record of the step; warns, and
    keeps the mode for the next run of this f where `remember`. `crossing`: tiles of the
    seed axis `axis` exist, so a mode along the other axis fills them from its blocks."""
    cause, tiles = (failed.cause, failed.tiles) if isinstance(failed, WrongBlocks) else (failed, [])
    chosen, more = _fallback_mode(problem, requested, tried, axis, sparse, failed)
    reports.extend(more)
    tried.append(chosen)
    crossed = crossing and seed_axis(chosen) != axis
    how = "failed its check" if isinstance(cause, BlockCheckError) else "raised on a worker"
    reason = f"{reason}; then {chosen}, after a block of {tried[-2]} {how}"
    if crossed:
        reason += f" ({'row' if axis == 'rows' else 'column'} tiles from its blocks)"
    fell = {"from": tried[-2], "to": chosen, "tiles": tiles, "why": first_line(cause), "crossed": crossed}
    warnings.warn(f"raijac: {fell['why']}; going on in mode {chosen} for the tiles left", UserWarning, stacklevel=4)
    if remember:  # the next run of this f starts where this one ended
        _remember(problem, requested, chosen, reason, reports)
    return chosen, reason, fell


def _fallback_mode(
    problem: Problem, requested: str, tried: list[str], axis: str, sparse: bool, failed: Exception
) -> tuple[str, list[ModeReport]]:
    """The mode auto goes on in after a block of `tried[-1]` failed its check or raised, with the
    triage's reports (NOTE: [fallback]); raises the failure, saying what to do, when there
    is none (or a mode was requested)."""
    # A sparse problem's colouring is its seed axis's: it falls back along that axis only.
    found = next_mode(problem, tried, axis, sparse=sparse) if requested == "auto" else None
    if found is None and requested == "auto" and not sparse:
        # NOTE: [crossed fallback] No mode along the store's seeds is left: a mode along the
        # other axis fills the tiles left, each from blocks of all its rows (columns) cut to
        # the tile's columns (rows): more work per tile, but the finished tiles, the layout
        # and the ledger stay as they are.
        found = next_mode(problem, tried, "rows" if axis == "cols" else "cols")
    if found is None:
        left = "no other mode passes the triage" if requested == "auto" else f"mode {requested} was requested"
        raise WorkerError(f"{failed} ({left}; rerun with --overwrite and --mode loop, or another mode)") from None
    return found


def _auto_codec(
    problem: Problem, mode: str, dtype: str, colouring: Colouring | None, reports: list[ModeReport] = ()
) -> tuple[str, str]:
    """`--compressor auto`: try zstd on real blocks: the chosen mode's trial blocks (spread
    over samples and seeds), else a block of the first seeds of sample 0 made for it."""
    kept = [t for r in reports if r.mode == mode and r.ok for t in r.samples]
    if kept and colouring is None:
        return store.choose_compressor(torch.cat(kept).to(TORCH_DTYPES[dtype]).numpy())
    seeds = None if colouring is None else torch.from_numpy(colouring.colours.astype(np.int64))
    return store.choose_compressor(sample_block(problem, mode, TORCH_DTYPES[dtype], colours=seeds).numpy())


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()
