"""probe: try modes on small blocks and measure memory per seed (torch only; kernels -> probe -> plan).

Two questions are answered by running the real kernels on one sample and a few seeds:
which mode works for this function (`resolve_mode`, the pre-flight triage that `auto`
and `raijac plan` use), and how much memory a block needs (`measure_cost`: a fixed part
plus a part per seed, from the peak of two probe sizes).

NOTE: [CPU peak] On CUDA the peak comes from `torch.cuda.max_memory_allocated`. On CPU
torch frees to malloc at once, so the live heap (glibc `mallinfo2`, sampled after every
aten op by a dispatch mode) tracks tensor memory closely; where mallinfo2 is missing the
process RSS stands in (an over-estimate).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from raijac import modes
from raijac.chain import chain_stages
from raijac.errors import ModeError, ProblemError, first_line
from raijac.kernels import Kernel, NoReference, Reference, Target, block_error, block_rtol, make_target
from raijac.memo import memo_get, memo_key, memo_put  # noqa: F401 - the names api imports from here
from raijac.modes import check_mode, seed_axis
from raijac.problem import Problem

SLOW_PATH_HINTS = ("performance drop", "batching rule", "fallback")


@dataclass(frozen=True)
class ModeReport:
    """What one trial block of a mode did."""

    mode: str
    ok: bool
    note: str = ""
    slow: bool = False
    seconds: float = 0.0
    # Up to SAMPLE_ELEMENTS entries of each passing trial block: the codec's sample (api).
    samples: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False)

    @property
    def status(self) -> str:
        return "fails" if not self.ok else ("slow path" if self.slow else "ok")


# ---------------------------------------------------------------------- triage
def candidate_modes(problem: Problem, requested: str) -> list[str]:
    """Modes to try, best first: the requested one, or auto's fallback chain."""
    check_mode(requested, allow_auto=True)
    if requested != "auto":
        return [requested]
    chain = chain_stages(problem, auto=True) is not None
    return modes.auto_order(problem.n_out, problem.n_in, stackable=stackable(problem), chain=chain)


def stackable(problem: Problem) -> bool:
    """Whether the repeat modes can stack copies of the problem's samples."""
    return problem.batch_aware and not (problem.wrt == "params" and not problem.batched)


