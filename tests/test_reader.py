"""Reading stores: raijac.open (block reads, lazy unflattened views, streamed products), and plain zarr,
dask and xarray without raijac; partial, damaged and out-of-range reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import raijac
from raijac.reader import ReadError
from tests.problems import BY_NAME, assert_close
from tests.test_cli import assert_one_line_error, invoke

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def batched_store(tmp_path_factory, ray_session):
    case = BY_NAME["params_batched"]
    problem = case.build()
    path = str(tmp_path_factory.mktemp("r") / "ntk.zarr")
    computed = raijac.compute(problem, path, workers=2)
    _same_as_read_back(computed, path)
    return path, problem, case.reference(problem)


def _same_as_read_back(computed: raijac.Jacobian, path: str) -> None:
    """What compute returns (opened from what its driver wrote: Jacobian.written) is the
    store as `raijac.open` reads it back."""
    again = raijac.open(path)
    assert computed.meta == again.meta and computed.meta["complete"] is True
    assert (computed.tiles_done, computed.n_tiles) == (again.tiles_done, again.n_tiles) and computed.complete
    assert computed.group.read_only and computed.shape == again.shape
    np.testing.assert_array_equal(computed.numpy(), again.numpy())


def test_a_resumed_run_returns_its_store_as_read_back(tmp_path):
    """A resumed run (one tile left, its record removed) returns the finished store as raijac.open reads it."""
    path = str(tmp_path / "p.zarr")
    problem = BY_NAME["params_batched"].build()
    raijac.compute(problem, path, workers=2, block_size=1)
    group = zarr.open_group(path, mode="r+")
    tiles = group["tiles"][...]
    tiles[1] = 0
    group["tiles"][...] = tiles
    meta = dict(group.attrs["raijac"])
    group.attrs["raijac"] = {**meta, "complete": False}
    resumed = raijac.compute(problem, path, workers=2, resume=True)
    assert resumed.summary["tiles_computed"] == 1
    _same_as_read_back(resumed, path)


def test_open_gives_metadata_and_views(batched_store):
    path, problem, want = batched_store
    jac = raijac.open(path)
    assert jac.complete and jac.batched and jac.meta["wrt"] == "params"
    assert jac.shape == problem.jacobian_shape and jac.output_shape == problem.output_shape
    assert_close(jac.numpy(), want)
    assert_close(jac[2, :, 5:9], want[2, :, 5:9])
    assert torch.equal(jac.torch(), torch.from_numpy(jac.numpy()))
    np.testing.assert_array_equal(jac.x, problem.x.numpy())
    np.testing.assert_allclose(jac.y, problem.y.numpy())
    by_name = jac.params
    net = problem.module
    for name, p in net.named_parameters():
        np.testing.assert_array_equal(by_name[name], p.detach().numpy())
    assert "complete" in repr(jac)


def test_unflatten_restores_original_shapes(tmp_path, ray_session):
    case = BY_NAME["multidim"]
    problem = case.build()
    jac = raijac.compute(problem, str(tmp_path / "m.zarr"), workers=2)
    full = jac.unflatten()
    assert full.shape == (2, 6, 3, 4, 5)
    want = torch.func.jacrev(problem.f)(problem.x).numpy()
    assert_close(full, want)


def test_plain_zarr_dask_and_xarray_read_it(batched_store):
    path, _, want = batched_store
    group = zarr.open_group(path, mode="r")
    assert group["jacobian"].metadata.dimension_names == ("batch", "output", "input")
    assert_close(group["jacobian"][...], want)

    import dask.array as da

    lazy = da.from_zarr(path, component="jacobian")
    assert_close(lazy.compute(), want)
    ntk = da.einsum("bmn,cln->bmcl", lazy, lazy).compute()  # empirical NTK, lazily
    assert_close(ntk, np.einsum("bmn,cln->bmcl", want, want).astype(ntk.dtype))

    import xarray as xr

    ds = xr.open_zarr(path, consolidated=False)
    assert ds["jacobian"].dims == ("batch", "output", "input")
    assert_close(ds["jacobian"].values, want)


def test_open_refuses_what_is_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(raijac.StoreError, match="is not a raijac store"):
        raijac.open(str(tmp_path / "plain"))
    with pytest.raises(raijac.StoreError, match="is not a raijac store"):
        raijac.open(str(tmp_path / "missing"))


# ---------------------------------------------------------------------- block reads
def test_read_blocks_as_numpy_and_torch(batched_store):
    path, problem, want = batched_store
    jac = raijac.open(path)
    assert_close(jac.read(batch=2, rows=slice(1, 3), cols=slice(5, 40)), want[2, 1:3, 5:40])
    assert_close(jac.read(rows=1), want[:, 1])
    assert_close(jac.read(cols=[7, 0, 3], batch=slice(-2, None)), want[-2:][:, :, [7, 0, 3]])
    assert_close(jac.read(batch=slice(0, 5, 2), rows=-1), want[0:5:2, -1])
    block = jac.read(batch=slice(0, 2), as_="torch")
    assert isinstance(block, torch.Tensor) and block.shape == (2, *want.shape[1:])
    assert_close(block.numpy(), want[:2])
    assert jac.read(rows=slice(2, 2)).shape == (want.shape[0], 0, want.shape[2])


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"batch": 5}, ["index 5", "batch of size 5"]),
        ({"rows": slice(0, 9)}, ["slice 0:9", "rows of size 4"]),
        ({"cols": [0, 103]}, ["index 103", "cols of size 103"]),
        ({"rows": -5}, ["index -5", "rows of size 4"]),
    ],
)
def test_read_out_of_range_is_one_sentence(batched_store, kwargs, needles):
    jac = raijac.open(batched_store[0])
    with pytest.raises(ReadError) as info:
        jac.read(**kwargs)
    assert isinstance(info.value, IndexError) and isinstance(info.value, raijac.RaijacError)
    for needle in needles:
        assert needle in str(info.value)


@pytest.fixture(scope="module")
def multidim_store(tmp_path_factory, ray_session):
    """(2, 6) outputs of a (3, 4, 5) input, in column chunks (fwd) of 7: chunks cut input rows unevenly."""
    problem = BY_NAME["multidim"].build()
    path = str(tmp_path_factory.mktemp("m") / "m.zarr")
    raijac.compute(problem, path, workers=2, mode="fwd", block_size=7)
    return path, problem, torch.func.jacrev(problem.f)(problem.x).numpy()


class SpyArray:
    """A zarr array that records how many entries each read selects."""

    def __init__(self, array):
        self.array, self.selected = array, []

    def __getattr__(self, name):
        return getattr(self.array, name)

    def __getitem__(self, key):
        out = self.array[key]
        self.selected.append(out.size)
        return out

    @property
    def oindex(self):
        spy = self

        class _O:
            def __getitem__(self, key):
                out = spy.array.oindex[key]
                spy.selected.append(out.size)
                return out

        return _O()


def test_unflatten_indexes_lazily(multidim_store):
    path, _, want = multidim_store  # want: (2, 6, 3, 4, 5)
    jac = raijac.open(path)
    view = jac.unflatten()
    assert view.shape == want.shape and view.ndim == 5 and len(view) == 2
    jac.array = spy = SpyArray(jac.array)
    cases = [
        (1, 2),
        (1, 2, 0, 3, 4),
        (0, slice(1, 4), 2),
        (Ellipsis, 4),
        (slice(None), [5, 0], 1, slice(0, 4, 2), Ellipsis),
        (-1, -1, -1, -1, -1),
        (slice(None, None, -1), 0),
    ]
    for key in cases:
        spy.selected.clear()
        got = view[key]
        assert got.shape == want[key].shape, key
        assert_close(np.asarray(got), want[key])
        assert sum(spy.selected) == want[key].size, key  # read exactly the selected entries' rows x columns
    assert_close(np.asarray(view), want)
    assert "input dim 2" in repr(view)


@pytest.mark.parametrize(
    ("key", "needles"),
    [
        ((2,), ["index 2", "output dim 0 of size 2"]),
        ((0, 0, 3), ["index 3", "input dim 0 of size 3"]),
        ((0, slice(0, 7)), ["slice 0:7", "output dim 1 of size 6"]),
        ((0, 0, 0, 0, 0, 0), ["too many indices", "(2, 6, 3, 4, 5)"]),
        ((0, 0, 0, [4]), ["index 4", "input dim 1 of size 4"]),
        ((True,), ["boolean"]),
    ],
)
def test_unflatten_out_of_range(multidim_store, key, needles):
    view = raijac.open(multidim_store[0]).unflatten()
    with pytest.raises(ReadError) as info:
        view[key]
    for needle in needles:
        assert needle in str(info.value)


def test_to_dask_is_lazy_and_chunked_like_the_store(multidim_store):
    path, _, want = multidim_store
    jac = raijac.open(path)
    lazy = jac.to_dask()
    assert lazy.shape == jac.shape and lazy.chunksize == tuple(jac.array.chunks)
    assert lazy.npartitions > 1
    assert_close(lazy.compute().reshape(want.shape), want)


def test_blocks_cover_the_jacobian_once_in_whole_chunks(multidim_store, batched_store):
    for path in (multidim_store[0], batched_store[0]):
        jac = raijac.open(path)
        for max_bytes in (1, 200, None):
            seen = np.zeros(jac.shape, np.int64)
            for region, block in jac.blocks(max_bytes=max_bytes):
                assert block.shape == seen[region].shape
                np.testing.assert_array_equal(block, jac.array[region])
                for sl, chunk, n in zip(region, jac.array.chunks, jac.shape, strict=True):
                    assert sl.start % chunk == 0 and (sl.stop % chunk == 0 or sl.stop == n)
                seen[region] += 1
            assert (seen == 1).all()


def test_matvec_and_rmatvec_against_numpy(multidim_store, batched_store, tmp_path, ray_session):
    rng = np.random.default_rng(0)
    # plain: J (M, N)
    jac = raijac.open(multidim_store[0])
    full = jac.numpy().astype(np.float64)
    m, n = full.shape
    v, u = rng.standard_normal(n), rng.standard_normal((m, 3))
    np.testing.assert_allclose(jac.matvec(v), full @ v, rtol=1e-12)
    np.testing.assert_allclose(jac.rmatvec(u), full.T @ u, rtol=1e-12)
    # batched parameters: shared v (P,), per-sample u summed over samples
    jac = raijac.open(batched_store[0])
    full = jac.numpy().astype(np.float64)
    b, m, p = full.shape
    v, u = rng.standard_normal((p, 2)), rng.standard_normal((b, m))
    np.testing.assert_allclose(jac.matvec(v), np.einsum("bmp,pk->bmk", full, v), rtol=1e-12)
    np.testing.assert_allclose(jac.rmatvec(u), np.einsum("bmp,bm->p", full, u), rtol=1e-12)
    with pytest.raises(ReadError, match=r"matvec needs v of shape \(103,\)"):
        jac.matvec(np.ones((b, p)))
    # batched inputs: one v per sample
    problem = BY_NAME["batched_mlp"].build()
    jac = raijac.compute(problem, str(tmp_path / "b.zarr"), workers=2, mode="fwd", block_size=4)
    full = jac.numpy().astype(np.float64)
    b, m, n = full.shape
    v, u = rng.standard_normal((b, n)), rng.standard_normal((b, m, 2))
    np.testing.assert_allclose(jac.matvec(v), np.einsum("bmn,bn->bm", full, v), rtol=1e-12)
    np.testing.assert_allclose(jac.rmatvec(u), np.einsum("bmn,bmk->bnk", full, u), rtol=1e-12)
    with pytest.raises(ReadError, match="rmatvec needs u"):
        jac.rmatvec(np.ones(m))


# ---------------------------------------------------------------------- partial and damaged stores
def test_partial_store_opens_only_when_allowed_and_reads_nan(multidim_store, tmp_path):
    """Tile 0's chunk files deleted and unrecorded, as after a run killed mid-way."""
    path = str(tmp_path / "partial.zarr")
    shutil.copytree(multidim_store[0], path)
    group = zarr.open_group(path, mode="r+")
    group["tiles"][0] = 0
    cols = group.attrs["raijac"]["layout"]["tile_seeds"]
    removed = [p for p in Path(path, "jacobian", "c").rglob("*") if p.is_file() and p.parts[-1] == "0"]
    assert removed
    for p in removed:
        p.unlink()
    with pytest.raises(raijac.StoreError, match=r"incomplete .*allow_partial=True"):
        raijac.open(path)
    jac = raijac.open(path, allow_partial=True)
    assert not jac.complete and "partial" in repr(jac)
    full = jac.numpy()
    assert np.isnan(full[:, :cols]).all()
    assert_close(full[:, cols:], multidim_store[2].reshape(full.shape)[:, cols:])
    assert np.isnan(jac.unflatten()[0, 0, 0, 0, 0])


