"""The executor under faults: unreachable clusters, killed workers, a killed driver and
resume, heterogeneous budgets. Real Ray processes are killed, never mocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
import torch
import zarr

import raijac
from raijac import store
from raijac.executor import MAX_TILE_FAILURES
from raijac.shipping import pack
from tests.problems import assert_close


class _DispatchSpy:
    """Records, while it is pickled, whether cloudpickle's process-wide dispatch holds a tensor reducer."""

    seen: list[object] = []

    def __reduce__(self):
        from ray import cloudpickle

        _DispatchSpy.seen.append(cloudpickle.CloudPickler.dispatch.get(torch.Tensor))
        return (_DispatchSpy, ())


def test_pack_ships_tensors_out_of_band_without_patching_cloudpickle():
    """A problem's tensors travel as raw buffers and come back equal, private, and of their own
    types (a Parameter stays a Parameter), and cloudpickle's shared dispatch table, which other
    threads pickle with meanwhile (Ray's own put), is never changed during the pack."""
    from ray import cloudpickle

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    spy = _DispatchSpy()

    def f(x):
        assert spy is not None
        return model(x)

    x = torch.randn(4, dtype=torch.float64)
    problem = raijac.Problem(f, x)
    before = cloudpickle.CloudPickler.dispatch.get(torch.Tensor)
    _DispatchSpy.seen.clear()
    packed = pack(problem)
    assert _DispatchSpy.seen == [before], "pack changed cloudpickle's process-wide dispatch"
    assert len(packed.buffers) >= 5  # four weights and biases, and x
    loaded = packed.load()
    assert_close(loaded.f(loaded.x).detach().numpy(), model(x).detach().numpy())
    copy = next(c.cell_contents for c in loaded.f.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
    got = dict(copy.named_parameters())
    assert all(type(p) is torch.nn.Parameter and p.requires_grad for p in got.values())
    got["0.weight"].data.zero_()  # private: the driver's model is untouched
    assert model[0].weight.abs().sum() > 0


def test_what_stopped_a_worker_from_starting_is_read_from_rays_error(ray_session):
    """A worker whose creation raises (a node whose raijac differs from the driver's cannot
    unpickle its class) dies with an ActorDiedError whose first line says only that; the
    driver's error names the exception itself (executor.start_failure)."""
    import ray

    from raijac.executor import start_failure

    @ray.remote(num_cpus=0)
    class Broken:
        def __init__(self) -> None:
            raise AttributeError("Can't get attribute 'WorkerHost._gone' on <module 'raijac.worker'>")

        def ping(self) -> int:
            return 1

    actor = Broken.remote()
    with pytest.raises(ray.exceptions.RayActorError) as died:
        ray.get(actor.ping.remote(), timeout=60)
    assert start_failure(died.value) == "AttributeError: Can't get attribute 'WorkerHost._gone' on <module 'raijac.worker'>"
    assert start_failure(ray.exceptions.RayActorError()) is None  # another death: nothing to name


def test_unreachable_address_fails_fast(tmp_path):
    """In a fresh process (no Ray yet), as a user would meet it: one line, in seconds."""
    spec = tmp_path / "tiny.py"
    spec.write_text("import torch, raijac\nproblem = raijac.Problem(torch.sin, torch.ones(3))\n")
    out = tmp_path / "never.zarr"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "raijac", "compute", f"{spec}:problem", "--out", str(out), "--address", "127.0.0.1:9"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert time.perf_counter() - start < 30
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:9")
    assert not out.exists()


KEPT_RAY_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import psutil, ray, torch
    import raijac
    from raijac.executor import RayExecutor

    with RayExecutor(keep_ray=False):  # the opt-out: the Ray it starts is shut down on exit
        pass
    opted_out = not ray.is_initialized()
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    times, errors = [], []
    for i in range(2):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        start = time.perf_counter()
        jac = raijac.compute(raijac.Problem(lambda x: torch.tanh(w @ x), x), f"{sys.argv[1]}/j{i}.zarr", workers=1)
        times.append(time.perf_counter() - start)
        want = torch.func.jacrev(lambda x: torch.tanh(w @ x))(x).numpy()
        errors.append(float(abs(jac.numpy() - want).max() / abs(want).max()))
    kept = ray.is_initialized()
    ray_procs = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
    print(json.dumps(dict(times=times, errors=errors, kept=kept, opted_out=opted_out, procs=ray_procs)))
    """
)


def test_embedded_ray_is_kept_for_the_process_and_gone_after_it(tmp_path):
    """Two raijac.compute calls in a script without ray.init: the second reuses the first's
    Ray and actors (much faster), results match jacrev, and no Ray process outlives the script
    (shut down at exit). `keep_ray=False` shuts its Ray down at once."""
    script = tmp_path / "two_calls.py"
    script.write_text(KEPT_RAY_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    first, second = report["times"]
    assert second < first / 3, report["times"]
    assert max(report["errors"]) < 1e-5
    assert report["kept"] and report["opted_out"]
    assert report["procs"], "the embedded Ray started no processes?"

    def alive() -> list[str]:
        found = []
        for pid, created in report["procs"]:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"{pid} {' '.join(proc.cmdline())[:80]}")
            except psutil.Error:
                pass
        return found

    deadline = time.time() + 120  # a loaded machine's workers take a while to notice their raylet is gone
    while (left := alive()) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the script: {left}"


def test_address_other_than_the_running_ray_is_refused(ray_session, store_path):
    with pytest.raises(raijac.RaijacError, match="already connected to the Ray cluster at"):
        raijac.compute(raijac.Problem(torch.sin, torch.randn(3)), store_path, address="127.0.0.1:9")


def _slow_problem(pid_dir: str, n: int = 30, delay: float = 0.1) -> raijac.Problem:
    """Per-sample tanh layer that records its worker's pid and takes `delay` per forward pass."""
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def f(x):
        with open(os.path.join(pid_dir, str(os.getpid())), "w"):
            pass
        if x.shape[0] == 1:
            time.sleep(delay)
        return torch.tanh(x @ w.T)

    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    return raijac.Problem(f, x, batched=True), w, x


def _reference(w, x):
    return torch.func.vmap(torch.func.jacrev(lambda xi: torch.tanh(xi @ w.T)))(x).numpy()


@pytest.mark.usefixtures("ray_session")
def test_killed_worker_is_replaced_and_nothing_is_lost(tmp_path, store_path):
    """SIGKILL one worker process mid-run: its tiles are requeued, the result is complete and right."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    problem, w, x = _slow_problem(str(pid_dir))
    killed = []
    stop = threading.Event()

    def killer():
        while not stop.is_set():  # as long as the run lasts (actors start slowly on a loaded machine)
            if os.path.exists(store_path) and os.path.exists(os.path.join(store_path, "tiles")):
                done = zarr.open_group(store_path)["tiles"][:].sum()
                pids = [int(p) for p in os.listdir(pid_dir) if int(p) != os.getpid()]
                if done >= 3 and pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        jac = raijac.compute(problem, store_path, mode="rev", workers=2, block_size=5)
    finally:
        stop.set()
        thread.join()
    assert killed, "the test never found a worker to kill"
    assert jac.complete and jac.summary["tiles_requeued"] >= 1
    assert jac.summary["tiles_computed"] == jac.summary["tiles_total"]
    assert_close(jac.numpy(), _reference(w, x))


@pytest.mark.usefixtures("ray_session")
def test_a_tile_that_keeps_killing_its_worker_is_reported(store_path):
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def f(x):
        if x.shape[0] == 1 and float(x[0, 0]) == 99.0:
            os._exit(1)  # the worker process dies on this sample, every time
        return torch.tanh(x @ w.T)

    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    x[5, 0] = 99.0
    with pytest.raises(raijac.WorkerError) as err:
        raijac.compute(raijac.Problem(f, x, batched=True), store_path, mode="rev", workers=2, block_size=5)
    msg = str(err.value)
    assert "tile 5 (samples 5:6" in msg and f"died {MAX_TILE_FAILURES} times" in msg and "finished tiles are kept" in msg
    pending = store.Ledger(zarr.open_group(store_path)).pending()
    assert 5 in pending and len(pending) < 8


@pytest.mark.usefixtures("ray_session")
def test_workers_restarting_when_a_run_starts_are_waited_for(tmp_path, store_path):
    """SIGKILL the pooled worker processes just before a run: its probes reach actors Ray is
    still restarting (a call fails at once with ActorUnavailableError) and wait for them."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    problem, w, x = _slow_problem(str(pid_dir), n=6, delay=0.0)

    def worker_pids() -> set[int]:
        return {int(p) for p in os.listdir(pid_dir)} - {os.getpid()}

    raijac.compute(problem, store_path + "-first", mode="rev", workers=2)
    old = worker_pids()
    assert old, "the first run left no worker pid"
    for pid in old:
        os.kill(pid, signal.SIGKILL)
        os.remove(pid_dir / str(pid))
    jac = raijac.compute(problem, store_path, mode="rev", workers=2)
    assert jac.complete and worker_pids() and not worker_pids() & old
    assert_close(jac.numpy(), _reference(w, x))


@pytest.mark.usefixtures("ray_session")
def test_heterogeneous_budgets_give_different_blocks(store_path):
    """Two workers, one with 16x the budget: it merges more tiles per block and does more of them."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(256, 128) / 11, torch.randn(2048, 256) / 16
    problem = raijac.Problem(lambda x: torch.tanh(torch.tanh(x @ w1.T) @ w2.T), torch.randn(128), batch_aware=True)
    jac = raijac.compute(problem, store_path, mode="rev", memory_budget=["400KB", "6MB"])
    budgets = [wk["budget"] for wk in jac.meta["workers"]]
    assert budgets == [400_000, 6_000_000]
    by_worker = jac.summary["tiles_by_worker"]
    assert by_worker["cpu1"] > by_worker["cpu0"] > 0
    assert_close(jac.numpy(), torch.func.jacrev(problem.f)(problem.x).numpy())


def test_budget_list_must_match_workers(ray_session, store_path):
    with pytest.raises(raijac.RaijacError, match="lists 3 budgets for 2 workers"):
        raijac.compute(raijac.Problem(torch.sin, torch.randn(5)), store_path, workers=2, memory_budget="1MB,2MB,3MB")


SLOW_SPEC = textwrap.dedent(
    """
    import time
    import torch
    import raijac

    def problem():
        torch.manual_seed(0)
        w = torch.randn(6, 4)

        def f(x):
            if x.shape[0] == 1:
                time.sleep(0.25)
            return torch.tanh(x @ w.T)

        return raijac.Problem(f, torch.randn(24, 4), batched=True)
    """
)


@pytest.mark.slow
def test_killed_driver_then_resume_computes_only_the_rest(tmp_path):
    """SIGKILL the `raijac compute` driver mid-run, then `--resume` finishes from the ledger."""
    spec = tmp_path / "slow_spec.py"
    spec.write_text(SLOW_SPEC)
    out = str(tmp_path / "run.zarr")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "raijac", "compute", f"{spec}:problem", "--out", out, "--workers", "2", "--block-size", "6"]
    driver = subprocess.Popen(
        cmd + ["--no-progress"], env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        done = 0
        while time.time() < deadline and driver.poll() is None:
            if os.path.exists(os.path.join(out, "tiles")):
                done = int(zarr.open_group(out)["tiles"][:].sum())
                if done >= 3:
                    break
            time.sleep(0.1)
        assert driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # the embedded Ray it started
        except ProcessLookupError:
            pass
    meta = store.read_meta(out)
    assert meta["complete"] is False
    before = int(zarr.open_group(out)["tiles"][:].sum())
    assert 3 <= before < 24
    open(os.path.join(out, "jacobian", "c", "0", "stray.1234.partial"), "wb").close()  # a killed writer's leftover
    result = subprocess.run(cmd + ["--resume", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tiles_skipped"] == before and summary["tiles_computed"] == 24 - before
    assert summary["tiles_total"] == 24
    assert not any(name.endswith(".partial") for _, _, files in os.walk(out) for name in files)
    jac = raijac.open(out)
    problem = raijac.load_problem(f"{spec}:problem")
    want = torch.func.vmap(torch.func.jacrev(lambda xi: problem.f(xi[None])[0]))(problem.x).detach().numpy()
    assert_close(jac.numpy(), want)
    assert np.isfinite(jac.numpy()).all()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("mode", ["rev", "loop"])
def test_planned_run_stays_inside_its_budget(store_path, mode):
    """A 16 MiB Jacobian under an 8 MB budget: many tiles, and every worker's peak RSS grows
    by at most 1.5x the budget above the idle worker holding the problem (measured in the
    real worker processes from /proc). A first run on the same workers pays the processes'
    one-off costs (Zarr's I/O threads, allocator arenas: 10.5-11.7 MB growth on fresh workers
    here against 5.3 MB in steady state), and must stay within 2x."""
    torch.manual_seed(0)
    n = 2048
    w1, w2 = torch.randn(n, n) / n**0.5, torch.randn(n, n) / n**0.5
    problem = raijac.Problem(lambda x: torch.tanh(torch.tanh(x @ w1) @ w2), torch.randn(n))
    budget = 8_000_000
    first = raijac.compute(problem, store_path + "-first", mode=mode, workers=2, memory_budget=budget)
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, memory_budget=budget)
    if first.summary["peak_rss_growth"] is not None:  # one-offs included, still far from a ratcheting heap (3.6x)
        assert first.summary["peak_rss_growth"] <= 2 * budget
    assert jac.summary["tiles_total"] >= 8
    growth = jac.summary["peak_rss_growth"]
    if growth is None:
        pytest.skip("peak RSS is read from /proc (Linux only)")
    assert growth <= 1.5 * budget, f"worker RSS grew {growth / 1e6:.1f} MB under a {budget / 1e6:.0f} MB budget"
    assert_close(jac[:64], torch.func.jacrev(problem.f)(problem.x)[:64].numpy())


@pytest.mark.usefixtures("ray_session")
def test_out_of_memory_splits_only_that_block(store_path):
    """A block that raises torch.OutOfMemoryError is computed in halves, and later blocks are
    cut to the size that worked (the GPU path's recovery, exercised here on the CPU)."""
    w = torch.randn(11, 5, generator=torch.Generator().manual_seed(0))

    def f(x):
        if x.ndim == 2 and x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.tanh(x @ w.T)

    problem = raijac.Problem(f, torch.randn(5, generator=torch.Generator().manual_seed(1)), batch_aware=True)
    jac = raijac.compute(problem, store_path, mode="rev-repeat", workers=1, block_size=11)
    assert jac.complete and jac.summary["oom_splits"] >= 2
    want = torch.func.jacrev(lambda x: torch.tanh(x @ w.T))(problem.x).numpy()
    assert_close(jac.numpy(), want)


def test_the_heap_threshold_grows_with_the_budget():
    """NOTE: [heap]: a small budget keeps a 1 MiB threshold (RSS follows live memory, as the
    budget test above measures); a large one gets glibc's 32 MiB ceiling, so the ~10 MB
    buffers a convolution's backward makes are reused instead of mapped and faulted in anew."""
    from raijac.worker import HEAP_THRESHOLD_MAX, HEAP_THRESHOLD_MIN, heap_threshold

    assert heap_threshold(8_000_000) == HEAP_THRESHOLD_MIN == 1 << 20
    assert heap_threshold(64 << 20) == 8 << 20
    assert heap_threshold(16 << 30) == HEAP_THRESHOLD_MAX == 32 << 20


SPEC_CENTRED_DATA = '''
import torch

import raijac


def problem():
    """x scaled by the sum of a million draws: a float32 sum whose rounding depends on how
    many threads split it (1 on a worker of a 2-core host, 2 on its driver)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1 << 20, generator=g)
    return raijac.Problem(torch.sin, 1e3 * data[:6] / data.sum())
'''


@pytest.mark.usefixtures("ray_session")
def test_a_spec_reducing_in_parallel_builds_the_same_x_on_the_driver_and_workers(tmp_path):
    """NOTE: [one-thread build]: the driver (all cores) and each worker (its share) build a
    spec with one thread, so a reduction in it rounds alike and the workers accept it."""
    spec = tmp_path / "centred.py"
    spec.write_text(SPEC_CENTRED_DATA)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the driver's share differs from each worker's (1 thread of 2 cpus)
    try:
        jac = raijac.compute(f"{spec}:problem", str(tmp_path / "j.zarr"), workers=2)
        assert torch.get_num_threads() == 2  # the build's one thread was given back
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        data = torch.randn(1 << 20, generator=g)
        x = 1e3 * data[:6] / data.sum()
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(jac.x, x.numpy())
    np.testing.assert_allclose(jac.numpy(), torch.diag(torch.cos(x)).numpy(), rtol=1e-6, atol=1e-7)


SPEC_ANOTHER_X_ON_WORKERS = '''
import os

import torch

import raijac


def problem():
    """Another x in the Ray workers than in the driver (which this test marks)."""
    seed = 0 if os.environ.get("RAIJAC_TEST_DRIVER") == "1" else 1
    return raijac.Problem(torch.sin, torch.randn(5, generator=torch.Generator().manual_seed(seed)))
'''


@pytest.mark.usefixtures("ray_session")
def test_a_worker_whose_build_differs_names_what_differs(tmp_path, monkeypatch):
    """A spec built to another x on the workers is refused before any block, naming x."""
    spec = tmp_path / "another_x.py"
    spec.write_text(SPEC_ANOTHER_X_ON_WORKERS)
    monkeypatch.setenv("RAIJAC_TEST_DRIVER", "1")  # the driver's process only: workers were started before
    out = tmp_path / "j.zarr"
    with pytest.raises(
        raijac.ProblemError,
        match=r"worker cpu\d differs from the driver.s in its point x; building the spec must be deterministic",
    ) as err:
        raijac.compute(f"{spec}:problem", str(out), workers=2)
    assert "\n" not in str(err.value)


def test_a_block_of_several_tiles_is_computed_tile_by_tile(ray_session, store_path, monkeypatch):
    """NOTE: [tile by tile]: a call holding four one-sample tiles runs the kernel on one sample
    at a time (a vmap over all four can cost more), and writes each tile's J where it belongs."""
    from raijac.kernels import Kernel
    from raijac.worker import Worker

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).eval()
    x = torch.randn(4, 5)
    problem = raijac.Problem.from_module(net, x, wrt="params", batched=True)
    raijac.compute(problem, store_path, workers=2)
    zarr.open_group(store_path, mode="r+")["jacobian"][...] = np.nan  # what the worker writes shows
    args = {"mode": "auto", "dtype": "float32"}
    worker = Worker(
        problem, name="w0", fingerprint=problem.fingerprint(**args), fingerprint_args=args, mode="rev", dtype="float32"
    )
    calls = []
    real = Kernel.__call__
    monkeypatch.setattr(Kernel, "__call__", lambda self, *box: calls.append(box) or real(self, *box))
    result = worker.run(store_path, 0, 4, 0, 3, tile=(1, 3))
    assert calls == [(0, 1, 0, 3), (1, 2, 0, 3), (2, 3, 0, 3), (3, 4, 0, 3)]
    assert result["bytes"] == 4 * 3 * problem.n_in * 4 and result["finite"]
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}
    jac = torch.func.vmap(torch.func.jacrev(lambda p, xb: torch.func.functional_call(net, p, (xb[None],))[0]), in_dims=(None, 0))(
        params, x
    )
    want = torch.cat([jac[n].reshape(4, 3, -1) for n in names], dim=2).numpy()
    np.testing.assert_allclose(zarr.open_group(store_path)["jacobian"][...], want, rtol=1e-5, atol=1e-6)


