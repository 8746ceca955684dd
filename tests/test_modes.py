"""raijac.modes: the one registry every mode question is answered from."""

from __future__ import annotations

from pathlib import Path

import pytest

from raijac import modes
from raijac.errors import ModeError
from raijac.kernels import Kernel


def test_every_mode_has_a_kernel_method():
    for spec in modes.REGISTRY.values():
        assert callable(getattr(Kernel, spec.kernel)), spec.name


def test_unknown_mode_names_the_choices():
    with pytest.raises(ModeError, match="unknown mode 'reverse'; choose one of: rev, fwd"):
        modes.get("reverse")
    with pytest.raises(ModeError, match="auto, rev"):
        modes.check_mode("reverse", allow_auto=True)
    modes.check_mode("auto", allow_auto=True)
    with pytest.raises(ModeError):
        modes.check_mode("auto")


@pytest.mark.parametrize(
    ("m", "n", "stackable", "chain", "order"),
    [
        (3, 5, True, False, ["rev", "rev-batched", "rev-repeat", "loop"]),
        (3, 5, False, True, ["chain", "rev", "rev-batched", "loop"]),
        (9, 5, True, False, ["fwd", "fwd-repeat", "rev", "rev-batched", "rev-repeat", "loop"]),
        (9, 5, False, True, ["chain-fwd", "fwd", "rev", "rev-batched", "loop"]),
    ],
)
def test_auto_order_reads_the_registry(m, n, stackable, chain, order):
    assert modes.auto_order(m, n, stackable=stackable, chain=chain) == order


def test_readme_table_is_the_registry():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert modes.docs_table() in readme, (
        "regenerate the README's mode table: python -c 'import raijac.modes as m; print(m.docs_table())'"
    )


def test_cli_choices_are_the_registry():
    from raijac.cli import compute

    option = next(p for p in compute.params if p.name == "mode")
    assert tuple(option.type.choices) == modes.CHOICES
