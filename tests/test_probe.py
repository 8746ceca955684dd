"""Pre-flight triage (which mode works, and why auto chose it) and memory measurement."""

from __future__ import annotations

import pytest
import torch

import raijac
from raijac.errors import ModeError, ProblemError
from raijac.kernels import Kernel, make_target
from raijac.probe import candidate_modes, measure_cost, resolve_mode, trial_blocks
from tests.problems import BY_NAME, CASES, LyingJvp, NumpyDouble

AUTO = [c for c in CASES if c.auto]


@pytest.mark.parametrize("case", AUTO, ids=[c.name for c in AUTO])
def test_auto_falls_back_and_says_why(case):
    problem = case.build()
    mode, reason, reports = resolve_mode(problem, "auto")
    assert mode == case.auto
    first = candidate_modes(problem, "auto")[0]
    if mode != first:
        assert f"fell back to {mode}" in reason and f"{first} fails" in reason
    assert reports[-1].mode == mode and reports[-1].ok


def test_auto_prefers_rev_for_tall_and_fwd_for_wide():
    tall = raijac.Problem(lambda x: x[:3] * 2, torch.randn(10))
    wide = raijac.Problem(lambda x: torch.cat([x, x]), torch.randn(10))
    assert resolve_mode(tall, "auto")[:2] == ("rev", "auto: M=3 <= N=10, so rev")
    assert resolve_mode(wide, "auto")[:2] == ("fwd", "auto: M=20 > N=10, so fwd")


def test_candidates_skip_repeat_modes_unless_batch_aware():
    plain = BY_NAME["item_call"].build()
    assert candidate_modes(plain, "auto") == ["fwd", "rev", "rev-batched", "loop"]
    aware = BY_NAME["no_forward_rule"].build()
    assert candidate_modes(aware, "auto") == ["fwd", "fwd-repeat", "rev", "rev-batched", "rev-repeat", "loop"]
    assert "rev-repeat" not in candidate_modes(BY_NAME["params"].build(), "auto")


@pytest.mark.parametrize("name,mode", [(c.name, m) for c in CASES for m in c.broken])
def test_explicit_broken_mode_is_refused(name, mode):
    with pytest.raises(ModeError, match=f"mode {mode} cannot differentiate this problem.*--mode auto"):
        resolve_mode(BY_NAME[name].build(), mode)


def test_try_all_reports_every_candidate():
    _, _, reports = resolve_mode(BY_NAME["no_forward_rule"].build(), "auto", try_all=True)
    status = {r.mode: r.status for r in reports}
    assert status == {"fwd": "fails", "fwd-repeat": "ok", "rev": "ok", "rev-batched": "ok", "rev-repeat": "ok", "loop": "ok"}
    fwd = next(r for r in reports if r.mode == "fwd")
    assert "jvp" in fwd.note


def test_no_mode_works():
    class NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("backward of NoBackward is not written yet")

    with pytest.raises(ProblemError, match="no mode can differentiate this problem.*loop: .*not written yet"):
        resolve_mode(raijac.Problem(NoBackward.apply, torch.randn(4)), "auto")


def test_wrong_numbers_are_caught():
    """A mode whose block disagrees with plain autograd is rejected, not used."""

    problem = raijac.Problem(lambda x: torch.cat([LyingJvp.apply(x), x]), torch.randn(4))
    mode, reason, reports = resolve_mode(problem, "auto")
    assert mode == "rev"
    assert "differ from plain autograd" in next(r.note for r in reports if r.mode == "fwd")


