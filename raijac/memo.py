"""memo: what earlier runs in this process found about the same function (the triage, memory
costs, the codec, the problem's own checks), so a loop that computes the same f at new points
does not pay them again (after problem; used by problem, probe and api)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from raijac import trees
from raijac.guard import captured_tensors, modules_of

if TYPE_CHECKING:
    from raijac.problem import Problem


# NOTE: [triage memo] A training loop or a Newton solver computes the same f at a new x (or
# new weights) call after call; its triage (trial blocks of every candidate mode, and their
# checks) gave the same answer last time. When every block is checked on its worker (and a
# wrong one makes auto fall back: NOTE: [fallback] in api), the run reuses that answer for
# the same function (module object, or function code and captures), shapes, dtypes and
# flags. The memo hangs off the function object, so it goes when the function does.
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Builtins:
    """Where the memo of functions that take no weak reference (builtins) hangs: they live as
    long as the process."""


_BUILTINS = _Builtins()


def _code_key(fn: object) -> tuple:
    """What makes a function the same function: its code and what its closure holds (by
    identity), so a lambda made again from the same line with the same captures matches."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("object", id(fn))
    cells = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            cells.append(id(cell.cell_contents))
        except ValueError:  # an empty cell
            cells.append(None)
    return (code, tuple(cells))


def memo_key(problem: Problem, requested: str, out: tuple | None = None) -> tuple[object, tuple]:
    """(the object the memo hangs off, the key of this problem's triage); `out` (one sample's
    output shape, the dtype, whether f draws random numbers) stands in for what `problem.y`
    tells while that is being evaluated (NOTE: [checked before] in problem)."""
    f = problem.f
    parts: list[object] = [requested, type(f).__name__, problem.kind, problem.wrt, problem.batched, problem.batch_aware]
    if isinstance(f, trees.Flat):
        for extra in (f.outputs, f.loss):
            parts.append(_code_key(extra) if callable(extra) else repr(extra))
        parts += [f.has_aux, f.batched, f.of_params]
        f = f.fn
    anchor = problem.module if problem.module is not None else f
    if not isinstance(anchor, torch.nn.Module):
        parts.append(_code_key(anchor))
    try:
        weakref.ref(anchor)
    except TypeError:
        anchor = _BUILTINS
    tensors = (problem.x, problem.params, *(problem.ctx or ()), *problem.constants)
    parts.append(tuple(None if t is None else (tuple(t.shape), str(t.dtype), str(t.device)) for t in tensors))
    if out is None:
        out = (tuple(problem.output_shape), str(problem.dtype), problem.random)
    parts += [*out, problem.spec]
    # Every module f uses, wherever raijac sees it (a module as f, in f's closure): switched
    # to training mode it is another function (batch statistics, dropout).
    modules = modules_of(problem)
    parts.append(tuple(tuple(m.training for m in module.modules()) for module in modules))
    # And which tensors f holds require grad: workers freeze them only where f is the same
    # function so (`Problem.freezable`), which a frozen backbone unfrozen since is not.
    parts.append(tuple(tuple(p.requires_grad for p in module.parameters()) for module in modules))
    parts.append(tuple(t.requires_grad for t in captured_tensors(problem)))
    return anchor, tuple(parts)


def memo_get(problem: Problem, requested: str, out: tuple | None = None) -> dict | None:
    anchor, key = memo_key(problem, requested, out)
    return _MEMO.get(anchor, {}).get(key)


def memo_put(problem: Problem, requested: str, out: tuple | None = None, **items: object) -> None:
    anchor, key = memo_key(problem, requested, out)
    _MEMO.setdefault(anchor, {}).setdefault(key, {}).update(items)
