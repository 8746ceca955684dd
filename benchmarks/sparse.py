#!/usr/bin/env python
"""benchmarks/sparse.py: sparse Jacobians by colouring against dense torch.func.jacrev (the sparse issue).

    python benchmarks/sparse.py                  # bratu N = 8192 (float64 and float32), reaction-diffusion 1000 x 1000 (~2.5 min on 2 cores)
    python benchmarks/sparse.py --quick          # bratu N = 2048, reaction-diffusion 200 x 200, fewer repeats (~40 s)
    python benchmarks/sparse.py --json /tmp/sparse.json --dtypes float64

What one run measures, in this order (one process; the anchors run in this driver with torch's
default threads, raijac on 2 worker processes x 1 thread):

1. A cold `python -m raijac compute examples/sparse_pde.py:reaction_diffusion --out DIR
   --overwrite --json --no-progress` in a subprocess (interpreter, imports, Ray start and stop,
   the 2-D problem with N = 10^6 unknowns); its JSON last line gives raijac's own seconds and
   the sparse figures. The stored J is compared with the analytic `reaction_diffusion_jacobian(u)`.
2. In this process, for the 1-D Bratu stencil (examples/sparse_pde.py, N = 8192, tridiagonal J)
   in each dtype:
   - the pattern and colouring (`raijac.sparsity.choose` on `raijac.sparsity.resolve_pattern(problem)`), timed apart;
   - the coloured kernel alone: `Kernel(make_target(problem), mode, colours)(0, 1, 0, colours)`,
     best of many repeats after a warm-up: one vmapped JVP per colour (3 of them);
   - decompressing that block into a scipy csr_array in this process, timed apart;
   - `torch.func.jacrev(f, chunk_size=c)(x)` for every c in CHUNKS (None = all rows at once),
     best of the repeats each; the best c is the anchor;
   - the naive loop (one forward, one `autograd.grad` per row), stopped after a time limit and
     then extrapolated from the rate of the second half of the rows done (marked `~`, `extrapolated`).
3. Starts one local Ray (`ray.init(address="local", num_cpus=2, include_dashboard=False)`), and
   per dtype runs `raijac.compute(problem, out, overwrite=True)` once to warm up (the worker
   hosts are pooled across calls in one driver), then times it (best of the repeats): everything
   counts (f(x) and fingerprint, colouring, shipping the problem, probes, kernels, Zarr writes,
   decompression). `raijac.open(out).to_scipy()` is timed apart and compared with jacrev's J.
4. On that warm Ray, `raijac.compute(reaction_diffusion(), ...)` in-process, compared with the
   analytic J. Dense jacrev cannot hold this J (10^12 entries, 8 TB in float64): no ratio.

Ratios are raijac seconds / best jacrev seconds (below 1 raijac is faster). The final table lists
each target with PASS / MISS; exit status 1 when a result disagrees with its reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import folders  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import sparse_pde as S  # noqa: E402
import torch  # noqa: E402

import raijac  # noqa: E402
from raijac.kernels import Kernel, make_target  # noqa: E402
from raijac.sparsity import choose  # noqa: E402

CHUNKS = [None, 256, 512, 1024, 2048, 4096, 8192]
TOL = {"float32": 1e-4, "float64": 1e-9}  # max |diff| allowed, relative to max(1, max |J|)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TARGET_KERNEL = 0.01  # coloured kernel / best jacrev
TARGET_E2E = 0.2  # raijac.compute on a warm Ray / best jacrev
TARGET_RD_S = 60.0  # the 2-D N = 10^6 problem, end to end


def log(msg: str = "") -> None:
    print(msg, flush=True)


def best_of(fn, repeats: int) -> tuple[float, list[float], Any]:
    """Best seconds of `repeats` calls (gc first, as in run.py), all timings, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, out


def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f} ms" if t < 0.1 else (f"{t:.3f} s" if t < 10 else f"{t:.1f} s")


def fmt_x(r: float | None) -> str:
    return "-" if r is None else (f"{r:.5f}x" if r < 0.01 else f"{r:.3f}x")


def max_diff_dense(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max()) if got.size else 0.0


def max_diff_sparse(got, ref) -> float:
    d = (sp.csr_array(got) - sp.csr_array(ref)).tocsr()
    return float(np.abs(d.data).max()) if d.nnz else 0.0


def check(diff: float, ref_absmax: float, dtype: str) -> dict[str, Any]:
    tol = TOL[dtype] * max(1.0, ref_absmax)
    return {"max_abs_diff": diff, "ref_absmax": ref_absmax, "tol": tol, "ok": bool(np.isfinite(diff) and diff <= tol)}


