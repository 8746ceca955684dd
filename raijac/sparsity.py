"""sparsity: a Jacobian's sparsity pattern -> a colouring of its columns or rows (numpy + scipy; feeds plan and kernels).

Columns of J that share no row can be seeded together: one JVP with the sum of their unit
vectors yields all of them, each entry landing in its own row. Grouping columns so, a
distance-2 colouring of the column intersection graph, turns N JVPs into as many as there
are colours (3 for a tridiagonal J, whatever N). Rows coloured likewise need that many VJPs.

NOTE: [colouring] Up to three heuristics run and the fewest colours win:
- cyclic: colour `j mod k` for the smallest valid k from the lower bound (the most non-zeros
  in one row) up; optimal for banded patterns in natural order, and instant.
- greedy in natural order: each column takes the smallest colour none of its conflicting
  columns has, in index order; grid stencils get near-optimal counts (7 for the 5-point
  stencil, whose optimum is 5) because neighbouring indices are neighbouring points. A
  plain Python loop, so it runs up to `MAX_SEQUENTIAL_ENTRIES` conflict-graph entries.
- greedy largest-first: by decreasing degree, ties in a seeded random order, computed as
  Jones-Plassmann rounds in numpy (a vertex takes its smallest free colour once every
  higher-priority neighbour has one: exactly the sequential greedy colouring in that
  order); best on irregular patterns, and the only greedy left for the largest graphs.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from raijac import modes
from raijac.detect import detect_pattern
from raijac.errors import ProblemError

if TYPE_CHECKING:
    from raijac.problem import Problem

Axis = Literal["rows", "cols"]
# Above this many conflict-graph entries an axis is not coloured greedily (the graph would
# not fit comfortably); such an axis needs nearly as many colours as it has entries anyway.
MAX_GRAPH_ENTRIES = 200_000_000
MAX_SEQUENTIAL_ENTRIES = 30_000_000  # the natural-order greedy loop: a few seconds at most


@dataclass(frozen=True, eq=False)
class Pattern:
    """The structural non-zeros of one (per-sample) Jacobian `(M, N)`, row-major and unique."""

    rows: np.ndarray  # int64, sorted by (row, col)
    cols: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    @property
    def density(self) -> float:
        return self.nnz / max(math.prod(self.shape), 1)

    def csr(self):
        """The pattern as a scipy CSR array of ones (int8)."""
        import scipy.sparse as sp

        data = np.ones(self.nnz, np.int8)
        return sp.csr_array((data, (self.rows, self.cols)), shape=self.shape)

    def row_ptr(self) -> np.ndarray:
        """CSR row pointers: row i's entries are `rows[ptr[i]:ptr[i+1]]`."""
        return np.searchsorted(self.rows, np.arange(self.shape[0] + 1), side="left").astype(np.int64)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(np.asarray(self.shape, np.int64).tobytes())
        h.update(self.rows.tobytes())
        h.update(self.cols.tobytes())
        return h.hexdigest()[:16]


