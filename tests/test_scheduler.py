"""scheduler: every tile is finished exactly once or reported, blocks are mergeable runs, a dead
worker's tiles are retried alone, and nothing goes out after a failure. Pure: no Ray here; the
executor tests kill real Ray workers."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raijac.planner import Plan
from raijac.scheduler import IN_FLIGHT, MAX_TILE_FAILURES, Call, Died, Scheduler

ALWAYS = 10**6  # a tile that kills its worker every time it runs


def make(batch_size: int | None, n_seed: int, tile_samples: int, tile_seeds: int, blocks: tuple[int, ...]) -> Plan:
    """A plan with this tiling (chunks play no part in scheduling)."""
    return Plan(
        mode="rev", requested_mode="rev", reason="test", batch_size=batch_size, n_out=n_seed, n_in=3,
        seed_axis="rows", dtype="float32", itemsize=4, chunks=(1, 1, 1) if batch_size else (1, 1),
        tile_samples=tile_samples, tile_seeds=tile_seeds, blocks=blocks,
    )  # fmt: skip


@st.composite
def runs(draw) -> dict:
    """A plan, the pending tiles, and each tile's fate: ok, raises, kills its worker a few times, or always."""
    batch_size = draw(st.one_of(st.none(), st.integers(1, 6)))
    n_seed = draw(st.integers(1, 12))
    plan = make(
        batch_size,
        n_seed,
        tile_samples=draw(st.integers(1, batch_size or 1)),
        tile_seeds=draw(st.integers(1, n_seed)),
        blocks=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))),
    )
    pending = sorted(draw(st.sets(st.integers(0, plan.n_tiles - 1), max_size=plan.n_tiles)))
    transient = st.tuples(st.just("kills"), st.integers(1, MAX_TILE_FAILURES - 1))  # must still finish
    fate = st.one_of(st.just(("ok", 0)), transient, st.just(("kills", ALWAYS)), st.just(("raises", 0)))
    weights = draw(st.sampled_from(["ok", "mixed"]))
    fates = {t: draw(fate) if weights == "mixed" else ("ok", 0) for t in pending}
    return dict(plan=plan, pending=pending, fates=fates, seed=draw(st.integers(0, 2**32 - 1)))