def test_damaged_stores_are_one_sentence(multidim_store, tmp_path):
    newer = str(tmp_path / "newer.zarr")
    shutil.copytree(multidim_store[0], newer)
    group = zarr.open_group(newer, mode="r+")
    group.attrs["raijac"] = {**group.attrs["raijac"], "version": 99}
    with pytest.raises(raijac.StoreError, match="store format 99, newer than this raijac reads"):
        raijac.open(newer)
    no_jacobian = str(tmp_path / "nojac.zarr")
    shutil.copytree(multidim_store[0], no_jacobian)
    shutil.rmtree(Path(no_jacobian, "jacobian"))
    with pytest.raises(raijac.StoreError, match="no 'jacobian' array"):
        raijac.open(no_jacobian)
    for command in ("inspect", "verify"):
        assert_one_line_error(invoke(command, newer), "newer than this raijac reads", "upgrade raijac")
        assert_one_line_error(invoke(command, no_jacobian), "no 'jacobian' array")
        assert_one_line_error(invoke(command, tmp_path / "missing.zarr"), "not a raijac store")


# ---------------------------------------------------------------------- info(): what inspect shows
def _partial_copy(path: str, dest: Path) -> str:
    """A copy with tiles 0 and 1 unrecorded and their chunk files gone, as after a run killed mid-way."""
    shutil.copytree(path, dest)
    group = zarr.open_group(str(dest), mode="r+")
    group["tiles"][:2] = 0
    group.attrs["raijac"] = {**group.attrs["raijac"], "complete": False}
    return str(dest)