def make_pattern(spec: Any, shape: tuple[int, int]) -> Pattern:
    """A `Pattern` from a scipy.sparse matrix or a `(rows, cols)` pair of index arrays."""
    m, n = shape
    if hasattr(spec, "tocoo") and hasattr(spec, "shape"):
        if tuple(spec.shape) != (m, n):
            raise ProblemError(
                f"the sparsity pattern has shape {tuple(spec.shape)}, but this Jacobian is {m} x {n} (outputs x inputs, "
                "per sample); build the pattern with that shape."
            )
        coo = spec.tocoo()
        keep = coo.data != 0 if coo.data.dtype != bool else coo.data
        rows, cols = np.asarray(coo.row)[keep], np.asarray(coo.col)[keep]
    elif isinstance(spec, tuple | list) and len(spec) == 2:
        try:
            rows, cols = (np.asarray(a) for a in spec)
        except Exception as exc:
            raise ProblemError(f"sparsity=(rows, cols) must be two 1-D integer arrays: {exc}") from None
        if rows.shape != cols.shape or rows.ndim != 1:
            raise ProblemError(
                f"sparsity=(rows, cols) must be two 1-D integer arrays of one length, but got shapes {rows.shape} and "
                f"{cols.shape}; pass the row and column index of every structural non-zero."
            )
        if rows.size and not (np.issubdtype(rows.dtype, np.integer) and np.issubdtype(cols.dtype, np.integer)):
            raise ProblemError(
                f"sparsity=(rows, cols) must hold integer indices, but got {rows.dtype} and {cols.dtype}; "
                "pass flat output and input indices."
            )
    else:
        raise ProblemError(
            f"sparsity must be a scipy.sparse matrix, a (rows, cols) pair of index arrays or 'detect', but got "
            f"{type(spec).__name__}."
        )
    rows, cols = rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False)
    for name, idx, size, what in (("row", rows, m, "outputs"), ("column", cols, n, "inputs")):
        bad = idx[(idx < 0) | (idx >= size)]
        if bad.size:
            raise ProblemError(
                f"sparsity {name} index {int(bad[0])} is out of range: this Jacobian has {size} {what} per sample "
                f"(valid {name}s 0..{size - 1}, flat C order)."
            )
    key = _sorted_unique(rows * n + cols)
    return Pattern(key // max(n, 1), key % max(n, 1), (m, n))


_RESOLVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_pattern(problem: Problem) -> Pattern | None:
    """The problem's sparsity pattern as a `Pattern` (traced once for `"detect"`), or None for a dense problem.

    Kept beside the problem (weakly), so asking twice traces once and the problem itself
    stays a plain description."""
    if problem.sparsity is None:
        return None
    if problem not in _RESOLVED:
        _RESOLVED[problem] = _resolve(problem)
    return _RESOLVED[problem]


def _resolve(problem: Problem) -> Pattern:
    spec = problem.sparsity
    if isinstance(spec, Pattern):
        spec = (spec.rows, spec.cols)
    elif isinstance(spec, str):  # "detect": Problem refuses other strings
        if problem.wrt == "params":
            raise ProblemError("sparsity='detect' traces input Jacobians only; pass the parameter pattern itself.")
        f = problem.f
        if problem.batched:  # samples share one pattern: trace sample 0
            spec = detect_pattern(lambda z: f(z[None])[0], problem.x[0])
        else:
            spec = detect_pattern(f, problem.x)
    return make_pattern(spec, (problem.n_out, problem.n_in))


def _sorted_unique(key: np.ndarray) -> np.ndarray:
    """Sorted distinct values (already sorted input, the usual case, costs one pass)."""
    if key.size > 1 and not bool((key[1:] > key[:-1]).all()):
        key = np.sort(key)
        key = key[np.r_[True, key[1:] != key[:-1]]]
    return key


@dataclass(frozen=True, eq=False)
class Colouring:
    """Colour of every column (`axis="cols"`, forward mode) or row (`"rows"`, reverse mode)."""

    axis: Axis
    colours: np.ndarray  # int32, one per column or row
    n_colours: int
    method: str

    @property
    def mode(self) -> str:
        return "fwd" if self.axis == "cols" else "rev"


def colour(pattern: Pattern, axis: Axis) -> Colouring:
    """A distance-2 colouring of the columns (or rows) of `pattern` (see NOTE: [colouring])."""
    a = pattern.csr()
    if axis == "rows":
        a = a.T.tocsr()  # rows of J are the columns of J^T
    m, n = a.shape
    if n == 0:
        return Colouring(axis, np.zeros(0, np.int32), 0, "empty")
    degree = np.diff(a.indptr)  # non-zeros per row: they all need distinct colours
    lower = int(degree.max()) if m else 0
    if lower == 0:
        return Colouring(axis, np.zeros(n, np.int32), 1 if n else 0, "no non-zeros")
    best, method = _cyclic(a, lower), "cyclic"
    if best is not None and best.max() + 1 <= lower + 1:
        return Colouring(
            axis,
            best,
            int(best.max()) + 1,
            "cyclic (optimal: equals the densest line)" if best.max() + 1 == lower else "cyclic (within one of optimal)",
        )
    entries = int((degree.astype(np.int64) ** 2).sum())  # bounds the conflict graph's size
    if entries <= MAX_GRAPH_ENTRIES:
        graph = _conflicts(a)
        tries = []
        if entries <= MAX_SEQUENTIAL_ENTRIES:
            tries.append(("greedy natural order", _greedy_natural))
        if entries <= MAX_SEQUENTIAL_ENTRIES // 8 or entries > MAX_SEQUENTIAL_ENTRIES:
            tries.append(("greedy largest-first", _greedy))
        for name, run in tries:
            got = run(graph)
            if best is None or got.max() < best.max():
                best, method = got, name
    if best is not None:
        return Colouring(axis, best, int(best.max()) + 1, method)
    return Colouring(axis, np.arange(n, dtype=np.int32), n, "none (too dense to colour)")


def choose(pattern: Pattern, mode: str = "auto") -> tuple[Colouring, Colouring | None]:
    """The colouring to use, and the other axis's (None when the mode fixed the axis).

    `auto` colours both and takes the fewer colours (columns on a tie: JVPs need no
    stored forward pass); modes that seed rows colour rows, the others columns.
    """

    if mode != "auto":
        return colour(pattern, modes.seed_axis(mode)), None
    cols, rows = colour(pattern, "cols"), colour(pattern, "rows")
    return (cols, rows) if cols.n_colours <= rows.n_colours else (rows, cols)


def _cyclic(a, lower: int, tries: int = 24) -> np.ndarray | None:
    """`j mod k` for the smallest valid k in lower..lower+tries, else None."""
    m, n = a.shape
    row_of = np.repeat(np.arange(m, dtype=np.int64), np.diff(a.indptr))
    cols = a.indices.astype(np.int64)
    for k in range(lower, min(lower + tries, n) + 1):
        key = row_of * k + cols % k
        if np.bincount(key, minlength=m * k).max() <= 1:
            return (np.arange(n) % k).astype(np.int32)
    return None


def _conflicts(a):
    """The column intersection graph of `a` (columns sharing a row), without self-loops."""
    g = (a.T @ a).tocsr()
    g.setdiag(0)
    g.eliminate_zeros()
    return g


def _greedy_natural(g) -> np.ndarray:
    """Sequential greedy colouring of graph `g` in index order."""
    ptr, idx = g.indptr.tolist(), g.indices.tolist()
    colours = [-1] * g.shape[0]
    for v in range(g.shape[0]):
        used = {colours[u] for u in idx[ptr[v] : ptr[v + 1]]}
        c = 0
        while c in used:
            c += 1
        colours[v] = c
    return np.asarray(colours, np.int32)


def _greedy(g, seed: int = 0) -> np.ndarray:
    """Greedy colouring of graph `g`, largest degree first (Jones-Plassmann rounds)."""
    n = g.shape[0]
    degree = np.diff(g.indptr).astype(np.int64)
    rank = np.random.default_rng(seed).permutation(n).astype(np.int64)
    priority = degree * n + rank  # unique: degree first, random ties
    src = np.repeat(np.arange(n, dtype=np.int64), degree)
    dst = g.indices.astype(np.int64)
    colours = np.full(n, -1, np.int64)
    while True:
        open_ = colours < 0
        if not open_.any():
            break
        live = open_[src]  # edges out of uncoloured vertices; coloured sources are done
        src, dst = src[live], dst[live]
        blocked = np.zeros(n, bool)
        waits = open_[dst] & (priority[dst] > priority[src])
        blocked[src[waits]] = True
        ready = open_ & ~blocked
        # The smallest colour no coloured neighbour of a ready vertex has (its "mex").
        hit = ready[src] & ~open_[dst]
        s, c = src[hit], colours[dst[hit]]
        mex = np.zeros(n, np.int64)
        if s.size:
            width = int(c.max()) + 2
            keys = _sorted_unique(s * width + c)
            ks, kc = keys // width, keys % width
            starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
            seg = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, ks.size]))
            pos = np.arange(ks.size) - starts[seg]
            first = np.diff(np.r_[starts, ks.size])  # no gap: the colour after the last
            gaps = np.flatnonzero(kc != pos)
            if gaps.size:
                gseg, at = np.unique(seg[gaps], return_index=True)
                first[gseg] = pos[gaps[at]]
            mex[ks[starts]] = first
        colours[ready] = mex[ready]
    return colours.astype(np.int32)