def _scaled_by_env(v: torch.Tensor) -> torch.Tensor:
    """sin, times (1 + THP_MEM_ALLOC_ENABLE) x (1 + MALLOC_ARENA_MAX) its process started
    with: J tells which environment the workers had."""
    thp, arenas = (float(os.environ.get(k, "0")) for k in ("THP_MEM_ALLOC_ENABLE", "MALLOC_ARENA_MAX"))
    return torch.sin(v) * (1 + thp) * (1 + arenas)


@pytest.mark.parametrize(("driver", "factor"), [((None, None), 4.0), (("0", "2"), 3.0)])
def test_workers_start_with_huge_pages_and_one_arena_unless_the_caller_said_otherwise(
    ray_session, tmp_path, monkeypatch, driver, factor
):
    """NOTE: [huge pages]: CPU workers get THP_MEM_ALLOC_ENABLE=1 and MALLOC_ARENA_MAX=1 (NOTE:
    [kept heap]); values set in the driver's environment go to them instead (its hosts
    replaced by new ones)."""
    for name, value in zip(("THP_MEM_ALLOC_ENABLE", "MALLOC_ARENA_MAX"), driver, strict=True):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    x = torch.randn(5, dtype=torch.float64)
    jac = raijac.compute(raijac.Problem(_scaled_by_env, x), str(tmp_path / "j.zarr"), workers=2, check_blocks=False)
    np.testing.assert_allclose(jac.numpy(), factor * torch.diag(torch.cos(x)).numpy(), rtol=1e-12)