@pytest.mark.parametrize("mode", ["rev", "fwd", "loop"])
def test_measured_cost_scales_with_the_output_row(mode):
    """Per-seed memory is at least one output row and grows with the row length."""
    costs = {}
    for n in (500, 4000):
        w = torch.randn(300, n) / n**0.5
        problem = raijac.Problem(lambda x, w=w: torch.tanh(x @ w.T), torch.randn(n))
        costs[n] = measure_cost(Kernel(make_target(problem), mode))
    other = {"rev": lambda n: n, "loop": lambda n: n, "fwd": lambda n: 300}[mode]
    for n, cost in costs.items():
        assert cost.per_seed >= other(n) * 4
        assert cost.per_seed < other(n) * 4 * 40 + 200_000  # activations, not a runaway estimate
    if mode != "fwd":  # 3500 more floats in every output row
        assert costs[4000].per_seed - costs[500].per_seed >= 0.8 * 3500 * 4


# ---------------------------------------------------------------------- a triage that can fail
def test_trial_blocks_spread_over_seeds_and_samples():
    """First seeds of the first two samples, last seeds of the last, and random middle ones."""
    target = make_target(raijac.Problem(torch.tanh, torch.randn(9, 40), batched=True))
    spots = trial_blocks(target, "rev")
    assert spots[0] == (0, 2, 0, 2) and spots[1] == (8, 9, 38, 40)
    b0, b1, s0, s1 = spots[2]
    assert b1 == b0 + 1 and 2 <= s0 and s1 <= 38
    seen = {trial_blocks(target, "rev", seed=s)[2][2] for s in range(20)}
    assert len(seen) > 5  # the middle block moves with the seed
    assert trial_blocks(make_target(raijac.Problem(torch.tanh, torch.randn(1))), "rev") == [(0, 1, 0, 1)]


def _numpy_tail(x: torch.Tensor) -> torch.Tensor:
    """Batch-aware (K, 6) -> (K, 12): inputs 2 and up pass through NumpyDouble."""
    h = torch.cat([torch.tanh(x[:, :2]), NumpyDouble.apply(x[:, 2:])], dim=1)
    return torch.cat([h, h.sin()], dim=1)


def test_auto_refuses_fwd_repeat_that_loses_later_columns():
    """User report: the triage ran the first two columns of sample 0 only, so auto took
    fwd-repeat, and columns 2 and up (through a numpy backward) were stored as zeros."""
    x = torch.randn(3, 6, dtype=torch.float64)
    problem = raijac.Problem(_numpy_tail, x, batched=True, batch_aware=True)
    mode, reason, reports = resolve_mode(problem, "auto")
    assert mode != "fwd-repeat" and "fwd-repeat fails" in reason and "relative error of 1" in reason
    got = Kernel(make_target(problem), mode)(0, 3, 0, 12 if mode in ("rev", "rev-repeat", "loop") else 6).detach()
    ref = torch.stack([torch.autograd.functional.jacobian(lambda v: _numpy_tail(v[None])[0], xi) for xi in x])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ModeError, match="mode fwd-repeat cannot differentiate this problem.*relative error"):
        resolve_mode(problem, "fwd-repeat")


_POINTS = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.0), (torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_a_wrong_mode_is_refused_at_any_scale(dtype, scale):
    """User report: torch.cdist's backward under vmap is wrong; at scale 1 auto refused rev,
    but scaled by 1e-4 (float32) or 1e-9 (float64) the absolute tolerance let it through."""
    pts = _POINTS.to(dtype)

    def f(x):
        return torch.cdist(x.reshape(5, 3), pts).reshape(-1) * scale

    problem = raijac.Problem(f, torch.randn(15, dtype=dtype, generator=torch.Generator().manual_seed(6)))
    mode, reason, _ = resolve_mode(problem, "auto")
    # rev-batched batches only the backward, where cdist's rule is right; loop needs no batching at all
    assert (
        mode in ("rev-batched", "loop")
        and "rev fails (gives numbers that differ from plain autograd by a relative error" in reason
    )
    got = Kernel(make_target(problem), mode)(0, 1, 0, 35)[0].detach()
    ref = torch.autograd.functional.jacobian(f, problem.x)
    torch.testing.assert_close(got, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
