"""plan: tiles cover the seed axis exactly once, aligned to chunks, within every worker's budget."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from raijac.errors import BudgetError, RaijacError
from raijac.planner import CHUNK_BYTES, Plan, WorkerCost, format_size, make_plan, parse_size
from raijac.scheduler import Scheduler

MAX_TILES = 5_000  # keeps one example's exhaustive checks well under a second


def plan_for(workers, *, batch_size=None, n_out=5, n_in=7, seed_axis="rows", itemsize=4, **kw) -> Plan:
    return make_plan(
        mode="rev" if seed_axis == "rows" else "fwd",
        requested_mode="auto",
        reason="M <= N" if seed_axis == "rows" else "M > N",
        batch_size=batch_size,
        n_out=n_out,
        n_in=n_in,
        seed_axis=seed_axis,
        dtype={2: "float16", 4: "float32", 8: "float64"}[itemsize],
        itemsize=itemsize,
        workers=workers,
        **{"min_tile_bytes": 0, **kw},  # geometry tests: tiny shapes still get several tiles per worker
    )


def merged_blocks(plan: Plan, worker: int) -> list[list[int]]:
    """The blocks the executor's Scheduler gives one worker that computes a full queue of tiles alone."""
    schedule = Scheduler(dataclasses.replace(plan, blocks=(plan.blocks[worker],)), range(plan.n_tiles))
    blocks = []
    while (call := schedule.next(0)) is not None:
        blocks.append(list(call.tiles))
        schedule.finished(call)
    assert sorted(schedule.done) == list(range(plan.n_tiles))
    return blocks


# ---------------------------------------------------------------------- strategies
SIZES = st.one_of(st.integers(1, 40), st.integers(1, 5000))  # small ones make whole-sample tiles likely


@st.composite
def worker_costs(draw, index: int) -> WorkerCost:
    per_seed = draw(st.integers(1, 2_000_000))
    base = draw(st.one_of(st.just(0), st.integers(0, 10 * per_seed), st.integers(0, 50_000_000)))
    fit = draw(st.one_of(st.integers(1, 12), st.integers(1, 20_000), st.integers(1, 10**6)))  # seeds of one sample
    budget = base + fit * per_seed + draw(st.integers(0, per_seed - 1))
    return WorkerCost(f"w{index}", draw(st.sampled_from(["cpu", "cuda"])), budget, base, per_seed)


@st.composite
def problems(draw) -> dict:
    n = draw(st.integers(1, 3))
    n_out, n_in, itemsize = draw(SIZES), draw(SIZES), draw(st.sampled_from([2, 4, 8]))
    # Fixed targets, tiny ones included, and a few samples' worth (chunks of several samples).
    per_sample = st.integers(n_out * n_in * itemsize, 5 * n_out * n_in * itemsize)
    return dict(
        workers=[draw(worker_costs(i)) for i in range(n)],
        batch_size=draw(st.one_of(st.none(), st.integers(1, 50))),
        n_out=n_out,
        n_in=n_in,
        seed_axis=draw(st.sampled_from(["rows", "cols"])),
        itemsize=itemsize,
        block_size=draw(st.one_of(st.none(), st.none(), st.none(), st.integers(1, 6000))),
        chunk_bytes=draw(st.one_of(st.sampled_from([1, 3, 64, 1000, 4096, 65_536, 2**20, CHUNK_BYTES]), per_sample)),
    )