def trial_blocks(target: Target, mode: str, k: int = 2, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """The triage's blocks `(b0, b1, s0, s1)`: the first seeds of the first two samples, the
    last seeds of the last sample, and random middle seeds of a random sample (duplicates dropped).

    NOTE: [triage spread] A mode can be right on some seeds and wrong on others (a custom
    autograd.Function reached only by later inputs, say), so the first seeds of sample 0
    alone prove little; the worker's block check (NOTE: [block check] in kernels) then
    catches what the triage still misses, before anything is written.
    """
    n_seed = target.n_out if seed_axis(mode) == "rows" else target.n_in
    n_b, k = target.n_samples, max(1, min(k, n_seed))
    rng = random.Random(seed)
    middle = rng.randrange(k, n_seed - 2 * k + 1) if n_seed >= 3 * k else rng.randrange(n_seed - k + 1)
    # The first block spans two samples where there are two: runs vmap f over several
    # samples at once, which one sample alone does not (kernels: NOTE: [per-sample loop]).
    spots = [(0, min(2, n_b), 0), (n_b - 1, n_b, n_seed - k), (b := rng.randrange(n_b), b + 1, middle)]
    return list(dict.fromkeys((b0, b1, s, s + k) for b0, b1, s in spots))


def try_mode(target: Target, mode: str, reference: Reference | None = None) -> ModeReport:
    """Run a few small blocks of `mode` (`trial_blocks`) and check each against plain autograd
    (`reference`: one shared by the modes tried, so f's forward runs once per trial sample)."""
    reference = reference or Reference(target, keep=3)
    start = time.perf_counter()
    blocks = []
    try:
        kernel = Kernel(target, mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for spot in trial_blocks(target, mode):
                blocks.append((spot, kernel(*spot)))
    except ModeError as exc:
        return ModeReport(mode, False, str(exc), seconds=time.perf_counter() - start)
    except Exception as exc:  # vmap, forward-AD and user errors all land here
        return ModeReport(mode, False, f"{type(exc).__name__}: {first_line(exc)}", seconds=time.perf_counter() - start)
    slow = [str(w.message) for w in caught if any(h in str(w.message).lower() for h in SLOW_PATH_HINTS)]
    note = _slow_note(slow[0]) if slow else ""
    for spot, block in blocks:
        mismatch = _check_block(target, mode, block, *spot, reference)
        if mismatch:
            return ModeReport(mode, False, mismatch, seconds=time.perf_counter() - start)
    samples = tuple(b.detach().reshape(-1)[:SAMPLE_ELEMENTS].clone() for _, b in blocks)
    return ModeReport(mode, True, note, slow=bool(slow), seconds=time.perf_counter() - start, samples=samples)


SAMPLE_ELEMENTS = 2**20  # per trial block kept for choosing a codec: 4 MiB of float32


def _slow_note(warning: str) -> str:
    """vmap's slow-path warning, shortened to the op that lacks a batching rule where it names one."""
    op = re.search(r"batching rule for (\S+?)\.?(\s|$)", warning)
    return f"vmap has no batching rule for {op.group(1)}" if op else first_line(Warning(warning))


def _check_block(target: Target, mode: str, block: torch.Tensor, b0: int, b1: int, s0: int, s1: int, reference: Reference) -> str:
    """Why a trial block is wrong ("" when it is right): its relative error against one
    plain autograd VJP (NOTE: [block check] in kernels), over the tolerance of its dtype."""
    try:
        rows = seed_axis(mode) == "rows"
        err = block_error(target, block.detach(), b0, b1, s0, s1, rows, seed=b0 * 1_000_003 + s0, reference=reference)
    except NoReference:
        return ""  # no autograd reference for this function: nothing to compare with
    rtol = block_rtol(target, block)
    if not err <= rtol:
        where = f"sample {b0}, " if target.n_samples > 1 else ""
        axis = "rows" if seed_axis(mode) == "rows" else "columns"
        return f"gives numbers that differ from plain autograd by a relative error of {err:.3g} ({where}{axis} {s0}:{s1})"
    return ""


def next_mode(
    problem: Problem, tried: list[str], axis: str | None = None, sparse: bool = False
) -> tuple[str, list[ModeReport]] | None:
    """The mode a run falls back to after `tried[-1]` wrote a block that failed its check:
    the next of auto's candidates with seeds along `axis` (default: tried[-1]'s; with a
    compressed form if `sparse`) that passes the triage, off vmap's slow path first; None
    when none is left. Returns (mode, the triage's reports)."""
    axis = axis or seed_axis(tried[-1])
    order = [
        m
        for m in candidate_modes(problem, "auto")
        if seed_axis(m) == axis and m not in tried and (modes.get(m).sparse or not sparse)
    ]
    reports, good = _triage(problem, order)
    return (good[0].mode, reports) if good else None


def _triage(problem: Problem, candidates: list[str], try_all: bool = False) -> tuple[list[ModeReport], list[ModeReport]]:
    """Trial blocks of each candidate in turn, until one passes off vmap's slow path (or of
    every one, `try_all`): (the reports, those that passed, the ones off the slow path first)."""
    target = make_target(problem, "cpu")
    reference = Reference(target, keep=3)  # the trial samples' forward graphs, for every mode
    reports: list[ModeReport] = []
    for mode in candidates:
        reports.append(try_mode(target, mode, reference))
        if not try_all and reports[-1].ok and not reports[-1].slow:
            break
    return reports, [r for r in reports if r.ok and not r.slow] + [r for r in reports if r.ok and r.slow]


def resolve_mode(
    problem: Problem,
    requested: str,
    *,
    try_all: bool = False,
    order: list[str] | None = None,
    why: str | None = None,
) -> tuple[str, str, list[ModeReport]]:
    """Pick the mode to run: `(mode, reason, reports)`.

    `auto` takes the first candidate that runs and matches autograd, preferring ones off
    vmap's slow path; an explicit mode must run or this raises. `try_all` reports on every
    candidate (what `raijac plan` shows). `order` and `why` replace auto's candidates and
    the reason for its first choice (sparse problems order them by colour counts).
    """
    candidates = list(order) if order is not None else candidate_modes(problem, "auto" if try_all else requested)
    if requested != "auto" and requested not in candidates:
        candidates.insert(0, requested)
    reports, good = _triage(problem, candidates, try_all)
    if requested != "auto":
        rep = next(r for r in reports if r.mode == requested)
        if not rep.ok:
            raise ModeError(
                f"mode {requested} cannot differentiate this problem: {rep.note.removeprefix(f'mode {requested} ').rstrip('.')}; "
                "use --mode auto to let raijac fall back."
            )
        return requested, "requested", reports
    if not good:
        detail = "; ".join(f"{r.mode}: {r.note}" for r in reports)
        raise ProblemError(
            f"no mode can differentiate this problem ({detail}); fix f so that torch.autograd can differentiate it."
        )
    chosen = good[0]
    m, n = problem.n_out, problem.n_in
    first = candidates[0]
    if why is None:
        why = f"M={m} <= N={n}" if seed_axis(first) == "rows" else f"M={m} > N={n}"
    if modes.get(first).chain:
        why = f"{why} and f is a chain of stages"
    if chosen.mode == first:
        reason = f"auto: {why}, so {first}"
    else:
        failed = [r for r in reports if r.mode in candidates[: candidates.index(chosen.mode)]]
        reason = f"auto: {why}; " + "; ".join(f"{r.mode} {r.status} ({r.note})" for r in failed)
        reason += f"; fell back to {chosen.mode}"
    if chosen.slow:
        reason += f" (on vmap's slow path: {chosen.note})"
    return chosen.mode, reason, reports


# ---------------------------------------------------------------------- memory
def _proc_status(field: str) -> int | None:
    """A /proc/self/status field in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _proc_status("VmRSS")


class MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc 2.33+)."""

    _fields_ = [
        (n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """glibc, found once per process (`find_library` runs ldconfig), with `mallinfo2` typed
    where it has one (2.33+); None where there is no glibc with the malloc tuning calls
    (macOS, musl). The probe reads the heap through it, the workers tune it (NOTE: [heap])."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = MallInfo2
    return libc


def _heap_bytes() -> Callable[[], int]:
    """A function returning the live heap in bytes (glibc mallinfo2, else process RSS)."""
    try:
        info = glibc().mallinfo2

        def used() -> int:
            m = info()
            return int(m.uordblks + m.hblkhd)

        used()
        return used
    except (OSError, AttributeError):
        import psutil

        proc = psutil.Process()
        return lambda: int(proc.memory_info().rss)


class _PeakHeap(TorchDispatchMode):
    """Samples the live heap after every aten op; `peak` is the largest value seen."""

    def __init__(self, used: Callable[[], int]) -> None:
        super().__init__()
        self.used = used
        self.peak = used()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = self.used()
        if now > self.peak:
            self.peak = now
        return out


def peak_parts(run: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """`(tensor peak, resident-set growth)` of `run()`: the second catches scratch memory
    inside single ops (BLAS packing buffers), but also pages malloc gave back and faults
    in again, so it is noisy; 0 where it is not measured (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return max(int(peak), 0), 0
    used = _heap_bytes()
    rss_before = _reset_peak_rss()
    before = used()
    with _PeakHeap(used) as tracker:
        result = run()
    del result
    heap = max(tracker.peak - before, 0)
    # Scratch memory inside one op (BLAS packing buffers, say) never shows between ops;
    # the kernel's peak-RSS mark catches it when it raised the resident set.
    hwm = _proc_status("VmHWM")
    rss_growth = hwm - rss_before if hwm is not None and rss_before is not None else 0
    return heap, max(rss_growth, 0)


@dataclass(frozen=True)
class Cost:
    """Memory of one block on one worker: `base + samples * seeds * per_seed` bytes."""

    base: int
    per_seed: int


_WARM: set[str] = set()


def warm_up(device: torch.device | str = "cpu") -> None:
    """Pay a process's one-off torch.func costs now (see NOTE: [boot] in executor); never raises."""
    try:
        _warm_up(torch.device(device))
    except Exception:  # a later real call reports whatever is wrong
        pass


def _warm_up(device: torch.device) -> None:
    """Once per process and device: the one-off costs of a first probe (importing what the
    dispatch mode needs, functorch's first vmap/vjp/jvp) are not any block's memory."""
    if device.type in _WARM:
        return
    z = torch.ones(2, device=device)

    def tiny() -> object:
        _, vjp_fn = torch.func.vjp(torch.tanh, z)
        torch.func.vmap(vjp_fn)(torch.eye(2, device=device))
        return torch.func.vmap(lambda t: torch.func.jvp(torch.tanh, (z,), (t,))[1])(torch.eye(2, device=device))

    peak_parts(tiny, device)
    _WARM.add(device.type)


def measure_cost(kernel: Kernel, device: torch.device | str = "cpu") -> Cost:
    """Measure a kernel's fixed and per-seed memory from two probe blocks on sample 0."""
    device = torch.device(device)
    _warm_up(device)
    t = kernel.target
    n_seed = t.n_out if seed_axis(kernel.mode) == "rows" else t.n_in
    itemsize = t.z.element_size()
    other = t.n_in if seed_axis(kernel.mode) == "rows" else t.n_out
    floor = other * itemsize  # a seed costs at least its slice of the output block
    # The second probe is wide enough (10 to 32 seeds, ~512 KiB of output) that the per-seed
    # slope stands well above allocator noise on a busy machine, and no wider: on an MLP-8192
    # every probe seed is two 8192-wide GEMV rows.
    k1, k2 = min(2, n_seed), min(n_seed, max(10, min(32, (512 * 2**10) // max(floor, 1))))
    # NOTE: [probe cost] A run keeps a sample's forward pass across its blocks, and so do
    # the probes: the first block (fresh, forward included) gives the forward's memory, the
    # others cost seeds only. Every probe of an MLP-8192 streams its 512 MiB of weights,
    # even for 2 seeds, so six runs, not one per measurement plus warm-ups.
    kernel.clear()
    # Tensor memory only: a first call's resident-set growth is mostly library code paged in.
    fresh = peak_parts(lambda: kernel(0, 1, 0, k1), device)[0]

    def runs(k: int, times: int) -> tuple[list[int], list[int]]:
        """Tensor peaks and resident-set growths of `times` blocks of k seeds."""
        heaps, rss = zip(*(peak_parts(lambda: kernel(0, 1, 0, k), device) for _ in range(times)), strict=True)
        return sorted(heaps), list(rss)

    heaps, rss = runs(k1, 2)
    h1, r1 = heaps[0], min(rss)
    h2, r2 = h1, r1
    if k2 > k1:
        try:
            heaps, rss = runs(k2, 3)
            # The median tensor peak: the first run after another block size can read low
            # (memory of the previous size is freed inside it); page faults only add to the
            # resident-set growth, so its smallest.
            h2, r2 = heaps[1], min(rss)
        except torch.OutOfMemoryError:
            k2 = k1  # even this small probe is too big for this device now: estimate from the smallest
    kernel.clear()
    # The slope comes from tensor memory alone (resident-set noise would bend it); scratch
    # memory that only the resident set shows is per block, not per seed: it joins the base.
    per_seed = max((h2 - h1) / (k2 - k1), floor) if k2 > k1 else max(max(h1, r1) / k1, floor)
    p1 = max(h1, r1, r2 - (k2 - k1) * per_seed)
    base = max(p1 - k1 * per_seed, 0) + max(fresh - p1, 0)
    return Cost(int(base), int(math.ceil(per_seed)))


def quick_cost(kernel: Kernel, device: torch.device | str = "cpu") -> Cost:
    """An upper bound of `measure_cost` from one fresh block of (at most) 2 seeds.

    NOTE: [quick probe] Six probe blocks cost more than a small run's whole work (ResNet-18
    input Jacobians: 1.45 s of probing before 0.55 s of blocks). One fresh block's peak F,
    forward included, bounds both the base (<= F) and the cost per seed (<= F / k): where
    the budget holds the plan's tiles even at that bound, the exact slope would not change
    the plan, and `api.compute` measures it only where the bound binds.
    """
    device = torch.device(device)
    _warm_up(device)
    t = kernel.target
    rows = seed_axis(kernel.mode) == "rows"
    n_seed, other = (t.n_out, t.n_in) if rows else (t.n_in, t.n_out)
    floor = other * t.z.element_size()
    k = min(2, n_seed)
    kernel.clear()
    heap, rss = peak_parts(lambda: kernel(0, 1, 0, k), device)
    kernel.clear()
    top = max(heap, rss, floor * k)
    return Cost(int(top), int(max(math.ceil(top / k), floor)))


def sample_block(
    problem: Problem, mode: str, dtype: torch.dtype, max_bytes: int = 4 * 2**20, colours: torch.Tensor | None = None
) -> torch.Tensor:
    """A small real block (sample 0, the first seeds) in the storage dtype, for choosing a codec."""
    kernel = Kernel(make_target(problem, "cpu"), mode, colours)
    t = kernel.target
    rows = seed_axis(mode) == "rows"
    n_seed, other = (t.n_out, t.n_in) if rows else (t.n_in, t.n_out)
    if colours is not None:
        n_seed = int(colours.max()) + 1 if colours.numel() else 1
    k = max(1, min(32, n_seed, max_bytes // max(other * dtype.itemsize, 1)))
    while True:
        try:
            return kernel(0, 1, 0, k).detach().to(dtype)
        except torch.OutOfMemoryError:
            kernel.clear()
            if k == 1:
                raise
            k //= 2


def seed_bytes(kernel_per_seed: int, other: int, itemsize: int) -> int:
    """Memory per seed of a whole block on a worker: the kernel's, plus this block's storage
    copy and the previous block's copy and encoded chunks while it is written (the pipeline)."""
    return kernel_per_seed + 3 * other * itemsize


def default_budget(device: torch.device | str, n_local_workers: int = 1) -> int:
    """Bytes a worker may use: 80% of a GPU's free memory, or a share of half the free RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    import psutil

    return int(psutil.virtual_memory().available * 0.5 / max(1, n_local_workers))
