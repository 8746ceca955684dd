"""verify: random probes of stored Jacobians against fresh torch.func JVPs / VJPs, via Python and the CLI.

Stores are computed from specs naming the families in tests/problems.py (so `verify` rebuilds
them the way the CLI does), then copied and corrupted in one entry, one chunk, or their
metadata; verify must pass every untouched store and fail every corrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import raijac
from raijac import reader
from raijac.verify import DEFAULT_RTOL, VerifyReport, verify
from tests.problems import BY_NAME
from tests.test_cli import assert_one_line_error, explain, invoke

PROBLEMS = Path(__file__).with_name("problems.py")

# (family, compute options): plain rows, column chunks (fwd), batched inputs, parameter
# Jacobians plain and per sample, float64, a float16 store of a float32 problem, and
# functions torch.func cannot transform (verify falls back to autograd).
STORES = {
    "plain-rev": ("matmul_chain", {"mode": "rev"}),
    "multidim-fwd": ("multidim", {"mode": "fwd"}),
    "batched": ("batched_mlp", {}),
    "batched-fwd": ("batched_mlp", {"mode": "fwd"}),
    "params": ("params", {}),
    "params-batched": ("params_batched", {}),
    "float64": ("float64", {}),
    "float16-store": ("matmul_chain", {"dtype": "float16"}),
    "old-style-function": ("old_style_function", {}),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_session):
    """Each store in STORES, computed once from its spec (block size 3: several tiles, odd edges)."""
    base = tmp_path_factory.mktemp("verify")
    out = {}
    for name, (family, options) in STORES.items():
        path = str(base / f"{name}.zarr")
        raijac.compute(f"{PROBLEMS}:{family}", path, workers=2, block_size=3, **options)
        out[name] = path
    return out


def spec_of(name: str) -> str:
    """The spec a store in STORES was computed from (verify runs only a spec its caller names)."""
    return f"{PROBLEMS}:{STORES[name][0]}"


def copy(stores, name: str, tmp_path: Path) -> str:
    dest = str(tmp_path / f"{name}.zarr")
    shutil.copytree(stores[name], dest)
    return dest


def corrupt_one_entry(path: str, seed: int, relative: float = 1e-2) -> tuple[int, ...]:
    """Add `relative` times the largest |J| to one entry at a random position; returns the position."""
    array = zarr.open_group(path, mode="r+")["jacobian"]
    full = array[...]
    at = tuple(int(i) for i in np.random.default_rng(seed).integers(0, full.shape))
    array[at] = full[at] + relative * float(np.abs(full).max())
    assert array[at] != full[at]
    return at


# ---------------------------------------------------------------------- untouched stores pass
@pytest.mark.parametrize("name", list(STORES))
def test_untouched_store_passes(stores, name):
    report = verify(stores[name], probes=4, spec=spec_of(name))
    assert report.ok, str(report)
    family = STORES[name][0]
    want = 1e-12 if family == "float64" else (1e-3 if "float16" in name else 1e-5)
    assert report.max_error < want, str(report)
    assert len(report.jvp_errors) == len(report.vjp_errors) == 4
    assert report.y_error < want
    assert report.suspect is None
    expected_reference = "autograd" if family == "old_style_function" else "torch.func"
    assert report.reference == expected_reference


def test_default_tolerance_follows_the_dtypes(stores):
    assert verify(stores["plain-rev"], probes=1, spec=spec_of("plain-rev")).rtol == DEFAULT_RTOL["float32"] == 1e-4
    assert verify(stores["float64"], probes=1, spec=spec_of("float64")).rtol == DEFAULT_RTOL["float64"] == 1e-9
    assert verify(stores["float16-store"], probes=1, spec=spec_of("float16-store")).rtol == DEFAULT_RTOL["float16"]
    assert verify(stores["plain-rev"], probes=1, rtol=0.5, spec=spec_of("plain-rev")).rtol == 0.5


# ---------------------------------------------------------------------- one corrupted entry fails
@pytest.mark.parametrize("name", list(STORES))
def test_one_corrupted_entry_is_caught_and_located(stores, tmp_path, name):
    path = copy(stores, name, tmp_path)
    at = corrupt_one_entry(path, seed=len(name))
    report = verify(path, probes=4, spec=spec_of(name))
    assert not report.ok, str(report)
    assert report.max_error > report.rtol
    want = at if len(at) == 3 else (None, *at)
    assert report.suspect == want, str(report)
    assert "FAILED" in str(report) and "point at J[" in str(report)


@pytest.mark.parametrize("name", ["plain-rev", "batched-fwd", "params-batched", "float64"])
def test_many_positions_and_small_changes(stores, tmp_path, name):
    """Ten random positions, each changed by 1e-3 of the largest |J| (1e-8 for float64): all caught."""
    relative = 1e-8 if name == "float64" else 1e-3
    for seed in range(10):
        path = copy(stores, name, tmp_path / str(seed))
        corrupt_one_entry(path, seed=100 + seed, relative=relative)
        report = verify(path, probes=8, spec=spec_of(name))
        assert not report.ok, f"seed {seed}: {report}"


def test_a_lost_chunk_fails(stores, tmp_path):
    """A chunk of NaN (as an unwritten tile reads) or of zeros, with the ledger still saying done."""
    for fill in (np.nan, 0.0):
        path = copy(stores, "batched", tmp_path / str(fill))
        array = zarr.open_group(path, mode="r+")["jacobian"]
        b, r, c = array.chunks
        array[1:2, :r, :] = fill
        report = verify(path, probes=2, spec=spec_of("batched"))
        assert not report.ok, str(report)
        assert report.suspect[0] == 1
        json.dumps(report.to_dict(), allow_nan=False)  # NaN errors become null


def _norm(x):
    return torch.sqrt((x**2).sum(-1, keepdim=True))


def test_a_store_holding_torchs_own_inf_and_nan_passes(ray_session, tmp_path):
    """sqrt of a zero sample's norm: torch's J is NaN there (inf in forward mode); a store
    holding it matched f, and a NaN where J is finite still fails."""
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], dtype=torch.float64)
    path = str(tmp_path / "nan.zarr")
    raijac.compute(raijac.Problem(_norm, x, batched=True), path, workers=2)
    report = verify(path, problem=raijac.Problem(_norm, x, batched=True), probes=4)
    assert report.ok, str(report)
    zarr.open_group(path, mode="r+")["jacobian"][2, 0, 1] = np.nan
    report = verify(path, problem=raijac.Problem(_norm, x, batched=True), probes=4)
    assert not report.ok and report.suspect[0] == 2, str(report)


# ---------------------------------------------------------------------- what verify refuses
def test_incomplete_store_is_refused(stores, tmp_path):
    path = copy(stores, "plain-rev", tmp_path)
    zarr.open_group(path, mode="r+")["tiles"][0] = 0
    with pytest.raises(raijac.StoreError, match=r"incomplete \(\d+/\d+ tiles written\).*--resume"):
        verify(path, spec=spec_of("plain-rev"))


def test_fingerprint_mismatch_is_refused(stores, tmp_path):
    other = BY_NAME["matmul_chain"].build()
    other = other.replace(x=other.x + 1)  # the same function at another point
    with pytest.raises(raijac.StoreError, match="fingerprint"):
        verify(stores["plain-rev"], problem=other)


def test_store_without_spec_needs_the_problem(ray_session, tmp_path):
    problem = BY_NAME["params_batched"].build()
    path = str(tmp_path / "python.zarr")
    raijac.compute(problem, path, workers=2)
    with pytest.raises(raijac.StoreError, match=r"no spec.*problem=problem"):
        verify(path)
    report = verify(path, problem=BY_NAME["params_batched"].build())
    assert report.ok, str(report)
    corrupt_one_entry(path, seed=3)
    assert not verify(path, problem=BY_NAME["params_batched"].build()).ok


def test_changed_function_fails_on_y(stores, tmp_path):
    """Same spec, x and parameters, but the stored y no longer equals f(x): f changed since the run."""
    path = copy(stores, "plain-rev", tmp_path)
    group = zarr.open_group(path, mode="r+")
    group["y"][0] = group["y"][0] + 0.5
    report = verify(path, probes=1, spec=spec_of("plain-rev"))
    assert not report.ok and report.y_error > 1e-3
    assert "f changed since the run" in report.verdict()


# ---------------------------------------------------------------------- streaming
def test_reads_block_by_block(stores, monkeypatch):
    """With a 1-byte block budget every read is one chunk, never J whole, and the answer is the same."""
    shapes = []
    real = reader.Jacobian.blocks

    def spy(self, **kw):
        for region, block in real(self, **kw):
            shapes.append(block.shape)
            yield region, block

    monkeypatch.setattr(reader.Jacobian, "blocks", spy)
    path = stores["batched"]
    whole = reader.Jacobian(path).shape
    big = verify(path, probes=3, spec=spec_of("batched"))
    n_default = len(shapes)
    shapes.clear()
    monkeypatch.setattr(reader, "BLOCK_BYTES", 1)
    small = verify(path, probes=3, spec=spec_of("batched"))
    assert small.ok and big.ok
    np.testing.assert_allclose(small.jvp_errors, big.jvp_errors, rtol=1e-3, atol=1e-12)
    chunk = zarr.open_group(path, mode="r")["jacobian"].chunks
    n_chunks = math.prod(math.ceil(n / c) for n, c in zip(whole, chunk, strict=True))
    assert len(shapes) == n_chunks > n_default >= 1  # one pass for J v and u^T J: each chunk read once
    assert all(math.prod(s) <= math.prod(chunk) < math.prod(whole) for s in shapes)


# ---------------------------------------------------------------------- report and CLI
def test_report_text_and_json(stores):
    report = verify(stores["params-batched"], probes=3, seed=7, spec=spec_of("params-batched"))
    assert isinstance(report, VerifyReport)
    text = str(report)
    assert "3 probes" in text and "rtol 1e-04" in text and text.splitlines()[-1].startswith("OK")
    for k, (a, b) in enumerate(zip(report.jvp_errors, report.vjp_errors, strict=True)):
        assert f"{k:5d}   {a:14.2e}   {b:16.2e}" in text
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["ok"] is True and d["probes"] == 3 and d["shape"] == list(report.shape)
    with pytest.raises(dataclasses_frozen()):
        report.rtol = 1.0  # type: ignore[misc]


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_cli_verify_passes_and_fails(stores, tmp_path):
    ok = invoke("verify", stores["batched"], "--spec", spec_of("batched"), "--probes", 3)
    assert ok.exit_code == 0, explain(ok)
    assert "OK: every probe within rtol 1e-04" in ok.stdout
    assert len([line for line in ok.stdout.splitlines() if line.strip()[:1].isdigit()]) == 3

    path = copy(stores, "batched", tmp_path)
    at = corrupt_one_entry(path, seed=5)
    bad = invoke("verify", path, "--spec", spec_of("batched"))
    assert bad.exit_code == 1, explain(bad)
    assert "FAILED" in bad.stdout and f"J[{at[0]}, {at[1]}, {at[2]}]" in bad.stdout
    assert "<-- past rtol" in bad.stdout

    as_json = invoke("verify", path, "--spec", spec_of("batched"), "--json", "--rtol", 10)  # a huge tolerance passes
    assert as_json.exit_code == 0, explain(as_json)
    d = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert d["ok"] is True and d["rtol"] == 10


def test_cli_verify_refusals_are_one_line(stores, tmp_path, ray_session):
    spec = spec_of("plain-rev")
    partial = copy(stores, "plain-rev", tmp_path / "p")
    zarr.open_group(partial, mode="r+")["tiles"][1] = 0
    assert_one_line_error(invoke("verify", partial, "--spec", spec), "incomplete", "--resume")

    changed = copy(stores, "plain-rev", tmp_path / "f")
    group = zarr.open_group(changed, mode="r+")
    group.attrs["raijac"] = {**group.attrs["raijac"], "fingerprint": "0" * 32}
    assert_one_line_error(invoke("verify", changed, "--spec", spec), "fingerprint", "0" * 32)

    no_spec = copy(stores, "plain-rev", tmp_path / "s")
    group = zarr.open_group(no_spec, mode="r+")
    group.attrs["raijac"] = {**group.attrs["raijac"], "spec": None}
    assert_one_line_error(invoke("verify", no_spec), "has no spec", "from Python")

    (tmp_path / "plain").mkdir()
    assert_one_line_error(invoke("verify", tmp_path / "plain"), "not a raijac store")
    assert_one_line_error(invoke("verify", tmp_path / "plain", "--trust-spec"), "not a raijac store")


# ---------------------------------------------------------------------- which spec verify runs
EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from tests.problems import matmul_chain
"""


