"""batching: the batching rules raijac registers from torch's decompositions while a vmapping
kernel runs (NOTE: [batching rules]): off vmap's slow path, the same numbers, gone after."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from raijac import batching
from raijac.batching import batching_rules

D = torch.float64
MASK = torch.tensor([True, False, True, False] * 3)

# One function of a 12-vector per op of batching.OPS, the op applied to (what vmap sees as) a batched tensor.
FUNCS = {
    "masked_fill.Tensor": lambda a: a.masked_fill(a > 0.2, torch.tensor(-2.0, dtype=D)).sin(),
    "masked_fill_.Tensor": lambda a: (a * 1).masked_fill_(MASK, torch.tensor(-2.0, dtype=D)).sin(),
    "affine_grid_generator.default": lambda a: F.affine_grid(a[:6].reshape(1, 2, 3), [1, 1, 3, 4], align_corners=False),
    "_upsample_nearest_exact1d.vec": lambda a: F.interpolate(a.reshape(1, 3, 4), scale_factor=2, mode="nearest-exact"),
    "_upsample_nearest_exact2d.vec": lambda a: F.interpolate(a.reshape(1, 1, 3, 4), scale_factor=2, mode="nearest-exact"),
    "_upsample_nearest_exact3d.vec": lambda a: F.interpolate(a.reshape(1, 1, 1, 3, 4), scale_factor=2, mode="nearest-exact"),
    # Forward mode meets the .default overloads (plain vmap batches them through .vec).
    "_upsample_nearest_exact1d.default": lambda a: F.interpolate(a.reshape(1, 3, 4), scale_factor=2, mode="nearest-exact"),
    "_upsample_nearest_exact2d.default": lambda a: F.interpolate(a.reshape(1, 1, 3, 4), scale_factor=2, mode="nearest-exact"),
    "_upsample_nearest_exact3d.default": lambda a: F.interpolate(a.reshape(1, 1, 1, 3, 4), scale_factor=2, mode="nearest-exact"),
    "max_unpool2d.default": lambda a: F.max_unpool2d(*F.max_pool2d(a.reshape(1, 1, 3, 4), 2, return_indices=True), 2),
    "max_unpool3d.default": lambda a: F.max_unpool3d(
        *F.max_pool3d(a.reshape(1, 1, 1, 3, 4), (1, 2, 2), return_indices=True), (1, 2, 2)
    ),
    "renorm.default": lambda a: torch.renorm(a.reshape(3, 4), 2, 0, 0.5),
}


def _slow_ops(fn) -> tuple[torch.Tensor, set[str]]:
    """fn()'s result and the ops vmap warned it ran on its slow path."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, {
        str(w.message).split("batching rule for ")[1].split(". ")[0] for w in caught if "batching rule for" in str(w.message)
    }


def test_every_op_has_a_test():
    assert set(FUNCS) == set(batching.OPS)


@pytest.mark.parametrize("name", list(FUNCS))
def test_a_rule_takes_its_op_off_the_slow_path_with_the_same_numbers_and_goes_after(name):
    op = torch._ops.ops.aten
    packet, overload = name.split(".")
    if getattr(getattr(op, packet), overload) not in batching.missing():
        pytest.skip(f"this torch batches {name} itself")
    f, x = FUNCS[name], torch.randn(3, 12, dtype=D)
    if overload == "default" and packet.startswith("_upsample"):  # under forward mode, as `fwd` runs it
        f = torch.func.jacfwd(f)
    loop = torch.stack([f(x[i]) for i in range(3)])
    _, before = _slow_ops(lambda: torch.vmap(f)(x))
    with batching_rules():
        got, during = _slow_ops(lambda: torch.vmap(f)(x))
    _, after = _slow_ops(lambda: torch.vmap(f)(x))
    assert f"aten::{name.removesuffix('.default')}" in before, before
    assert during == set(), during
    assert after == before  # the caller's process is left as it was
    torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-12)


def test_nested_and_repeated_uses_share_one_registration():
    f, x = FUNCS["masked_fill.Tensor"], torch.randn(3, 12, dtype=D)
    with batching_rules():
        with batching_rules():
            assert _slow_ops(lambda: torch.vmap(f)(x))[1] == set()
        assert _slow_ops(lambda: torch.vmap(f)(x))[1] == set()  # the inner exit keeps the outer's rules
    assert _slow_ops(lambda: torch.vmap(f)(x))[1] == {"aten::masked_fill.Tensor"}
    with batching_rules():  # registered again after being removed
        assert _slow_ops(lambda: torch.vmap(f)(x))[1] == set()
