"""plot and `raijac inspect`: block-max downsampling against numpy, the PNG, and what inspect prints.

Downsampling streams chunks whose edges fall inside pixels (chunks of 3 rows, 2 rows per
pixel), so a pixel's maximum must be merged across reads; a partial store's unwritten
entries must be counted apart, never drawn as zeros.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import raijac
from raijac.plot import downsample, plot_jacobian
from tests.test_cli import assert_one_line_error, explain, invoke

PROBLEMS = Path(__file__).with_name("problems.py")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_session):
    """A plain J in row chunks of 3 (17 x 23), and batched per-sample parameter Jacobians (5 x 4 x 103)."""
    base = tmp_path_factory.mktemp("plot")
    plain, batched = str(base / "plain.zarr"), str(base / "batched.zarr")
    raijac.compute(f"{PROBLEMS}:matmul_chain", plain, workers=2, mode="rev", block_size=3)
    raijac.compute(f"{PROBLEMS}:params_batched", batched, workers=2)
    return {"plain": plain, "batched": batched}


def block_reduce(a: np.ndarray, fr: int, fc: int, reduce) -> np.ndarray:
    """The reference: pad to whole blocks and reduce each (NaN padding is ignored by the nan-reductions)."""
    m, n = a.shape
    padded = np.full((math.ceil(m / fr) * fr, math.ceil(n / fc) * fc), np.nan)
    padded[:m, :n] = a
    blocks = padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks reduce to NaN, as wanted
        return reduce(blocks, axis=(1, 3))


@pytest.mark.parametrize("max_pixels", [512, 9, 4])
def test_downsample_matches_numpy(stores, max_pixels):
    jac = raijac.open(stores["plain"])
    full = jac.numpy().astype(np.float64)
    d = downsample(jac, max_pixels=max_pixels)
    fr, fc = d.factor
    assert (fr, fc) == (math.ceil(17 / max_pixels), math.ceil(23 / max_pixels))
    assert d.absmax.shape == (math.ceil(17 / fr), math.ceil(23 / fc)) and max(d.absmax.shape) <= max_pixels
    np.testing.assert_array_equal(d.absmax, block_reduce(np.abs(full), fr, fc, np.nanmax))
    nonzero = block_reduce((full != 0).astype(float), fr, fc, np.nanmean)
    np.testing.assert_allclose(d.nonzero, nonzero)
    assert d.density == pytest.approx(np.count_nonzero(full) / full.size)
    assert not d.unwritten.any()


def test_downsample_a_sample_and_a_partial_store(stores, tmp_path):
    path = str(tmp_path / "partial.zarr")
    shutil.copytree(stores["batched"], path)
    group = zarr.open_group(path, mode="r+")
    full = group["jacobian"][...]
    group["jacobian"][2, :3, :] = np.nan  # as a tile that was never written
    group["tiles"][0] = 0
    jac = raijac.open(path, allow_partial=True)
    d = downsample(jac, sample=2, max_pixels=50)
    fr, fc = d.factor
    assert (fr, fc) == (1, 3)
    want = np.abs(full[2]).astype(np.float64)
    want[:3] = np.nan
    np.testing.assert_array_equal(d.absmax, block_reduce(want, fr, fc, np.nanmax))
    np.testing.assert_array_equal(d.unwritten[:3], 1.0)
    np.testing.assert_array_equal(d.unwritten[3:], 0.0)
    assert np.isnan(d.nonzero[:3]).all() and not np.isnan(d.nonzero[3:]).any()
    plot_jacobian(jac, str(tmp_path / "partial.png"), sample=2)  # unwritten blocks drawn apart (magenta)
    assert (tmp_path / "partial.png").read_bytes()[:4] == b"\x89PNG"
    d0 = downsample(jac)  # sample 0 by default: fully written
    np.testing.assert_array_equal(d0.absmax, block_reduce(np.abs(full[0]).astype(np.float64), 1, 1, np.nanmax))
    with pytest.raises(IndexError, match="index 5 is out of range for batch of size 5"):
        downsample(jac, sample=5)
    with pytest.raises(raijac.RaijacError, match="batched stores only"):
        downsample(raijac.open(stores["plain"]), sample=0)


def test_plot_writes_a_png(stores, tmp_path):
    out = tmp_path / "j.png"
    d = plot_jacobian(raijac.open(stores["batched"]), str(out), sample=1)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from matplotlib.image import imread

    image = imread(str(out))
    assert image.shape[:2] == (500, 1200)  # 12 x 5 inches at 100 dpi
    assert image[..., :3].std() > 0.1  # not blank
    assert d.absmax.shape == (4, 103)


def test_missing_matplotlib_is_one_sentence(stores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("inspect", stores["plain"], "--plot", tmp_path / "j.png")
    assert_one_line_error(result, "matplotlib", "pip install 'raijac[plot]'")
    assert not (tmp_path / "j.png").exists()


def test_inspect_shows_everything_and_plots(stores, tmp_path):
    out = tmp_path / "b.png"
    result = invoke("inspect", stores["batched"], "--plot", out, "--sample", 4)
    assert result.exit_code == 0, explain(result)
    text = result.stdout
    for needle in [
        "complete, 2/2 tiles",  # a small Jacobian: one tile per worker (NOTE: [small runs] in plan)
        "(5, 4, 103) float32",
        "output (4,) x input (103,) per sample (w.r.t. params); unflattened (5, 4, 103)",
        "mode      rev (auto: M=4 <= N=103, so rev)",
        "on disk (compression",
        "computing",
        "versions  raijac 0.1.0, torch",
        f"plot      {out} (4 x 103 pixels)",
    ]:
        assert needle in text, (needle, text)
    assert out.read_bytes()[:4] == b"\x89PNG"

    info = json.loads(invoke("inspect", stores["plain"], "--json").stdout)
    assert info["unflattened_shape"] == [17, 23] and info["shape"] == [17, 23]
    assert info["runs"] == 1 and info["compute_seconds"] >= 0 and info["seconds"] > 0
    assert info["versions"]["zarr"] == zarr.__version__
    assert info["bytes"] == 17 * 23 * 4 and info["bytes_stored"] > 0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--sample", 9], ["index 9 is out of range for batch of size 5"]),
        (["--sample", -6], ["index -6"]),
    ],
)
def test_inspect_plot_bad_sample(stores, tmp_path, args, needles):
    result = invoke("inspect", stores["batched"], "--plot", tmp_path / "x.png", *args)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "x.png").exists()


def test_inspect_sample_needs_plot_and_a_batched_store(stores, tmp_path):
    assert_one_line_error(invoke("inspect", stores["batched"], "--sample", 1), "--plot")
    assert_one_line_error(invoke("inspect", stores["plain"], "--plot", tmp_path / "x.png", "--sample", 0), "batched stores only")
