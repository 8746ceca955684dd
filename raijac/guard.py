"""guard: what raijac checks and keeps fixed around the user's code (torch only; used by problem, kernels, api, verify).

Three promises: a function that draws random numbers is run from one fixed generator
state every time (NOTE: [replay] in problem), so J and y belong to one function; the
samples of a batched problem are independent, as its kernels assume; and computing,
planning or verifying gives the caller's modules and generators back as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial, wraps
from types import ModuleType
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from raijac.errors import ProblemError, first_line

if TYPE_CHECKING:
    from raijac.problem import Problem

_P = ParamSpec("_P")
_R = TypeVar("_R")

REPLAY_SEED = 0
# Two calls of a deterministic f agree to rounding (GPU reductions may reorder sums); two
# random draws differ by the size of the output itself.
# Compared as norms: ||a - b|| <= rtol ||a||. BLAS may split a large product differently from
# one call to the next (MKL's dynamic threading): ~1e-7 of the norm in float32; a dropout
# draw moves it by the dropped share itself (>= 1e-2).
_AGREE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def check_rtol(dtype: torch.dtype) -> float:
    """The relative error a right block stays under in `dtype`: two summation orders'
    roundoff with a wide margin, yet far below any wrong derivative (those were 4% to 100% off)."""
    return {torch.float64: 1e-7, torch.float32: 1e-3}.get(dtype, 3e-2)


# NOTE: [attention] F.scaled_dot_product_attention picks a fused kernel (CPU flash attention)
# that vmap has no batching rule for and forward-mode AD no derivative: vmap falls back to a
# per-seed loop (and auto to `loop`, 6.5x slower than torch.func on a GPT-2). Its math
# backend is plain matmuls and softmax, which vmap batches and jvp differentiates. And
# nn.MultiheadAttention / nn.TransformerEncoderLayer in eval mode take an inference fast path
# (one fused op without a derivative) when no parameter requires grad, which is what they
# see inside vmap over per-sample parameters or under forward-mode AD: `rev` of a ViT's
# parameters failed there and auto fell back to `rev-batched`, 2.4-3.7x slower than
# torch.func. Every mode but loop, and verify's fresh derivatives, run inside this.
@contextmanager
def plain_attention() -> Iterator[None]:
    """Attention on its differentiable path: SDPA's math backend, nn.MultiheadAttention's
    and the transformer layers' fast path off (the caller's setting given back after)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextmanager
def evaluating(device: torch.device | str) -> Iterator[None]:
    """f evaluated as the modes run it, without a graph: its one generator state replayed, and
    attention on its differentiable path (NOTE: [y on the path differentiated] in problem)."""
    with torch.no_grad(), replaying(device), plain_attention():
        yield


@contextmanager
def replaying(device: torch.device | str) -> Iterator[None]:
    """Run the body from the generator state REPLAY_SEED (CPU, and `device` when it is a GPU),
    then give the caller's state back."""
    device = torch.device(device)
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(REPLAY_SEED)
        for d in devices:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(REPLAY_SEED)
        yield