def simulate(plan: Plan, pending: list[int], fates: dict[int, tuple[str, int]], seed: int) -> dict:
    """Drive a Scheduler as the executor's Ray loop does, calls ending in a random order; a tile
    that kills its worker ends every call in flight on that worker. Checks each call sent."""
    rng = random.Random(seed)
    n = len(plan.blocks)
    schedule = Scheduler(plan, pending, workers=n)
    kills = {t: k for t, (what, k) in fates.items() if what == "kills"}
    flying: list[Call] = []
    revivals: list[int] = []
    sent: list[Call] = []
    suspects: set[int] = set()
    failed_at: int | None = None  # how many calls had been sent when the first failure came back
    after_failure: list[Call] = []
    while True:
        for call in schedule.dispatch():
            tiles = call.tiles
            assert failed_at is None, "a call was sent after a failure"
            assert not schedule.down[call.worker], "a call went to a worker that is down"
            assert all(plan.mergeable(a, b) for a, b in zip(tiles, tiles[1:], strict=False)), call
            assert 1 <= len(tiles) <= plan.blocks[call.worker]
            assert schedule.load[call.worker] <= IN_FLIGHT
            if any(t in suspects for t in tiles):
                assert call.alone and len(tiles) == 1, f"a dead worker's tile went out in a batch: {call}"
            if call.alone:
                assert len(tiles) == 1 and schedule.load[call.worker] == 1
            flying.append(call)
            sent.append(call)
        if not flying and not revivals:
            break
        pick = rng.randrange(len(flying) + len(revivals))
        if pick >= len(flying):
            schedule.revived(revivals.pop(pick - len(flying)))
            continue
        call = flying.pop(pick)
        if failed_at is not None:
            after_failure.append(call)
        killer = next((t for t in call.tiles if kills.get(t, 0) > 0), None)
        if killer is not None:
            kills[killer] -= 1
            dying = [call] + [c for c in flying if c.worker == call.worker]
            flying[:] = [c for c in flying if c.worker != call.worker]
            for c in dying:
                if not c.alone:
                    suspects.update(c.tiles)
                if schedule.died(c, RuntimeError("worker died")):
                    revivals.append(c.worker)
        elif any(fates[t][0] == "raises" for t in call.tiles):
            schedule.failed(call, ValueError("block raised"))
        else:
            schedule.finished(call)
        if schedule.failure is not None and failed_at is None:
            failed_at = len(sent)
    return dict(schedule=schedule, sent=sent, after_failure=after_failure)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_every_tile_finishes_once_or_is_reported(case):
    result = simulate(**case)
    schedule, fates = result["schedule"], case["fates"]
    done = schedule.done
    assert len(done) == len(set(done)), "a tile was recorded twice"
    assert set(done) <= set(case["pending"])
    assert schedule.in_flight == 0  # the drain: every call in flight came back before the end
    if schedule.failure is None:
        assert sorted(done) == case["pending"]
        assert not any(what == "raises" or (what == "kills" and k == ALWAYS) for what, k in fates.values())
        return
    call, cause = schedule.failure
    assert not set(call.tiles) & set(done)
    if isinstance(cause, Died):
        (tile,) = call.tiles
        assert call.alone and fates[tile] == ("kills", ALWAYS), "only a tile that kills its worker every time is reported"
        assert schedule.deaths[tile] == MAX_TILE_FAILURES
    else:
        assert any(fates[t][0] == "raises" for t in call.tiles)
    # Calls that were in flight when the failure came back are still recorded when they finish.
    for c in result["after_failure"]:
        if all(fates[t] == ("ok", 0) for t in c.tiles):
            assert set(c.tiles) <= set(done)


def test_tile_that_always_kills_is_reported_after_max_deaths_alone():
    plan = make(None, 6, 1, 1, blocks=(3, 3))
    result = simulate(plan, list(range(6)), {t: ("kills", ALWAYS) if t == 2 else ("ok", 0) for t in range(6)}, seed=1)
    schedule = result["schedule"]
    call, cause = schedule.failure
    assert call.tiles == (2,) and call.alone and isinstance(cause, Died)
    assert f"died {MAX_TILE_FAILURES} times" in str(cause)
    alone_sends = [c for c in result["sent"] if c.tiles == (2,) and c.alone]
    assert len(alone_sends) == MAX_TILE_FAILURES
    assert sorted(schedule.done) == [0, 1, 3, 4, 5]


def test_a_death_in_a_batch_does_not_count_against_its_tiles():
    plan = make(None, 4, 1, 1, blocks=(4,))
    schedule = Scheduler(plan, range(4))
    (call,) = schedule.dispatch()
    assert call.tiles == (0, 1, 2, 3) and not call.alone
    assert schedule.died(call, RuntimeError()) is True
    assert schedule.dispatch() == []  # down: nothing goes to a restarting worker
    schedule.revived(0)
    retries = []
    while calls := schedule.dispatch():
        assert len(calls) == 1 and calls[0].alone
        retries.append(calls[0].tiles)
        schedule.finished(calls[0])
    assert retries == [(0,), (1,), (2,), (3,)] and schedule.deaths == {} and schedule.requeued == 4


def test_a_second_death_report_while_down_asks_for_no_second_revival():
    plan = make(None, 8, 1, 1, blocks=(1,))
    schedule = Scheduler(plan, range(8))
    first, second = schedule.dispatch()
    assert schedule.died(first, RuntimeError()) is True
    assert schedule.died(second, RuntimeError()) is False
    assert schedule.waiting == 8 and schedule.in_flight == 0


