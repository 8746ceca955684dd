"""batching: vmap batching rules torch lacks for ops real models use, made from torch's own
decompositions and registered only while a vmapping kernel runs (used by raijac.kernels)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# NOTE: [batching rules] vmap has no batching rule for some ops real models use and runs them
# one sample or seed at a time in a Python loop (its "slow path"), so auto refuses the
# vmapped modes for them: DistilBERT (Hugging Face's eager attention fills its padding mask
# with `masked_fill(mask, tensor)`) ran rev-batched. With the rule it runs rev: its
# per-sample gradients (B=64) took 1.11-1.14 s against rev-batched's 1.16-1.29 s in one
# process; its parameter Jacobians were as fast either way. (Most of what is left against
# torch.func there is the block check and the writes.) Each op below has a decomposition in
# torch._decomp into ops vmap does batch. While a vmapping kernel runs they are registered
# as the ops' batching rules (FuncTorchBatched kernels, as torch registers a few of its own
# in torch._functorch.predispatch), and removed after, so the caller's process is left as
# it was. An op torch has given a batching rule by then is left alone. Every block is still
# checked against plain autograd (NOTE: [block check] in raijac.kernels), which no
# decomposition touches.
OPS = (
    "masked_fill.Tensor",  # attention masks filled with a tensor value (Hugging Face's eager attention)
    "masked_fill_.Tensor",
    "affine_grid_generator.default",  # spatial transformers (F.affine_grid); its backward has no rule yet
    "_upsample_nearest_exact1d.vec",  # F.interpolate(mode="nearest-exact"); plain vmap meets these,
    "_upsample_nearest_exact2d.vec",
    "_upsample_nearest_exact3d.vec",
    "_upsample_nearest_exact1d.default",  # and forward mode these
    "_upsample_nearest_exact2d.default",
    "_upsample_nearest_exact3d.default",
    "max_unpool2d.default",
    "max_unpool3d.default",
    "renorm.default",
)


@functools.cache
def missing() -> dict[torch._ops.OpOverload, Callable]:
    """The ops of OPS this torch has no batching rule for, with their decompositions (looked
    up once, before any is registered)."""
    from torch._decomp import decomposition_table

    found = {}
    for name in OPS:
        packet, overload = name.split(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload, None)
        if op is None or op not in decomposition_table:
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "FuncTorchBatched"):
            continue
        found[op] = decomposition_table[op]
    return found


_LOCK = threading.Lock()
_ACTIVE = {"depth": 0, "library": None}


@contextmanager
def batching_rules() -> Iterator[None]:
    """The batching rules of `missing()` registered for the body (NOTE: [batching rules]);
    nested or concurrent uses share one registration."""
    with _LOCK:
        if _ACTIVE["depth"] == 0:
            library = torch.library.Library("aten", "IMPL", "FuncTorchBatched")
            for op, decomposition in missing().items():
                try:
                    library.impl(op, decomposition)
                except Exception:  # a torch that refuses one: that op stays on vmap's slow path
                    continue
            _ACTIVE["library"] = library
        _ACTIVE["depth"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _ACTIVE["depth"] -= 1
            if _ACTIVE["depth"] == 0:
                library, _ACTIVE["library"] = _ACTIVE["library"], None
                library._destroy()  # the registrations go with it
