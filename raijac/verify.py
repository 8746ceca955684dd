"""verify: random-probe checks of a stored J against fresh JVPs and VJPs (after store and reader).

`verify(path, spec=...)` rebuilds the problem from a spec the caller names, checks its fingerprint and
`f(x)` against the stored ones, draws K dense Gaussian probes `v` and `u`, streams `J @ v`
and `u^T J` out of the store in one pass, block by block (`Jacobian.products`, never J whole)
and compares them with `torch.func.jvp` / `torch.func.vjp` of the problem at x.

NOTE: [Why dense Gaussian probes] Changing one entry `J[i, j]` by `d` changes `(J v)_i` by
`d * v_j` and `(u^T J)_j` by `d * u_i`. Every `v_j` and `u_i` of a Gaussian probe is
nonzero (almost surely, and of order one), so each probe sees every entry: a change is
caught as soon as `|d|` exceeds about `rtol * ||J v|| / |v_j|`, which is `rtol` times the
Frobenius norm of J (one sample's J for batched inputs). The row of the largest `J v`
error and the column of the largest `u^T J` error then point at the changed entry.

NOTE: [Stores never run code] A store's metadata names the spec it was computed from, but a
store may come from anywhere (a shared disk, a download), and importing a spec file runs it.
So `verify` imports only a spec its caller names (`spec=`, `--spec`), compared by sha256
with the one recorded at compute time; the stored name is run only with `trust_spec=True`
(`--trust-spec`), which the CLI announces before it runs anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from raijac.errors import ProblemError, StoreError
from raijac.guard import keeping_caller_state
from raijac.kernels import plain_attention
from raijac.problem import Problem, load_problem
from raijac.reader import Jacobian
from raijac.spec import is_path, portable_spec, spec_digest  # noqa: F401 - portable_spec, spec_digest: re-exported

# Relative error allowed by default, by the coarser of the store's and the computation's dtype.
# float16 keeps 11 significant bits: its rounding alone gives relative errors near 3e-4.
DEFAULT_RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 2e-3}
TINY = 1e-30


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`: one relative error per probe and side, and the verdict.

    `suspect` is the entry the largest disagreements point at, `(sample, row, col)` (sample
    None for plain stores), reported only when the check failed.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    probes: int
    rtol: float
    jvp_errors: tuple[float, ...]
    vjp_errors: tuple[float, ...]
    y_error: float
    reference: str
    seconds: float
    suspect: tuple[int | None, int, int] | None = None
    symmetry_errors: tuple[float, ...] = ()  # Hessians: ||H v - H^T v|| / ||H v|| per probe
    sparse: bool = False  # the store holds a sparse J: a failure most likely means a wrong pattern

    @property
    def max_error(self) -> float:
        errors = [*self.jvp_errors, *self.vjp_errors, *self.symmetry_errors, self.y_error]
        return float("nan") if any(math.isnan(e) for e in errors) else max(errors)

    @property
    def ok(self) -> bool:
        checks = (*self.jvp_errors, *self.vjp_errors, *self.symmetry_errors, self.y_error)
        return all(e <= self.rtol for e in checks)  # NaN fails

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, max_error=self.max_error, shape=list(self.shape))
        d["suspect"] = list(self.suspect) if self.suspect is not None else None
        d["jvp_errors"], d["vjp_errors"] = [_json_float(e) for e in self.jvp_errors], [_json_float(e) for e in self.vjp_errors]
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in d.items()}  # NaN / inf: null, valid JSON

    def verdict(self) -> str:
        if self.ok:
            return f"OK: every probe within rtol {self.rtol:.0e} (largest error {self.max_error:.1e}) in {self.seconds:.2f} s"
        errors = (*self.jvp_errors, *self.vjp_errors)
        bad = sum(1 for e in errors if not e <= self.rtol)
        parts = [f"{bad} of {len(errors)} probe checks past rtol {self.rtol:.0e} (largest error {self.max_error:.1e})"]
        if not self.y_error <= self.rtol:
            parts.insert(0, f"f(x) differs from the stored y (relative error {self.y_error:.1e}), so f changed since the run")
        asym = [e for e in self.symmetry_errors if not e <= self.rtol]
        if asym:
            parts.append(f"the stored Hessian is not symmetric (||H v - H^T v|| / ||H v|| up to {max(asym):.1e})")
        if self.suspect is not None:
            b, i, j = self.suspect
            at = f"J[{i}, {j}] (row, column)" if b is None else f"J[{b}, {i}, {j}] (sample, row, column)"
            parts.append(f"the largest disagreements point at {at}")
        if self.sparse and self.y_error <= self.rtol:
            return (
                "FAILED: " + "; ".join(parts) + "; the sparsity pattern misses non-zeros of J (hidden from the run's own "
                "check where they share a colour with a pattern entry): fix the pattern, or use sparsity='detect', and "
                "recompute with --overwrite."
            )
        return "FAILED: " + "; ".join(parts) + "; recompute the store with --overwrite."

    def __str__(self) -> str:
        lines = [
            f"verify {self.path}: {' x '.join(map(str, self.shape))} {self.dtype}, {self.probes} probes, "
            f"rtol {self.rtol:.0e}, reference {self.reference}",
            "  probe   J@v rel. error   u^T J rel. error",
        ]
        for k, (a, b) in enumerate(zip(self.jvp_errors, self.vjp_errors, strict=True)):
            flag = "" if a <= self.rtol and b <= self.rtol else "   <-- past rtol"
            lines.append(f"  {k:5d}   {a:14.2e}   {b:16.2e}{flag}")
        if self.symmetry_errors:
            lines.append(f"  Hessian symmetry ||H v - H^T v|| / ||H v||: largest {max(self.symmetry_errors):.2e}")
        lines.append(f"  f(x) against the stored y: rel. error {self.y_error:.2e}")
        lines.append(self.verdict())
        return "\n".join(lines)


@keeping_caller_state  # a caller's problem: its modules and the generators are given back as they were
def verify(
    path: str,
    *,
    probes: int = 8,
    rtol: float | None = None,
    seed: int = 0,
    problem: Problem | None = None,
    spec: str | None = None,
    trust_spec: bool = False,
) -> VerifyReport:
    """Check a stored Jacobian against fresh JVPs and VJPs of its problem at K random probes.

    Arguments:
        path: a complete raijac store.
        probes: how many probe pairs `(v, u)` to draw (K).
        rtol: the largest relative error `||stored - fresh|| / ||fresh||` allowed; default
            1e-4 for float32, 2e-3 for float16, 1e-9 for float64 (the coarser of the store's
            and the computation's dtype).
        seed: seeds the probes.
        problem: the problem to check against (stores computed from a Python `Problem`
            hold no spec).
        spec: or the spec `path/to/file.py:NAME` / `package.module:NAME` to rebuild it from;
            a spec file must have the sha256 the store recorded (it may have moved).
        trust_spec: or run the spec the store names. Off by default: importing a spec runs
            its code, and a store may come from anyone (NOTE: [Stores never run code]).

    Returns:
        A `VerifyReport`; `report.ok` is the verdict, `print(report)` the table.
    """
    started = time.perf_counter()
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive number of probe vectors, but got {probes!r}.")
    jac = Jacobian(path, allow_partial=True)
    if not jac.complete:
        raise StoreError(
            f"cannot verify {path}: it is incomplete ({jac.tiles_done}/{jac.n_tiles} tiles written); finish it with "
            "raijac compute SPEC --out PATH --resume first."
        )
    meta = jac.meta
    if problem is None:
        problem = load_problem(checked_spec(path, meta, spec, trust_spec=trust_spec))
    fingerprint = problem.fingerprint(mode=meta["requested_mode"], dtype=meta["dtype"])
    if fingerprint != meta.get("fingerprint"):
        raise StoreError(
            f"cannot verify {path}: the rebuilt problem's fingerprint {fingerprint} differs from the stored "
            f"{meta.get('fingerprint')}, so the spec, x, parameters or shapes changed since the run; verify with the "
            "problem the store was computed for, or recompute it with --overwrite."
        )
    if rtol is None:
        rtol = max(DEFAULT_RTOL.get(str(meta["dtype"]), 1e-4), DEFAULT_RTOL.get(str(problem.dtype).replace("torch.", ""), 1e-4))

    checker = _Fresh(problem)
    v, u = _probes(jac, problem, probes, seed)
    hessian = bool(meta.get("hessian"))
    if hessian and u.shape == v.shape:
        u = v.copy()  # u^T H with u = v is (H^T v)^T: compared with H v, it checks symmetry
    stored_jv, stored_uj = jac.products(v, u)  # one pass over the store: (B?, M, K), (B?, N, K) or (N, K)
    fresh_jv = np.stack([checker.jvp(v[..., k]) for k in range(probes)], axis=-1)
    fresh_uj = np.stack([checker.vjp(u[..., k]) for k in range(probes)], axis=-1)
    jvp_errors = _relative(stored_jv, fresh_jv)
    vjp_errors = _relative(stored_uj, fresh_uj)

    y_stored = np.asarray(jac.y, dtype=np.float64)
    y_fresh = problem.y.detach().cpu().double().numpy()
    y_error = _relative(y_stored.reshape(-1, 1), y_fresh.reshape(-1, 1))[0] if y_stored.shape == y_fresh.shape else math.inf

    report = VerifyReport(
        path=str(path),
        shape=jac.shape,
        dtype=str(jac.dtype),
        probes=probes,
        rtol=float(rtol),
        jvp_errors=jvp_errors,
        vjp_errors=vjp_errors,
        y_error=y_error,
        reference=checker.reference,
        seconds=0.0,
        symmetry_errors=_relative(stored_uj, stored_jv) if hessian else (),
        sparse=jac.sparse,
    )
    suspect = None if report.ok else _suspect(jac, _difference(stored_jv, fresh_jv), _difference(stored_uj, fresh_uj))
    return VerifyReport(**{**asdict(report), "suspect": suspect, "seconds": round(time.perf_counter() - started, 4)})


# ---------------------------------------------------------------------- which spec runs
def stored_spec(meta: dict) -> tuple[str | None, str | None]:
    """The spec a store names, as recorded (relative to the folder compute ran in), and its file's sha256."""
    return meta.get("spec"), meta.get("spec_sha256")


def checked_spec(path: str, meta: dict, spec: str | None, *, trust_spec: bool = False) -> str:
    """The spec verify may run for the store at `path`: the caller's, if its file is the one the
    store recorded; the stored one only when trusted; else a refusal (NOTE: [Stores never run code])."""
    named, digest = stored_spec(meta)
    if spec is None:
        if not named:
            raise StoreError(
                f"{path} has no spec: it was computed from a Python Problem; verify it from Python with "
                "raijac.verify.verify(path, problem=problem), or pass spec=FILE:NAME (--spec) of a spec that builds it."
            )
        if not trust_spec:
            raise StoreError(
                f"{path} was computed from {named}; pass spec='FILE:NAME' (--spec FILE:NAME) to re-run f, or "
                "trust_spec=True (--trust-spec) to run the file the store names; stores never run code on their own."
            )
        spec = named
    given = spec_digest(spec)
    if digest and given and given != digest:
        raise StoreError(
            f"cannot verify {path} with {spec}: that file differs from the one the store was computed from "
            f"(sha256 {given[:12]}... != {digest[:12]}...); pass the spec file the store was made with, or recompute "
            "the store with --overwrite."
        )
    return spec


# ---------------------------------------------------------------------- probes and references
def _probes(jac: Jacobian, problem: Problem, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian probes in the shapes `Jacobian.matvec` / `rmatvec` take, rounded to the problem's dtype.

    Rounding first means the stored product and the fresh JVP multiply the same numbers.
    """
    rng = np.random.default_rng(seed)
    m, n = jac.shape[-2:]
    per_sample_v = jac.batched and problem.wrt != "params"
    v_shape = (jac.shape[0], n, k) if per_sample_v else (n, k)
    u_shape = (jac.shape[0], m, k) if jac.batched else (m, k)
    v = rng.standard_normal(v_shape).astype(_np_dtype(problem.primal.dtype)).astype(np.float64)
    u = rng.standard_normal(u_shape).astype(_np_dtype(problem.dtype)).astype(np.float64)
    return v, u


def _np_dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Fresh:
    """JVPs and VJPs of the problem's whole map at its point, as numpy float64.

    The map is `x -> f(x)` (all samples at once for batched inputs, each sample with its
    own tangent), or `p -> module(x; p)` for parameter Jacobians (the samples share `p`).
    torch.func first; plain autograd (and the double-backward trick for JVPs) for
    functions torch.func cannot transform.
    """

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        if problem.wrt == "params":
            x = problem.x
            self.z = problem.params
            self.fn = lambda p: problem.call(x, p)
        else:
            self.z = problem.x
            self.fn = lambda z: problem.call(z, None)
        self.y = problem.y
        self.reference = "torch.func"

    def _tensor(self, a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(a.reshape(like.shape), dtype=like.dtype, device=like.device)

    def jvp(self, v: np.ndarray) -> np.ndarray:
        with plain_attention():  # NOTE: [attention] in kernels: fused attention has no forward derivative
            return self._jvp(self._tensor(v, self.z))

    def _jvp(self, tangent: torch.Tensor) -> np.ndarray:
        if self.reference == "torch.func":
            try:
                _, out = torch.func.jvp(self.fn, (self.z,), (tangent,))
                return self._out(out, lead=True)
            except Exception:
                self.reference = "autograd"
        z = self.z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = self.fn(z)
            if not y.requires_grad:  # f does not depend on z at all
                return self._out(torch.zeros_like(y), lead=True)
            w = torch.zeros_like(y, requires_grad=True)
            (g,) = _grad(y, z, w, create_graph=True)
            if g is None or not g.requires_grad:
                return self._out(torch.zeros_like(y), lead=True)
            (out,) = _grad(g, w, tangent)
        return self._out(torch.zeros_like(y) if out is None else out, lead=True)

    def vjp(self, u: np.ndarray) -> np.ndarray:
        with plain_attention():
            return self._vjp(self._tensor(u, self.y))

    def _vjp(self, cotangent: torch.Tensor) -> np.ndarray:
        if self.reference == "torch.func":
            try:
                _, vjp_fn = torch.func.vjp(self.fn, self.z)
                return self._out(vjp_fn(cotangent)[0], lead=False)
            except Exception:
                self.reference = "autograd"
        z = self.z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = self.fn(z)
            (g,) = _grad(y, z, cotangent) if y.requires_grad else (None,)
        return self._out(torch.zeros_like(z) if g is None else g, lead=False)

    def _out(self, t: torch.Tensor, *, lead: bool) -> np.ndarray:
        """Reshape to what `matvec` (lead: output side) or `rmatvec` returns for one probe."""
        p = self.problem
        a = t.detach().cpu().double().numpy()
        per_sample = p.batched and (lead or p.wrt != "params")
        width = p.n_out if lead else p.n_in
        return a.reshape(p.batch_size, width) if per_sample else a.reshape(width)


def _grad(out: torch.Tensor, wrt: torch.Tensor, seed: torch.Tensor, **kw: Any) -> tuple:
    try:
        return torch.autograd.grad(out, wrt, seed, allow_unused=True, **kw)
    except RuntimeError as exc:
        raise ProblemError(f"cannot compute a reference derivative of this problem with torch.func or autograd: {exc}") from exc


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _relative(stored: np.ndarray, fresh: np.ndarray) -> tuple[float, ...]:
    """`||stored - fresh|| / max(||fresh||, tiny)` per probe (the last axis), over the entries
    finite on both sides; an entry finite on one side only fails its probe. Entries not
    finite on either side are where torch's own J is (sqrt at 0: inf and NaN), so a store
    that holds them matched f."""
    k = stored.shape[-1]
    num = np.linalg.norm(_difference(stored, fresh).reshape(-1, k), axis=0)  # inf where one side only is finite
    f = fresh.reshape(-1, k)
    den = np.maximum(np.linalg.norm(np.where(np.isfinite(f), f, 0.0), axis=0), TINY)
    return tuple(float(x) for x in num / den)


def _difference(stored: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """stored - fresh, 0 where neither is finite and inf where one is (as `_relative` counts them)."""
    s_ok, f_ok = np.isfinite(stored), np.isfinite(fresh)
    with np.errstate(invalid="ignore"):
        return np.where(s_ok & f_ok, stored - fresh, np.where(s_ok == f_ok, 0.0, np.inf))


def _suspect(jac: Jacobian, djv: np.ndarray, duj: np.ndarray) -> tuple[int | None, int, int]:
    """The (sample, row, col) the largest disagreements point at (see NOTE: [Why dense Gaussian probes])."""
    with np.errstate(invalid="ignore"):
        row_err = np.nan_to_num(np.abs(djv), nan=np.inf).max(axis=-1)  # (B?, M)
        col_err = np.nan_to_num(np.abs(duj), nan=np.inf).max(axis=-1)  # (B?, N) or (N,)
    if jac.batched:
        b, i = np.unravel_index(int(np.argmax(row_err)), row_err.shape)
        j = int(np.argmax(col_err[b] if col_err.ndim == 2 else col_err))
        return int(b), int(i), j
    return None, int(np.argmax(row_err)), int(np.argmax(col_err))