def generator_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def same_states(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def outputs_agree(a: object, b: object) -> bool:
    """Whether two evaluations of f agree to rounding (relative to the output's norm, NaNs in
    the same places): the test that a replayed f is still the function that gave y."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a64, b64 = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isnan(a64), torch.isnan(b64)):
        return False
    a64, b64 = torch.nan_to_num(a64, posinf=0.0, neginf=0.0), torch.nan_to_num(b64, posinf=0.0, neginf=0.0)
    if not torch.equal(torch.isinf(a.detach()), torch.isinf(b.detach())):
        return False
    return float((a64 - b64).norm()) <= _AGREE_RTOL.get(a.dtype, 1e-4) * float(a64.norm())


# ---------------------------------------------------------------------- the caller's objects
@contextmanager
def keep_caller_state(problem: Problem | None) -> Iterator[None]:
    """Give back, on exit, what running the problem here may change in the caller's objects:
    the parameters (moved to a GPU by a probe), buffers (batch norm's running statistics in
    training mode), `.grad` and training flags of the modules f uses, and the torch generators
    (the generators alone when `problem` is None)."""
    modules = [] if problem is None else modules_of(problem)
    flags = [(m, m.training) for root in modules for m in root.modules()]
    params, buffers = [], []
    for owner, _ in flags:
        for name, p in owner._parameters.items():
            if p is not None and torch.nn.parameter.is_lazy(p):
                continue  # materialised by f's first call: that is its shape now, not a change to undo
            grad = None if p is None else p.grad
            params.append((owner, name, p, None if p is None else p.data, grad, None if grad is None else grad.data))
        for name, b in owner._buffers.items():
            buffers.append((owner, name, b, None if b is None else b.detach().clone()))
    plain = [t for t in ([] if problem is None else captured_tensors(problem)) if not t.requires_grad]
    attributes = module_attributes(modules)  # NOTE: [kept state]
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        detach_again(plain)  # NOTE: [captured tensors]
        restore_tensor_attributes(attributes)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for owner, name, p, data, grad, grad_data in params:
                owner._parameters[name] = p
                if p is not None:  # Module.to() swaps .data of a parameter and of its .grad in place
                    if p.data is not data:
                        p.data = data
                    if grad is not None and grad.data is not grad_data:
                        grad.data = grad_data
                    if p.grad is not grad:
                        p.grad = grad
            for owner, name, b, saved in buffers:
                if b is not None and (b.shape, b.dtype, b.device) == (saved.shape, saved.dtype, saved.device):
                    b.copy_(saved)
                    owner._buffers[name] = b
                else:  # f replaced or reshaped it: the saved copy is the caller's value
                    owner._buffers[name] = saved


def keeping_caller_state(run: Callable[_P, _R]) -> Callable[_P, _R]:
    """`run` with `keep_caller_state` around it, for the `problem=` keyword it was given."""

    @wraps(run)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        problem = kwargs.get("problem")
        with keep_caller_state(problem if hasattr(problem, "wrt") and hasattr(problem, "f") else None):
            return run(*args, **kwargs)

    return wrapper


def modules_of(problem: Problem) -> list[torch.nn.Module]:
    """The modules f uses that raijac can see: the problem's module, f itself, a chain's
    stages, and modules held by f's closure or partial arguments (two levels deep)."""
    found: dict[int, torch.nn.Module] = {}

    def visit(obj: object, depth: int) -> None:
        if isinstance(obj, torch.nn.Module):
            found.setdefault(id(obj), obj)
            return
        if depth <= 0:
            return
        if isinstance(getattr(obj, "stages", None), tuple):  # a Problem.chain
            inner = list(obj.stages)
        elif isinstance(obj, partial):
            inner = [obj.func, *obj.args, *obj.keywords.values()]
        else:
            inner = [c.cell_contents for c in getattr(obj, "__closure__", None) or () if _has_contents(c)]
            inner += [getattr(obj, "__self__", None), getattr(obj, "__wrapped__", None)]
        for each in inner:
            if each is not None:
                visit(each, depth - 1)

    visit(problem.module, 1)
    visit(problem.f, 3)
    return list(found.values())


def captured_tensors(problem: Problem) -> list[torch.Tensor]:
    """Tensors f holds outside its modules: in its closure, its partial arguments, and the
    globals its code names (two levels deep, into the functions found there).

    NOTE: [captured tensors] An f that writes into a tensor it holds (`buf[:] = tanh(x)`)
    makes that tensor part of the graph whenever raijac differentiates f in the driver: it
    keeps `requires_grad` and a grad_fn afterwards, and the next run's workers, given a
    copy of it, refused the write ("a view of a leaf Variable that requires grad is being
    used in an in-place operation"). Such tensors are detached again on the way out.
    """
    found: dict[int, torch.Tensor] = {}

    def visit(obj: object, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            found.setdefault(id(obj), obj)
            return
        if depth <= 0 or isinstance(obj, type):
            return
        if isinstance(obj, torch.nn.Module):  # its own tensors are kept by keep_caller_state
            inner = [getattr(obj, "fn", None), getattr(obj, "stages", None)]  # a flattened f, a chain
        elif isinstance(obj, tuple | list):
            inner = list(obj)
        elif isinstance(obj, partial):
            inner = [obj.func, *obj.args, *obj.keywords.values()]
        else:
            inner = [c.cell_contents for c in getattr(obj, "__closure__", None) or () if _has_contents(c)]
            code, scope = getattr(obj, "__code__", None), getattr(obj, "__globals__", None)
            if code is not None and isinstance(scope, dict):
                inner += [scope[name] for name in code.co_names if name in scope]
            inner.append(getattr(obj, "__wrapped__", None))
        for each in inner:
            if each is not None and not isinstance(each, ModuleType):
                visit(each, depth - 1)

    visit(problem.f, 3)
    return list(found.values())


def held_grad_leaves(problem: Problem) -> list[torch.Tensor]:
    """The leaf tensors an input problem's f holds that require grad (its modules'
    parameters, captured tensors); none for a parameter problem, whose parameters f gets."""
    if problem.wrt == "params":
        return []
    found = {id(p): p for module in modules_of(problem) for p in module.parameters() if p.requires_grad}
    for t in captured_tensors(problem):
        if t.requires_grad and t.is_leaf:
            found.setdefault(id(t), t)
    return list(found.values())


@contextmanager
def grad_stopped(tensors: list[torch.Tensor]) -> Iterator[None]:
    """`tensors` (leaves that require grad) not requiring grad meanwhile."""
    for t in tensors:
        t.requires_grad_(False)
    try:
        yield
    finally:
        for t in tensors:
            t.requires_grad_(True)


def stop_outer_grad(problem: Problem) -> None:
    """Stop the tensors f holds requiring grad, in a worker's own copy of an input problem
    where the driver found f the same function so (`Problem.freezable`).

    NOTE: [no outer graph] torch.func's VJP records its backward pass for a double backward
    wherever a tensor f holds requires grad: a ResNet-18 input block (4 samples, 10 rows,
    one thread) took 0.45 s with the module's weights requiring grad, 0.38 s without. Only
    a worker's copy is changed (the caller's module must keep training), and autograd stays
    enabled: under no_grad torch picks other backward kernels (an LSTM's fused mkldnn one,
    which vmap cannot batch), while weights that require no grad change no kernel choice.
    An f may differentiate its own weights (an influence function's inner gradient), or run
    a frozen backbone without a graph: the driver's second call of f, its determinism check,
    runs with them frozen, one VJP of f runs both ways, and only an f that gives the same y
    and VJP so is frozen here.
    """
    if problem.freezable:
        for t in held_grad_leaves(problem):
            t.requires_grad_(False)


def detach_again(tensors: list[torch.Tensor]) -> None:
    """Detach those of `tensors` (held by f, not requiring grad before) that differentiating
    f put in the graph (NOTE: [captured tensors])."""
    for t in tensors:
        if t.requires_grad:
            try:
                t.detach_()
            except RuntimeError:  # a view torch will not detach in place: left as f made it
                pass


def _has_contents(cell: object) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _one_sample_ctx(problem: Problem) -> tuple[torch.Tensor, ...] | None:
    """The per-sample inputs of sample 0 (all of them for an unbatched problem)."""
    if problem.ctx is None or not problem.batched:
        return problem.ctx
    return tuple(c[:1] for c in problem.ctx)


def _projected_gradient(out: torch.Tensor, wrt: list[torch.Tensor], seed: int) -> torch.Tensor:
    """The gradient of `out` projected on a random w (from `seed`) w.r.t. `wrt`, flat, with
    zeros where `out` does not reach; the same seed gives two outputs of one shape the same w."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    grads = torch.autograd.grad((out * w).sum(), wrt, allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1) for t, g in zip(wrt, grads, strict=True)])


# ---------------------------------------------------------------------- parameters
def check_parameters_are_read(problem: Problem) -> None:
    """Raise where the gradient w.r.t. the parameters as raijac swaps them in differs from the
    module's own backward through its parameters (on one sample of a batched problem).

    NOTE: [own backward] The modes and the block check both differentiate f with the flat
    parameters swapped in by `functional_call`, so where f reads a weight some other way
    (a copy or a product made at init, a place functional_call misses:
    NOTE [slots] in trees) every block would agree with a wrong reference. The module's
    own backward, with its real Parameters, is independent of all of that: one random
    projection of both gradients must agree.
    """
    module = problem.module
    named = [p for _, p in module.named_parameters() if p.requires_grad] if module is not None else []
    if not named or problem.ctx is None:
        return
    ctx = _one_sample_ctx(problem)
    compare_parameter_gradients(
        named,
        lambda: problem.f(None, ctx, params=None),
        lambda flat: problem._forward(None, flat, ctx),
        problem.params,
    )


def compare_parameter_gradients(
    named: list[torch.nn.Parameter],
    own: Callable[[], torch.Tensor],
    swapped: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
) -> None:
    """NOTE: [own backward]: `own()` runs the module with its Parameters `named`, `swapped(flat)`
    with the flat vector swapped in; one random projection of both gradients must agree."""
    # At the module's own values (a problem may be `replace`d to other parameters): this
    # compares two ways of differentiating one function, not two points.
    flat = torch.cat([p.detach().reshape(-1) for p in named]).to(like).requires_grad_(True)
    try:
        with torch.enable_grad(), replaying(flat.device):
            mine = own()
        with torch.enable_grad(), replaying(flat.device):
            theirs = swapped(flat)
    except RuntimeError as exc:
        if "inplace" not in str(exc):
            raise
        raise ProblemError(
            "f changes its parameters in place while it runs (nn.Embedding(max_norm=...)?), so each call is another "
            "function; renormalise them outside f, or differentiate them as inputs."
        ) from exc
    if not (isinstance(mine, torch.Tensor) and mine.requires_grad and theirs.requires_grad):
        return
    want = _projected_gradient(mine, named, seed=7)
    got = _projected_gradient(theirs, [flat], seed=7)
    tol = _AGREE_RTOL.get(want.dtype, 1e-4) * 10
    diff = float((got.double() - want.double()).norm())
    scale = float(want.double().norm())
    if not diff <= tol * max(scale, 1e-30):
        raise ProblemError(
            f"the module's gradient through its own parameters differs from the one through the parameters raijac "
            f"swaps in (torch.func.functional_call) by {diff / max(scale, 1e-30):.3g} (relative), so f reads a weight "
            "some other way (a copy or a product of it made at init?); make f read its parameters when "
            "it runs, or differentiate them as inputs: raijac.Problem(f, x, params, argnums=1)."
        )


# ---------------------------------------------------------------------- torch's own derivatives
# NOTE: [adjoint test] Every mode's block check compares with plain autograd, so a wrong
# backward formula in torch itself gives a wrong J that every check agrees with: torch
# 2.13's backward of `as_strided_scatter` into an offset of a larger tensor puts the
# gradient on the wrong entries (J 100% off, stored as checked). Forward-mode AD has
# formulas of its own: for random u and v, u . (J v) from one JVP must equal (u^T J) . v
# from one VJP. Where the two differ, central finite differences along v say which is
# right. A wrong reverse mode is what the modes and checks cannot see (`reverse_mode_error`
# says so, and `compute` refuses unless the run is mode fwd without the block check); a
# wrong forward mode fails every forward block's check against autograd already, so it
# is left to that. The test is one JVP and one VJP on one sample, skipped where f has no
# forward-mode formula; where f is not smooth along v (one-sided differences jump) or
# finite differences side with neither, nothing is said. A single projection misses a
# wrong formula that moves u^T J v by less than the tolerance: a screen for wrong
# formulas, which move J by 4-100%.
_FD_RTOL = {torch.float64: 1e-6, torch.float32: 1e-2}


@dataclass(frozen=True)
class WrongReverse:
    """What the adjoint test found: the refusal's sentence, and whether mode fwd (vmapped
    JVPs, no reverse mode) can compute this f's J instead."""

    message: str
    fwd_works: bool

    def __str__(self) -> str:
        return self.message


def reverse_mode_error(problem: Problem) -> WrongReverse | None:
    """Why torch's reverse-mode derivative of f is wrong at the problem's point, or None
    (NOTE: [adjoint test]); on one sample of a batched problem."""
    import torch.autograd.forward_ad as fwad

    ctx = _one_sample_ctx(problem)
    if problem.wrt == "params":
        z = problem.params

        def g(p: torch.Tensor) -> torch.Tensor:
            return problem._forward(None, p, ctx)
    else:
        z = problem.x[:1] if problem.batched else problem.x
        if not z.is_floating_point():
            return None

        def g(t: torch.Tensor) -> torch.Tensor:
            return problem._forward(t, problem.params, ctx)

    if z is None or z.numel() == 0:
        return None
    z = z.detach()
    gen = torch.Generator().manual_seed(11)
    # In f's own dtype (float64 draws of ResNet-18's 11.2M parameters took 0.2 s); a narrow
    # dtype's sums in float32.
    wide = torch.promote_types(z.dtype, torch.float32) if z.is_floating_point() else torch.float32
    v = torch.randn(z.shape, generator=gen, dtype=wide).to(z)
    try:
        with fwad.dual_level(), torch.no_grad(), replaying(z.device), plain_attention():
            primal, jv = fwad.unpack_dual(g(fwad.make_dual(z, v)))
        if not isinstance(primal, torch.Tensor) or not primal.is_floating_point():
            return None
        u = torch.randn(primal.shape, generator=gen, dtype=wide).to(primal)
        leaf = z.detach().requires_grad_(True)  # a new tensor: the problem's own keeps its flag
        plain = [t for t in captured_tensors(problem) if not t.requires_grad]
        try:
            with torch.enable_grad(), replaying(z.device), plain_attention():
                out = g(leaf)
                uj = torch.autograd.grad(out, leaf, u, allow_unused=True)[0] if out.requires_grad else None
        finally:  # before the problem is shipped (NOTE: [captured tensors])
            detach_again(plain)
    except Exception:  # no forward-mode formula (or none at all) for one of f's ops: nothing to compare
        return None
    jv = torch.zeros_like(primal) if jv is None else jv
    uj = torch.zeros_like(z) if uj is None else uj

    def dot(p: torch.Tensor, q: torch.Tensor) -> float:
        return float(torch.dot(p.reshape(-1).to(wide), q.reshape(-1).to(wide)))

    def norm(p: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(p.to(wide)))

    a, b = dot(u, jv), dot(uj, v)
    scale = max(norm(u) * norm(jv), norm(uj) * norm(v))
    if not (math.isfinite(a) and math.isfinite(b) and scale > 0) or abs(a - b) <= check_rtol(primal.dtype) * scale:
        return None
    h = torch.finfo(z.dtype).eps ** (1 / 3) * max(1.0, float(z.abs().max())) / float(v.abs().max())
    near = h / 8  # one-sided differences this close: a kink (|x| at 0) shows as their jump
    try:
        with evaluating(z.device):
            up, down, mid = (g(z + t * v).to(wide) for t in (h, -h, 0.0))
            right, left = g(z + near * v).to(wide), g(z - near * v).to(wide)
    except Exception:  # f is not defined there (a Cholesky factor of a matrix no longer positive): no verdict
        return None
    c = dot(u, up - down) / (2 * h)
    jump = abs(dot(u, right - mid) - dot(u, mid - left)) / near
    # At a kink, forward and reverse mode may each take a valid one-sided slope (`fmax`'s
    # forward 0 and relu's backward 1 at |x - c|'s x = c), and central differences side with
    # neither or with forward mode: no verdict where f is not smooth along v.
    smooth = jump <= 0.1 * abs(a - b)
    if not smooth or not abs(c - a) <= _FD_RTOL.get(primal.dtype, 1e-1) * scale or not abs(c - b) > 10 * abs(c - a):
        return None
    wrong = (
        f"torch's reverse-mode derivative of f is wrong here: for random directions u and v, u.(J v) is {a:.6g} by "
        f"forward-mode AD and {c:.6g} by finite differences, but (u^T J).v is {b:.6g} by reverse mode (a wrong backward "
        "formula of one of f's torch ops), which every mode but fwd and the block check use"
    )
    try:  # mode fwd vmaps f's forward mode: does vmap batch it?
        with evaluating(z.device):
            torch.func.vmap(lambda t: torch.func.jvp(g, (z,), (t,))[1])(torch.stack([v, v]))
    except Exception as exc:
        return WrongReverse(
            f"{wrong}, and mode fwd cannot vmap f's forward mode ({first_line(exc)}), so no mode gives this J right; "
            "write f without the op whose backward is wrong.",
            fwd_works=False,
        )
    return WrongReverse(f"{wrong}; compute with mode='fwd' and check_blocks=False (--mode fwd --no-block-check).", True)


# ---------------------------------------------------------------------- state kept on modules
_MISSING = object()


def module_attributes(modules: list[torch.nn.Module]) -> list[tuple[torch.nn.Module, dict]]:
    """Every submodule with a shallow copy of its attributes (NOTE: [kept state])."""
    unique = {id(m): m for root in modules for m in root.modules()}
    return [(m, dict(m.__dict__)) for m in unique.values()]


def _tensor_changes(m: torch.nn.Module, before: dict) -> list[str]:
    """Names whose value is another tensor now, a tensor now, or was a tensor before."""
    names = set(m.__dict__) | {n for n, v in before.items() if isinstance(v, torch.Tensor)}
    out = []
    for name in names:
        value, old = m.__dict__.get(name, _MISSING), before.get(name, _MISSING)
        if value is not old and (isinstance(value, torch.Tensor) or isinstance(old, torch.Tensor)):
            out.append(name)
    return sorted(out)


def changed_tensor_attributes(saved: list[tuple[torch.nn.Module, dict]]) -> list[tuple[torch.nn.Module, str]]:
    """The plain attributes (not parameters or buffers) that now hold another tensor, or a
    tensor where they held something else, or no longer hold the tensor they held."""
    return [(m, name) for m, before in saved for name in _tensor_changes(m, before)]


def restore_tensor_attributes(saved: list[tuple[torch.nn.Module, dict]]) -> None:
    for m, before in saved:
        for name in _tensor_changes(m, before):
            old = before.get(name, _MISSING)
            if old is _MISSING:
                del m.__dict__[name]
            else:
                m.__dict__[name] = old


def tensor_versions(modules: list[torch.nn.Module]) -> dict[str, tuple[torch.Tensor, int]]:
    """Every parameter and buffer of `modules` by name, with its in-place version counter
    (NOTE: [changed in place])."""
    seen: dict[int, tuple[str, torch.Tensor, int]] = {}
    for root in modules:  # a tensor reached from two modules (one inside the other) is named once
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            seen.setdefault(id(t), (name, t, t._version))
    return {name: (t, v) for name, t, v in seen.values()}


def check_not_changed_in_place(versions: dict[str, tuple[torch.Tensor, int]], y: torch.Tensor, again: torch.Tensor) -> None:
    """Refuse f that changes its modules' parameters or buffers in place and whose output
    moves with them between two calls.

    NOTE: [changed in place] spectral_norm in training mode runs a power-iteration step on
    every call and keeps its vectors in buffers: each call is another function, its output
    moved by ~2e-6 (relative, float32) between calls, under the two-call agreement's
    tolerance, while J moved by 2e-4, and the J stored was that of whichever call a worker
    made. A buffer f changes that does not feed its output (BatchNorm's running statistics
    in training mode) leaves two calls equal to the bit, and passes.
    """
    changed = [name for name, (t, v) in versions.items() if t._version != v]
    if not changed:
        return
    a, b = y.detach(), again.detach()
    if a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()):
        return
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    moved = float((a.double() - b.double()).nan_to_num().norm() / max(float(a.double().nan_to_num().norm()), 1e-300))
    raise ProblemError(
        f"f changes {shown} in place on every call (spectral norm's power iteration in training mode? a running "
        f"average that feeds the output?), and its output moves with it ({moved:.2g} relative between two calls), so "
        "each call is another function with another J; call module.eval(), or keep that state fixed outside f."
    )


