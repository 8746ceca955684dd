"""detect_rules: the per-op rules of `detect`, and the table that maps aten ops to them (torch + detect_deps).

A rule gets one traced call (`Call`: the op, its arguments by schema name, its real
outputs) and returns one dependency matrix (or None) per floating-point output. Rules
see the tracer only through `Tracing` (read a tensor's rows, write rows to a tensor), so
this module never imports `detect`. Ops without a rule are refused by the tracer, except
those torch tags pointwise, which get `_pointwise`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from raijac.detect_deps import (
    _bcast,
    _coo,
    _dims,
    _guard,
    _is_float,
    _matmul,
    _mix,
    _reduce,
    _Refuse,
    _take,
    _tensors,
    _union,
)

aten = torch.ops.aten


class Tracing(Protocol):
    """What a rule may ask of the tracer."""

    def deps(self, t: object) -> Any: ...

    def write(self, t: torch.Tensor, d: Any) -> None: ...


@dataclass
class Call:
    """One traced op call, as a rule sees it."""

    tracer: Tracing
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


def _pointwise(c: Call) -> list[Any]:
    """Element e of each output depends on element e of every (broadcast) input."""
    skip = {a.name for a in c.func._schema.arguments if a.alias_info is not None and a.alias_info.is_write and a.kwarg_only}
    inputs = [t for t in _tensors(c.args, c.kwargs, skip) if _is_float(t)]
    res = []
    for o in c.outs:
        res.append(_union([_bcast(c.deps(t), tuple(t.shape), tuple(o.shape)) for t in inputs]))
    return res


def _constant(c: Call) -> list[Any]:
    """Outputs that do not depend on the inputs' values (or have zero derivative)."""
    return c.each(None)


# NOTE: [ids] Data movement is replayed, not modelled: the same aten op runs on float64
# "id tensors" (a traced input -> 1..numel plus an offset per input, a constant -> 0,
# every Scalar value argument -> 0), and each output element's id names the one source
# element it holds (0: none, a constant). float64 is exact for ids below 2**53. Index,
# mask and repeat tensors are passed through; any other non-float tensor is a value (0).
_INDEX_ARGS = {"index", "indices", "mask", "condition", "repeats"}


def _move(c: Call) -> list[Any]:
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


def _gather_select(c: Call, x: torch.Tensor, idx: torch.Tensor, dim: int) -> Any:
    """Rows of x picked along `dim` by `idx` (same rank as x)."""
    d = c.deps(x)
    if d is None:
        return None
    if x.dim() == 0:
        return d
    src = torch.arange(x.numel()).reshape(x.shape).gather(dim, idx.to(torch.int64).cpu())
    return _take(d, src.reshape(-1).numpy())


def _select(c: Call) -> list[Any]:
    """(values, indices) ops: each value is the element its index picked (exact at x)."""
    x = c.b["self"]
    idx = [t for t in tree_flatten(c.out)[0] if isinstance(t, torch.Tensor) and not _is_float(t)][0]
    dim = c.b.get("dim", -1)
    dim = -1 if dim is None else dim
    if x.dim() and idx.dim() < x.dim():  # keepdim=False
        idx = idx.unsqueeze(dim % x.dim())
    return [_gather_select(c, x, idx, dim)] + [None] * (len(c.outs) - 1)


def _pool_select(c: Call) -> list[Any]:
    """max_pool*_with_indices and friends: indices are flat over the k spatial dims."""
    x = c.b["self"]
    k = 3 if "3d" in c.func.__name__ else 2 if "2d" in c.func.__name__ else 1
    d = c.deps(x)
    idx = [t for t in tree_flatten(c.out)[0] if isinstance(t, torch.Tensor) and not _is_float(t)][0]
    ids = torch.arange(x.numel()).reshape(x.shape).flatten(start_dim=x.dim() - k)
    pick = ids.gather(-1, idx.to(torch.int64).cpu().flatten(start_dim=idx.dim() - k))
    return [_take(d, pick.reshape(-1).numpy())] + [None] * (len(c.outs) - 1)


def _reduction(c: Call) -> list[Any]:
    """Each output element depends on its whole reduced slice (all dims when there is no `dim`)."""
    inputs = [t for t in (c.b.get("self"), c.b.get("other")) if isinstance(t, torch.Tensor)]
    shape = tuple(torch.broadcast_shapes(*[t.shape for t in inputs]))
    d = _union([_bcast(c.deps(t), tuple(t.shape), shape) for t in inputs])
    dims = _dims(c.b.get("dim"), len(shape))
    return c.each(_reduce(d, shape, dims))


