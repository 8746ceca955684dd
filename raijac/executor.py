"""executor: runs a Plan's tiles on Ray actors (after plan and worker; the only module besides worker that imports ray).

Embedded local Ray when no address is given (kept for the life of the process, so later
calls skip its start), an existing cluster with `--address` or `RAY_ADDRESS`, and the
caller's own Ray when it already called `ray.init` (left running). The `Scheduler` decides
which tiles go where; this module sends them as actor calls and waits on them with
`ray.wait`. A tile is recorded done only after its worker returned from writing it.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from raijac.errors import (
    BlockCheckError,
    BudgetError,
    KernelError,
    ModeError,
    ProblemError,
    RaijacError,
    StoreError,
    WorkerError,
    first_line,
)
from raijac.planner import Plan, WorkerCost
from raijac.problem import Problem
from raijac.scheduler import IN_FLIGHT, MAX_TILE_FAILURES, Call, Died, Scheduler
from raijac.shipping import Packed, _Background, _import_paths, _spec_file, pack

__all__ = ["IN_FLIGHT", "MAX_TILE_FAILURES", "RayExecutor", "default_workers"]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when a cluster address does not answer (ray.init waits ~2 min)."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise RaijacError(
            f"--address {address!r} is not host:port (or ray://host:port); pass the head node's GCS address, e.g. 10.0.0.5:6379."
        )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise RaijacError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; start it (ray start --head) or fix --address / RAY_ADDRESS."
        ) from None


def _explicit(address: str) -> bool:
    """An address naming a host (not `auto`/`local`, not a Ray client `ray://` URL)."""
    return address not in ("auto", "local") and not address.startswith("ray://")


def _auth_failed(exc: BaseException) -> bool:
    """Whether a ray.init failure (or one it chains) is a token-authentication refusal."""
    seen = exc
    while seen is not None:
        if "auth" in type(seen).__name__.lower() or "authentication token" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _token_error(address: str, sent: bool) -> RaijacError:
    """What to do when a cluster refuses this client's token (or its lack of one)."""
    where = (
        "the head node's token: `ray get-auth-token` there prints it (it is kept in ~/.ray/auth_token on the head "
        "node, or in RAY_AUTH_TOKEN where the cluster was started with it)"
    )
    if sent:
        return RaijacError(
            f"the Ray cluster at {address} refused this client's authentication token (from RAY_AUTH_TOKEN or "
            f"~/.ray/auth_token here); set RAY_AUTH_TOKEN to {where}."
        )
    return RaijacError(
        f"the Ray cluster at {address} requires an authentication token and this client sent none; set RAY_AUTH_MODE=token "
        f"and RAY_AUTH_TOKEN to {where} (or copy that file to ~/.ray/auth_token here)."
    )


def _check_token(address: str, timeout: float = 5.0) -> None:
    """Refuse in seconds, quietly, an address whose cluster would refuse this client's token.

    NOTE: [token probe] Joining a token-authenticated cluster without its token, ray.init
    retries for many seconds and prints a page of warnings before it fails. One gRPC call to the
    cluster's GCS with the metadata ray.init would send (the token only in RAY_AUTH_MODE=token,
    as Ray does for an explicit address) answers UNAUTHENTICATED at once. Any other answer,
    or none, leaves the verdict to ray.init.
    """
    if not _explicit(address):
        return
    try:
        import grpc
        from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray 2.x layout: ray.init's own error stands
        return
    try:
        sent = get_authentication_mode() == AuthenticationMode.TOKEN and AuthenticationTokenLoader.instance().has_token()
        metadata = tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items()) if sent else ()
    except Exception:  # no token where token mode is on: ray.init says so at once
        return
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _token_error(address, sent) from None


def default_workers(cpus: int) -> int:
    """CPU actors when none are asked for: one per core, at most 8."""
    return max(1, min(int(cpus), 8))


# The driver's own refusals (NOTE: [keep after refusal]).
DRIVER_REFUSALS = (ProblemError, ModeError, BudgetError, StoreError)


