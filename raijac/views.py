"""views: lazy, read-only views of a stored Jacobian for the reader (zarr and numpy only).

`Unflattened` indexes J in f's input and output shapes, `LeafBlock` is one output leaf
against one input leaf (`Jacobian.tree()`), `SparseView` reads a sparse store's non-zeros
as if they were the dense array. Each turns an index into the few chunks it touches.
"""

from __future__ import annotations

import ast
import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from raijac.errors import ReadError

if TYPE_CHECKING:
    from raijac.reader import Jacobian


class Unflattened:
    """A lazy view of a stored Jacobian in its original shapes: `(B?, *output_shape, *input_shape)`.

    Indexing converts the multi-index to flat rows and columns and reads only the chunks
    they touch: ints drop their axis, slices and sequences of ints keep it (orthogonal
    indexing, as `zarr.Array.oindex`).
    """

    def __init__(self, jac: Jacobian) -> None:
        self.jac = jac
        lead = (jac.shape[0],) if jac.batched else ()
        self.shape: tuple[int, ...] = (*lead, *jac.output_shape, *jac.input_shape)
        names = ["batch"] if jac.batched else []
        names += [f"output dim {i}" for i in range(len(jac.output_shape))]
        names += [f"input dim {i}" for i in range(len(jac.input_shape))]
        self.axis_names: tuple[str, ...] = tuple(names)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.jac.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        parts = _expand(key, self.ndim, self.shape)
        sel = [_select(k, n, name) for k, n, name in zip(parts, self.shape, self.axis_names, strict=True)]
        lead = 1 if self.jac.batched else 0
        n_out = len(self.jac.output_shape)
        groups = [sel[:lead], sel[lead : lead + n_out], sel[lead + n_out :]]
        flat: list[Any] = []
        kept: list[int] = []
        if self.jac.batched:
            flat.append(sel[0][0])
            kept += [sel[0][1]] if sel[0][1] is not None else []
        for group, dims in ((groups[1], self.jac.output_shape), (groups[2], self.jac.input_shape)):
            flat.append(_flat_indices([s for s, _ in group], dims))
            kept += [n for _, n in group if n is not None]
        block = _read(self.jac.array, flat, [None] * len(flat))
        return block.reshape(kept)

    def numpy(self) -> np.ndarray:
        """Everything, in memory."""
        return self.jac.numpy().reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.numpy()
        return data if dtype is None else data.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __repr__(self) -> str:
        return f"Unflattened({self.jac.path!r}, shape={self.shape}, axes={self.axis_names})"


