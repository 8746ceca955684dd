"""plot: a picture of a stored J for `raijac inspect --plot` (after reader; matplotlib is the `plot` extra).

The picture is a downsampled |J| beside its sparsity pattern. Each pixel of the heat map
is the largest |J| in its block of rows and columns, so one large entry never vanishes,
on a log colour scale; each pixel of the pattern is the fraction of nonzero entries in
its block. Blocks are read chunk by chunk (`Jacobian.blocks`), never the whole J.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raijac.errors import RaijacError
from raijac.reader import Jacobian

MAX_PIXELS = 512  # per side: a readable figure, and small block-max arrays
LOG_BELOW = 0.05  # a J with fewer nonzero entries than this: the pattern panel goes to a log scale


def percent(fraction: float) -> str:
    """A share with two significant digits however small (a tridiagonal 10^6 x 10^6 J is 3e-4 % non-zero)."""
    if fraction == 0 or fraction >= 0.01:
        return f"{fraction:.1%}"
    return f"{fraction * 100:.2g}%"


@dataclass(frozen=True)
class Downsampled:
    """One (sample of a) Jacobian reduced to at most `max_pixels` per side."""

    absmax: np.ndarray  # (P, Q) largest |J| per block; NaN where the whole block is unwritten
    nonzero: np.ndarray  # (P, Q) fraction of the block's written entries that are nonzero
    unwritten: np.ndarray  # (P, Q) fraction of the block's entries not written yet (NaN)
    factor: tuple[int, int]  # rows and columns of J per pixel
    shape: tuple[int, int]  # (M, N)
    density: float  # nonzero entries / written entries, over the whole (sample of) J


def downsample(jac: Jacobian, *, sample: int | None = None, max_pixels: int = MAX_PIXELS) -> Downsampled:
    """Block maxima of |J| and nonzero fractions, streamed chunk by chunk.

    Arguments:
        jac: an open store (a partial one too: unwritten entries are counted apart).
        sample: which sample of a batched store (default 0); refused for plain stores.
        max_pixels: the most pixels per side.
    """
    if jac.batched:
        sample = 0 if sample is None else sample
    elif sample is not None:
        raise RaijacError(f"--sample applies to batched stores only, but {jac.path} holds one {jac.shape} Jacobian.")
    m, n = jac.shape[-2:]
    fr, fc = max(1, math.ceil(m / max_pixels)), max(1, math.ceil(n / max_pixels))
    p, q = math.ceil(m / fr), math.ceil(n / fc)
    absmax = np.zeros((p, q))
    nonzero = np.zeros((p, q), np.int64)
    missing = np.zeros((p, q), np.int64)
    for region, block in [] if jac.sparse else jac.blocks(sample=sample):
        blk = block[0] if jac.batched else block
        rs, cs = region[-2:]
        r0, c0 = rs.start or 0, cs.start or 0
        nan = np.isnan(blk)
        (i0, j0), big = _reduce(np.fmax, np.abs(blk), r0, c0, fr, fc)
        (_, _), nnz = _reduce(np.add, ((blk != 0) & ~nan).astype(np.int64), r0, c0, fr, fc)
        (_, _), nans = _reduce(np.add, nan.astype(np.int64), r0, c0, fr, fc)
        window = (slice(i0, i0 + big.shape[0]), slice(j0, j0 + big.shape[1]))
        absmax[window] = np.fmax(absmax[window], np.nan_to_num(big, nan=0.0))
        nonzero[window] += nnz
        missing[window] += nans
    if jac.sparse:  # straight from the non-zeros: a 10^6 x 10^6 J is never densified
        coo = jac.to_scipy(sample).tocoo()
        pix = (coo.row // fr) * q + coo.col // fc
        vals = np.asarray(coo.data, np.float64)
        nan = np.isnan(vals)
        np.fmax.at(absmax.reshape(-1), pix, np.nan_to_num(np.abs(vals), nan=0.0))
        nonzero += np.bincount(pix, weights=(vals != 0) & ~nan, minlength=p * q).reshape(p, q).astype(np.int64)
        missing += np.bincount(pix, weights=nan, minlength=p * q).reshape(p, q).astype(np.int64)
    sizes = np.outer(np.bincount(np.arange(m) // fr), np.bincount(np.arange(n) // fc))
    written = sizes - missing
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(written > 0, nonzero / np.maximum(written, 1), np.nan)
    absmax[written == 0] = np.nan
    density = float(nonzero.sum() / max(int(written.sum()), 1))
    return Downsampled(absmax, fraction, missing / sizes, (fr, fc), (m, n), density)


def _reduce(ufunc: Any, a: np.ndarray, r0: int, c0: int, fr: int, fc: int) -> tuple[tuple[int, int], np.ndarray]:
    """Reduce a block at (r0, c0) of J into whole pixels of fr x fc: (first pixel, reduced block)."""
    out = a
    first = []
    for axis, (start, factor) in enumerate(((r0, fr), (c0, fc))):
        pixel = (start + np.arange(a.shape[axis])) // factor
        cuts = np.flatnonzero(np.diff(pixel)) + 1
        out = ufunc.reduceat(out, np.concatenate([[0], cuts]), axis=axis)
        first.append(int(pixel[0]))
    return (first[0], first[1]), out


def plot_jacobian(jac: Jacobian, out: str, *, sample: int | None = None, max_pixels: int = MAX_PIXELS) -> Downsampled:
    """Draw |J| (block max, log colours) beside its sparsity pattern into the image file `out`."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise RaijacError(
            "drawing the Jacobian needs matplotlib, which is not installed; pip install 'raijac[plot]' (or matplotlib)."
        ) from exc
    d = downsample(jac, sample=sample, max_pixels=max_pixels)
    m, n = d.shape
    positive = d.absmax[d.absmax > 0]
    vmax = float(positive.max()) if positive.size else 1.0
    vmin = float(max(positive.min(), vmax * 1e-12)) if positive.size else vmax / 10
    heat = np.where(d.absmax > 0, d.absmax, vmin / 2)  # exact zeros: the colour map's "under" colour
    heat[np.isnan(d.absmax)] = np.nan  # unwritten: its "bad" colour

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    extent = (0, n, m, 0)
    cmap = colormaps["viridis"].with_extremes(under="white", bad="magenta")
    image = left.imshow(
        heat, norm=LogNorm(vmin=vmin, vmax=vmax), cmap=cmap, extent=extent, aspect="auto", interpolation="nearest"
    )
    fig.colorbar(image, ax=left, extend="min", label="|J| (white: exactly 0)")
    per = "" if d.factor == (1, 1) else f", max over {d.factor[0]} x {d.factor[1]} blocks"
    left.set_title(f"|J|, log scale{per}")
    grey = colormaps["Greys"].with_extremes(bad="magenta", under="white")
    fractions = d.nonzero[d.nonzero > 0]
    if fractions.size and d.density < LOG_BELOW:
        # A sparse J's pixels hold a few non-zeros among thousands of entries: on a linear
        # scale from 0 to 1 they are all but white, and the panel looks empty.
        top = float(fractions.max())
        low = min(float(fractions.min()), top / 10)
        norm: Any = LogNorm(vmin=low, vmax=top)  # the densest pixel black, empty ones white
        shade = np.where(d.nonzero > 0, d.nonzero, low / 2)
        shade[np.isnan(d.nonzero)] = np.nan
        scale = ", log scale"
    else:
        norm, shade, scale = None, d.nonzero, ""
    pattern = right.imshow(
        shade,
        norm=norm,
        **({} if norm else {"vmin": 0, "vmax": 1}),
        cmap=grey,
        extent=extent,
        aspect="auto",
        interpolation="nearest",
    )
    fig.colorbar(pattern, ax=right, label=f"fraction of nonzero entries{scale}")
    if jac.sparse:
        what = f"{jac.nnz} stored non-zeros per sample, {percent(d.density)} of entries"
    else:
        what = f"{percent(d.density)} of entries nonzero"
    right.set_title(f"sparsity pattern ({what})")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"input column j (N = {n})")
        ax.set_ylabel(f"output row i (M = {m})")
    which = f", sample {0 if sample is None else sample} of {jac.shape[0]}" if jac.batched else ""
    state = "" if jac.complete else f", INCOMPLETE {jac.tiles_done}/{jac.n_tiles} tiles (magenta: not written)"
    fig.suptitle(f"{jac.path}\n{' x '.join(map(str, jac.shape))} {jac.dtype}, mode {jac.mode}{which}{state}")
    fig.savefig(out, dpi=100)
    return d
