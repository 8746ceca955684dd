"""store: the on-disk contract, the completion ledger, block writes and the --out safety checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from raijac import store
from raijac.errors import StoreError
from raijac.planner import WorkerCost, make_plan

META = {"mode": "rev", "n_tiles": 6, "fingerprint": "abc123", "complete": False}


def make_store(path, *, shape=(5, 7), chunks=(2, 7), dtype="float64", n_tiles=6, batched=False, compressor=None, meta=None):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((shape[0], 7) if batched else (7,))
    y = rng.standard_normal((shape[0], 5) if batched else (5,))
    return (
        store.create(
            str(path),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            n_tiles=n_tiles,
            arrays={"x": (x, batched), "y": (y, batched)},
            meta={**META, "n_tiles": n_tiles, **(meta or {})},
            compressor=compressor,
        ),
        x,
        y,
    )


def snapshot(path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under path, by relative path."""
    if os.path.isfile(path):
        return {".": open(path, "rb").read()}
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return out


# ---------------------------------------------------------------------- create: the on-disk contract
@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
def test_create_is_plain_zarr_v3(tmp_path, batched):
    path = tmp_path / "j.zarr"
    shape, chunks = ((3, 5, 7), (1, 2, 7)) if batched else ((5, 7), (2, 7))
    _, x, y = make_store(path, shape=shape, chunks=chunks, dtype="float32", batched=batched)

    group = zarr.open_group(str(path), mode="r")  # no raijac involved
    jac = group["jacobian"]
    assert jac.metadata.zarr_format == 3
    assert json.loads((path / "zarr.json").read_text())["zarr_format"] == 3
    assert jac.shape == shape and jac.chunks == chunks and jac.dtype == np.float32
    assert jac.metadata.dimension_names == (("batch", "output", "input") if batched else ("output", "input"))
    assert np.isnan(jac.fill_value)
    data = jac[...]
    assert data.shape == shape and np.isnan(data).all()
    assert jac.nchunks_initialized == 0  # nothing written yet: the fill is the NaN, not stored chunks

    np.testing.assert_array_equal(group["x"][...], x)
    np.testing.assert_array_equal(group["y"][...], y)
    if batched:
        assert group["x"].metadata.dimension_names == ("batch", "x_1")
        assert group["y"].metadata.dimension_names == ("batch", "y_1")
    else:
        assert group["x"].metadata.dimension_names == ("x_0",)
        assert group["y"].metadata.dimension_names == ("y_0",)

    ledger = group["tiles"]
    assert ledger.shape == (6,) and ledger.dtype == np.uint8
    np.testing.assert_array_equal(ledger[...], np.zeros(6, np.uint8))

    attrs = dict(group.attrs)["raijac"]
    assert attrs == {"format": "raijac.jacobian", "version": store.FORMAT_VERSION, **META}
    assert store.read_meta(str(path)) == attrs


def test_create_keeps_arrays_of_any_rank(tmp_path):
    params = np.arange(12.0).reshape(3, 4)
    group = store.create(
        str(tmp_path / "p.zarr"),
        shape=(2, 12),
        chunks=(1, 12),
        dtype="float64",
        n_tiles=2,
        arrays={"params": (params, False), "y": (np.array(2.5), False)},
        meta={},
    )
    plain = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    np.testing.assert_array_equal(plain["params"][...], params)
    assert plain["params"].metadata.dimension_names == ("params_0", "params_1")
    assert plain["y"][...] == 2.5 and plain["y"].shape == ()
    assert group.attrs["raijac"] == {"format": "raijac.jacobian", "version": store.FORMAT_VERSION}


def test_create_refuses_an_existing_path(tmp_path):
    make_store(tmp_path / "j.zarr")
    with pytest.raises(FileExistsError, match="already contains data"):  # zarr's own; api checks --out before
        make_store(tmp_path / "j.zarr")


