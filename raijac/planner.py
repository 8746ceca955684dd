"""planner: shapes + measured worker costs -> a Plan of tiles aligned to Zarr chunks (pure; no torch, Ray or Zarr).

The seed axis (rows for row modes, columns for column modes) is cut into tiles of whole
Zarr chunks, so no two workers ever write one chunk. A tile is the unit of the completion
ledger and of resume; a worker whose budget holds several tiles takes that many adjacent
tiles as one block, so heterogeneous workers take different numbers of chunk-rows per call.
Batched problems also tile over samples: when one sample's whole seed axis fits a worker,
tiles cover whole samples, several per tile when the budget allows.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from raijac.errors import BudgetError

CHUNK_BYTES = 8 * 2**20  # target chunk size: large enough for throughput, small for readers
TILES_PER_WORKER = 4  # tiles per worker when the budget allows bigger ones: keeps every worker busy
# NOTE: [small runs] Each tile costs the run a fixed few milliseconds (an actor call, a
# block write, a ledger record). A tile of 1 MiB of Jacobian takes about as long to compute
# and store, so a small Jacobian gets fewer, bigger tiles: still one per worker at least, so
# an expensive function with a small Jacobian keeps every worker busy (numbers:
# benchmarks/RESULTS.md, "Measurements behind design choices").
MIN_TILE_BYTES = 2**20
# NOTE: [merged calls] Tiles stay small (the ledger's and a resume's unit, what an idle worker
# can steal at the end), but a worker whose budget holds two of them computes them as one
# block, in at least two calls (the second computes while the first is written): a block
# pays one forward pass and one block check, which on an MLP-8192 streams 512 MiB of
# weights, 4.5% of a 1024-row block's time and 2.2% of a 2048-row one's.
CALLS_PER_WORKER = 2
BOUND_NOTE = "memory per block: an upper bound from one probe block (the budget holds these tiles even at it)"
_SIZE_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGT", start=1):
    _SIZE_UNITS |= {_p: 2 ** (10 * _i), _p + "IB": 2 ** (10 * _i), _p + "B": 10 ** (3 * _i)}


def parse_size(text: str | int | float | None) -> int | None:
    """`512MB` (10^6), `2GiB` or `2G` (2^30), `1e9` or a plain number of bytes -> bytes."""
    if text is None:
        return None
    if isinstance(text, int | float):
        size = 0 if isinstance(text, float) and not math.isfinite(text) else int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        number = float(m.group(1)) * _SIZE_UNITS[unit] if unit in _SIZE_UNITS else 0.0
        size = int(number) if math.isfinite(number) else 0
    if size < 1:  # 0 would silently mean "the default budget" to callers
        raise BudgetError(f"memory budget {text!r} is not a size; write a positive number with a unit, like 512MB or 2GiB.")
    return size


def parse_budgets(value: str | int | float | list | tuple | None) -> list[int] | None:
    """One budget for every worker (`"512MB"`), or one per worker (`"256MB,1GiB"` or a list)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) and "," in value else value
    if isinstance(items, list | tuple):
        if not items:
            raise BudgetError("memory budget list is empty; give one size, or one per worker like 256MB,1GiB.")
        return [parse_size(v.strip() if isinstance(v, str) else v) for v in items]
    return [parse_size(items)]


