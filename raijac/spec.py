"""spec: naming a problem by `path/to/file.py:NAME` or `package.module:NAME` (no torch; used by problem, api, verify).

A spec is how the CLI, cluster workers and `raijac verify` find a problem. Stores record
it relative to the working folder, with the file's sha256, so a moved checkout still
verifies and a changed file is refused; the fingerprint uses only the file's stem, since
workers on a cluster import a shipped spec file as a module of that name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from raijac.errors import ProblemError, first_line


def spec_key(spec: str | None) -> str | None:
    """What names a spec wherever it is loaded: `file_stem:NAME` or `package.module:NAME`.

    A spec file shipped to cluster workers is imported there as a module of the same stem,
    so the fingerprint must not depend on the folder it was found in.
    """
    if spec is None:
        return None
    target, _, name = spec.rpartition(":")
    return f"{os.path.splitext(os.path.basename(target))[0]}:{name}" if is_path(target) else spec


def normalize_spec(spec: str) -> str:
    """The spec with a file path made absolute, so workers in other directories find it."""
    target, _, name = spec.rpartition(":")
    if is_path(target):
        return f"{os.path.abspath(target)}:{name}"
    return spec


def is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def import_spec_module(target: str, spec: str) -> ModuleType:
    """The module a spec names: a file executed afresh, or an installed module."""
    if is_path(target):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ProblemError(f"spec file {target} does not exist; check the path in {spec!r}.")
        # Executed afresh on every load: an edited spec file must not be served from a cache.
        mod_name = "raijac_spec_" + hashlib.sha1(path.encode()).hexdigest()[:12]
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)  # let the spec file import its neighbours
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ProblemError(f"importing {target} raised {type(exc).__name__}: {first_line(exc)}.") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ProblemError(f"cannot import module {target!r} from spec {spec!r}: {exc}; check the name or install it.") from exc
    except Exception as exc:
        raise ProblemError(f"importing {target} raised {type(exc).__name__}: {first_line(exc)}.") from exc


def spec_digest(spec: str) -> str | None:
    """sha256 of a spec's file (None for a `package.module:NAME` spec, or a file that is not there)."""
    target = spec.rpartition(":")[0]
    if not is_path(target) or not os.path.isfile(target):
        return None
    with open(target, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def portable_spec(spec: str | None) -> str | None:
    """A spec file's path relative to the working folder, as a store records it: an absolute
    path breaks when the checkout moves; the sha256 beside it says whether a copy is the same file."""
    if not spec:
        return spec
    target, _, name = spec.rpartition(":")
    if not is_path(target):
        return spec
    try:
        return f"{os.path.relpath(target)}:{name}"
    except ValueError:  # another drive (Windows): no relative path exists
        return spec
