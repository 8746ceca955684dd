"""store: the Zarr v3 group a run writes (zarr only; after kernels, before reader).

Layout at `--out` (the on-disk contract of DESIGN.md):

    jacobian   (M, N) or (B, M, N), chunked along the seed axis as planned, NaN fill
    x, y       the point and f(x), original shapes (`params` too for parameter Jacobians)
    tiles      uint8 per tile: 1 once that tile's data is written (the completion ledger)
    attrs      "raijac": format, version, complete, mode, shapes, fingerprint, plan, ...

A sparse problem (see raijac.sparsity) stores instead of `jacobian`:

    compressed (M, C) = J S or (C, N) = S^T J (batched: (B, ...)): what the tiles write
    rows, cols (nnz,) int64, the pattern in row-major (CSR) order; row_ptr (M + 1,)
    values     (nnz,) or (B, nnz): J[rows[k], cols[k]], decompressed by the driver at the end
    colours    int32 colour of every column (forward) or row (reverse)
    jacobian   the dense J as well, only when asked for (`dense=True`)

Workers write only their own tiles' chunks of `jacobian`; the driver alone writes
`tiles` and the attributes, so no two processes ever write the same object.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import shutil
import threading
import uuid
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from raijac.errors import StoreError

FORMAT = "raijac.jacobian"
FORMAT_VERSION = 1
ATTR = "raijac"
LEDGER_CHUNK = 1 << 16


COMPRESSORS = ("auto", "zstd", "blosc", "none")
AUTO_MIN_RATIO = 1.5  # below this, compression costs more write time than the bytes it saves


def compressor_codec(name: str | None, level: int | None = None):
    """A zarr codec for `--compressor`: zstd (default level 1), blosc (zstd inside, shuffle), or none."""
    levels = {None: range(-7, 23), "zstd": range(-7, 23), "blosc": range(0, 10)}
    if level is not None and name in levels and level not in levels[name]:
        span = levels[name]
        raise StoreError(f"compression level {level} is out of range for {name or 'zstd'}; use {span.start}..{span.stop - 1}.")
    if name in (None, "zstd"):
        return ZstdCodec(level=1 if level is None else level)
    if name == "blosc":
        return BloscCodec(cname="zstd", clevel=3 if level is None else level, shuffle="shuffle")
    if name == "none":
        return None
    raise StoreError(f"unknown compressor {name!r}; choose one of: {', '.join(COMPRESSORS)}.")


def choose_compressor(sample: np.ndarray) -> tuple[str, str]:
    """`auto`: zstd when a sample block compresses well, else none; returns (name, why).

    Dense float32 blocks barely compress with zstd-1, yet it halves zarr's write throughput;
    banded or sparse blocks compress 100x and more, where compression saves far more than it
    costs (numbers: benchmarks/RESULTS.md, "Measurements behind design choices").
    """
    from numcodecs import Zstd

    raw = np.ascontiguousarray(sample)
    if raw.nbytes == 0:
        return "none", "auto: empty sample"
    ratio = raw.nbytes / max(len(Zstd(level=1).encode(raw)), 1)
    name = "zstd" if ratio >= AUTO_MIN_RATIO else "none"
    return name, f"auto: a sample block compresses {ratio:.2f}x with zstd-1 ({'>=' if name == 'zstd' else '<'} {AUTO_MIN_RATIO}x)"


def is_url(path: str) -> bool:
    """`s3://...`, `gs://...` and other fsspec URLs; plain paths are local folders."""
    return "://" in path and not path.startswith("file://")


def _fs(path: str):
    """(fsspec filesystem, path inside it) for a local path or a URL."""
    import fsspec

    return fsspec.core.url_to_fs(path)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, root = _fs(path)
    return fs.exists(root)


def is_empty_dir(path: str) -> bool:
    """A folder made for the output and still empty (holds nothing to lose)."""
    if not is_url(path):
        return os.path.isdir(path) and not os.listdir(path)
    fs, root = _fs(path)
    return fs.isdir(root) and not fs.ls(root)


def read_meta(path: str) -> dict | None:
    """The store's `raijac` attribute, or None when `path` holds no raijac store."""
    if not exists(path):
        return None
    try:
        group = zarr.open_group(path, mode="r")
    except PermissionError as exc:  # a store we may not read is not "not a store": say why
        raise StoreError(
            f"cannot read {path}: permission denied ({exc.filename or path}); fix its permissions, or use another path."
        ) from None
    except (zarr.errors.BaseZarrError, FileNotFoundError, NotADirectoryError, ValueError):
        # No group there (other data), an array, or a zarr.json that is not JSON: not a raijac store.
        # Anything else (a raijac bug, a network failure) surfaces as itself.
        return None
    meta = group.attrs.get(ATTR)
    return dict(meta) if isinstance(meta, dict) else None