@pytest.mark.parametrize("name,codec", [(None, ZstdCodec), ("zstd", ZstdCodec), ("blosc", BloscCodec), ("none", None)])
def test_create_compressors_round_trip(tmp_path, name, codec):
    path = tmp_path / "c.zarr"
    group, _, _ = make_store(path, compressor=name)
    compressors = zarr.open_group(str(path), mode="r")["jacobian"].compressors
    assert [type(c) for c in compressors] == ([codec] if codec else [])
    block = np.linspace(-1, 1, 35).reshape(5, 7)
    store.write_block(group["jacobian"], store.block_region("rows", False, 0, 1, 0, 5), block)
    np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["jacobian"][...], block)


def test_compressor_codec_names():
    zstd = store.compressor_codec(None)
    assert isinstance(zstd, ZstdCodec) and zstd.level == 1
    assert store.compressor_codec("zstd").level == 1
    assert store.compressor_codec("zstd", level=7).level == 7
    blosc = store.compressor_codec("blosc")
    assert isinstance(blosc, BloscCodec) and blosc.cname.value == "zstd" and blosc.clevel == 3
    assert blosc.shuffle.value == "shuffle"
    assert store.compressor_codec("blosc", level=9).clevel == 9
    assert store.compressor_codec("none") is None


@pytest.mark.parametrize("name", ["gzip", "ZSTD", "", "lz4"])
def test_compressor_codec_unknown(name):
    with pytest.raises(StoreError) as info:
        store.compressor_codec(name)
    msg = str(info.value)
    assert repr(name) in msg and "auto, zstd, blosc, none" in msg


# ---------------------------------------------------------------------- the completion ledger
def test_ledger_round_trip_with_gaps(tmp_path):
    path = tmp_path / "l.zarr"
    group, _, _ = make_store(path, n_tiles=10)
    ledger = store.Ledger(group)
    assert store.Ledger(group).pending() == ledger.pending() == list(range(10))  # stored == copy
    ledger.mark([7, 2, 9, 3, 4])
    assert store.Ledger(group).pending() == ledger.pending() == [0, 1, 5, 6, 8]
    ledger.mark([])
    ledger.mark([4, 5, 0])  # overlaps already-done tile 4
    reopened = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(reopened["tiles"][...], np.array([1, 0, 1, 1, 1, 1, 0, 1, 0, 1], np.uint8))
    assert store.Ledger(reopened).pending() == [1, 6, 8]  # a resumed run starts from what is stored
    ledger.mark([8, 6, 1])
    assert store.Ledger(store.open_group(str(path))).pending() == []


def test_ledger_spans_several_chunks(tmp_path):
    n = store.LEDGER_CHUNK + 100
    group, _, _ = make_store(tmp_path / "big.zarr", n_tiles=n)
    assert group["tiles"].chunks == (store.LEDGER_CHUNK,)
    first = list(range(store.LEDGER_CHUNK - 3, store.LEDGER_CHUNK + 4)) + [0, n - 1]
    store.Ledger(group).mark(first)
    later = [5, n - 2]  # a second run (resume) must keep the first run's records in both chunks
    store.Ledger(store.open_group(str(tmp_path / "big.zarr"), "r+")).mark(later)
    expected = np.zeros(n, np.uint8)
    expected[first + later] = 1
    np.testing.assert_array_equal(store.open_group(str(tmp_path / "big.zarr"))["tiles"][...], expected)
    assert len(store.Ledger(group).pending()) == n - len(first) - len(later)


def test_update_meta_merges(tmp_path):
    group, _, _ = make_store(tmp_path / "m.zarr")
    meta = store.update_meta(group, complete=True, seconds=1.5)
    assert meta == {"format": "raijac.jacobian", "version": store.FORMAT_VERSION, **META, "complete": True, "seconds": 1.5}
    assert store.read_meta(str(tmp_path / "m.zarr")) == meta


# ---------------------------------------------------------------------- block writes
def test_block_region_examples():
    s = slice
    assert store.block_region("rows", False, 0, 1, 2, 5) == (s(2, 5), s(None))
    assert store.block_region("cols", False, 0, 1, 2, 5) == (s(None), s(2, 5))
    assert store.block_region("rows", True, 1, 3, 0, 4) == (s(1, 3), s(0, 4), s(None))
    assert store.block_region("cols", True, 1, 3, 0, 4) == (s(1, 3), s(None), s(0, 4))


