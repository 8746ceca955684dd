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

Layout: this module holds `detect_pattern` and the tracer (the storage table and the
dispatch loop); `detect_rules` the per-op rules and their table; `detect_deps` the
dependency-matrix algebra both use. Imports flow detect -> detect_rules -> detect_deps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from raijac.detect_deps import MAX_NNZ, _coo, _csr, _is_float, _matmul, _nothing, _Refuse, _take, _tensors, _union
from raijac.detect_rules import _ALIASES, _HANDLES_HIDDEN, _METADATA, _RULES, Call, _pointwise
from raijac.errors import ProblemError

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


def _refusal(func: object, why: str | None) -> ProblemError:
    if why is None:
        return ProblemError(f'sparsity="detect" cannot trace {func} (the first operation it does not support); {_FIX}')
    return ProblemError(f'sparsity="detect" cannot trace {func} ({why}); {_FIX}')


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
        call = Call(self, func, args, kwargs, out, outs)
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


__all__ = ["MAX_NNZ", "detect_pattern"]