KEPT_HEAP = """
import ctypes, sys
from raijac.probe import _proc_status
from raijac.worker import bound_heap

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
first, second = int(sys.argv[1]), int(sys.argv[2])
assert bound_heap(1 << 20, keep=first)
ptrs = [libc.malloc(512 << 10) for _ in range(64)]  # 32 MiB of blocks below the mmap threshold
for p in ptrs:
    ctypes.memset(p, 1, 512 << 10)  # touched: resident
pin = libc.malloc(900 << 10)  # too big for any older hole: above them, so they free a hole, not the top
for p in ptrs:
    libc.free(p)
rss = _proc_status("VmRSS")
bound_heap(1 << 20, keep=second)  # the next run's
print(rss - _proc_status("VmRSS"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
@pytest.mark.parametrize(
    ("first", "second", "kept"), [(64 << 20, 64 << 20, True), (64 << 20, 128 << 20, True), (64 << 20, 8 << 20, False)]
)
def test_the_heap_is_kept_between_blocks_up_to_the_budget(tmp_path, first, second, kept):
    """NOTE: [kept heap]: 32 MiB freed below the mmap threshold stays resident in the heap
    (no faults for the next block) where it may keep up to 64 MiB, also into a next run that
    may keep as much or more; a next run that may keep less hands it back."""
    script = tmp_path / "kept.py"
    script.write_text(KEPT_HEAP)
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(first), str(second)], capture_output=True, text=True, env=env, check=True
    )
    dropped = int(done.stdout)
    if kept:
        assert dropped < 4 << 20
    else:  # handed back: the hole's pages leave the resident set
        assert dropped >= 24 << 20