def check_no_kept_state(problem: Problem, saved: list[tuple[torch.nn.Module, dict]]) -> None:
    """Refuse an f that stores on its module a tensor it reads back on the next call, where
    that tensor depends on what raijac differentiates; put the modules' attributes back as
    they were either way.

    NOTE: [kept state] A lazy cache (`if self.cache is None: self.cache = self.weight * 2`)
    is made once, by raijac's first call of f (with no gradient), and every later call, the
    block check and verify included, then treats it as a constant: J missed its derivative
    (100% off) with every check passing, and the caller's module kept the detached cache.
    Where evaluating f changed a tensor attribute, f runs twice more on one sample with
    gradients: once from the caller's state, once with what that call stored detached, as
    raijac's own first call leaves it. Their gradients differ only where f reads it back and
    it depends on the parameters (the input); a cached mask, or attention weights kept for
    a plot, are fine.
    """
    changed = changed_tensor_attributes(saved)
    if not changed:
        return
    restore_tensor_attributes(saved)
    try:
        ctx = _one_sample_ctx(problem)
        if problem.wrt == "params":
            wrt: list[torch.Tensor] = [p for _, p in problem.module.named_parameters() if p.requires_grad]

            def run() -> torch.Tensor:
                return problem.f(None, ctx, params=None)
        else:
            x = (problem.x[:1] if problem.batched else problem.x).detach().requires_grad_(True)
            wrt = [x]

            def run() -> torch.Tensor:
                return problem._forward(x, problem.params, ctx)

        def gradient() -> torch.Tensor | None:
            with torch.enable_grad(), replaying(problem.x.device):
                out = run()
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return None
            return _projected_gradient(out, wrt, seed=5)

        fresh = gradient()
        stored = []  # what that call stored with a gradient
        for m, name in changed_tensor_attributes(saved):
            value = m.__dict__.get(name)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                stored.append((m, name))
                m.__dict__[name] = value.detach()
        if not stored:
            return
        kept = gradient()
        if fresh is None or kept is None:
            return
        tol = _AGREE_RTOL.get(fresh.dtype, 1e-4) * 10
        if not float((kept.double() - fresh.double()).norm()) <= tol * float(fresh.double().norm()):
            names = ", ".join(f"{type(m).__name__}.{name}" for m, name in stored)
            what = "the parameters" if problem.wrt == "params" else "its input"
            raise ProblemError(
                f"f stores {names} on its module while it runs and reads it back, computed from {what}: every call "
                "after the first would use it as a constant, so J would miss its derivative; compute it in forward "
                "each time."
            )
    finally:
        restore_tensor_attributes(saved)


