"""README recipes: every python block of "Analysing the output" (and the "Reading it" block) runs
verbatim against real stores named as in the README, and its numbers match torch.func.

The stores are small stand-ins computed into a temporary folder under the README's names:
`ntk.zarr` holds per-sample parameter Jacobians, `tanh.zarr` a plain one.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import raijac
from tests.problems import BY_NAME, params_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def section_blocks(title: str) -> list[str]:
    """The ```python blocks of the README's `## title` section, its ### subsections included."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n") + len(title) + 5
    end = text.find("\n## ", start)
    body = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def block_with(marker: str, title: str = "Analysing the output") -> str:
    blocks = [b for b in section_blocks(title) if marker in b]
    assert len(blocks) == 1, f"README section {title!r} should have one python block with {marker!r}"
    return blocks[0]


def run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # the README's code, verbatim
    return namespace


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_session):
    """A folder holding ntk.zarr (per-sample parameter Jacobians, 5 x 4 x 103) and tanh.zarr (17 x 23)."""
    base = tmp_path_factory.mktemp("recipes")
    ntk, tanh = BY_NAME["params_batched"].build(), BY_NAME["matmul_chain"].build()
    raijac.compute(ntk, str(base / "ntk.zarr"), workers=2)
    raijac.compute(tanh, str(base / "tanh.zarr"), workers=2, block_size=4)
    return base


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def per_sample_params_jacobian() -> np.ndarray:
    problem = BY_NAME["params_batched"].build()
    return params_reference(problem).astype(np.float64)


def test_every_recipe_block_is_tested():
    blocks = section_blocks("Analysing the output")
    markers = ["jac.read(", "da.einsum", "svds(", "jac.rmatvec(jv)"]
    assert len(blocks) == len(markers)
    for marker in markers:
        block_with(marker)


def test_reading_parts(in_workdir):
    ns = run(block_with("jac.read("))
    want = per_sample_params_jacobian()
    np.testing.assert_allclose(ns["rows"], want[0, 0:2, 0:50], rtol=2e-5, atol=2e-6)
    assert isinstance(ns["torch_block"], torch.Tensor)
    np.testing.assert_allclose(ns["torch_block"].numpy(), want[:2], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ns["one_output"], want[3, 1], rtol=2e-5, atol=2e-6)


def test_ntk_with_dask(in_workdir):
    ns = run(block_with("da.einsum"))
    j = per_sample_params_jacobian()
    want = np.einsum("bmp,cnp->bmcn", j, j)  # from torch.func.jacrev, not from the store
    assert ns["ntk"].shape == (5, 4, 5, 4)
    np.testing.assert_allclose(ns["ntk"], want, rtol=1e-4, atol=1e-5)
    flat = ns["ntk"].reshape(20, 20)
    assert np.allclose(flat, flat.T, rtol=1e-5) and np.linalg.eigvalsh(flat.astype(np.float64)).min() > -1e-4


def test_top_singular_values(in_workdir):
    ns = run(block_with("svds("))
    problem = BY_NAME["matmul_chain"].build()
    want = torch.linalg.svdvals(torch.func.jacrev(problem.f)(problem.x).double()).numpy()[:5]
    np.testing.assert_allclose(ns["top"], want, rtol=1e-5)


def test_gauss_newton_product(in_workdir):
    ns = run(block_with("jac.rmatvec(jv)"))
    problem = BY_NAME["params_batched"].build()
    p = problem.params
    v = torch.as_tensor(ns["v"], dtype=p.dtype)

    def f(params):
        return problem.call(problem.x, params)

    _, jv = torch.func.jvp(f, (p,), (v,))
    _, vjp_fn = torch.func.vjp(f, p)
    (want,) = vjp_fn(jv)
    assert ns["gn"].shape == p.shape
    np.testing.assert_allclose(ns["jv"], jv.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["gn"], want.numpy(), rtol=1e-4, atol=1e-4)


def test_reading_it_with_zarr_dask_and_xarray(in_workdir):
    """The "Reading it" block of "On-disk format": raijac.open, plain zarr, dask and xarray."""
    ns = run(block_with("xr.open_zarr", title="On-disk format"))
    want = per_sample_params_jacobian()
    np.testing.assert_allclose(ns["block"], want[0, :, :1000], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(ns["full"]), want.reshape(ns["full"].shape), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(ns["ntk"].compute(), np.einsum("bmn,cln->bmcl", want, want), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ns["J"].compute(), want, rtol=2e-5, atol=2e-6)
