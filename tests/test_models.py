"""Real models (issue 13): parameter Jacobians whose cost is linear in the parameters, and a
zoo of networks (tests/models.py) through the kernels and raijac.compute against torch.func."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from raijac import Problem
from raijac.kernels import Kernel, make_target


class _Written(TorchDispatchMode):
    """Counts the elements every aten op writes (its outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _written_per_entry(layers: int, mode: str, batched: bool) -> float:
    """Elements written by one block of `mode`, per entry of the block, for a stack of tiny Linears."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(layers)])
    problem = Problem.from_module(module, torch.randn(2, 3) if batched else torch.randn(3), wrt="params", batched=batched)
    kernel = Kernel(make_target(problem), mode)
    nb = 2 if batched else 1
    with _Written() as count:
        kernel(0, nb, 0, 3)
    return count.n / (nb * 3 * problem.n_in)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "plain"])
@pytest.mark.parametrize("mode", ["rev", "fwd", "loop"])
def test_param_jacobian_cost_is_linear_in_params(mode, batched):
    """Four times the parameter tensors (and parameters) cost four times the work, not sixteen:
    a slice per tensor made every VJP write a full-length zero gradient per tensor (NOTE: [split])."""
    few, many = _written_per_entry(10, mode, batched), _written_per_entry(40, mode, batched)
    assert many < 1.25 * few, f"{mode}: {many:.1f} elements written per Jacobian entry with 40 tensors, {few:.1f} with 10"
