"""End to end on a real local Ray with two workers and real Zarr stores: every problem family
in every mode it supports, against independent references; same bytes whatever the split."""

from __future__ import annotations

import hashlib
import os
import re
import time

import numpy as np
import pytest
import torch
import zarr

import raijac
from raijac import modes, store
from tests.problems import BY_NAME, CASES, assert_close

pytestmark = pytest.mark.usefixtures("ray_session")

PAIRS = [(c.name, m) for c in CASES for m in (*c.modes, "auto")]


@pytest.mark.parametrize("name,mode", PAIRS, ids=[f"{n}-{m}" for n, m in PAIRS])
def test_family_mode_matches_reference(name, mode, store_path):
    case = BY_NAME[name]
    problem = case.build()
    jac = raijac.compute(problem, store_path, mode=mode, workers=2, block_size=3)
    assert jac.complete and jac.summary["tiles_computed"] == jac.summary["tiles_total"] > 1
    assert_close(zarr.open_group(store_path)["jacobian"][...], case.reference(problem))
    if mode == "auto" and case.auto:
        assert jac.mode == case.auto, jac.meta["mode_reason"]
    meta = jac.meta
    assert meta["requested_mode"] == mode and meta["complete"] is True
    assert meta["input_shape"] == list(problem.input_shape) and meta["output_shape"] == list(problem.output_shape)


def _digest(path: str) -> str:
    return hashlib.sha256(np.ascontiguousarray(zarr.open_group(path)["jacobian"][...]).tobytes()).hexdigest()


@pytest.mark.parametrize("name", ["matmul_chain", "params_batched", "conv"])
def test_same_bytes_whatever_the_worker_count(name, tmp_path):
    """Identical bytes for 1 or 2 workers at the same block size; within tolerance across sizes."""
    problem = BY_NAME[name].build()
    digests = {
        w: _digest(raijac.compute(problem, str(tmp_path / f"w{w}.zarr"), mode="rev", workers=w, block_size=4).path)
        for w in (1, 2)
    }
    assert digests[1] == digests[2]
    small = raijac.compute(problem, str(tmp_path / "b1.zarr"), mode="rev", workers=2, block_size=1).numpy()
    big = raijac.compute(problem, str(tmp_path / "b9.zarr"), mode="rev", workers=2, block_size=9).numpy()
    assert_close(small, big)


def test_batched_tiles_span_samples_and_seeds(store_path):
    """A batched problem tiled over samples x seeds (block smaller than one sample's rows)."""
    case = BY_NAME["batched_mlp"]
    problem = case.build()
    jac = raijac.compute(problem, store_path, mode="rev", workers=2, block_size=5)
    assert jac.array.chunks[0] == 1 and jac.summary["tiles_total"] == problem.batch_size * 3
    assert_close(jac.numpy(), case.reference(problem))


def test_resume_computes_only_missing_tiles(store_path):
    case = BY_NAME["attention"]
    problem = case.build()
    first = raijac.compute(problem, store_path, mode="rev", workers=2, block_size=4)
    total = first.summary["tiles_total"]
    # Forget some tiles as if the run had died: ledger off and data gone (NaN).
    group = zarr.open_group(store_path, mode="r+")
    group["tiles"][3:7] = 0
    group["jacobian"][12:28, :] = np.nan
    store.update_meta(group, complete=False)
    with pytest.raises(raijac.StoreError, match="incomplete"):
        raijac.open(store_path)
    partial = raijac.open(store_path, allow_partial=True)
    assert not partial.complete and partial.tiles_done == total - 4
    again = raijac.compute(problem, store_path, mode="rev", workers=2, block_size=4, resume=True)
    assert again.summary["tiles_skipped"] == total - 4 and again.summary["tiles_computed"] == 4
    assert again.complete
    assert_close(again.numpy(), case.reference(problem))


def test_resume_of_a_missing_store_starts_fresh(store_path):
    jac = raijac.compute(BY_NAME["elementwise"].build(), store_path, resume=True, workers=2)
    assert jac.complete and jac.summary["tiles_skipped"] == 0


