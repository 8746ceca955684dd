"""Sparse problems end to end on real Ray and real Zarr: every family in every mode against
torch.func.jacrev, the stored layout, reading, resume, wrong patterns, the CLI, and the
N = 10^6 reaction-diffusion residual against its analytic Jacobian."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import zarr

import raijac
from raijac.errors import ModeError, ProblemError, StoreError
from raijac.verify import verify

pytestmark = pytest.mark.usefixtures("ray_session")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from sparse_pde import laplacian_pattern, reaction_diffusion_jacobian  # noqa: E402 (driver-side helpers only)


def reaction_diffusion_residual(u):  # as in examples/sparse_pde.py, importable by workers from here
    p = torch.nn.functional.pad(u, (1, 1, 1, 1))
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u - u**3


def _band(n: int, offsets: list[int]) -> sp.csr_array:
    return sp.diags_array([np.ones(n - abs(k)) for k in offsets], offsets=offsets, shape=(n, n)).tocsr()


def stencil(u):
    return torch.cat([u[:1], u[:-2] - 2 * u[1:-1] + u[2:] + torch.sin(u[1:-1]), u[-1:] ** 2])


def periodic(u):
    return torch.roll(u, 1) + torch.roll(u, -1) - 2 * u + torch.tanh(u)


def pentadiagonal(u):
    r = torch.zeros_like(u)
    r[2:-2] = u[:-4] - 4 * u[1:-3] + 6 * u[2:-2] - 4 * u[3:-1] + u[4:]
    r[:2], r[-2:] = u[:2] ** 3, torch.exp(u[-2:])
    return r * (1 + u**2)


BLOCKS = torch.randn(8, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def block_diagonal(u):  # 8 independent 3 x 3 dense blocks (a multi-physics cell, say)
    return torch.tanh(torch.einsum("bij,bj->bi", BLOCKS.to(u.dtype), u.reshape(8, 3))).reshape(-1)


def arrow(u):  # a dense first row (a global constraint) plus a diagonal
    return torch.cat([u.sum(0, keepdim=True) ** 2, torch.exp(u[1:])])


def two_outputs(u):  # output (n, 2): value and a one-sided difference per point
    return torch.stack([u**2, torch.cat([u[1:] - u[:-1], u[-1:]])], dim=1)


def laplace_small(u):
    return reaction_diffusion_residual(u)


@dataclass
class SparseCase:
    name: str
    f: Callable
    x: Callable[[], torch.Tensor]
    pattern: Callable[[], object]
    modes: tuple[str, ...] = ("auto", "fwd", "rev", "loop")


def _arrow_pattern(n: int):
    rows = np.r_[np.zeros(n, int), np.arange(1, n)]
    cols = np.r_[np.arange(n), np.arange(1, n)]
    return rows, cols


def _two_outputs_pattern(n: int):
    rows, cols = [], []
    for i in range(n):
        rows += [2 * i]
        cols += [i]
        if i < n - 1:
            rows += [2 * i + 1, 2 * i + 1]
            cols += [i, i + 1]
        else:
            rows += [2 * i + 1]
            cols += [i]
    return np.array(rows), np.array(cols)


CASES = [
    SparseCase("stencil", stencil, lambda: torch.randn(40, dtype=torch.float64), lambda: _band(40, [-1, 0, 1])),
    SparseCase(
        "periodic",
        periodic,
        lambda: torch.randn(30, dtype=torch.float64),
        lambda: (_band(30, [-1, 0, 1]) + sp.csr_array(([1.0, 1.0], ([0, 29], [29, 0])), shape=(30, 30))).tocsr(),
    ),
    SparseCase(
        "pentadiagonal", pentadiagonal, lambda: torch.randn(35, dtype=torch.float64), lambda: _band(35, [-2, -1, 0, 1, 2])
    ),
    SparseCase(
        "block_diagonal",
        block_diagonal,
        lambda: torch.randn(24, dtype=torch.float64),
        lambda: sp.block_diag([np.ones((3, 3))] * 8, format="csr"),
    ),
    SparseCase("arrow", arrow, lambda: torch.randn(20, dtype=torch.float64), lambda: _arrow_pattern(20)),
    SparseCase("two_outputs", two_outputs, lambda: torch.randn(25, dtype=torch.float64), lambda: _two_outputs_pattern(25)),
    SparseCase("laplace_2d", laplace_small, lambda: torch.rand(7, 9, dtype=torch.float64), lambda: None),
    SparseCase("stencil_float32", stencil, lambda: torch.randn(33), lambda: _band(33, [-1, 0, 1])),
]
BY_NAME = {c.name: c for c in CASES}


def _laplace_pattern_7x9():
    n_rows, n_cols = 7, 9
    idx = np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    rows, cols = [], []
    for i in range(n_rows):
        for j in range(n_cols):
            for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= i + di < n_rows and 0 <= j + dj < n_cols:
                    rows.append(idx[i, j])
                    cols.append(idx[i + di, j + dj])
    return np.array(rows), np.array(cols)


BY_NAME["laplace_2d"].pattern = _laplace_pattern_7x9


def _reference(f, x) -> np.ndarray:
    j = torch.func.jacrev(f)(x)
    y = f(x)
    return j.reshape(y.numel(), x.numel()).numpy()


def _tol(x):
    return {"rtol": 1e-5, "atol": 1e-5} if x.dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}


PAIRS = [(c.name, m) for c in CASES for m in c.modes]


@pytest.mark.parametrize("name,mode", PAIRS, ids=[f"{n}-{m}" for n, m in PAIRS])
def test_sparse_family_matches_jacrev(name, mode, store_path):
    case = BY_NAME[name]
    x = case.x()
    problem = raijac.Problem(case.f, x, sparsity=case.pattern())
    jac = raijac.compute(problem, store_path, mode=mode, workers=2)
    ref = _reference(case.f, x)
    got = jac.to_scipy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.toarray(), ref, **_tol(x))
    assert jac.sparse and jac.complete and jac.nnz == raijac.sparsity.resolve_pattern(problem).nnz
    s = jac.summary["sparse"]
    if (name, mode) != ("arrow", "fwd"):  # the arrow's dense row needs every column colour apart
        assert s["colours"] < min(ref.shape)  # fewer JVPs/VJPs than a dense run
    np.testing.assert_allclose(jac[...], ref, **_tol(x))  # densified reads agree too
    assert "jacobian" not in zarr.open_group(store_path)  # no dense copy unless asked


def test_auto_chooses_the_axis_with_fewer_colours(store_path):
    x = torch.randn(20, dtype=torch.float64)
    jac = raijac.compute(raijac.Problem(arrow, x, sparsity=_arrow_pattern(20)), store_path)
    assert jac.mode == "rev" and jac.summary["sparse"]["colours"] == 2, jac.meta["mode_reason"]
    assert "2 colours of rows" in jac.meta["mode_reason"]


def test_stored_layout_is_plain_coo_in_row_major_order(store_path):
    x = torch.randn(40, dtype=torch.float64)
    jac = raijac.compute(raijac.Problem(stencil, x, sparsity=_band(40, [-1, 0, 1])), store_path, dense=True)
    g = zarr.open_group(store_path)
    rows, cols, values = g["rows"][...], g["cols"][...], g["values"][...]
    ref = _reference(stencil, x)
    coo = sp.coo_array((values, (rows, cols)), shape=ref.shape)  # what any zarr reader can do
    np.testing.assert_allclose(coo.toarray(), ref, rtol=1e-12, atol=1e-12)
    assert np.all(np.diff(rows * 40 + cols) > 0)
    assert np.array_equal(g["row_ptr"][...], np.searchsorted(rows, np.arange(41)))
    np.testing.assert_allclose(g["jacobian"][...], ref, rtol=1e-12, atol=1e-12)
    meta = jac.meta["sparse"]
    assert meta["nnz"] == 118 and meta["colours"] == 3 and meta["dense"] and meta["order"] == "row-major"
    assert g["compressed"].shape == (40, 3)


def test_slicing_densifies_only_the_block_and_matches(store_path):
    x = torch.rand(7, 9, dtype=torch.float64)
    jac = raijac.compute(raijac.Problem(laplace_small, x, sparsity=_laplace_pattern_7x9()), store_path)
    ref = _reference(laplace_small, x)
    for key in [np.s_[3:20, 5:40], np.s_[10, :], np.s_[:, 4], np.s_[[1, 5, 5, 2], 3:9], np.s_[-1, -1], np.s_[::3, 1::4]]:
        np.testing.assert_array_equal(jac[key], ref[key])
    np.testing.assert_array_equal(jac.read(rows=[0, 62], cols=slice(0, 10)), ref[[0, 62], 0:10])
    u = np.random.default_rng(0).standard_normal(63)
    np.testing.assert_allclose(jac.matvec(u), ref @ u, rtol=1e-12)
    np.testing.assert_allclose(jac.rmatvec(u), ref.T @ u, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(jac.to_dask()[2:30, 4:50]), ref[2:30, 4:50])
    assert jac.unflatten()[3, 4, 3, 4] == ref[3 * 9 + 4, 3 * 9 + 4]


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev-repeat", "fwd-repeat"])
def test_batched_sparse_problem_matches_per_sample_jacrev(mode, store_path):
    xb = torch.randn(5, 30, dtype=torch.float64)

    def g(u):
        return torch.cat([u[:, :1], u[:, 2:] - 2 * u[:, 1:-1] + u[:, :-2] + u[:, 1:-1] ** 3, u[:, -1:]], dim=1)

    jac = raijac.compute(raijac.Problem(g, xb, batched=True, sparsity=_band(30, [-1, 0, 1])), store_path, mode=mode, dense=True)
    ref = torch.func.vmap(torch.func.jacrev(lambda z: g(z[None])[0]))(xb).numpy()
    assert jac.shape == (5, 30, 30)
    for b in range(5):
        np.testing.assert_allclose(jac.to_scipy(sample=b).toarray(), ref[b], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jac[...], ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(zarr.open_group(store_path)["jacobian"][...], ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(raijac.reader.ReadError, match="pass sample=b"):
        jac.to_scipy()
    assert verify(store_path, problem=raijac.Problem(g, xb, batched=True, sparsity=_band(30, [-1, 0, 1]))).ok


def test_sparse_hessian_matches_the_dense_one(store_path):
    x = torch.randn(30, dtype=torch.float64)

    def energy(u):  # a 1-D chain: the Hessian is tridiagonal
        return ((u[1:] - u[:-1]) ** 2).sum() + (u**4).sum()

    jac = raijac.compute(raijac.Problem.hessian(energy, x, sparsity=_band(30, [-1, 0, 1])), store_path)
    np.testing.assert_allclose(jac.to_scipy().toarray(), torch.func.hessian(energy)(x).numpy(), rtol=1e-12, atol=1e-12)


def test_a_pattern_missing_nonzeros_is_refused_when_the_compressed_product_shows_it(store_path):
    x = torch.randn(40, dtype=torch.float64)
    # The diagonal plus J[0, 39]: two colours (j mod 2), so the missing off-diagonals of the
    # stencil land in the other colour's slot of J S, which the pattern leaves empty.
    wrong = (np.r_[np.arange(40), 0], np.r_[np.arange(40), 39])
    with pytest.raises(ProblemError, match=r"pattern misses non-zeros of J: \d+ entries") as info:
        raijac.compute(raijac.Problem(stencil, x, sparsity=wrong), store_path)
    assert "first: output row 0, columns of colour 1" in str(info.value) or "output row 1" in str(info.value)
    assert "marked incomplete" in str(info.value)
    stored = raijac.open(store_path, allow_partial=True)
    assert not stored.complete and stored.tiles_done == stored.n_tiles  # the tiles are kept


def test_a_wrong_pattern_the_compressed_product_cannot_show_is_refused(store_path):
    """NOTE: [sparse probe]: a diagonal pattern for a stencil: every missing entry hides in the
    diagonal's slot (one colour), so decompress's stray check sees nothing. The run's closing
    probe refuses the store, marked incomplete, naming the pattern; verify, given such a store
    (an older raijac's, marked complete), says the same; the right pattern passes both."""
    x = torch.randn(40, dtype=torch.float64)
    diagonal = sp.identity(40, format="csr")
    with pytest.raises(ProblemError, match=r"fails a random probe.*the sparsity pattern misses non-zeros.*marked incomplete"):
        raijac.compute(raijac.Problem(stencil, x, sparsity=diagonal), store_path)
    g = zarr.open_group(store_path, mode="r+")
    assert g.attrs["raijac"]["complete"] is False
    g.attrs["raijac"] = {**dict(g.attrs["raijac"]), "complete": True}
    report = verify(store_path, problem=raijac.Problem(stencil, x, sparsity=diagonal))
    assert not report.ok
    assert "the sparsity pattern misses non-zeros" in report.verdict()
    good = raijac.Problem(stencil, x, sparsity=_band(40, [-1, 0, 1]))
    assert raijac.compute(good, store_path, overwrite=True).complete
    assert verify(store_path, problem=good).ok


def test_resume_recomputes_only_missing_tiles_and_refuses_another_pattern(store_path):
    x = torch.randn(64, dtype=torch.float64)
    problem = raijac.Problem(stencil, x, sparsity=_band(64, [-1, 0, 1]))
    raijac.compute(problem, store_path, block_size=1)
    g = zarr.open_group(store_path, mode="r+")
    assert g["tiles"].shape == (3,)
    g["tiles"][1] = 0  # as if the run died before tile 1 and before decompressing
    g["compressed"][:, 1] = np.nan
    g["values"][...] = np.nan
    meta = dict(g.attrs["raijac"])
    g.attrs["raijac"] = {**meta, "complete": False}
    jac = raijac.compute(problem, store_path, resume=True)
    assert jac.summary["tiles_computed"] == 1 and jac.summary["tiles_skipped"] == 2
    np.testing.assert_allclose(jac.to_scipy().toarray(), _reference(stencil, x), rtol=1e-12, atol=1e-12)
    other = raijac.Problem(stencil, x, sparsity=_band(64, [-2, -1, 0, 1, 2]))
    with pytest.raises(StoreError, match="sparsity pattern differs"):
        raijac.compute(other, store_path, resume=True)


def test_bad_sparse_requests_are_refused(store_path):
    x = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ProblemError, match="not understood"):
        raijac.Problem(stencil, x, sparsity="auto")
    with pytest.raises(ProblemError, match="has shape .* but this Jacobian is 10 x 10"):
        raijac.compute(raijac.Problem(stencil, x, sparsity=_band(9, [0])), store_path)
    with pytest.raises(ModeError, match="no compressed"):
        raijac.compute(raijac.Problem(stencil, x, sparsity=_band(10, [-1, 0, 1])), store_path, mode="chain")
    with pytest.raises(ProblemError, match="applies to sparse problems only"):
        raijac.compute(raijac.Problem(stencil, x), store_path, dense=True)
    assert not os.path.exists(store_path)  # nothing was created by any refused request


