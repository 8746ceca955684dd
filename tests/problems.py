"""Test problem families, each with an independent reference Jacobian.

References come from `torch.func.jacrev` (per sample via vmap for batched problems), from
`torch.autograd.functional.jacobian` (a plain autograd row loop) where torch.func cannot
run the function, or from a closed form. Sizes are odd on purpose: they divide no chunk.
Every builder is deterministic, as specs must be.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import raijac

ALL_MODES = ("rev", "fwd", "rev-batched", "rev-repeat", "fwd-repeat", "loop")
PLAIN_MODES = ("rev", "fwd", "rev-batched", "loop")
CHAIN = ("chain", "chain-fwd")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], raijac.Problem]
    reference: Callable[[raijac.Problem], np.ndarray]
    modes: tuple[str, ...]  # modes that must reproduce the reference
    broken: tuple[str, ...] = ()  # modes that must refuse this function
    auto: str | None = None  # what auto must pick, where that is the point of the case


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def jacrev_reference(problem: raijac.Problem) -> np.ndarray:
    """torch.func.jacrev, vmapped over samples for batched problems."""
    f, x = problem.f, problem.x
    if problem.batched:
        per = torch.func.vmap(torch.func.jacrev(lambda xi: f(xi[None])[0]))(x)
        return per.reshape(problem.jacobian_shape).detach().numpy()
    return torch.func.jacrev(f)(x).reshape(problem.jacobian_shape).detach().numpy()


def autograd_reference(problem: raijac.Problem) -> np.ndarray:
    """torch.autograd.functional.jacobian (a row loop, no torch.func), per sample if batched."""
    f, x = problem.f, problem.x
    if problem.batched:
        rows = [torch.autograd.functional.jacobian(lambda xi: f(xi[None])[0], xi) for xi in x]
        return torch.stack(rows).reshape(problem.jacobian_shape).detach().numpy()
    return torch.autograd.functional.jacobian(f, x).reshape(problem.jacobian_shape).detach().numpy()


def params_reference(problem: raijac.Problem) -> np.ndarray:
    """jacrev over the parameter dict, columns concatenated in module.parameters() order."""
    net, x = problem.module, problem.x
    params = {k: v.detach() for k, v in net.named_parameters()}

    def out(p, xi):
        return torch.func.functional_call(net, p, (xi,))

    if problem.batched:
        jac = torch.func.vmap(torch.func.jacrev(lambda p, xi: out(p, xi[None])[0]), in_dims=(None, 0))(params, x)
        lead = (x.shape[0], problem.n_out)
    else:
        jac = torch.func.jacrev(out)(params, x)
        lead = (problem.n_out,)
    return torch.cat([jac[name].reshape(*lead, -1) for name, _ in net.named_parameters()], dim=-1).detach().numpy()


# ---------------------------------------------------------------------- families
def elementwise() -> raijac.Problem:
    return raijac.Problem(lambda x: torch.sin(x) * torch.exp(0.3 * x) + x**2, _randn(37, seed=1), batch_aware=True)


_W1, _W2 = _randn(29, 23, seed=2) / 5, _randn(17, 29, seed=3) / 5


def matmul_chain() -> raijac.Problem:
    return raijac.Problem(lambda x: torch.tanh(torch.tanh(x @ _W1.T) @ _W2.T), _randn(23, seed=4), batch_aware=True)


_K = _randn(4, 2, 3, 3, seed=5) / 3


def conv() -> raijac.Problem:
    def f(x):
        return torch.nn.functional.conv2d(torch.nn.functional.softplus(x), _K, padding=1)

    return raijac.Problem(f, _randn(2, 5, 7, seed=6), batch_aware=True)


_WL = _randn(9, 9, seed=7) / 3


def softmax_layernorm() -> raijac.Problem:
    def f(x):
        return torch.nn.functional.layer_norm(torch.softmax(x @ _WL, dim=-1) * 3.0, (9,))

    return raijac.Problem(f, _randn(5, 9, seed=8), batch_aware=True)


_WQ, _WK, _WV = (_randn(8, 8, seed=s) / 3 for s in (9, 10, 11))


def attention() -> raijac.Problem:
    def f(x):
        q, k, v = x @ _WQ, x @ _WK, x @ _WV
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        return att @ v

    return raijac.Problem(f, _randn(6, 8, seed=12), batch_aware=True)


_WM = _randn(2, 6, 3, 4, 5, seed=13) / 4


def multidim() -> raijac.Problem:
    """(3, 4, 5) -> (2, 6): a wide output of a multi-dimensional input."""
    return raijac.Problem(
        lambda x: torch.tanh(torch.einsum("abijk,...ijk->...ab", _WM, x)), _randn(3, 4, 5, seed=14), batch_aware=True
    )


_W64 = _randn(31, 19, seed=15, dtype=torch.float64) / 4


def float64() -> raijac.Problem:
    return raijac.Problem(
        lambda x: torch.sinh(x @ _W64.T) * torch.cos(x.sum(-1, keepdim=True)),
        _randn(19, seed=16, dtype=torch.float64),
        batch_aware=True,
    )


_WB1, _WB2 = _randn(21, 11, seed=17) / 3, _randn(13, 21, seed=18) / 3


def batched_mlp() -> raijac.Problem:
    return raijac.Problem(lambda x: torch.tanh(torch.tanh(x @ _WB1.T) @ _WB2.T), _randn(7, 11, seed=19), batched=True)


def _net() -> torch.nn.Module:
    torch.manual_seed(20)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))


def params() -> raijac.Problem:
    return raijac.Problem.from_module(_net(), _randn(6, seed=21), wrt="params")


def params_batched() -> raijac.Problem:
    return raijac.Problem.from_module(_net(), _randn(5, 6, seed=22), wrt="params", batched=True)


def module_input_batched() -> raijac.Problem:
    return raijac.Problem.from_module(_net(), _randn(5, 6, seed=23), wrt="input", batched=True)


def sequential_mlp() -> raijac.Problem:
    """An nn.Sequential (Linear, elementwise, LayerNorm, Linear): the chain modes apply."""
    torch.manual_seed(30)
    net = torch.nn.Sequential(
        torch.nn.Linear(23, 31), torch.nn.Tanh(), torch.nn.Linear(31, 31), torch.nn.GELU(), torch.nn.LayerNorm(31),
        torch.nn.Linear(31, 13),
    )  # fmt: skip
    return raijac.Problem(net, _randn(23, seed=31))


def sequential_wide() -> raijac.Problem:
    """A wide nn.Sequential (M > N) starting and ending with Linear: chain-fwd applies."""
    torch.manual_seed(32)
    net = torch.nn.Sequential(torch.nn.Linear(11, 19), torch.nn.SiLU(), torch.nn.Linear(19, 41), torch.nn.Softplus())
    return raijac.Problem(net, _randn(11, seed=33))


def sequential_conv() -> raijac.Problem:
    """Conv and Flatten stages take the generic VJP/JVP path inside the chain modes."""
    torch.manual_seed(34)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(0), torch.nn.Linear(3 * 5 * 6, 7),
    )  # fmt: skip
    return raijac.Problem(net, _randn(2, 5, 6, seed=35))


_WD = _randn(29, 29, seed=37) / 5


def _sin_mix(h: torch.Tensor) -> torch.Tensor:
    return torch.sin(h) @ _WD.T


def declared_chain() -> raijac.Problem:
    """A Problem.chain of modules and plain functions: Linear, GELU, a function (generic
    VJP/JVP), LayerNorm, a lambda, Linear; the chain modes apply."""
    torch.manual_seed(36)
    stages = [torch.nn.Linear(17, 29), torch.nn.GELU(), _sin_mix, torch.nn.LayerNorm(29), lambda h: h * h.square().mean(),
              torch.nn.Linear(29, 11)]  # fmt: skip
    return raijac.Problem.chain(stages, _randn(17, seed=38))


def sequential_batched() -> raijac.Problem:
    """A per-sample batched nn.Sequential: the chain modes walk a block's samples at once."""
    torch.manual_seed(39)
    net = torch.nn.Sequential(
        torch.nn.Linear(13, 21), torch.nn.Tanh(), torch.nn.LayerNorm(21), torch.nn.Linear(21, 21), torch.nn.SiLU(),
        torch.nn.Linear(21, 9),
    )  # fmt: skip
    return raijac.Problem(net, _randn(7, 13, seed=40), batched=True)


