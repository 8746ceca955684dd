"""shipping: how a driver's problem travels to the workers (executor packs and puts it, worker unpacks it).

A problem is pickled with cloudpickle, its CPU tensors as out-of-band byte buffers, and
rebuilt on each worker as private, writable tensors; the put runs in a background thread.
A spec file goes to a cluster's workers as a module instead. No Ray session is needed to pack.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raijac.errors import ProblemError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from raijac.problem import Problem


class Packed:
    """A problem pickled with its CPU tensors as out-of-band byte buffers (views, no copies).

    NOTE: [shipping] Pickled in-band, a problem's tensors are copied into one pickle, again
    into the object store, and unpickled through more copies on every worker. As raw byte
    buffers (pickle 5, out of band) `ray.put` writes them to the object store once and each
    worker copies them out once (benchmarks/RESULTS.md has the times). Workers still get private, writable
    tensors. Packing is done before the triage, the put after it starts (NOTE: [background
    put] in executor): the triage runs `functional_call`, which swaps a module's parameters
    for transformed tensors while it runs, so the problem must not be pickled meanwhile.
    """

    def __init__(self, blob: bytes, buffers: list[Any]) -> None:
        self.blob, self.buffers = blob, buffers

    def load(self) -> Problem:
        return pickle.loads(self.blob, buffers=self.buffers)


def pack(problem: Problem) -> Packed:
    """Pickle a problem now, its CPU tensors as views (NOTE: [shipping]); `ray.put` copies them later."""
    import io

    import numpy as np

    buffers: list[Any] = []
    out = io.BytesIO()
    try:
        _pickler()(out, protocol=5, buffer_callback=buffers.append).dump(problem)
    except RuntimeError as exc:
        if "parametrized modules" not in str(exc):
            raise
        raise ProblemError(
            "f's module uses torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal), which torch cannot "
            "pickle to the workers; define the problem in a spec file and pass 'file.py:NAME' to raijac.compute or "
            "the CLI, so that each worker builds its own."
        ) from None
    # numpy views of the buffers: Ray ships numpy arrays out of band (one copy into the store)
    return Packed(out.getvalue(), [np.frombuffer(b.raw(), dtype=np.uint8) for b in buffers])


@functools.cache
def _pickler() -> type:
    """A cloudpickle Pickler that sends plain CPU tensors out of band.

    NOTE: [private pickler] The reducer lives in this subclass's own dispatch table, which
    chains to cloudpickle's (so Ray's reducers, registered there, still apply). Editing
    `CloudPickler.dispatch` itself, as Ray does, would change every pickle in the process
    while it is in place, including Ray's own in other threads (the background put). The
    table is keyed by exact type, as pickle's is: an `nn.Parameter` keeps its own reduce,
    which pickles its plain data tensor through this one.
    """
    from collections import ChainMap

    import torch
    from ray import cloudpickle

    class TensorPickler(cloudpickle.CloudPickler):
        dispatch_table = ChainMap({torch.Tensor: _reduce_tensor}, cloudpickle.CloudPickler.dispatch_table)

    return TensorPickler


def _reduce_tensor(t: torch.Tensor) -> tuple:
    import torch

    if t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
        return type(t).__reduce_ex__(t, 5)
    c = t.detach().contiguous()
    flat = c.reshape(-1).view(torch.uint8).numpy()
    return rebuild_tensor, (flat, str(c.dtype).removeprefix("torch."), tuple(c.shape), bool(t.requires_grad))


def rebuild_tensor(data: np.ndarray, dtype: str, shape: tuple[int, ...], requires_grad: bool) -> torch.Tensor:
    """A private copy of a tensor shipped as raw bytes (see NOTE: [shipping])."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.array(data, copy=True)).view(getattr(torch, dtype)).reshape(shape)
    return t.requires_grad_(True) if requires_grad else t


def _import_paths() -> tuple[str, ...]:
    """The driver's import folders: a problem pickled from a module the driver imported
    (a script's neighbour, say) unpickles on workers of this machine too."""
    return tuple(p for p in sys.path if p and os.path.isdir(p))


def _spec_file(spec: str) -> tuple[str, str] | None:
    """(file path, NAME) for a `path/to/file.py:NAME` spec, None for a module spec."""
    target, _, name = spec.rpartition(":")
    return (target, name) if target.endswith(".py") and os.path.isfile(target) else None


class _Background(threading.Thread):
    """A daemon thread whose exception `join` re-raises in the caller.

    NOTE: [background put] `ray.put` of a problem copies its tensors into the object store,
    slowly where it must fault in fresh pages. In a thread it overlaps the driver's triage instead
    of delaying it; the actors' loads start when it is done."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(name="raijac-ship", daemon=True)
        self._work, self.error = target, None
        self.start()

    def run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # handed to the caller by join
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