# ---------------------------------------------------------------------- independent samples
def check_independent_samples(problem: Problem, y: torch.Tensor) -> None:
    """Refuse batched functions where an output sample depends on other samples: the
    kernels differentiate blocks of samples (or one at a time), so J would be wrong for
    them. Checked on the first, the last and one random sample."""
    b = int(problem.x.shape[0])
    if b < 2:
        return
    middle = int(torch.randint(1, max(b - 1, 2), (), generator=torch.Generator().manual_seed(b)))
    picks = sorted({0, min(middle, b - 1), b - 1})
    if problem.x.is_floating_point():
        _check_gradient_stays(problem, picks)
    _compare_one_sample_passes(problem, y, picks)


# NOTE: [sub-batch] The gradient check runs f on at most this many samples: the first ones,
# the middle pick and the last ones. A coupling of samples is a rule of f's batch (a batch
# norm's statistics, a mean, a shift, pairs of the batch's halves), so it couples the samples
# of any sub-batch too; running it on all B would cost a forward and three backwards of the
# whole batch, 2x `vmap(grad)` itself for per-sample gradients at B=256. That the batch's own
# output at each pick is f on that sample alone is still checked on the whole batch
# (`_compare_one_sample_passes`).
SUB_BATCH = 8


def _sub_batch(b: int, picks: list[int]) -> list[int]:
    """The samples the gradient check runs: all of them up to SUB_BATCH, else the first and
    last ones around the picks."""
    if b <= SUB_BATCH:
        return list(range(b))
    inner = [p for p in picks if 0 < p < b - 1]
    edge = (SUB_BATCH - len(inner)) // 2
    return sorted({*range(edge), *inner, *range(b - (SUB_BATCH - len(inner) - edge), b)})