@pytest.mark.parametrize("batched", [False, True], ids=["unbatched", "batched"])
@pytest.mark.parametrize("seed_axis", ["rows", "cols"])
def test_write_blocks_of_a_plan(tmp_path, seed_axis, batched):
    """Blocks written tile by tile, as workers do, reassemble J exactly and touch only their chunks."""
    B, M, N = 5, 13, 11  # divide nothing
    samples = B if batched else 1
    ref = np.random.default_rng(0).standard_normal((samples, M, N)).astype(np.float32)
    n_other = N if seed_axis == "rows" else M
    plan = make_plan(
        mode="rev" if seed_axis == "rows" else "fwd",
        requested_mode="auto",
        reason="test",
        batch_size=B if batched else None,
        n_out=M,
        n_in=N,
        seed_axis=seed_axis,
        dtype="float32",
        itemsize=4,
        workers=[WorkerCost("cpu0", "cpu", 10**9, 0, 1)],
        block_size=5,
        chunk_bytes=2 * n_other * 4,  # two seeds per chunk, so a tile of 4 seeds is two chunks
    )
    n_seed = M if seed_axis == "rows" else N
    assert plan.tile_seeds == 4 and plan.n_tiles == samples * -(-n_seed // 4)
    path = tmp_path / "w.zarr"
    group, _, _ = make_store(path, shape=plan.shape, chunks=plan.chunks, dtype="float32", n_tiles=plan.n_tiles, batched=batched)
    array = store.block_array(group, "jacobian")  # as workers open it
    tiles = plan.tiles()
    for t in tiles[::2]:
        if seed_axis == "rows":
            data = ref[t.b0 : t.b1, t.s0 : t.s1, :]
        else:
            data = ref[t.b0 : t.b1, :, t.s0 : t.s1]
        before = array.nchunks_initialized
        store.write_block(array, store.block_region(seed_axis, batched, t.b0, t.b1, t.s0, t.s1), data if batched else data[0])
        assert array.nchunks_initialized - before == -(-(t.s1 - t.s0) // 2) * (t.b1 - t.b0)

    got = zarr.open_group(str(path), mode="r")["jacobian"][...]
    got = got if batched else got[None]
    written = np.zeros(ref.shape, bool)
    for t in tiles[::2]:
        if seed_axis == "rows":
            written[t.b0 : t.b1, t.s0 : t.s1, :] = True
        else:
            written[t.b0 : t.b1, :, t.s0 : t.s1] = True
    np.testing.assert_array_equal(got[written], ref[written])
    assert np.isnan(got[~written]).all() and (~written).any()

    for t in tiles[1::2]:
        data = ref[t.b0 : t.b1, t.s0 : t.s1, :] if seed_axis == "rows" else ref[t.b0 : t.b1, :, t.s0 : t.s1]
        store.write_block(array, store.block_region(seed_axis, batched, t.b0, t.b1, t.s0, t.s1), data if batched else data[0])
    got = zarr.open_group(str(path), mode="r")["jacobian"][...]
    np.testing.assert_array_equal(got, ref if batched else ref[0])


def test_write_block_rewrite_is_idempotent(tmp_path):
    """A requeued block written twice (worker died after writing) leaves the same numbers."""
    group, _, _ = make_store(tmp_path / "r.zarr")
    region = store.block_region("rows", False, 0, 1, 2, 4)
    block = np.arange(14.0).reshape(2, 7)
    store.write_block(group["jacobian"], region, block)
    store.write_block(group["jacobian"], region, block)
    got = group["jacobian"][...]
    np.testing.assert_array_equal(got[2:4], block)
    assert np.isnan(got[[0, 1, 4]]).all()


@pytest.mark.parametrize("compressor", [None, "zstd"])
def test_block_array_stores_every_chunk_and_leaves_zarr_config_alone(tmp_path, compressor):
    """Workers skip zarr's per-chunk "is it all fill value?" scan (NOTE: [empty chunks]): a
    computed block that happens to be all NaN is stored like any other, and reads back the same."""
    group, _, _ = make_store(tmp_path / "e.zarr", compressor=compressor)
    array = store.block_array(group, "jacobian")
    assert zarr.config.get("array.write_empty_chunks") is False  # only this array changed
    nan_block, block = np.full((2, 7), np.nan), np.arange(14.0).reshape(2, 7)
    store.write_block(array, store.block_region("rows", False, 0, 1, 0, 2), nan_block)
    store.write_block(array, store.block_region("rows", False, 0, 1, 2, 4), block)
    assert array.nchunks_initialized == 2
    default = group["jacobian"]  # zarr's default skips an all-NaN chunk
    default[4:5] = np.full((1, 7), np.nan)
    assert default.nchunks_initialized == 2
    got = zarr.open_group(str(tmp_path / "e.zarr"), mode="r")["jacobian"][...]
    np.testing.assert_array_equal(got[2:4], block)
    assert np.isnan(got[[0, 1, 4]]).all()


@pytest.mark.parametrize(
    "shape, chunks, region",
    [
        ((5, 13, 6), (1, 4, 6), (slice(1, 4), slice(4, 13), slice(None))),  # whole chunks, a short one at the edge
        ((5, 13, 6), (2, 4, 3), (slice(1, 4), slice(3, 10), slice(None))),  # cut mid-chunk on every axis
        ((13, 12), (4, 12), (slice(4, 12), slice(None))),
        ((13, 12), (13, 5), (slice(None), slice(2, 12))),
    ],
)
@pytest.mark.parametrize("compressor", [None, "zstd"])
@pytest.mark.parametrize("by_chunk", [True, False])
def test_write_block_matches_numpy_whatever_the_chunks(tmp_path, monkeypatch, shape, chunks, region, compressor, by_chunk):
    """A block written chunk by chunk (NOTE: [chunk by chunk]) or in one call lands where
    numpy's assignment puts it, over whatever was there, and nowhere else."""
    monkeypatch.setattr(store, "CHUNK_BY_CHUNK_BYTES", 0 if by_chunk else 2**40)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w-")
    codecs = store.compressor_codec(compressor, None) if compressor else None
    group.create_array("jacobian", shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan, compressors=codecs)
    array = store.block_array(group, "jacobian")
    rng = np.random.default_rng(0)
    expected = np.full(shape, np.nan, dtype=np.float32)
    before = rng.standard_normal(shape).astype(np.float32)  # an earlier block around it stays
    store.write_block(array, tuple(slice(None) for _ in shape), before)
    expected[...] = before
    block = rng.standard_normal(expected[region].shape).astype(np.float32)
    store.write_block(array, region, block)
    expected[region] = block
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["jacobian"][...], expected)


def test_write_block_refuses_a_block_of_another_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_BY_CHUNK_BYTES", 0)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="w-")
    group.create_array("jacobian", shape=(8, 4), chunks=(2, 4), dtype="float32", fill_value=np.nan)
    with pytest.raises(ValueError, match="does not fit"):
        store.write_block(store.block_array(group, "jacobian"), (slice(0, 4), slice(None)), np.zeros((3, 4), np.float32))


# ---------------------------------------------------------------------- check_out and remove
def test_check_out_missing_path_is_fresh(tmp_path):
    path = str(tmp_path / "new.zarr")
    assert store.check_out(path, resume=False, overwrite=False) is None
    assert store.check_out(path, resume=False, overwrite=True) is None
    assert store.check_out(path, resume=True, overwrite=False) is None
    assert not os.path.exists(path)


def test_check_out_missing_parent(tmp_path):
    path = str(tmp_path / "no" / "such" / "out.zarr")
    with pytest.raises(StoreError) as info:
        store.check_out(path, resume=False, overwrite=False)
    assert str(tmp_path / "no" / "such") in str(info.value) and "does not exist" in str(info.value)
    assert not os.path.exists(tmp_path / "no")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_check_out_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            store.check_out(str(locked / "out.zarr"), resume=False, overwrite=False)
    finally:
        locked.chmod(0o700)


def test_check_out_unwritable_parent_as_seen_by_access(tmp_path, monkeypatch):
    """The same branch where tests run as root (which may write anywhere): os.access says no."""
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)
    with pytest.raises(StoreError) as info:
        store.check_out(str(tmp_path / "out.zarr"), resume=False, overwrite=False)
    assert f"its folder {tmp_path} is not writable" in str(info.value) and "--out" in str(info.value)


