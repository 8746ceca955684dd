"""chain: the stages the chain modes walk, found for a Problem (problem + peel -> kernels).

A `Problem.chain` and a non-empty `nn.Sequential` declare their stages; another unbatched
function differentiated w.r.t. its input may be one too, which `raijac.peel` finds by
tracing it. Tracing is paid once per problem and device: the result is kept here, beside
the problem (weakly), not inside it, so a Problem stays a plain description of what to
differentiate and ships without it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from raijac.peel import peel_chain
from raijac.problem import Chain, Problem

# auto does not try raijac.peel on a function with fewer seeds than this (rows when M <= N,
# else columns): a chain skips one seeds x seeds x H product, too small then to pay for a
# trace (benchmarks/RESULTS.md, "Measurements behind design choices").
PEEL_MIN_SEEDS = 256

Stages = tuple[Callable[[torch.Tensor], torch.Tensor], ...]
_PEELED: weakref.WeakKeyDictionary[Problem, dict[tuple, Stages | None]] = weakref.WeakKeyDictionary()


def chain_stages(problem: Problem, x: torch.Tensor | None = None, *, auto: bool = False, check: bool = True) -> Stages | None:
    """The stages the chain modes walk, for a problem differentiated w.r.t. its input: a
    `Problem.chain`'s, a non-empty `nn.Sequential`'s, or for another unbatched function
    ending in a constant linear layer, its layers (raijac.peel, traced at `x`, by default
    the problem's, once per device; `check=False` skips the peel's check against autograd,
    which a worker's driver made); None for any other problem. For `auto`'s choice a
    function with fewer than PEEL_MIN_SEEDS seeds is not traced."""
    f = problem.f
    if not may_chain(problem, auto=auto):
        return None
    if isinstance(f, Chain):
        return f.stages
    if isinstance(f, torch.nn.Sequential) and len(f):
        return tuple(f)
    x = problem.x if x is None else x
    peeled = _PEELED.setdefault(problem, {})
    key = (str(x.device), check)
    if key not in peeled:
        peeled[key] = peel_chain(f, x, check=check)
    return peeled[key]


def is_traced(problem: Problem) -> bool:
    """Whether `chain_stages` already traced this problem (on any device)."""
    return bool(_PEELED.get(problem))


def may_chain(problem: Problem, *, auto: bool = False) -> bool:
    """Whether `chain_stages` may find stages, known without tracing: a declared chain or
    an nn.Sequential, or a function it would trace (workers start tracing it early)."""
    if problem.wrt != "input":
        return False
    if isinstance(problem.f, Chain) or (isinstance(problem.f, torch.nn.Sequential) and len(problem.f)):
        return True
    return _peelable(problem, auto)


def _peelable(problem: Problem, auto: bool) -> bool:
    if problem.batched or problem.kind not in ("function", "module") or problem.sparsity is not None:
        return False
    seeds = problem.n_out if problem.n_out <= problem.n_in else problem.n_in  # auto's chain (M <= N) or chain-fwd
    return not (auto and seeds < PEEL_MIN_SEEDS)
