"""reader: `raijac.open` — read-only views of a stored Jacobian (the last stage; needs only zarr and numpy).

A store is plain Zarr, so `zarr.open_group(path)["jacobian"]`, `dask.array.from_zarr` and
`xarray.open_zarr` read it too; `Jacobian` adds the metadata, completeness checks and
views in the original input and output shapes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from raijac import store
from raijac.errors import StoreError


class Jacobian:
    """A stored Jacobian: the zarr array plus what raijac recorded about it."""

    def __init__(self, path: str, *, allow_partial: bool = False) -> None:
        meta = store.read_meta(str(path))
        if meta is None:
            raise StoreError(f"{path} is not a raijac store (no Zarr group with a 'raijac' attribute); check the path.")
        store._check_version(meta, str(path))
        self.path = str(path)
        self.group = store.open_group(self.path, "r")
        if "jacobian" not in self.group:
            raise StoreError(f"{path} has no 'jacobian' array; the store is damaged, recompute it with --overwrite.")
        self.meta: dict[str, Any] = meta
        self.array = self.group["jacobian"]
        ledger = self.group["tiles"][:] if "tiles" in self.group else np.zeros(0, np.uint8)
        self.tiles_done, self.n_tiles = int(ledger.sum()), int(ledger.size)
        self.summary: dict[str, Any] | None = None
        if not self.complete and not allow_partial:
            raise StoreError(
                f"{path} is incomplete ({self.tiles_done}/{self.n_tiles} tiles written); finish it with "
                "raijac compute ... --resume, or open it with allow_partial=True (unwritten entries read as NaN)."
            )

    # ------------------------------------------------------------------ metadata
    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete")) and self.tiles_done == self.n_tiles

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def batched(self) -> bool:
        return bool(self.meta["batched"])

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["input_shape"])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["output_shape"])

    @property
    def x(self) -> np.ndarray:
        return self.group["x"][...]

    @property
    def y(self) -> np.ndarray:
        return self.group["y"][...]

    @property
    def params(self) -> dict[str, np.ndarray] | None:
        """Parameter values by name, for parameter Jacobians."""
        if self.meta.get("wrt") != "params":
            return None
        flat = self.group["params"][...]
        return {
            p["name"]: flat[p["offset"] : p["offset"] + math.prod(p["shape"])].reshape(p["shape"]) for p in self.meta["params"]
        }

    # ------------------------------------------------------------------ data
    def __getitem__(self, key: Any) -> np.ndarray:
        return self.array[key]

    def numpy(self) -> np.ndarray:
        """The whole Jacobian in memory."""
        return self.array[...]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.numpy()
        return data if dtype is None else data.astype(dtype)

    def torch(self):
        """The whole Jacobian as a torch tensor."""
        import torch

        return torch.from_numpy(self.numpy())

    def unflatten(self) -> np.ndarray:
        """The whole Jacobian shaped `(*output_shape, *input_shape)` (batched: `(B, ...)`)."""
        lead = (self.shape[0],) if self.batched else ()
        return self.numpy().reshape(*lead, *self.output_shape, *self.input_shape)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial {self.tiles_done}/{self.n_tiles}"
        return f"Jacobian({self.path!r}, shape={self.shape}, dtype={self.dtype}, mode={self.mode!r}, {state})"


def open(path: str, *, allow_partial: bool = False) -> Jacobian:  # noqa: A001 - the public name is raijac.open
    """Open a raijac store for reading (an incomplete one only with `allow_partial=True`)."""
    return Jacobian(path, allow_partial=allow_partial)