def test_reaction_diffusion_with_a_million_unknowns_equals_the_analytic_jacobian(store_path):
    n = 1000
    u = torch.rand(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    problem = raijac.Problem(reaction_diffusion_residual, u, sparsity=laplacian_pattern(n))
    jac = raijac.compute(problem, store_path, workers=2)
    assert jac.shape == (n * n, n * n) and jac.nnz == 4_996_000
    diff = abs(jac.to_scipy() - reaction_diffusion_jacobian(u))
    assert diff.max() == 0.0
    assert jac.summary["sparse"]["colours"] <= 7


def _cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "raijac", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_sparse_compute_plan_inspect_verify(tmp_path):
    spec = os.path.join(ROOT, "examples", "sparse_pde.py") + ":bratu"
    out = str(tmp_path / "bratu.zarr")
    planned = _cli("plan", spec, cwd=str(tmp_path))
    assert planned.returncode == 0, planned.stderr
    assert "3 colours of columns" in planned.stdout and "3 JVPs instead of 8192" in planned.stdout
    run = _cli("compute", spec, "--out", out, "--json", "--verify", "--workers", "2", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["sparse"]["colours"] == 3 and summary["sparse"]["nnz"] == 3 * 8192 - 2 and summary["verify"]["ok"]
    shown = _cli("inspect", out, cwd=str(tmp_path))
    assert shown.returncode == 0 and "24574 non-zeros per sample; 3 colours of columns" in shown.stdout
    bad = _cli(
        "compute",
        os.path.join(ROOT, "examples", "mlp.py") + ":problem",
        "--out",
        str(tmp_path / "x.zarr"),
        "--dense",
        cwd=str(tmp_path),
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "sparse problems only" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_plot_of_a_sparse_store_reads_the_nonzeros_not_a_dense_matrix(store_path, tmp_path):
    from raijac.plot import downsample, plot_jacobian

    x = torch.randn(600, dtype=torch.float64)
    jac = raijac.compute(raijac.Problem(stencil, x, sparsity=_band(600, [-1, 0, 1])), store_path)
    ref = np.abs(_reference(stencil, x))
    d = downsample(jac, max_pixels=100)  # 6 x 6 blocks per pixel
    expected = ref.reshape(100, 6, 100, 6).max(axis=(1, 3))
    np.testing.assert_allclose(d.absmax, expected, rtol=1e-12)
    np.testing.assert_allclose(d.nonzero, (ref != 0).reshape(100, 6, 100, 6).mean(axis=(1, 3)))
    plot_jacobian(jac, str(tmp_path / "j.png"))
    assert os.path.getsize(tmp_path / "j.png") > 1000


@pytest.mark.parametrize("name", ["stencil", "periodic", "pentadiagonal", "two_outputs", "laplace_2d", "arrow"])
def test_detected_pattern_gives_the_same_jacobian(name, store_path):
    case = BY_NAME[name]
    x = case.x()
    problem = raijac.Problem(case.f, x, sparsity="detect")
    jac = raijac.compute(problem, store_path)
    ref = _reference(case.f, x)
    np.testing.assert_allclose(jac.to_scipy().toarray(), ref, **_tol(x))
    assert jac.nnz == int((ref != 0).sum())  # the traced pattern is exact for these


def test_batched_detect_traces_one_sample(store_path):
    xb = torch.randn(3, 20, dtype=torch.float64)

    def g(u):
        return torch.roll(u, 1, dims=1) * u + u**2

    jac = raijac.compute(raijac.Problem(g, xb, batched=True, sparsity="detect"), store_path)
    ref = torch.func.vmap(torch.func.jacrev(lambda z: g(z[None])[0]))(xb).numpy()
    np.testing.assert_allclose(jac[...], ref, rtol=1e-12, atol=1e-12)
    assert jac.nnz == 40


def test_detect_refuses_an_unsupported_op_before_any_work(store_path):
    w = torch.randn(1, 1, 3, dtype=torch.float64)

    def smooth(u):
        return torch.nn.functional.conv1d(u[None, None], w, padding=1)[0, 0]

    with pytest.raises(ProblemError, match=r"cannot trace aten\.convolution.*pass the pattern"):
        raijac.compute(raijac.Problem(smooth, torch.randn(30, dtype=torch.float64), sparsity="detect"), store_path)
    assert not os.path.exists(store_path)


def test_cli_detect_example(tmp_path):
    spec = os.path.join(ROOT, "examples", "sparse_pde.py") + ":reaction_diffusion_detect"
    out = str(tmp_path / "rd.zarr")
    run = _cli("compute", spec, "--out", out, "--json", "--workers", "2", cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    jac = raijac.open(out)
    u = torch.from_numpy(jac.x)
    assert abs(jac.to_scipy() - reaction_diffusion_jacobian(u)).max() == 0.0


def test_resume_of_a_sparse_store_cut_off_while_being_created_is_refused(store_path):
    x = torch.randn(20, dtype=torch.float64)
    problem = raijac.Problem(stencil, x, sparsity=_band(20, [-1, 0, 1]))
    raijac.compute(problem, store_path)
    g = zarr.open_group(store_path, mode="r+")
    meta = dict(g.attrs["raijac"])
    del meta["sparse"]  # as if the driver died between creating the group and its sparse arrays
    g.attrs["raijac"] = {**meta, "complete": False}
    before = g["values"][...].copy()
    with pytest.raises(StoreError, match="interrupted while it was being created"):
        raijac.compute(problem, store_path, resume=True)
    np.testing.assert_array_equal(zarr.open_group(store_path)["values"][...], before)


def test_a_float16_sparse_store_reads_into_scipy_as_float32(store_path):
    """scipy's sparse arrays do not compute in float16 (`toarray` raised "Output dtype not
    compatible with inputs"): to_scipy gives float32, equal to the stored values."""
    x = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    jac = raijac.compute(raijac.Problem(stencil, x, sparsity=_band(30, [-1, 0, 1])), store_path, dtype="float16")
    got = jac.to_scipy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got.toarray(), _reference(stencil, x), rtol=2e-3, atol=2e-3)
