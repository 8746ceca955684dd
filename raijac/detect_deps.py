"""detect_deps: dependency matrices for `detect` (scipy.sparse algebra the tracer and its rules share).

A dependency matrix is a boolean CSR matrix with one row per element of a tensor (C order)
and one column per element of x: row e lists the input elements that element e depends on.
None stands for "depends on nothing" throughout, so constants cost no matrix at all.
Every helper that could build a large matrix checks its size against `MAX_NNZ` first and
raises `_Refuse`, which the tracer turns into a `ProblemError` naming the op.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

# NOTE: [budget] A dependency matrix is refused beyond this many nonzeros (about 5 bytes
# each): dense Jacobians (a full sum broadcast back, a dense matmul) are not for detection.
MAX_NNZ = 100_000_000


class _Refuse(Exception):
    """An op cannot be traced; `why` is None for "not supported" or a short reason."""

    def __init__(self, why: str | None = None) -> None:
        super().__init__(why)
        self.why = why


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


def _csr(indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> Any:
    import scipy.sparse as sp

    return sp.csr_matrix((np.ones(len(indices), dtype=bool), indices, indptr), shape=shape)


def _nothing(rows: int, n: int) -> Any:
    """`rows` empty rows."""
    return _csr(np.zeros(0, dtype=np.int32), np.zeros(rows + 1, dtype=np.int32), (rows, n))


def _tensors(args: tuple, kwargs: dict, skip: set[str]) -> list[torch.Tensor]:
    leaves = list(args) + [v for k, v in kwargs.items() if k not in skip]
    return [t for t in tree_flatten(leaves)[0] if isinstance(t, torch.Tensor)]
