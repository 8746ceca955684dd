"""The CUDA path: one actor per GPU, budgets from real free GPU memory. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import raijac
from raijac.kernels import Kernel, make_target
from raijac.probe import default_budget, measure_cost
from tests.problems import BY_NAME, assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["params", "params_batched", "module_input_batched"])
@pytest.mark.parametrize("mode", ["rev", "fwd", "loop"])
def test_cuda_kernels_match_reference(name, mode):
    case = BY_NAME[name]
    problem = case.build()
    want = case.reference(problem)
    kernel = Kernel(make_target(problem, "cuda"), mode)
    rows = mode != "fwd"
    n_seed = problem.n_out if rows else problem.n_in
    block = kernel(0, problem.batch_size or 1, 0, n_seed).cpu().numpy()
    assert_close(block if problem.batched else block[0], want)


def test_cuda_cost_is_measured_from_the_allocator():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Tanh(), torch.nn.Linear(2048, 2048))
    problem = raijac.Problem.from_module(net, torch.randn(2048), wrt="input")
    cost = measure_cost(Kernel(make_target(problem, "cuda"), "rev"), "cuda")
    assert 2048 * 4 <= cost.per_seed < 2048 * 4 * 20
    free, _ = torch.cuda.mem_get_info()
    assert 0.5 * free < default_budget("cuda") <= 0.8 * free


def test_cuda_run_uses_one_actor_per_gpu(ray_session, store_path):
    case = BY_NAME["params_batched"]
    problem = case.build()
    jac = raijac.compute(problem, store_path)
    assert jac.meta["workers"][0]["device"] == "cuda"
    assert len(jac.meta["workers"]) == torch.cuda.device_count()
    assert_close(jac.numpy(), case.reference(problem))
