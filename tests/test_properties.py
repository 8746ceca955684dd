"""Property tests: for random compositions of ops, every mode and auto store the Jacobian
autograd gives (float64), or refuse with a raijac error; never a wrong J.

Functions are drawn as chains of per-sample stages (elementwise, Linear and plain matmuls,
reductions, views and indexing, softmax, in-place activations, custom autograd.Functions with
a right jvp, none, a wrong one, or a numpy backward, and torch.cdist, whose vmap rule is
wrong), batched or not, declared as a `Problem.chain` or hidden in a plain function. Blocks go
through the real triage (`resolve_mode`) and the worker's compute-and-check
(`Worker._compute`), without Ray; a few whole runs go through `raijac.compute`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import raijac
from raijac.errors import RaijacError
from raijac.modes import MODES, seed_axis
from raijac.probe import resolve_mode
from raijac.worker import Worker
from tests.problems import LyingJvp

Stage = Callable[[torch.Tensor], torch.Tensor]
MAX_WIDTH = 12


class _Cube(torch.autograd.Function):
    """x^3 with a right backward and a right jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.x = x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        return 3 * ctx.x**2 * t


class _NoJvp(torch.autograd.Function):
    """sin(x) with a right backward and no jvp: forward mode cannot run it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.cos(x) * g


class _NumpyBackward(torch.autograd.Function):
    """An old-style Function, 2x with a numpy backward: torch.func cannot transform it, and
    double backward sees no graph through it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return torch.from_numpy(g.detach().cpu().numpy() * 2)