def format_size(n: float) -> str:
    """Bytes as a short human string: 1.5 GiB, 38 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class WorkerCost:
    """One worker's budget and measured cost: a block of `nb` samples and `k` seeds needs
    about `nb * (base + k * per_seed)` bytes."""

    name: str
    device: str
    budget: int
    base: int
    per_seed: int
    bound: bool = False  # base and per_seed are an upper bound from one probe block (NOTE: [quick probe])

    def seeds_fitting(self, samples: int = 1) -> int:
        """Most seeds per block for `samples` samples within the budget."""
        return max((self.budget // samples - self.base) // self.per_seed, 0)

    def samples_fitting(self, seeds: int) -> int:
        """Most samples per block with `seeds` seeds each within the budget."""
        return self.budget // (self.base + seeds * self.per_seed)

    def peak(self, samples: int, seeds: int) -> int:
        return samples * (self.base + seeds * self.per_seed)


@dataclass(frozen=True)
class Tile:
    """One ledger entry: samples `b0:b1` (0:1 for unbatched problems) and seeds `s0:s1`."""

    index: int
    b0: int
    b1: int
    s0: int
    s1: int


@dataclass(frozen=True)
class Plan:
    """Everything a run needs besides the problem itself; printable, and stored with the output."""

    mode: str
    requested_mode: str
    reason: str
    batch_size: int | None
    n_out: int
    n_in: int
    seed_axis: str
    dtype: str
    itemsize: int
    chunks: tuple[int, ...]
    tile_samples: int
    tile_seeds: int
    workers: tuple[WorkerCost, ...] = ()
    blocks: tuple[int, ...] = ()  # tiles per block, one entry per worker
    triage: tuple[tuple[str, str, str], ...] = ()
    forced_block: bool = False
    notes: tuple[str, ...] = field(default=())
    colours: int = 0  # sparse problems: seeds are colours (0: dense, seeds are unit vectors)
    nnz: int = 0
    colouring: str = ""

    # ------------------------------------------------------------------ geometry
    @property
    def batched(self) -> bool:
        return self.batch_size is not None

    @property
    def shape(self) -> tuple[int, ...]:
        mn = (self.n_out, self.n_in)
        return (self.batch_size, *mn) if self.batched else mn

    @property
    def sparse(self) -> bool:
        return self.colours > 0

    @property
    def n_seed(self) -> int:
        if self.sparse:
            return self.colours
        return self.n_out if self.seed_axis == "rows" else self.n_in

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape of the array tiles write: J itself, or the compressed `J S` / `S^T J` when sparse."""
        if not self.sparse:
            return self.shape
        mn = (self.colours, self.n_in) if self.seed_axis == "rows" else (self.n_out, self.colours)
        return (self.batch_size, *mn) if self.batched else mn

    @property
    def n_other(self) -> int:
        return self.n_in if self.seed_axis == "rows" else self.n_out

    @property
    def grid(self) -> tuple[int, int]:
        """(tiles along samples, tiles along seeds)."""
        samples = self.batch_size or 1
        return math.ceil(samples / self.tile_samples), math.ceil(self.n_seed / self.tile_seeds)

    @property
    def n_tiles(self) -> int:
        nb, ns = self.grid
        return nb * ns

    @property
    def nbytes(self) -> int:
        """Bytes of the stored result: J, or for sparse problems its values and the compressed product."""
        if self.sparse:
            return ((self.batch_size or 1) * self.nnz + math.prod(self.array_shape)) * self.itemsize
        return math.prod(self.shape) * self.itemsize

    def tile(self, index: int) -> Tile:
        nb, ns = self.grid
        if not 0 <= index < nb * ns:
            raise IndexError(f"tile {index} is outside 0..{nb * ns - 1}")
        ib, js = divmod(index, ns)
        samples = self.batch_size or 1
        b0, s0 = ib * self.tile_samples, js * self.tile_seeds
        return Tile(index, b0, min(b0 + self.tile_samples, samples), s0, min(s0 + self.tile_seeds, self.n_seed))

    def tiles(self) -> list[Tile]:
        return [self.tile(i) for i in range(self.n_tiles)]

    def mergeable(self, a: int, b: int) -> bool:
        """Whether tile b extends tile a's block (same samples and next seeds, or next samples over all seeds)."""
        _, ns = self.grid
        if ns == 1:
            return b == a + 1
        return b == a + 1 and a // ns == b // ns

    def describe_tile(self, t: Tile) -> str:
        axis = "rows" if self.seed_axis == "rows" else "columns"
        axis = f"colours of {axis}" if self.sparse else axis
        where = f"{axis} {t.s0}:{t.s1}"
        return f"samples {t.b0}:{t.b1}, {where}" if self.batched else where

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict:
        d = asdict(self)
        d["workers"] = [asdict(w) for w in self.workers]
        return d

    def __str__(self) -> str:
        lines = []
        shape = " x ".join(str(s) for s in self.shape)
        lines.append(f"mode        {self.mode}  ({self.reason})")
        if self.sparse:
            density = self.nnz / max(self.n_out * self.n_in, 1)
            lines.append(f"jacobian    {shape} {self.dtype}, sparse: {self.nnz} non-zeros per sample ({density:.2g} dense)")
            axis = "rows" if self.seed_axis == "rows" else "columns"
            lines.append(
                f"colouring   {self.colours} colours of {axis} ({self.colouring}); {self.colours} "
                f"{'VJPs' if self.seed_axis == 'rows' else 'JVPs'} instead of {self.n_out if self.seed_axis == 'rows' else self.n_in}"
            )
            compressed = " x ".join(str(s) for s in self.array_shape)
            lines.append(f"stored      values + compressed {compressed}  ({format_size(self.nbytes)})")
        else:
            lines.append(f"jacobian    {shape} {self.dtype}  ({format_size(self.nbytes)})")
        seeds = "rows" if self.seed_axis == "rows" else "columns"
        seeds = f"colours of {seeds}" if self.sparse else seeds
        lines.append(
            f"seeds       {self.n_seed} {seeds}; {self.n_tiles} tile{'s' if self.n_tiles != 1 else ''} of "
            f"{self.tile_seeds} {seeds}"
            + (f" x {self.tile_samples} sample{'s' if self.tile_samples != 1 else ''}" if self.batched else "")
        )
        lines.append(f"chunks      {self.chunks}  (grid {self.grid[0]} x {self.grid[1]} tiles)")
        if self.forced_block:
            lines.append("block size  forced by --block-size")
        if self.workers:
            lines.append("workers")
            head = f"  {'name':<10}{'device':<8}{'budget':>11}{'base':>11}{'per seed':>11}{'tiles/block':>13}{'est. peak':>12}"
            lines.append(head)
            for w, m in zip(self.workers, self.blocks, strict=False):
                samples, seeds = self._block_extent(m)
                lines.append(
                    f"  {w.name:<10}{w.device:<8}{format_size(w.budget):>11}{format_size(w.base):>11}"
                    f"{format_size(w.per_seed):>11}{m:>13}{format_size(w.peak(samples, seeds)):>12}"
                )
        if self.triage:
            lines.append("triage")
            width = max(11, *(len(mode) + 1 for mode, _, _ in self.triage))
            for mode, status, note in self.triage:
                lines.append(f"  {mode:<{width}}{status:<10}{note}")
        for note in self.notes:
            lines.append(f"note        {note}")
        return "\n".join(lines)

    def _block_extent(self, tiles_per_block: int) -> tuple[int, int]:
        _, ns = self.grid
        if ns == 1:
            return min(self.tile_samples * tiles_per_block, self.batch_size or 1), self.n_seed
        return self.tile_samples, min(self.tile_seeds * tiles_per_block, self.n_seed)


