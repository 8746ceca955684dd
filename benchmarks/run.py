#!/usr/bin/env python
"""benchmarks/run.py: raijac end to end against in-memory torch anchors, in one process, on a warm Ray (issue 4).

    python benchmarks/run.py                 # the default run: every problem, MLP-8192 included (~15 min on 2 cores)
    python benchmarks/run.py --quick         # small problems, fewer repeats (~3 min)
    python benchmarks/run.py --only mlp-1000 zarr fixed
    python benchmarks/run.py --out /tmp/bench --tmp /scratch
    python benchmarks/run.py --out benchmarks    # replace the committed results, deliberately

One process: machine and versions are recorded, a cold `raijac compute` CLI subprocess is
timed, then ONE local Ray is started and warmed (its pooled worker hosts started by a tiny
run), and every problem is timed with the anchors (torch.func, autograd.functional.jacobian,
the naive row loop, the repeat trick) in this driver and with `raijac.compute` in each mode
on the warm Ray; every result is checked against the torch.func anchor. Tables go to stdout,
RESULTS.md, results.json and results.png in --out (default ~/.cache/raijac-bench, outside the
tree: committing results is a deliberate copy). See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import folders  # noqa: E402
import numpy as np  # noqa: E402
import problems as P  # noqa: E402
import torch  # noqa: E402

import raijac  # noqa: E402

MODES = ["auto", "rev", "fwd", "rev-repeat", "fwd-repeat", "chain"]  # chain: where f is a chain (raijac.peel)
WORKERS = 2
ANCHORS = ["torch.func", "afj", "loop", "repeat"]
EXTRA = ["fixed", "zarr"]  # --only names that are not problems
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # max |diff| allowed, relative to max(1, max |J|)
MiB = float(1 << 20)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ====================================================================== machine
def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, val = line.split(":", 1)
                if key in ("MemTotal", "MemAvailable"):
                    mem[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(mem.get("MemTotal", 0) / 2**30, 1),
        "ram_available_gib": round(mem.get("MemAvailable", 0) / 2**30, 1),
        "platform": platform.platform(),
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    import numcodecs
    import ray
    import zarr

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "raijac": raijac.__version__,
    }
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        out["matplotlib"] = "not installed"
    return out


def git_state() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "raijac"], cwd=HERE, capture_output=True, text=True).stdout
        return f"{rev}{' + uncommitted changes in raijac/' if dirty.strip() else ''}" if rev else "?"
    except OSError:
        return "?"


def fs_type(path: str) -> str:
    """The mount type holding `path` (longest matching mount point in /proc/mounts)."""
    best, kind = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if (
                    len(parts) >= 3
                    and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/"))
                    and len(parts[1]) > len(best)
                ):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return f"{kind} ({best})" if best else kind


# ====================================================================== helpers
def timed(fn) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(got: np.ndarray | torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max |got - ref| against the dtype tolerance, relative to max(1, max |ref|)."""
    g = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got.detach()
    if tuple(g.shape) != tuple(ref.shape):
        return {"ok": False, "why": f"shape {tuple(g.shape)} != {tuple(ref.shape)}", "diff": float("nan")}
    finite = bool(torch.isfinite(g).all())
    diff = float((g.to(ref.dtype) - ref).abs().max()) if g.numel() else 0.0
    scale = max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)
    tol = TOL.get(ref.dtype, 1e-3) * scale
    ok = finite and diff <= tol
    why = "" if ok else ("non-finite entries" if not finite else f"max |diff| {diff:.2e} > tol {tol:.1e}")
    return {"ok": ok, "why": why, "diff": diff, "tol": tol}


def rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ====================================================================== anchors
def anchor_torchfunc(b: P.Bench) -> torch.Tensor:
    if b.batched:
        j = torch.func.vmap(torch.func.jacrev(b.f))(b.x)
    elif b.n_out <= b.n_in:
        j = torch.func.jacrev(b.f)(b.x)
    else:
        j = torch.func.jacfwd(b.f)(b.x)
    return j.reshape(b.jac_shape)


def torchfunc_name(b: P.Bench) -> str:
    return "vmap(jacrev)" if b.batched else ("jacrev" if b.n_out <= b.n_in else "jacfwd")


def anchor_afj(b: P.Bench, notes: list[str] | None = None) -> torch.Tensor:
    """torch.autograd.functional.jacobian(vectorize=True); batched: of the sum over samples (no cross blocks).

    Forward-mode strategy when M > N; where torch refuses it, reverse-mode (said in the notes).
    """
    from torch.autograd.functional import jacobian

    f = (lambda x: b.f(x).sum(0)) if b.batched else b.f

    def run(strategy: str) -> torch.Tensor:
        j = jacobian(f, b.x, vectorize=True, strategy=strategy)
        if b.batched:
            return j.reshape(b.n_out, b.batch, b.n_in).transpose(0, 1)  # (*out, B, *in) -> (B, M, N)
        return j.reshape(b.jac_shape)

    if b.n_out > b.n_in:
        try:
            return run("forward-mode")
        except RuntimeError as exc:
            if notes is not None and not any(n.startswith("afj") for n in notes):
                first = str(exc).strip().splitlines()[0][:160]
                notes.append(f"afj: torch refused strategy='forward-mode' ({first}); timed with reverse-mode")
    return run("reverse-mode")


def repeat_bytes(b: P.Bench) -> int:
    """Rough peak of the repeat trick: M stacked copies of inputs, outputs, seeds and grads (x4 for activations)."""
    return 4 * b.x.element_size() * b.n_out * (b.batch or 1) * (b.n_in + b.n_out) * 2