def evil_store(stores, tmp_path: Path) -> tuple[str, Path]:
    """A copy of plain-rev whose metadata names a script that writes a marker file when imported."""
    path = copy(stores, "plain-rev", tmp_path)
    marker = tmp_path / "marker"
    script = tmp_path / "evil" / "problems.py"  # same stem: the fingerprint would not tell it apart
    script.parent.mkdir()
    script.write_text(EVIL.format(marker=str(marker)))
    group = zarr.open_group(path, mode="r+")
    group.attrs["raijac"] = {**group.attrs["raijac"], "spec": f"{script}:matmul_chain", "spec_sha256": None}
    return path, marker


def test_verify_never_runs_the_stored_spec_on_its_own(stores, tmp_path):
    path, marker = evil_store(stores, tmp_path)
    with pytest.raises(raijac.StoreError, match=r"pass spec=.*--spec FILE:NAME.*stores never run code on their own"):
        verify(path)
    assert_one_line_error(invoke("verify", path), "--spec FILE:NAME", "stores never run code on their own")
    assert not marker.exists()
    report = verify(path, spec=spec_of("plain-rev"), probes=2)  # an explicit spec runs, the stored one does not
    assert report.ok, str(report)
    assert not marker.exists()


def test_trust_spec_says_what_it_runs_first(stores, tmp_path):
    path, marker = evil_store(stores, tmp_path)
    result = invoke("verify", path, "--trust-spec", "--probes", 2)
    assert result.exit_code == 0, explain(result)
    assert marker.exists()  # it did run the named file, as asked
    assert result.stderr.startswith(f"--trust-spec: running {tmp_path / 'evil' / 'problems.py'}:matmul_chain")
    assert_one_line_error(invoke("verify", path, "--trust-spec", "--spec", spec_of("plain-rev")), "contradict")