def _stage(name: str, width: int, gen: torch.Generator) -> tuple[Stage, int]:
    """One per-sample stage (..., width) -> (..., new width), its random constants from `gen`."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if name == "linear":
        m = int(torch.randint(2, MAX_WIDTH + 1, (), generator=gen))
        layer = torch.nn.Linear(width, m, dtype=torch.float64)
        with torch.no_grad():
            layer.weight.copy_(randn(m, width) / width**0.5)
            layer.bias.copy_(randn(m) * 0.1)
        return layer, m
    if name == "matmul":
        m = int(torch.randint(2, MAX_WIDTH + 1, (), generator=gen))
        w = randn(m, width) / width**0.5
        return (lambda h: h @ w.T), m
    if name == "take_even" and width >= 4:
        return (lambda h: h[..., ::2]), (width + 1) // 2
    if name == "cat" and width + 2 <= MAX_WIDTH:
        return (lambda h: torch.cat([h, 2 * h[..., :2]], dim=-1)), width + 2
    if name == "cdist" and 3 * width <= MAX_WIDTH:
        pts = randn(3, 1)
        return (lambda h: torch.cdist(h.unsqueeze(-1), pts).flatten(-2)), 3 * width
    if name == "transpose" and width % 2 == 0:
        return (lambda h: h.reshape(*h.shape[:-1], 2, width // 2).transpose(-1, -2).reshape(h.shape)), width
    if name == "perm":
        perm = torch.randperm(width, generator=gen)
        return (lambda h: h[..., perm]), width
    same: dict[str, Stage] = {
        "tanh": torch.nn.Tanh(),
        "silu_": torch.nn.SiLU(inplace=True),
        "mish_": torch.nn.Mish(inplace=True),
        "leaky_relu_": torch.nn.LeakyReLU(0.1, inplace=True),
        "sin": torch.sin,
        "square_mix": lambda h: h * (1 + h.square().mean(-1, keepdim=True)),
        "softmax": lambda h: torch.softmax(h, dim=-1),
        "cube": _Cube.apply,
        "no_jvp": _NoJvp.apply,
        "lying_jvp": LyingJvp.apply,
        "numpy_backward": _NumpyBackward.apply,
    }
    return same.get(name, lambda h: h.flip(-1)), width


OPS = ["linear", "matmul", "take_even", "cat", "cdist", "transpose", "perm", "tanh", "silu_", "mish_", "leaky_relu_"]
OPS += ["sin", "square_mix", "softmax", "cube", "no_jvp", "lying_jvp", "numpy_backward"]
INPLACE = {"silu_", "mish_", "leaky_relu_"}
FRESH = {"linear", "matmul", "sin", "square_mix", "cube", "no_jvp", "lying_jvp", "numpy_backward", "cat"}


@st.composite
def problems(draw: st.DrawFn) -> raijac.Problem:
    """A random chain of stages at a random point, batched or not, declared or hidden."""
    drawn = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=4))
    names: list[str] = []
    for name in drawn:
        # A user's f may work in place only on fresh tensors whose backward does not need them
        # (not x or a view of it, not tanh's, cdist's or LeakyReLU's output): else autograd fails.
        if name in INPLACE and (not names or names[-1] not in FRESH):
            names.append("linear")
        names.append(name)
    width = n_in = draw(st.integers(2, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    stages = []
    for name in names:
        stage, width = _stage(name, width, gen)
        stages.append(stage)
    batched = draw(st.booleans())
    x_shape = (draw(st.integers(1, 3)), n_in) if batched else (n_in,)
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        return raijac.Problem.chain(stages, x, batched=batched)

    def f(h: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            h = stage(h)
        return h

    return raijac.Problem(f, x, batched=batched, batch_aware=True)


def _reference(problem: raijac.Problem) -> np.ndarray:
    """Per-sample Jacobians (B, M, N) by torch.autograd.functional (backward formulas)."""
    f, x = problem.f, problem.x
    if not problem.batched:
        return torch.autograd.functional.jacobian(lambda v: f(v).reshape(-1), x).reshape(1, problem.n_out, -1).numpy()
    return np.stack([torch.autograd.functional.jacobian(lambda v: f(v[None])[0], xi).numpy() for xi in x])


def _finite_differences(problem: raijac.Problem, h: float = 1e-6) -> np.ndarray:
    """Per-sample Jacobians (B, M, N) by float64 central differences."""
    x = problem.x if problem.batched else problem.x[None]
    cols = []
    with torch.no_grad():
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[:, j] = h
            if problem.batched:
                up, down = problem.f(x + e), problem.f(x - e)
            else:
                up, down = problem.f(x[0] + e[0])[None], problem.f(x[0] - e[0])[None]
            cols.append(((up - down) / (2 * h)).reshape(x.shape[0], -1))
    return torch.stack(cols, dim=2).numpy()


def _run_blocks(problem: raijac.Problem, mode: str, k: int) -> np.ndarray:
    """J as a worker computes it: blocks of k seeds and 2 samples, each checked before use."""
    args = {"mode": mode, "dtype": "float64"}
    worker = Worker(problem, name="w", fingerprint=problem.fingerprint(**args), fingerprint_args=args, mode=mode, dtype="float64")
    kernel = worker._ready()
    t = kernel.target
    rows = seed_axis(mode) == "rows"
    n_seed = t.n_out if rows else t.n_in
    parts = []
    for b0 in range(0, t.n_samples, 2):
        b1 = min(b0 + 2, t.n_samples)
        blocks = [worker._compute(kernel, b0, b1, s, min(s + k, n_seed)) for s in range(0, n_seed, k)]
        parts.append(np.concatenate(blocks, axis=1 if rows else 2))
    return np.concatenate(parts, axis=0)


@pytest.mark.parametrize("mode", ["auto", *MODES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(problem=problems(), k=st.integers(1, 5))
def test_right_or_refused(mode, problem, k):
    """The property: a J that matches autograd, or a raijac error; auto finds a mode
    whenever autograd can differentiate f."""
    try:
        chosen = resolve_mode(problem, mode)[0]
        got = _run_blocks(problem, chosen, k)
    except RaijacError as exc:
        event(f"refused: {type(exc).__name__}")
        if mode == "auto":  # loop needs only the backward the reference uses: refused only if autograd fails too
            with pytest.raises(RuntimeError):
                _reference(problem)
        return
    event(f"computed with {chosen}")
    try:
        ref, rtol = _reference(problem), 1e-7
    except RuntimeError:  # autograd cannot differentiate f (an in-place op on a saved output); forward mode may
        event("checked by finite differences")
        ref, rtol = _finite_differences(problem), 1e-5
    scale = max(float(np.abs(ref).max()), 1e-300)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=f"mode {chosen} (asked {mode})")


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(problem=problems(), mode=st.sampled_from(["auto", "fwd-repeat", "chain"]))
def test_compute_right_or_refused(ray_session, tmp_path_factory, problem, mode):
    """The same property end to end: Ray workers, their block check, the Zarr store."""
    out = str(tmp_path_factory.mktemp("prop") / "j.zarr")
    try:
        jac = raijac.compute(problem, out, mode=mode, block_size=2, progress=False)
    except RaijacError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event(f"computed with {jac.summary['mode']}")
    try:
        ref = _reference(problem)
    except RuntimeError:
        return  # autograd cannot differentiate f; the kernels' test compares with finite differences
    got = jac.numpy() if problem.batched else jac.numpy()[None]
    scale = max(float(np.abs(ref).max()), 1e-300)
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9 * scale)