def _plain_folder(tmp_path):
    path = tmp_path / "mine"
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("precious")
    (path / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return path


def _plain_zarr(tmp_path):
    path = tmp_path / "other.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.attrs["owner"] = "someone else"
    group.create_array("a", shape=(4,), dtype="int32")[...] = np.arange(4)
    return path


def _plain_file(tmp_path):
    path = tmp_path / "file.zarr"
    path.write_bytes(b"not a store")
    return path


def test_check_out_accepts_an_empty_folder(tmp_path):
    """A folder made for the output and still empty holds nothing to lose."""
    path = tmp_path / "empty.zarr"
    path.mkdir()
    for resume, overwrite in [(False, False), (True, False), (False, True)]:
        assert store.check_out(str(path), resume=resume, overwrite=overwrite) is None


def _foreign_format(tmp_path):
    path = tmp_path / "foreign.zarr"
    zarr.open_group(str(path), mode="w").attrs["raijac"] = {"format": "something.else", "version": 1}
    return path


@pytest.mark.parametrize("make", [_plain_folder, _plain_zarr, _plain_file, _foreign_format])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True)], ids=["none", "resume", "overwrite"])
def test_check_out_leaves_other_data_alone(tmp_path, make, flags):
    path = make(tmp_path)
    before = snapshot(path)
    with pytest.raises(StoreError) as info:
        store.check_out(str(path), resume=flags[0], overwrite=flags[1])
    assert str(path) in str(info.value) and "not a raijac" in str(info.value)
    with pytest.raises(StoreError, match="not a raijac store"):
        store.remove(str(path))
    assert snapshot(path) == before


