"""detect: a function's Jacobian sparsity pattern, traced through the ops it runs (torch only; feeds problem).

`detect_pattern(f, x)` runs the real `f(x)` once, under `torch.no_grad()` and a
`TorchDispatchMode` that sees every aten operation f runs (composite ops arrive
decomposed, so the set of ops is canonical). Beside the values it keeps dependency
matrices: boolean `scipy.sparse` CSR matrices whose row e lists the input elements that
element e depends on. x starts as the identity; anything made from constants has none.
Each op maps its inputs' rows to its outputs' rows by its family: data movement
(slicing, pad, roll, cat, index, copy_, ...) is replayed on "id tensors" to read which
source element each output element came from; pointwise ops take the union of their
broadcast inputs; reductions, softmax and the norms the union over the reduced slice;
matmuls the union along the contraction (a constant operand's zeros are honoured);
scatters and index_put the union of what lands on each element. An op outside these
families that touches a traced value is refused with a `ProblemError`, never guessed.

NOTE: [storage] Dependencies are kept per *storage element*, not per tensor: a table maps
each traced storage to a matrix with one row per element of that storage, and a tensor's
rows are gathered through its own (shape, stride, offset). So every aten view op (view,
slice, select, transpose, expand, unfold, split, ...) needs no rule at all, and an
in-place write through a view (`r[1:-1] = ...`, `r[0] += ...`) lands on the right rows of
its base, and every other view of it sees the change. Views of another item size
(`view_as_real`, `view_as_complex`) map onto the storage's own elements.

NOTE: [at x] Values are real (the real f runs on the real x), so selections made from
values are taken as they fall at x: masks and index tensors (even ones computed from x),
`where`/`masked_fill`, and the arg-selecting ops (max/min over a dim, sort, topk, median,
max pooling: the element each output picked; amax/amin/max/min/median over all: the
elements equal to the result). The pattern is that of J at x, the one raijac computes.

NOTE: [conservative] Where a derivative vanishes by value rather than by structure the
pattern keeps the entry: `x * 0`, `relu`/`clamp`/`abs` where flat, `prod` with zeros, a
traced matmul operand that happens to be 0. A superset is still right for colouring.
Bool and integer tensors carry no dependencies (autograd does not differentiate them), nor
do the outputs of `sign`/`floor`/`ceil`/`round`/`trunc` and the random fills.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from raijac.errors import ProblemError

aten = torch.ops.aten

# NOTE: [budget] A dependency matrix is refused beyond this many nonzeros (about 5 bytes
# each): dense Jacobians (a full sum broadcast back, a dense matmul) are not for detection.
MAX_NNZ = 100_000_000

_FIX = "pass the pattern itself as sparsity=(rows, cols) or a scipy.sparse matrix."


def detect_pattern(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int64 index arrays of the structural non-zeros of J = d f(x).flatten() / d x.flatten(),
    sorted row-major (by row, then col), unique.

    Row i is the flat (C-order) index of an output element, column j that of an input
    element. The pattern is traced through the aten ops f runs, never computed
    numerically; an op that cannot be traced raises `ProblemError` naming it.
    """
    import scipy.sparse as sp

    if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.is_complex()):
        raise ProblemError(f'sparsity="detect" needs x to be a floating-point tensor, got {_describe(x)}; {_FIX}')
    x0 = x.detach().clone(memory_format=torch.contiguous_format)
    n = x0.numel()
    tracer = _Tracer(n)
    eye = sp.csr_matrix((np.ones(n, dtype=bool), np.arange(n), np.arange(n + 1)), shape=(n, n))
    tracer.write(x0, eye)
    try:
        with torch.no_grad(), tracer:
            y = f(x0)
    except Exception:
        if tracer.error is not None:
            raise tracer.error from tracer.error.__cause__
        raise
    if tracer.error is not None:  # f caught our error and went on: its pattern is unknown
        raise tracer.error
    if not isinstance(y, torch.Tensor):
        raise ProblemError(f'sparsity="detect" needs f(x) to return a tensor, got {_describe(y)}; {_FIX}')
    d = tracer.deps(y)
    if d is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    d = d.copy()  # the table may still hold d: canonicalise a private copy
    d.sum_duplicates()
    d.eliminate_zeros()
    rows = np.repeat(np.arange(d.shape[0], dtype=np.int64), np.diff(d.indptr))
    return rows, d.indices.astype(np.int64)


