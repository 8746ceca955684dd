"""blas: the chain modes' big CPU products on numpy's BLAS give torch's numbers, and only where they should."""

from __future__ import annotations

import pytest
import torch

from raijac import blas
from raijac.kernels import Kernel, make_target
from raijac.problem import Problem

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture
def numpy_blas(monkeypatch):
    """numpy's BLAS for every product, however small (the thresholds are for speed, not numbers)."""
    monkeypatch.setattr(blas, "_CHOICE", "numpy")
    monkeypatch.setattr(blas, "MIN_MACS", 0)
    monkeypatch.setattr(blas, "MIN_ROWS", 1)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = max(ref.abs().max().item(), 1.0)
    assert (got - ref).abs().max().item() <= TOL[ref.dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True])
def test_numpy_product_equals_torchs(numpy_blas, dtype, transposed):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 53, generator=g, dtype=dtype)
    w = torch.randn(29, 53, generator=g, dtype=dtype).requires_grad_(True)  # a model's weight: needs grad
    b = w.T if transposed else w.T.contiguous()
    got = blas.matmul(a, b)
    assert not got.requires_grad
    _close(got, (a @ b).detach())


def test_numpy_is_used_for_big_products_only(monkeypatch):
    monkeypatch.setattr(blas, "_CHOICE", "numpy")
    calls = []
    real = blas._numpy_matmul
    monkeypatch.setattr(blas, "_numpy_matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    big_rows = torch.randn(blas.MIN_ROWS, 1024)
    w = torch.randn(1024, blas.MIN_MACS // (blas.MIN_ROWS * 1024))
    blas.matmul(big_rows, w)
    assert calls == [big_rows.shape]
    for a, b in [
        (torch.randn(blas.MIN_ROWS - 1, 1024), torch.randn(1024, 4096)),  # too few rows (OpenBLAS is slower)
        (torch.randn(4, 8), torch.randn(8, 4)),  # too small to matter
        (torch.randn(2, blas.MIN_ROWS, 64), torch.randn(64, 64)),  # batched
        (torch.randint(0, 5, (256, 1024)), torch.randint(0, 5, (1024, 1024))),  # integers
        (torch.randn(256, 1024, dtype=torch.float64), torch.randn(1024, 1024)),  # mixed dtypes: torch's error
    ]:
        if a.dtype != b.dtype:
            with pytest.raises(RuntimeError):
                blas.matmul(a, b)
        else:
            assert torch.equal(blas.matmul(a, b), a @ b)
    assert len(calls) == 1


def test_numpy_blas_threads_follow_torch():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with blas._threads(1):
        libs = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]
        assert libs and all(i["num_threads"] == 1 for i in libs)


@pytest.mark.parametrize("forced", ["torch", "numpy"])
def test_environment_overrides_the_choice(monkeypatch, forced):
    monkeypatch.setattr(blas, "_CHOICE", None)
    monkeypatch.setenv("RAIJAC_BLAS", forced)
    assert blas.choice() == forced


def test_default_choice_follows_the_rule(monkeypatch):
    monkeypatch.setattr(blas, "_CHOICE", None)
    monkeypatch.delenv("RAIJAC_BLAS", raising=False)
    amd_openblas = blas._cpu_vendor() == "AuthenticAMD" and blas._numpy_blas() == "openblas"
    assert blas.choice() == ("numpy" if amd_openblas else "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["chain", "chain-fwd"])
def test_chain_kernel_on_numpy_blas_matches_jacrev(numpy_blas, dtype, mode):
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 32), torch.nn.GELU(), torch.nn.Linear(32, 28)
    ).to(dtype)
    x = torch.randn(24, dtype=dtype)
    problem = Problem(net, x)
    kernel = Kernel(make_target(problem), mode)
    n_seed = 28 if mode == "chain" else 24
    got = torch.cat([kernel(0, 1, s, min(s + 10, n_seed)) for s in range(0, n_seed, 10)], dim=1 if mode == "chain" else 2)[0]
    _close(got, torch.func.jacrev(net)(x).detach())
