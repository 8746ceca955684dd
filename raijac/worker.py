"""worker: the body of one Ray actor (kernels + store; the executor wraps it with ray.remote).

A worker builds its own copy of the problem (from the spec, or unpickled from the object
store), checks its fingerprint against the driver's, measures its own memory cost, and
then computes blocks and writes them straight into the Zarr array. Only a small result
record travels back to the driver. Everything is built lazily, so an actor that Ray
restarts after a crash rebuilds itself on its next call.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from raijac import store
from raijac.errors import BlockCheckError, KernelError, ProblemError, RaijacError, StoreError, first_line
from raijac.guard import stop_outer_grad
from raijac.kernels import Kernel, NoReference, Reference, Target, block_error, block_rtol, make_target, seed_axis
from raijac.planner import WorkerCost
from raijac.probe import _proc_status, _reset_peak_rss, default_budget, glibc, measure_cost, quick_cost, seed_bytes, warm_up
from raijac.problem import Problem, load_problem
from raijac.record import differences, sketch_agrees
from raijac.record import fingerprint_parts as fingerprint_parts_of
from raijac.shipping import Packed

_FIRST_CHECKED: set[str] = set()  # devices whose first block and check this process has run

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


class Worker:
    """Computes and writes blocks of one problem on one device."""

    def __init__(
        self,
        source: str | Problem,
        *,
        name: str,
        fingerprint: str,
        fingerprint_args: dict[str, Any],
        fingerprint_parts: dict[str, str | None] | None = None,
        y_sketch: dict[str, Any] | None = None,
        mode: str,
        dtype: str,
        device: str = "cpu",
        threads: int | None = None,
        budget: int | None = None,
        local_workers: int = 1,
        loaded: tuple[Problem, Target] | None = None,
        check_blocks: bool = True,
        axis: str | None = None,
    ) -> None:
        self.source = source
        self.loaded = loaded  # (problem, target) when the host preloaded them
        self.name = name
        self.fingerprint = fingerprint
        self.fingerprint_args = fingerprint_args
        self.fingerprint_parts = fingerprint_parts
        self.y_sketch = y_sketch
        self.mode = mode
        self.dtype = TORCH_DTYPES[dtype]
        self.device = torch.device("cuda:0" if device == "cuda" else device)
        self.threads = threads
        self.budget = budget
        self.local_workers = local_workers
        self.kernel: Kernel | None = None
        self._compute_lock = threading.Lock()
        self._node: str | None = None
        self.max_seeds: int | None = None  # set after an out-of-memory split (NOTE: [OOM])
        self.oom_splits = 0
        self.check_blocks = check_blocks  # NOTE: [block check] in kernels
        # The store's seed axis; a row mode may fill column tiles (NOTE: [crossed fallback] in api).
        self.axis = axis or seed_axis(mode)
        self.crossed = self.axis != seed_axis(mode)
        self._worst: float | None = None  # this call's worst relative error against the reference
        self._unchecked = 0  # this call's blocks whose reference could not be computed
        self._reference: Reference | None = None
        self.problem: Problem | None = None
        self._out: str | None = None
        self._array = None
        self.limit: int | None = None  # the budget, or the default one: found with the kernel
        self.idle_rss: int | None = None  # RSS holding the problem and the open store

    @property
    def node(self) -> str:
        """The Ray node (or host) this worker runs on: asked once, on first use."""
        if self._node is None:
            self._node = _node_id()
        return self._node

    def _ready(self) -> Kernel:
        if self.kernel is None:
            if self.loaded is None:
                self.loaded = load(
                    self.source,
                    name=self.name,
                    fingerprint=self.fingerprint,
                    fingerprint_args=self.fingerprint_args,
                    fingerprint_parts=self.fingerprint_parts,
                    y_sketch=self.y_sketch,
                    device=self.device,
                    threads=self.threads,
                )
            self.problem, target = self.loaded
            self.kernel = Kernel(target, self.mode)
            self.limit = self.budget or default_budget(self.device, self.local_workers)
            if self.device.type == "cpu":  # the host's heap holds the blocks (NOTE: [heap])
                bound_heap(heap_threshold(self.limit), keep=heap_kept(self.limit))
        return self.kernel

    def probe(self, measure: str = "full") -> WorkerCost:
        """Build the problem and report this worker's budget and memory cost per block:
        `measure` "full" (measure_cost), "quick" (an upper bound from one block: NOTE:
        [quick probe] in raijac.probe) or "none" (another worker of the same kind measures
        it: base and per_seed are then 0)."""
        with self._compute_lock:
            return self._probe(measure)

    def _probe(self, measure: str = "full") -> WorkerCost:
        kernel = self._ready()
        with self._mode_failures(kernel, 0, 1):
            return self._cost(kernel, measure)

    @contextlib.contextmanager
    def _mode_failures(self, kernel: Kernel, b0: int, b1: int) -> Iterator[None]:
        """An error of the kernel on samples b0:b1 raised as a KernelError, unless it is f's
        own (plain f raises too) or the memory's (NOTE: [worker-only failure] in executor)."""
        try:
            yield
        except (RaijacError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            if _out_of_memory(exc) or self._f_fails_too(kernel, b0, b1):
                raise
            raise KernelError(f"mode {self.mode} raised {type(exc).__name__} on worker {self.name}: {first_line(exc)}") from exc

    def _f_fails_too(self, kernel: Kernel, b0: int, b1: int) -> bool:
        """Whether a plain forward pass of f on samples b0:b1 raises as well: then the error is
        f's own (another mode would fail alike), not the mode's (NOTE: [worker-only failure])."""
        reference = Reference(kernel.target)
        try:
            if kernel.target.shared_fn is not None:
                reference.shared_output(b0, b1)
            else:
                reference.output(b0, b1)
        except Exception:
            return True
        return False

    def _cost(self, kernel: Kernel, measure: str) -> WorkerCost:
        """The memory the kernel takes (NOTE: [quick probe] in probe), having paid its first
        block's one-off costs."""
        if measure == "none":  # still pay a first block's one-off costs now, not in the run
            self._first_check(kernel)
            kernel.clear()
            return WorkerCost(self.name, self.device.type, int(self.limit), 0, 0)
        cost = quick_cost(kernel, self.device) if measure == "quick" else measure_cost(kernel, self.device)
        self._first_check(kernel)
        kernel.clear()
        # The block is also copied to the storage dtype and encoded: count those bytes per seed.
        t = kernel.target
        other = t.n_in if self.axis == "rows" else t.n_out
        per_seed = seed_bytes(cost.per_seed, other, self.dtype.itemsize)
        return WorkerCost(self.name, self.device.type, int(self.limit), cost.base, per_seed, bound=measure == "quick")

    def run(self, out: str, b0: int, b1: int, s0: int, s1: int, tile: tuple[int, int] | None = None) -> dict[str, Any]:
        """Compute the block (samples b0:b1, seeds s0:s1), write it to `out`, report timings;
        `tile` (samples, seeds) is the plan's tile, the unit the block is computed in.

        NOTE: [pipeline] The host runs two calls at once but only one computes (the lock):
        while block k is compressed and written, block k+1 is already being computed.

        NOTE: [tile by tile] A block of several tiles saves calls and writes, but one vmap
        over all its samples can cost more than the tiles one after the other: a GPT's
        parameter Jacobian (200 rows of 115k) took 0.69 s for 4 samples at once, 0.38 s
        one by one (its working set leaves the caches). So the tiles are computed one by one
        and written as they are, without a copy into one array.
        """
        with self._compute_lock:
            kernel = self._ready()
            if self._out != out:
                group = store.open_group(out, "r+")
                if "compressed" in group:  # a sparse problem: seeds are the stored colours
                    kernel.colours = torch.from_numpy(group["colours"][...].astype("int64")).to(self.device)
                    self._array = store.block_array(group, "compressed")
                else:
                    kernel.colours = None
                    self._array = store.block_array(group, "jacobian")
                self._out = out
                # Idle = holding the problem and the open store (and the heap an earlier run
                # kept, at most half this run's budget: NOTE: [kept heap]); growth counts from here.
                self.idle_rss = _reset_peak_rss()
            start = time.perf_counter()
            self._worst, self._unchecked = None, 0
            pieces = [(box, self._compute(kernel, *box)) for box in _tiles_of(b0, b1, s0, s1, tile)]
            computed = time.perf_counter()
        batched = self.problem.batched
        for (p_b0, p_b1, p_s0, p_s1), data in pieces:
            region = store.block_region(self.axis, batched, p_b0, p_b1, p_s0, p_s1)
            store.write_block(self._array, region, data if batched else data[0])
        result = {
            "worker": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "compute_s": computed - start,
            "write_s": time.perf_counter() - computed,
            "bytes": sum(int(data.nbytes) for _, data in pieces),
            "finite": all(_all_finite(data) for _, data in pieces),
            "rss_growth": _peak_rss_growth(self.idle_rss),
            "oom_splits": self.oom_splits,
            "check_max_rel_err": self._worst,  # None: not checked (--no-block-check, or no reference)
            "check_unchecked": self._unchecked,
        }
        del pieces, data
        self._trim_over_budget()
        return result

    def _trim_over_budget(self) -> None:
        """Hand the free heap back where this block left RSS more than the budget above idle
        (NOTE: [heap]); CPU workers only."""
        if self.device.type != "cpu" or self.idle_rss is None:
            return
        rss = _proc_status("VmRSS")
        if rss is not None and rss - self.idle_rss > self.limit:
            trim_heap()

    def _compute(self, kernel: Kernel, b0: int, b1: int, s0: int, s1: int) -> np.ndarray:
        """The block in the storage dtype; on out-of-memory, in halves (and smaller from then on).

        NOTE: [OOM] The planner's measured cost can be wrong (fragmentation, another process
        on the GPU). Then the block is split along seeds (or samples) until the pieces fit,
        and later blocks are cut to the size that worked, so only this tile pays the retry.
        """
        axis = 1 if self.axis == "rows" else 2
        if self.max_seeds and s1 - s0 > self.max_seeds:
            cuts = range(s0, s1, self.max_seeds)
            return np.concatenate([self._compute(kernel, b0, b1, c, min(c + self.max_seeds, s1)) for c in cuts], axis)
        try:
            with self._mode_failures(kernel, b0, b1):
                block = self._crossed(kernel, b0, b1, s0, s1) if self.crossed else kernel(b0, b1, s0, s1).detach()
                if self.check_blocks:
                    self._check(kernel, block, b0, b1, s0, s1)
            stored = block.to(self.dtype)
            if stored.dtype != block.dtype and bool(torch.isinf(stored).any()) and not bool(torch.isinf(block).any()):
                biggest = float(block.abs().nan_to_num(0.0).max())
                raise StoreError(
                    f"J reaches {biggest:.3g} in the block (rows or columns {s0}:{s1}), beyond the largest "
                    f"{str(self.dtype).replace('torch.', '')} ({torch.finfo(self.dtype).max:.6g}), so it would be stored "
                    "as inf; store a wider dtype (dtype='float32', --dtype float32)"
                )
            return stored.cpu().numpy()
        except torch.OutOfMemoryError:
            kernel.clear()
            if self._reference is not None:
                self._reference.clear()
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.oom_splits += 1
            if s1 - s0 > 1:
                mid = s0 + (s1 - s0) // 2
                self.max_seeds = mid - s0
                return np.concatenate([self._compute(kernel, b0, b1, s0, mid), self._compute(kernel, b0, b1, mid, s1)], axis)
            if b1 - b0 > 1:
                mid = b0 + (b1 - b0) // 2
                return np.concatenate([self._compute(kernel, b0, mid, s0, s1), self._compute(kernel, mid, b1, s0, s1)], 0)
            raise

    def _crossed(self, kernel: Kernel, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        """Columns s0:s1 of samples b0:b1, (nb, M, k), from a row mode's blocks of all rows, in
        chunks of rows about the size of the tile (NOTE: [crossed fallback] in api)."""
        t = kernel.target
        m, n = t.n_out, t.n_in
        step = max(1, min(m, ((s1 - s0) * m) // max(n, 1)))
        return torch.cat([kernel(b0, b1, r, min(r + step, m)).detach()[:, :, s0:s1] for r in range(0, m, step)], dim=1)

    def _first_check(self, kernel: Kernel) -> None:
        """One small block, and its check: a process's first autograd backward costs several
        times a later one, better paid here than in the first tile (once per process: a
        kept host has paid it in an earlier run)."""
        if self.device.type in _FIRST_CHECKED:
            return
        block = self._crossed(kernel, 0, 1, 0, 1) if self.crossed else kernel(0, 1, 0, 1).detach()
        if self.check_blocks:
            self._check(kernel, block, 0, 1, 0, 1)
        _FIRST_CHECKED.add(self.device.type)

    def _check(self, kernel: Kernel, block: torch.Tensor, b0: int, b1: int, s0: int, s1: int) -> None:
        """Refuse a block that disagrees with a plain autograd VJP (NOTE: [block check] in kernels)."""
        rows = self.axis == "rows"
        if self._reference is None or self._reference.target is not kernel.target:
            self._reference = Reference(kernel.target)
        forward = kernel.plain_forward(b0, b1)
        if forward is not None:  # NOTE: [shared forward] in raijac.kernels
            self._reference.adopt(b0, b1, forward)
        try:
            seed = b0 * 1_000_003 + s0
            err = block_error(kernel.target, block, b0, b1, s0, s1, rows, kernel.colours, seed, self._reference)
        except NoReference:  # f has no backward to compare with (a jvp-only custom Function): cannot check
            self._unchecked += 1
            return
        self._worst = err if self._worst is None else max(self._worst, err)
        rtol = block_rtol(kernel.target, block)
        if not err <= rtol:
            axis = "rows" if rows else "columns"
            what = ("colours of " + axis) if kernel.colours is not None else axis
            samples = f"samples {b0}:{b1}, " if self.problem is not None and self.problem.batched else ""
            raise BlockCheckError(
                f"the block ({samples}{what} {s0}:{s1}) differs from plain autograd by a relative error of {err:.3g} "
                f"(tolerance {rtol:g}), so mode {self.mode} gives wrong numbers for this f; the block was not written"
            )


def _all_finite(data: np.ndarray) -> bool:
    """Whether every entry is finite: min and max propagate NaN and show an inf, in one pass
    without the block-sized mask of `np.isfinite(data).all()` (a third of its time)."""
    if data.size == 0:
        return True
    return all(bool(torch.isfinite(v)) for v in torch.aminmax(torch.from_numpy(data)))


def _out_of_memory(exc: BaseException) -> bool:
    """A CPU allocation that failed (torch raises a plain RuntimeError there): the budget's
    matter, not the mode's (NOTE: [worker-only failure] in executor)."""
    return "allocate memory" in str(exc) or "not enough memory" in str(exc)


def _tiles_of(b0: int, b1: int, s0: int, s1: int, tile: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    """The plan's tiles that make up a block (NOTE: [tile by tile]); the block itself where
    no tile is given. Tiles lie on a grid from 0, so a merged block's cuts are multiples."""
    if tile is None:
        return [(b0, b1, s0, s1)]
    samples, seeds = tile
    return [
        (b, min(b + samples, b1), s, min(s + seeds, s1))
        for b in range(b0, b1, max(samples, 1))
        for s in range(s0, s1, max(seeds, 1))
    ]


def load(
    source: str | Problem,
    *,
    name: str,
    fingerprint: str,
    fingerprint_args: dict[str, Any],
    fingerprint_parts: dict[str, str | None] | None = None,
    y_sketch: dict[str, Any] | None = None,
    device: torch.device | str,
    threads: int | None,
) -> tuple[Problem, Target]:
    """Build a worker's problem, check it is the driver's, and put it on the device.

    NOTE: [built apart] A worker given a spec builds the problem itself. The fingerprint
    covers x, the parameters of a parameter Jacobian and f's other inputs, not what f holds:
    a spec that drew an input Jacobian's module weights unseeded gave every worker its own
    weights, and a J whose rows came from two functions, none of them y's, was stored
    without an error. Such a worker evaluates f(x) anyway (its own checks), so it compares
    that with the driver's y at evenly spaced entries (`y_sketch`), and for an input
    Jacobian one fixed VJP of f too (y = tanh(W x) is 0 at x = 0 whatever W), and refuses
    to differ.
    A worker given the driver's pickled problem holds the same f and needs no such check.
    """
    device = torch.device("cuda:0" if device == "cuda" else device)
    if threads:
        torch.set_num_threads(threads)
    problem = load_problem(source, device=device) if isinstance(source, str) else source
    got = problem.fingerprint(**fingerprint_args)
    if got != fingerprint:  # NOTE: [one-thread build] in raijac.problem says how a build stays the same
        differs = differences(fingerprint_parts, fingerprint_parts_of(problem, **fingerprint_args)) if fingerprint_parts else []
        what = f"in its {' and its '.join(differs)}" if differs else f"(fingerprint {got} != {fingerprint})"
        raise ProblemError(
            f"the problem built on worker {name} differs from the driver's {what}; building the spec must be "
            "deterministic, the same tensors in every process: seed every generator it draws from, and read only "
            "files every node has the same copy of."
        )
    if y_sketch is not None and not sketch_agrees(y_sketch, problem):  # NOTE: [built apart]
        raise ProblemError(
            f"the problem built on worker {name} gives another f(x) or derivative than the driver's (the same x), so building the spec "
            "draws f's weights or constants differently in each process; seed every generator it draws from, module "
            "weights included (torch.manual_seed before building the model), or load them from a file."
        )
    if isinstance(source, str):  # built here, checked the driver's: this process's own (NOTE: [no outer graph] in guard)
        stop_outer_grad(problem)
    return problem, make_target(problem, device, trusted=True)  # the driver checked a traced chain (api.compute)


def _node_id() -> str:
    """The Ray node this worker runs on (several nodes may share one host), else the host name."""
    try:
        import ray

        if ray.is_initialized():  # asking an uninitialised Ray would start one
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return socket.gethostname()


HEAP_THRESHOLD_MIN, HEAP_THRESHOLD_MAX = 1 << 20, 32 << 20


def heap_kept(budget: int) -> int:
    """The free heap a worker with this memory budget keeps for its next block (NOTE: [kept heap])."""
    return budget // 2


def heap_threshold(budget: int) -> int:
    """The malloc threshold for a worker with this memory budget (NOTE: [heap])."""
    return int(min(max(budget // 8, HEAP_THRESHOLD_MIN), HEAP_THRESHOLD_MAX))


def bound_heap(threshold: int = HEAP_THRESHOLD_MIN, keep: int | None = None) -> bool:
    """Fix glibc's mmap threshold at `threshold` and let its heap keep up to `keep` free
    bytes (default: `threshold`) for the next block, handing back first what an earlier
    run that could keep more may have kept beyond it (Linux; a no-op elsewhere).

    NOTE: [heap] By default glibc raises its mmap threshold after large frees, so later
    blocks come from a heap that never shrinks: a worker's RSS then ratchets to several
    times its budget. A fixed threshold maps every tensor above it on its own and unmaps
    it when freed, so RSS follows live memory and the planner's measured cost; the price
    is a page fault per page of every such tensor, each time it is made. At 1 MiB that
    price was 60% of a ResNet-18 input block (0.81 s against 0.50 s: its convolutions'
    backward makes ~10 MB buffers hundreds of times per block) and 2x of a per-sample
    gradient block, so the threshold grows with the budget (an eighth of it, 1-32 MiB:
    glibc's own ceiling is 32 MiB), and a worker whose RSS ends a block more than its
    budget above idle hands its free heap back (`malloc_trim`), which bounds what the
    larger threshold lets fragment.

    NOTE: [kept heap] What a block frees below the threshold is kept for the next block,
    up to half the budget (`keep`), instead of going back to the kernel: memory given back
    is faulted in and zeroed again by the next block. Those faults cost a ResNet-18 input
    block (4 samples x 10 rows, 0.5 s of user time) 0.01-1.4 s of system time, 2.5k-200k
    faults, whenever a new run's first blocks grew the heap again; so warm runs took 0.8-3
    s where one block takes 0.55 s. glibc's per-thread arenas (the actor's calls run on its
    threads) free a whole 64 MiB heap whatever the trim threshold, so workers start with
    one arena (MALLOC_ARENA_MAX=1, NOTE: [huge pages] in executor), which also fragments
    less (1.24 GB against 1.8 GB of RSS after the same blocks). Half, not all, of the
    budget: keeping all of an 8 MB budget grew a small MLP run's RSS by 10.3 MB in steady
    state, half of it by 5.2-5.3 MB, as with no heap kept. A new run that may keep less
    than the last hands the heap back first.
    """
    libc = glibc()
    keep = threshold if keep is None else keep
    if keep < _KEPT["keep"] and free_heap() > keep:
        trim_heap()
    _KEPT["keep"] = keep
    return (
        libc is not None and bool(libc.mallopt(-3, threshold)) and bool(libc.mallopt(-1, min(keep, 2**31 - 1)))
    )  # M_MMAP_ / M_TRIM_THRESHOLD (an int)


_KEPT = {"keep": 0}  # the most free heap this process may keep: set by the last bound_heap


def free_heap() -> int:
    """Bytes glibc's heap holds free (mallinfo2 `fordblks`), 0 where it cannot say: an upper
    bound of what it keeps resident (pages handed back out of holes stay counted)."""
    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    return int(libc.mallinfo2().fordblks)


def trim_heap() -> bool:
    """Return the heap's free pages to the OS (glibc `malloc_trim`; NOTE: [heap])."""
    libc = glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def _peak_rss_growth(idle: int | None) -> int | None:
    """How far this process's peak RSS rose above the idle mark since it was reset."""
    peak = _proc_status("VmHWM")
    return None if idle is None or peak is None else max(peak - idle, 0)


class WorkerHost:
    """The Ray actor: a long-lived process hosting the `Worker` of the current run.

    Every call carries its run's recipe `(run_id, [source], kwargs)`; a host that does not
    hold that run's worker (a fresh host, one left from an earlier run, or one Ray just
    restarted after a crash) builds it first. So a restart needs no separate set-up call,
    and hosts can outlive a run, skipping process start-up next time. The source is boxed
    in a list so Ray does not resolve an object-store problem on every call.
    """

    def __init__(self) -> None:
        bound_heap()  # see NOTE: [heap]
        warm_up("cpu")  # while the driver triages (see NOTE: [boot] in executor)
        self.worker: Worker | None = None
        self.run_id: str | None = None
        self.kwargs: dict[str, Any] | None = None
        self.preloaded: tuple[str, tuple | None, Exception | None] | None = None  # (run_id, loaded, error)
        self._swap = threading.Lock()  # two calls run at once (see NOTE: [pipeline])

    def _worker(self, recipe: tuple[str, list, dict[str, Any]]) -> Worker:
        run_id, boxed, kwargs = recipe
        with self._swap:
            return self._build(run_id, boxed, kwargs)

    def _source(self, boxed: list) -> str | Problem:
        """This run's problem source, the driver's import folders added to sys.path first."""
        for path in boxed[1] if len(boxed) > 1 else ():
            if path not in sys.path and os.path.isdir(path):
                sys.path.append(path)  # after the worker's own: never shadow what it has
        source = boxed[0]
        if not isinstance(source, str | Problem):
            import ray

            source = ray.get(source)
        if isinstance(source, Packed):
            source = source.load()
            stop_outer_grad(source)  # this process's own copy (NOTE: [no outer graph] in raijac.guard)
        return source

    def _drop(self) -> None:
        # The last run's problem goes first: unpickling weights into freed memory is several
        # times faster than next to the old copy (benchmarks/RESULTS.md).
        # (A traced chain holds no cycle: NOTE: [peel garbage] in raijac.peel.)
        self.worker, self.run_id, self.preloaded = None, None, None

    def preload(self, run_id: str, boxed: list, kwargs: dict[str, Any], chain: bool) -> None:
        """Load a run's problem before its first call (while the driver triages); a failure
        is kept and raised by that run's first call."""
        with self._swap:
            if self.run_id == run_id:
                return
            self._drop()
            try:
                loaded = load(self._source(boxed), **kwargs)
                if chain:
                    loaded[1].stages  # noqa: B018  (traced now: raijac.peel)
                self.preloaded = (run_id, loaded, None)
            except Exception as exc:
                self.preloaded = (run_id, None, exc)

    def _build(self, run_id: str, boxed: list, kwargs: dict[str, Any]) -> Worker:
        if self.worker is not None and self.run_id == run_id and self.kwargs != kwargs:
            # The same run in another mode (after a failed block check: api.compute): the
            # loaded problem stays, the kernel is new.
            loaded = self.worker.loaded
            self.worker = Worker(loaded[0] if loaded else self.worker.source, loaded=loaded, **kwargs)
            self.kwargs = kwargs
        if self.worker is None or self.run_id != run_id:
            pre = self.preloaded if self.preloaded is not None and self.preloaded[0] == run_id else None
            self._drop()
            if pre is not None and pre[2] is not None:
                raise pre[2]
            loaded = pre[1] if pre is not None else None
            source = loaded[0] if loaded is not None else self._source(boxed)
            self.worker, self.run_id, self.kwargs = Worker(source, loaded=loaded, **kwargs), run_id, kwargs
        return self.worker

    def ready(self) -> bool:
        """Answer once this host is up: the driver waits on it after a crash before sending
        more blocks (a call to a restarting actor fails at once; NOTE: [revive] in executor)."""
        return True

    def probe(self, recipe: tuple[str, list, dict[str, Any]], measure: str = "full") -> WorkerCost:
        return self._worker(recipe).probe(measure)

    def run(
        self,
        recipe: tuple[str, list, dict[str, Any]],
        out: str,
        b0: int,
        b1: int,
        s0: int,
        s1: int,
        tile: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        return self._worker(recipe).run(out, b0, b1, s0, s1, tile)
