"""scheduler: which tiles each worker computes next (pure: no Ray, no I/O; executor's Ray loop drives it).

The executor asks `dispatch()` (or `next(worker)`) for calls to send and tells the scheduler
how each call ended: `finished`, `failed` (the block raised) or `died` (its worker process
went away). The scheduler keeps the queue of pending tiles, merges neighbours into blocks up
to the plan's `blocks[worker]`, keeps at most IN_FLIGHT calls per worker, retries a dead
worker's tiles alone, counts the deaths of a tile run alone, and stops sending after a failure.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from raijac.planner import Plan

IN_FLIGHT = 2  # calls queued per actor: one running, one waiting (NOTE: [pipeline] in worker.py)
MAX_TILE_FAILURES = 3


@dataclass(frozen=True)
class Call:
    """One block sent to one worker: consecutive, mergeable tiles; `alone` for a suspect's retry."""

    worker: int
    tiles: tuple[int, ...]
    alone: bool = False


class Died(Exception):
    """A worker process that died repeatedly on the same block."""

    def __init__(self, exc: BaseException, times: int) -> None:
        super().__init__(f"its worker process died {times} times while computing it (last: {type(exc).__name__})")


class Scheduler:
    """The tiles of one run and the calls that compute them, over `workers` workers.

    NOTE: [drain] When a block fails, no more blocks go out, but the run ends only after every
    block still in flight has returned: the actor writes block k while it computes block k+1
    (NOTE: [pipeline] in worker.py), and other workers are mid-block, so a failure often
    arrives before blocks that will be written. Each of those is recorded (or it fails too,
    and stays pending), so what --resume recomputes is only what was not written.
    """

    def __init__(self, plan: Plan, pending: Iterable[int], workers: int | None = None) -> None:
        self.plan = plan
        n = len(plan.blocks) if workers is None else workers
        self.queue: list[int] = sorted(pending)
        self.total = len(self.queue)
        self.last: list[int | None] = [None] * n  # the last tile each worker took (NOTE: [affinity])
        self.load = [0] * n  # calls in flight per worker
        self.alone = [False] * n  # running a suspect tile with nothing beside it
        self.down = [False] * n  # died: nothing is sent to it until `revived`
        self.suspects: deque[int] = deque()  # tiles held by a worker that died: retried one at a time
        self.deaths: dict[int, int] = {}  # deaths of each tile while it ran alone
        self.failure: tuple[Call, BaseException] | None = None  # the first one; it stops the run
        self.done: list[int] = []
        self.requeued = 0
        # NOTE: [even start] Each worker starts at its own equal share of the queue. Chosen one
        # after the other, the second worker split what the first one's first block left:
        # 8 tiles went 5/3, and a ViT's per-sample run waited on the worker with 5.
        for w in range(n):
            if self.queue:
                self.last[w] = self.queue[w * len(self.queue) // n] - 1

    # ------------------------------------------------------------------ what to send
    def dispatch(self) -> list[Call]:
        """Every call to send now, in rounds: each worker's first call before any second one."""
        calls: list[Call] = []
        while True:
            round_ = [c for w in range(len(self.load)) if (c := self.next(w)) is not None]
            if not round_:
                return calls
            calls += round_

    def next(self, worker: int) -> Call | None:
        """The next call for `worker` (recorded as in flight), or None when it should get nothing now.

        NOTE: [spread] A worker gets a second call, or a merged block of more tiles than its share
        of the queue, only while no other worker is idle: with two workers and two tiles, each
        computes one (a second call queued behind the first would leave the other worker idle).
        """
        w = worker
        if self.failure is not None or self.down[w] or self.alone[w]:
            return None
        if self.suspects and self.load[w] == 0:
            return self._send(w, (self.suspects.popleft(),), alone=True)
        if not self.queue or self.load[w] >= IN_FLIGHT or (self.load[w] and self._idle(besides=w)):
            return None
        return self._send(w, self._take(w), alone=False)

    def _idle(self, besides: int) -> int:
        """How many other workers could start a call now and have none."""
        return sum(1 for v, load in enumerate(self.load) if v != besides and load == 0 and not self.down[v])

    def _take(self, w: int) -> tuple[int, ...]:
        share = -(-len(self.queue) // (1 + self._idle(besides=w)))
        at = self._start(w)
        tiles = [self.queue.pop(at)]
        others = self._heading(besides=w)  # where other workers go on: not merged into (NOTE: [even start])
        while (
            at < len(self.queue)
            and self.queue[at] == tiles[-1] + 1
            and self.queue[at] not in others
            and len(tiles) < min(self.plan.blocks[w], share)
            and self.plan.mergeable(tiles[-1], self.queue[at])
        ):
            tiles.append(self.queue.pop(at))
        self.last[w] = tiles[-1]
        return tuple(tiles)

    def _start(self, w: int) -> int:
        """Where in the queue worker w's next call starts.

        NOTE: [affinity] A worker goes on with the tile after its last one, so the tiles of one
        sample (its rows, cut into several tiles by a small budget) stay on one worker, which
        keeps that sample's forward pass and reference between them (Kernel._kept, Reference)
        instead of every worker recomputing it. Otherwise it starts the longest run of queued
        tiles no other worker is heading into, or the back half of the longest one that is
        (work stealing): at the start, each worker takes its own stretch of samples.
        """
        mine = self.last[w]
        if mine is not None:  # the usual case: one lookup, not a walk over the queue
            at = bisect.bisect_left(self.queue, mine + 1)
            if at < len(self.queue) and self.queue[at] == mine + 1:
                return at
        heading = self._heading(besides=w)
        best, best_len = 0, -1
        i = 0
        while i < len(self.queue):
            j = i
            while j + 1 < len(self.queue) and self.queue[j + 1] == self.queue[j] + 1:
                j += 1
            length = j - i + 1
            start, free = (i, length) if self.queue[i] not in heading else (i + length // 2, length - length // 2)
            if free > best_len and not (start != i and length < 2):
                best, best_len = start, free
            i = j + 1
        return best

    def _heading(self, besides: int) -> set[int]:
        """The tiles the other (live) workers go on with next."""
        return {t + 1 for v, t in enumerate(self.last) if v != besides and t is not None and not self.down[v]}

    def _send(self, w: int, tiles: tuple[int, ...], alone: bool) -> Call:
        self.load[w] += 1
        self.alone[w] = alone
        return Call(w, tiles, alone)

    def _returned(self, call: Call) -> None:
        self.load[call.worker] -= 1
        if call.alone:
            self.alone[call.worker] = False

    # ------------------------------------------------------------------ how calls ended
    def finished(self, call: Call) -> None:
        """The call's blocks are written."""
        self._returned(call)
        self.done.extend(call.tiles)

    def failed(self, call: Call, cause: BaseException) -> None:
        """The call's block raised `cause`: its tiles stay pending and nothing more is sent (NOTE: [drain])."""
        self._returned(call)
        if self.failure is None:
            self.failure = (call, cause)

    def died(self, call: Call, cause: BaseException) -> bool:
        """The call's worker went away; True when it just went down (wait for it, then `revived`).

        Which of its blocks killed it is known only when one ran alone, so every tile it held is
        retried alone, and only deaths while alone count against a tile (MAX_TILE_FAILURES).
        Writes are idempotent: the retries recompute whole tiles.
        """
        self._returned(call)
        went_down, self.down[call.worker] = not self.down[call.worker], True
        if call.alone:
            tile = call.tiles[0]
            self.deaths[tile] = self.deaths.get(tile, 0) + 1
            if self.deaths[tile] >= MAX_TILE_FAILURES:
                if self.failure is None:
                    self.failure = (call, Died(cause, self.deaths[tile]))
                return went_down
        self.suspects.extend(call.tiles)
        self.requeued += len(call.tiles)
        return went_down

    def revived(self, worker: int) -> None:
        """The worker is back up (Ray restarted it) and may take calls again."""
        self.down[worker] = False

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        return sum(self.load)

    @property
    def waiting(self) -> int:
        """Tiles waiting to be sent (queued, or a dead worker's suspects)."""
        return len(self.queue) + len(self.suspects)
