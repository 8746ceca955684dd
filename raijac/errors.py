"""errors: the few exceptions raijac raises, each also a builtin so callers can catch either.

    RaijacError                      base; the CLI prints its message alone and exits 1
    ├── ProblemError(ValueError)     the spec, f, x or its outputs are unusable
    ├── ModeError(ValueError)        an unknown mode, or one that cannot run this problem
    │   └── BlockCheckError          a block differed from plain autograd: not written
    ├── BudgetError(ValueError)      a memory budget too small for one seed
    ├── StoreError(OSError)          --out exists, is not a raijac store, or does not match
    ├── ReadError(IndexError)        an index outside a stored Jacobian, or a vector of the wrong shape
    └── WorkerError(RuntimeError)    a tile failed on a worker; finished tiles are kept

Messages are one or two sentences: what is wrong, the value seen, and the fix.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (without a final period), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


class RaijacError(Exception):
    """Base of every error raijac raises on purpose."""


class ProblemError(RaijacError, ValueError):
    """The problem cannot be built or differentiated as given."""


class ModeError(RaijacError, ValueError):
    """An unknown mode, or a mode that cannot run this problem."""


class BlockCheckError(ModeError):
    """A block differed from plain autograd (NOTE: [block check] in raijac.kernels): its
    mode gives wrong numbers for this f; the block was not written."""


class KernelError(ModeError):
    """A mode's kernel raised on a worker, although it passed the driver's triage there (a
    worker's device or settings differ): under auto the run goes on in the next mode."""


class BudgetError(RaijacError, ValueError):
    """A memory budget is too small for one seed."""


class StoreError(RaijacError, OSError):
    """The output location cannot be used (exists, wrong kind, other problem)."""


class ReadError(RaijacError, IndexError):
    """An index or slice outside a stored Jacobian, or a vector of the wrong shape (raised by raijac.reader)."""


class WorkerError(RaijacError, RuntimeError):
    """A tile failed on a worker."""


__all__ = [
    "BlockCheckError",
    "BudgetError",
    "KernelError",
    "ModeError",
    "ProblemError",
    "RaijacError",
    "ReadError",
    "StoreError",
    "WorkerError",
]