def chain_batched_wide() -> raijac.Problem:
    """A batched Problem.chain with M > N (chain-fwd); softmax takes the generic JVP path."""
    torch.manual_seed(41)
    stages = [torch.nn.Linear(6, 15), torch.nn.Softplus(), lambda h: torch.softmax(h, dim=-1), torch.nn.Linear(15, 19)]
    return raijac.Problem.chain(stages, _randn(5, 6, seed=42), batched=True)


def linear_only_batched() -> raijac.Problem:
    """Linear stages only: every sample has the same Jacobian, which stays shared to the end."""
    torch.manual_seed(43)
    net = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 5))
    return raijac.Problem(net, _randn(4, 8, seed=44), batched=True)


def item_call() -> raijac.Problem:
    """`.item()` on the primal: fine here, since only seeds are vmapped (not batch-aware)."""

    def f(x):
        scale = float(x.abs().max().item())
        return torch.cat([torch.sin(x) * scale, x[:5] * 2])

    return raijac.Problem(f, _randn(15, seed=24))


_LAST_INPUT = torch.zeros(15)
_CALLS = torch.zeros(())


def inplace_captured() -> raijac.Problem:
    """Records its input in a captured buffer: torch.func refuses the in-place write, so
    only the plain-autograd forwards are left, rev-batched and loop (not batch-aware)."""

    def f(x):
        _LAST_INPUT.copy_(x.detach())
        return torch.cat([torch.tanh(x), x[:5] ** 2])

    return raijac.Problem(f, _randn(15, seed=29))


