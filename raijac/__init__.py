"""raijac: Jacobians too large for one device, computed on Ray workers into chunked Zarr.

The public door: build a `Problem`, `plan` it, `compute` it into a Zarr store, `open` the
result, `verify` it. Names load on first use (PEP 562), so `import raijac` and
`raijac --help` do not import torch; Ray is imported only when a run starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_WHERE = {
    "compute": "raijac.api",
    "plan": "raijac.api",
    "BudgetError": "raijac.errors",
    "BlockCheckError": "raijac.errors",
    "ModeError": "raijac.errors",
    "ProblemError": "raijac.errors",
    "RaijacError": "raijac.errors",
    "StoreError": "raijac.errors",
    "WorkerError": "raijac.errors",
    "MODES": "raijac.modes",
    "Plan": "raijac.planner",
    "Problem": "raijac.problem",
    "load_problem": "raijac.problem",
    "Jacobian": "raijac.reader",
    "open": "raijac.reader",
}

# submodules reachable as attributes without importing them first (`raijac.verify.verify(...)`)
_SUBMODULES = ("modes", "sparsity", "verify")

__all__ = [
    "MODES",
    "BudgetError",
    "Jacobian",
    "BlockCheckError",
    "ModeError",
    "Plan",
    "Problem",
    "ProblemError",
    "RaijacError",
    "StoreError",
    "WorkerError",
    "compute",
    "load_problem",
    "open",
    "plan",
]

if TYPE_CHECKING:
    from raijac.api import compute, plan
    from raijac.errors import BlockCheckError, BudgetError, ModeError, ProblemError, RaijacError, StoreError, WorkerError
    from raijac.modes import MODES
    from raijac.planner import Plan
    from raijac.problem import Problem, load_problem
    from raijac.reader import Jacobian, open  # noqa: A004


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"raijac.{name}")
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'raijac' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE, *_SUBMODULES})