def anchor_repeat(b: P.Bench) -> torch.Tensor:
    """Stack x M times, one autograd.grad with the identity as grad_outputs."""
    m, x = b.n_out, b.x.detach()
    if b.batched:
        z = x.repeat(m, *([1] * (x.ndim - 1))).requires_grad_(True)  # (M*B, *in), copy-major
        y = b.f(z)
        seeds = torch.eye(m, dtype=y.dtype)[:, None, :].expand(m, b.batch, m).reshape(y.shape)
        (g,) = torch.autograd.grad(y, z, seeds)
        return g.reshape(m, b.batch, b.n_in).transpose(0, 1)
    z = x.unsqueeze(0).repeat(m, *([1] * x.ndim)).requires_grad_(True)
    y = b.f(z)
    (g,) = torch.autograd.grad(y, z, torch.eye(m, dtype=y.dtype).reshape(y.shape))
    return g.reshape(m, b.n_in)


def anchor_loop(b: P.Bench, limit_s: float, min_rows: int = 16) -> dict[str, Any]:
    """One autograd.grad per row of J (per sample and row when batched), after one forward pass.

    Stops after `limit_s`; the rest is extrapolated from the rate of the second half of the
    rows done (the first rows carry warm-up).
    """
    gc.collect()
    t0 = time.perf_counter()
    z = b.x.detach().clone().requires_grad_(True)
    y = b.f(z).reshape(-1)
    total = y.numel()
    rows, stamps = [], []
    for i in range(total):
        (g,) = torch.autograd.grad(y[i], z, retain_graph=True)
        rows.append(g[i // b.n_out].reshape(-1) if b.batched else g.reshape(-1))
        stamps.append(time.perf_counter() - t0)
        if i + 1 >= min_rows and stamps[-1] > limit_s:
            break
    elapsed = stamps[-1]
    done = len(rows)
    if done == total:
        seconds = elapsed
    else:
        half = done // 2
        rate = (elapsed - stamps[half - 1]) / (done - half)
        seconds = stamps[half - 1] + rate * (total - half)
    return {"seconds": seconds, "measured_s": elapsed, "rows": done, "total_rows": total, "J": torch.stack(rows)}


# ====================================================================== raijac
def run_raijac(b: P.Bench, mode: str, out: str) -> tuple[float, Any]:
    problem = b.problem()  # fresh, so f(x) is evaluated inside the call as on a user's first call
    return timed(lambda: raijac.compute(problem, out, mode=mode, workers=WORKERS, overwrite=True, progress=False))


def summary_of(jac: Any) -> dict[str, Any]:
    s = dict(getattr(jac, "summary", None) or {})
    keep = (
        "mode",
        "seconds",
        "compute_seconds",
        "write_seconds",
        "tiles_total",
        "workers",
        "bytes",
        "peak_rss_growth",
        "tiles_by_worker",
        "reason",
    )
    out = {k: s.get(k) for k in keep}
    meta = getattr(jac, "meta", None) or {}
    out["compressor"] = meta.get("compressor")  # the codec the run wrote with (auto picks by a sample block)
    return out


def preflight_seconds(b: P.Bench) -> dict[str, float] | None:
    """Driver-side pre-flight of an auto run, timed apart: f(x) + fingerprint, and the triage (internal API; None if it moved)."""
    try:
        from raijac.probe import resolve_mode

        problem = b.problem()
        t_fp, _ = timed(lambda: problem.fingerprint(mode="auto", dtype="float32"))
        t_tr, _ = timed(lambda: resolve_mode(problem, "auto"))
        return {"fingerprint_s": t_fp, "triage_s": t_tr}
    except Exception:
        return None


# ====================================================================== one problem
def bench_problem(b: P.Bench, cfg: dict[str, Any], tmp: str) -> dict[str, Any]:
    reps = cfg["reps"][b.size]
    rep_budget = cfg["rep_budget_s"]
    res: dict[str, Any] = {
        "name": b.name,
        "what": b.what,
        "shape": list(b.jac_shape),
        "mib": b.jac_bytes / MiB,
        "torch_func": torchfunc_name(b),
        "times": {},  # method -> list of seconds
        "checks": {},  # method -> compare() dict
        "errors": {},
        "notes": [],
        "summaries": {},  # raijac mode -> summary of its fastest run
        "loadavg_before": round(os.getloadavg()[0], 2),
    }
    log(f"\n== {b.name}: {b.what}; J {' x '.join(map(str, b.jac_shape))} ({b.jac_bytes / MiB:.1f} MiB), up to {reps} repeats")
    avail = _mem_available()
    methods = ["torch.func", "afj", "repeat"] + [f"raijac:{m}" for m in MODES]
    if repeat_bytes(b) > 0.4 * avail:
        res["notes"].append(
            f"repeat trick skipped: needs ~{repeat_bytes(b) / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available"
        )
        methods.remove("repeat")
    from raijac.chain import chain_stages

    if "raijac:chain" in methods and chain_stages(b.problem()) is None:
        methods.remove("raijac:chain")
        res["notes"].append(
            "chain: f is not a chain of stages (raijac.peel finds no linear layer at its end), so no chain column"
        )
    ref: torch.Tensor | None = None

    def record(method: str, seconds: float, got: Any) -> None:
        res["times"].setdefault(method, []).append(seconds)
        if method not in res["checks"] and ref is not None and got is not None:
            res["checks"][method] = compare(got, ref)

    anchors = [m for m in methods if not m.startswith("raijac:")]
    modes = [m for m in methods if m.startswith("raijac:")]
    for rep in range(reps):
        k = rep % len(modes)  # raijac's modes take turns at running first after the anchors
        for method in anchors + modes[k:] + modes[:k]:
            past = res["times"].get(method, [])
            if method in res["errors"] or (rep > 0 and sum(past) + (past[-1] if past else 0) > rep_budget):
                continue
            try:
                if method == "torch.func":
                    t, j = timed(lambda: anchor_torchfunc(b))
                    if ref is None:
                        ref = j.detach().contiguous()
                    record(method, t, j)
                    del j
                    if rep == 0:  # the loop once, right after the reference exists
                        loop = anchor_loop(b, cfg["loop_limit_s"])
                        res["loop"] = {k: v for k, v in loop.items() if k != "J"}
                        res["times"]["loop"] = [loop["seconds"]]
                        if b.batched:
                            idx = torch.arange(loop["rows"])
                            part = ref[idx // b.n_out, idx % b.n_out]
                        else:
                            part = ref[: loop["rows"]]
                        res["checks"]["loop"] = compare(loop["J"], part)
                        del loop
                elif method == "afj":
                    t, j = timed(lambda: anchor_afj(b, res["notes"]))
                    record(method, t, j)
                    del j
                elif method == "repeat":
                    t, j = timed(lambda: anchor_repeat(b))
                    record(method, t, j)
                    del j
                else:
                    mode = method.split(":", 1)[1]
                    out = os.path.join(tmp, f"{b.name}-{mode}-{rep}.zarr")
                    try:
                        t, jac = run_raijac(b, mode, out)
                        best = min(res["times"].get(method, [math.inf]))
                        check = method not in res["checks"]
                        record(method, t, None)
                        if check:
                            res["checks"][method] = compare(jac.numpy(), ref)
                        if t <= best:
                            res["summaries"][mode] = summary_of(jac)
                        del jac
                    finally:
                        rmtree(out)
            except Exception as exc:
                res["errors"][method] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                res["checks"][method] = {"ok": False, "why": res["errors"][method], "diff": float("nan")}
                log(f"   !! {method} FAILED: {res['errors'][method]}")
                if cfg.get("debug"):
                    traceback.print_exc()
            gc.collect()
        line = "  ".join(
            f"{m.replace('raijac:', '')}={res['times'][m][-1]:.3f}" for m in methods if len(res["times"].get(m, [])) > rep
        )
        if rep == 0 and "loop" in res:
            lp = res["loop"]
            line += f"  loop={lp['seconds']:.3f}" + (
                "" if lp["rows"] == lp["total_rows"] else f" (~, {lp['rows']}/{lp['total_rows']} rows)"
            )
        if line:
            log(f"   rep {rep}: {line}")
    res["preflight"] = preflight_seconds(b)
    res["loadavg_after"] = round(os.getloadavg()[0], 2)
    res["best"] = {m: min(ts) for m, ts in res["times"].items() if ts}
    bad = {m: c["why"] for m, c in res["checks"].items() if not c["ok"]}
    res["failures"] = bad
    for m, why in bad.items():
        log(f"   !!!! CHECK FAILED: {m}: {why}")
    ref = None
    gc.collect()
    return res


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def derive(res: dict[str, Any]) -> None:
    """Ratios: raijac / best anchor, auto / fastest raijac mode, speed-up over the naive loop."""
    best = res["best"]
    ok = lambda m: m in best and res["checks"].get(m, {"ok": True})["ok"]  # noqa: E731
    loop_exact = "loop" in res and res["loop"]["rows"] == res["loop"]["total_rows"]
    anchors = [m for m in ANCHORS if ok(m) and (m != "loop" or loop_exact)]
    res["best_anchor"] = min(anchors, key=lambda m: best[m]) if anchors else None
    modes = [m for m in MODES if m != "auto" and ok(f"raijac:{m}")]
    res["fastest_mode"] = min(modes, key=lambda m: best[f"raijac:{m}"]) if modes else None
    ba = best.get(res["best_anchor"]) if res["best_anchor"] else None
    auto = best.get("raijac:auto") if ok("raijac:auto") else None
    fm = best.get(f"raijac:{res['fastest_mode']}") if res["fastest_mode"] else None
    raijac_best = min([t for t in (auto, fm) if t is not None], default=None)
    res["ratio_auto_anchor"] = auto / ba if auto and ba else None
    res["ratio_best_anchor"] = raijac_best / ba if raijac_best and ba else None
    res["ratio_auto_fastest"] = auto / fm if auto and fm else None
    # The same ratio from medians over the rounds: auto often runs the very code of the
    # fastest mode, and a best-of ratio then measures which of the two had the luckiest run.
    med = {
        m: float(np.median(res["times"][f"raijac:{m}"])) for m in MODES if ok(f"raijac:{m}") and res["times"].get(f"raijac:{m}")
    }
    fastest_med = min((m for m in modes if m in med), key=lambda m: med[m], default=None)
    res["fastest_mode_median"] = fastest_med
    res["ratio_auto_fastest_median"] = med["auto"] / med[fastest_med] if "auto" in med and fastest_med else None
    res["ratio_auto_torchfunc"] = auto / best["torch.func"] if auto and ok("torch.func") else None
    res["speedup_loop"] = best["loop"] / auto if auto and "loop" in best else None
    res["auto_mode"] = (res["summaries"].get("auto") or {}).get("mode")


# ====================================================================== fixed costs
def cold_cli(tmp: str, reps: int) -> dict[str, Any]:
    """`raijac compute` on the tiny problem in a fresh process: interpreter, imports, Ray start and shutdown."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = []
    for i in range(reps):
        out = os.path.join(tmp, f"cold-{i}.zarr")
        cmd = [
            sys.executable,
            "-m",
            "raijac",
            "compute",
            f"{HERE / 'problems.py'}:tiny",
            "--out",
            out,
            "--overwrite",
            "--no-progress",
            "--json",
            "--workers",
            str(WORKERS),
        ]
        t, proc = timed(lambda cmd=cmd: subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp))
        inner = None
        try:
            inner = json.loads(proc.stdout.strip().splitlines()[-1]).get("seconds")
        except Exception:
            pass
        runs.append(
            {
                "seconds": t,
                "rc": proc.returncode,
                "inner_seconds": inner,
                "stderr": proc.stderr.strip()[-300:] if proc.returncode else "",
            }
        )
        log(f"   cold CLI run {i}: {t:.2f} s (rc {proc.returncode}, raijac's own 'seconds' {inner})")
        rmtree(out)
    return {
        "runs": runs,
        "best": min((r["seconds"] for r in runs if r["rc"] == 0), default=None),
        "command": " ".join(shlex.quote(c) for c in cmd),
    }


RAY_FLOOR = """
import ray, torch
ray.init(address="local", num_cpus={cpus}, include_dashboard=False, logging_level="ERROR")

@ray.remote(num_cpus=1)
class Host:
    def __init__(self):
        import torch  # noqa: F401  (what a raijac worker host imports first)

    def ping(self):
        return 1

ray.get([h.ping.remote() for h in [Host.remote() for _ in range({workers})]])
ray.shutdown()
"""


def ray_floor(tmp: str, reps: int) -> dict[str, Any]:
    """Ray's own share of a cold CLI run, with no raijac code: a fresh process that imports
    torch and ray, starts a local Ray, starts one torch-importing actor per worker and shuts
    Ray down. A cold `raijac compute` cannot be faster than this on the same machine."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    code = RAY_FLOOR.format(cpus=os.cpu_count(), workers=WORKERS)
    runs = []
    for i in range(reps):
        t, proc = timed(lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp))
        runs.append({"seconds": t, "rc": proc.returncode, "stderr": proc.stderr.strip()[-300:] if proc.returncode else ""})
        log(f"   Ray floor run {i}: {t:.2f} s (rc {proc.returncode})")
    return {"runs": runs, "best": min((r["seconds"] for r in runs if r["rc"] == 0), default=None)}


def warm_up(tmp: str) -> dict[str, Any]:
    """The first raijac call on the fresh Ray (starts the pooled worker hosts); its f records each process's torch threads."""
    folder = os.path.join(tmp, "threads")
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(tmp, "warmup.zarr")
    t, jac = timed(lambda: raijac.compute(P.thread_probe(folder), out, workers=WORKERS, overwrite=True, progress=False))
    del jac
    rmtree(out)
    seen = []
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as fh:
            seen.append(json.load(fh))
    workers = [s for s in seen if s["pid"] != os.getpid()]
    return {
        "first_call_s": t,
        "worker_threads": sorted({s["threads"] for s in workers}),
        "worker_pids": sorted(s["pid"] for s in workers),
    }


def warm_tiny(tmp: str, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        out = os.path.join(tmp, f"tiny-{i}.zarr")
        problem = P.tiny()
        t, jac = timed(lambda p=problem, o=out: raijac.compute(p, o, workers=WORKERS, overwrite=True, progress=False))
        runs.append({"seconds": t, **summary_of(jac)})
        del jac
        rmtree(out)
    log("   warm tiny raijac.compute: " + ", ".join(f"{r['seconds']:.3f}" for r in runs) + " s")
    return {"runs": runs, "best": min(r["seconds"] for r in runs)}


# ====================================================================== zarr write path
def zarr_write(tmp: str, reps: int) -> dict[str, Any]:
    """256 MiB float32 in 8 MiB chunks: zarr v3 (as raijac's workers write) against raw write() + fsync."""
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    rows, cols, chunk_rows = 8192, 8192, 256
    dense = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    sparse = np.zeros((rows, cols), np.float32)  # a tridiagonal J, like the stencil's
    i = np.arange(rows)
    sparse[i, i], sparse[i, (i + 1) % cols], sparse[i, (i - 1) % cols] = -0.5, 0.25, 0.25
    nbytes = dense.nbytes
    blocks = [(r, r + chunk_rows) for r in range(0, rows, chunk_rows)]

    def fsync_tree(path: str) -> None:
        for folder, _, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)

    def raw(path: str, sync: bool) -> None:
        with open(path, "wb", buffering=0) as fh:
            for r0, r1 in blocks:
                fh.write(memoryview(dense[r0:r1]).cast("B"))
            if sync:
                os.fsync(fh.fileno())

    def zarr_case(compressors, data, sync=False):
        def make(path):
            return zarr.create_array(
                store=path,
                shape=(rows, cols),
                chunks=(chunk_rows, cols),
                dtype="float32",
                fill_value=np.nan,
                compressors=compressors,
                config={"write_empty_chunks": True},  # as raijac's workers open it (raijac.store.block_array)
            )

        def write(arr, path):
            for r0, r1 in blocks:
                arr[r0:r1] = data[r0:r1]
            if sync:
                fsync_tree(path)

        return make, write

    cases = {
        "raw write + fsync": (None, lambda _a, p: raw(p, True)),
        "raw write, no fsync": (None, lambda _a, p: raw(p, False)),
        "zarr, no compressor": zarr_case(None, dense),
        "zarr, no compressor + fsync": zarr_case(None, dense, sync=True),
        "zarr, zstd-1": zarr_case(ZstdCodec(level=1), dense),
        "zarr, blosc zstd-3 shuffle": zarr_case(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), dense),
        "zarr, zstd-1, tridiagonal J": zarr_case(ZstdCodec(level=1), sparse),
        "zarr, no compressor, tridiagonal J": zarr_case(None, sparse),
    }
    results = {}
    for name, (make, write) in cases.items():
        times, stored = [], None
        for rep in range(reps):
            path = os.path.join(tmp, f"write-{rep}" + (".bin" if make is None else ".zarr"))
            arr = make(path) if make else None
            t, _ = timed(lambda w=write, a=arr, p=path: w(a, p))
            times.append(t)
            stored = _du(path)
            rmtree(path) if os.path.isdir(path) else os.unlink(path)
            os.sync()  # let the page cache drain outside the timings
        results[name] = {"best_s": min(times), "all_s": times, "mib_s": nbytes / MiB / min(times), "stored_mib": stored / MiB}
        log(f"   {name:36s} {nbytes / MiB / min(times):8.0f} MiB/s  (stored {stored / MiB:.1f} MiB)")
    raw_sync = results["raw write + fsync"]["mib_s"]
    for r in results.values():
        r["vs_raw_fsync"] = r["mib_s"] / raw_sync
    return {"mib": nbytes / MiB, "chunk_mib": chunk_rows * cols * 4 / MiB, "cases": results}


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# ====================================================================== report
def fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3f}" if t < 10 else f"{t:.1f}"


