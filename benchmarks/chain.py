"""The chain mode against torch.func.jacrev (issue 6): kernel alone, and end to end on a warm Ray.

An MLP with N = H = M (Linear, tanh, Linear) as an nn.Sequential; jacrev and the kernels run
in this process with the same threads; the end-to-end runs use 2 workers x 1 thread.

    python benchmarks/chain.py [--sizes 4096 8192] [--e2e]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--e2e", action="store_true", help="also time raijac.compute end to end on a warm Ray")
    args = ap.parse_args()
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
            f"kernel rev {row['rev']:.2f} s = {row['rev'] / t_jacrev:.2f}x"
        )
        if args.e2e:
            import ray

            if not ray.is_initialized():
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
                raijac.compute(raijac.Problem(torch.sin, torch.randn(4)), tempfile.mkdtemp() + "/w.zarr", workers=2)
            out = tempfile.mkdtemp() + "/chain.zarr"
            for mode in ("chain", "rev"):
                t = best(lambda mode=mode, p=problem, out=out: raijac.compute(p, out, mode=mode, workers=2, overwrite=True), 1)
                print(f"MLP-{n}: end to end {mode} {t:.2f} s = {t / t_jacrev:.2f}x jacrev")


if __name__ == "__main__":
    main()
