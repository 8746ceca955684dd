"""reader: `raijac.open` — read-only views of a stored Jacobian (the last stage; needs only zarr and numpy).

A store is plain Zarr, so `zarr.open_group(path)["jacobian"]`, `dask.array.from_zarr` and
`xarray.open_zarr` read it too; `Jacobian` adds the metadata, completeness checks and
views in the original input and output shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from raijac import store
from raijac.errors import ReadError, StoreError  # ReadError: also raijac.reader.ReadError, as before
from raijac.views import LeafBlock, SparseView, Unflattened, _leaves, _read, _select, _spans, jacrev_structure

Index = int | slice | Sequence[int] | np.ndarray | None
BLOCK_BYTES = 64 << 20  # what one streamed block may hold: a few of them fit any laptop


class Jacobian:
    """A stored Jacobian: the zarr array plus what raijac recorded about it."""

    def __init__(self, path: str, *, allow_partial: bool = False) -> None:
        meta = store.read_meta(str(path))
        if meta is None:
            raise StoreError(f"{path} is not a raijac store (no Zarr group with a 'raijac' attribute); check the path.")
        store._check_version(meta, str(path))
        group = store.open_group(str(path), "r")
        ledger = group["tiles"][:] if "tiles" in group else np.zeros(0, np.uint8)
        self._open(str(path), group, meta, ledger, allow_partial)

    @classmethod
    def written(cls, path: str, meta: dict[str, Any], ledger: np.ndarray, *, allow_partial: bool = False) -> Jacobian:
        """The store a run just wrote, opened with the metadata and ledger its driver holds
        instead of reading them back (4 ms of a 0.1 s warm run)."""
        jac = cls.__new__(cls)
        jac._open(str(path), store.open_group(str(path), "r"), dict(meta), np.asarray(ledger), allow_partial)
        return jac

    def _open(self, path: str, group: Any, meta: dict[str, Any], ledger: np.ndarray, allow_partial: bool) -> None:
        self.path = path
        self.group = group
        self.meta: dict[str, Any] = meta
        if meta.get("sparse"):
            if "values" not in self.group:
                raise StoreError(f"{path} has no 'values' array; the store is damaged, recompute it with --overwrite.")
            # Reads densify only the selected block, even when a dense copy exists.
            self.array: Any = SparseView(self.group, meta)
        elif "jacobian" not in self.group:
            raise StoreError(f"{path} has no 'jacobian' array; the store is damaged, recompute it with --overwrite.")
        else:
            self.array = self.group["jacobian"]
        self.tiles_done, self.n_tiles = int(ledger.sum()), int(ledger.size)
        self.summary: dict[str, Any] | None = None
        if not self.complete and not allow_partial:
            raise StoreError(
                f"{path} is incomplete ({self.tiles_done}/{self.n_tiles} tiles written); finish it with "
                "raijac compute ... --resume, or open it with allow_partial=True (unwritten entries read as NaN)."
            )

    # ------------------------------------------------------------------ metadata
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete")) and self.tiles_done == self.n_tiles

    @property
    def sparse(self) -> bool:
        """Whether the store holds the non-zeros of a sparse Jacobian (see `to_scipy`)."""
        return bool(self.meta.get("sparse"))

    @property
    def nnz(self) -> int | None:
        """Structural non-zeros per sample of a sparse Jacobian, else None."""
        return int(self.meta["sparse"]["nnz"]) if self.sparse else None

    def to_scipy(self, sample: int | None = None):
        """The sparse Jacobian as a `scipy.sparse.csr_array` (one sample's for batched stores).

        Dense stores convert too (zeros dropped), for code that takes either. A float16 store
        comes back as float32: scipy's sparse arrays do not compute in float16 (`toarray`
        refused them).
        """
        import scipy.sparse as sp

        if self.batched and sample is None:
            raise ReadError(f"{self.path} holds {self.shape[0]} per-sample Jacobians; pass sample=b (0..{self.shape[0] - 1}).")
        if not self.batched and sample is not None:
            raise ReadError(f"sample={sample} applies to batched stores only; {self.path} is not batched.")
        b = None if sample is None else _select(sample, self.shape[0], "batch")[0]
        m, n = self.shape[-2:]
        wide = np.float32 if self.dtype == np.float16 else self.dtype
        if not self.sparse:
            return sp.csr_array((self.array[b] if b is not None else self.array[...]).astype(wide, copy=False))
        view: SparseView = self.array
        values = view.values[b] if b is not None else view.values[...]
        return sp.csr_array((values.astype(wide, copy=False), view.cols_all(), view.row_ptr()), shape=(m, n))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def batched(self) -> bool:
        return bool(self.meta["batched"])

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["output_shape"])

    @property
    def x(self) -> np.ndarray:
        return self.group["x"][...]

    @property
    def y(self) -> np.ndarray:
        return self.group["y"][...]

    @property
    def params(self) -> dict[str, np.ndarray] | None:
        """Parameter values by name, for parameter Jacobians and parameter Hessians (else None)."""
        infos = self.meta.get("params") or []
        if not infos:
            return None
        if "params" in self.group:
            flat = self.group["params"][...]
        elif self.meta.get("kind") == "hessian-params":  # its point x is the flat parameter vector
            flat = self.group["x"][...].reshape(-1)
        else:
            return None
        return {p["name"]: flat[p["offset"] : p["offset"] + math.prod(p["shape"])].reshape(p["shape"]) for p in infos}

    def info(self) -> dict[str, Any]:
        """What the store holds, as plain JSON-ready values (`raijac inspect` prints this).

        Every store: kind, shapes, completion (`tiles_pending` and the `pending` tile ranges),
        the arrays that hold J with their raw and stored bytes (`compression_ratio` only once
        complete: unwritten chunks take no space). Sparse stores: non-zeros, colours and the
        pattern's density. Parameter Jacobians and Hessians: the parameters' names, shapes
        and offsets (`wrt` is "params" for both). `block_check`: whether every block was
        checked against autograd before it was written, and the worst relative error seen;
        `random`: a function whose one generator state was replayed.
        """
        meta = self.meta
        m, n = self.shape[-2:]
        lead = [self.shape[0]] if self.batched else []
        names = ("values", "rows", "cols", "row_ptr", "colours", "compressed", "jacobian") if self.sparse else ("jacobian",)
        arrays = {}
        for name in names:
            if name in self.group:
                a = self.group[name]
                arrays[name] = {
                    "shape": list(a.shape),
                    "chunks": list(a.chunks),
                    "dtype": str(a.dtype),
                    "bytes": int(a.nbytes),
                    "bytes_stored": store.stored_bytes(self.path, name),
                }
        raw = sum(a["bytes"] for a in arrays.values())
        stored = sum(a["bytes_stored"] for a in arrays.values())
        tiled = arrays.get("compressed" if self.sparse else "jacobian") or {}
        ledger = self.group["tiles"][:] if "tiles" in self.group else np.zeros(0, np.uint8)
        runs = meta.get("runs") or []
        kind = meta.get("kind")
        info: dict[str, Any] = {
            "path": self.path,
            "kind": kind,
            "hessian": bool(meta.get("hessian")),
            "storage": "sparse" if self.sparse else "dense",
            "complete": self.complete,
            "tiles_done": self.tiles_done,
            "tiles_total": self.n_tiles,
            "tiles_pending": self.n_tiles - self.tiles_done,
            "pending": _spans(np.flatnonzero(ledger == 0)),
            "shape": list(self.shape),
            "unflattened_shape": lead + list(self.output_shape) + list(self.input_shape),
            "dtype": str(self.dtype),
            "chunks": tiled.get("chunks"),
            "arrays": arrays,
            "bytes": raw,
            "bytes_stored": stored,
            "compression_ratio": round(raw / stored, 3) if stored and self.complete else None,
            "dense_bytes": int(math.prod(self.shape) * self.dtype.itemsize),
            "wrt": "params" if kind == "hessian-params" else meta.get("wrt"),
            "params": [dict(p) for p in meta.get("params") or []] or None,
            "sparse": None,
            **{
                k: meta.get(k)
                for k in (
                    "mode",
                    "requested_mode",
                    "mode_reason",
                    "fallbacks",
                    "batched",
                    "input_shape",
                    "output_shape",
                    "compute_dtype",
                    "compressor",
                    "spec",
                    "spec_sha256",
                    "fingerprint",
                    "created",
                    "finished",
                    "seconds",
                    "versions",
                )
            },
            "block_check": meta.get("block_check"),
            "block_check_max_rel_err": max(
                (r["block_check_max_rel_err"] for r in runs if r.get("block_check_max_rel_err") is not None), default=None
            ),
            "random": meta.get("random"),
            "runs": len(runs),
            "compute_seconds": round(sum(r.get("compute_seconds") or 0 for r in runs), 3),
            "write_seconds": round(sum(r.get("write_seconds") or 0 for r in runs), 3),
        }
        if self.sparse:
            sp = dict(meta["sparse"])
            info["sparse"] = {**sp, "density": sp["nnz"] / max(m * n, 1), "dense_stored": bool(sp.get("dense"))}
        return info

    # ------------------------------------------------------------------ data
    def __getitem__(self, key: Any) -> np.ndarray:
        return self.array[key]

    def numpy(self) -> np.ndarray:
        """The whole Jacobian in memory."""
        return self.array[...]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.numpy()
        return data if dtype is None else data.astype(dtype)

    def torch(self):
        """The whole Jacobian as a torch tensor."""
        import torch

        return torch.from_numpy(self.numpy())

    def read(
        self,
        rows: Index = None,
        cols: Index = None,
        batch: Index = None,
        *,
        as_: Literal["numpy", "torch"] = "numpy",
    ) -> Any:
        """A block of the flat Jacobian, read from the chunks it touches.

        Arguments:
            rows, cols: output rows and input columns: an int (drops the axis), a slice, a
                sequence of ints, or None for all.
            batch: samples of a batched store, likewise (refused for a plain store).
            as_: `"numpy"` or `"torch"`.

        Returns:
            The block `J[batch, rows, cols]`; an index past the end raises `ReadError`.
        """
        if as_ not in ("numpy", "torch"):
            raise ValueError(f"as_ must be 'numpy' or 'torch', but got {as_!r}.")
        if self.batched:
            key: tuple = (batch, rows, cols)
        elif batch is not None:
            raise ReadError(f"batch={batch!r} applies to batched stores only; {self.path} holds one {self.shape} Jacobian.")
        else:
            key = (rows, cols)
        names = (("batch",) if self.batched else ()) + ("rows", "cols")
        sel = [_select(k, n, name) for k, n, name in zip(key, self.shape, names, strict=True)]
        out = _read(self.array, [s for s, _ in sel], [n for _, n in sel])
        if as_ == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(out))
        return out

    def unflatten(self) -> Any:
        """J in the structure `torch.func.jacrev` returns (batched: `vmap(jacrev)`), lazily.

        For one tensor in and one out, and for parameter Jacobians (whose inputs are the
        flat parameter vector), a view shaped `(B?, *output_shape, *input_shape)`: indexing
        it (`J.unflatten()[i, j, :, k]`: ints, slices, sequences of ints, `...`) reads only
        the chunks holding the selected entries, and `numpy()` reads everything. For pytrees
        in or out (`argnums=(0, 1)`, a dict or tuple output): f's output structure, each
        output leaf holding the differentiated inputs' structure (a tuple over `argnums`
        where it is a tuple), each leaf a `LeafBlock` read when used; sequences come back as
        tuples. `tree()` gives the same blocks by leaf name.
        """
        if self.meta.get("wrt") != "params" and (
            self.meta.get("inputs") or self.meta.get("outputs") or isinstance(self.meta.get("argnums"), list)
        ):
            return jacrev_structure(self)
        return Unflattened(self)

    def tree(self) -> dict[str, dict[str, LeafBlock]]:
        """J cut back into f's structure: `{output leaf: {input leaf: block}}`, lazily.

        Each block reads only its rows and columns when indexed or turned into numpy, shaped
        `(B?, *output_leaf_shape, *input_leaf_shape)` as `torch.func.jacrev` gives that leaf
        pair. Leaf names are the pytree paths (`y['logits']`, `args[1]['w']`); inputs of a
        parameter Jacobian are the parameter names; a plain tensor is `x` or `y`.
        """
        outs = _leaves(self.meta.get("outputs"), "y", self.output_shape)
        if self.meta.get("wrt") == "params":
            ins = _leaves(self.meta.get("params"), "x", self.input_shape)
        else:
            ins = _leaves(self.meta.get("inputs"), "x", self.input_shape)
        return {o[0]: {i[0]: LeafBlock(self, o, i) for i in ins} for o in outs}

    def to_dask(self):
        """The flat Jacobian as a lazy dask array chunked like the store."""
        try:
            import dask.array as da
        except ImportError as exc:
            raise ImportError("Jacobian.to_dask needs dask; install it with pip install 'dask[array]'.") from exc
        if self.sparse:  # dense chunks made on demand from the non-zeros
            return da.from_array(self.array, chunks=self.array.chunks, asarray=True, fancy=False)
        return da.from_zarr(self.array)

    # ------------------------------------------------------------------ streaming
    def blocks(
        self, *, sample: int | None = None, max_bytes: int | None = None
    ) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Stream the Jacobian as `(region, block)` pairs, `block = J[region]`, never all at once.

        Blocks are whole Zarr chunks along the axis the run's seeds ran along (rows or
        columns), as many as fit in `max_bytes` (default 64 MiB; at least one chunk);
        batched stores go one chunk of samples at a time, or only `sample` when given.
        `matvec`, `rmatvec`, `raijac verify` and `inspect --plot` all read through here.
        """
        max_bytes = BLOCK_BYTES if max_bytes is None else max_bytes
        shape, chunks = self.shape, tuple(self.array.chunks)
        lead = 1 if self.batched else 0
        seed = lead + (1 if self.meta.get("seed_axis", "rows") == "cols" else 0)
        if sample is not None:
            if not self.batched:
                raise ReadError(f"sample={sample} applies to batched stores only; {self.path} is not batched.")
            b = _select(sample, shape[0], "batch")[0]
            batch_ranges = [(b, b + 1)]
        elif self.batched:
            batch_ranges = _ranges(shape[0], chunks[0])
        else:
            batch_ranges = [(0, 1)]
        chunk_bytes = math.prod(chunks) * self.dtype.itemsize
        per_block = max(1, int(max_bytes // max(chunk_bytes, 1)))
        other = 2 * lead + 1 - seed  # the non-seed axis of rows/cols: 1 <-> 2 (batched), 0 <-> 1
        for b0, b1 in batch_ranges:
            for o0, o1 in _ranges(shape[other], chunks[other]):
                for s0, s1 in _ranges(shape[seed], chunks[seed] * per_block):
                    region = [slice(None)] * len(shape)
                    if self.batched:
                        region[0] = slice(b0, b1)
                    region[seed], region[other] = slice(s0, s1), slice(o0, o1)
                    yield tuple(region), self.array[tuple(region)]

    def matvec(self, v: Any) -> np.ndarray:
        """`J @ v`, streamed block by block from the store; `v` of shape `(N,)` or `(N, K)`.

        For a batched store `J` is the Jacobian of the whole batch: with `wrt="params"` the
        parameters are shared by the samples, so `v` is `(P[, K])` and the result
        `(B, M[, K])`; with batched inputs each sample has its own, so `v` is `(B, N[, K])`.
        Sums are taken in `v`'s precision or better (pass float64 for float64 sums).
        """
        return self.products(v=v)[0]

    def rmatvec(self, u: Any) -> np.ndarray:
        """`J^T u` (that is, `u^T J`), streamed block by block; the adjoint of `matvec`.

        `u` is `(M[, K])`, or `(B, M[, K])` for batched stores; the result is `(N[, K])`,
        `(P[, K])` (summed over samples) for batched `wrt="params"`, `(B, N[, K])` for
        batched inputs.
        """
        return self.products(u=u)[1]

    def products(self, v: Any = None, u: Any = None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """`(J v, J^T u)` in one pass over the store, either None when not asked for (`verify` reads this)."""
        m, n = self.shape[-2:]
        shared = not self.batched or self.meta.get("wrt") == "params"  # v is one vector for all samples
        batch = self.shape[0] if self.batched else 1
        vs = self._prepare(v, "matvec needs v", n, per_sample=not shared)
        us = self._prepare(u, "rmatvec needs u", m, per_sample=self.batched)
        jv = None if vs is None else np.zeros((batch, m, vs[0].shape[-1]), vs[0].dtype)
        ju = None
        if us is not None:
            k = us[0].shape[-1]
            ju = np.zeros((n, k) if shared else (batch, n, k), us[0].dtype)
        if jv is None and ju is None:
            return None, None
        dtype = np.result_type(*[a.dtype for a in (jv, ju) if a is not None])
        for region, block in self._sparse_products(dtype) if self.sparse else self.blocks():
            blk = block if self.sparse else block.astype(dtype, copy=False)
            if not self.batched and not self.sparse:
                blk, region = blk[None], (slice(0, 1), *region)
            bs, rs, cs = region
            if rs is None:  # one sample's sparse J (a scipy array)
                if vs is not None:
                    jv[bs] += block @ vs[0][0 if shared else bs]
                if us is not None:
                    if shared:
                        ju += block.T @ us[0][bs]
                    else:
                        ju[bs] += block.T @ us[0][bs]
                continue
            if vs is not None:
                jv[bs, rs] += np.matmul(blk, vs[0][slice(None) if shared else bs, cs])
            if us is not None:
                ub = us[0][bs, rs]
                if shared:  # one BLAS call with the samples' rows stacked
                    ju[cs] += blk.reshape(-1, blk.shape[-1]).T @ ub.reshape(-1, ub.shape[-1])
                else:
                    ju[bs, cs] += np.matmul(blk.transpose(0, 2, 1), ub)
        if jv is not None:
            jv = jv if self.batched else jv[0]
            jv = jv[..., 0] if vs[1] else jv
        if ju is not None:
            ju = ju[..., 0] if us[1] else ju
        return jv, ju

    def _sparse_products(self, dtype: np.dtype) -> Iterator[tuple[tuple, Any]]:
        """Each sample's sparse J as a scipy array, in the form `products` consumes."""
        for b in range(self.shape[0] if self.batched else 1):
            yield (b, None, None), self.to_scipy(b if self.batched else None).astype(dtype)

    def _prepare(self, vec: Any, what: str, length: int, *, per_sample: bool) -> tuple[np.ndarray, bool] | None:
        """`vec` as float `(B or 1, length, K)` and whether it had no K axis; checks its shape."""
        if vec is None:
            return None
        vec = np.asarray(vec)
        want = (self.shape[0], length) if per_sample else (length,)
        if vec.shape[: len(want)] != want or vec.ndim not in (len(want), len(want) + 1):
            raise ReadError(f"{what} of shape {want} or {(*want, 'K')} for this {self.shape} Jacobian, but got {vec.shape}.")
        single = vec.ndim == len(want)
        vec = vec[..., None] if single else vec
        dtype = np.result_type(self.dtype, vec.dtype)
        dtype = dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)
        vec = vec.astype(dtype, copy=False)
        return (vec if per_sample else vec[None]), single

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial {self.tiles_done}/{self.n_tiles}"
        return f"Jacobian({self.path!r}, shape={self.shape}, dtype={self.dtype}, mode={self.mode!r}, {state})"


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    step = max(1, step)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def open(path: str, *, allow_partial: bool = False) -> Jacobian:  # noqa: A001 - the public name is raijac.open
    """Open a raijac store for reading (an incomplete one only with `allow_partial=True`)."""
    return Jacobian(path, allow_partial=allow_partial)
