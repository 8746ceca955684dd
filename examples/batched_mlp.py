"""Per-sample Jacobians of an MLP w.r.t. its parameters (the empirical NTK / Fisher case).

64 samples, 10 outputs, all ~35k parameters: the result has shape (64, 10, n_params).
`raijac compute examples/batched_mlp.py:problem --out ntk.zarr`
"""

import torch

import raijac


def problem() -> raijac.Problem:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 256),
        torch.nn.Tanh(),
        torch.nn.Linear(256, 96),
        torch.nn.Tanh(),
        torch.nn.Linear(96, 10),
    )
    x = torch.randn(64, 32)
    return raijac.Problem.from_module(net, x, wrt="params", batched=True)
