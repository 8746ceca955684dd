"""kernels: a Problem's seed range -> one dense Jacobian block (torch only; after problem, before store).

Every mode computes the block `J[b0:b1, s0:s1, :]` (row modes) or `J[b0:b1, :, s0:s1]`
(column modes) of the per-sample Jacobians, always with a leading sample axis (plain
problems have one "sample"). One method of `Kernel` per mode; what each mode is and when
it applies is its record in `raijac.modes`.

NOTE: [Stacked form] Kernels see every problem as a stack `z` of shape `(B, *in)` with an
optional per-sample context `ctx` (the module input for parameter problems, where `z` is
the parameter vector expanded to one copy per sample). Because samples are independent,
one cotangent row `e_r` broadcast over the stack yields row `r` of every sample's Jacobian.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from raijac import blas, modes
from raijac.batching import batching_rules
from raijac.chain import chain_stages
from raijac.errors import ModeError, ProblemError, first_line
from raijac.guard import check_rtol, outputs_agree, plain_attention  # noqa: F401  (re-exported)
from raijac.modes import check_mode, seed_axis  # noqa: F401  (re-exported: kernels is where callers look)
from raijac.peel import Peeled, Pointwise, forward_agrees
from raijac.problem import Chain, Problem

# Stages whose Jacobian is diagonal: the chain modes apply them as row/column scalings.
ELEMENTWISE = (
    torch.nn.Tanh, torch.nn.ReLU, torch.nn.GELU, torch.nn.Sigmoid, torch.nn.SiLU, torch.nn.Softplus, torch.nn.ELU,
    torch.nn.LeakyReLU, torch.nn.Hardtanh, torch.nn.Mish, torch.nn.Identity, Pointwise,
)  # fmt: skip

Context = tuple[torch.Tensor, ...] | None
StackFn = Callable[[torch.Tensor, Context], torch.Tensor]


@dataclass
class Target:
    """A problem in stacked form on one device (see NOTE: [Stacked form])."""

    z: torch.Tensor
    ctx: Context  # per-sample inputs not differentiated (a module's inputs, labels, masks), sliced with z
    block_fn: StackFn
    stacked_fn: StackFn | None
    loop_fn: StackFn
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    why_not_stacked: str = ""
    find_stages: Callable[[], tuple | None] | None = None  # the chain modes' stages (chain_stages), found on first use
    stages_batched: bool = False  # the stages map a stack of samples (z[b0:b1]), not one sample (z[0])
    trusted: bool = False  # a traced chain was checked by the driver (make_target)
    random: bool = False  # f draws random numbers, replayed from one state (NOTE: [replay] in raijac.problem)
    # A batched parameter problem's f on a block of samples at one shared parameter vector
    # (P,) -> (nb, *out), run plainly (no vmap): the block check's reference (NOTE: [shared reference]).
    shared_fn: Callable[[torch.Tensor, Context], torch.Tensor] | None = None
    out_dtype: torch.dtype | None = None  # f's output dtype: the block check's projection is in it

    @cached_property
    def stages(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...] | None:
        """Found on first use: tracing a plain function (raijac.peel) is paid by the chain modes only."""
        return self.find_stages() if self.find_stages else None

    @cached_property
    def chain_fwd_ok(self) -> bool:
        """Whether forward mode through the stages gives f's own J t: checked for a traced
        chain only (NOTE: [peel check] in raijac.peel)."""
        if not isinstance(self.stages, Peeled) or self.trusted:
            return True
        return forward_agrees(lambda z: self.block_fn(z[None], None)[0], self.stages, self.z[0])

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.out_shape)

    @property
    def n_samples(self) -> int:
        return int(self.z.shape[0])

    def block(self, b0: int, b1: int) -> tuple[torch.Tensor, Context]:
        return self.z[b0:b1], None if self.ctx is None else tuple(c[b0:b1] for c in self.ctx)


# vmap's words for a value it cannot batch (a branch on a tensor's value, `.item()`): a loop
# over samples runs such an f (NOTE: [per-sample loop]).
VALUE_DEPENDENT = ("data-dependent", ".item()")


def make_target(problem: Problem, device: torch.device | str = "cpu", *, trusted: bool = False) -> Target:
    """Put `problem` in stacked form on `device` (modules and tensors are moved there).

    `trusted`: a worker's target, whose driver already checked a traced chain against
    autograd before choosing a chain mode (NOTE: [peel check]): the worker does not again."""
    target = _make_target(problem, device, trusted=trusted)
    target.out_dtype = problem.dtype
    return target


def _make_target(problem: Problem, device: torch.device | str, *, trusted: bool) -> Target:
    device = torch.device(device)
    in_shape, out_shape = problem.input_shape, problem.output_shape  # evaluates f once: fixes how f returns
    random = problem.random  # f(x) was evaluated on the caller's device
    if problem.module is not None:
        problem.module.to(device)
    if isinstance(problem.f, torch.nn.Module):
        problem.f.to(device)
    x = problem.x.to(device)
    ctx = None if problem.ctx is None else tuple(c.to(device) for c in problem.ctx)
    for stage in problem.f.stages if isinstance(problem.f, Chain) else ():
        if isinstance(stage, torch.nn.Module):
            stage.to(device)

    if random and x.device != problem.x.device:
        _check_replay_on(problem, x, device)

    def stages() -> tuple | None:
        return chain_stages(problem, x, check=not trusted)

    no_stack = "f is not batch-aware: pass batch_aware=True if f maps a stack (K, *in) to (K, *out) sample by sample"

    if problem.wrt == "params":
        p = problem.params.to(device)
        if not problem.batched:

            def one(z: torch.Tensor, c: Context) -> torch.Tensor:
                return problem.call(None, z[0], ctx)[None]

            why = "an unbatched parameter Jacobian has no samples to stack; use rev, fwd or loop"
            return Target(p[None], None, one, None, one, in_shape, out_shape, why, random=random)

        def per_sample(pz: torch.Tensor, cb: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return problem.call(None, pz, tuple(t[None] for t in cb))[0]

        def vmapped(z: torch.Tensor, c: Context) -> torch.Tensor:
            return torch.func.vmap(per_sample)(z, c)

        def looped(z: torch.Tensor, c: Context) -> torch.Tensor:
            # unbind, not z[i]: each z[i]'s backward would fill a zero gradient the size of all of z
            return torch.stack([per_sample(zi, tuple(t[i] for t in c)) for i, zi in enumerate(z.unbind(0))])

        can_vmap = [True]

        def samples(z: torch.Tensor, c: Context) -> torch.Tensor:
            """vmap over the samples, but not over one sample, and a loop where f cannot be
            vmapped over its per-sample inputs.

            NOTE: [per-sample loop] A Hugging Face model given an attention mask branches on
            the mask's values (masking_utils), and a BERT given none calls `.item()` on the
            mask it makes; vmap can batch neither: `vmap(jacrev(...))` fails there too, and
            users loop `jacrev` over samples. The modes' own vmap over seeds (rows,
            columns) still batches everything else.
            """
            if z.shape[0] == 1:  # a view (z[0]'s backward would fill a zero (1, P) per row)
                return per_sample(z.reshape(z.shape[1:]), tuple(t[0] for t in c))[None]
            if can_vmap[0]:
                try:
                    return vmapped(z, c)
                except RuntimeError as exc:
                    if "vmap" not in str(exc) or not any(why in str(exc) for why in VALUE_DEPENDENT):
                        raise
                    can_vmap[0] = False
            return looped(z, c)

        def shared(p1: torch.Tensor, c: Context) -> torch.Tensor:
            return problem.call(None, p1, c)

        z = p.expand(x.shape[0], p.numel())
        return Target(z, ctx, samples, samples, looped, in_shape, out_shape, shared_fn=shared)

    f = problem.call  # f itself, or f replaying its one generator state (NOTE: [replay])
    if problem.batched:

        def stacked(z: torch.Tensor, c: Context) -> torch.Tensor:
            return f(z, None, c)

        return Target(
            x,
            ctx,
            stacked,
            stacked,
            stacked,
            in_shape,
            out_shape,
            find_stages=stages if ctx is None else None,
            stages_batched=True,
            trusted=trusted,
        )

    def single(z: torch.Tensor, c: Context) -> torch.Tensor:
        return f(z[0])[None]

    def stacked_plain(z: torch.Tensor, c: Context) -> torch.Tensor:
        return f(z)

    stack_fn = stacked_plain if problem.batch_aware else None
    why = "" if stack_fn else no_stack
    return Target(x[None], None, single, stack_fn, single, in_shape, out_shape, why, stages, trusted=trusted, random=random)


def _check_replay_on(problem: Problem, x: torch.Tensor, device: torch.device) -> None:
    """A random f replayed on another device draws from that device's generator: refuse
    unless it still gives the stored y (its random numbers come from the CPU, say)."""
    with torch.no_grad(), plain_attention():  # as y was (NOTE: [y on the path differentiated] in problem)
        y = problem.call(x, None if problem.params is None else problem.params.to(device))
    if not outputs_agree(y.cpu(), problem.y.cpu()):
        raise ProblemError(
            f"f draws random numbers, and replayed on {device} it draws other ones than on {problem.x.device}, where y was "
            f"computed, so J would belong to another function than y; run on {problem.x.device} workers, or make f "
            "deterministic (module.eval())."
        )


# ---------------------------------------------------------------------- seeds
def _seeds(
    k: int, nb: int, s0: int, n: int, shape: tuple[int, ...], like: torch.Tensor, colours: torch.Tensor | None = None
) -> torch.Tensor:
    """Identity rows s0..s0+k of size n, broadcast over nb samples: shape (k, nb, *shape).

    With `colours` (one per seed-axis entry), seed c is instead the sum of the unit vectors
    of colour c: the compressed seed matrix of a sparse problem (see raijac.sparsity).
    """
    if colours is not None:
        wanted = torch.arange(s0, s0 + k, device=like.device)
        e = (colours.to(like.device)[None, :] == wanted[:, None]).to(like.dtype)
    else:
        e = torch.zeros(k, n, dtype=like.dtype, device=like.device)
        idx = torch.arange(k, device=like.device)
        e[idx, s0 + idx] = 1
    return e[:, None, :].expand(k, nb, n).reshape(k, nb, *shape)


def _scaled(g: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Seeds g (k, ...) times a per-seed factor (k,) where there is one (the chain modes)."""
    return g if scale is None else g * scale.reshape(-1, *[1] * (g.ndim - 1))