def test_check_out_existing_store_needs_a_flag(tmp_path):
    path = str(tmp_path / "j.zarr")
    group, _, _ = make_store(path, n_tiles=6)
    store.Ledger(group).mark([1, 4])
    before = snapshot(path)
    with pytest.raises(StoreError) as info:
        store.check_out(path, resume=False, overwrite=False)
    msg = str(info.value)
    assert "--resume" in msg and "--overwrite" in msg and "(2/6 tiles done)" in msg
    assert store.check_out(path, resume=True, overwrite=False) == store.read_meta(path)
    assert store.check_out(path, resume=True, overwrite=False)["fingerprint"] == "abc123"
    assert store.check_out(path, resume=False, overwrite=True) is None
    assert snapshot(path) == before  # checking never writes


@pytest.mark.parametrize("exists", [False, True])
def test_check_out_resume_and_overwrite_contradict(tmp_path, exists):
    path = str(tmp_path / "j.zarr")
    if exists:
        make_store(path)
    with pytest.raises(StoreError, match="--resume and --overwrite"):
        store.check_out(path, resume=True, overwrite=True)


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True)], ids=["none", "resume", "overwrite"])
def test_check_out_newer_format_needs_upgrade(tmp_path, flags):
    path = str(tmp_path / "j.zarr")
    group, _, _ = make_store(path)
    store.update_meta(group, version=store.FORMAT_VERSION + 1)
    with pytest.raises(StoreError) as info:
        store.check_out(path, resume=flags[0], overwrite=flags[1])
    msg = str(info.value)
    assert f"store format {store.FORMAT_VERSION + 1}" in msg and "upgrade raijac" in msg
    assert os.path.exists(path)


def test_read_meta_ignores_non_dict_attribute(tmp_path):
    path = tmp_path / "odd.zarr"
    zarr.open_group(str(path), mode="w").attrs["raijac"] = "not a dict"
    assert store.read_meta(str(path)) is None
    assert store.read_meta(str(tmp_path / "missing")) is None