def test_spec_is_stored_relative_with_its_digest(ray_session, tmp_path, monkeypatch):
    """A moved but identical spec verifies; an edited one is refused in one sentence; the store names a relative path."""
    checkout = tmp_path / "checkout"
    (checkout / "specs").mkdir(parents=True)
    shutil.copy(PROBLEMS, checkout / "specs" / "problems.py")
    monkeypatch.chdir(checkout)
    monkeypatch.syspath_prepend(str(Path(PROBLEMS).parents[1]))  # the spec imports tests.problems' neighbours
    raijac.compute("specs/problems.py:matmul_chain", "s.zarr", workers=2)
    meta = zarr.open_group("s.zarr", mode="r").attrs["raijac"]
    assert meta["spec"] == "specs/problems.py:matmul_chain"
    assert meta["spec_sha256"] == hashlib.sha256(Path(PROBLEMS).read_bytes()).hexdigest()

    moved = tmp_path / "moved"
    shutil.move(str(checkout), moved)
    monkeypatch.chdir(moved)
    assert verify("s.zarr", spec=f"{moved / 'specs' / 'problems.py'}:matmul_chain", probes=2).ok
    assert verify("s.zarr", trust_spec=True, probes=2).ok  # the relative path still names it from the new root

    edited = moved / "edited" / "problems.py"
    edited.parent.mkdir()
    edited.write_text(Path(PROBLEMS).read_text() + "\n# edited\n")
    with pytest.raises(raijac.StoreError, match=r"differs from the one the store was computed from \(sha256"):
        verify("s.zarr", spec=f"{edited}:matmul_chain")
    (moved / "specs" / "problems.py").write_text(edited.read_text())
    assert_one_line_error(invoke("verify", "s.zarr", "--trust-spec"), "differs from the one the store was computed from")


def test_cli_compute_verify(tmp_path, ray_session):
    out = tmp_path / "c.zarr"
    result = invoke("compute", f"{PROBLEMS}:batched_mlp", "--out", out, "--workers", 2, "--verify", "--json")
    assert result.exit_code == 0, explain(result)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["verify"]["ok"] is True and summary["verify"]["probes"] == 8
    text = invoke("compute", f"{PROBLEMS}:batched_mlp", "--out", out, "--workers", 2, "--resume", "--verify")
    assert text.exit_code == 0, explain(text)
    assert text.stdout.splitlines()[-1].startswith("verify: OK")


def test_cli_compute_verify_failure_exits_1(tmp_path, ray_session, monkeypatch):
    import raijac.verify as module

    real = module.verify
    monkeypatch.setattr(module, "verify", lambda path, **kw: real(path, **{**kw, "rtol": 0.0}))  # nothing passes rtol 0
    result = invoke("compute", f"{PROBLEMS}:matmul_chain", "--out", tmp_path / "c.zarr", "--workers", 2, "--verify")
    assert result.exit_code == 1, explain(result)
    assert result.stdout.splitlines()[-1].startswith("verify: FAILED")
