"""The chain mode against torch.func.jacrev (issue 6): kernel alone, and end to end on a warm Ray.

An MLP with N = H = M (Linear, tanh, Linear) as an nn.Sequential; jacrev and the kernels run
in this process with the same threads; the end-to-end runs use 2 workers x 1 thread.

    python benchmarks/chain.py [--sizes 4096 8192] [--e2e] [--batched] [--tmp DIR]

End to end, the MLP runs as an nn.Sequential (chain, then rev), as a custom nn.Module and as a
plain function (both auto: raijac.peel finds their layers), each as many times as jacrev (best
of them; every run is printed, the first one on a fresh object store pays for fresh pages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import folders
import torch

import raijac
from raijac.kernels import Kernel, make_target


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class MLP(torch.nn.Module):
    """The same MLP as a model that is not an nn.Sequential: auto finds its chain by tracing (raijac.peel)."""

    def __init__(self, net: torch.nn.Sequential) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](torch.tanh(self.net[0](x)))


def ensure_ray(tmp: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        raijac.compute(raijac.Problem(torch.sin, torch.randn(4)), tmp + "/w.zarr", workers=2)


def e2e(make: Callable[[], raijac.Problem], mode: str, tmp: str, repeats: int = 1) -> tuple[list[float], str]:
    """Every run's seconds (best of them is comparable with jacrev's best), and the mode that ran.
    Each run gets a fresh Problem, so nothing the driver learnt about the last one is reused."""
    out = tmp + "/chain.zarr"
    times, chosen = [], ""
    for _ in range(repeats):
        problem = make()
        start = time.perf_counter()
        jac = raijac.compute(problem, out, mode=mode, workers=2, overwrite=True)
        times.append(time.perf_counter() - start)
        chosen = jac.mode
    return times, chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--e2e", action="store_true", help="also time raijac.compute end to end on a warm Ray")
    ap.add_argument("--batched", action="store_true", help="also a per-sample MLP (B=64, 256-1024-256), end to end")
    ap.add_argument("--tmp", default=None, help="existing folder for the Zarr stores (default: the system temp folder)")
    args = ap.parse_args()
    folders.existing_dir(args.tmp, "--tmp")
    tmp = tempfile.mkdtemp(prefix="raijac-chain-", dir=args.tmp)
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: str) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads in this process")
    for n in args.sizes:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.Tanh(), torch.nn.Linear(n, n)).requires_grad_(False)
        x = torch.randn(n)
        problem = raijac.Problem(net, x)
        repeats = 3 if n <= 4096 else 2
        t_jacrev = best(lambda net=net, x=x: torch.func.jacrev(net)(x), repeats)
        row = {"jacrev": t_jacrev}
        for mode in ("chain", "rev"):
            kernel = Kernel(make_target(problem), mode)
            kernel(0, 1, 0, 8)
            row[mode] = best(lambda kernel=kernel, n=n: kernel(0, 1, 0, n), repeats)
        print(
            f"MLP-{n}: jacrev {t_jacrev:.2f} s | kernel chain {row['chain']:.2f} s = {row['chain'] / t_jacrev:.2f}x | "
            f"kernel rev {row['rev']:.2f} s = {row['rev'] / t_jacrev:.2f}x",
            flush=True,
        )
        if args.e2e:
            ensure_ray(tmp)
            w1, b1, w2, b2 = net[0].weight, net[0].bias, net[2].weight, net[2].bias
            variants = {
                "nn.Sequential, chain": (lambda net=net, x=x: raijac.Problem(net, x), "chain"),
                "nn.Sequential, rev": (lambda net=net, x=x: raijac.Problem(net, x), "rev"),
                "custom nn.Module, auto": (lambda net=net, x=x: raijac.Problem(MLP(net), x), "auto"),
                "plain function, auto": (
                    lambda w1=w1, b1=b1, w2=w2, b2=b2, x=x: raijac.Problem(lambda z: torch.tanh(z @ w1.T + b1) @ w2.T + b2, x),
                    "auto",
                ),
            }
            for what, (p, mode) in variants.items():
                times, chosen = e2e(p, mode, tmp, repeats)  # as many as jacrev had
                t = min(times)
                print(
                    f"MLP-{n}: end to end, {what} ({chosen}): best {t:.2f} s = {t / t_jacrev:.2f}x jacrev "
                    f"(runs: {', '.join(f'{r:.2f} s = {r / t_jacrev:.2f}x' for r in times)})",
                    flush=True,
                )
            t_jacrev = best(lambda net=net, x=x: torch.func.jacrev(net)(x), 1)
            print(f"MLP-{n}: jacrev again after the runs: {t_jacrev:.2f} s", flush=True)
    if args.batched:
        ensure_ray(tmp)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 256)).requires_grad_(False)
        xs = torch.randn(64, 256)
        t_ref = best(lambda: torch.func.vmap(torch.func.jacrev(net))(xs), 3)
        for mode in ("chain", "rev", "auto"):
            times, chosen = e2e(lambda: raijac.Problem(net, xs, batched=True), mode, tmp, repeats=2)
            t = min(times)
            print(
                f"per-sample MLP B=64 256-1024-256: end to end {mode} ({chosen}) {t:.2f} s = {t / t_ref:.2f}x vmap(jacrev) ({t_ref:.2f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
