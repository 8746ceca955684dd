"""blas: the chain modes' big CPU matrix products, on whichever BLAS is faster here (torch's or numpy's).

NOTE: [BLAS] torch's x86 CPU wheels multiply with Intel MKL; numpy's wheels bundle OpenBLAS.
On this project's AMD EPYC machines OpenBLAS runs a big float32 GEMM faster, but short,
wide products (2 to 32 rows) slower, so short products stay with MKL (the measurements are
in benchmarks/RESULTS.md, "Measurements behind design choices"). That product is most of
the chain mode's run time on an MLP. Timing both on a small product at start-up proved too
noisy to choose by, so the rule is fixed: OpenBLAS on AMD CPUs (where MKL does not pick its
best kernels), MKL elsewhere; `RAIJAC_BLAS=torch|numpy` overrides it. numpy gets the same
thread count as torch (threadpoolctl), so a worker never runs more BLAS threads than its CPU
share. Small products, other devices and dtypes, and batched operands stay with torch.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from raijac.errors import RaijacError

MIN_MACS = 1 << 27  # products smaller than this (134M multiply-adds) stay with torch: too short for a BLAS switch to pay
MIN_ROWS = 128  # and ones with fewer rows: OpenBLAS is slower on short, wide operands
_CHOICE: str | None = None  # "torch" | "numpy", decided once per process
_CONTROLLER = None


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for 2-D CPU float32/float64 operands of a big product on the faster BLAS; else torch's."""
    if not _eligible(a, b) or choice() == "torch":
        return a @ b
    return _numpy_matmul(a, b)


def _eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.ndim == 2
        and b.ndim == 2
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dtype == b.dtype
        and a.dtype in (torch.float32, torch.float64)
        and a.layout == torch.strided
        and b.layout == torch.strided
        and a.shape[0] >= MIN_ROWS
        and a.shape[0] * a.shape[1] * b.shape[1] >= MIN_MACS
    )


def _numpy_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with _threads(torch.get_num_threads()):
        return torch.from_numpy(np.matmul(a.detach().numpy(), b.detach().numpy()))


def _threads(n: int):
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=n, user_api="blas")


def choice() -> str:
    """The BLAS this process uses for big products: `RAIJAC_BLAS` (`torch` or `numpy`) when
    set, else numpy's on AMD CPUs where numpy bundles OpenBLAS, else torch's (NOTE: [BLAS])."""
    global _CHOICE
    if _CHOICE is None:
        forced = requested()
        if forced is not None:
            _CHOICE = forced
        else:
            _CHOICE = "numpy" if _cpu_vendor() == "AuthenticAMD" and _numpy_blas() == "openblas" else "torch"
    return _CHOICE


def requested() -> str | None:
    """`RAIJAC_BLAS` (`torch` or `numpy`), None when unset; any other value is an error."""
    forced = os.environ.get("RAIJAC_BLAS", "").strip().lower()
    if forced and forced not in ("torch", "numpy"):
        raise RaijacError(f"RAIJAC_BLAS must be torch or numpy, but got {forced!r}; unset it to let raijac choose.")
    return forced or None


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _numpy_blas() -> str:
    """The BLAS numpy calls (`openblas`, `mkl`, ...), or "" when threadpoolctl cannot tell."""
    try:
        import numpy.linalg  # noqa: F401  (loads numpy's BLAS, so threadpoolctl sees it)
        from threadpoolctl import threadpool_info
    except ImportError:
        return ""
    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
            return str(lib.get("internal_api", ""))
    return ""
