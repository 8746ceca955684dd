"""benchmarks: the scripts keep the source tree clean and refuse bad folders before creating anything (issue 15.6).

Each script runs in a subprocess, as a user runs it; none of these calls reaches a timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SCRIPTS = ["run.py", "sparse.py", "chain.py", "out_of_core.py"]


def _run(script: str, *args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",  # importing benchmarks/problems.py must not leave files either
        "XDG_CACHE_HOME": str(cache),  # where run.py's results go by default
        "COLUMNS": "1000",  # argparse would break a long path inside --help
    }
    # A timeout, not a hang: a script that misses the check would start its benchmark.
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def _tree_state() -> tuple[str, list[str]]:
    """`git status` of benchmarks/ (ignored files too) and every path under it."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--", "benchmarks"], capture_output=True, text=True, cwd=ROOT
    )
    if status.returncode:
        pytest.skip("not a git checkout")
    return status.stdout, sorted(str(p) for p in BENCH.rglob("*"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_tmp_is_one_line_before_anything_is_created(script, tmp_path):
    before = _tree_state()
    missing = tmp_path / "no" / "such" / "folder"
    out = tmp_path / "results"
    args = ["--tmp", str(missing)] + (["--out", str(out)] if script == "run.py" else [])
    proc = _run(script, *args, cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"{script}: --tmp {missing} does not exist; create it first or pass another folder."], proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither --out, nor the default results folder, nor --tmp
    assert _tree_state() == before


def test_tmp_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    proc = _run("run.py", "--tmp", str(f), cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"run.py: --tmp {f} is not a folder; create it first or pass another folder."
    assert not (tmp_path / "cache").exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    proc = _run("run.py", "--out", str(f), "--tmp", str(tmp_path), cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"run.py: --out {f} is a file, not a folder; pass a folder for the results."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_sparse_json_in_missing_folder_is_refused_before_the_run(tmp_path):
    target = tmp_path / "missing" / "sparse.json"
    proc = _run("sparse.py", "--json", str(target), cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"sparse.py: --json {target}: the folder {target.parent} does not exist; create it first or pass another path."
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_help_names_a_default_out_outside_the_tree(tmp_path):
    before = _tree_state()
    proc = _run("run.py", "--help", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps the help
    default = tmp_path / "cache" / "raijac-bench"
    assert f"(default: {default};" in text
    assert not default.is_relative_to(ROOT)
    assert not (tmp_path / "cache").exists()  # --help creates nothing
    assert _tree_state() == before


def test_carried_section_survives_a_rewrite(tmp_path):
    """run.py keeps the committed RESULTS.md's hand-written section in every RESULTS.md it writes."""
    committed = tmp_path / "RESULTS.md"
    committed.write_text(
        "# raijac benchmarks\n\n## End to end\n\nold table\n\n## Measurements behind design choices\n\n"
        "- blas: numbers\n\n### store\n\n- more numbers\n\n## Issue 4 targets\n\nold targets\n"
    )
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); import run; "
        f"print(repr(run.carried_sections(run.Path({str(committed)!r})))); "
        f"print(repr(run.carried_sections(run.Path({str(tmp_path / 'absent.md')!r}))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got, absent = proc.stdout.splitlines()
    want = ["## Measurements behind design choices", "", "- blas: numbers", "", "### store", "", "- more numbers", "", ""]
    assert got == repr(want)
    assert absent == "[]"