def fmt_r(r: float | None, digits: int = 2) -> str:
    return "-" if r is None else f"{r:.{digits}f}"


def cell(res: dict[str, Any], method: str) -> str:
    if method in res["errors"]:
        return "ERROR"
    if method not in res["best"]:
        return "-"
    s = fmt_s(res["best"][method])
    if method == "loop" and res["loop"]["rows"] < res["loop"]["total_rows"]:
        s = f"~{s}*"
    if not res["checks"].get(method, {"ok": True})["ok"]:
        s += " WRONG"
    return s


def main_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["problem", "J shape", "MiB", "torch.func", "afj(vec)", "loop", "repeat"]
    head += [m.replace("-repeat", "-rep") for m in MODES]
    head += [
        "auto ran",
        "auto/best anchor",
        "best raijac/best anchor",
        "auto/fastest mode",
        "same, medians",
        "auto vs loop",
        "check",
        "load 1m",
    ]
    rows = []
    for r in results:
        bad = r["failures"]
        row = [r["name"], "x".join(map(str, r["shape"])), f"{r['mib']:.0f}", cell(r, "torch.func") + f" ({r['torch_func']})"]
        row += [cell(r, m) for m in ("afj", "loop", "repeat")]
        row += [cell(r, f"raijac:{m}") for m in MODES]
        row += [
            r.get("auto_mode") or "-",
            fmt_r(r["ratio_auto_anchor"]) + (f" ({r['best_anchor']})" if r["best_anchor"] else ""),
            fmt_r(r["ratio_best_anchor"]),
            fmt_r(r["ratio_auto_fastest"]) + (f" ({r['fastest_mode']})" if r["fastest_mode"] else ""),
            fmt_r(r.get("ratio_auto_fastest_median"))
            + (f" ({r['fastest_mode_median']})" if r.get("fastest_mode_median") else ""),
            (f"{r['speedup_loop']:.1f}x" if r["speedup_loop"] else "-"),
            "ok" if not bad else "FAIL: " + ", ".join(m.replace("raijac:", "") for m in bad),
            f"{r['loadavg_before']:.1f}-{r['loadavg_after']:.1f}",
        ]
        rows.append(row)
    return head, rows