def test_nothing_is_sent_after_a_failure_but_calls_in_flight_are_recorded():
    plan = make(None, 12, 1, 1, blocks=(1, 1))
    schedule = Scheduler(plan, range(12))
    calls = schedule.dispatch()
    assert len(calls) == 2 * IN_FLIGHT
    schedule.failed(calls[0], ValueError("boom"))
    assert schedule.dispatch() == [] and schedule.in_flight == 2 * IN_FLIGHT - 1
    for c in calls[1:]:
        schedule.finished(c)
    assert schedule.dispatch() == [] and schedule.in_flight == 0
    assert sorted(schedule.done) == sorted(t for c in calls[1:] for t in c.tiles)


@pytest.mark.parametrize("workers", [2, 3, 5])
@pytest.mark.parametrize("blocks", [1, 8])
def test_first_tiles_spread_over_idle_workers(workers, blocks):
    """As many tiles as workers: one each, even when they could merge (issue: two tiles on one worker)."""
    plan = make(None, workers, 1, 1, blocks=(blocks,) * workers)
    calls = Scheduler(plan, range(workers)).dispatch()
    assert sorted(c.worker for c in calls) == list(range(workers))
    assert all(len(c.tiles) == 1 for c in calls)
    asked = Scheduler(make(None, 2 * workers, 1, 1, blocks=(1,) * workers), range(2 * workers))
    assert asked.next(0) is not None and asked.next(0) is None  # not while another worker is idle


@pytest.mark.parametrize("tiles", [3, 7, 40])
def test_every_worker_gets_a_first_call_before_any_second(tiles):
    plan = make(None, tiles, 1, 1, blocks=(1, 1, 1))
    calls = Scheduler(plan, range(tiles)).dispatch()
    firsts = calls[:3]
    assert sorted(c.worker for c in firsts) == [0, 1, 2]
    assert len(calls) == min(tiles, 3 * IN_FLIGHT)


def test_a_busy_worker_merges_up_to_its_block_when_no_one_is_idle():
    plan = make(None, 20, 1, 1, blocks=(8, 2))
    schedule = Scheduler(plan, range(20))
    calls = schedule.dispatch()
    # Worker 1 starts halfway along (NOTE: [even start]), so worker 0's second block ends there.
    assert [(c.worker, c.tiles[0], len(c.tiles)) for c in calls] == [(0, 0, 8), (1, 10, 2), (0, 8, 2), (1, 12, 2)]


@pytest.mark.parametrize("tiles, workers", [(8, 2), (9, 2), (12, 3), (5, 4), (2, 2)])
def test_equal_workers_start_on_equal_shares(tiles, workers):
    """NOTE: [even start]: each worker's first tile is where its equal share of the queue
    begins; chosen one after the other, the second of two workers split what the first
    one's first block left, and 8 tiles of a ViT went 5/3."""
    plan = make(None, tiles, 1, 1, blocks=(2,) * workers)
    calls = Scheduler(plan, range(tiles), workers=workers).dispatch()
    firsts = {w: next(c.tiles[0] for c in calls if c.worker == w) for w in range(workers)}
    assert firsts == {w: w * tiles // workers for w in range(workers)}


def test_each_worker_keeps_to_its_own_stretch_of_tiles():
    """NOTE: [affinity]: 3 tiles per sample, 8 samples, 2 workers finishing calls in turn: each
    worker goes on from its last tile, so no sample's tiles are split between workers until
    the end, when the last stretch is shared (work stealing)."""
    plan = make(None, 24, 1, 1, blocks=(1, 1))
    schedule = Scheduler(plan, range(24))
    by_worker: dict[int, list[int]] = {0: [], 1: []}
    calls = schedule.dispatch()
    while calls:
        call = calls.pop(0)
        by_worker[call.worker] += call.tiles
        schedule.finished(call)
        calls += schedule.dispatch()
    assert sorted(by_worker[0] + by_worker[1]) == list(range(24))
    samples = [{t // 3 for t in tiles} for tiles in by_worker.values()]
    assert len(samples[0] & samples[1]) <= 1, by_worker