class LeafBlock:
    """The block of J between one output leaf and one input leaf, read on demand."""

    def __init__(self, jac: Jacobian, out: tuple[str, tuple[int, ...], int], inp: tuple[str, tuple[int, ...], int]) -> None:
        self.jac, self.out, self.inp = jac, out, inp
        lead = (jac.shape[0],) if jac.batched else ()
        self.shape: tuple[int, ...] = (*lead, *out[1], *inp[1])

    def numpy(self) -> np.ndarray:
        rows = slice(self.out[2], self.out[2] + math.prod(self.out[1]))
        cols = slice(self.inp[2], self.inp[2] + math.prod(self.inp[1]))
        key = (slice(None), rows, cols) if self.jac.batched else (rows, cols)
        return np.asarray(self.jac.array[key]).reshape(self.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.numpy()
        return data if dtype is None else data.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.numpy()[key]

    def __repr__(self) -> str:
        return f"LeafBlock(d {self.out[0]} / d {self.inp[0]}, shape={self.shape})"


# ---------------------------------------------------------------------- jacrev's structure
# A pytree path as `pytree.keystr` writes it: `[0]` (a sequence), `['logits']` (a mapping),
# `.logits` (an attribute).
_KEY = re.compile(r"\[(-?\d+)\]|\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]|\.([A-Za-z_]\w*)")


def _path(name: str, prefix: str) -> list[int | str]:
    """The keys of a stored leaf's name after its prefix (`y`, `args[1]`): ints index a
    sequence, strings a mapping or a dataclass's fields."""
    rest, keys = name[len(prefix) :], []
    while rest:
        m = _KEY.match(rest)
        if m is None:
            raise ReadError(f"cannot read the leaf name {name!r} back into a structure; use Jacobian.tree() instead.")
        index, quoted, attr = m.groups()
        keys.append(int(index) if index is not None else ast.literal_eval(quoted) if quoted is not None else attr)
        rest = rest[m.end() :]
    return keys


def _nest(items: list[tuple[list[int | str], Any]]) -> Any:
    """The container these (path, value) pairs are the leaves of: tuples where the keys are
    positions (a dropped `None` output stays `None` in its place), dicts otherwise."""
    if len(items) == 1 and not items[0][0]:
        return items[0][1]
    groups: dict[int | str, list[tuple[list[int | str], Any]]] = {}
    for keys, value in items:
        groups.setdefault(keys[0], []).append((keys[1:], value))
    if all(isinstance(k, int) for k in groups):
        return tuple(_nest(groups[i]) if i in groups else None for i in range(max(groups) + 1))  # type: ignore[call-overload]
    return {k: _nest(v) for k, v in groups.items()}


def jacrev_structure(jac: Jacobian) -> Any:
    """J as `torch.func.jacrev(f, argnums)` (batched: `vmap(jacrev(f))`) returns it: f's output
    structure, each output leaf holding the structure of the differentiated inputs (a tuple
    over `argnums` where it is a tuple), each leaf a lazy `LeafBlock`."""
    outs = _leaves(jac.meta.get("outputs"), "y", jac.output_shape)
    ins = _leaves(jac.meta.get("inputs"), "args[0]", jac.input_shape)
    argnums = jac.meta.get("argnums")
    if argnums is None:  # a store from before argnums was recorded: the inputs it holds, in order
        found = sorted({k for k in (_arg_of(i[0]) for i in ins) if k is not None}, key=lambda k: (isinstance(k, str), k)) or [0]
        argnums = found[0] if len(found) == 1 else found

    def inputs(out: tuple[str, tuple[int, ...], int]) -> Any:
        def arg(k: int | str) -> Any:
            prefix = f"kwargs[{k!r}]" if isinstance(k, str) else f"args[{k}]"
            mine = [(_path(i[0], prefix), LeafBlock(jac, out, i)) for i in ins if _arg_of(i[0]) == k]
            if not mine:
                raise ReadError(f"the store records no differentiated input {prefix}; use Jacobian.tree() instead.")
            return _nest(mine)

        return tuple(arg(k) for k in argnums) if isinstance(argnums, list | tuple) else arg(argnums)

    return _nest([(_path(o[0], "y"), inputs(o)) for o in outs])


def _arg_of(name: str) -> int | str | None:
    """The input a leaf name belongs to: its position (`args[1]...`) or keyword (`kwargs['e']...`)."""
    m = re.match(r"args\[(\d+)\]", name)
    if m:
        return int(m.group(1))
    m = re.match(r"""kwargs\[('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""", name)  # the key's repr, as pytree writes it
    return ast.literal_eval(m.group(1)) if m else None


def _leaves(stored: list[dict] | None, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, offset) of each stored leaf, or one leaf for a plain tensor."""
    if not stored:
        return [(name, tuple(shape), 0)]
    return [(leaf["name"], tuple(leaf["shape"]), int(leaf["offset"])) for leaf in stored]


# ---------------------------------------------------------------------- indexing
class SparseView:
    """A stored sparse Jacobian that reads like the dense `jacobian` array: `view[key]`
    (ints, slices, 1-D int sequences per axis, orthogonal) densifies only the selected block,
    reading the CSR rows it needs."""

    def __init__(self, group: Any, meta: dict[str, Any]) -> None:
        self.group = group
        self.values = group["values"]
        m, n = math.prod(meta["output_shape"]), math.prod(meta["input_shape"])
        lead = (int(meta["batch_size"]),) if meta.get("batched") else ()
        self.shape: tuple[int, ...] = (*lead, m, n)
        self.dtype = self.values.dtype
        self.ndim = len(self.shape)
        rows = max(1, min(m, (8 << 20) // max(n * self.dtype.itemsize, 1)))
        self.chunks: tuple[int, ...] = (*((1,) if lead else ()), rows, n)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize  # as a dense array
        self._ptr: np.ndarray | None = None
        self._cols: np.ndarray | None = None

    @property
    def oindex(self) -> SparseView:
        return self

    def row_ptr(self) -> np.ndarray:
        if self._ptr is None:
            self._ptr = self.group["row_ptr"][...]
        return self._ptr

    def cols_all(self) -> np.ndarray:
        if self._cols is None:
            self._cols = self.group["cols"][...]
        return self._cols

    def __getitem__(self, key: Any) -> np.ndarray:
        parts = _expand(key, self.ndim, self.shape)
        names = (("batch",) if self.ndim == 3 else ()) + ("rows", "cols")
        sel = [_select(k, n, name) for k, n, name in zip(parts, self.shape, names, strict=True)]
        idx = [np.arange(s.start, s.stop) if isinstance(s, slice) else np.atleast_1d(s) for s, _ in sel]
        samples = idx[0] if self.ndim == 3 else [None]
        r_idx, c_idx = idx[-2], idx[-1]
        out = np.zeros((len(samples), r_idx.size, c_idx.size), self.dtype)
        if r_idx.size and c_idx.size:
            ptr = self.row_ptr()
            lo, hi = int(ptr[r_idx.min()]), int(ptr[r_idx.max() + 1])  # one contiguous span of entries
            cols = self.group["cols"][lo:hi]
            starts, lengths = ptr[r_idx] - lo, ptr[r_idx + 1] - ptr[r_idx]
            entry = np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
            out_row = np.repeat(np.arange(r_idx.size), lengths)
            wanted, where = np.unique(c_idx, return_inverse=True)
            pos = np.searchsorted(wanted, cols[entry])
            keep = (pos < wanted.size) & (wanted[np.minimum(pos, wanted.size - 1)] == cols[entry])
            dense = np.zeros((r_idx.size, wanted.size), self.dtype)
            for i, b in enumerate(samples):
                vals = self.values[(int(b), slice(lo, hi)) if b is not None else slice(lo, hi)]
                dense[...] = 0
                dense[out_row[keep], pos[keep]] = vals[entry[keep]]
                out[i] = dense[:, where]
        out = out if self.ndim == 3 else out[0]
        drop = tuple(i for i, (s, k) in enumerate(sel) if k is None)
        return out.squeeze(axis=drop) if drop else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self[...]
        return data if dtype is None else data.astype(dtype)


def _expand(key: Any, ndim: int, shape: tuple[int, ...]) -> list[Any]:
    """A key as one entry per axis (`...` expanded, missing trailing axes are `:`)."""
    parts = list(key) if isinstance(key, tuple) else [key]
    n_ell = sum(1 for p in parts if p is Ellipsis)
    if n_ell > 1:
        raise ReadError("an index can only have a single ellipsis ('...').")
    if any(p is None for p in parts):
        raise ReadError("np.newaxis (None) is not supported when reading a stored Jacobian; index the result instead.")
    if n_ell:
        at = parts.index(Ellipsis)
        parts[at : at + 1] = [slice(None)] * (ndim - len(parts) + 1)
    if len(parts) > ndim:
        raise ReadError(f"too many indices: {len(parts)} given for a Jacobian view of shape {shape} ({ndim} axes).")
    return parts + [slice(None)] * (ndim - len(parts))


def _select(key: Any, n: int, name: str) -> tuple[Any, int | None]:
    """One axis's key as (int or index array or slice, kept length or None when the axis drops)."""
    if key is None:
        return slice(0, n), n
    if isinstance(key, bool | np.bool_):
        raise ReadError(f"boolean index {key!r} on {name} is not supported; pass ints or slices.")
    if isinstance(key, int | np.integer):
        i = int(key)
        if not -n <= i < n:
            raise ReadError(f"index {i} is out of range for {name} of size {n} (valid: {-n}..{n - 1}).")
        return i % n, None
    if isinstance(key, slice):
        for bound in (key.start, key.stop):
            if bound is not None and not -n <= int(bound) <= n:
                raise ReadError(f"slice {_show(key)} is out of range for {name} of size {n}; bounds must lie within {-n}..{n}.")
        if key.step == 0:
            raise ReadError(f"slice {_show(key)} on {name} has step 0.")
        start, stop, step = key.indices(n)
        if step == 1:
            return slice(start, max(start, stop)), max(0, stop - start)
        idx = np.arange(start, stop, step)
        return idx, idx.size
    idx = np.asarray(key)
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
        raise ReadError(f"index {key!r} on {name} must be an int, a slice or a 1-D sequence of ints.")
    idx = idx.astype(np.int64)
    bad = idx[(idx < -n) | (idx >= n)]
    if bad.size:
        raise ReadError(f"index {int(bad[0])} is out of range for {name} of size {n} (valid: {-n}..{n - 1}).")
    return idx % n, idx.size


def _show(s: slice) -> str:
    text = f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
    return text + (f":{s.step}" if s.step is not None else "")


def _flat_indices(parts: list[Any], dims: tuple[int, ...]) -> Any:
    """Flat C-order indices of the selected sub-block of an axis group (a slice when contiguous)."""
    if not dims:
        return slice(0, 1)
    axes = [np.arange(p.start, p.stop) if isinstance(p, slice) else np.atleast_1d(p) for p in parts]
    if any(a.size == 0 for a in axes):
        return np.zeros(0, np.int64)
    flat = np.ravel_multi_index(np.meshgrid(*axes, indexing="ij"), dims).reshape(-1)
    if flat.size and np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)):
        return slice(int(flat[0]), int(flat[0]) + flat.size)
    return flat