def breakdown_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = [
        "problem",
        "mode",
        "ran",
        "end to end s",
        "worker compute s (sum)",
        "worker write s (sum)",
        "busy share",
        "tiles",
        "MiB/s e2e",
        "peak RSS growth MiB",
        "codec",
    ]
    rows = []
    for r in results:
        for mode in MODES:
            s = r["summaries"].get(mode)
            if not s:
                continue
            t = r["best"].get(f"raijac:{mode}")
            busy = ((s.get("compute_seconds") or 0) + (s.get("write_seconds") or 0)) / (WORKERS * t) if t else None
            rss = s.get("peak_rss_growth")
            rows.append(
                [
                    r["name"],
                    mode,
                    s.get("mode") or "?",
                    fmt_s(t),
                    fmt_s(s.get("compute_seconds")),
                    fmt_s(s.get("write_seconds")),
                    f"{busy:.0%}" if busy is not None else "-",
                    str(s.get("tiles_total")),
                    f"{(s.get('bytes') or 0) / MiB / t:.0f}" if t else "-",
                    f"{rss / MiB:.0f}" if rss else "-",
                    str(s.get("compressor") or "?"),
                ]
            )
    return head, rows


def preflight_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["problem", "f(x) + fingerprint s", "auto triage s", "auto e2e s", "share of auto"]
    rows = []
    for r in results:
        p = r.get("preflight")
        t = r["best"].get("raijac:auto")
        if not p:
            continue
        tot = p["fingerprint_s"] + p["triage_s"]
        rows.append([r["name"], f"{p['fingerprint_s']:.3f}", f"{p['triage_s']:.3f}", fmt_s(t), f"{tot / t:.0%}" if t else "-"])
    return head, rows