def _check_writable(path: str) -> None:
    """Fail before any compute when `path` cannot be written: a missing or read-only folder,
    or a bucket that does not exist or refuses writes."""
    if not is_url(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StoreError(f"cannot write {path}: its folder {parent} does not exist; create it first.")
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot write {path}: its folder {parent} is not writable; choose another --out.")
        return
    fs, root = _fs(path)
    probe = f"{root}/.raijac-write-test"
    try:
        fs.pipe(probe, b"")
        fs.rm(probe)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot write {path}: {first}; check the bucket, its permissions and your credentials.") from None


def check_out(path: str, *, resume: bool, overwrite: bool) -> dict | None:
    """Decide, before any work, whether `path` may be written; returns the meta to resume from."""
    if resume and overwrite:
        raise StoreError("--resume and --overwrite contradict each other; pass one of them.")
    if "::" in path and not is_url(path):
        raise StoreError(
            f"{path} holds '::', which zarr reads as chained URLs (it would write elsewhere); choose an --out without '::'."
        )
    if not exists(path):
        _check_writable(path)
        return None
    if is_empty_dir(path):
        return None  # an empty folder made for the output holds nothing to lose
    meta = read_meta(path)
    if meta is None:
        raise StoreError(
            f"{path} already exists and is not a raijac store; raijac never replaces other data, so choose another --out "
            "or remove it yourself."
        )
    _check_version(meta, path)
    if resume:
        return meta
    if overwrite:
        return None
    done = f"{_tiles_done(path)}/{meta.get('n_tiles', '?')} tiles done"
    raise StoreError(f"{path} already holds a raijac store ({done}); pass --resume to finish it or --overwrite to replace it.")


def _tiles_done(path: str) -> int | str:
    """Tiles the ledger records as written ("?" when it cannot be read): the attribute holds no count."""
    try:
        return int(np.count_nonzero(zarr.open_group(path, mode="r")["tiles"][:]))
    except Exception:
        return "?"


def _check_version(meta: dict, path: str) -> None:
    if meta.get("format") != FORMAT:
        raise StoreError(f"{path} is not a raijac Jacobian store (format {meta.get('format')!r}).")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written in store format {meta['version']}, newer than this raijac reads ({FORMAT_VERSION}); "
            "upgrade raijac."
        )


def clean_partial(path: str) -> int:
    """Delete temp files a killed writer left (zarr's LocalStore writes `<chunk>.<uuid>.partial`,
    then renames; object stores write whole objects and leave none)."""
    if is_url(path):
        return 0
    removed = 0
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


# NOTE: [removed aside] Deleting an overwritten store took 0.4-0.7 s of a 10 s run for a
# 3.6 GB J (thousands of chunk files), all before the first block. A local store is instead
# renamed aside in one atomic step and deleted by a thread while the workers compute; the
# caller joins it before it returns. The thread is not a daemon, so an interpreter that
# exits first still finishes it; a store left aside by a killed process is deleted at the
# next overwrite of the same path.
ASIDE = ".raijac-removing-"