def _repeat(t: torch.Tensor | Context, k: int) -> torch.Tensor | Context:
    """k stacked copies, copy-major: (k * n, ...) (of each tensor of a context)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_repeat(c, k) for c in t)
    return t.detach().repeat(k, *([1] * (t.ndim - 1)))


def _zeros_or(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def _out_of_place(stage: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stage that leaves its input alone.

    NOTE: [in-place stages] The chain modes keep every stage's input (and an elementwise
    stage's derivative there) for the sweeps; `nn.SiLU(inplace=True)` and friends, or a
    user stage ending in `relu_()`, would overwrite that saved input when applied, and the
    derivative would be taken at the stage's output instead (6% off for SiLU). A copy of
    one activation per stage and sample block is cheap next to the sweeps' GEMMs.
    """
    return lambda h: stage(h.clone())


# ---------------------------------------------------------------------- kernels
class Kernel:
    """One mode's block function over a Target, keeping the forward pass of the last sample block.

    `kernel(b0, b1, s0, s1)` returns the dense block as `(b1-b0, rows, cols)`. With
    `colours` set, seeds s0:s1 are colours and the block is the compressed product
    `J S` (column modes) or `S^T J` (row modes) of a sparse problem.
    """

    def __init__(self, target: Target, mode: str, colours: torch.Tensor | None = None) -> None:
        spec = modes.get(mode)
        if target.random and not spec.replays:
            raise ModeError(
                f"mode {mode} runs f's forward pass {'under vmap' if mode == 'fwd' else 'more than once'}, but f draws "
                "random numbers (dropout in training mode?), so J would mix several draws; use rev or loop, which replay "
                "one generator state (auto picks them)"
            )
        if spec.stacks and target.stacked_fn is None:
            raise ModeError(f"mode {mode} needs a stackable (batch-aware) function, but {target.why_not_stacked}.")
        if spec.chain and target.stages is None:
            raise ModeError(
                f"mode {mode} needs f to be a torch.nn.Sequential, a Problem.chain of stages, or an unbatched function "
                "with a constant linear layer followed only by elementwise ops, differentiated w.r.t. its input; "
                "use rev or fwd for other functions."
            )
        if spec.chain and spec.axis == "cols" and not target.chain_fwd_ok:
            raise ModeError(
                "mode chain-fwd cannot differentiate this problem: forward mode through its traced layers disagrees with "
                "f's own (a custom autograd.Function's jvp?); use chain, rev or fwd."
            )
        if colours is not None and not spec.sparse:
            raise ModeError(f"mode {mode} has no compressed (sparse) form; use rev or fwd for sparse problems.")
        self.target = target
        self.mode = mode
        self.colours = colours
        self._key: tuple | None = None
        self._saved: tuple = ()
        self._forward: tuple[tuple, Forward] | None = None  # the kept pass as the check takes it
        self._per_sample_vjp = True  # NOTE: [shared parameters]
        # A method name, not a bound method: a bound method stored on self is a reference cycle,
        # which would keep a finished run's problem (its weights) alive until the next gc pass.
        self._run = spec.kernel

    def clear(self) -> None:
        """Drop the kept forward pass (frees its activations)."""
        self._key, self._saved, self._forward = None, (), None

    def __call__(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        if not modes.get(self.mode).vmaps:
            return getattr(self, self._run)(b0, b1, s0, s1)
        # NOTE: [attention] in raijac.guard, [batching rules] in raijac.batching
        with plain_attention(), batching_rules():
            return getattr(self, self._run)(b0, b1, s0, s1)

    def _kept(self, key: tuple, build: Callable[[], tuple]) -> tuple:
        if self._key != key:
            self.clear()
            self._saved = build()
            self._key = key
        return self._saved

    # NOTE: [rev] vjp once per sample block; each block of rows is one vmapped vjp_fn call
    # over identity rows broadcast across the samples.
    def _rev(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        t = self.target
        nb, k = b1 - b0, s1 - s0
        if t.shared_fn is not None and nb > 1 and k == t.n_out and self.colours is None and self._per_sample_vjp:
            try:
                return self._rev_per_sample(b0, b1)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # vmap cannot trace f this way (a per-sample loop): the general path
                self._per_sample_vjp = False
                self.clear()
        zb, cb = t.block(b0, b1)
        _, vjp_fn = self._kept(("rev", b0, b1), lambda: torch.func.vjp(lambda z: t.block_fn(z, cb), zb))
        (g,) = torch.func.vmap(vjp_fn)(_seeds(k, nb, s0, t.n_out, t.out_shape, zb, self.colours))
        return g.reshape(k, nb, t.n_in).transpose(0, 1)

    def _rev_per_sample(self, b0: int, b1: int) -> torch.Tensor:
        """All rows of samples b0:b1 of a batched parameter problem, as `vmap(jacrev)` over
        samples at shared parameters.

        NOTE: [shared parameters] `_rev` differentiates each sample's own (expanded) copy of
        the parameters, so the forward pass runs with per-sample weights: a grouped
        convolution, a batched matmul. Here the parameters stay shared in the forward pass
        and only the backward gives per-sample gradients, as `vmap(grad)` does: a CNN's
        per-sample gradients took 0.0195 s a block of 32 that way, 0.0153 s this way, and
        `vmap(grad)` 0.0155 s. Taken where a call covers all rows (no forward to keep for
        other rows of the same samples); where vmap cannot trace f so, `_rev` goes on as before.
        """
        t = self.target
        zb, cb = t.block(b0, b1)
        p, rows = zb[0], torch.eye(t.n_out, dtype=zb.dtype, device=zb.device).reshape(t.n_out, *t.out_shape)

        def one(c: tuple[torch.Tensor, ...]) -> torch.Tensor:
            _, vjp_fn = torch.func.vjp(lambda q: t.shared_fn(q, tuple(v[None] for v in c))[0], p)
            return torch.func.vmap(vjp_fn)(rows)[0]

        return torch.func.vmap(one)(cb)

    def _fwd(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        t = self.target
        zb, cb = t.block(b0, b1)
        nb, k = b1 - b0, s1 - s0

        def column(tangent: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda z: t.block_fn(z, cb), (zb,), (tangent,))[1]

        out = torch.func.vmap(column)(_seeds(k, nb, s0, t.n_in, t.in_shape, zb, self.colours))
        return out.reshape(k, nb, t.n_out).permute(1, 2, 0)

    def _stacked_forward(self, b0: int, b1: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.target
        zb, cb = t.block(b0, b1)
        z = _repeat(zb, k).requires_grad_(True)
        with torch.enable_grad():
            y = t.stacked_fn(z, _repeat(cb, k))
        return z, y

    def _rev_repeat(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        t = self.target
        nb, k = b1 - b0, s1 - s0
        z, y = self._stacked_forward(b0, b1, k)
        if not y.requires_grad:
            return torch.zeros(nb, k, t.n_in, dtype=z.dtype, device=z.device)
        seeds = _seeds(k, nb, s0, t.n_out, t.out_shape, y, self.colours).reshape(y.shape)
        (g,) = torch.autograd.grad(y, z, seeds, allow_unused=True)
        return _zeros_or(g, z).reshape(k, nb, t.n_in).transpose(0, 1)

    # NOTE: [fwd-repeat] Townsend's trick: g(v) = J^T v is linear in v, so differentiating
    # g w.r.t. v against a tangent u gives J u, using only backward formulas.
    def _fwd_repeat(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        t = self.target
        nb, k = b1 - b0, s1 - s0
        z, y = self._stacked_forward(b0, b1, k)
        if not y.requires_grad:
            return torch.zeros(nb, t.n_out, k, dtype=y.dtype, device=y.device)
        with torch.enable_grad():
            v = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, z, v, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:
            return torch.zeros(nb, t.n_out, k, dtype=y.dtype, device=y.device)
        tangents = _seeds(k, nb, s0, t.n_in, t.in_shape, z, self.colours).reshape(z.shape)
        (u,) = torch.autograd.grad(g, v, tangents, allow_unused=True)
        return _zeros_or(u, y).reshape(k, nb, t.n_out).permute(1, 2, 0)

    def _autograd_forward(self, b0: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain autograd forward of the sample block (no vmap): leaf z and y (nb, n_out)."""
        t = self.target
        zb, cb = t.block(b0, b1)
        z = zb.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = t.loop_fn(z, cb).reshape(b1 - b0, t.n_out)
        return z, y

    # NOTE: [rev-batched] autograd.grad with is_grads_batched=True vmaps the backward pass
    # only: the forward is plain autograd, so functions that torch.func cannot transform
    # (an autograd.Function without setup_context, torchdiffeq's odeint) still get a block
    # of rows per backward instead of one row per backward (loop).
    def _rev_batched(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        t = self.target
        nb, k = b1 - b0, s1 - s0
        z, y = self._kept(("loop", b0, b1), lambda: self._autograd_forward(b0, b1))
        if not y.requires_grad:
            return torch.zeros(nb, k, t.n_in, dtype=z.dtype, device=z.device)
        seeds = _seeds(k, nb, s0, t.n_out, (t.n_out,), y, self.colours)
        (g,) = torch.autograd.grad(y, z, seeds, retain_graph=True, is_grads_batched=True, allow_unused=True)
        if g is None:  # y does not depend on z
            g = z.new_zeros(k, *z.shape)
        return g.reshape(k, nb, t.n_in).transpose(0, 1)

    def plain_forward(self, b0: int, b1: int) -> Forward | None:
        """The forward pass of samples b0:b1 this mode made, where it is the one the block
        check would make (NOTE: [shared forward]): the plain autograd graph of rev-batched and
        loop, and rev's `torch.func.vjp` of f where f is the check's own (loop_fn)."""
        t, key = self.target, self._key
        if self._forward is not None and self._forward[0] == key:
            return self._forward[1]
        nb = b1 - b0
        if key == ("loop", b0, b1):
            z, y = self._saved
            forward = Forward(y, lambda c: _grad(y, z, c, (nb, t.n_in)))
        elif key == ("rev", b0, b1) and t.block_fn is t.loop_fn:
            out, vjp_fn = self._saved
            forward = Forward(out.reshape(nb, t.n_out), lambda c: _func_grad(vjp_fn, out, c, (nb, t.n_in)))
        else:
            return None
        self._forward = (key, forward)
        return forward

    def _loop(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        t = self.target
        nb = b1 - b0
        z, y = self._kept(("loop", b0, b1), lambda: self._autograd_forward(b0, b1))
        rows = []
        for r in range(s0, s1):
            g = None
            if y.requires_grad:
                if self.colours is None:
                    picked = y[:, r].sum()
                else:  # colour r: the sum of its rows
                    picked = (y * (self.colours.to(y.device) == r).to(y.dtype)).sum()
                (g,) = torch.autograd.grad(picked, z, retain_graph=True, allow_unused=True)
            rows.append(_zeros_or(g, z).reshape(nb, t.n_in))
        return torch.stack(rows, dim=1)

    # NOTE: [chain] J = W_L D_{L-1} W_{L-1} ... D_1 W_1 for an MLP. Reverse mode multiplies
    # identity rows by W_L first, a full GEMM that only yields W_L's rows: the chain modes
    # start from those rows (or W_1's columns) instead, apply elementwise stages as scalings
    # by their derivative, Linear stages as one GEMM, and any other stage by its VJP/JVP.
    # Batched stages map a stack of samples: seeds stay shared (k, ...) until the first
    # per-sample factor, then carry the samples in front (nb, k, ...).
    def _chain_forward(self, b0: int, b1: int) -> tuple:
        """Each stage's input and, for elementwise stages, the derivative there."""
        t = self.target
        h = (t.z[b0:b1] if t.stages_batched else t.z[0]).detach()
        inputs, derivs = [], []
        with torch.no_grad():
            for stage in t.stages:
                inputs.append(h)
                pure = _out_of_place(stage)
                if isinstance(stage, ELEMENTWISE):
                    derivs.append(torch.func.jvp(pure, (h,), (torch.ones_like(h),))[1])
                else:
                    derivs.append(None)
                h = pure(h)
        return inputs, derivs, {}  # {}: each generic stage's vjp_fn, made once per sample block

    def _chain_saved(self, b0: int, b1: int) -> tuple:
        key = ("chain", b0, b1) if self.target.stages_batched else ("chain",)
        return self._kept(key, lambda: self._chain_forward(b0, b1))

    def _chain_step(self, i: int, h: torch.Tensor, d: torch.Tensor | None, g: torch.Tensor, shared: bool, rev: bool):
        """Stage i applied to the seeds g (k, ...) or (nb, k, ...): (new g, still shared)."""
        stage, batched = _out_of_place(self.target.stages[i]), self.target.stages_batched
        if d is not None:  # elementwise: a scaling by the derivative, per sample when batched
            if not batched:
                return g * d, shared
            return (g[None] if shared else g) * d[:, None], False
        if isinstance(self.target.stages[i], torch.nn.Linear) and h.ndim == 1 + batched:
            w = self.target.stages[i].weight
            return blas.matmul(g, w if rev else w.T), shared  # NOTE: [BLAS] in raijac.blas
        if batched and shared:
            g = g[None].expand(h.shape[0], *g.shape)
        dims = dict(in_dims=1, out_dims=1) if batched else {}
        with torch.enable_grad():
            if rev:
                vjps = self._saved[2]
                if i not in vjps:  # kept across the blocks of this sample block, as rev keeps its vjp_fn
                    vjps[i] = torch.func.vjp(stage, h)[1]
                vjp_fn = vjps[i]
                return torch.func.vmap(lambda c: vjp_fn(c)[0], **dims)(g), shared and not batched
            return torch.func.vmap(lambda tan: torch.func.jvp(stage, (h,), (tan,))[1], **dims)(g), shared and not batched

    def _chain_end(self, g: torch.Tensor, shared: bool, nb: int, k: int, n: int) -> torch.Tensor:
        """The seeds' final values as (nb, k, n)."""
        if not self.target.stages_batched:
            return g.reshape(1, k, n)
        return (g.reshape(k, n)[None].expand(nb, k, n) if shared else g.reshape(nb, k, n)).contiguous()

    def _chain_rev(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        return self._chain(b0, b1, s0, s1, rev=True)

    def _chain_fwd(self, b0: int, b1: int, s0: int, s1: int) -> torch.Tensor:
        return self._chain(b0, b1, s0, s1, rev=False)

    def _chain(self, b0: int, b1: int, s0: int, s1: int, rev: bool) -> torch.Tensor:
        """Rows s0:s1 (rev: the stages last to first) or columns s0:s1 (first to last)."""
        t = self.target
        inputs, derivs, _ = self._chain_saved(b0, b1)
        k, g, shared = s1 - s0, None, True  # g: (k, *stage shape), one seed per row (column)
        scale = None  # elementwise stages at the seed end: a scaling of the identity seeds, kept lazy
        n_seed, seed_shape, n_end = (t.n_out, t.out_shape, t.n_in) if rev else (t.n_in, t.in_shape, t.n_out)
        with torch.no_grad():
            for i in reversed(range(len(t.stages))) if rev else range(len(t.stages)):
                stage, h, d = t.stages[i], inputs[i], derivs[i]
                if g is None and d is not None and self.colours is None and not t.stages_batched:
                    scale = _scaled(d.reshape(-1)[s0:s1], scale)
                    continue
                if g is None and isinstance(stage, torch.nn.Linear) and h.ndim == 1 + t.stages_batched:
                    # The last Linear's rows (the first one's columns): no identity GEMM.
                    g = _scaled(stage.weight[s0:s1] if rev else stage.weight[:, s0:s1].T, scale)
                    continue
                if g is None:
                    g = _scaled(_seeds(k, 1, s0, n_seed, seed_shape, h, self.colours)[:, 0], scale)
                g, shared = self._chain_step(i, h, d, g, shared, rev=rev)
        if g is None:  # an empty chain of stages, or only elementwise ones
            g = _scaled(_seeds(k, 1, s0, n_seed, seed_shape, t.z, self.colours)[:, 0], scale)
        block = self._chain_end(g, shared, b1 - b0, k, n_end)
        return block if rev else block.transpose(1, 2)


# ---------------------------------------------------------------------- reference check
def block_rtol(target: Target, block: torch.Tensor) -> float:
    """The block check's tolerance: that of the narrower of the block's dtype and f's output
    dtype (a float32 block of an f returning float16 is compared in float16)."""
    return max(check_rtol(block.dtype), check_rtol(target.out_dtype or block.dtype))


class NoReference(Exception):
    """Plain autograd cannot differentiate f (a custom Function without a backward, an op
    with no derivative formula): a block then cannot be checked, which is not an error of
    the block. Anything else raised while checking is raijac's or f's own error and surfaces."""


@dataclass(frozen=True)
class Forward:
    """One forward pass of f at a sample block, as the block check uses it: the output `y`
    (nb, n_out) and its plain VJP, cotangent (nb, n_out) -> the gradient w.r.t. the leaf."""

    y: torch.Tensor
    vjp: Callable[[torch.Tensor], torch.Tensor]


class Reference:
    """Plain autograd VJPs of f (no vmap, no stacking), keeping the forward graphs of the
    last `keep` sample blocks for their next checks, as `rev` keeps its forward pass."""

    def __init__(self, target: Target, keep: int = 1) -> None:
        self.target = target
        self.keep = keep
        self._graphs: dict[tuple, Forward] = {}
        self._projections: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def clear(self) -> None:
        self._graphs, self._projections = {}, {}

    def projection(self, b0: int, b1: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, u^T J) for a random u (nb, n_out), made once per sample block: every block of
        columns of these samples is checked against the same VJP (its columns of u^T J)."""
        if (b0, b1) not in self._projections:
            y = self.output(b0, b1)
            gen = torch.Generator().manual_seed(seed)
            u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
            while len(self._projections) >= self.keep:
                self._projections.pop(next(iter(self._projections)))
            self._projections[(b0, b1)] = (u, self.vjp(b0, b1, u))
        return self._projections[(b0, b1)]

    def adopt(self, b0: int, b1: int, forward: Forward) -> None:
        """Use a kernel's forward pass of samples b0:b1 as this reference's for them.

        NOTE: [shared forward] rev-batched and loop run f's forward as plain autograd, the
        very graph `_graph` builds (same loop_fn, same replayed draws; attention on its math
        backend, the same function): building it again cost 10% of an odeint block. `rev`
        runs that same function under `torch.func.vjp`, whose VJP called once, outside
        vmap, is plain autograd through the same graph: building it again cost 19% of a
        ResNet-18 input block (a forward with its graph, 4 samples). What the check
        compares, the mode's backward against one plain backward, is unchanged; and since
        the kernel's backward runs first, one that changes what the graph saved makes the
        reference's differ from the block (a refusal), not agree with it.
        """
        if (b0, b1) not in self._graphs:
            self._evict()
            self._graphs[(b0, b1)] = forward

    def _evict(self) -> None:
        while len(self._graphs) >= self.keep:
            self._graphs.pop(next(iter(self._graphs)))

    def _kept(self, key: tuple, build: Callable[[], Forward]) -> Forward:
        """`build()`'s forward pass, kept for the last `keep` keys (the oldest dropped
        first); NoReference where plain autograd cannot run f."""
        if key not in self._graphs:
            self._evict()
            try:
                with torch.enable_grad():
                    self._graphs[key] = build()
            except (RuntimeError, NotImplementedError) as exc:
                raise NoReference(first_line(exc)) from exc
        return self._graphs[key]

    def _graph(self, b0: int, b1: int) -> Forward:
        """f at samples b0:b1, its output as (nb, n_out), with its autograd graph."""
        t = self.target

        def build() -> Forward:
            zb, cb = t.block(b0, b1)
            z = zb.detach().clone().requires_grad_(True)
            y = t.loop_fn(z.clone(), cb).reshape(b1 - b0, t.n_out)  # clone: f may work in place
            return Forward(y, lambda c: _grad(y, z, c, (b1 - b0, t.n_in)))

        return self._kept((b0, b1), build)

    def output(self, b0: int, b1: int) -> torch.Tensor:
        return self._graph(b0, b1).y

    def vjp(self, b0: int, b1: int, cotangent: torch.Tensor) -> torch.Tensor:
        """cotangent (nb, n_out) -> per-sample u^T J as (nb, n_in)."""
        return self._graph(b0, b1).vjp(cotangent)

    def _shared_graph(self, b0: int, b1: int) -> Forward:
        """f on samples b0:b1 as (nb, n_out) at one shared parameter vector p, with its
        autograd graph; its VJP sums over the samples (NOTE: [shared reference])."""
        t = self.target

        def build() -> Forward:
            _, cb = t.block(b0, b1)
            p = t.z[b0].detach().requires_grad_(True)  # a leaf on the parameters, no copy
            y = t.shared_fn(p, cb).reshape(b1 - b0, t.n_out)  # (read, not written: no clone)
            return Forward(y, lambda c: _grad(y, p, c, (t.n_in,)))

        return self._kept(("shared", b0, b1), build)

    def shared_output(self, b0: int, b1: int) -> torch.Tensor:
        return self._shared_graph(b0, b1).y

    def shared_vjp(self, b0: int, b1: int, cotangent: torch.Tensor) -> torch.Tensor:
        """cotangent (nb, n_out) -> the sum over samples b0:b1 of their u_b^T J_b, as (n_in,)."""
        return self._shared_graph(b0, b1).vjp(cotangent)


def _grad(y: torch.Tensor, leaf: torch.Tensor, cotangent: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The plain autograd VJP of y w.r.t. leaf, reshaped (zeros where y does not reach leaf);
    raises NoReference where autograd cannot differentiate f."""
    g = None
    if y.requires_grad:
        try:
            (g,) = torch.autograd.grad(y, leaf, cotangent, retain_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError) as exc:
            raise NoReference(first_line(exc)) from exc
    return torch.zeros(shape, dtype=y.dtype, device=y.device) if g is None else g.reshape(shape)


def _func_grad(vjp_fn: Callable, out: torch.Tensor, cotangent: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`torch.func.vjp`'s VJP called once outside vmap (plain autograd through its graph),
    reshaped; raises NoReference where autograd cannot differentiate f."""
    try:
        with torch.no_grad():  # no graph of the VJP itself (f's parameters may require grad)
            (g,) = vjp_fn(cotangent.reshape(out.shape))
    except (RuntimeError, NotImplementedError) as exc:
        raise NoReference(first_line(exc)) from exc
    return g.reshape(shape)


def block_error(
    target: Target,
    block: torch.Tensor,
    b0: int,
    b1: int,
    s0: int,
    s1: int,
    rows: bool,
    colours: torch.Tensor | None = None,
    seed: int = 0,
    reference: Reference | None = None,
) -> float:
    """The worst relative error, over the block's samples, of a random projection of
    `block` against one plain `torch.autograd.grad` VJP of f (raises where f has none).

    NOTE: [block check] The reference shares nothing with the modes but f's backward
    formulas: no vmap, no stacked copies, no forward mode, no chain stages. Rows R: a random
    u_R gives u_R^T B, against the VJP with cotangent u_R. Columns C: a random u over all
    outputs gives u^T B, against the VJP u^T J restricted to C. With `colours` (a sparse
    problem's compressed block, S^T J or J S) the cotangent is S u_R, or u^T J is summed
    per colour. Any wrong entry moves the projection (almost surely), so one backward per
    block of rows checks all of it, and one per sample block all its blocks of columns (the
    forward and u^T J are kept across a sample block's blocks: `Reference`). Blocks of rows
    are not checked against a forward-mode J v made once per sample block: a dual matmul
    costs more than a backward per block (benchmarks/RESULTS.md).
    Entries that are not finite on either side are left out.
    """
    reference = reference or Reference(target)
    nb, k = b1 - b0, s1 - s0
    if rows and target.shared_fn is not None:
        return _shared_rows_error(target, block, b0, b1, s0, s1, colours, seed, reference)
    y = reference.output(b0, b1)
    dt, dev = y.dtype, y.device
    pick = None  # S[:, s0:s1] of a sparse problem: which entries each colour sums
    if colours is not None:
        pick = (colours.to(dev)[:, None] == torch.arange(s0, s1, device=dev)[None, :]).to(dt)
    if rows:
        u = torch.randn(nb, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dt).to(dev)
        if pick is None:
            cotangent = torch.zeros(nb, target.n_out, dtype=dt, device=dev)
            cotangent[:, s0:s1] = u
        else:
            cotangent = u @ pick.T
        ref = reference.vjp(b0, b1, cotangent)
    # NOTE: [noise floor] A block whose J is exactly zero (a transformer's key-bias columns,
    # under softmax's shift invariance) comes out as roundoff on both sides (1e-17), and two
    # roundoffs differ by 100% of themselves: explicit `fwd` on a transformer's parameters
    # was refused. So where both the block's projection and the reference's are noise, at
    # most NOISE_ULPS of its sample's projection of the whole J (u^T J over all columns;
    # for rows, over all rows) scaled to the block's share of them, the block passes:
    # roundoff between two ways of differentiating came to 60 ulps of that on a two-layer f.
    # That is 1.2e-4 of a typical block in float32 and 2.2e-13 in float64, and it is no
    # absolute tolerance: a block above it on either side is held to the relative one, so a
    # small block (1% of typical) computed as zero, or 5% off, still fails. Rows need one
    # more backward for it, paid only by a block that fails without it.
    eps = max(torch.finfo(dt).eps, torch.finfo(block.dtype).eps if block.is_floating_point() else 0.0)
    block = block.reshape(nb, k, target.n_in) if rows else block.reshape(nb, target.n_out, k)
    if rows:
        got = torch.bmm(u[:, None, :], block.to(dt))[:, 0]
        err = relative_error(got, ref)
        if err <= block_rtol(target, block) or target.n_out == k:
            return err
        _, g = reference.projection(b0, b1, seed + 1)  # a u over all rows
        return relative_error(got, ref, NOISE_ULPS * eps * math.sqrt(k / target.n_out) * _finite_norms(g))
    u, g = reference.projection(b0, b1, seed)  # one u^T J serves every block of columns of these samples
    ref = g[:, s0:s1] if pick is None else g @ pick
    got = torch.bmm(u[:, None, :], block.to(dt))[:, 0]
    return relative_error(got, ref, NOISE_ULPS * eps * math.sqrt(k / target.n_in) * _finite_norms(g))


NOISE_ULPS = 1000  # where a block's projection is roundoff, in ulps of its sample's whole one (NOTE: [noise floor])


def _finite_norms(g: torch.Tensor) -> torch.Tensor:
    """Each row's 2-norm over its finite entries, in float64."""
    return torch.linalg.vector_norm(torch.where(torch.isfinite(g), g, 0).double(), dim=1)


SHARED_GROUP = 8  # samples per reference backward of a batched parameter problem


def _shared_rows_error(
    target: Target,
    block: torch.Tensor,
    b0: int,
    b1: int,
    s0: int,
    s1: int,
    colours: torch.Tensor | None,
    seed: int,
    reference: Reference,
) -> float:
    """`block_error` for a block of rows of a batched parameter problem.

    NOTE: [shared reference] Every sample differentiates the same parameters, so plain
    autograd gives per-sample VJPs only one sample per forward pass (a Python loop of
    forwards cost 10x a per-sample-gradient block). Instead one plain forward of up to
    SHARED_GROUP samples at shared parameters, and one backward with cotangent w_b u_b,
    gives sum_b w_b u_b^T J_b, against the same sum of the block's projections. The
    weights w_b = 1 / |u_b^T B_b| give every sample's term unit size, so a sample with
    small gradients is not drowned by others, and a wrong sample's relative error shows
    divided by at most sqrt(SHARED_GROUP); a zero block where J is not gets the largest
    weight (1e10 in float32, 1e20 in float64, relative to the biggest term), so only a J
    below that fraction of its neighbours' could hide. Any weights fixed before the
    reference is computed keep the identity exact.
    """
    nb, k = b1 - b0, s1 - s0
    u_all = torch.randn(nb, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    block = block.reshape(nb, k, target.n_in)
    worst = 0.0
    for g0 in range(0, nb, SHARED_GROUP):
        g1 = min(g0 + SHARED_GROUP, nb)
        y = reference.shared_output(b0 + g0, b0 + g1)
        dt, dev = y.dtype, y.device
        u = u_all[g0:g1].to(dt).to(dev)
        proj = torch.bmm(u[:, None, :], block[g0:g1].to(dt))[:, 0]  # (ng, n_in): u_b^T B_b
        if g1 - g0 == 1:  # one sample: nothing to balance
            w, got = torch.ones(1, dtype=dt, device=dev), proj[0]
        else:
            norms = torch.linalg.vector_norm(proj, dim=1).double()
            if not bool(torch.isfinite(norms).all()):
                norms = torch.linalg.vector_norm(torch.where(torch.isfinite(proj), proj, 0).double(), dim=1)
            top = float(norms.max())
            # In [1, 1/floor], so w u_b^T J_b stays near the largest term's size and finite.
            floor = 1e-20 if dt == torch.float64 else 1e-10
            w = (top / norms.clamp_min(top * floor)).to(dt) if top > 0 else torch.ones_like(norms, dtype=dt)
            got = (w[:, None] * proj).sum(0)
        uw = w[:, None] * u
        if colours is None:
            cotangent = torch.zeros(g1 - g0, target.n_out, dtype=dt, device=dev)
            cotangent[:, s0:s1] = uw
        else:
            pick = (colours.to(dev)[:, None] == torch.arange(s0, s1, device=dev)[None, :]).to(dt)
            cotangent = uw @ pick.T
        ref = reference.shared_vjp(b0 + g0, b0 + g1, cotangent)
        worst = max(worst, relative_error(got[None], ref[None]))
    return worst


def relative_error(got: torch.Tensor, ref: torch.Tensor, noise: torch.Tensor | None = None) -> float:
    """max over samples (dim 0) of |got - ref| / |ref| (2-norms, finite entries only; 0/0 is
    0); a sample where both |got| and |ref| are at most its `noise` counts 0 (NOTE: [noise floor])."""
    got, ref = got.reshape(got.shape[0], -1), ref.reshape(ref.shape[0], -1)
    if noise is None and got.dtype == ref.dtype and got.dtype in (torch.float32, torch.float64) and got.numel():
        # The usual case, all finite: two norms in the blocks' own dtype, no float64 copies
        # (a float32 norm's roundoff, ~1e-7 relative, is far below the tolerances). Squares
        # below the dtype's smallest normal number flush to zero, which could hide a wrong
        # entry of a tiny J: taken only where what could hide is 1e-8 of the reference's norm.
        diff = torch.linalg.vector_norm(got - ref, dim=1)
        scale = torch.linalg.vector_norm(ref, dim=1)
        hidden = math.sqrt(got.shape[1] * torch.finfo(got.dtype).tiny)
        if bool(torch.isfinite(diff).all() & torch.isfinite(scale).all() & (scale > hidden * 1e8).all()):
            return float((diff.double() / scale.double()).max())
    got, ref = got.double(), ref.double()
    ok = torch.isfinite(got) & torch.isfinite(ref)
    diff = torch.where(ok, got - ref, 0).norm(dim=1)
    scale = torch.where(ok, ref, 0).norm(dim=1)
    rel = torch.where(scale > 0, diff / scale.clamp_min(torch.finfo(torch.float64).tiny), diff * math.inf)
    rel = torch.where(torch.isnan(rel), 0.0, rel)  # 0 * inf: both exactly zero
    if noise is not None:  # both sides roundoff: no error to speak of (NOTE: [noise floor])
        level = noise.to(rel).reshape(-1)
        rel = torch.where((scale <= level) & (torch.where(ok, got, 0).norm(dim=1) <= level), 0.0, rel)
    return float(rel.max()) if rel.numel() else 0.0