def _check_gradient_stays(problem: Problem, picks: list[int]) -> None:
    """Raise where the gradient of output sample s reaches another input sample (exact
    zeros expected), on a sub-batch that holds the picks (NOTE: [sub-batch])."""
    rows = _sub_batch(int(problem.x.shape[0]), picks)
    index = torch.tensor(rows, device=problem.x.device)
    ctx = None if problem.ctx is None else tuple(c.index_select(0, index) for c in problem.ctx)
    x = problem.x.index_select(0, index).requires_grad_(True)
    with torch.enable_grad():
        if problem.wrt == "params":  # x is the module's first input, ctx[0]
            y = problem._forward(None, problem.params, (x, *ctx[1:]))
        else:
            y = problem._forward(x, problem.params, ctx)
        if not y.requires_grad:
            return
        for s in picks:
            at = rows.index(s)
            w = torch.randn(y[at].shape, generator=torch.Generator().manual_seed(s), dtype=y.dtype).to(y.device)
            (g,) = torch.autograd.grad((y[at] * w).sum(), x, retain_graph=True, allow_unused=True)
            if g is None:
                continue
            flat = g.reshape(g.shape[0], -1)
            # NaN is 0 * inf (a zero cotangent through sqrt at 0, say), not a dependence.
            reached = ((flat != 0) & ~torch.isnan(flat)).any(dim=1)
            reached[at] = False
            if bool(reached.any()):
                raise ProblemError(
                    f"batched=True needs f to treat samples independently, but output sample {s} depends on other "
                    f"input samples (sample {rows[int(reached.nonzero()[0])]}; {_coupling_causes(problem)}); call "
                    "module.eval(), or pass batched=False."
                )