def test_resume_refuses_another_problem(store_path):
    raijac.compute(BY_NAME["elementwise"].build(), store_path, workers=2)
    before = _tree_digest(store_path)
    other = raijac.Problem(lambda x: torch.cos(x), torch.randn(37))
    with pytest.raises(raijac.StoreError, match="computed with another point x"):
        raijac.compute(other, store_path, resume=True, workers=2)
    assert _tree_digest(store_path) == before


def test_resume_refuses_a_changed_function(store_path):
    x = torch.randn(9)
    raijac.compute(raijac.Problem(lambda x: torch.sin(x), x), store_path, workers=2)
    before = _tree_digest(store_path)
    with pytest.raises(raijac.StoreError, match="f changed"):
        raijac.compute(raijac.Problem(lambda x: torch.sin(x) * 2, x), store_path, resume=True, workers=2)
    assert _tree_digest(store_path) == before


def _tree_digest(path: str) -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(path):
        for f in files:
            full = os.path.join(folder, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


class Flaky(torch.nn.Module):
    """Fails on a worker's block holding sample 6 alone (so f(x) on the whole batch, and the
    driver's triage, which also tries a random sample, still work)."""

    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail
        self.driver = os.getpid()

    def forward(self, x):
        if self.fail and x.shape[0] == 1 and float(x[0, 0]) == 6.0 and os.getpid() != self.driver:
            raise RuntimeError("synthetic failure at sample 6")
        return torch.tanh(x) * 2


def test_failing_tile_is_named_and_finished_tiles_are_kept(store_path):
    x = torch.randn(8, 3)
    x[:, 0] = torch.arange(8.0)
    with pytest.raises(raijac.WorkerError) as err:
        raijac.compute(raijac.Problem(Flaky(True), x, batched=True), store_path, mode="rev", workers=1, block_size=2)
    msg = str(err.value)
    # Tiles 12 and 13 are sample 6's two row blocks; either may be the one reported.
    assert re.search(r"tile 1[23] \(samples 6:7, rows [0-9:]+\) failed", msg), msg
    assert "synthetic failure at sample 6" in msg and "--resume" in msg
    pending = store.Ledger(zarr.open_group(store_path)).pending()
    assert {12, 13} <= set(pending) and not set(pending) & set(range(12))
    fixed = raijac.compute(
        raijac.Problem(Flaky(False), x, batched=True), store_path, mode="rev", workers=1, block_size=2, resume=True
    )
    assert fixed.summary["tiles_computed"] == len(pending) and fixed.summary["tiles_skipped"] == 16 - len(pending)
    want = torch.func.vmap(torch.func.jacrev(lambda xi: torch.tanh(xi) * 2))(x).numpy()
    assert_close(fixed.numpy(), want)


def test_a_block_finished_beside_a_failed_one_is_recorded(store_path, monkeypatch):
    """Blocks that wait returns together with a failed one are written, so they stay recorded
    whatever order wait gives them in (here: always the failed one first)."""
    import ray

    real_wait = ray.wait

    def failed_first(refs, num_returns=1, timeout=None, **kw):
        ready, rest = real_wait(refs, num_returns=len(refs), timeout=60)  # let every in-flight block end
        return ready[::-1][:num_returns] if timeout is None else ready, rest

    monkeypatch.setattr(ray, "wait", failed_first)
    x = torch.randn(8, 3)
    x[:, 0] = torch.tensor([0.0, 1, 2, 3, 4, 5, 7, 6])  # sample 7 fails; it runs beside sample 6
    with pytest.raises(raijac.WorkerError, match=r"tile 7 .*failed.* 7 finished tiles are kept"):
        raijac.compute(raijac.Problem(Flaky(True), x, batched=True), store_path, mode="rev", workers=1, block_size=3)
    assert store.Ledger(zarr.open_group(store_path)).pending() == [7]


class SlowOrFlaky(torch.nn.Module):
    """Sleeps on a block holding sample 0 alone; fails at once on one holding sample 2 alone."""

    def forward(self, x):
        if x.shape[0] == 1 and float(x[0, 0]) == 0.0:
            time.sleep(1.0)
        if x.shape[0] == 1 and float(x[0, 0]) == 2.0:
            raise RuntimeError("synthetic failure at sample 2")
        return torch.tanh(x) * 2


def test_blocks_in_flight_when_another_fails_are_waited_for_and_recorded(store_path):
    """A failure arrives while another worker is still computing its block: the run waits for
    it, records it, and only then raises, so --resume recomputes the failed tile alone."""
    x = torch.randn(4, 3)
    x[:, 0] = torch.arange(4.0)
    with pytest.raises(raijac.WorkerError, match=r"tile 2 .*failed.* 3 finished tiles are kept"):
        raijac.compute(raijac.Problem(SlowOrFlaky(), x, batched=True), store_path, mode="rev", workers=2, block_size=3)
    assert store.Ledger(zarr.open_group(store_path)).pending() == [2]


def test_auto_compressor_follows_the_data(tmp_path):
    """auto: zstd for a diagonal Jacobian (compresses well), none for a dense one."""
    diag = raijac.compute(BY_NAME["elementwise"].build(), str(tmp_path / "d.zarr"), workers=2)
    dense = raijac.compute(BY_NAME["matmul_chain"].build(), str(tmp_path / "m.zarr"), workers=2)
    assert diag.meta["compressor"] == "zstd" and "compresses" in diag.meta["compressor_reason"]
    assert dense.meta["compressor"] == "none" and dense.array.compressors == ()
    assert [type(c).__name__ for c in diag.array.compressors] == ["ZstdCodec"]
    chosen = raijac.compute(BY_NAME["conv"].build(), str(tmp_path / "b.zarr"), workers=2, compressor="blosc", compression_level=5)
    assert chosen.array.compressors[0].clevel == 5 and chosen.meta["compressor_reason"] == "requested"
    assert_close(chosen.numpy(), BY_NAME["conv"].reference(BY_NAME["conv"].build()))


def test_choose_compressor_threshold():
    rng = np.random.default_rng(0)
    assert store.choose_compressor(rng.standard_normal((64, 512)).astype(np.float32))[0] == "none"
    assert store.choose_compressor(np.eye(256, dtype=np.float32))[0] == "zstd"


def test_a_second_run_of_the_same_f_reuses_the_workers_memory_cost(tmp_path, monkeypatch):
    """NOTE: [kept costs]: the same f at a new x plans with the cost its last run's workers
    measured (no probe block); another function, or another storage dtype, is probed."""
    import raijac.executor

    torch.manual_seed(2)
    w = torch.randn(60, 300) / 60

    def f(v):
        return torch.tanh(w @ v)

    x1, x2 = torch.randn(300), torch.randn(300)
    first = raijac.compute(raijac.Problem(f, x1), str(tmp_path / "1.zarr"), workers=2)
    measures = []
    real = raijac.executor.RayExecutor.start
    monkeypatch.setattr(
        raijac.executor.RayExecutor, "start", lambda self, *a, **k: measures.append(k["measure"]) or real(self, *a, **k)
    )
    second = raijac.compute(raijac.Problem(f, x2), str(tmp_path / "2.zarr"), workers=2)
    assert measures == ["none"]
    costs = [(c["base"], c["per_seed"], c["bound"]) for c in second.meta["workers"]]
    assert costs == [(c["base"], c["per_seed"], c["bound"]) for c in first.meta["workers"]]
    assert all(per_seed > 0 for _, per_seed, _ in costs)
    np.testing.assert_allclose(second.numpy(), torch.func.jacrev(f)(x2).numpy(), rtol=1e-5, atol=1e-6)
    raijac.compute(raijac.Problem(f, x2), str(tmp_path / "3.zarr"), workers=2, dtype="float64")
    raijac.compute(raijac.Problem(lambda v: f(v) * 2, x2), str(tmp_path / "4.zarr"), workers=2)
    assert measures == ["none", "quick", "quick"]


def test_workers_trace_a_chain_only_while_the_mode_may_be_one(tmp_path, monkeypatch):
    """auto may run an unbatched f of 256 outputs as a traced chain, so the first run's workers
    trace f while the driver triages; a second run of the same f runs the mode that triage
    chose (NOTE: [triage memo]), not a chain, so its workers do not trace f again."""
    import raijac.executor

    torch.manual_seed(6)
    w = torch.randn(256, 256) / 16

    def f(v):
        return torch.softmax(w @ v, dim=0)  # no elementwise stages to peel: not a chain

    chains = []
    real = raijac.executor.RayExecutor.preload
    monkeypatch.setattr(
        raijac.executor.RayExecutor, "preload", lambda self, *a, **k: chains.append(k["chain"]) or real(self, *a, **k)
    )
    first = raijac.compute(raijac.Problem(f, torch.randn(256)), str(tmp_path / "1.zarr"), workers=2)
    x2 = torch.randn(256)
    second = raijac.compute(raijac.Problem(f, x2), str(tmp_path / "2.zarr"), workers=2)
    assert not modes.get(first.mode).chain and second.mode == first.mode
    assert chains == [True, False]
    np.testing.assert_allclose(second.numpy(), torch.func.jacrev(f)(x2).numpy(), rtol=1e-4, atol=1e-6)


def test_one_probe_block_bounds_the_memory_cost_unless_the_budget_binds(tmp_path):
    """NOTE: [quick probe]: a run whose tiles the budget does not limit keeps the upper bound
    from one probe block; under a tight budget the exact cost is measured and obeyed."""
    torch.manual_seed(1)
    w = torch.randn(200, 50_000) / 200

    def f(v):
        return torch.tanh(w @ v)

    x = torch.randn(50_000)
    expected = torch.func.jacrev(f)(x).numpy()
    loose = raijac.compute(raijac.Problem(f, x), str(tmp_path / "loose.zarr"), workers=2)
    assert all(c["bound"] for c in loose.meta["workers"])
    np.testing.assert_allclose(loose.numpy(), expected, rtol=1e-5, atol=1e-6)
    # 8 MiB holds at most 41 rows of 200 KB (their slice of J alone), fewer than the 25 the
    # load balance asks for once the per-seed copies count: the budget binds either way.
    tight = raijac.compute(raijac.Problem(f, x), str(tmp_path / "tight.zarr"), workers=2, memory_budget="8MiB")
    assert not any(c["bound"] for c in tight.meta["workers"])
    worker = tight.meta["workers"][0]
    assert tight.meta["layout"]["tile_seeds"] * worker["per_seed"] + worker["base"] <= 8 * 2**20
    np.testing.assert_allclose(tight.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("n_other", "differs", "measures"),
    [
        (11_000_000, {"blocks": (1, 1)}, False),  # 440 MB tiles: one per call costs nothing
        (1_000, {"blocks": (1, 1)}, True),  # 40 KB tiles: merging them saves calls
        (11_000_000, {"tile_seeds": 5}, True),  # smaller tiles change the store's layout
    ],
)
def test_the_exact_cost_is_measured_only_where_the_bound_changes_a_plan_worth_changing(n_other, differs, measures):
    """NOTE: [merge worth]: a full measurement runs a probe block on every worker, so fewer
    tiles per call at the upper bound is worth it only where tiles are small."""
    from dataclasses import replace

    from raijac.api import _budget_binds
    from raijac.planner import Plan, WorkerCost

    bound = WorkerCost("cpu0", "cpu", 2**30, 0, 1, bound=True)
    free = Plan("rev", "auto", "", 8, 10, n_other, "rows", "float32", 4, (1, 1, n_other), 1, 10, (bound,), (2, 2))
    assert _budget_binds(replace(free, **differs), free) is measures
    assert _budget_binds(free, free) is False


def test_overwrite_leaves_no_old_store_behind(tmp_path):
    """NOTE: [removed aside]: the overwritten store is deleted while the new one is computed,
    and gone when compute returns; the new J is right."""
    out = tmp_path / "j.zarr"
    x = torch.randn(50)
    raijac.compute(raijac.Problem(torch.sin, x), str(out), workers=2)
    jac = raijac.compute(raijac.Problem(torch.cos, x), str(out), workers=2, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["j.zarr"]
    np.testing.assert_allclose(jac.numpy(), torch.diag(-torch.sin(x)).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("x0, finite", [(0.0, False), (1.0, True)])
def test_summary_says_whether_every_entry_is_finite(store_path, x0, finite):
    """sqrt's derivative at 0 is inf: the run still stores it, and its summary says so."""
    x = torch.tensor([4.0, x0, 9.0])
    jac = raijac.compute(raijac.Problem(torch.sqrt, x), store_path, workers=2, check_blocks=False)
    want = torch.func.jacrev(torch.sqrt)(x).numpy()
    np.testing.assert_array_equal(np.asarray(jac[...]), want)
    assert jac.summary["all_finite"] is finite