def zarr_table(z: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["write path", "MiB/s", "best s", "vs raw + fsync", "stored MiB"]
    rows = [
        [k, f"{v['mib_s']:.0f}", f"{v['best_s']:.3f}", f"{v['vs_raw_fsync']:.2f}", f"{v['stored_mib']:.1f}"]
        for k, v in z["cases"].items()
    ]
    return head, rows


def targets(report: dict[str, Any]) -> list[list[str]]:
    res = {r["name"]: r for r in report["problems"]}
    out = []

    def add(what, value, limit, ok):
        out.append([what, value, limit, "not measured" if ok is None else ("PASS" if ok else "MISS")])

    for name in ("mlp-8192", "mlp-4096"):
        r = res.get(name)
        v = r and r.get("ratio_auto_torchfunc")
        add(f"{name}: raijac auto / jacrev (same run)", fmt_r(v), "<= 1.10", None if not v else v <= 1.10)
        rev = (
            r
            and r["best"].get("raijac:rev")
            and r["best"].get("torch.func")
            and r["best"]["raijac:rev"] / r["best"]["torch.func"]
        )
        add(
            f"{name}: raijac rev / jacrev (no chain: the same algorithm as jacrev)",
            fmt_r(rev),
            "<= 1.10",
            None if not rev else rev <= 1.10,
        )
    fixed = report.get("fixed") or {}
    cold = (fixed.get("cold_cli") or {}).get("best")
    floor = (fixed.get("ray_floor") or {}).get("best")
    add(
        "cold `raijac compute` CLI, tiny problem",
        (fmt_s(cold) + " s" if cold else "-") + (f" (Ray alone: {fmt_s(floor)} s)" if floor else ""),
        "< 6 s",
        None if cold is None else cold < 6,
    )
    warm = (fixed.get("warm_tiny") or {}).get("best")
    add(
        "raijac.compute on a warm Ray, tiny problem",
        fmt_s(warm) + " s" if warm else "-",
        "< 1.5 s",
        None if warm is None else warm < 1.5,
    )
    for key, label in (
        ("ratio_auto_fastest", "auto / fastest raijac mode, worst problem"),
        ("ratio_auto_fastest_median", "the same from medians over the rounds, worst problem"),
    ):
        ratios = [(r["name"], r[key]) for r in report["problems"] if r.get(key)]
        worst = max(ratios, key=lambda kv: kv[1], default=None)
        shown = f"{worst[1]:.2f} ({worst[0]})" if worst else "-"
        add(label, shown, "<= 1.10 everywhere", None if worst is None else worst[1] <= 1.10)
    r = res.get("mlp-1000")
    v = r and r.get("speedup_loop")
    add("mlp-1000: speed-up of auto over the naive loop", f"{v:.1f}x" if v else "-", ">= 10x", None if not v else v >= 10)
    z = report.get("zarr")
    if z:
        v = z["cases"]["zarr, no compressor"]["vs_raw_fsync"]
        add("zarr uncompressed write / raw write + fsync", f"{v:.2f}", ">= 0.60", v >= 0.60)
    else:
        add("zarr uncompressed write / raw write + fsync", "-", ">= 0.60", None)
    add("1 GiB J under --memory-budget 128MB (out of core)", "-", "RSS <= 1.5x budget, >= 80% throughput", None)
    add("GPU MLP-16384 TFLOP/s", "-", "where a GPU is lent", None)
    return out


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fixed_rows(fixed: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    cold = fixed.get("cold_cli")
    if cold:
        all_s = ", ".join(f"{r['seconds']:.2f}" + ("" if r["rc"] == 0 else f" (rc {r['rc']})") for r in cold["runs"])
        inner = ", ".join(f"{r['inner_seconds']:.2f}" for r in cold["runs"] if r["inner_seconds"] is not None)
        rows.append(
            [
                "cold `raijac compute` CLI, tiny (process + imports + Ray start/stop)",
                fmt_s(cold["best"]),
                all_s,
                f"raijac's own 'seconds': {inner or '-'}",
            ]
        )
    floor = fixed.get("ray_floor")
    if floor:
        ratio = f"; the CLI takes {cold['best'] / floor['best']:.2f}x this" if cold and cold["best"] and floor["best"] else ""
        rows.append(
            [
                "Ray's own floor, no raijac code (process + torch/ray imports + Ray start + torch actors + shutdown)",
                fmt_s(floor["best"]),
                ", ".join(f"{r['seconds']:.2f}" + ("" if r["rc"] == 0 else f" (rc {r['rc']})") for r in floor["runs"]),
                "the least a cold CLI run can take here" + ratio,
            ]
        )
    wu = fixed.get("warm_up")
    if wu:
        rows.append(
            [
                "first raijac.compute on the fresh Ray (worker hosts start)",
                fmt_s(wu["first_call_s"]),
                "-",
                f"worker torch threads {wu['worker_threads']}",
            ]
        )
    warm = fixed.get("warm_tiny")
    if warm:
        r0 = warm["runs"][0]
        rows.append(
            [
                "raijac.compute on the warm Ray, tiny problem",
                fmt_s(warm["best"]),
                ", ".join(f"{r['seconds']:.3f}" for r in warm["runs"]),
                f"worker compute {fmt_s(r0.get('compute_seconds'))} s, write {fmt_s(r0.get('write_seconds'))} s (sums)",
            ]
        )
    return ["fixed cost", "best s", "all runs s", "note"], rows


def write_markdown(report: dict[str, Any], path: Path) -> None:
    m, v, th = report["machine"], report["versions"], report["threads"]
    lines = [
        "# raijac benchmarks",
        "",
        "Written by `benchmarks/run.py`. **Ratios matter, seconds are noisy**: every number below was measured in the",
        "same run on the same machine, so compare columns within a row; absolute seconds move with the machine, its",
        "load (other processes were allowed to run) and the disk.",
        "",
        f"- command: `{report['command']}` ({report['finished']}, {report['wall_s'] / 60:.1f} min; raijac at {report['git']})",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gib']} GiB RAM ({m['ram_available_gib']} GiB available at start); {m['platform']}",
        f"- load average (1 min) at start {m['loadavg_start'][0]}, at end {report['loadavg_end'][0]}; per problem in results.json",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- threads: anchors run in this driver with torch's default {th['driver']} threads ({th['driver_interop']} inter-op); "
        f"raijac runs {WORKERS} worker processes x {th['worker'] or '?'} thread(s) each, as measured inside the workers "
        f"(total {WORKERS * (th['worker'][0] if th['worker'] else 0)} vs {th['driver']})",
        f"- Ray: one local Ray (`ray.init(address='local', num_cpus={m['cores']}, include_dashboard=False)`), warmed by one tiny run; "
        f"every raijac call is `raijac.compute(problem, out, mode=..., workers={WORKERS}, overwrite=True, progress=False)`, timed "
        "with a fresh `Problem` (so f(x), fingerprint, triage, shipping the problem, worker probes, kernels and Zarr writes all count)",
        f"- stores: {report['tmp']} on {report['tmp_fs']}, each deleted after its check (outside the timings)",
        f"- repeats: best of up to {report['config']['reps']} per size class (a method is not repeated once its repeats would pass "
        f"{report['config']['rep_budget_s']} s); the naive loop runs once, stopped after {report['config']['loop_limit_s']} s and extrapolated (`~...*`)",
        "",
    ]
    if report["problems"]:
        head, rows = main_table(report["problems"])
        lines += ["## End to end, seconds (best of the repeats)", "", md_table(head, rows), ""]
        lines += [
            "`torch.func`: jacrev for M <= N, jacfwd for M > N, vmap(jacrev) for batched; `afj(vec)`: "
            "`torch.autograd.functional.jacobian(vectorize=True)` (forward-mode strategy when M > N; batched: of the sum over samples); "
            "`loop`: one `autograd.grad` per row (`~x*`: extrapolated from the rows done in the time limit); `repeat`: x stacked M times, "
            "one `autograd.grad` with the identity. raijac columns: end-to-end `raijac.compute` per mode. `check`: every result against "
            "the torch.func anchor, max |diff| <= 1e-4 x max(1, max |J|) (float32).",
            "",
        ]
        notes = [f"- {r['name']}: {n}" for r in report["problems"] for n in r["notes"]]
        notes += [f"- {r['name']}: **{m} failed**: {why}" for r in report["problems"] for m, why in r["failures"].items()]
        notes += [
            f"- {r['name']}: loop timed on {r['loop']['rows']} of {r['loop']['total_rows']} rows ({r['loop']['measured_s']:.2f} s) and extrapolated"
            for r in report["problems"]
            if "loop" in r and r["loop"]["rows"] < r["loop"]["total_rows"]
        ]
        if notes:
            lines += ["Notes:", "", *notes, ""]
        head, rows = breakdown_table(report["problems"])
        lines += ["## Where raijac's time goes (fastest run of each mode)", "", md_table(head, rows), ""]
        lines += [
            "`worker compute/write s` are sums over the workers of the kernel and Zarr-write time raijac reports; "
            f"`busy share` = (compute + write) / ({WORKERS} workers x end-to-end): what is left is driver pre-flight, "
            "shipping, probes, scheduling and store set-up (above 100% where a worker writes in the background while it computes). "
            "`codec`: the compressor the run wrote with.",
            "",
        ]
        head, rows = preflight_table(report["problems"])
        if rows:
            lines += [
                "Driver-side pre-flight of an auto run, timed apart (already inside the auto seconds above):",
                "",
                md_table(head, rows),
                "",
            ]
    if report.get("fixed"):
        head, rows = fixed_rows(report["fixed"])
        lines += ["## Fixed costs", "", md_table(head, rows), ""]
        cold = report["fixed"].get("cold_cli")
        if cold:
            lines += [f"Cold command: `{cold['command']}`", ""]
    if report.get("zarr"):
        z = report["zarr"]
        head, rows = zarr_table(z)
        lines += [
            f"## Zarr write path ({z['mib']:.0f} MiB float32 in {z['chunk_mib']:.0f} MiB chunks, one chunk per write)",
            "",
            md_table(head, rows),
            "",
            "raijac's workers write like `zarr, ...` without fsync; `vs raw + fsync` is the issue's yardstick. The `+ fsync` zarr row is the like-for-like comparison.",
            "",
        ]
    lines += ["## Issue 4 targets", "", md_table(["target", "measured", "goal", "status"], targets(report)), ""]
    if report.get("chart"):
        lines += [f"![ratios]({report['chart']})", ""]
    lines += carried_sections(HERE / "RESULTS.md")
    path.write_text("\n".join(lines))


CARRIED = ("## Measurements behind design choices",)  # hand-written sections of the committed RESULTS.md


def carried_sections(committed: Path) -> list[str]:
    """The hand-written sections of the committed RESULTS.md, so a new one keeps them."""
    if not committed.exists():
        return []
    out: list[str] = []
    keep = False
    for line in committed.read_text().splitlines():
        if line.startswith("## "):
            keep = line.strip() in CARRIED
        if keep:
            out.append(line)
    return [*out, ""] if out else []


def write_chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    probs = [r for r in report["problems"] if r["best_anchor"]]
    if not probs:
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 1.4]})
    width = 0.8 / len(MODES)
    for k, mode in enumerate(MODES):
        vals = [r["best"].get(f"raijac:{mode}", np.nan) / r["best"][r["best_anchor"]] for r in probs]
        ax.bar(np.arange(len(probs)) + (k - (len(MODES) - 1) / 2) * width, vals, width, label=mode)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.1, color="r", lw=1, ls="--", label="1.10 target")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(probs)), [f"{r['name']}\n({r['best_anchor']})" for r in probs], fontsize=8)
    ax.set_ylabel("raijac seconds / best anchor seconds (log)")
    ax.set_title("raijac end to end / best in-memory anchor (lower is better)")
    ax.legend(fontsize=8, ncol=3)
    vals = [r["ratio_auto_fastest"] or np.nan for r in probs]
    ax2.bar(np.arange(len(probs)), vals, color="tab:gray")
    ax2.axhline(1.1, color="r", lw=1, ls="--")
    ax2.set_xticks(np.arange(len(probs)), [r["name"] for r in probs], rotation=60, fontsize=8)
    ax2.set_title("auto / fastest raijac mode")
    fig.suptitle(f"{report['machine']['cpu']}, {report['machine']['cores']} cores; {report['command']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ====================================================================== main
def parse_args(argv: list[str]) -> argparse.Namespace:
    names = list(P.BUILDERS) + EXTRA
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small problems and fewer repeats (~3 min on 2 cores)")
    ap.add_argument("--full", action="store_true", help="the default: every problem, MLP-8192 included")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=names, help=f"run only these: {', '.join(names)}")
    ap.add_argument(
        "--out",
        default=None,
        help=f"folder for RESULTS.md, results.json, results.png (default: {folders.default_out()}; "
        "--out benchmarks replaces the committed ones)",
    )
    ap.add_argument(
        "--tmp", default=None, help="existing folder for the Zarr stores (default: the system temp folder); use local disk"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="best of N for every method of every problem, however long (default: by size, fewer for slow methods)",
    )
    ap.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    if args.quick and args.full:
        ap.error("--quick and --full contradict each other")
    args.tmp = folders.existing_dir(args.tmp, "--tmp")  # checked before --out or a store is created
    args.out = folders.out_dir(args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    cfg = {
        "reps": {"small": 2, "medium": 1, "large": 1} if args.quick else {"small": 15, "medium": 3, "large": 2},
        "rep_budget_s": 6.0 if args.quick else 25.0,
        "loop_limit_s": 1.0 if args.quick else 3.0,
        "cold_reps": 1 if args.quick else 2,
        "warm_reps": 3,
        "zarr_reps": 2 if args.quick else 3,
        "debug": args.debug,
    }
    if args.repeats:
        cfg["reps"] = dict.fromkeys(cfg["reps"], max(1, args.repeats))
        cfg["rep_budget_s"] = math.inf  # an explicit --repeats is kept however long each run takes
    if args.only:
        names = [n for n in P.BUILDERS if n in args.only]
        extra = [n for n in EXTRA if n in args.only]
    else:
        names = P.QUICK if args.quick else P.DEFAULT
        extra = EXTRA
    if args.quick and not args.only:
        log("--quick: the PDE stencil shrinks to N=4096 and MLP-4096/8192 are skipped (--only NAME runs any problem)")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"results will go to {out_dir}")
    tmp = tempfile.mkdtemp(prefix="raijac-bench-", dir=args.tmp)
    command = "python benchmarks/run.py" + ("" if not sys.argv[1:] else " " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    report: dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "versions": versions(),
        "git": git_state(),
        "tmp": tmp,
        "tmp_fs": fs_type(tmp),
        "config": {k: v for k, v in cfg.items() if k != "debug"},
        "threads": {"driver": torch.get_num_threads(), "driver_interop": torch.get_num_interop_threads(), "worker": None},
        "problems": [],
        "fixed": {},
    }
    m = report["machine"]
    log(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; load {m['loadavg_start']}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    log(
        f"driver torch threads: {torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()}); stores in {tmp} ({report['tmp_fs']})"
    )
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(P)  # workers cannot import benchmarks/problems.py by name

    try:
        if "fixed" in extra:
            log("\n== fixed costs")
            report["fixed"]["cold_cli"] = cold_cli(tmp, cfg["cold_reps"])  # before our Ray: it starts its own
            report["fixed"]["ray_floor"] = ray_floor(tmp, cfg["cold_reps"])
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
        wu = warm_up(tmp)
        report["fixed"]["warm_up"] = wu
        report["threads"]["worker"] = wu["worker_threads"]
        log(
            f"   first raijac.compute on the fresh Ray: {wu['first_call_s']:.2f} s; worker torch threads {wu['worker_threads']} x {WORKERS} workers"
        )
        if "fixed" in extra:
            report["fixed"]["warm_tiny"] = warm_tiny(tmp, cfg["warm_reps"])
        if "zarr" in extra:
            log("\n== zarr write path")
            report["zarr"] = zarr_write(tmp, cfg["zarr_reps"])
        for name in names:
            b = P.BUILDERS[name]()
            res = bench_problem(b, cfg, tmp)
            derive(res)
            report["problems"].append(res)
            del b
            gc.collect()
    finally:
        ray.shutdown()
        rmtree(tmp)
    report["wall_s"] = time.perf_counter() - started
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    log("\n" + "=" * 100)
    if report["problems"]:
        log("End to end, seconds (best of the repeats); ratios < 1 mean raijac is faster")
        log(text_table(*main_table(report["problems"])))
        log("\nWhere raijac's time goes (fastest run of each mode)")
        log(text_table(*breakdown_table(report["problems"])))
        head, rows = preflight_table(report["problems"])
        if rows:
            log("\nDriver-side pre-flight of an auto run (inside the auto seconds)")
            log(text_table(head, rows))
    if report["fixed"]:
        log("\nFixed costs")
        log(text_table(*fixed_rows(report["fixed"])))
    if report.get("zarr"):
        log("\nZarr write path")
        log(text_table(*zarr_table(report["zarr"])))
    log("\nIssue 4 targets")
    log(text_table(["target", "measured", "goal", "status"], targets(report)))
    th = report["threads"]
    log(f"\nthreads: anchors {th['driver']} (driver, torch default); raijac {WORKERS} workers x {th['worker']} thread(s)")
    fails = [(r["name"], m, why) for r in report["problems"] for m, why in r["failures"].items()]
    for name, meth, why in fails:
        log(f"!!!! WRONG OR FAILED: {name} {meth}: {why}")

    if write_chart(report, out_dir / "results.png"):
        report["chart"] = "results.png"
    write_markdown(report, out_dir / "RESULTS.md")
    (out_dir / "results.json").write_text(json.dumps(report, indent=1, default=str))
    log(
        f"\nwrote {out_dir / 'RESULTS.md'}, {out_dir / 'results.json'}"
        + (f", {out_dir / 'results.png'}" if report.get("chart") else "")
    )
    if out_dir.resolve() != HERE:
        log(f"to commit them, copy them into {HERE} (or rerun with --out {HERE})")
    log(f"total {report['wall_s'] / 60:.1f} min")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
