"""benchmarks/folders.py: where the benchmark scripts write, checked before anything is created.

Results go outside the source tree unless `--out` names a folder in it, so committing new
figures is a deliberate copy. A bad folder is a one-line error (exit status 2) before a
script creates a folder, starts Ray or times anything, never a traceback after.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn


def default_out() -> Path:
    """The results folder when `--out` is not given: $XDG_CACHE_HOME/raijac-bench (~/.cache/raijac-bench)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "raijac-bench"


def fail(message: str) -> NoReturn:
    """Print `message` as one line, prefixed with the script's name, and exit with status 2."""
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    sys.exit(2)


def existing_dir(path: str | None, flag: str) -> str | None:
    """`path` when it is an existing folder (None stays None: the system temp folder); else fail."""
    if path is None:
        return None
    if not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "does not exist"
        fail(f"{flag} {path} {what}; create it first or pass another folder.")
    return path


def out_dir(path: str | None, flag: str = "--out") -> Path:
    """The folder results go to (created later, by the caller); fail when it exists as a file."""
    out = default_out() if path is None else Path(path).expanduser()
    if out.exists() and not out.is_dir():
        fail(f"{flag} {out} is a file, not a folder; pass a folder for the results.")
    return out


def file_in_existing_dir(path: str | None, flag: str) -> str | None:
    """`path` when its folder exists (it is written at the end of a long run); else fail."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(path)))
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: the folder {folder} does not exist; create it first or pass another path.")
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; pass a file path.")
    return path