# ---------------------------------------------------------------------- properties
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_tiles_cover_once_aligned_and_fit(case):
    plan = plan_for(**case)
    assume(plan.n_tiles <= MAX_TILES)
    samples = case["batch_size"] or 1
    n_seed = case["n_out"] if case["seed_axis"] == "rows" else case["n_in"]
    n_other = case["n_in"] if case["seed_axis"] == "rows" else case["n_out"]

    # Chunks: one per array axis, none larger than the array, none larger than the target
    # (down to one element), spanning the whole non-seed axis whenever a row fits a chunk.
    assert plan.shape == ((case["batch_size"],) if case["batch_size"] else ()) + (case["n_out"], case["n_in"])
    assert len(plan.chunks) == len(plan.shape)
    assert all(1 <= c <= s for c, s in zip(plan.chunks, plan.shape, strict=True))
    assert int(np.prod(plan.chunks)) * case["itemsize"] <= max(case["chunk_bytes"], case["itemsize"])
    seed_dim = -2 if case["seed_axis"] == "rows" else -1
    other_dim = -1 if case["seed_axis"] == "rows" else -2
    seed_chunk = plan.chunks[seed_dim]
    batch_chunk = plan.chunks[0] if case["batch_size"] else 1
    if n_other * case["itemsize"] <= case["chunk_bytes"]:
        assert plan.chunks[other_dim] == n_other

    tiles = plan.tiles()
    assert plan.n_tiles == len(tiles) == plan.grid[0] * plan.grid[1]
    assert [t.index for t in tiles] == list(range(plan.n_tiles))
    with pytest.raises(IndexError):
        plan.tile(plan.n_tiles)

    # Every (sample, seed) exactly once.
    cover = np.zeros((samples, n_seed), dtype=np.int32)
    for t in tiles:
        assert 0 <= t.b0 < t.b1 <= samples and 0 <= t.s0 < t.s1 <= n_seed
        cover[t.b0 : t.b1, t.s0 : t.s1] += 1
    np.testing.assert_array_equal(cover, np.ones_like(cover))

    # Tile edges on chunk edges (or the array's end), so every chunk belongs to one tile.
    owner = np.full((-(-samples // batch_chunk), -(-n_seed // seed_chunk)), -1)
    for t in tiles:
        assert t.s0 % seed_chunk == 0 and (t.s1 % seed_chunk == 0 or t.s1 == n_seed)
        assert t.b0 % batch_chunk == 0 and (t.b1 % batch_chunk == 0 or t.b1 == samples)
        region = owner[t.b0 // batch_chunk : -(-t.b1 // batch_chunk), t.s0 // seed_chunk : -(-t.s1 // seed_chunk)]
        assert (region == -1).all(), f"tile {t} shares a chunk with tile {region.max()}"
        region[...] = t.index
    assert (owner >= 0).all()

    # Blocks: one entry per worker; each worker's merged block fits its budget, both as the
    # plan reports it (_block_extent) and as the executor's Scheduler actually merges tiles.
    assert len(plan.blocks) == len(case["workers"]) and all(m >= 1 for m in plan.blocks)
    assert plan.forced_block == bool(case["block_size"])
    if case["block_size"]:
        assert plan.blocks == (1,) * len(case["workers"])
        assert plan.tile_seeds <= max(case["block_size"], seed_chunk)
    for i, w in enumerate(case["workers"]):
        nb, ns = plan._block_extent(plan.blocks[i])
        if not case["block_size"]:
            assert w.peak(nb, ns) <= w.budget, (w, plan.blocks[i], nb, ns)
        for block in merged_blocks(plan, i):
            first, last = tiles[block[0]], tiles[block[-1]]
            extent = (last.b1 - first.b0, last.s1 - first.s0)
            area = sum((tiles[j].b1 - tiles[j].b0) * (tiles[j].s1 - tiles[j].s0) for j in block)
            assert extent[0] * extent[1] == area, f"block {block} is not a rectangle"
            assert extent[0] <= nb and extent[1] <= ns
            if not case["block_size"]:
                assert w.peak(*extent) <= w.budget

    # The stored layout (what api writes into the store) round-trips through JSON.
    json.dumps(plan.to_dict())


@settings(max_examples=150, deadline=None)
@given(problems(), st.data())
def test_mergeable_joins_only_adjacent_rectangles(case, data):
    plan = plan_for(**case)
    n = plan.n_tiles
    a = data.draw(st.integers(0, n - 1))
    b = data.draw(st.integers(0, n - 1))
    for x, y in [(a, b), (a, a + 1), (a, a - 1)]:
        if not 0 <= y < n:
            continue
        ta, tb = plan.tile(x), plan.tile(y)
        same_samples = (ta.b0, ta.b1) == (tb.b0, tb.b1) and ta.s1 == tb.s0
        whole_seeds = (ta.s0, ta.s1) == (tb.s0, tb.s1) == (0, plan.n_seed) and ta.b1 == tb.b0
        assert plan.mergeable(x, y) == (same_samples or whole_seeds), (ta, tb)


@settings(max_examples=100, deadline=None)
@given(problems(), st.lists(worker_costs(9), min_size=1, max_size=3))
def test_resume_grid_keeps_layout_for_other_workers(case, others):
    first = plan_for(**case)
    assume(first.n_tiles <= MAX_TILES)
    grid = json.loads(
        json.dumps({"chunks": list(first.chunks), "tile_samples": first.tile_samples, "tile_seeds": first.tile_seeds})
    )
    again = plan_for(**{**case, "workers": others, "block_size": None, "chunk_bytes": 1}, grid=grid)
    assert again.chunks == first.chunks
    assert (again.tile_samples, again.tile_seeds, again.grid) == (first.tile_samples, first.tile_seeds, first.grid)
    assert again.tiles() == first.tiles()
    assert len(again.blocks) == len(others)


# ---------------------------------------------------------------------- examples
def test_resume_grid_example_with_bigger_and_more_workers():
    small = [WorkerCost("cpu0", "cpu", 10_000 + 16 * 400, 10_000, 400)]  # 16 rows per block
    first = plan_for(small, n_out=100, n_in=50, chunk_bytes=1000)  # 5 rows of 200 B per chunk
    assert (first.chunks, first.tile_seeds, first.n_tiles) == ((5, 50), 15, 7)
    big = [WorkerCost(f"cuda{i}", "cuda", 2**30, 10_000, 400) for i in range(3)]
    fresh = plan_for(big, n_out=100, n_in=50)
    assert fresh.chunks != first.chunks  # without grid the big workers would re-chunk
    grid = {"chunks": [5, 50], "tile_samples": 1, "tile_seeds": 15}
    resumed = plan_for(big, n_out=100, n_in=50, grid=grid)
    assert (resumed.chunks, resumed.tile_seeds, resumed.tiles()) == ((5, 50), 15, first.tiles())


def test_bigger_worker_merges_more_tiles():
    workers = [WorkerCost("cpu0", "cpu", 1000 + 10 * 100, 1000, 100), WorkerCost("cuda0", "cuda", 1000 + 80 * 100, 1000, 100)]
    plan = plan_for(workers, n_out=1000, n_in=3, chunk_bytes=4 * 3 * 5)
    assert (plan.chunks, plan.tile_seeds, plan.n_tiles) == ((5, 3), 10, 100)
    assert plan.blocks == (1, 8)  # 10 and 80 rows: exactly each budget
    assert plan._block_extent(8) == (1, 80)
    assert [len(b) for b in merged_blocks(plan, 1)] == [8] * 12 + [4]


@pytest.mark.parametrize(
    ("batch_size", "n_out", "n_in", "tiles"),
    [
        (None, 8, 8, 2),  # 256 B: one tile per worker, no fewer
        (None, 1000, 1000, 4),  # 3.8 MiB: 1 MiB tiles
        (None, 2048, 2048, 8),  # 16 MiB: four tiles per worker, as before
        (None, 1, 5000, 1),  # one seed cannot be split
        (64, 16, 16, 2),  # 64 KiB over 64 samples: whole samples, one tile per worker
        (64, 256, 256, 8),  # 16 MiB: four tiles per worker
        (12, 256, 256, 4),  # 3 MiB: two tiles per worker, not three tiles on two workers (a U-Net's input J)
        (None, 700, 1000, 4),  # 2.7 MiB: the same along the rows
    ],
)
def test_small_jacobians_get_fewer_bigger_tiles(batch_size, n_out, n_in, tiles):
    """NOTE: [small runs] in plan: a tile carries at least 1 MiB of Jacobian, with at least one per worker."""
    workers = [WorkerCost(f"cpu{i}", "cpu", 2**30, 1000, 100) for i in range(2)]
    plan = plan_for(workers, batch_size=batch_size, n_out=n_out, n_in=n_in, min_tile_bytes=2**20)
    assert plan.n_tiles == tiles
    assert sum((t.b1 - t.b0) * (t.s1 - t.s0) for t in plan.tiles()) == (batch_size or 1) * n_out


def test_batched_plan_tiles_whole_samples_when_they_fit():
    workers = [WorkerCost("cpu0", "cpu", 10 * (500 + 6 * 10), 500, 10)]  # 10 samples of 6 rows
    plan = plan_for(workers, batch_size=23, n_out=6, n_in=4, itemsize=8, chunk_bytes=3 * 6 * 4 * 8)
    assert plan.chunks == (3, 6, 4)
    assert (plan.tile_samples, plan.tile_seeds, plan.grid) == (6, 6, (4, 1))
    assert [(t.b0, t.b1, t.s0, t.s1) for t in plan.tiles()] == [(0, 6, 0, 6), (6, 12, 0, 6), (12, 18, 0, 6), (18, 23, 0, 6)]
    assert plan.mergeable(0, 1) and plan.mergeable(2, 3) and not plan.mergeable(0, 2) and not plan.mergeable(1, 0)


def test_batched_tile_rounds_samples_down_to_whole_chunks():
    workers = [WorkerCost("cpu0", "cpu", 7 * (0 + 2 * 10), 0, 10)]  # 7 samples of 2 rows
    plan = plan_for(workers, batch_size=50, n_out=2, n_in=3, itemsize=4, chunk_bytes=3 * 2 * 3 * 4)
    assert plan.chunks == (3, 2, 3)
    assert (plan.tile_samples, plan.grid) == (6, (9, 1))  # 7 fit, 6 is whole chunks
    assert plan.tile(8) == plan.tile(8).__class__(8, 48, 50, 0, 2)


def test_mergeable_stops_at_sample_rows():
    workers = [WorkerCost("cpu0", "cpu", 2**30, 0, 1)]
    plan = plan_for(workers, batch_size=3, n_out=10, n_in=2, block_size=3)
    assert (plan.tile_samples, plan.tile_seeds, plan.grid) == (1, 3, (3, 4))
    assert plan.tile(3) == plan.tile(3).__class__(3, 0, 1, 9, 10)
    assert plan.mergeable(0, 1) and plan.mergeable(2, 3)
    assert not plan.mergeable(3, 4)  # next tile starts the next sample
    assert not plan.mergeable(0, 2) and not plan.mergeable(1, 0) and not plan.mergeable(4, 4)


def test_block_size_over_budget_is_kept_and_noted():
    workers = [WorkerCost("cpu0", "cpu", 1000 + 4 * 100, 1000, 100)]
    plan = plan_for(workers, n_out=40, n_in=3, block_size=12)
    assert plan.forced_block and plan.tile_seeds == 12 and plan.blocks == (1,)
    assert any("--block-size 12 exceeds the 4 seeds" in n for n in plan.notes)
    assert "forced by --block-size" in str(plan)


def test_no_workers_is_an_error():
    with pytest.raises(BudgetError, match="no workers"):
        plan_for([])


# ---------------------------------------------------------------------- budgets
def test_budget_below_one_seed_names_need_and_fix():
    workers = [WorkerCost("cpu0", "cpu", 2**20, 0, 100), WorkerCost("cpu1", "cpu", 1024, 10_000, 28_000)]
    with pytest.raises(BudgetError) as info:
        plan_for(workers, n_out=10, n_in=7000)
    msg = str(info.value)
    assert "budget 1.0 KiB on cpu1 is too small" in msg
    assert "one seed of this problem needs about 37.1 KiB" in msg  # 38000 bytes
    assert "Raise memory_budget (--memory-budget) to at least 2MiB." in msg  # 1.5 x 38000 + 1 MiB, rounded up
    fixed = [WorkerCost("cpu1", "cpu", parse_size("2MiB"), 10_000, 28_000)]
    assert plan_for(fixed, n_out=10, n_in=7000).tile_seeds >= 1


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**34), st.integers(1, 2**32), st.data())
def test_suggested_budget_always_suffices(base, per_seed, data):
    budget = data.draw(st.integers(0, base + per_seed - 1))
    with pytest.raises(BudgetError) as info:
        plan_for([WorkerCost("cuda0", "cuda", budget, base, per_seed)])
    msg = str(info.value)
    assert format_size(base + per_seed) in msg
    suggested = msg.rsplit("at least ", 1)[1].rstrip(".")
    enough = WorkerCost("cuda0", "cuda", parse_size(suggested), base, per_seed)
    assert enough.seeds_fitting(1) >= 1
    plan_for([enough])


GOOD_SIZES = [
    ("512MB", 512 * 10**6),
    ("512mb", 512 * 10**6),
    ("2GiB", 2 * 2**30),
    ("2G", 2 * 2**30),
    ("2 GB", 2 * 10**9),
    ("1.5G", 3 * 2**29),
    ("64KiB", 64 * 1024),
    ("64K", 64 * 1024),
    ("3TiB", 3 * 2**40),
    ("1e9", 10**9),
    ("1e3KB", 10**6),
    ("4096", 4096),
    ("100B", 100),
    (" 8MiB ", 8 * 2**20),
    (4096, 4096),
    (2**33, 2**33),
    (1.5e9, 1_500_000_000),
    (None, None),
]


@pytest.mark.parametrize("text,expected", GOOD_SIZES, ids=[repr(t) for t, _ in GOOD_SIZES])
def test_parse_size_good(text, expected):
    assert parse_size(text) == expected


BAD_SIZES = ["12XB", "", "   ", "-1MB", "abc", "MB", "0", "0GiB", "1.2.3G", "2 Gi B", "1e", "0.1", -1, 0, -2.5]


@pytest.mark.parametrize("text", BAD_SIZES, ids=[repr(t) for t in BAD_SIZES])
def test_parse_size_bad(text):
    with pytest.raises(BudgetError) as info:
        parse_size(text)
    msg = str(info.value)
    assert repr(text) in msg
    assert "512MB" in msg and "2GiB" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, RaijacError)


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (38_000, "37.1 KiB"),
        (8 * 2**20, "8.0 MiB"),
        (int(1.5 * 2**30), "1.5 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


# ---------------------------------------------------------------------- printing
def test_plan_str_is_a_readable_table():
    workers = [WorkerCost("cpu0", "cpu", 2**20, 100, 60), WorkerCost("cuda1", "cuda", 2**24, 2048, 60)]
    plan = plan_for(
        workers,
        batch_size=3,
        n_out=5,
        n_in=7,
        seed_axis="cols",
        triage=(("fwd", "ok", "vmap works"), ("rev", "skipped", "M > N")),
    )
    text = str(plan)
    lines = text.splitlines()
    assert lines[0] == "mode        fwd  (M > N)"
    assert lines[1] == "jacobian    3 x 5 x 7 float32  (420 B)"
    tiles = f"{plan.n_tiles} tile{'s' if plan.n_tiles != 1 else ''}"
    assert lines[2].startswith(f"seeds       7 columns; {tiles} of {plan.tile_seeds} columns x ")
    assert f"chunks      {plan.chunks}  (grid {plan.grid[0]} x {plan.grid[1]} tiles)" in lines
    worker_lines = [line for line in lines if line.startswith(("  cpu0 ", "  cuda1 "))]
    assert len(worker_lines) == 2
    assert worker_lines[0].split()[:4] == ["cpu0", "cpu", "1.0", "MiB"]
    assert worker_lines[1].split()[:5] == ["cuda1", "cuda", "16.0", "MiB", "2.0"]
    nb, ns = plan._block_extent(plan.blocks[1])
    assert worker_lines[1].endswith(format_size(workers[1].peak(nb, ns)))
    assert "  fwd        ok        vmap works" in lines
    assert "  rev        skipped   M > N" in lines


def test_plan_str_unbatched_without_workers_section_extras():
    plan = plan_for([WorkerCost("cpu0", "cpu", 2**20, 0, 40)], n_out=11, n_in=13)
    text = str(plan)
    assert "jacobian    11 x 13 float32  (572 B)" in text
    assert "samples" not in text and "triage" not in text and "forced" not in text
    assert sum(line.startswith("  cpu0 ") for line in text.splitlines()) == 1


def test_one_tile_is_one_tile():
    plan = make_plan(
        mode="rev", requested_mode="rev", reason="r", batch_size=None, n_out=3, n_in=4, seed_axis="rows", dtype="float32",
        itemsize=4,
        workers=[WorkerCost("cpu0", "cpu", 1 << 20, 0, 64)],
    )  # fmt: skip
    assert plan.n_tiles == 1 and "; 1 tile of 3 rows" in str(plan)


@pytest.mark.parametrize(
    ("batch_size", "n_out", "n_in", "seed_axis"),
    [
        (16, 256, 22_550, "rows"),
        (None, 256, 22_550, "rows"),
        (None, 40, 3, "rows"),
        (4, 1000, 50_000, "cols"),
        (None, 7, 9, "cols"),
    ],
)
def test_chunks_along_the_seeds_are_even_so_the_edge_wastes_little(batch_size, n_out, n_in, seed_axis):
    """zarr stores an edge chunk whole: BERT's 256 rows in chunks of 93 stored 279 (9% more);
    chunks of equal size pad less than one row per chunk, and tiles stay whole chunks."""
    workers = [WorkerCost("cpu0", "cpu", 2**34, 0, 1), WorkerCost("cpu1", "cpu", 2**34, 0, 1)]
    plan = plan_for(workers, batch_size=batch_size, n_out=n_out, n_in=n_in, seed_axis=seed_axis)
    n_seed = n_out if seed_axis == "rows" else n_in
    per_chunk = plan.chunks[-2] if seed_axis == "rows" else plan.chunks[-1]
    n_chunks = -(-n_seed // per_chunk)
    assert n_chunks * per_chunk - n_seed < n_chunks
    assert plan.tile_seeds % per_chunk == 0 or plan.tile_seeds == n_seed
    assert per_chunk * (n_in if seed_axis == "rows" else n_out) * 4 <= 8 * 2**20 or per_chunk == 1