class RayExecutor:
    """A Ray session plus a set of worker actors; use as a context manager.

    Arguments:
        address: a Ray cluster to join (else RAY_ADDRESS, else an embedded local Ray).
        workers: CPU actors to start (default: one per core, at most 8; one per GPU on GPUs).
        spec: the problem's `file.py:NAME` spec, shipped to a cluster's workers as a module.
        keep_ray: keep an embedded local Ray (and its actors) running for the life of this
            process, so later calls skip its start-up; False shuts it down on exit.
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        workers: int | None = None,
        spec: str | None = None,
        keep_ray: bool = True,
    ) -> None:
        if workers is not None and workers < 1:
            raise RaijacError(f"--workers must be at least 1, but got {workers}.")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.explicit_address = address
        self.requested_workers = workers
        self.keep_ray = keep_ray
        self.owns_ray = False  # shut Ray down on exit
        self.spec = spec
        self.shipped: tuple[str, str] | None = None  # (spec file, NAME) shipped to the cluster as a module
        self.actors: list[Any] = []
        self.names: list[str] = []
        self.source: str | Any = None  # this run's problem as the actors get it (see _ship)
        self.run_id: str | None = None
        self._shipping: _Background | None = None  # a preload's shipping thread
        self.dispatched = False  # whether blocks went out (NOTE: [keep after refusal])

    # ------------------------------------------------------------------ Ray session
    def __enter__(self) -> RayExecutor:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            kept = current == _kept_ray["address"]
            if self.explicit_address and self.explicit_address != current and _explicit(self.explicit_address):
                if not kept:
                    raise RaijacError(
                        f"this process is already connected to the Ray cluster at {current}, not {self.explicit_address}; "
                        "call ray.shutdown() first, or drop the address to use the running Ray."
                    )
                _shutdown_kept()  # raijac's own embedded Ray gives way to the cluster asked for
            else:
                self.owns_ray = kept and not self.keep_ray
                return self
        kwargs = dict(logging_level="ERROR", log_to_driver=True)
        if self.address:
            _check_reachable(self.address)
            _check_token(self.address)
        warm = _warm_driver()  # while ray.init waits for its processes (see NOTE: [boot])
        try:
            if self.address:
                # On a cluster the spec file may exist only on this machine: ship it to every
                # worker as a module (py_modules works at the job level only, hence here).
                shipped = _spec_file(self.spec) if self.spec else None
                if shipped:
                    kwargs["runtime_env"] = {"py_modules": [shipped[0]]}
                ray.init(address=self.address, **kwargs)
                self.shipped = shipped
            else:
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
        except Exception as exc:
            if _auth_failed(exc):
                raise _token_error(self.address, sent=bool(os.environ.get("RAY_AUTH_MODE") == "token")) from exc
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RaijacError(f"cannot start or reach {where}: {msg}; check --address / RAY_ADDRESS.") from exc
        finally:
            warm.join()
        if self.address or not self.keep_ray:
            self.owns_ray = True
        else:
            _keep_ray(ray.get_runtime_context().gcs_address)
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        import ray

        if self._shipping is not None:  # never leave a put running into ray.shutdown
            try:
                self._shipped()
            except Exception:
                if exc_type is None:
                    raise
        # NOTE: [keep after refusal] A refusal the driver makes before any block is sent (a
        # mode that cannot run, a budget too small, a store in the way) leaves the actors as
        # they were: the next call keeps them warm instead of paying 3-5 s of process start.
        # Anything else, or any error once blocks went out, leaves them in an unknown state.
        if exc_type is not None and not (issubclass(exc_type, DRIVER_REFUSALS) and not self.dispatched):
            self.discard()
        if self.owns_ray:
            _POOLS.pop(_session_key(), None)
            if _kept_ray["address"] == ray.get_runtime_context().gcs_address:
                _kept_ray["address"] = None
            ray.shutdown()

    # ------------------------------------------------------------------ actors
    def boot(self, budgets: list[int] | None = None) -> None:
        """Get the actors now (one per GPU, else CPU actors) without waiting for them: their
        processes start and import torch while the driver goes on (see NOTE: [boot])."""
        import ray

        if self.actors:
            return
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(float(resources.get("CPU", 1)), 1.0)
        if gpus:
            n, self.device = gpus, "cuda"
            options = {"num_gpus": 1, "num_cpus": min(1.0, cpus / gpus)}
            self.threads = None
        else:
            n = self.requested_workers or (len(budgets) if budgets and len(budgets) > 1 else default_workers(int(cpus)))
            self.device = "cpu"
            options = {"num_cpus": cpus / n}
            self.threads = max(1, int(cpus / n))
        if budgets and len(budgets) not in (1, n):
            raise RaijacError(f"--memory-budget lists {len(budgets)} budgets for {n} workers; give one, or one per worker.")
        self.actors = _hosts(n, options)
        self.names = [f"{self.device}{i}" for i in range(n)]

    def _ship(self, source: str | Problem | Packed, budgets: list[int] | None) -> None:
        """Boot the actors and name this run's problem for them: in the object store, or by spec."""
        import ray

        self.boot(budgets)
        if not isinstance(source, str):
            source = ray.put(source if isinstance(source, Packed) else pack(source))
        elif self.shipped and source == self.spec:
            # Shipped as a module when Ray was joined: import it by name. Not looked up on disk
            # again: a `ray job` driver's working folder (where the file is) may be gone by now.
            path, name = self.shipped
            source = f"{os.path.splitext(os.path.basename(path))[0]}:{name}"
        self.source, self.run_id = source, uuid.uuid4().hex

    def preload(
        self,
        source: str | Problem,
        *,
        chain: bool = False,
        budgets: list[int] | None = None,
        **load_kwargs: Any,
    ) -> None:
        """Ship the problem and let every actor load it (build it, check its fingerprint, put
        it on its device, trace its chain when `chain`) while the driver triages; `start`
        then finds it loaded. Shipping runs in a background thread (NOTE: [background put]);
        its errors, and the actors', surface from `start`."""
        self.boot(budgets)
        packed = source if isinstance(source, str) else pack(source)  # here: the triage may swap a module's tensors

        def ship() -> None:
            self._ship(packed, budgets)
            for actor, name in zip(self.actors, self.names, strict=True):
                kwargs = dict(name=name, device=self.device, threads=self.threads, **load_kwargs)
                actor.preload.remote(self.run_id, [self.source, _import_paths()], kwargs, chain)

        self._shipping = _Background(ship)

    def _shipped(self) -> None:
        """Wait for a background `preload`'s shipping; re-raise its error."""
        shipping, self._shipping = self._shipping, None
        if shipping is not None:
            shipping.join()

    def start(
        self,
        source: str | Problem,
        *,
        budgets: list[int] | None = None,
        while_probing: Callable[[], None] | None = None,
        measure: str = "full",
        **worker_kwargs: Any,
    ) -> list[WorkerCost]:
        """Let each actor build the problem (unless `preload` did) and measure its own memory
        cost, "full" or "quick" (booting the actors first if `boot` was not called);
        `while_probing` runs here meanwhile (the problem is already shipped, so it may use
        the problem)."""
        self._shipped()
        if self.run_id is None:
            self._ship(source, budgets)
        n, device, threads, source, run_id = len(self.actors), self.device, self.threads, self.source, self.run_id
        per_worker = (budgets * n if len(budgets) == 1 else budgets) if budgets else [None] * n
        self.recipes = [
            (
                run_id,
                [source, _import_paths()],
                dict(name=name, device=device, threads=threads, local_workers=n, budget=b, **worker_kwargs),
            )
            for name, b in zip(self.names, per_worker, strict=True)
        ]
        try:
            # CPU workers run one torch build on one kind of device: one of them measures the
            # memory cost for all (alone, so the probe has the memory bandwidth to itself), the
            # others only build the problem. Every GPU measures its own.
            return self._measured(measure, while_probing)
        except KernelError:  # the actors are sound; the caller may go on in another mode
            raise
        except ProblemError:  # a worker refused the problem it built (NOTE: [built apart] in worker): sound too
            raise
        except BaseException:
            self.discard()
            raise

    def measure(self) -> list[WorkerCost]:
        """The exact memory costs (`start` gave an upper bound that binds the plan)."""
        try:
            return self._measured("full", None)
        except BaseException:
            self.discard()
            raise

    def _measured(self, measure: str, while_probing: Callable[[], None] | None) -> list[WorkerCost]:
        shared = self.device == "cpu"
        costs = self._probe([measure if not shared or i == 0 else "none" for i in range(len(self.actors))], while_probing)
        if shared:
            first = costs[0]
            costs = [replace(first, name=c.name, budget=c.budget) for c in costs]
        return costs

    def _probe(self, measure: list[str], while_probing: Callable[[], None] | None) -> list[WorkerCost]:
        """Every actor's probe; one whose process goes away (a crash, a restart under way, its
        node lost) is waited for and probed again, up to MAX_TILE_FAILURES times (NOTE: [revive])."""
        import ray

        went_away = _went_away_errors()
        waiting = {
            a.probe.remote(r, m): (i, "probe") for i, (a, r, m) in enumerate(zip(self.actors, self.recipes, measure, strict=True))
        }
        if while_probing is not None:
            while_probing()
        costs: list[WorkerCost | None] = [None] * len(self.actors)
        deaths = [0] * len(self.actors)
        while waiting:
            (ref,), _ = ray.wait(list(waiting), num_returns=1)
            i, kind = waiting.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, RaijacError):
                    raise cause from None
                raise WorkerError(f"worker {self.names[i]} failed: {type(cause).__name__}: {first_line(cause)}") from None
            except went_away as exc:
                failed = start_failure(exc)
                if failed is not None:  # it would fail the same way again
                    raise WorkerError(
                        f"worker {self.names[i]} could not start: {failed}; the driver and every worker must run the same "
                        "raijac, torch and ray and import f's modules alike: check what each node has installed."
                    ) from None
                deaths[i] += 1
                if kind == "ready" or deaths[i] >= MAX_TILE_FAILURES:
                    raise WorkerError(
                        f"worker {self.names[i]} went away {deaths[i]} times while loading the problem (last: "
                        f"{type(exc).__name__}: {first_line(exc)}); check that building the problem does not crash "
                        "the process or run it out of memory."
                    ) from None
                waiting[_revive(self.actors[i])] = (i, "ready")
                continue
            if kind == "ready":
                waiting[self.actors[i].probe.remote(self.recipes[i], measure[i])] = (i, "probe")
            else:
                costs[i] = value
        return costs  # type: ignore[return-value]

    def discard(self) -> None:
        """Kill this run's actors and forget them (after an error, their state is unknown)."""
        import ray

        _POOLS.pop(_session_key(), None)
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []

    # ------------------------------------------------------------------ the run
    def run(
        self,
        plan: Plan,
        out: str,
        pending: Iterable[int],
        on_done: Callable[[list[int]], None],
        progress: bool = False,
    ) -> dict[str, Any]:
        """Compute the pending tiles; `on_done(tiles)` records tiles whose blocks are written
        (those that finished together in one call, after the next blocks are sent out)."""
        import ray

        went_away = _went_away_errors()
        self.dispatched = True
        schedule = Scheduler(plan, pending, workers=len(self.actors))
        calls: dict[Any, Call] = {}
        revivals: dict[Any, int] = {}  # ready pings to restarting workers (NOTE: [revive])
        seeds_done, started = 0, time.perf_counter()
        bar = _progress_bar(schedule.total, plan, progress)
        records: list[dict] = []

        def send() -> None:
            for call in schedule.dispatch():
                first, last = plan.tile(call.tiles[0]), plan.tile(call.tiles[-1])
                actor = self.actors[call.worker]
                box = (first.b0, last.b1, first.s0, last.s1)
                calls[actor.run.remote(self.recipes[call.worker], out, *box, (plan.tile_samples, plan.tile_seeds))] = call

        try:
            send()
            while calls or (revivals and schedule.failure is None):
                waiting = list(calls) + (list(revivals) if schedule.failure is None else [])
                ready, rest = ray.wait(waiting, num_returns=1)
                if rest:  # whatever else finished meanwhile is recorded in the same ledger write
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                finished: list[int] = []
                try:
                    for ref in ready:
                        if ref in revivals:
                            worker = revivals.pop(ref)
                            try:
                                ray.get(ref)
                                schedule.revived(worker)
                            except went_away:
                                pass  # gone for good (Ray will not restart it): it gets nothing more
                            continue
                        call = calls.pop(ref)
                        try:
                            record = ray.get(ref)
                        except ray.exceptions.RayTaskError as exc:
                            schedule.failed(call, exc.cause)
                            continue
                        except went_away as exc:
                            if schedule.died(call, exc):
                                revivals[_revive(self.actors[call.worker])] = call.worker
                            continue
                        schedule.finished(call)
                        finished.extend(call.tiles)
                        records.append({**record, "tiles": len(call.tiles)})
                        first, last = plan.tile(call.tiles[0]), plan.tile(call.tiles[-1])
                        seeds_done += (last.s1 - first.s0) * (last.b1 - first.b0)
                    # NOTE: [ledger] The next blocks go out before the ledger write, which a worker
                    # waiting for its next block would otherwise idle through.
                    send()
                finally:
                    if finished:  # also when an interrupt stops the run: the written ones stay recorded
                        on_done(finished)
                if bar is not None and finished:
                    elapsed = time.perf_counter() - started
                    bar.set_postfix_str(f"{seeds_done / max(elapsed, 1e-9):,.0f} seeds/s", refresh=False)
                    bar.update(len(finished))
        finally:
            if bar is not None:
                bar.close()
        done_count = len(schedule.done)
        stats = self._stats(records, done_count, schedule.requeued)
        if schedule.failure is not None:  # after the drain, so the count of kept tiles includes them all
            call, cause = schedule.failure
            error = self._tile_error(plan, list(call.tiles), call.worker, cause, done_count)
            if isinstance(cause, BlockCheckError | KernelError):  # NOTE: [worker-only failure]
                raise WrongBlocks(str(error), cause=cause, tiles=list(call.tiles), stats=stats) from None
            raise error
        if schedule.waiting:
            raise WorkerError(
                f"every worker process went away and Ray did not restart them; {done_count} finished tiles are kept "
                "(check the nodes' logs), and rerun with --resume."
            )
        return stats

    def _stats(self, records: list[dict], done_count: int, requeued: int) -> dict[str, Any]:
        return {
            "tiles_computed": done_count,
            "tiles_requeued": requeued,
            "blocks": len(records),
            "compute_s": sum(r["compute_s"] for r in records),
            "write_s": sum(r["write_s"] for r in records),
            "bytes": sum(r["bytes"] for r in records),
            "nodes": sorted({r["node"] for r in records}),
            "by_worker": {n: sum(r["tiles"] for r in records if r["worker"] == n) for n in self.names},
            "finite": all(r["finite"] for r in records),
            "rss_growth": max((r["rss_growth"] or 0 for r in records), default=None),
            "oom_splits": sum(max((r["oom_splits"] for r in records if r["worker"] == n), default=0) for n in self.names),
            "check_unchecked": sum(r.get("check_unchecked") or 0 for r in records),
            "check_max_rel_err": max(
                (r["check_max_rel_err"] for r in records if r.get("check_max_rel_err") is not None), default=None
            ),
        }

    def _tile_error(self, plan: Plan, tiles: list[int], w: int, cause: BaseException, done: int) -> WorkerError:
        first, last = plan.tile(tiles[0]), plan.tile(tiles[-1])
        span = plan.describe_tile(type(first)(first.index, first.b0, last.b1, first.s0, last.s1))
        label = f"tile {tiles[0]}" if len(tiles) == 1 else f"tiles {tiles[0]}-{tiles[-1]}"
        hint = " (and a smaller --memory-budget or --block-size)" if "memory" in str(cause).lower() else ""
        what = str(cause) if isinstance(cause, Died) else f"{type(cause).__name__}: {first_line(cause)}"
        if isinstance(cause, BlockCheckError | KernelError):  # the caller goes on in another mode or says what to do
            return WorkerError(
                f"{label} ({span}) failed on worker {self.names[w]}: {first_line(cause)}; {done} finished tiles are kept"
            )
        return WorkerError(
            f"{label} ({span}) failed on worker {self.names[w]}: {what}. "
            f"{done} finished tiles are kept; fix the cause and rerun with --resume{hint}."
        )