def _describe(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor"
    return type(v).__name__


class _Refuse(Exception):
    """An op cannot be traced; `why` is None for "not supported" or a short reason."""

    def __init__(self, why: str | None = None) -> None:
        super().__init__(why)
        self.why = why


def _refusal(func: object, why: str | None) -> ProblemError:
    if why is None:
        return ProblemError(f'sparsity="detect" cannot trace {func} (the first operation it does not support); {_FIX}')
    return ProblemError(f'sparsity="detect" cannot trace {func} ({why}); {_FIX}')


# --------------------------------------------------------------------------- sparse helpers


def _is_float(t: object) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _guard(nnz: float) -> None:
    if nnz > MAX_NNZ:
        raise _Refuse(f"its dependencies would hold over {MAX_NNZ:,} nonzeros, too dense to detect")


def _take(d: Any, idx: np.ndarray) -> Any:
    """Rows `idx` of d; an index of -1 gives an empty row (None stays None)."""
    import scipy.sparse as sp

    if d is None:
        return None
    idx = np.asarray(idx, dtype=np.int64)
    missing = idx < 0
    if missing.any():
        d = sp.csr_matrix((d.data, d.indices, np.append(d.indptr, d.indptr[-1])), shape=(d.shape[0] + 1, d.shape[1]))
        idx = np.where(missing, d.shape[0] - 1, idx)
    if len(idx) == d.shape[0] and (len(idx) == 0 or (idx[0] == 0 and np.all(np.diff(idx) == 1))):
        return d
    _guard((d.indptr[idx + 1] - d.indptr[idx]).sum() if len(idx) else 0)
    return d[idx]


def _union(ds: list[Any]) -> Any:
    """Element-wise OR of same-shape matrices (None entries are skipped; all None gives None)."""
    ds = [d for d in ds if d is not None]
    if not ds:
        return None
    out = ds[0]
    for d in ds[1:]:
        out = out + d
    return out


def _matmul(m: Any, d: Any) -> Any:
    """Boolean product m @ d (row r: the union of d's rows that m's row r names; None stays None)."""
    if d is None:
        return None
    _guard((m @ np.diff(d.indptr)).sum())
    return m @ d


def _coo(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> Any:
    import scipy.sparse as sp

    return sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=shape)


def _bcast(d: Any, shape: tuple[int, ...], to: tuple[int, ...]) -> Any:
    """d's rows (a tensor of `shape`) broadcast to `to`."""
    if d is None or tuple(shape) == tuple(to):
        return d
    idx = torch.arange(math.prod(shape)).reshape(shape).broadcast_to(to).reshape(-1).numpy()
    return _take(d, idx)


def _dims(dim: object, ndim: int) -> list[int]:
    """Normalised reduction dims; None or [] means all."""
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({d % ndim if ndim else 0 for d in dims}) if ndim else []


def _reduce_index(shape: tuple[int, ...], dims: list[int]) -> tuple[np.ndarray, int]:
    """For each element of a `shape` tensor, the flat index of the slice it falls in (and the slice count)."""
    keep = tuple(1 if i in dims else s for i, s in enumerate(shape))
    n_out = math.prod(keep)
    return np.broadcast_to(np.arange(n_out).reshape(keep), shape).reshape(-1), n_out


def _reduce(d: Any, shape: tuple[int, ...], dims: list[int], keep: np.ndarray | None = None) -> Any:
    """Union of d's rows over each slice along `dims` (only elements where `keep`, if given)."""
    oidx, n_out = _reduce_index(tuple(shape), dims)
    cols = np.arange(len(oidx))
    if keep is not None:
        oidx, cols = oidx[keep], cols[keep]
    return _matmul(_coo(oidx, cols, (n_out, len(cols) if keep is None else len(keep))), d)


def _mix(d: Any, shape: tuple[int, ...], dims: list[int]) -> tuple[Any, Any]:
    """Each element depends on its whole slice along `dims`: (per element, per slice)."""
    per_slice = _reduce(d, shape, dims)
    oidx, _ = _reduce_index(tuple(shape), dims)
    return _take(per_slice, oidx), per_slice


# --------------------------------------------------------------------------- the tracer


def _positions(t: torch.Tensor, size: int) -> np.ndarray | None:
    """Storage element of each element of t (C order); None when that is simply arange(size)."""
    if t.numel() == size and t.storage_offset() == 0 and t.is_contiguous():
        return None
    pos = np.full((), t.storage_offset(), dtype=np.int64)
    for n, stride in zip(t.shape, t.stride(), strict=True):
        pos = pos[..., None] + np.arange(n, dtype=np.int64) * stride
    return pos.reshape(-1)


def _resize(d: Any, rows: int) -> Any:
    """d with `rows` rows (a storage that grew gets empty rows)."""
    if d.shape[0] == rows:
        return d
    return _take(d, np.where(np.arange(rows) < d.shape[0], np.arange(rows), -1))


def _merge(old: Any, pos: np.ndarray, d: Any, size: int) -> Any:
    """A storage's rows after writing rows d (None: constants) at positions pos."""
    import scipy.sparse as sp

    src = np.full(size, -1, dtype=np.int64)
    if old is not None:
        src[: old.shape[0]] = np.arange(old.shape[0])
    src[pos] = -1 if d is None else (0 if old is None else old.shape[0]) + np.arange(len(pos))
    parts = [p for p in (old, d) if p is not None]
    if not parts:
        return None
    return _take(parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr"), src)


def _covered(stored: int, item: int, pos: np.ndarray | None, size: int) -> list[np.ndarray]:
    """The stored elements (of `stored` bytes) under each element at `pos` (of `item` bytes), one array per part."""
    p = np.arange(size, dtype=np.int64) if pos is None else pos
    if stored % item == 0:
        return [p // (stored // item)]
    if item % stored == 0:
        r = item // stored
        return [p * r + q for q in range(r)]
    raise _Refuse("it reads a traced tensor's memory as a dtype of unrelated size")


# NOTE: [small writes] A csr matrix cannot take a row cheaply, so a write of a few
# elements (`r[i] = ...` in a Python loop) would rebuild the whole storage's matrix each
# time. Writes of up to _SMALL elements go to an overlay {element: its columns} instead,
# and reads of up to _SMALL elements read through it; anything larger folds the overlay
# into the matrix first (one vectorised merge, paid for by the large read or write).
_SMALL = 64


class _Store:
    """One traced storage: a CSR row per storage element (of `itemsize` bytes), plus the small-write overlay."""

    def __init__(self, storage: torch.UntypedStorage, base: Any, itemsize: int) -> None:
        self.ref = StorageWeakRef(storage)
        self.base = base
        self.itemsize = itemsize
        self.patch: dict[int, np.ndarray] = {}

    def flushed(self, size: int) -> Any:
        """All rows as one matrix of `size` rows (the overlay folded in)."""
        if self.patch:
            pos = np.fromiter(self.patch, dtype=np.int64, count=len(self.patch))
            cols = list(self.patch.values())
            indptr = np.zeros(len(cols) + 1, dtype=np.int64)
            np.cumsum([len(c) for c in cols], out=indptr[1:])
            d = _csr(np.concatenate(cols), indptr, (len(cols), self.base.shape[1]))
            self.base = _merge(_resize(self.base, max(size, self.base.shape[0])), pos, d, max(size, self.base.shape[0]))
            self.patch = {}
        return _resize(self.base, size)

    def rows(self, pos: np.ndarray | None, size: int) -> Any:
        """Rows of the elements at `pos` (None: all `size`)."""
        if pos is not None and self.patch and len(pos) <= _SMALL:
            b, empty = self.base, np.zeros(0, dtype=np.int32)
            cols = []
            for p in pos.tolist():
                c = self.patch.get(p)
                if c is None:
                    c = b.indices[b.indptr[p] : b.indptr[p + 1]] if p < b.shape[0] else empty
                cols.append(c)
            indptr = np.zeros(len(cols) + 1, dtype=np.int64)
            np.cumsum([len(c) for c in cols], out=indptr[1:])
            return _csr(np.concatenate(cols), indptr, (len(cols), b.shape[1]))
        rows = self.flushed(size)
        return rows if pos is None else _take(rows, pos)

    def put(self, pos: np.ndarray | None, d: Any, size: int) -> None:
        """Elements at `pos` (None: all `size`) now hold values with rows d (None: constants)."""
        if pos is None:
            self.base, self.patch = (_nothing(size, self.base.shape[1]) if d is None else d), {}
        elif len(pos) <= _SMALL:
            empty = np.zeros(0, dtype=np.int32)
            for j, p in enumerate(pos.tolist()):
                self.patch[p] = empty if d is None else d.indices[d.indptr[j] : d.indptr[j + 1]]
            if len(self.patch) > max(_SMALL, size // 8):
                self.flushed(size)
        else:
            self.base = _merge(self.flushed(size), pos, d, size)

    def empty(self) -> bool:
        return not self.patch and self.base.nnz == 0


def _csr(indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> Any:
    import scipy.sparse as sp

    return sp.csr_matrix((np.ones(len(indices), dtype=bool), indices, indptr), shape=shape)


def _nothing(rows: int, n: int) -> Any:
    """`rows` empty rows."""
    return _csr(np.zeros(0, dtype=np.int32), np.zeros(rows + 1, dtype=np.int32), (rows, n))


class _Tracer(TorchDispatchMode):
    """Runs each aten op for real, then maps its inputs' dependency rows to its outputs'."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.table: dict[int, _Store] = {}
        self.error: ProblemError | None = None
        self._cache: dict[int, Any] = {}

    # ---- the table

    def _entry(self, t: torch.Tensor) -> _Store | None:
        e = self.table.get(t.untyped_storage()._cdata)
        if e is not None and e.ref.expired():
            return None
        return e

    def deps(self, t: object) -> Any:
        """t's dependency rows (numel x n, C order), or None when t depends on nothing."""
        if not _is_float(t) or t.layout != torch.strided or t.numel() == 0:
            return None
        key = id(t)
        if key in self._cache:
            return self._cache[key][1]
        e = self._entry(t)
        d = None
        if e is not None:
            nbytes, item = t.untyped_storage().nbytes(), t.element_size()
            pos = _positions(t, nbytes // item)
            if e.itemsize == item:
                d = e.rows(pos, nbytes // item)
            else:
                rows = e.flushed(nbytes // e.itemsize)
                d = _union([_take(rows, p) for p in _covered(e.itemsize, item, pos, nbytes // item)])
            if d is not None and d.nnz == 0:
                d = None
        self._cache[key] = (t, d)  # keep t alive so its id stays unique for this op
        return d

    def write(self, t: torch.Tensor, d: Any) -> None:
        """t's elements now hold values with dependency rows d (None: constants)."""
        if t.numel() == 0:
            return
        if t.layout != torch.strided:
            if d is None:
                return
            raise _Refuse("it makes a traced tensor with a non-strided layout")
        storage = t.untyped_storage()
        key = storage._cdata
        e = self._entry(t)
        if e is None and d is None:
            self.table.pop(key, None)
            return
        nbytes, item = storage.nbytes(), t.element_size()
        size = nbytes // item
        pos = _positions(t, size)
        if e is None:
            e = _Store(storage, _nothing(size, self.n), item)
            self.table[key] = e
        if e.itemsize == item:
            e.put(pos, d, size)
        else:
            # NOTE: [item size] Written through a view of another item size (view_as_real of a
            # complex tensor, view_as_complex of a real one): rows stay in the storage's own
            # elements. A write to part of an element joins its old row (conservative).
            old = e.flushed(nbytes // e.itemsize)
            parts = _covered(e.itemsize, item, pos, size)
            if e.itemsize > item:
                if d is None:
                    return
                p = parts[0]
                e.base = _union([old, _matmul(_coo(p, np.arange(len(p)), (old.shape[0], len(p))), d)])
            else:
                p = np.stack(parts, axis=1).reshape(-1)
                e.base = _merge(
                    old, p, None if d is None else _take(d, np.repeat(np.arange(d.shape[0]), len(parts))), old.shape[0]
                )
        if e.empty():
            self.table.pop(key, None)

    def _purge(self) -> None:
        dead = [k for k, e in self.table.items() if e.ref.expired()]
        for k in dead:
            del self.table[k]

    # ---- dispatch

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.error is not None:
            return out
        self._cache = {}
        try:
            self._purge()
            self._track(func, args, kwargs, out)
        except _Refuse as e:
            self.error = _refusal(func, e.why)
        except ProblemError as e:
            self.error = e
        except Exception as e:  # a rule that does not fit this call: refuse it, never guess
            self.error = _refusal(func, None)
            self.error.__cause__ = e
        finally:
            self._cache = {}
        if self.error is not None:
            raise self.error
        return out

    def _track(self, func: Any, args: tuple, kwargs: dict, out: object) -> None:
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in flat_out if _is_float(t)]
        schema = func._schema
        packet = func.overloadpacket
        if packet in _METADATA:
            return
        if func.is_view or packet in _ALIASES:
            if self._aliases_ok(args, outs):
                return
        written_args = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write and a.kwarg_only}
        inputs = [t for t in _tensors(args, kwargs, skip=written_args) if _is_float(t)]
        hidden = _hidden_writes(schema, args, kwargs, flat_out)
        if not outs and not hidden:
            return
        traced = any(self.deps(t) is not None for t in inputs)
        call = _Call(self, func, args, kwargs, out, outs)
        if not traced:
            ds: list[Any] = [None] * len(outs)
        else:
            rule = _RULES.get(func) or _RULES.get(packet)
            if rule is None and torch.Tag.pointwise in func.tags:
                rule = _pointwise
            if rule is None:
                raise _Refuse(None)
            if hidden and packet not in _HANDLES_HIDDEN:
                raise _Refuse(None)
            ds = rule(call)
        for t, d in zip(outs, ds, strict=True):
            if d is not None and d.shape != (t.numel(), self.n):
                raise _Refuse(None)
        for t, d in zip(outs, ds, strict=True):
            self.write(t, d)
        if not traced:
            for t in hidden:
                self.write(t, None)

    def _aliases_ok(self, args: tuple, outs: list[torch.Tensor]) -> bool:
        """A view's outputs share an input's storage: nothing to do (False: it copied after all)."""
        inputs = {t.untyped_storage()._cdata for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)}
        for t in outs:
            if t.layout != torch.strided:
                return False
            if t.untyped_storage()._cdata not in inputs:
                return False
        return True


def _tensors(args: tuple, kwargs: dict, skip: set[str]) -> list[torch.Tensor]:
    leaves = list(args) + [v for k, v in kwargs.items() if k not in skip]
    return [t for t in tree_flatten(leaves)[0] if isinstance(t, torch.Tensor)]


def _hidden_writes(schema: Any, args: tuple, kwargs: dict, flat_out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Float tensors the op writes but does not return (batch norm's running stats)."""
    returned = {id(t) for t in flat_out}
    hidden = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        v = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
        for t in tree_flatten(v)[0]:
            if _is_float(t) and id(t) not in returned:
                hidden.append(t)
    return hidden


@dataclass
class _Call:
    tracer: _Tracer
    func: Any
    args: tuple
    kwargs: dict
    out: object
    outs: list[torch.Tensor]
    _bound: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def b(self) -> dict[str, Any]:
        """Arguments by schema name, defaults filled in."""
        if self._bound is None:
            bound: dict[str, Any] = {}
            for i, a in enumerate(self.func._schema.arguments):
                if not a.kwarg_only and i < len(self.args):
                    bound[a.name] = self.args[i]
                elif a.name in self.kwargs:
                    bound[a.name] = self.kwargs[a.name]
                elif a.has_default_value():
                    bound[a.name] = a.default_value
                else:
                    bound[a.name] = None
            self._bound = bound
        return self._bound

    def deps(self, t: object) -> Any:
        return self.tracer.deps(t)

    def each(self, d: Any) -> list[Any]:
        return [d] * len(self.outs)


# --------------------------------------------------------------------------- rules


def _pointwise(c: _Call) -> list[Any]:
    """Element e of each output depends on element e of every (broadcast) input."""
    skip = {a.name for a in c.func._schema.arguments if a.alias_info is not None and a.alias_info.is_write and a.kwarg_only}
    inputs = [t for t in _tensors(c.args, c.kwargs, skip) if _is_float(t)]
    res = []
    for o in c.outs:
        res.append(_union([_bcast(c.deps(t), tuple(t.shape), tuple(o.shape)) for t in inputs]))
    return res


def _constant(c: _Call) -> list[Any]:
    """Outputs that do not depend on the inputs' values (or have zero derivative)."""
    return c.each(None)


# NOTE: [ids] Data movement is replayed, not modelled: the same aten op runs on float64
# "id tensors" (a traced input -> 1..numel plus an offset per input, a constant -> 0,
# every Scalar value argument -> 0), and each output element's id names the one source
# element it holds (0: none, a constant). float64 is exact for ids below 2**53. Index,
# mask and repeat tensors are passed through; any other non-float tensor is a value (0).
_INDEX_ARGS = {"index", "indices", "mask", "condition", "repeats"}


def _move(c: _Call) -> list[Any]:
    import scipy.sparse as sp

    parts: list[Any] = []
    total = 0

    def ids(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        d = c.deps(t) if _is_float(t) else None
        if d is None:
            return torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        out = torch.arange(total + 1, total + 1 + t.numel(), dtype=torch.float64, device=t.device).reshape(t.shape)
        parts.append(d)
        total += t.numel()
        return out

    def sub(name: str, kind: str, v: object) -> object:
        if isinstance(v, torch.Tensor):
            if _is_float(v) or name not in _INDEX_ARGS:
                return ids(v)
            return v
        if isinstance(v, list | tuple) and "Tensor" in kind:
            if name in _INDEX_ARGS:
                return v
            return type(v)(ids(t) if isinstance(t, torch.Tensor) else t for t in v)
        if kind in ("number", "Optional[number]") and v is not None:
            return 0
        if name == "dtype" and isinstance(v, torch.dtype):
            return torch.complex128 if v.is_complex else torch.float64 if v.is_floating_point else v
        return v

    schema = c.func._schema.arguments
    args = list(c.args)
    kwargs = dict(c.kwargs)
    for i, a in enumerate(schema):
        if not a.kwarg_only and i < len(args):
            args[i] = sub(a.name, str(a.type), args[i])
        elif a.name in kwargs:
            kwargs[a.name] = sub(a.name, str(a.type), kwargs[a.name])
    res = c.func(*args, **kwargs)
    if not parts:
        return c.each(None)
    stacked = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
    real = [t for t in tree_flatten(c.out)[0] if isinstance(t, torch.Tensor)]
    fake = [t for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor)]
    if len(real) != len(fake):
        raise _Refuse(None)
    ds = []
    for r, f in zip(real, fake, strict=True):
        if not _is_float(r):
            continue
        v = f.detach().reshape(-1)
        v = (v.real if v.is_complex() else v).to(torch.float64).cpu().numpy()
        if v.size and (v.min() < 0 or v.max() > total or not np.all(v == np.floor(v))):
            raise _Refuse(None)
        ds.append(_take(stacked, v.astype(np.int64) - 1))
    return ds


def _gather_select(c: _Call, x: torch.Tensor, idx: torch.Tensor, dim: int) -> Any:
    """Rows of x picked along `dim` by `idx` (same rank as x)."""
    d = c.deps(x)
    if d is None:
        return None
    if x.dim() == 0:
        return d
    src = torch.arange(x.numel()).reshape(x.shape).gather(dim, idx.to(torch.int64).cpu())
    return _take(d, src.reshape(-1).numpy())


def _select(c: _Call) -> list[Any]:
    """(values, indices) ops: each value is the element its index picked (exact at x)."""
    x = c.b["self"]
    idx = [t for t in tree_flatten(c.out)[0] if isinstance(t, torch.Tensor) and not _is_float(t)][0]
    dim = c.b.get("dim", -1)
    dim = -1 if dim is None else dim
    if x.dim() and idx.dim() < x.dim():  # keepdim=False
        idx = idx.unsqueeze(dim % x.dim())
    return [_gather_select(c, x, idx, dim)] + [None] * (len(c.outs) - 1)


def _pool_select(c: _Call) -> list[Any]:
    """max_pool*_with_indices and friends: indices are flat over the k spatial dims."""
    x = c.b["self"]
    k = 3 if "3d" in c.func.__name__ else 2 if "2d" in c.func.__name__ else 1
    d = c.deps(x)
    idx = [t for t in tree_flatten(c.out)[0] if isinstance(t, torch.Tensor) and not _is_float(t)][0]
    ids = torch.arange(x.numel()).reshape(x.shape).flatten(start_dim=x.dim() - k)
    pick = ids.gather(-1, idx.to(torch.int64).cpu().flatten(start_dim=idx.dim() - k))
    return [_take(d, pick.reshape(-1).numpy())] + [None] * (len(c.outs) - 1)


def _reduction(c: _Call) -> list[Any]:
    """Each output element depends on its whole reduced slice (all dims when there is no `dim`)."""
    inputs = [t for t in (c.b.get("self"), c.b.get("other")) if isinstance(t, torch.Tensor)]
    shape = tuple(torch.broadcast_shapes(*[t.shape for t in inputs]))
    d = _union([_bcast(c.deps(t), tuple(t.shape), shape) for t in inputs])
    dims = _dims(c.b.get("dim"), len(shape))
    return c.each(_reduce(d, shape, dims))


def _reduction_equal(c: _Call) -> list[Any]:
    """amax/amin, max/min/median over everything: only the elements equal to the result."""
    x = c.b["self"]
    d = c.deps(x)
    dims = _dims(c.b.get("dim"), x.dim())
    keep_shape = tuple(1 if i in dims else s for i, s in enumerate(x.shape))
    res = []
    for o in c.outs:
        v = o.detach().reshape(keep_shape)
        keep = (x.detach() == v) | torch.isnan(x.detach())
        res.append(_reduce(d, tuple(x.shape), dims, keep.reshape(-1).cpu().numpy()))
    return res


def _trace(c: _Call) -> list[Any]:
    x = c.b["self"]
    keep = torch.eye(x.shape[0], x.shape[1], dtype=torch.bool).reshape(-1).numpy()
    return [_reduce(c.deps(x), tuple(x.shape), [0, 1], keep)]


def _cumulative(c: _Call) -> list[Any]:
    """cumsum/cumprod/logcumsumexp: element i along dim depends on elements 0..i."""
    x = c.b["self"]
    d = c.deps(x)
    if x.dim() == 0:
        return c.each(d)
    dim = c.b["dim"] % x.dim()
    outer, length, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1 :])
    ii, jj = np.tril_indices(length)
    _guard(outer * inner * len(ii))
    o = np.arange(outer).reshape(-1, 1, 1) * length
    k = np.arange(inner).reshape(1, 1, -1)
    rows = ((o + ii.reshape(1, -1, 1)) * inner + k).reshape(-1)
    cols = ((o + jj.reshape(1, -1, 1)) * inner + k).reshape(-1)
    return c.each(_matmul(_coo(rows, cols, (x.numel(), x.numel())), d))


def _softmax(c: _Call) -> list[Any]:
    x = c.b["self"]
    if x.dim() == 0:
        return c.each(c.deps(x))
    return c.each(_mix(c.deps(x), tuple(x.shape), _dims(c.b["dim"], x.dim()))[0])


def _cross(c: _Call) -> list[Any]:
    """Component i of a x b depends on components i+1 and i+2 (mod 3) of both."""
    a, b = c.b["self"], c.b["other"]
    shape = tuple(c.outs[0].shape)
    d = _union([_bcast(c.deps(t), tuple(t.shape), shape) for t in (a, b)])
    dim = c.b["dim"] % len(shape)
    ids = torch.arange(math.prod(shape)).reshape(shape)
    return c.each(_union([_take(d, ids.roll(-s, dim).reshape(-1).numpy()) for s in (1, 2)]))


def _glu(c: _Call) -> list[Any]:
    x = c.b["self"]
    dim = c.b["dim"] % x.dim()
    half = x.shape[dim] // 2
    ids = torch.arange(x.numel()).reshape(x.shape)
    d = c.deps(x)
    first = ids.narrow(dim, 0, half).reshape(-1).numpy()
    second = ids.narrow(dim, half, half).reshape(-1).numpy()
    return c.each(_union([_take(d, first), _take(d, second)]))


def _channel(c: _Call, t: object, shape: tuple[int, ...]) -> Any:
    """A per-channel (dim 1) tensor's rows, broadcast over an input of `shape`."""
    if not isinstance(t, torch.Tensor):
        return None
    view = tuple(s if i == 1 else 1 for i, s in enumerate(shape))
    return _bcast(c.deps(t), view, shape)


def _layer_norm(c: _Call) -> list[Any]:
    x = c.b["input"]
    k = len(c.b["normalized_shape"])
    shape = tuple(x.shape)
    per, per_slice = _mix(c.deps(x), shape, list(range(x.dim() - k, x.dim())))
    norm = tuple(shape[x.dim() - k :])
    affine = [_bcast(c.deps(t), norm, shape) for t in (c.b["weight"], c.b["bias"]) if isinstance(t, torch.Tensor)]
    return [_union([per, *affine])] + [per_slice] * (len(c.outs) - 1)


def _batch_norm(c: _Call) -> list[Any]:
    x = c.b["input"]
    shape = tuple(x.shape)
    training = bool(c.b.get("training", False))
    affine = [_channel(c, c.b.get(name), shape) for name in ("weight", "bias")]
    if training:
        per, stats = _mix(c.deps(x), shape, [i for i in range(x.dim()) if i != 1])
        for name in ("running_mean", "running_var"):
            r = c.b.get(name)
            if isinstance(r, torch.Tensor) and r.numel():
                c.tracer.write(r, _union([c.deps(r), stats]))
    else:
        stats = None
        per = _union([c.deps(x)] + [_channel(c, c.b.get(name), shape) for name in ("running_mean", "running_var")])
    return [_union([per, *affine])] + [stats if o.numel() else None for o in c.outs[1:]]


def _group_norm(c: _Call) -> list[Any]:
    x = c.b["input"]
    n, ch, hxw, groups = c.b["N"], c.b["C"], c.b["HxW"], c.b["group"]
    if n * ch * hxw != x.numel() or ch % groups:
        raise _Refuse(None)
    shape = tuple(x.shape)
    per, stats = _mix(c.deps(x), (n, groups, ch // groups * hxw), [2])
    affine = [_channel(c, c.b.get(name), shape) for name in ("weight", "bias")]
    return [_union([per, *affine]), stats, stats][: len(c.outs)]


def _loss(c: _Call) -> list[Any]:
    """Element-wise losses: the union of their (broadcast) inputs, reduced over all unless reduction='none'."""
    x = c.b["self"]
    shape = tuple(x.shape)
    inputs = [v for v in c.b.values() if _is_float(v)]
    d = _union([_bcast(c.deps(t), tuple(t.shape), shape) for t in inputs])
    return c.each(d if c.b["reduction"] == 0 else _reduce(d, shape, list(range(len(shape)))))


def _nll_loss(c: _Call) -> list[Any]:
    """nll_loss: each sample picks its target class (ignore_index picks nothing); weight by class."""
    x, target, weight = c.b["self"], c.b["target"].to(torch.int64).cpu(), c.b["weight"]
    cdim = 0 if x.dim() == 1 else 1
    n_cls = x.shape[cdim]
    valid = target != c.b["ignore_index"]
    cls = torch.where(valid, target, 0).clamp(0, max(n_cls - 1, 0))
    ids = torch.arange(x.numel()).reshape(x.shape)
    picks = torch.where(valid, ids.gather(cdim, cls.unsqueeze(cdim)).squeeze(cdim), -1).reshape(-1).numpy()
    dw = None
    if isinstance(weight, torch.Tensor):
        dw = _take(c.deps(weight), torch.where(valid, cls, -1).reshape(-1).numpy())
    per = _union([_take(c.deps(x), picks), dw])
    total = None if dw is None else _reduce(dw, (dw.shape[0],), [0])
    if c.b["reduction"] != 0:
        per = None if per is None else _reduce(per, (per.shape[0],), [0])
    return [per, total][: len(c.outs)]


def _nonzero(t: torch.Tensor, d: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Coordinates (in `shape`, a reshape of t) of a matmul operand's structurally non-zero elements.

    Traced elements count as non-zero; constants by value. A sparse constant (COO, CSR, ...)
    gives its stored non-zeros without being made dense.
    """
    if t.layout == torch.strided:
        p = (t.detach() != 0).reshape(-1).cpu().numpy()
        if d is not None:
            p = p | (np.diff(d.indptr) > 0)
        return np.unravel_index(np.flatnonzero(p), shape)
    coo = (t if t.layout == torch.sparse_coo else t.to_sparse_coo()).coalesce()
    if coo.values().dim() != 1:
        raise _Refuse("it multiplies by a hybrid sparse tensor")
    keep = (coo.values() != 0).cpu().numpy()
    flat = np.ravel_multi_index(tuple(coo.indices().cpu().numpy()), tuple(t.shape))[keep]
    return np.unravel_index(flat, shape)


def _bmm(c: _Call, a: torch.Tensor, b: torch.Tensor, bmn: tuple[int, int, int, int]) -> Any:
    """Rows of out (nb, m, n) = a (nb, m, k) @ b (nb, k, n): out[i,j] needs a[i,k] where b[k,j] != 0 and vice versa."""
    nb, m, k, n = bmn
    da, db = c.deps(a), c.deps(b)
    res = []
    if da is not None:
        bb, kk, jj = _nonzero(b, db, (nb, k, n))
        _guard(len(bb) * m)
        i = np.arange(m).reshape(1, -1)
        rows = ((bb[:, None] * m + i) * n + jj[:, None]).reshape(-1)
        cols = ((bb[:, None] * m + i) * k + kk[:, None]).reshape(-1)
        res.append(_matmul(_coo(rows, cols, (nb * m * n, nb * m * k)), da))
    if db is not None:
        bb, ii, kk = _nonzero(a, da, (nb, m, k))
        _guard(len(bb) * n)
        j = np.arange(n).reshape(1, -1)
        rows = ((bb[:, None] * m + ii[:, None]) * n + j).reshape(-1)
        cols = ((bb[:, None] * k + kk[:, None]) * n + j).reshape(-1)
        res.append(_matmul(_coo(rows, cols, (nb * m * n, nb * k * n)), db))
    return _union(res)


def _matmul_rule(c: _Call) -> list[Any]:
    """mm, bmm, mv, dot, vdot and their add* forms (the added `self` is broadcast, pointwise)."""
    name = c.func.overloadpacket.__name__.rstrip("_")
    b = c.b
    if name in ("mm", "addmm", "_addmm_activation", "_sparse_addmm"):
        a, w = (b["self"], b["mat2"]) if name == "mm" else (b["mat1"], b["mat2"])
        dims = (1, a.shape[0], a.shape[1], w.shape[1])
    elif name in ("bmm", "baddbmm", "addbmm"):
        a, w = (b["self"], b["mat2"]) if name == "bmm" else (b["batch1"], b["batch2"])
        dims = (a.shape[0], a.shape[1], a.shape[2], w.shape[2])
    elif name in ("mv", "addmv"):
        a, w = (b["self"], b["vec"]) if name == "mv" else (b["mat"], b["vec"])
        dims = (1, a.shape[0], a.shape[1], 1)
    elif name in ("dot", "vdot"):
        a, w = b["self"], b["tensor"] if name == "dot" else b["other"]
        dims = (1, 1, a.shape[0], 1)
    else:
        raise _Refuse(None)
    d = _bmm(c, a, w, dims)
    if name == "addbmm":
        d = None if d is None else _reduce(d, dims[:2] + dims[3:], [0])
    if name not in ("mm", "bmm", "mv", "dot", "vdot"):
        o = tuple(c.outs[0].shape)
        s = b["self"]
        d = _union([d, _bcast(c.deps(s), tuple(s.shape), o)])
    return c.each(d)


def _addr(c: _Call) -> list[Any]:
    s, v1, v2 = c.b["self"], c.b["vec1"], c.b["vec2"]
    o = tuple(c.outs[0].shape)
    return c.each(
        _union(
            [
                _bcast(c.deps(s), tuple(s.shape), o),
                _bcast(c.deps(v1), (v1.shape[0], 1), o),
                _bcast(c.deps(v2), (1, v2.shape[0]), o),
            ]
        )
    )


def _scatter(c: _Call) -> list[Any]:
    """index_put, scatter*, index_add/copy/fill: each target row = (its old row unless overwritten) | what lands on it.

    A plain write keeps every writer of a duplicated index (as autograd does), so it is
    exact without duplicates and conservative with them.
    """
    name = c.func.overloadpacket.__name__.rstrip("_")
    b = c.b
    x = b["self"]
    target = torch.arange(x.numel()).reshape(x.shape)
    src: torch.Tensor | None = None
    if name in ("index_put", "_index_put_impl", "_unsafe_index_put"):
        indices = [None if i is None else i.cpu() for i in b["indices"]]
        sel = aten.index.Tensor(target, indices)
        src = b["values"]
        clear = not b["accumulate"]
    elif name in ("scatter", "scatter_add", "scatter_reduce"):
        index = b["index"].to(torch.int64).cpu()
        sel = target.gather(b["dim"], index)
        src = b.get("src")
        if not isinstance(src, torch.Tensor):
            src = b.get("value") if isinstance(b.get("value"), torch.Tensor) else None
        clear = name == "scatter" and b.get("reduce") is None
    elif name in ("index_add", "index_copy", "index_fill"):
        sel = target.index_select(b["dim"], b["index"].to(torch.int64).cpu()) if x.dim() else target
        src = b.get("source")
        if not isinstance(src, torch.Tensor):
            src = b.get("value") if isinstance(b.get("value"), torch.Tensor) else None
        clear = name != "index_add"
    else:
        raise _Refuse(None)
    rows = sel.reshape(-1).numpy()
    d = c.deps(x)
    if clear and d is not None:
        kept = np.arange(x.numel())
        kept[rows] = -1
        d = _take(d, kept)
    ds = c.deps(src) if src is not None else None
    if ds is not None:
        if src.numel() == 1:
            cols = np.zeros(len(rows), dtype=np.int64)
        elif name in ("scatter", "scatter_add", "scatter_reduce"):
            ids = torch.arange(src.numel()).reshape(src.shape)
            cols = ids[tuple(slice(0, s) for s in sel.shape)].reshape(-1).numpy()
        else:
            cols = torch.arange(src.numel()).reshape(src.shape).broadcast_to(sel.shape).reshape(-1).numpy()
        d = _union([d, _matmul(_coo(rows, cols, (x.numel(), src.numel())), ds)])
    return c.each(d)


def _names(*names: str) -> list[object]:
    """The aten packets / overloads named ("max.default" picks one overload), skipping any this torch lacks."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and overload:
            op = getattr(op, overload, None)
        if op is not None:
            found.append(op)
    return found


# Ops that only change a tensor's metadata in place (the storage approach follows them).
_METADATA = set(_names("as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_", "swapaxes_", "swapdims_", "detach_"))
# Ops that return an alias without declaring it.
_ALIASES = set(_names("_unsafe_view", "lift_fresh", "alias", "detach", "_reshape_alias"))
# Rules that handle the writes an op does not return.
_HANDLES_HIDDEN = set(_names("native_batch_norm", "_native_batch_norm_legit"))

_RULES: dict[object, Callable[[_Call], list[Any]]] = {}
for _op in _names(
    "copy", "copy_", "_unsafe_view",
    "cat", "stack", "hstack", "vstack", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
    "replication_pad1d", "replication_pad2d", "replication_pad3d", "_pad_circular", "roll", "flip", "rot90",
    "index", "_unsafe_index", "index_select", "gather", "take", "masked_select", "embedding", "repeat",
    "repeat_interleave", "where", "masked_fill", "masked_fill_", "masked_scatter", "masked_scatter_", "fill", "fill_",
    "zero_", "tril", "tril_", "triu", "triu_", "diag", "diag_embed", "block_diag", "slice_scatter", "select_scatter",
    "diagonal_scatter", "as_strided_scatter", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
    "native_channel_shuffle", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
    "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "im2col", "narrow_copy",
    "view_copy", "_reshape_copy", "permute_copy", "transpose_copy", "t_copy", "unsqueeze_copy", "squeeze_copy",
    "expand_copy", "select_copy", "slice_copy", "diagonal_copy", "as_strided_copy", "unfold_copy", "split_copy",
    "split_with_sizes_copy", "unbind_copy",
):  # fmt: skip
    _RULES[_op] = _move
for _op in _names(
    "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put", "scatter", "scatter_", "scatter_add",
    "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add", "index_add_", "index_copy", "index_copy_",
    "index_fill", "index_fill_",
):  # fmt: skip
    _RULES[_op] = _scatter
for _op in _names(
    "sum", "mean", "nansum", "prod", "logsumexp", "linalg_vector_norm", "norm", "var", "std", "var_mean", "std_mean",
    "dist",
):  # fmt: skip
    _RULES[_op] = _reduction
for _op in _names("amax", "amin", "aminmax", "max.default", "min.default", "median.default", "nanmedian.default"):
    _RULES[_op] = _reduction_equal
for _op in _names(
    "max.dim", "min.dim", "sort", "topk", "kthvalue", "median.dim", "nanmedian.dim", "mode", "cummax", "cummin",
):  # fmt: skip
    _RULES[_op] = _select
for _op in _names(
    "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "fractional_max_pool2d", "fractional_max_pool3d",
):  # fmt: skip
    _RULES[_op] = _pool_select
for _op in _names("cumsum", "cumsum_", "cumprod", "cumprod_", "logcumsumexp", "_logcumsumexp"):
    _RULES[_op] = _cumulative
for _op in _names("_softmax", "_log_softmax", "_safe_softmax"):
    _RULES[_op] = _softmax
for _op in _names("mm", "bmm", "mv", "dot", "vdot", "addmm", "addmm_", "addmv", "addmv_", "baddbmm", "baddbmm_",
                  "addbmm", "addbmm_", "_addmm_activation", "_sparse_addmm"):  # fmt: skip
    _RULES[_op] = _matmul_rule
for _op in _names(
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "new_empty_strided", "bernoulli", "bernoulli_", "normal_", "uniform_",
    "exponential_", "random_", "cauchy_", "log_normal_", "geometric_", "sign", "sign_", "sgn", "sgn_", "floor",
    "floor_", "ceil", "ceil_", "round", "round_", "trunc", "trunc_",
):  # fmt: skip
    _RULES[_op] = _constant
for _op in _names(
    "_to_copy", "lift_fresh_copy", "alias_copy", "detach_copy", "hardswish", "hardswish_", "_prelu_kernel",
    "log_sigmoid_forward", "native_dropout", "complex", "polar",
):  # fmt: skip
    _RULES[_op] = _pointwise
_RULES.update(dict.fromkeys(_names("addr", "addr_"), _addr))
_RULES.update(dict.fromkeys(_names("trace"), _trace))
_RULES.update(dict.fromkeys(_names("linalg_cross"), _cross))
_RULES.update(dict.fromkeys(_names("glu"), _glu))
_RULES.update(dict.fromkeys(_names("native_layer_norm"), _layer_norm))
_RULES.update(
    dict.fromkeys(_names("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training"), _batch_norm)
)
_RULES.update(dict.fromkeys(_names("native_group_norm"), _group_norm))
_RULES.update(
    dict.fromkeys(
        _names(
            "mse_loss", "smooth_l1_loss", "huber_loss", "soft_margin_loss", "binary_cross_entropy",
            "binary_cross_entropy_with_logits",
        ),
        _loss,
    )
)  # fmt: skip
_RULES.update(dict.fromkeys(_names("nll_loss_forward", "nll_loss2d_forward"), _nll_loss))
del _op

__all__ = ["MAX_NNZ", "detect_pattern"]