def make_plan(
    *,
    mode: str,
    requested_mode: str,
    reason: str,
    batch_size: int | None,
    n_out: int,
    n_in: int,
    seed_axis: str,
    dtype: str,
    itemsize: int,
    workers: list[WorkerCost],
    block_size: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    min_tile_bytes: int = MIN_TILE_BYTES,
    grid: dict | None = None,
    triage: tuple = (),
    colours: int = 0,
    nnz: int = 0,
    colouring: str = "",
) -> Plan:
    """Size tiles and chunks so the smallest worker holds one tile; bigger workers merge tiles.

    `grid` (chunks, tile_samples, tile_seeds) comes from an existing store when resuming:
    the stored layout wins so finished tiles stay valid.
    """
    if not workers:
        raise BudgetError("no workers to plan for; start at least one worker.")
    n_seed = colours or (n_out if seed_axis == "rows" else n_in)
    n_other = n_in if seed_axis == "rows" else n_out
    samples = batch_size or 1
    for w in workers:
        if w.seeds_fitting(1) < 1:
            need = w.base + w.per_seed
            raise BudgetError(
                f"budget {format_size(w.budget)} on {w.name} is too small: one seed of this problem needs about "
                f"{format_size(need)} (its slice of the output plus activations). Raise memory_budget (--memory-budget) to at least "
                f"{_round_up(need)}."
            )
    row_bytes = n_other * itemsize
    notes: list[str] = []
    if grid is not None:
        chunks = tuple(grid["chunks"])
        tile_samples, tile_seeds = int(grid["tile_samples"]), int(grid["tile_seeds"])
        for w in workers:
            if w.peak(tile_samples, tile_seeds) > w.budget:
                notes.append(
                    f"the stored tiles need about {format_size(w.peak(tile_samples, tile_seeds))} on {w.name}, "
                    f"more than its budget {format_size(w.budget)}; a resumed run keeps the stored tile size"
                )
    else:
        fit = min(w.seeds_fitting(1) for w in workers)
        # Enough tiles for every worker to get several (load balance), no more than that, and
        # none below min_tile_bytes unless a worker would go without (NOTE: [small runs]);
        # a whole number of tiles per worker: 3 tiles of a U-Net's input J on 2 workers kept
        # one of them idle for a third of the run.
        n_tiles = min(
            TILES_PER_WORKER * len(workers), max(len(workers), math.ceil(n_seed * samples * row_bytes / max(min_tile_bytes, 1)))
        )
        n_tiles = math.ceil(n_tiles / len(workers)) * len(workers)
        balanced = math.ceil(n_seed * samples / n_tiles)
        seeds = min(block_size, n_seed) if block_size else min(fit, n_seed, max(balanced, 1))
        if block_size and block_size > fit:
            notes.append(f"--block-size {block_size} exceeds the {fit} seeds the smallest budget holds")
        per_chunk = max(1, min(seeds, chunk_bytes // max(row_bytes, 1)))
        # Chunks of equal size along the seeds: zarr stores an edge chunk whole, so 256 rows
        # in chunks of 93 stored 279 (9% more on disk); in three of 86 they store 258
        if not block_size:  # (a forced block size keeps its chunks)
            per_chunk = math.ceil(n_seed / math.ceil(n_seed / per_chunk))
        tile_seeds = seeds if seeds == n_seed else (seeds // per_chunk) * per_chunk
        other_chunk = n_other if per_chunk > 1 or row_bytes <= chunk_bytes else max(1, chunk_bytes // itemsize)
        chunk_samples, tile_samples = 1, 1
        if batch_size and tile_seeds == n_seed:
            fit_samples = min(w.samples_fitting(n_seed) for w in workers)
            per_sample = max(n_seed * n_other * itemsize, 1)
            fit_samples = min(fit_samples, max(1, math.ceil(samples / n_tiles)))
            if block_size:
                fit_samples = 1
            chunk_samples = max(1, min(fit_samples, chunk_bytes // per_sample, samples))
            tile_samples = max(chunk_samples, (min(fit_samples, samples) // chunk_samples) * chunk_samples)
        seed_other = (per_chunk, other_chunk) if seed_axis == "rows" else (other_chunk, per_chunk)
        chunks = ((chunk_samples,) if batch_size else ()) + seed_other
    if any(w.bound for w in workers):
        notes.append(BOUND_NOTE)
    plan = Plan(
        mode=mode,
        requested_mode=requested_mode,
        reason=reason,
        batch_size=batch_size,
        n_out=n_out,
        n_in=n_in,
        seed_axis=seed_axis,
        dtype=dtype,
        itemsize=itemsize,
        chunks=chunks,
        tile_samples=tile_samples,
        tile_seeds=tile_seeds,
        workers=tuple(workers),
        triage=tuple(triage),
        forced_block=bool(block_size),
        notes=tuple(notes),
        colours=colours,
        nnz=nnz,
        colouring=colouring,
    )
    blocks = tuple(1 if block_size else _tiles_per_block(plan, w) for w in workers)
    return Plan(**{**plan.__dict__, "blocks": blocks})


def _tiles_per_block(plan: Plan, w: WorkerCost) -> int:
    """Adjacent tiles a worker merges into one block: as many as its budget holds, but no
    more than a fair share, so a big worker does not starve the others."""
    _, ns = plan.grid
    if ns == 1:
        fits = w.samples_fitting(plan.n_seed) // plan.tile_samples
    else:
        fits = w.seeds_fitting(plan.tile_samples) // plan.tile_seeds
    share = plan.n_tiles // (CALLS_PER_WORKER * len(plan.workers))
    return max(1, min(fits, share))


# NOTE: [budget advice] The budget a refusal advises must be one the next run accepts, but
# that run measures again, on fresh workers: the same problem measured 27 KiB per seed in
# `raijac plan`'s warm process and 71-85 KiB on fresh workers, whose resident set counts
# whole heap extensions (up to the mmap threshold workers set: NOTE: [heap] in worker). So the advice is
# half again the need, plus that 1 MiB.
ADVICE_FACTOR, ADVICE_SLACK = 1.5, 1 << 20


def _round_up(n: int) -> str:
    """A budget comfortably above n, in a unit people type (NOTE: [budget advice])."""
    n = int(n * ADVICE_FACTOR) + ADVICE_SLACK
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{math.ceil(n / scale)}{unit}"
    return f"{n}B"