# NOTE: [worker-only failure] The driver's triage runs each mode on its own CPU, so a mode can
# pass there and raise on a worker: a GPU worker (an op with a CPU batching rule and no CUDA
# one), or a setting made only in the driver's process. Such a kernel error fails its tile
# like a wrong block (BlockCheckError), and auto goes on in the next mode for the tiles
# left (NOTE: [fallback] in api), where it used to stop the run. Where a plain forward pass
# of f on the same samples raises too, the error is f's own: it fails the run as before,
# naming the cause and --resume, since every mode would fail alike.
class WrongBlocks(WorkerError):
    """A block failed its check (BlockCheckError) or its mode raised on a worker
    (KernelError): the run may go on in another mode (api.compute); `stats` says what was
    done before, `tiles` which tiles failed."""

    def __init__(self, message: str, *, cause: BlockCheckError | KernelError, tiles: list[int], stats: dict[str, Any]) -> None:
        super().__init__(message)
        self.cause, self.tiles, self.stats = cause, tiles, stats


def merge_stats(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two runs' executor stats as one (a run that changed mode part way: api.compute)."""
    if a is None:
        return b
    out = dict(b)
    for key in ("tiles_computed", "tiles_requeued", "blocks", "compute_s", "write_s", "bytes", "oom_splits", "check_unchecked"):
        out[key] = a[key] + b[key]
    out["nodes"] = sorted(set(a["nodes"]) | set(b["nodes"]))
    out["by_worker"] = {n: a["by_worker"].get(n, 0) + b["by_worker"].get(n, 0) for n in {*a["by_worker"], *b["by_worker"]}}
    out["finite"] = a["finite"] and b["finite"]
    for key in ("rss_growth", "check_max_rel_err"):
        seen = [v for v in (a[key], b[key]) if v is not None]
        out[key] = max(seen) if seen else None
    return out


def _went_away_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean a call's worker process went away, not that the call raised.

    RayActorError covers ActorDiedError and ActorUnavailableError (a call sent to an actor that
    is restarting fails at once with it), ObjectLostError covers OwnerDiedError and the other
    lost-object errors; NodeDiedError, WorkerCrashedError, LocalRayletDiedError and Ray's
    OutOfMemoryError (its memory monitor killed the worker) complete it. Getattr keeps older
    Ray 2.x, which lack some of them, working.
    """
    import ray.exceptions as rx

    names = (
        "RayActorError",
        "WorkerCrashedError",
        "NodeDiedError",
        "ObjectLostError",
        "LocalRayletDiedError",
        "OutOfMemoryError",
    )
    return tuple(c for c in (getattr(rx, n, None) for n in names) if c is not None)


def start_failure(exc: BaseException) -> str | None:
    """What raised in an actor's creation task (`AttributeError: Can't get attribute ...`, a
    worker whose raijac differs from the driver's), from Ray's ActorDiedError, whose first
    line says only that the actor died; None for any other death."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "error raised in its creation task" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _revive(actor: Any) -> Any:
    """A ref that is ready once Ray has restarted `actor`.

    NOTE: [revive] A call sent to an actor Ray is restarting fails at once with
    ActorUnavailableError ("The actor is restarting"), before it runs: retrying a dead
    worker's tiles on it at once would count those instant failures as deaths of the tile.
    So the driver first waits on a ping that Ray retries until the actor is back
    (max_task_retries=-1 on this call only; block calls keep at-most-once semantics so the
    scheduler knows which tile killed a worker).
    """
    return actor.ready.options(max_task_retries=-1).remote()


# The embedded local Ray kept for the life of this process (NOTE: [kept Ray]).
_kept_ray: dict[str, str | None] = {"address": None}


def _keep_ray(address: str) -> None:
    """Keep the embedded Ray just started until this process exits.

    NOTE: [kept Ray] Starting a local Ray takes seconds (its processes, then the actors'
    torch imports): a script that called raijac.compute three times paid it three times.
    Kept, later calls find Ray running and reuse its actors
    (_POOLS); it is shut down at exit, or on `keep_ray=False`.
    """
    if _kept_ray["address"] is None:
        atexit.register(_shutdown_kept)
    _kept_ray["address"] = address


def _shutdown_kept() -> None:
    """Shut down raijac's kept embedded Ray if it is still this process's Ray."""
    import ray

    address, _kept_ray["address"] = _kept_ray["address"], None
    if address is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == address:
        _POOLS.pop(_session_key(), None)
        ray.shutdown()


def _warm_driver() -> threading.Thread:
    """Pay this process's one-off torch.func costs in a background thread.

    NOTE: [boot] A process's first vjp imports torch._dynamo (about a second), in the driver
    (for the triage) and in every worker. So the driver pays it while ray.init waits on its
    processes, and `boot` starts the actors before the triage, each paying it in its own
    process start (WorkerHost.__init__) while the driver triages. On a warm Ray `preload`
    likewise hands the problem to the actors before the triage, so building it, checking it
    and tracing its chain overlap the driver's own triage (benchmarks/RESULTS.md).
    """
    from raijac.probe import warm_up

    thread = threading.Thread(target=warm_up, name="raijac-warm-up", daemon=True)
    thread.start()
    return thread


# Worker hosts kept between runs on a Ray the caller owns: session -> (resources, hosts).
_POOLS: dict[tuple, tuple[str, list[Any]]] = {}


def _session_key() -> tuple:
    import ray

    ctx = ray.get_runtime_context()
    return (ctx.gcs_address, ctx.get_job_id())


# NOTE: [huge pages] A CPU worker's big tensors are mapped afresh each block (NOTE: [heap] in
# worker), and each 4 KiB page of them faults and is zeroed on first touch: 280k faults and
# 0.45 s of kernel time in a 0.9 s ResNet-18 parameter tile, more than half of all its time
# once two workers also write to the page cache. torch asks the kernel for 2 MiB pages for
# its allocations of 2 MiB and more where THP_MEM_ALLOC_ENABLE is set (read once, at the
# first allocation, hence set for the worker processes before they start): 7k faults, and
# the tile took 0.57 s. Linux only grants them where transparent huge pages are `always` or
# `madvise` (the default); elsewhere the setting does nothing. MALLOC_ARENA_MAX=1 (glibc
# reads it at start-up too) keeps the heap one arena that can be kept between blocks (NOTE:
# [kept heap] in worker). A value the caller set in the driver's environment (0 turns huge
# pages off) goes to the workers instead.
THP = "THP_MEM_ALLOC_ENABLE"
ARENAS = "MALLOC_ARENA_MAX"


def worker_env() -> dict[str, str]:
    """The environment variables worker processes start with (NOTE: [huge pages])."""
    return {THP: os.environ.get(THP, "1"), ARENAS: os.environ.get(ARENAS, "1")}


def _hosts(n: int, options: dict[str, Any]) -> list[Any]:
    """n worker hosts with these resources, reused from the last run in this Ray session.

    Hosts of another resource shape are killed first: they would hold CPUs the new ones need.
    """
    import ray

    from raijac.worker import WorkerHost

    env = worker_env()
    key = repr((sorted(options.items()), sorted(env.items())))  # hosts of another environment are replaced too
    old_key, hosts = _POOLS.get(_session_key(), (key, []))
    if old_key != key:
        for host in hosts:
            ray.kill(host)
        hosts = []
    if len(hosts) < n:  # (making the actor class costs 3 ms of a warm run: only when one is started)
        # Two concurrent calls per host: one computes while the other writes (NOTE: [pipeline] in worker.py).
        remote = ray.remote(WorkerHost).options(
            max_restarts=-1, max_task_retries=0, max_concurrency=IN_FLIGHT, runtime_env={"env_vars": env}, **options
        )
        while len(hosts) < n:
            hosts.append(remote.remote())
    _POOLS[_session_key()] = (key, hosts)
    return hosts[:n]


def _progress_bar(total: int, plan: Plan, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tile", desc=f"raijac {plan.mode}", file=sys.stderr, dynamic_ncols=True)