def test_info_of_a_partial_store_names_the_pending_tiles_and_no_ratio(multidim_store, tmp_path):
    path = _partial_copy(multidim_store[0], tmp_path / "partial.zarr")
    for p in Path(path, "jacobian", "c").rglob("*"):
        if p.is_file() and p.parts[-1] in ("0", "1"):
            p.unlink()
    info = raijac.open(path, allow_partial=True).info()
    total = info["tiles_total"]
    assert (info["complete"], info["tiles_done"], info["tiles_pending"]) == (False, total - 2, 2)
    assert info["pending"] == [[0, 1]]
    assert info["compression_ratio"] is None  # unwritten chunks take no space: no ratio until complete
    files = [p for p in Path(path, "jacobian").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert info["bytes_stored"] == sum(p.stat().st_size for p in files) > 0
    text = invoke("inspect", path).stdout
    assert f"INCOMPLETE, {total - 2}/{total} tiles" in text and "pending   2 tiles (0-1); finish with --resume" in text
    assert "compression" not in text and "on disk so far" in text


def test_info_of_a_sparse_store_describes_the_nonzeros(tmp_path):
    """A tridiagonal 20000 x 20000 J: no dense (N, N) array, its density, and a pattern the plot shows."""
    import scipy.sparse as sp

    n = 20_000
    x = torch.linspace(-1, 1, n, dtype=torch.float64)
    pattern = sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1], shape=(n, n))

    def f(u):
        return torch.cat([u[:1], u[:-2] - 2 * u[1:-1] + u[2:] + torch.sin(u[1:-1]), u[-1:] ** 2])

    path = str(tmp_path / "s.zarr")
    raijac.compute(raijac.Problem(f, x, sparsity=pattern), path, workers=2)
    info = raijac.open(path).info()
    nnz = 3 * n - 2
    assert info["storage"] == "sparse" and info["shape"] == [n, n]
    assert info["sparse"]["nnz"] == nnz and info["sparse"]["colours"] == 3
    assert info["sparse"]["density"] == pytest.approx(nnz / n**2, rel=1e-12)
    assert info["dense_bytes"] == n * n * 8
    assert info["bytes"] == sum(a["bytes"] for a in info["arrays"].values()) < 100 * nnz * 8  # the non-zeros, not n^2
    assert info["compression_ratio"] == pytest.approx(info["bytes"] / info["bytes_stored"], rel=1e-2)
    assert "jacobian" not in info["arrays"] and info["arrays"]["values"]["shape"] == [nnz]

    png = tmp_path / "s.png"
    result = invoke("inspect", path, "--plot", png)
    text = result.stdout
    assert result.exit_code == 0, text + result.stderr
    assert f"jacobian  sparse ({n}, {n}) float64" in text
    assert f"{nnz} non-zeros per sample; 3 colours of columns" in text and "pattern density 0.015%" in text
    assert f"a dense J would take {n * n * 8 / 2**30:.1f} GiB" in text
    assert "chunks" not in text
    from matplotlib.image import imread

    image = imread(png)[..., :3].mean(axis=-1)
    h, w = image.shape
    inside = image[int(0.2 * h) : int(0.85 * h), int(0.6 * w) : int(0.8 * w)]  # inside the pattern panel's axes
    assert (inside < 0.3).mean() > 0.001, "the pattern panel is blank: its diagonal shows no dark pixels"


def test_info_of_a_parameter_hessian_names_the_parameters(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    inputs = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])

    def loss(out):
        return torch.nn.functional.cross_entropy(out, labels)

    path = str(tmp_path / "h.zarr")
    raijac.compute(raijac.Problem.hessian_from_module(net, loss, inputs), path, workers=2)
    jac = raijac.open(path)
    by_name = jac.params
    assert by_name is not None and list(by_name) == [n for n, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        np.testing.assert_array_equal(by_name[name], p.detach().numpy())
    info = jac.info()
    assert info["wrt"] == "params" and info["kind"] == "hessian-params"
    assert [p["name"] for p in info["params"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [p["offset"] for p in info["params"]] == [0, 12, 16, 24]
    text = invoke("inspect", path).stdout
    assert "(w.r.t. params)" in text and "w.r.t. input" not in text
    assert "params    4 tensors, columns in this order: 0.weight (4, 3), 0.bias (4,), 2.weight (2, 4), 2.bias (2,)" in text