def breaks_vmap_stackable() -> raijac.Problem:
    """Counts its calls in a captured tensor: torch.func refuses; stacks work (batch-aware)."""

    def f(x):
        _CALLS.add_(1)
        return torch.tanh(x[..., :9]) * x[..., 3:12]

    return raijac.Problem(f, _randn(14, seed=25), batch_aware=True)


class _Cube(torch.autograd.Function):
    """x**3 with a backward formula but no forward (jvp) formula; vmap-able."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


_WC = _randn(33, 12, seed=26) / 3


def no_forward_rule() -> raijac.Problem:
    """Wide output (auto prefers fwd) through a Function without jvp: fwd must fall back.
    (The final scaling keeps raijac.peel from finding a last linear layer.)"""
    return raijac.Problem(lambda x: (_Cube.apply(x) @ _WC.T) * 2, _randn(12, seed=27), batch_aware=True)


def no_forward_rule_tail() -> raijac.Problem:
    """The same ending in the product: peeled when a chain mode is asked for, chain-fwd runs
    forward mode through the traced x**3 (the peel checked it against the Function's backward)."""
    return raijac.Problem(lambda x: _Cube.apply(x) @ _WC.T, _randn(12, seed=27), batch_aware=True)


class _MLP(torch.nn.Module):
    """A model that is not an nn.Sequential: raijac.peel finds its output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(19, 27), torch.nn.Linear(27, 14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.out(torch.tanh(h) * torch.sigmoid(h))


def module_mlp() -> raijac.Problem:
    torch.manual_seed(45)
    return raijac.Problem.from_module(_MLP(), _randn(19, seed=46), wrt="input")


_WT, _BT = _randn(23, 16, seed=47) / 4, _randn(23, seed=48)


def linear_tail() -> raijac.Problem:
    """F.linear with a bias after a softmax, on a (4, 4) input: peeled; M > N so chain-fwd."""
    return raijac.Problem(
        lambda x: torch.nn.functional.linear(torch.softmax(x, -1).reshape(-1) * x.reshape(-1), _WT, _BT),
        _randn(4, 4, seed=49),
    )


class NumpyDouble(torch.autograd.Function):
    """x -> 2x with a numpy backward: no jvp, and double backward cannot see through it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.detach().cpu().numpy() * 2).to(g.device)