def bratu_problem(n: int, dtype: str) -> raijac.Problem:
    p = S.bratu(n)
    if dtype == "float64":
        return p
    return raijac.Problem(S.bratu_residual, p.x.to(DTYPES[dtype]), sparsity=S.tridiagonal(n))


# ====================================================================== 2-D, cold CLI
def rd_spec(grid: int, tmp: str) -> str:
    """The CLI spec of the reaction-diffusion problem: the example's, or a small wrapper for another grid."""
    if grid == 1000:
        return f"{EXAMPLES / 'sparse_pde.py'}:reaction_diffusion"
    path = Path(tmp) / f"rd_{grid}.py"
    path.write_text(
        f"import sys\nsys.path.insert(0, {str(EXAMPLES)!r})\nimport sparse_pde\n\n\n"
        f"def reaction_diffusion():\n    return sparse_pde.reaction_diffusion({grid})\n"
    )
    return f"{path}:reaction_diffusion"


def rd_check(out: str, grid: int) -> dict[str, Any]:
    jac = raijac.open(out)
    t0 = time.perf_counter()
    got = jac.to_scipy()
    t_read = time.perf_counter() - t0
    u = torch.from_numpy(np.asarray(jac.x)).reshape(grid, grid)
    ref = S.reaction_diffusion_jacobian(u)
    res = check(max_diff_sparse(got, ref), float(np.abs(ref.data).max()), "float64")
    res.update(nnz=int(got.nnz), nnz_ref=int(ref.nnz), to_scipy_s=t_read)
    res["ok"] = res["ok"] and got.shape == ref.shape
    return res