def _read(array: Any, sel: list[Any], kept: list[int | None]) -> np.ndarray:
    """`array[sel]` with orthogonal semantics, reading only the chunks the selection touches."""
    sizes = []
    for s in sel:
        if isinstance(s, slice):
            sizes.append(s.stop - s.start)
        elif isinstance(s, np.ndarray):
            sizes.append(s.size)
        else:
            sizes.append(1)
    if 0 in sizes:
        out = np.zeros(sizes, array.dtype)
    elif any(isinstance(s, np.ndarray) for s in sel):
        out = array.oindex[tuple(s if not isinstance(s, int) else slice(s, s + 1) for s in sel)]
    else:
        out = array[tuple(s if not isinstance(s, int) else slice(s, s + 1) for s in sel)]
    out = np.asarray(out).reshape(sizes)
    drop = tuple(i for i, (s, k) in enumerate(zip(sel, kept, strict=True)) if isinstance(s, int) and k is None)
    return out.squeeze(axis=drop) if drop else out


def _spans(indices: np.ndarray) -> list[list[int]]:
    """Sorted indices as `[first, last]` runs: tiles 0-3 and 7 are `[[0, 3], [7, 7]]`."""
    if not indices.size:
        return []
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    return [[int(run[0]), int(run[-1])] for run in np.split(indices, cuts)]