def remove(path: str, *, wait: bool = True) -> threading.Thread | None:
    """Delete a raijac store (only ever called on a path `read_meta` recognised); with
    `wait=False` a local one goes aside and a returned thread deletes it (NOTE: [removed aside])."""
    meta = read_meta(path)
    if meta is None or meta.get("format") != FORMAT:
        raise StoreError(f"refusing to delete {path}: it is not a raijac store.")
    if is_url(path):
        fs, root = _fs(path)
        fs.rm(root, recursive=True)
        return None
    for stale in glob.glob(glob.escape(path) + ASIDE + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if wait:
        shutil.rmtree(path)
        return None
    aside = f"{path}{ASIDE}{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except OSError:  # a mount point, say: delete it in place
        shutil.rmtree(path)
        return None
    thread = threading.Thread(target=shutil.rmtree, args=(aside,), kwargs={"ignore_errors": True}, name="raijac-remove")
    thread.start()
    return thread


def remove_empty_dir(path: str) -> None:
    if is_url(path):
        fs, root = _fs(path)
        fs.rmdir(root)
    else:
        os.rmdir(path)


def stored_bytes(path: str, array: str = "jacobian") -> int:
    """Bytes of an array's chunks as stored (its zarr.json is metadata, not data)."""
    fs, root = _fs(path)
    files = fs.find(f"{root.rstrip('/')}/{array}", detail=True)
    return sum(int(info.get("size") or 0) for name, info in files.items() if not name.endswith("zarr.json"))


def _dims(prefix: str, shape: tuple[int, ...], batched: bool) -> tuple[str, ...]:
    names = tuple(f"{prefix}_{i}" for i in range(len(shape)))
    return (("batch",) + names[1:]) if batched and shape else names


def create(
    path: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    n_tiles: int,
    arrays: dict[str, tuple[np.ndarray, bool]],
    meta: dict[str, Any],
    compressor: str | None = None,
    level: int | None = None,
    name: str = "jacobian",
) -> zarr.Group:
    """Create the group with an empty (NaN) `jacobian` (or `compressed`), the ledger, `arrays` and the attributes.

    `arrays` maps a name to (data, batched): batched arrays name their first axis "batch".
    """
    group = create_group(path, arrays)
    return add_jacobian(
        group, shape=shape, chunks=chunks, dtype=dtype, n_tiles=n_tiles, meta=meta, compressor=compressor, level=level, name=name
    )


def create_group(path: str, arrays: dict[str, tuple[np.ndarray, bool]]) -> zarr.Group:
    """The part of a new store no plan decides: the group and `arrays` (x, y, params)."""
    group = zarr.open_group(path, mode="w-")
    for name, (data, batched) in arrays.items():
        # Weights barely compress (zstd: 1.09x on ResNet-18's), and compressing its 45 MB cost
        # 0.1 s of the run before any block: the parameters are stored as they are.
        codecs = None if name == "params" else "auto"
        dims = _dims(name, data.shape, batched)
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, dimension_names=dims, compressors=codecs)
        arr[...] = data
    return group


def add_jacobian(
    group: zarr.Group,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    n_tiles: int,
    meta: dict[str, Any],
    compressor: str | None = None,
    level: int | None = None,
    name: str = "jacobian",
) -> zarr.Group:
    """Add the planned part to a group `create_group` made: the empty (NaN) `jacobian` (or
    `compressed`), the ledger, and last the attributes, which make it a raijac store."""
    dims = ("batch", "output", "input") if len(shape) == 3 else ("output", "input")
    group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=np.nan,
        dimension_names=dims,
        compressors=compressor_codec(compressor, level),
    )
    group.create_array(
        "tiles",
        shape=(n_tiles,),
        chunks=(min(n_tiles, LEDGER_CHUNK),),
        dtype="uint8",
        fill_value=0,
        dimension_names=("tile",),
    )
    group.attrs[ATTR] = {**meta, "format": FORMAT, "version": FORMAT_VERSION}
    return group