def rd_cold(grid: int, tmp: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = os.path.join(tmp, "rd-cold.zarr")
    cmd = [sys.executable, "-m", "raijac", "compute", rd_spec(grid, tmp), "--out", out, "--overwrite", "--json", "--no-progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - t0
    res: dict[str, Any] = {"command": " ".join(shlex.quote(c) for c in cmd), "seconds": wall, "rc": proc.returncode}
    if proc.returncode:
        res["stderr"] = proc.stderr.strip()[-600:]
        log(f"   cold CLI FAILED (rc {proc.returncode}): {res['stderr']}")
        return res
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(inner_seconds=s.get("seconds"), sparse=s.get("sparse"), mode=s.get("mode"), workers=s.get("workers"))
    res["check"] = rd_check(out, grid)
    shutil.rmtree(out, ignore_errors=True)
    return res


# ====================================================================== 1-D, in process
def naive_loop(f, x: torch.Tensor, limit_s: float, min_rows: int = 64) -> dict[str, Any]:
    """One forward, one autograd.grad per row; stops after `limit_s` and extrapolates from the second half's rate."""
    gc.collect()
    t0 = time.perf_counter()
    z = x.detach().clone().requires_grad_(True)
    y = f(z).reshape(-1)
    total, rows, stamps = y.numel(), [], []
    for i in range(total):
        (g,) = torch.autograd.grad(y[i], z, retain_graph=True)
        rows.append(g.reshape(-1))
        stamps.append(time.perf_counter() - t0)
        if i + 1 >= min_rows and stamps[-1] > limit_s:
            break
    done, elapsed = len(rows), stamps[-1]
    if done == total:
        seconds = elapsed
    else:
        half = done // 2
        seconds = stamps[half - 1] + (elapsed - stamps[half - 1]) / (done - half) * (total - half)
    return {"seconds": seconds, "measured_s": elapsed, "rows": done, "total_rows": total, "J": torch.stack(rows)}


def bratu_in_process(n: int, dtype: str, cfg: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
    res: dict[str, Any] = {"n": n, "dtype": dtype}
    problem = bratu_problem(n, dtype)
    t0 = time.perf_counter()
    pattern = raijac.sparsity.resolve_pattern(problem)
    res["pattern_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    colouring, _ = choose(pattern)
    res["colouring_s"] = time.perf_counter() - t0
    res.update(nnz=pattern.nnz, colours=colouring.n_colours, mode=colouring.mode, colouring=colouring.method)
    colours = torch.from_numpy(colouring.colours).long()
    kernel = Kernel(make_target(problem), colouring.mode, colours=colours)
    k = colouring.n_colours
    kernel(0, 1, 0, k)  # warm-up
    res["kernel_s"], res["kernel_all_s"], block = best_of(lambda: kernel(0, 1, 0, k), cfg["kernel_reps"])

    def decompress() -> sp.csr_array:
        b = block[0].numpy()  # (M, k) for fwd, (k, N) for rev
        if colouring.axis == "cols":
            vals = b[pattern.rows, colouring.colours[pattern.cols]]
        else:
            vals = b[colouring.colours[pattern.rows], pattern.cols]
        return sp.csr_array((vals, pattern.cols, pattern.row_ptr()), shape=pattern.shape)

    res["decompress_s"], _, j_kernel = best_of(decompress, cfg["kernel_reps"])
    log(
        f"   {dtype}: pattern {fmt_s(res['pattern_s'])}, colouring {fmt_s(res['colouring_s'])} -> {k} colours "
        f"({colouring.method}), {res['mode']}; kernel {fmt_s(res['kernel_s'])}, decompress {fmt_s(res['decompress_s'])}"
    )

    f, x = problem.f, problem.x
    torch.func.jacrev(f)(x[:64].clone())  # warm-up: functorch's first call sets up its dispatch
    chunks = [c for c in CHUNKS if c is None or c <= n]
    times: dict[str, list[float]] = {str(c): [] for c in chunks}
    j_ref = None
    for rnd in range(cfg["jacrev_reps"]):
        # Rounds, so drift hits every chunk size alike; after the first, only chunk sizes within
        # 2x of the best so far run again (the others cannot win).
        lead = min(min(v) for v in times.values()) if rnd else None
        for c in chunks:
            if lead is not None and min(times[str(c)]) > 2 * lead:
                continue
            t, _, j = best_of(lambda c=c: torch.func.jacrev(f, chunk_size=c)(x), 1)
            times[str(c)].append(t)
            if j_ref is None:
                j_ref = j.numpy()
            del j
    sweep = {c: min(v) for c, v in times.items()}
    for c, v in times.items():
        log(f"   {dtype}: jacrev chunk_size={c}: best {fmt_s(sweep[c])} of {', '.join(f'{t:.3f}' for t in v)} s")
    best_chunk = min(sweep, key=sweep.get)
    res.update(jacrev_sweep=sweep, jacrev_times=times, jacrev_best_chunk=best_chunk, jacrev_s=sweep[best_chunk])
    ref_absmax = float(np.abs(j_ref).max())
    res["check_kernel"] = check(max_diff_dense(j_kernel.toarray(), j_ref), ref_absmax, dtype)

    if cfg["loop_limit_s"] > 0:
        loop = naive_loop(f, x, cfg["loop_limit_s"])
        done = loop["rows"]
        res["loop"] = {k2: v for k2, v in loop.items() if k2 != "J"}
        res["check_loop"] = check(max_diff_dense(loop["J"].numpy(), j_ref[:done]), ref_absmax, dtype)
        how = "all rows" if done == loop["total_rows"] else f"extrapolated from {done} of {loop['total_rows']} rows"
        log(f"   {dtype}: naive loop {fmt_s(loop['seconds'])} ({how}, {fmt_s(loop['measured_s'])} measured)")
    return res, j_ref


# ====================================================================== on a warm Ray
def bratu_e2e(n: int, dtype: str, j_ref: np.ndarray, res: dict[str, Any], cfg: dict[str, Any], tmp: str) -> None:
    out = os.path.join(tmp, f"bratu-{dtype}.zarr")
    t0 = time.perf_counter()
    raijac.compute(bratu_problem(n, dtype), out, overwrite=True, progress=False)  # warm-up: ships this problem's code
    res["e2e_first_s"] = time.perf_counter() - t0
    runs = []

    def one():
        jac = raijac.compute(bratu_problem(n, dtype), out, overwrite=True, progress=False)  # a fresh Problem per call
        runs.append(jac.summary)
        return jac

    res["e2e_s"], res["e2e_all_s"], jac = best_of(one, cfg["e2e_reps"])
    best = runs[int(np.argmin(res["e2e_all_s"]))]
    res["e2e_summary"] = {k: best.get(k) for k in ("mode", "seconds", "compute_seconds", "write_seconds", "workers", "sparse")}
    t0 = time.perf_counter()
    got = raijac.open(out).to_scipy()
    res["to_scipy_s"] = time.perf_counter() - t0
    res["check_e2e"] = check(max_diff_dense(got.toarray(), j_ref), float(np.abs(j_ref).max()), dtype)
    shutil.rmtree(out, ignore_errors=True)
    sparse = best.get("sparse") or {}
    log(
        f"   {dtype}: raijac.compute first (warm-up) {fmt_s(res['e2e_first_s'])}, then best {fmt_s(res['e2e_s'])} of "
        f"{', '.join(f'{v:.2f}' for v in res['e2e_all_s'])} s (kernels {best.get('compute_seconds')} s summed over "
        f"{best.get('workers')} workers, decompress {sparse.get('decompress_seconds')} s); to_scipy {fmt_s(res['to_scipy_s'])}"
    )


def rd_warm(grid: int, cfg: dict[str, Any], tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, "rd-warm.zarr")
    runs = []

    def one():
        jac = raijac.compute(S.reaction_diffusion(grid), out, overwrite=True, progress=False)
        runs.append(jac.summary)
        return jac

    t, times, _ = best_of(one, cfg["rd_reps"])
    best = runs[int(np.argmin(times))]
    res = {
        "seconds": t,
        "all_s": times,
        "summary": {k: best.get(k) for k in ("mode", "seconds", "compute_seconds", "workers", "sparse")},
    }
    res["check"] = rd_check(out, grid)
    shutil.rmtree(out, ignore_errors=True)
    return res


# ====================================================================== report
def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "MISS")


def fmt_bytes(b: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def report_tables(report: dict[str, Any]) -> tuple[str, bool]:
    rows, all_ok = [], True

    def diff_row(problem: str, what: str, c: dict[str, Any] | None, extra: str = "") -> None:
        nonlocal all_ok
        if c:
            all_ok &= c["ok"]
            measured = f"{c['max_abs_diff']:.3g} (max |J| {c['ref_absmax']:.3g}{extra})"
            rows.append([problem, what, measured, f"<= {c['tol']:.2g}", "PASS" if c["ok"] else "FAIL"])

    for r in report["bratu"]:
        name = f"bratu-{r['n']} {r['dtype']}"
        jr = r["jacrev_s"]
        swept = len(r["jacrev_sweep"])
        rows.append([name, f"best jacrev: chunk_size={r['jacrev_best_chunk']} (of {swept} swept)", fmt_s(jr), "", ""])
        ratio = r["kernel_s"] / jr
        k = r["colours"]
        rows.append(
            [
                name,
                f"coloured kernel alone ({k} JVPs) / jacrev",
                f"{fmt_s(r['kernel_s'])} = {fmt_x(ratio)}",
                f"<= {TARGET_KERNEL}x",
                verdict(ratio <= TARGET_KERNEL),
            ]
        )
        rows.append([name, "decompress to scipy csr, in process", fmt_s(r["decompress_s"]), "", ""])
        in_proc = r["pattern_s"] + r["colouring_s"] + r["kernel_s"] + r["decompress_s"]
        rows.append(
            [name, "pattern + colouring + kernel + decompress / jacrev", f"{fmt_s(in_proc)} = {fmt_x(in_proc / jr)}", "", ""]
        )
        if "e2e_s" in r:
            ratio = r["e2e_s"] / jr
            rows.append(
                [
                    name,
                    "raijac.compute, warm Ray / jacrev",
                    f"{fmt_s(r['e2e_s'])} = {fmt_x(ratio)}",
                    f"<= {TARGET_E2E}x",
                    verdict(ratio <= TARGET_E2E),
                ]
            )
        loop = r.get("loop")
        if loop:
            full = loop["rows"] == loop["total_rows"]
            what = "naive loop / jacrev" + ("" if full else f" (EXTRAPOLATED from {loop['rows']} of {loop['total_rows']} rows)")
            rows.append([name, what, f"{'' if full else '~'}{fmt_s(loop['seconds'])} = {fmt_x(loop['seconds'] / jr)}", "", ""])
        diff_row(name, "max |kernel J - jacrev J|", r.get("check_kernel"))
        diff_row(name, "max |raijac.compute J - jacrev J|", r.get("check_e2e"))
        if loop:
            diff_row(name, f"max |naive loop J - jacrev J| ({loop['rows']} rows)", r.get("check_loop"))
    rd = report.get("rd") or {}
    g = report["config"]["grid"]
    name = f"reaction-diffusion {g}x{g}"
    cold, warm = rd.get("cold"), rd.get("warm")
    if cold or warm:
        n = g * g
        rows.append([name, f"dense jacrev: J is {n} x {n}, {fmt_bytes(n * n * 8)} in float64", "not run: no ratio", "", ""])
    if cold:
        if cold["rc"]:
            all_ok = False
            rows.append([name, "cold CLI subprocess, end to end", f"FAILED rc {cold['rc']}", f"< {TARGET_RD_S:.0f} s", "FAIL"])
        else:
            info = cold.get("sparse") or {}
            what = f"cold CLI subprocess, end to end ({info.get('colours')} colours; raijac's own {cold['inner_seconds']:.1f} s)"
            rows.append([name, what, fmt_s(cold["seconds"]), f"< {TARGET_RD_S:.0f} s", verdict(cold["seconds"] < TARGET_RD_S)])
            c = cold["check"]
            diff_row(name, "cold: max |J - reaction_diffusion_jacobian(u)|", c, f", nnz {c['nnz']} vs {c['nnz_ref']}")
    if warm:
        rows.append(
            [
                name,
                "raijac.compute in process, warm Ray",
                fmt_s(warm["seconds"]),
                f"< {TARGET_RD_S:.0f} s",
                verdict(warm["seconds"] < TARGET_RD_S),
            ]
        )
        c = warm["check"]
        diff_row(name, "warm: max |J - reaction_diffusion_jacobian(u)|", c, f", nnz {c['nnz']} vs {c['nnz_ref']}")
    return table(["problem", "what", "measured", "target", "result"], rows), all_ok


# ====================================================================== main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="bratu N = 2048, grid 200 x 200, fewer repeats: a smoke run")
    ap.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write every figure to PATH as JSON")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float64", "float32"])
    ap.add_argument("--n", type=int, default=None, help="bratu size (default 8192, --quick 2048)")
    ap.add_argument("--grid", type=int, default=None, help="reaction-diffusion grid side (default 1000, --quick 200)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold CLI subprocess")
    ap.add_argument("--tmp", default=None, help="existing folder for the temporary Zarr stores (default: the system temp)")
    args = ap.parse_args()
    folders.existing_dir(args.tmp, "--tmp")
    folders.file_in_existing_dir(args.json_path, "--json")  # written at the end: checked before the run
    cfg: dict[str, Any] = {
        "n": args.n or (2048 if args.quick else 8192),
        "grid": args.grid or (200 if args.quick else 1000),
        "dtypes": args.dtypes,
        "kernel_reps": 10 if args.quick else 30,
        "jacrev_reps": 1 if args.quick else 2,
        "e2e_reps": 2 if args.quick else 3,
        "rd_reps": 1 if args.quick else 2,
        "loop_limit_s": 2.0 if args.quick else 10.0,
        "quick": args.quick,
    }
    report: dict[str, Any] = {
        "config": cfg,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "raijac": raijac.__version__,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        },
        "bratu": [],
        "rd": {},
    }
    m = report["machine"]
    log(f"torch {m['torch']}, {m['torch_threads']} threads in this process, {m['cores']} cores; load {m['loadavg_start']}")
    tmp = tempfile.mkdtemp(prefix="raijac-sparse-", dir=args.tmp)
    started = time.perf_counter()
    try:
        if not args.no_cold:
            log(f"cold CLI, reaction-diffusion {cfg['grid']}x{cfg['grid']} (before this process starts Ray)")
            cold = rd_cold(cfg["grid"], tmp)
            report["rd"]["cold"] = cold
            log(f"   {cold['command']}")
            if not cold["rc"]:
                log(f"   {fmt_s(cold['seconds'])} wall, raijac's own {cold['inner_seconds']} s; sparse {cold['sparse']}")
        refs = {}
        for dtype in cfg["dtypes"]:
            log(f"bratu N = {cfg['n']} {dtype}, in this process")
            res, refs[dtype] = bratu_in_process(cfg["n"], dtype, cfg)
            report["bratu"].append(res)

        import ray
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(S)  # workers cannot import examples/sparse_pde.py by name
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        for res in report["bratu"]:
            log(f"bratu N = {cfg['n']} {res['dtype']}, raijac.compute on the warm Ray")
            bratu_e2e(cfg["n"], res["dtype"], refs.pop(res["dtype"]), res, cfg, tmp)
        log(f"reaction-diffusion {cfg['grid']}x{cfg['grid']}, raijac.compute in process on the warm Ray")
        warm = rd_warm(cfg["grid"], cfg, tmp)
        report["rd"]["warm"] = warm
        log(f"   best {fmt_s(warm['seconds'])} of {', '.join(f'{v:.2f}' for v in warm['all_s'])} s; {warm['summary']}")
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    report["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    text, ok = report_tables(report)
    log(f"\nsparse targets ({report['seconds']:.0f} s run; load 1m {m['loadavg_start'][0]} -> {m['loadavg_end'][0]})\n")
    log(text)
    if (cfg["n"], cfg["grid"]) != (8192, 1000):
        log(f"\n(the targets are set for bratu N = 8192 and a 1000 x 1000 grid; this run used {cfg['n']} and {cfg['grid']})")
    if not ok:
        log("\n!!!! a result disagreed with its reference (FAIL above)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=1, default=str))
        log(f"\nwrote {args.json_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
