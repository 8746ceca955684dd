"""Hessians (issue 6, part 1): Problem.hessian and hessian_from_module against torch.func.hessian,
in every mode, plain and per sample, float32 and float64; verify checks symmetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import raijac
from raijac.kernels import Kernel, make_target, seed_axis
from raijac.verify import verify
from tests.problems import assert_close

W = torch.randn(9, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 3


def objective(x):
    """A non-separable scalar of a 13-vector (works on stacks too: reductions on the last axis)."""
    z = torch.tanh(x @ W.T.to(x.dtype))
    return torch.logsumexp(z, dim=-1) + (torch.sin(x) * x.sum(-1, keepdim=True)).sum(-1) + (x**4).sum(-1) / 8


def _x(dtype, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _assemble(problem, mode, block=4):
    kernel = Kernel(make_target(problem), mode)
    n = problem.n_in
    samples = problem.batch_size or 1
    out = np.zeros((samples, n, n))
    for s0 in range(0, n, block):
        s1 = min(s0 + block, n)
        got = kernel(0, samples, s0, s1).detach().numpy()
        if seed_axis(mode) == "rows":
            out[:, s0:s1, :] = got
        else:
            out[:, :, s0:s1] = got
    return out if problem.batched else out[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["rev", "fwd", "loop"])
def test_hessian_matches_torch_func(mode, dtype):
    x = _x(dtype, 13)
    problem = raijac.Problem.hessian(objective, x)
    want = torch.func.hessian(objective)(x).numpy()
    assert problem.jacobian_shape == (13, 13) and problem.kind == "hessian"
    assert_close(_assemble(problem, mode).astype(want.dtype), want)


@pytest.mark.parametrize("mode", ["rev", "fwd", "rev-repeat", "fwd-repeat", "loop"])
def test_batched_hessians_are_per_sample(mode):
    x = _x(torch.float64, 5, 13)
    problem = raijac.Problem.hessian(objective, x, batched=True)
    want = torch.func.vmap(torch.func.hessian(lambda xi: objective(xi[None])[0]))(x).numpy()
    assert problem.jacobian_shape == (5, 13, 13)
    assert_close(_assemble(problem, mode), want)


def _loss_reference(net, x, target):
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    shapes = [(name, p.shape, p.numel()) for name, p in net.named_parameters()]

    def loss_of(vec):
        params, offset = {}, 0
        for name, shape, size in shapes:
            params[name] = vec[offset : offset + size].view(shape)
            offset += size
        out = torch.func.functional_call(net, params, (x,))
        return torch.nn.functional.mse_loss(out, target)

    return torch.autograd.functional.hessian(loss_of, flat).numpy()


def test_parameter_hessian_of_a_loss(ray_session, store_path):
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    x, target = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    problem = raijac.Problem.hessian_from_module(net, lambda out: torch.nn.functional.mse_loss(out, target), x)
    assert problem.jacobian_shape == (37, 37) and [i.name for i in problem.param_info] == [
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    ]
    jac = raijac.compute(problem, store_path, workers=2, block_size=5)
    assert jac.meta["hessian"] is True and jac.meta["kind"] == "hessian-params"
    assert [p["offset"] for p in jac.meta["params"]] == [0, 20, 25, 35]
    assert_close(jac.numpy(), _loss_reference(net, x, target))


@pytest.mark.parametrize("batched", [False, True])
def test_hessian_end_to_end_and_symmetry_check(ray_session, tmp_path, batched):
    x = _x(torch.float32, *((6, 13) if batched else (13,)))
    problem = raijac.Problem.hessian(objective, x, batched=batched)
    path = str(tmp_path / "h.zarr")
    jac = raijac.compute(problem, path, workers=2, block_size=4)
    if batched:
        want = torch.func.vmap(torch.func.hessian(lambda xi: objective(xi[None])[0]))(x).numpy()
    else:
        want = torch.func.hessian(objective)(x).numpy()
    assert_close(jac.numpy(), want)
    report = verify(path, problem=problem)
    assert report.ok and len(report.symmetry_errors) == report.probes and max(report.symmetry_errors) < 1e-5
    # Break the symmetry in one off-diagonal entry: verify must catch it and say so.
    arr = zarr.open_group(path, mode="r+")["jacobian"]
    idx = (2, 3, 9) if batched else (3, 9)
    arr[idx] = arr[idx] + 0.05 * float(np.abs(want).max())
    broken = verify(path, problem=problem)
    assert not broken.ok and max(broken.symmetry_errors) > broken.rtol
    assert "not symmetric" in broken.verdict()


def test_hessian_needs_a_scalar():
    with pytest.raises(raijac.ProblemError, match="needs f to return a scalar, but f returned \\(3,\\)"):
        raijac.Problem.hessian(lambda x: x**2, torch.randn(3))
    with pytest.raises(raijac.ProblemError, match="one scalar per sample, shape \\(4,\\)"):
        raijac.Problem.hessian(lambda x: x.sum(), torch.randn(4, 3), batched=True)
