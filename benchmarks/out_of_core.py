"""Out-of-core check (issue 4): a 1 GiB Jacobian (16384 x 16384) under --memory-budget 128MB
with 2 workers, against an unconstrained run of the same problem in the same process.

Prints each run's seconds, tiles, and the largest growth of a worker's peak RSS above the
idle worker holding the problem (read by the workers from /proc), as a ratio of the budget.

    python benchmarks/out_of_core.py [--n 16384] [--budget 128MB] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import folders
import torch

import raijac
from raijac.planner import parse_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--budget", default="128MB")
    ap.add_argument("--tmp", default=None, help="existing folder for the Zarr stores (default: the system temp folder)")
    args = ap.parse_args()
    folders.existing_dir(args.tmp, "--tmp")
    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    torch.manual_seed(0)
    n = args.n
    w = torch.randn(n, n) / n**0.5
    problem = raijac.Problem(lambda x: torch.tanh(x @ w), torch.randn(n))
    tmp = tempfile.mkdtemp(prefix="raijac-ooc-", dir=args.tmp)
    raijac.compute(raijac.Problem(torch.sin, torch.randn(4)), f"{tmp}/warm.zarr", workers=2)  # start the hosts
    results = {}
    for label, budget in (("unconstrained", None), (args.budget, args.budget)):
        start = time.perf_counter()
        jac = raijac.compute(problem, f"{tmp}/{label}.zarr", mode="rev", workers=2, memory_budget=budget, overwrite=True)
        seconds = time.perf_counter() - start
        s = jac.summary
        results[label] = seconds
        growth = s["peak_rss_growth"] or 0
        ratio = f"{growth / parse_size(budget):.2f}x the budget" if budget else "-"
        print(
            f"{label:>14}: {seconds:7.1f} s, {s['tiles_total']} tiles, {s['bytes'] / 2**30:.2f} GiB written, "
            f"peak RSS growth {growth / 2**20:.0f} MiB ({ratio}), compressor {jac.meta['compressor']}"
        )
        shutil.rmtree(f"{tmp}/{label}.zarr")
    print(f"throughput under {args.budget}: {results['unconstrained'] / results[args.budget]:.2f} of unconstrained")
    shutil.rmtree(tmp)
    ray.shutdown()


if __name__ == "__main__":
    main()