def test_remove_deletes_only_a_raijac_store(tmp_path):
    path = tmp_path / "j.zarr"
    make_store(path)
    neighbour = _plain_folder(tmp_path)
    before = snapshot(neighbour)
    store.remove(str(path))
    assert not path.exists()
    assert snapshot(neighbour) == before
    with pytest.raises(StoreError, match="refusing to delete"):
        store.remove(str(path))  # gone: nothing recognisable to delete


def test_remove_without_waiting_frees_the_path_at_once_and_deletes_aside(tmp_path):
    """NOTE: [removed aside]: the path is free as soon as remove returns (a new store can be
    made there), the old one goes in a thread, and one a killed process left aside is
    deleted at the next removal of that path; neighbours are untouched."""
    path = tmp_path / "j.zarr"
    make_store(path)
    neighbour = _plain_folder(tmp_path)
    before = snapshot(neighbour)
    stale = tmp_path / ("j.zarr" + store.ASIDE + "deadbeef")
    stale.mkdir()
    (stale / "chunk").write_bytes(b"x" * 100)
    thread = store.remove(str(path), wait=False)
    assert not path.exists() and not stale.exists()
    make_store(path)  # the path is free while the old store is still being deleted
    thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["j.zarr", neighbour.name])
    assert snapshot(neighbour) == before
    assert store.read_meta(str(path)) is not None


# ---------------------------------------------------------------------- staged store
def _staged_arrays():
    rng = np.random.default_rng(2)
    return {
        "x": (rng.standard_normal((3, 4)), True),
        "y": (rng.standard_normal((3, 2)), True),
        "params": (rng.standard_normal(9), False),
    }


def test_a_staged_store_is_placed_whole_and_is_a_store_only_once_planned(tmp_path):
    """NOTE: [staged store]: x, y and params are written beside the path, never as a raijac
    store; placing moves them to the path, and the planned part makes it one, equal to a
    store made in one go."""
    path, whole = tmp_path / "j.zarr", tmp_path / "whole.zarr"
    arrays = _staged_arrays()
    staged = store.Staged(str(path), arrays)
    staged._thread.join()
    (beside,) = [p for p in tmp_path.iterdir()]
    assert beside.name.startswith("j.zarr" + store.STAGED) and store.read_meta(str(beside)) is None
    assert not path.exists()
    planned = dict(shape=(3, 2, 4), chunks=(1, 2, 4), dtype="float32", n_tiles=3, meta=META)
    group = store.add_jacobian(staged.place(), **planned)
    staged.discard()  # placed: nothing to delete
    store.create(str(whole), arrays=arrays, **planned)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.zarr", "whole.zarr"]
    assert store.read_meta(str(path))["fingerprint"] == "abc123"
    for name, (data, _) in arrays.items():
        np.testing.assert_array_equal(group[name][...], data)
    a, b = zarr.open_group(str(path)), zarr.open_group(str(whole))
    for name in ("jacobian", "tiles", "x", "y", "params"):
        assert a[name].metadata.to_dict() == b[name].metadata.to_dict()


def test_a_staged_store_is_deleted_unless_placed_and_a_stale_one_at_the_next_stage(tmp_path):
    path = tmp_path / "j.zarr"
    neighbour = _plain_folder(tmp_path)
    stale = tmp_path / ("j.zarr" + store.STAGED + "deadbeef")
    stale.mkdir()
    (stale / "chunk").write_bytes(b"x" * 100)
    with store.Staged(str(path), _staged_arrays()):  # a run that fails before its store
        assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [neighbour.name]


def test_a_staged_store_that_cannot_be_moved_is_written_in_place(tmp_path):
    """The staging thread's failure (or a rename refused) is not the run's: `place` writes the
    arrays at the path itself, and only an error there is raised."""
    path = tmp_path / "j.zarr"
    arrays = _staged_arrays()
    staged = store.Staged(str(path), arrays)
    staged._thread.join()
    staged.error = OSError("disk full")  # as if the thread had failed
    group = staged.place()
    np.testing.assert_array_equal(group["params"][...], arrays["params"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.zarr"]
