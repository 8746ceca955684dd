"""Reading stores: raijac.open, and plain zarr, dask and xarray without raijac."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import raijac
from tests.problems import BY_NAME, assert_close

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def batched_store(tmp_path_factory, ray_session):
    case = BY_NAME["params_batched"]
    problem = case.build()
    path = str(tmp_path_factory.mktemp("r") / "ntk.zarr")
    raijac.compute(problem, path, workers=2)
    return path, problem, case.reference(problem)


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