def _sliced_inputs(problem: Problem) -> list[tuple[str, object]]:
    """(name, shared= key) of the inputs f gets sample by sample that are not differentiated
    (nor targets)."""
    inputs = list(zip(getattr(problem.f, "ctx_names", ()), getattr(problem.f, "ctx_keys", ()), strict=True))  # a trees.Flat's
    return [(name, key) for name, key in inputs[1 if problem.wrt == "params" else 0 :] if key is not None]  # not x, not targets


def _shared_hint(problem: Problem) -> str:
    """Where f gets inputs not differentiated sample by sample: a hint that those the same for
    every sample (a causal mask) are passed whole when named in `shared`."""
    names = [name for name, _ in _sliced_inputs(problem)]
    if not names:
        return ""
    return f" (each sample gets its own slice of {', '.join(names)}: name an input the same for every sample, a mask, in shared=)"


def _coupling_causes(problem: Problem) -> str:
    """What makes samples depend on each other, for the refusal: f's own batch rules, or an
    input the same for every sample (a (B, B) causal mask, B its size) cut into samples."""
    sliced = _sliced_inputs(problem)
    if not sliced:
        return "batch norm in training mode, a mean over the batch, or a shift along it?"
    names = " or ".join(name for name, _ in sliced)
    return (
        f"batch norm in training mode, a mean over the batch, a shift along it, or {names} the same for every sample "
        f"but cut into samples? pass that whole with shared=({sliced[0][1]!r},)"
    )