# NOTE: [staged store] Creating a store took 15-30 ms of a 0.1-0.3 s warm run, before any
# block, most of it x, y and params, which no plan decides. A new local store's group and
# those arrays are written by a thread into a folder beside `out` while the workers load
# and probe; once the plan is made (and any store being overwritten has gone aside), the
# folder is renamed to `out` in one atomic step and only the planned arrays and the
# attributes remain to write. A run that fails before that deletes the folder; one left by
# a killed process is deleted when the same `out` is staged again. It is never a raijac
# store: the attributes come last.
STAGED = ".raijac-new-"


class Staged:
    """A new local store's group, x, y and params, written by a thread beside `path` (NOTE: [staged store])."""

    def __init__(self, path: str, arrays: dict[str, tuple[np.ndarray, bool]]) -> None:
        for stale in glob.glob(glob.escape(path) + STAGED + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path, self.arrays = path, arrays
        self.where: str | None = f"{path}{STAGED}{uuid.uuid4().hex[:8]}"
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="raijac-stage", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        try:
            create_group(self.where, self.arrays)
        except BaseException as exc:  # placed in the driver's thread instead (see place)
            self.error = exc

    def place(self) -> zarr.Group:
        """The staged group at `path` (which must not exist by now), ready for `add_jacobian`."""
        self._thread.join()
        where, self.where = self.where, None
        if self.error is None:
            try:
                os.rename(where, self.path)
            except OSError:  # `path` came back, or cannot be renamed onto: write it in place
                pass
            else:
                return zarr.open_group(self.path, mode="r+")
        shutil.rmtree(where, ignore_errors=True)
        return create_group(self.path, self.arrays)  # its error, if any, is the store's own

    def discard(self) -> None:
        """Delete the staged folder unless it was placed (a run that failed before its store)."""
        if self.where is not None:
            self._thread.join()
            shutil.rmtree(self.where, ignore_errors=True)
            self.where = None

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def open_group(path: str, mode: str = "r") -> zarr.Group:
    return zarr.open_group(path, mode=mode)


def update_meta(group: zarr.Group, **values: Any) -> dict:
    """Merge `values` into the `raijac` attribute (driver only: every update rewrites it)."""
    meta = {**dict(group.attrs[ATTR]), **values}
    group.attrs[ATTR] = meta
    return meta


class Ledger:
    """The driver's completion ledger: the stored `tiles` array and a copy of it in memory.

    The driver is the ledger's only writer during a run, so a record rewrites the touched
    chunks whole from the copy: no chunk is read back or decoded, and the array is opened
    once: a partial write (open, read, decode, modify, encode, write) costs several times a
    whole-chunk write of the open array, and a small run records every tile.
    """

    def __init__(self, group: zarr.Group) -> None:
        self.array = group["tiles"]
        self.done = np.asarray(self.array[...], dtype=np.uint8)
        self.chunk = int(self.array.chunks[0])

    def pending(self) -> list[int]:
        """Tiles not recorded as written."""
        return [int(i) for i in np.flatnonzero(self.done == 0)]

    def mark(self, tiles: list[int]) -> None:
        """Record tiles as written (their blocks are stored)."""
        self.done[tiles] = 1
        for c in sorted({t // self.chunk for t in tiles}):
            start, stop = c * self.chunk, min((c + 1) * self.chunk, self.done.size)
            self.array[start:stop] = self.done[start:stop]


def block_region(seed_axis: str, batched: bool, b0: int, b1: int, s0: int, s1: int) -> tuple[slice, ...]:
    """Index of a block in `jacobian`: samples b0:b1, seeds s0:s1, everything else."""
    seed, other = slice(s0, s1), slice(None)
    rc = (seed, other) if seed_axis == "rows" else (other, seed)
    return ((slice(b0, b1),) + rc) if batched else rc


def block_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of `group`, opened to store every chunk written to it as is.

    NOTE: [empty chunks] By default zarr first compares each chunk with the fill value (NaN)
    to skip storing "empty" ones. Every block a worker writes is computed, so that scan is
    pure cost, and a large one for uncompressed chunks (an all-NaN block is then stored too;
    it reads back the same either way).
    """
    with zarr.config.set({"array.write_empty_chunks": True}):  # read when the array is opened
        return group[name]


CHUNK_BY_CHUNK_BYTES = 2 * 2**20  # chunks at least this big are written one call each (NOTE: [chunk by chunk])


def write_block(array: zarr.Array, region: tuple[slice, ...], block: np.ndarray) -> None:
    """Write one block (whole chunks along the seed axis, so nothing is read back).

    NOTE: [chunk by chunk] Given a region of several chunks, zarr builds each chunk in a new
    buffer: filled with the fill value, then the block's part copied in, then encoded. Given
    exactly one chunk, it encodes the block's part as it is. So big chunks are written one
    call each: 200 MB of a GPT's Jacobian in 8 MiB chunks took 0.15 s of CPU as one call
    and 0.09 s chunk by chunk (a plain file write: 0.07 s); below ~2 MiB the calls' own
    cost wins (benchmarks/RESULTS.md). Chunks at the array's edge still go through zarr's
    merge, as before.
    """
    chunks = tuple(int(c) for c in array.chunks)
    if getattr(array, "shards", None) is not None or math.prod(chunks) * block.itemsize < CHUNK_BY_CHUNK_BYTES:
        array[region] = block
        return
    bounds = [region[d].indices(array.shape[d])[:2] for d in range(len(chunks))]
    if block.shape != tuple(stop - start for start, stop in bounds):
        raise ValueError(f"block of shape {block.shape} does not fit the region {region} of an array of shape {array.shape}")
    cuts = []
    for (start, stop), c in zip(bounds, chunks, strict=True):
        edges = [start, *range((start // c + 1) * c, stop, c), stop]
        cuts.append(list(zip(edges[:-1], edges[1:], strict=True)))
    for piece in itertools.product(*cuts):
        where = tuple(slice(a, b) for a, b in piece)
        part = tuple(slice(a - start, b - start) for (a, b), (start, _) in zip(piece, bounds, strict=True))
        array[where] = block[part]


# ---------------------------------------------------------------------- sparse results
CHUNK_ENTRIES = 2 * 2**20  # entries per chunk of the sparse arrays (8 MiB of float32 values)


def _entries_chunk(size: int) -> tuple[int]:
    return (max(1, min(size, CHUNK_ENTRIES)),)


def create_sparse(
    group: zarr.Group,
    *,
    rows: np.ndarray,
    cols: np.ndarray,
    row_ptr: np.ndarray,
    colours: np.ndarray,
    shape: tuple[int, int],
    batch_size: int | None,
    dtype: str,
    dense: bool,
    compressor: str | None = None,
    level: int | None = None,
) -> None:
    """Add the pattern, the colours and the empty `values` (and dense `jacobian`) arrays."""
    m, n = shape
    index = (("rows", rows, "nonzero"), ("cols", cols, "nonzero"), ("row_ptr", row_ptr, "output_ptr"),
             ("colours", colours.astype(np.int32), "seed"))  # fmt: skip
    for name, data, dim in index:
        arr = group.create_array(name, shape=data.shape, chunks=_entries_chunk(data.size), dtype=data.dtype,
                                 dimension_names=(dim,), compressors=compressor_codec("zstd"))  # fmt: skip
        arr[...] = data
    lead = (batch_size,) if batch_size is not None else ()
    group.create_array(
        "values",
        shape=(*lead, int(rows.size)),
        chunks=(*((1,) if lead else ()), *_entries_chunk(int(rows.size))),
        dtype=dtype,
        fill_value=np.nan,
        dimension_names=(*(("batch",) if lead else ()), "nonzero"),
        compressors=compressor_codec(compressor, level),
    )
    if dense:
        itemsize = np.dtype(dtype).itemsize
        col_chunk = max(1, min(n, CHUNK_ENTRIES * 4 // itemsize))
        row_chunk = max(1, min(m, CHUNK_ENTRIES * 4 // (col_chunk * itemsize)))
        group.create_array(
            "jacobian",
            shape=(*lead, m, n),
            chunks=(*((1,) if lead else ()), row_chunk, col_chunk),
            dtype=dtype,
            fill_value=np.nan,
            dimension_names=(*(("batch",) if lead else ()), "output", "input"),
            compressors=compressor_codec(compressor, level),
        )


def decompress(group: zarr.Group, *, axis: str, max_bytes: int = 64 * 2**20) -> tuple[int, tuple[int, int, int] | None]:
    """Fill `values` (and a dense `jacobian`) from the finished `compressed` array.

    Each entry `(i, j)` is read from the compressed product at its row (or column) and the
    colour of its column (row). Entries of the compressed product that no pattern entry
    accounts for must be zero; returns how many are not, and the first as (sample, line,
    colour), where line is the output row (forward) or input column (reverse): a pattern
    that misses non-zeros shows up there. Reads and writes go in bounded blocks.
    """
    comp = group["compressed"]
    rows, cols, row_ptr = group["rows"][...], group["cols"][...], group["row_ptr"][...]
    colours = group["colours"][...].astype(np.int64)
    batched = comp.ndim == 3
    n_colours = comp.shape[-1] if axis == "cols" else comp.shape[-2]
    seed_idx, other_idx = (cols, rows) if axis == "cols" else (rows, cols)
    entry_colour = colours[seed_idx]
    n_other = comp.shape[-2] if axis == "cols" else comp.shape[-1]
    if axis == "cols":  # entries are already grouped by row
        order, ptr = np.arange(rows.size), row_ptr
    else:
        order = np.argsort(cols, kind="stable")
        ptr = np.searchsorted(cols[order], np.arange(n_other + 1), side="left")
    step = max(1, max_bytes // max(n_colours * comp.dtype.itemsize, 1))
    strays, first = 0, None
    samples = comp.shape[0] if batched else 1
    values = group["values"]
    for b in range(samples):
        vals = np.empty(rows.size, comp.dtype)
        for o0 in range(0, n_other, step):
            o1 = min(o0 + step, n_other)
            lead = (b,) if batched else ()
            block = comp[(*lead, slice(o0, o1), slice(None))] if axis == "cols" else comp[(*lead, slice(None), slice(o0, o1))].T
            idx = order[ptr[o0] : ptr[o1]]
            oi, ci = other_idx[idx] - o0, entry_colour[idx]
            vals[idx] = block[oi, ci]
            hit = np.zeros(block.shape, bool)
            hit[oi, ci] = True
            with np.errstate(invalid="ignore"):
                stray = (block != 0) & ~hit & ~np.isnan(block)
            count = int(stray.sum())
            if count and first is None:
                o, c = np.argwhere(stray)[0]
                first = (b, o0 + int(o), int(c))
            strays += count
        if batched:
            values[b] = vals
        else:
            values[...] = vals
        if "jacobian" in group:
            _write_dense(group["jacobian"], row_ptr, cols, vals, b if batched else None, max_bytes)
    return strays, first


def _write_dense(array: zarr.Array, ptr: np.ndarray, cols: np.ndarray, vals: np.ndarray, b: int | None, max_bytes: int) -> None:
    """Write one sample's dense J from its CSR entries, a band of whole row chunks at a time."""
    m, n = array.shape[-2:]
    chunk_rows = array.chunks[-2]
    step = max(chunk_rows, (max_bytes // max(n * array.dtype.itemsize, 1)) // chunk_rows * chunk_rows)
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        dense = np.zeros((r1 - r0, n), array.dtype)
        sel = slice(ptr[r0], ptr[r1])
        dense[np.repeat(np.arange(r1 - r0), np.diff(ptr[r0 : r1 + 1])), cols[sel]] = vals[sel]
        array[(*(() if b is None else (b,)), slice(r0, r1), slice(None))] = dense
