"""The per-block check's cost (NOTE: [block check] in raijac.kernels), two ways.

    python benchmarks/block_check.py blocks mlp-8192 --seeds 1024   # in one process: block vs its check
    python benchmarks/block_check.py e2e mlp-8192 --rounds 2        # raijac.compute with and without

`blocks` times the chosen mode's blocks and each block's check on one thread (a worker's
share of 2 cores); the first check also pays the reference's first backward. `e2e` runs the
whole computation on a local Ray with check_blocks on and off, alternating, and prints the
ratio of medians (noisy on a shared machine: compare with `blocks`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import raijac  # noqa: E402
from benchmarks.problems import BUILDERS  # noqa: E402
from raijac.kernels import Kernel, Reference, block_error, make_target, seed_axis  # noqa: E402
from raijac.probe import resolve_mode  # noqa: E402


def blocks(name: str, seeds: int, n: int = 4) -> None:
    torch.set_num_threads(1)
    problem = BUILDERS[name]().problem()
    mode = resolve_mode(problem, "auto")[0]
    target = make_target(problem)
    kernel, reference = Kernel(target, mode), Reference(target)
    rows = seed_axis(mode) == "rows"
    kernel(0, 1, 0, 2)  # the kernel's one-off costs
    spent = {"block": 0.0, "check": 0.0}
    for s0 in range(0, n * seeds, seeds):
        t0 = time.perf_counter()
        block = kernel(0, 1, s0, s0 + seeds).detach()
        t1 = time.perf_counter()
        err = block_error(target, block, 0, 1, s0, s0 + seeds, rows, seed=s0, reference=reference)
        t2 = time.perf_counter()
        spent["block"] += t1 - t0
        spent["check"] += t2 - t1
        print(f"{name} {mode}: block of {seeds} seeds {t1 - t0:.3f} s, its check {t2 - t1:.3f} s (error {err:.1e})")
    print(f"{name}: check / block = {spent['check'] / spent['block']:.4f} over {n} blocks of {seeds} seeds")


def e2e(name: str, rounds: int) -> None:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    tmp = tempfile.mkdtemp()
    times: dict[bool, list[float]] = {True: [], False: []}
    work: dict[bool, list[float]] = {True: [], False: []}  # the workers' summed compute seconds
    try:
        raijac.compute(BUILDERS[name]().problem(), f"{tmp}/warm.zarr", progress=False, compressor="none")
        for r in range(rounds):
            for check in (False, True) if r % 2 == 0 else (True, False):
                out = f"{tmp}/{check}-{r}.zarr"
                t0 = time.perf_counter()
                jac = raijac.compute(BUILDERS[name]().problem(), out, progress=False, compressor="none", check_blocks=check)
                times[check].append(time.perf_counter() - t0)
                s = jac.summary
                work[check].append(s["compute_seconds"])
                print(
                    f"{name} check={check}: {times[check][-1]:.2f} s, workers computing {s['compute_seconds']:.2f} s "
                    f"(mode {s['mode']}, {s['tiles_computed']} tiles in {s['blocks']} blocks)"
                )
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"{name}: median {on:.2f} s with the check, {off:.2f} s without: ratio {on / off:.3f}")
    won, woff = statistics.median(work[True]), statistics.median(work[False])
    print(f"{name}: workers' compute, median {won:.2f} s with the check, {woff:.2f} s without: ratio {won / woff:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("how", choices=["blocks", "e2e"])
    parser.add_argument("problem", choices=sorted(BUILDERS))
    parser.add_argument("--seeds", type=int, default=1024, help="seeds per block (blocks)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each (e2e)")
    args = parser.parse_args()
    blocks(args.problem, args.seeds) if args.how == "blocks" else e2e(args.problem, args.rounds)
