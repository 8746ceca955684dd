"""problems: the benchmark problems of `benchmarks/run.py` (issue 4), each a function and a point.

Every builder is seeded, so the CLI can load one as a spec too
(`raijac compute benchmarks/problems.py:tiny --out tiny.zarr`). Every `f` maps one sample
`(*in)` to `(*out)` and, for the repeat tricks, a stack `(K, *in)` to `(K, *out)` sample by
sample (all problems here are batch-aware).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import raijac


@dataclass
class Bench:
    """One benchmark problem: `f` at `x`, plus how expensive it is (which sets the repeats)."""

    name: str
    what: str
    f: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    batched: bool = False
    size: str = "small"  # small | medium | large: fewer repeats for bigger ones

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def batch(self) -> int | None:
        return int(self.x.shape[0]) if self.batched else None

    @property
    def jac_shape(self) -> tuple[int, ...]:
        mn = (self.n_out, self.n_in)
        return (self.batch, *mn) if self.batched else mn

    @property
    def jac_bytes(self) -> int:
        return math.prod(self.jac_shape) * self.x.element_size()

    def problem(self) -> raijac.Problem:
        return raijac.Problem(self.f, self.x, batched=self.batched, batch_aware=True)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tanh_linear(n_in: int, n_out: int, seed: int = 0) -> Bench:
    """x -> tanh(W x)."""
    g = _gen(seed)
    w = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
    x = torch.randn(n_in, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w.T)

    name = f"tanh-{n_in}" if n_in == n_out else f"tanh-{n_in}to{n_out}"
    return Bench(name, f"tanh(W x), {n_in} -> {n_out}", f, x, (n_in,), (n_out,))


def mlp(n: int, h: int | None = None, m: int | None = None, seed: int = 1) -> Bench:
    """x -> W2 tanh(W1 x)."""
    h, m = h or n, m or n
    g = _gen(seed)
    w1 = torch.randn(h, n, generator=g) / math.sqrt(n)
    w2 = torch.randn(m, h, generator=g) / math.sqrt(h)
    x = torch.randn(n, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w1.T) @ w2.T

    size = "small" if n * h <= 2048 * 2048 else ("medium" if n * h <= 4096 * 4096 else "large")
    return Bench(f"mlp-{n}", f"W2 tanh(W1 x), N=H=M={n}" if n == h == m else f"MLP {n}-{h}-{m}", f, x, (n,), (m,), size=size)


def batched_mlp(b: int = 64, n: int = 256, h: int = 256, m: int = 256, seed: int = 2) -> Bench:
    """Per-sample Jacobians of x_b -> W2 tanh(W1 x_b + b1) + b2, B samples."""
    g = _gen(seed)
    w1 = torch.randn(h, n, generator=g) / math.sqrt(n)
    b1 = torch.randn(h, generator=g) * 0.1
    w2 = torch.randn(m, h, generator=g) / math.sqrt(h)
    b2 = torch.randn(m, generator=g) * 0.1
    x = torch.randn(b, n, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    return Bench("batched-mlp", f"per-sample MLP, B={b}, {n}->{h}->{m}", f, x, (n,), (m,), batched=True)


def cnn(seed: int = 3) -> Bench:
    """A small CNN, 3x32x32 -> 100: two conv+tanh+avgpool stages and a linear head."""
    g = _gen(seed)
    c1 = torch.randn(16, 3, 3, 3, generator=g) / math.sqrt(27)
    c2 = torch.randn(32, 16, 3, 3, generator=g) / math.sqrt(144)
    wl = torch.randn(100, 32 * 8 * 8, generator=g) / math.sqrt(2048)
    bl = torch.randn(100, generator=g) * 0.1
    x = torch.randn(3, 32, 32, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        single = x.ndim == 3
        h = x[None] if single else x
        h = F.avg_pool2d(torch.tanh(F.conv2d(h, c1, padding=1)), 2)
        h = F.avg_pool2d(torch.tanh(F.conv2d(h, c2, padding=1)), 2)
        out = h.flatten(1) @ wl.T + bl
        return out[0] if single else out

    return Bench("cnn", "conv-tanh-pool x2 + linear, 3x32x32 -> 100", f, x, (3, 32, 32), (100,))


def pde(n: int = 8192, c: float = 0.25, seed: int = 4) -> Bench:
    """1-D periodic stencil residual r_i = c (u_{i-1} - 2 u_i + u_{i+1}) + u_i^3 (tridiagonal J)."""
    u = torch.randn(n, generator=_gen(seed))

    def f(u: torch.Tensor) -> torch.Tensor:
        return c * (torch.roll(u, 1, dims=-1) - 2 * u + torch.roll(u, -1, dims=-1)) + u**3

    size = "small" if n <= 4096 else "medium"
    return Bench(f"pde-{n}", f"stencil residual c*lap(u) + u^3, N={n}", f, u, (n,), (n,), size=size)


def tiny() -> raijac.Problem:
    """A tiny problem (16 -> 16) for the fixed costs; also a CLI spec."""
    b = tanh_linear(16, 16, seed=5)
    return raijac.Problem(b.f, b.x, batch_aware=True)


def thread_probe(folder: str) -> raijac.Problem:
    """A tiny problem whose f records, in `folder`, the torch threads of every process that runs it."""
    b = tanh_linear(16, 16, seed=6)

    def f(x: torch.Tensor) -> torch.Tensor:
        info = {"pid": os.getpid(), "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as fh:
            json.dump(info, fh)
        return b.f(x)

    return raijac.Problem(f, b.x, batch_aware=True)


# name -> builder; run.py picks from these (--only NAME ...).
BUILDERS: dict[str, Callable[[], Bench]] = {
    "tanh-2048": lambda: tanh_linear(2048, 2048),
    "tanh-32to2048": lambda: tanh_linear(32, 2048),
    "tanh-2048to32": lambda: tanh_linear(2048, 32),
    "mlp-1000": lambda: mlp(1000),
    "mlp-4096": lambda: mlp(4096),
    "batched-mlp": lambda: batched_mlp(),
    "cnn": cnn,
    "pde-8192": lambda: pde(8192),
    "mlp-8192": lambda: mlp(8192),
    "pde-4096": lambda: pde(4096),
}
DEFAULT = ["tanh-2048", "tanh-32to2048", "tanh-2048to32", "mlp-1000", "mlp-4096", "batched-mlp", "cnn", "pde-8192", "mlp-8192"]
QUICK = ["tanh-2048", "tanh-32to2048", "tanh-2048to32", "mlp-1000", "batched-mlp", "cnn", "pde-4096"]