class LyingJvp(torch.autograd.Function):
    """2x whose jvp says 5t: forward-mode answers disagree with autograd's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2

    @staticmethod
    def jvp(ctx, t):
        return t * 5


class _ClipGrad(torch.autograd.Function):
    """Identity forward, a halved backward: linear in g (a Jacobian exists), but not the
    forward's derivative. (A clamped g would make the VJP nonlinear in the cotangent, so no
    Jacobian at all: the block check refuses every mode there.)"""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 1.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


def clipped_backward_tail() -> raijac.Problem:
    """Ends in a product, but a traced chain would lose the clipped backward: the peel's
    check refuses it and auto keeps rev (jacrev's answer, through the custom backward)."""
    return raijac.Problem(lambda x: _WC[:7] @ _ClipGrad.apply(torch.tanh(x * 3)), _randn(12, seed=50))


class _OldStyle(torch.autograd.Function):
    """An old-style Function (ctx in forward): torch.func cannot transform it at all."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


def old_style_function() -> raijac.Problem:
    return raijac.Problem(lambda x: _OldStyle.apply(x) * x.sum(), _randn(10, seed=28))


def _cube_reference(problem: raijac.Problem) -> np.ndarray:
    x = problem.x
    return (_WC * (3 * x**2)[None, :]).numpy() * 2


def _cube_tail_reference(problem: raijac.Problem) -> np.ndarray:
    return _cube_reference(problem) / 2


CASES: list[Case] = [
    Case("elementwise", elementwise, jacrev_reference, ALL_MODES),
    Case("matmul_chain", matmul_chain, jacrev_reference, ALL_MODES + CHAIN),  # peeled: it ends elementwise
    Case("conv", conv, jacrev_reference, ALL_MODES),
    Case("softmax_layernorm", softmax_layernorm, jacrev_reference, ALL_MODES),
    Case("attention", attention, jacrev_reference, ALL_MODES),
    Case("multidim", multidim, jacrev_reference, ALL_MODES),
    Case("float64", float64, jacrev_reference, ALL_MODES),
    Case("batched_mlp", batched_mlp, jacrev_reference, ALL_MODES),
    Case("params", params, params_reference, PLAIN_MODES, broken=("rev-repeat", "fwd-repeat")),
    Case("params_batched", params_batched, params_reference, ALL_MODES),
    Case("module_input_batched", module_input_batched, jacrev_reference, ALL_MODES + CHAIN, auto="chain"),
    Case("sequential_mlp", sequential_mlp, jacrev_reference, PLAIN_MODES + CHAIN, auto="chain"),
    Case("sequential_wide", sequential_wide, jacrev_reference, PLAIN_MODES + CHAIN, auto="chain-fwd"),
    Case("sequential_conv", sequential_conv, jacrev_reference, PLAIN_MODES + CHAIN, auto="chain"),
    Case("declared_chain", declared_chain, jacrev_reference, PLAIN_MODES + CHAIN, auto="chain"),
    Case("sequential_batched", sequential_batched, jacrev_reference, ALL_MODES + CHAIN, auto="chain"),
    Case("chain_batched_wide", chain_batched_wide, jacrev_reference, ALL_MODES + CHAIN, auto="chain-fwd"),
    Case("linear_only_batched", linear_only_batched, jacrev_reference, ALL_MODES + CHAIN, auto="chain"),
    Case("item_call", item_call, autograd_reference, PLAIN_MODES, broken=("rev-repeat",), auto="fwd"),
    Case(
        "inplace_captured",
        inplace_captured,
        autograd_reference,
        ("rev-batched", "loop"),
        broken=("rev", "fwd", "rev-repeat"),
        auto="rev-batched",
    ),
    Case(
        "breaks_vmap_stackable",
        breaks_vmap_stackable,
        autograd_reference,
        ("rev-batched", "rev-repeat", "fwd-repeat", "loop"),
        broken=("rev", "fwd"),
        auto="rev-batched",
    ),
    Case(
        "no_forward_rule",
        no_forward_rule,
        _cube_reference,
        ("rev", "rev-repeat", "fwd-repeat", "loop"),
        broken=("fwd",),
        auto="fwd-repeat",
    ),
    Case(
        "no_forward_rule_tail",
        no_forward_rule_tail,
        _cube_tail_reference,
        ("rev", "loop", "chain", "chain-fwd"),
        broken=("fwd",),
        auto="fwd-repeat",
    ),  # fmt: skip
    # Below PEEL_MIN_SEEDS seeds auto does not trace (the chain modes still run when asked):
    Case("module_mlp", module_mlp, jacrev_reference, PLAIN_MODES + CHAIN, auto="rev"),
    Case("linear_tail", linear_tail, jacrev_reference, PLAIN_MODES + CHAIN, auto="fwd"),
    Case("clipped_backward_tail", clipped_backward_tail, autograd_reference, ("rev", "loop"), broken=("fwd",), auto="rev"),
    Case(
        "old_style_function",
        old_style_function,
        autograd_reference,
        ("rev-batched", "loop"),
        broken=("rev", "fwd"),
        auto="rev-batched",
    ),
]

BY_NAME = {c.name: c for c in CASES}


class CountProducts(TorchDispatchMode):
    """Counts the matrix products (mm, mv, bmm, addmm, ...) dispatched inside its `with`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith(("mm", "mv", "matmul", "bmm", "addmm", "addmv")):
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def tolerance(dtype: np.dtype | torch.dtype) -> dict[str, float]:
    """rtol/atol that fit the dtype: float64 agrees to ~1e-12, float32 to ~1e-5."""
    if str(dtype).endswith("float64"):
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 2e-5, "atol": 2e-6}


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, **tolerance(want.dtype))
