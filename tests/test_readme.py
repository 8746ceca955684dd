"""README: every ```python block runs as pasted, in order, in one folder, on the session's real Ray.

Blocks share the folder (a later block reads a store an earlier one wrote, as a reader
pasting them would) but not their names: each must define what it uses. A block that is
too big for the test machine carries the comment `# readme-test: skip` with its reason.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = "# readme-test: skip"


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(the heading above it, code) for every ```python block, in order."""
    blocks, heading = [], "top"
    for part in re.split(r"(^```python\n.*?^```$)", text, flags=re.S | re.M):
        if part.startswith("```python"):
            blocks.append((heading, part[len("```python\n") : -3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return blocks


BLOCKS = python_blocks((REPO / "README.md").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ray_session) -> Path:
    """Where the blocks run: `examples/`, which the README's specs name, and `ntk.zarr`, made
    as the README says (`raijac compute examples/batched_mlp.py:problem --out ntk.zarr`)."""
    import raijac

    path = tmp_path_factory.mktemp("readme")
    (path / "examples").symlink_to(REPO / "examples")
    raijac.compute(str(path / "examples" / "batched_mlp.py") + ":problem", str(path / "ntk.zarr"), workers=2)
    return path


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 6 and all(code.strip() for _, code in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{h}" for i, (h, _) in enumerate(BLOCKS)])
def test_block_runs_as_pasted(folder, monkeypatch, index):
    heading, code = BLOCKS[index]
    if SKIP in code:
        pytest.skip(code.split(SKIP, 1)[1].splitlines()[0].strip(" :") or "marked in the README")
    monkeypatch.chdir(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # e.g. scipy's on integer diagonals
        warnings.simplefilter("error", DeprecationWarning)
        exec(compile(code, f"README.md block {index} ({heading})", "exec"), {"__name__": "__readme__"})
    assert os.getcwd() == str(folder)
