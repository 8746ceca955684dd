"""raijac: Jacobians too large for one device, computed on Ray workers into chunked Zarr.

The public door: build a `Problem`, `plan` it, `compute` it into a Zarr store, `open` the
result. Ray is imported only when a run starts.
"""

__version__ = "0.1.0"

# NOTE: the function `plan` is bound after the submodule `raijac.plan` was imported, so
# `raijac.plan(...)` is the function; the module stays reachable as sys.modules["raijac.plan"].
from raijac.api import compute, plan  # noqa: E402, I001
from raijac.errors import BudgetError, ModeError, ProblemError, RaijacError, StoreError, WorkerError  # noqa: E402
from raijac.kernels import MODES  # noqa: E402
from raijac.plan import Plan  # noqa: E402
from raijac.problem import Problem, load_problem  # noqa: E402
from raijac.reader import Jacobian, open  # noqa: E402, A004

__all__ = [
    "MODES",
    "BudgetError",
    "Jacobian",
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
