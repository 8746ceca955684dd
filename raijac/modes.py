"""modes: the one registry of differentiation modes (read by kernels, probe, api, sparsity, cli and the docs).

Each mode is one frozen `ModeSpec`: which axis of J its seeds run along, what the function
must offer for it to apply, whether it has a compressed (sparse) form, and its place in
`auto`'s fallback order. Adding a mode is one record here plus one kernel method named by
`ModeSpec.kernel` in `raijac.kernels.Kernel`. No torch, Ray or Zarr here.

    auto's order along an axis: the registry order of the modes with `fallback` set, the
    chain mode of that axis first when f is a chain; column modes fall back to row modes
    (a row mode works for any M, N), never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raijac.errors import ModeError

Axis = Literal["rows", "cols"]


@dataclass(frozen=True)
class ModeSpec:
    """What one mode is: how its seeds run and what it needs."""

    name: str
    seeds: str  # the seeds, as the docs table says them: rows (VJPs) or columns (JVPs)
    kernel: str  # the Kernel method that computes one block
    block: str  # what one block is, for the docs table
    needs: str  # what f must offer, for the docs table
    stacks: bool = False  # needs a batch-aware f (a stack of K copies of the samples)
    chain: bool = False  # walks f's stages (Problem.chain, nn.Sequential, a peeled function)
    sparse: bool = True  # has a compressed form over colour seeds
    fallback: bool = True  # auto may fall back to it (registry order along its axis)
    replays: bool = False  # runs f once per forward pass outside vmap, so a random f replays one draw (NOTE: [replay])
    vmaps: bool = True  # runs under vmap (over seeds, samples or a batched backward): NOTE: [attention] in kernels

    @property
    def axis(self) -> Axis:
        """Which axis of J the seeds run along."""
        return "rows" if self.seeds.startswith("rows") else "cols"


REGISTRY: dict[str, ModeSpec] = {
    spec.name: spec
    for spec in (
        ModeSpec("rev", "rows of I_M", "_rev",
                 "`vmap(vjp_fn)` over identity rows; the forward pass is kept across blocks", "vmap-able backward",
                 replays=True),
        ModeSpec("fwd", "columns of I_N", "_fwd", "`vmap(jvp)` over identity columns", "forward-AD formulas"),
        ModeSpec("rev-batched", "rows", "_rev_batched",
                 "one plain forward, then one `autograd.grad(..., is_grads_batched=True)` over a block of identity rows",
                 "a backward that vmap can batch (old-style `autograd.Function`s work)", replays=True),
        ModeSpec("rev-repeat", "rows", "_rev_repeat", "k stacked copies of x, one `autograd.grad` with an identity block",
                 "batch-aware f", stacks=True),
        ModeSpec("fwd-repeat", "columns", "_fwd_repeat",
                 "stacked copies + the double-backward trick (differentiate the VJP w.r.t. the cotangent)",
                 "batch-aware f", stacks=True),
        ModeSpec("loop", "rows", "_loop", "one `autograd.grad` per row", "backward formulas only", replays=True, vmaps=False),
        ModeSpec("chain", "rows", "_chain_rev",
                 "for a chain of stages: starts from the last Linear's weight rows (no identity GEMM; trailing "
                 "elementwise stages scale those rows), elementwise stages as scalings, Linear stages as one GEMM, "
                 "other stages by VJP",
                 "an `nn.Sequential` or `Problem.chain` w.r.t. its input, batched or not; an unbatched f with a "
                 "constant linear layer followed only by elementwise ops, reshapes and constant biases",
                 chain=True, sparse=False, fallback=False),
        ModeSpec("chain-fwd", "columns", "_chain_fwd", "the same forward: starts from the first Linear's weight columns",
                 "the same", chain=True, sparse=False, fallback=False),
    )
}  # fmt: skip
MODES: tuple[str, ...] = tuple(REGISTRY)
CHOICES: tuple[str, ...] = ("auto", *MODES)
AUTO_ROW = "| `auto` | | `rev` when M <= N, else `fwd`, with fallbacks | |"


def get(name: str) -> ModeSpec:
    """The record of mode `name`; an unknown name lists the valid ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ModeError(f"unknown mode {name!r}; choose one of: {', '.join(MODES)}.") from None


def check_mode(name: str, *, allow_auto: bool = False) -> None:
    """Raise a ModeError naming the choices unless `name` is a mode (or `auto`, if allowed)."""
    if not (allow_auto and name == "auto") and name not in REGISTRY:
        valid = CHOICES if allow_auto else MODES
        raise ModeError(f"unknown mode {name!r}; choose one of: {', '.join(valid)}.")


def seed_axis(name: str) -> Axis:
    """Which axis of J a mode's seeds run along."""
    return get(name).axis


def along(axis: Axis, *, stackable: bool) -> list[str]:
    """auto's fallback modes whose seeds run along `axis`, best first."""
    return [m.name for m in REGISTRY.values() if m.axis == axis and m.fallback and (stackable or not m.stacks)]


def auto_order(n_out: int, n_in: int, *, stackable: bool, chain: bool) -> list[str]:
    """auto's candidates for a dense J (M = n_out, N = n_in): seeds along the shorter side first."""
    axis: Axis = "rows" if n_out <= n_in else "cols"
    order = along(axis, stackable=stackable)
    if axis == "cols":
        order += along("rows", stackable=stackable)
    if chain:
        order.insert(0, chain_mode(axis))
    return order


def chain_mode(axis: Axis) -> str:
    """The chain mode whose seeds run along `axis`."""
    return next(m.name for m in REGISTRY.values() if m.chain and m.axis == axis)


def docs_table() -> str:
    """The README's table of modes, made from the registry (a test keeps the README in step)."""
    lines = ["| mode | seeds | a block is | needs |", "| --- | --- | --- | --- |"]
    lines += [f"| `{m.name}` | {m.seeds} | {m.block} | {m.needs} |" for m in REGISTRY.values()]
    return "\n".join([*lines, AUTO_ROW])
