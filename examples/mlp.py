"""An MLP's Jacobian w.r.t. its input: `raijac compute examples/mlp.py:problem --out mlp.zarr`.

Building the problem is deterministic (seeded), as every worker builds its own copy.
"""

import torch

import raijac


def problem() -> raijac.Problem:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(256, 512),
        torch.nn.Tanh(),
        torch.nn.Linear(512, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 384),
    )
    x = torch.randn(256)
    return raijac.Problem.from_module(net, x, wrt="input")