def _compare_one_sample_passes(problem: Problem, y: torch.Tensor, picks: list[int]) -> None:
    """Compare the batch's output sample s with f on sample s alone, which is what the
    kernels may differentiate: catches what no gradient shows (token ids as x, a coupling
    through a step function)."""
    tol = _AGREE_RTOL.get(y.dtype, 1e-4) * 10
    # Parameter Jacobians always run f on one sample at a time (vmapped): f must map one
    # sample there. Input Jacobians run blocks of samples, whose own errors say what is wrong.
    one_at_a_time = problem.wrt == "params"
    for s in picks:
        try:
            with torch.no_grad(), plain_attention():  # as y was (NOTE: [y on the path differentiated] in problem)
                alone = problem._one_sample(s)
        except Exception as exc:
            if not one_at_a_time:
                continue
            raise ProblemError(
                f"batched=True needs f to map one sample (1, ...) as it maps a batch, but on sample {s} alone f raised "
                f"{type(exc).__name__}: {first_line(exc)}; fix f{_shared_hint(problem)}, or pass batched=False."
            ) from exc
        if tuple(alone.shape) != (1, *y.shape[1:]):
            # Every mode may run a block of one sample, so this J could not be right either way.
            raise ProblemError(
                f"batched=True needs f to map (1, ...) to (1, ...), but on sample {s} alone it returned shape "
                f"{tuple(alone.shape)} where the batch gives {tuple(y.shape[1:])} per sample; fix "
                f"f{_shared_hint(problem) or ' (a tensor shared by all samples is cut into samples too: close over it inside f)'}, "
                "or pass batched=False."
            )
        # A NaN or inf both ways is the same output (a padding mask that hides every key of a
        # sample gives NaN on its own and in the batch): only the finite entries are compared.
        a, b = alone[0].double(), y[s].double()
        finite = torch.isfinite(a) & torch.isfinite(b)
        same = finite | (torch.isnan(a) & torch.isnan(b)) | (torch.isinf(a) & (a == b))
        if not bool(same.all()):
            differs = "in where it is NaN or inf"
        else:
            err = float(torch.where(finite, a - b, 0).norm())
            scale = max(float(torch.where(finite, b, 0).norm()), 1e-30)
            differs = None if err <= tol * scale else f"by {err / scale:.3g} (relative)"
        if differs is not None:
            raise ProblemError(
                f"batched=True needs f to treat samples independently, but output sample {s} of the whole batch "
                f"differs from f on sample {s} alone {differs} ({_coupling_causes(problem)}); call module.eval(), or "
                "pass batched=False."
            )


# ------------------------------------------------------------------ identity