def _reduction_equal(c: Call) -> list[Any]:
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


def _trace(c: Call) -> list[Any]:
    x = c.b["self"]
    keep = torch.eye(x.shape[0], x.shape[1], dtype=torch.bool).reshape(-1).numpy()
    return [_reduce(c.deps(x), tuple(x.shape), [0, 1], keep)]


def _cumulative(c: Call) -> list[Any]:
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


def _softmax(c: Call) -> list[Any]:
    x = c.b["self"]
    if x.dim() == 0:
        return c.each(c.deps(x))
    return c.each(_mix(c.deps(x), tuple(x.shape), _dims(c.b["dim"], x.dim()))[0])


def _cross(c: Call) -> list[Any]:
    """Component i of a x b depends on components i+1 and i+2 (mod 3) of both."""
    a, b = c.b["self"], c.b["other"]
    shape = tuple(c.outs[0].shape)
    d = _union([_bcast(c.deps(t), tuple(t.shape), shape) for t in (a, b)])
    dim = c.b["dim"] % len(shape)
    ids = torch.arange(math.prod(shape)).reshape(shape)
    return c.each(_union([_take(d, ids.roll(-s, dim).reshape(-1).numpy()) for s in (1, 2)]))


def _glu(c: Call) -> list[Any]:
    x = c.b["self"]
    dim = c.b["dim"] % x.dim()
    half = x.shape[dim] // 2
    ids = torch.arange(x.numel()).reshape(x.shape)
    d = c.deps(x)
    first = ids.narrow(dim, 0, half).reshape(-1).numpy()
    second = ids.narrow(dim, half, half).reshape(-1).numpy()
    return c.each(_union([_take(d, first), _take(d, second)]))


def _channel(c: Call, t: object, shape: tuple[int, ...]) -> Any:
    """A per-channel (dim 1) tensor's rows, broadcast over an input of `shape`."""
    if not isinstance(t, torch.Tensor):
        return None
    view = tuple(s if i == 1 else 1 for i, s in enumerate(shape))
    return _bcast(c.deps(t), view, shape)


def _layer_norm(c: Call) -> list[Any]:
    x = c.b["input"]
    k = len(c.b["normalized_shape"])
    shape = tuple(x.shape)
    per, per_slice = _mix(c.deps(x), shape, list(range(x.dim() - k, x.dim())))
    norm = tuple(shape[x.dim() - k :])
    affine = [_bcast(c.deps(t), norm, shape) for t in (c.b["weight"], c.b["bias"]) if isinstance(t, torch.Tensor)]
    return [_union([per, *affine])] + [per_slice] * (len(c.outs) - 1)


def _batch_norm(c: Call) -> list[Any]:
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


def _group_norm(c: Call) -> list[Any]:
    x = c.b["input"]
    n, ch, hxw, groups = c.b["N"], c.b["C"], c.b["HxW"], c.b["group"]
    if n * ch * hxw != x.numel() or ch % groups:
        raise _Refuse(None)
    shape = tuple(x.shape)
    per, stats = _mix(c.deps(x), (n, groups, ch // groups * hxw), [2])
    affine = [_channel(c, c.b.get(name), shape) for name in ("weight", "bias")]
    return [_union([per, *affine]), stats, stats][: len(c.outs)]


def _loss(c: Call) -> list[Any]:
    """Element-wise losses: the union of their (broadcast) inputs, reduced over all unless reduction='none'."""
    x = c.b["self"]
    shape = tuple(x.shape)
    inputs = [v for v in c.b.values() if _is_float(v)]
    d = _union([_bcast(c.deps(t), tuple(t.shape), shape) for t in inputs])
    return c.each(d if c.b["reduction"] == 0 else _reduce(d, shape, list(range(len(shape)))))


def _nll_loss(c: Call) -> list[Any]:
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


def _bmm(c: Call, a: torch.Tensor, b: torch.Tensor, bmn: tuple[int, int, int, int]) -> Any:
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


def _matmul_rule(c: Call) -> list[Any]:
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


def _addr(c: Call) -> list[Any]:
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


def _scatter(c: Call) -> list[Any]:
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

_RULES: dict[object, Callable[[Call], list[Any]]] = {}
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
