"""problem: what to differentiate — the first stage (spec -> Problem -> plan -> kernels -> store).

A `Problem` is a function and the point to differentiate it at, plus how to read its
shapes: plain `f(x)` gives `J` of shape `(M, N)`; `batched=True` gives the per-sample
Jacobians `(B, M, N)`; `Problem.from_module(..., wrt="params")` differentiates a module's
output w.r.t. its flattened trainable parameters. Inputs and outputs are flattened in C
order, parameters in `module.parameters()` order (as `parameters_to_vector`).

Problems are rebuilt independently on every worker (from the spec, or unpickled), so
building one must be deterministic; the fingerprint guards resume and workers against a
problem that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Literal

import torch

from raijac import trees
from raijac.errors import ProblemError, first_line
from raijac.guard import (
    REPLAY_SEED,
    WrongReverse,
    check_independent_samples,
    check_no_kept_state,
    check_not_changed_in_place,
    check_parameters_are_read,
    compare_parameter_gradients,
    evaluating,
    generator_states,
    grad_stopped,
    held_grad_leaves,
    module_attributes,
    modules_of,
    outputs_agree,
    plain_attention,
    replaying,
    restore_tensor_attributes,
    reverse_mode_error,
    same_states,
    tensor_versions,
)
from raijac.memo import memo_get, memo_put
from raijac.spec import import_spec_module, normalize_spec, spec_key  # noqa: F401 - spec_key: the name others import

Wrt = Literal["input", "params"]


# A parameter's place among J's columns: a leaf like any differentiated input's.
ParamInfo = trees.Leaf


def unflatten(info: Sequence[ParamInfo], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat parameter vector as `{name: view}` (see NOTE: [split] in Problem.unflatten_params)."""
    parts = torch.split(flat, [i.size for i in info])
    return {i.name: part.view(i.shape) for i, part in zip(info, parts, strict=True)}


CHECKS = "checks"  # the memo entry of f's own checks (NOTE: [checked before])


class Chain:
    """A function given as its stages, first to last (`Problem.chain`); picklable when they are."""

    def __init__(self, stages: tuple[Callable[[torch.Tensor], torch.Tensor], ...]) -> None:
        self.stages = stages

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def __repr__(self) -> str:
        return f"Chain({', '.join(type(s).__name__ if isinstance(s, torch.nn.Module) else getattr(s, '__name__', '?') for s in self.stages)})"


class Problem:
    """The Jacobian of `f` at its inputs, as `torch.func.jacrev(f, argnums)(*args)` would give it.

    Arguments:
        f: a function returning a floating-point tensor, or a tuple, list, dict or dataclass
            of them (all their tensors are differentiated, one after the other; pick some
            with `outputs`).
        *args: f's inputs. The ones named by `argnums` are differentiated: tensors or
            pytrees of them, whose entries are J's columns one after the other. With one
            input this is `Problem(f, x)`.
        argnums: which of `args` to differentiate (an int or a tuple), as in torch.func, or
            keys of `kwargs` (`argnums="inputs_embeds"`: a Hugging Face model's embeddings).
        has_aux: f returns `(output, aux)`; aux is not differentiated.
        outputs: a key or index (or a list of them) choosing what of f's output to
            differentiate (`outputs="logits"`).
        kwargs: keyword arguments for f, not differentiated.
        shared: the inputs not differentiated that are the same for every sample of a
            batched problem (a causal mask, a position table), by keyword or position:
            each sample gets them whole instead of its own slice (`in_dims=None` in vmap).
        loss: differentiate `loss(output, *targets)` instead of f's output: with
            `batched=True` sample by sample, so `loss=F.cross_entropy` and the labels as
            `targets` give per-sample losses (their parameter Jacobian: per-sample gradients).
        targets: a tensor or a tuple of them for `loss` (per-sample when batched).
        batched: every input tensor holds independent samples along its leading dimension
            and f maps them sample by sample; the result is the per-sample Jacobians
            `(B, M, N)`. Inputs not differentiated (labels, masks) travel with their samples,
            except those named in `shared`.
            Batched problems are batch-aware.
        batch_aware: `f` also maps a stack `(K, *in)` to `(K, *out)` sample by sample,
            which the repeat modes (`rev-repeat`, `fwd-repeat`) need.
        sparsity: the structural non-zeros of (one sample's) Jacobian `(M, N)`: a
            `scipy.sparse` matrix, a `(rows, cols)` pair of flat index arrays, or `"detect"`
            to trace them through the operations f runs. The columns (or rows) are then
            coloured and only as many JVPs (VJPs) as colours run; the result is stored sparse.

    In `problem.x` the differentiated inputs are one tensor (flat, `(B, N)` or `(N,)`, when
    there are several); `problem.f` maps it (and `problem.ctx`, the per-sample inputs not
    differentiated) to one tensor. `in_leaves` / `out_leaves` say where each input and
    output leaf sits among J's columns and rows (empty for a plain tensor).
    """

    def __init__(
        self,
        f: Callable[..., object],
        *args: object,
        argnums: int | str | tuple[int | str, ...] = 0,
        has_aux: bool = False,
        outputs: trees.Select = None,
        kwargs: dict[str, object] | None = None,
        loss: Callable[..., torch.Tensor] | None = None,
        targets: object = None,
        batched: bool = False,
        batch_aware: bool = False,
        sparsity: object = None,
        shared: Sequence[str | int] = (),
    ) -> None:
        if not callable(f):
            raise ProblemError(f"f must be callable, but got {type(f).__name__}; pass the function itself.")
        named = (argnums,) if isinstance(argnums, str) else argnums if isinstance(argnums, tuple | list) else ()
        if not args and not any(isinstance(i, str) for i in named):
            raise ProblemError(
                "Problem needs the point to differentiate at: Problem(f, x), Problem(f, *args, argnums=...), or a keyword "
                "input named in argnums (Problem(f, kwargs={'inputs_embeds': e}, argnums='inputs_embeds'))."
            )
        nums = _argnums(argnums, len(args), kwargs)
        self.ctx: tuple[torch.Tensor, ...] | None = None
        names: list[str] = []  # the per-sample inputs' names
        keys: list[str | int | None] = []  # and their `shared` entries
        self.in_leaves: tuple[trees.Leaf, ...] = ()
        # As given (order kept; columns follow the inputs' order): the reader's jacrev structure.
        self.argnums: int | str | tuple[int | str, ...] = _normal_argnums(argnums, len(args))
        plain = not (has_aux or outputs is not None or kwargs or loss is not None or targets is not None or shared)
        if len(args) == 1 and nums == (0,) and isinstance(args[0], torch.Tensor) and plain:
            x = args[0]
            _check_input(x, "x")
        else:
            flat = trees.Flat(
                f,
                args,
                nums,
                kwargs=kwargs,
                has_aux=has_aux,
                outputs=outputs,
                batched=batched,
                loss=loss,
                targets=targets,
                shared=shared,
            )
            x = flat.flat_input()
            _check_input(x, "the differentiated input" if len(flat.x_leaves) == 1 else "the differentiated inputs")
            if len(flat.x_leaves) > 1 or flat.x_leaves[0].name != "args[0]":
                self.in_leaves = flat.x_leaves
            self.ctx = flat.context()
            names, keys = flat.ctx_names, flat.ctx_keys
            f = flat
        if batched and x.ndim == 0:
            raise ProblemError(
                "batched=True needs x with a leading batch dimension, but x is a scalar; pass x of shape (B, ...)."
            )
        _check_samples(self.ctx, x.shape[0] if batched else None, names, keys)
        self.f = f
        self.x = x.detach()
        self.batched = bool(batched)
        self.batch_aware = bool(batch_aware or batched)
        self.wrt: Wrt = "input"
        self.module: torch.nn.Module | None = None
        self.params: torch.Tensor | None = None
        self.param_info: tuple[ParamInfo, ...] = ()
        self.out_leaves: tuple[trees.Leaf, ...] = ()
        self.spec: str | None = None
        self.kind = "function"
        if isinstance(sparsity, str) and sparsity != "detect":
            raise ProblemError(f"sparsity={sparsity!r} is not understood; pass a scipy.sparse matrix, (rows, cols) or 'detect'.")
        if sparsity is not None and self.ctx is not None:
            raise ProblemError("sparsity applies to problems without per-sample inputs; close over them inside f.")
        self.sparsity = sparsity
        self._frozen = True

    # ------------------------------------------------------------------ builders
    @classmethod
    def chain(
        cls, stages: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, *, batched: bool = False
    ) -> Problem:
        """f(x) = stages[-1](...stages[0](x)): a declared chain of stages, for the chain modes.

        Any callables will do (modules or functions): an `nn.Linear` is applied as a GEMM,
        an elementwise module (Tanh, GELU, ...) as a scaling, any other stage by its VJP/JVP.
        An `nn.Linear` at the seed end skips reverse mode's identity GEMM (NOTE: [chain] in
        kernels). With `batched=True`, every stage maps `(B, ...)` to `(B, ...)` sample by sample.
        """
        stages = tuple(stages)
        if not stages:
            raise ProblemError("Problem.chain needs at least one stage; pass the stages f applies, first to last.")
        for i, stage in enumerate(stages):
            if not callable(stage):
                raise ProblemError(
                    f"stage {i} of the chain is a {type(stage).__name__}, not callable; pass modules or functions."
                )
        return cls(Chain(stages), x, batched=batched, batch_aware=batched)

    @classmethod
    def from_module(
        cls,
        module: torch.nn.Module,
        *args: object,
        kwargs: dict[str, object] | None = None,
        outputs: trees.Select = None,
        loss: Callable[..., torch.Tensor] | None = None,
        targets: object = None,
        wrt: Wrt = "params",
        argnums: int | str | tuple[int | str, ...] = 0,
        batched: bool = False,
        shared: Sequence[str | int] = (),
    ) -> Problem:
        """The Jacobian of `module(*args, **kwargs)` w.r.t. its trainable parameters or its inputs.

        With `wrt="params"` the columns are all parameters with `requires_grad`, flattened
        in `module.parameters()` order; `batched=True` gives per-sample parameter
        Jacobians (the NTK / Fisher case), and the inputs may be any tensors (token ids,
        attention masks: each travels with its samples; those the same for every sample, a
        causal mask, are named in `shared`: `kwargs={"tgt_mask": m}, shared=("tgt_mask",)`).
        With `wrt="input"`, `argnums` picks the inputs to differentiate (positions of `args`
        or keys of `kwargs`: `kwargs={"inputs_embeds": e}, argnums="inputs_embeds"`). `outputs` picks
        what of the module's output to differentiate (`outputs="logits"` for a Hugging
        Face model's `ModelOutput`). `loss` and `targets` differentiate a loss of that
        output instead; with
        `wrt="params", batched=True` that is per-sample gradients:
        `from_module(net, x, loss=F.cross_entropy, targets=labels, batched=True)`.
        """
        if not isinstance(module, torch.nn.Module):
            raise ProblemError(
                f"from_module needs a torch.nn.Module, but got {type(module).__name__}; use Problem(f, x) for plain functions."
            )
        if wrt == "input":
            problem = cls(
                module,
                *args,
                argnums=argnums,
                outputs=outputs,
                kwargs=kwargs,
                loss=loss,
                targets=targets,
                batched=batched,
                batch_aware=batched,
                shared=shared,
            )
            return problem.replace(kind="module")
        if wrt != "params":
            raise ProblemError(f"wrt must be 'params' or 'input', but got {wrt!r}.")
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ProblemError(
                "the module has no trainable parameters (none with requires_grad); use wrt='input' or unfreeze some."
            )
        infos, offset = [], 0
        for name, p in named:
            if not p.is_floating_point():
                raise ProblemError(f"parameter {name} has dtype {p.dtype}; raijac differentiates floating-point parameters only.")
            infos.append(ParamInfo(name, tuple(p.shape), offset))
            offset += p.numel()
        caller = trees.Flat(
            module,
            args,
            (),
            kwargs=kwargs,
            outputs=outputs,
            batched=batched,
            of_params=True,
            loss=loss,
            targets=targets,
            shared=shared,
        )
        ctx = caller.context()
        if not ctx:
            raise ProblemError(
                "from_module needs the module's inputs: from_module(module, x, ...) with at least one tensor "
                "(one not in shared: the samples' own)."
            )
        if batched and ctx[0].ndim == 0:
            raise ProblemError(
                "batched=True needs x with a leading batch dimension, but x is a scalar; pass x of shape (B, ...)."
            )
        if batched and ctx[0].shape[0] == 0:
            raise ProblemError(
                f"x has no samples (shape {tuple(ctx[0].shape)}), so there is nothing to compute; pass at least one sample."
            )
        _check_samples(ctx, ctx[0].shape[0] if batched else None, caller.ctx_names, caller.ctx_keys)
        problem = object.__new__(cls)
        problem.__dict__.update(
            f=caller,
            x=ctx[0],  # the first input tensor: stored, and the batch size
            ctx=ctx,
            in_leaves=(),
            out_leaves=(),
            argnums=None,  # the inputs are the parameters
            batched=bool(batched),
            batch_aware=bool(batched),
            wrt="params",
            module=module,
            params=torch.cat([p.detach().reshape(-1) for _, p in named]),
            param_info=tuple(infos),
            spec=None,
            kind="module",
            sparsity=None,
            _frozen=True,
        )
        return problem

    @classmethod
    def hessian(
        cls, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, batched: bool = False, sparsity: object = None
    ) -> Problem:
        """The Hessian of a scalar-valued `f` at `x`: the Jacobian of its gradient, `(N, N)`.

        With `batched=True`, `f` maps `(B, *in)` to `(B,)`, one scalar per independent sample,
        and the result is the per-sample Hessians `(B, N, N)`. Any mode works; `fwd` is the
        forward-over-reverse Hessian-vector product vmapped over seed columns. `sparsity` is
        the Hessian's pattern `(N, N)` (a scipy.sparse matrix or `(rows, cols)`), as for `Problem`.
        """
        _check_input(x, "x")
        x = x.detach()
        with torch.no_grad():
            try:
                value = f(x)
            except Exception as exc:
                raise ProblemError(f"f raised {type(exc).__name__} on x of shape {tuple(x.shape)}: {first_line(exc)}.") from exc
        want = (x.shape[0],) if batched else ()
        if not isinstance(value, torch.Tensor) or value.numel() != math.prod(want):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ProblemError(
                f"Problem.hessian needs f to return {'one scalar per sample, shape ' + str(want) if batched else 'a scalar'}, "
                f"but f returned {got}; reduce the output (e.g. .sum()) or use Problem for a Jacobian."
            )
        if batched:
            grad = torch.func.grad(lambda z: f(z).sum())  # samples are independent: each row is its own gradient
        else:
            grad = torch.func.grad(lambda z: f(z).reshape(()))
        return cls(grad, x, batched=batched, batch_aware=batched, sparsity=sparsity).replace(kind="hessian")

    @classmethod
    def hessian_from_module(
        cls, module: torch.nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], *inputs: torch.Tensor
    ) -> Problem:
        """The Hessian of `loss(module(*inputs))` w.r.t. the module's trainable parameters.

        Rows and columns follow `module.parameters()` order (that of `parameters_to_vector`);
        the parameter names, shapes and offsets are stored with the result.
        """
        if not isinstance(module, torch.nn.Module):
            raise ProblemError(f"hessian_from_module needs a torch.nn.Module, but got {type(module).__name__}.")
        template = cls.from_module(module, inputs[0] if inputs else torch.zeros(()), wrt="params")
        info = template.param_info
        slots = trees.param_slots(module)

        def objective(flat: torch.Tensor) -> torch.Tensor:
            return loss(trees.functional_call(module, slots, unflatten(info, flat), inputs, {}))

        named = [p for _, p in module.named_parameters() if p.requires_grad]
        attributes = module_attributes([module])
        try:  # NOTE: [own backward] in raijac.guard: H is the derivative of this gradient
            compare_parameter_gradients(named, lambda: loss(module(*inputs)), objective, template.params)
        finally:
            restore_tensor_attributes(attributes)

        return cls.hessian(objective, template.params).replace(param_info=info, kind="hessian-params")

    # ------------------------------------------------------------------ shapes
    @property
    def primal(self) -> torch.Tensor:
        """The differentiated variable: `x`, or the flat parameter vector."""
        return self.params if self.params is not None else self.x

    @property
    def batch_size(self) -> int | None:
        return int(self.x.shape[0]) if self.batched else None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's differentiated variable (the Jacobian's columns)."""
        if self.wrt == "params":
            return (int(self.params.numel()),)
        return tuple(self.x.shape[1:] if self.batched else self.x.shape)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of one sample's output (the Jacobian's rows)."""
        y = self.y
        return tuple(y.shape[1:] if self.batched else y.shape)

    @property
    def n_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.output_shape)

    @property
    def jacobian_shape(self) -> tuple[int, ...]:
        mn = (self.n_out, self.n_in)
        return (self.batch_size, *mn) if self.batched else mn

    @property
    def dtype(self) -> torch.dtype:
        """The Jacobian's natural dtype: that of f's output."""
        return self.y.dtype

    # ------------------------------------------------------------------ evaluation
    def call(
        self, x: torch.Tensor | None, params: torch.Tensor | None = None, ctx: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """`f` at `x` (a stack of samples, or x itself) with the per-sample inputs `ctx` of those
        samples (default: all of them); for parameter problems the module at the flat `params`
        on its inputs `ctx` (x is then not used). For a function that draws random numbers,
        from the one fixed generator state that gave `y` (NOTE: [replay]), so every forward
        pass anywhere is the same function."""
        if not self.random:
            return self._forward(x, params, ctx)
        with replaying(self.x.device if x is None else x.device):
            return self._forward(x, params, ctx)

    def _forward(
        self, x: torch.Tensor | None, params: torch.Tensor | None = None, ctx: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        ctx = self.ctx if ctx is None else ctx
        if self.wrt == "params":
            return self.f(None, ctx, params=self.unflatten_params(params))
        return self.f(x) if ctx is None else self.f(x, ctx)

    def _one_sample(self, s: int) -> torch.Tensor:
        """f on sample s alone (its per-sample inputs with it)."""
        x, ctx = self._sample(s)
        return self._forward(None if self.wrt == "params" else x, self.params, ctx)

    def _sample(self, s: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Sample s of x and of the per-sample inputs, each keeping its batch dimension."""
        return self.x[s : s + 1], None if self.ctx is None else tuple(c[s : s + 1] for c in self.ctx)

    def unflatten_params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat parameter vector as a `{name: tensor}` dict (views, no copies).

        NOTE: [split] One `torch.split`, not a slice per tensor: a slice's backward writes
        its gradient into a full-length zero vector, so a VJP through L slices of a P-vector
        costs L x P (92% of a ResNet-18 row, 62 tensors x 11.2M); the split's backward is
        one concatenation, P.
        """
        return unflatten(self.param_info, flat)

    def _structured(self) -> torch.Tensor:
        """f at the problem's point as one tensor; a structured output (tuple, dict, dataclass)
        is flattened leaf by leaf, and where each leaf sits is kept in `out_leaves`."""
        params = None if self.params is None else self.unflatten_params(self.params)
        x = None if self.wrt == "params" else self.x
        if isinstance(self.f, trees.Flat):
            out = self.f.tree(x, self.ctx, params)
            lead = self.f.lead(x, self.ctx)
        else:
            out = self.f(self.x)
            lead = tuple(self.x.shape[:1]) if self.batched else ()
            if not isinstance(out, torch.Tensor) and isinstance(out, tuple | list | dict) or _is_dataclass(out):
                flat = trees.Flat(self.f, (self.x,), (0,), batched=self.batched)
                flat.flat_input()
                object.__setattr__(self, "f", flat)  # f's own structure, found now: flattened from now on
        if isinstance(out, torch.Tensor) or not (isinstance(out, tuple | list | dict) or _is_dataclass(out)):
            return out
        leaves, names = trees.output_leaves(out)
        for leaf, name in zip(leaves, names, strict=True):
            if leaf.shape[: len(lead)] != lead:
                raise ProblemError(
                    f"batched=True needs every output to hold one entry per sample, but {name} has shape "
                    f"{tuple(leaf.shape)} for B={lead[0]}; return per-sample outputs, or pass batched=False."
                )
        object.__setattr__(self, "out_leaves", trees.layout(names, [tuple(t.shape[len(lead) :]) for t in leaves]))
        return trees.concat(leaves, lead)

    @property
    def random(self) -> bool:
        """Whether f draws random numbers (found while evaluating `y`; NOTE: [replay])."""
        if "_random" not in self.__dict__:
            # First asked from inside a torch.func transform (`call` under jvp, say): y is the
            # problem's own evaluation, with its own autograd checks, so it runs outside them.
            from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

            with temporarily_clear_interpreter_stack():
                self.y  # noqa: B018 - evaluates f and sets _random
        return self.__dict__["_random"]

    # NOTE: [replay] A function that draws random numbers (dropout in training mode) is a
    # different function on every call: a Jacobian assembled from blocks that each run their
    # own forward pass would mix several draws, and match no y. So y is f(x) from one fixed
    # generator state (REPLAY_SEED), and `call` replays that state before every forward pass,
    # on every worker: J is then the Jacobian of that one function, as
    # `torch.manual_seed(REPLAY_SEED); torch.func.jacrev(f)(x)` gives it. Only modes that
    # run f once per forward pass, outside vmap, can keep to one draw (rev, loop); f that
    # differs between two calls from the same state cannot be replayed and is refused.
    # NOTE: [checked before] Evaluating y checks f twice over: a second call must agree with the
    # first (f is one fixed function), and a batched f must keep its samples apart (guard's
    # gradient check and one-sample passes). Both are properties of f's code and structure:
    # the module object, its training flags, the function's code and captures, the shapes,
    # dtypes and flags (the triage memo's key: NOTE: [triage memo] in raijac.memo). A loop
    # that computes per-sample gradients every step, or J at every Newton iterate, runs the
    # same f again and again: their second f(x), gradient check and one-sample passes cost
    # 0.24 s of a 1 s ResNet-18 run. So a run that checks every block (`reuse_checks`) skips
    # them where the same f passed them before in this process. The blocks' own checks are
    # the second line there: each compares its block with plain autograd of f on its samples
    # evaluated together, which a coupling of those samples or a second draw of random
    # numbers makes disagree.
    # NOTE: [y on the path differentiated] In eval mode under no_grad, nn.MultiheadAttention and
    # torch's transformer layers take an inference fast path, which returns 0 at key-padded
    # positions where their autograd path returns values: a TransformerEncoder's stored y was
    # 2.1 away from the function its J differentiates, and verify, evaluating f the same way,
    # passed. So y, and each no-grad call of f compared with it, runs with attention on its
    # differentiable path (`plain_attention`), as the modes do.
    @cached_property
    def y(self) -> torch.Tensor:
        """`f(x)`, checked: one floating-point tensor, per-sample when batched, the same on every call."""
        shipped = self.__dict__.get("_checked_by_driver")
        if shipped is not None and shipped.get("y") is not None:  # NOTE: [shipped checks]
            self.__dict__["_random"] = shipped["random"]
            self.__dict__["_freezable"] = shipped["freezable"]
            return shipped["y"]
        modules = modules_of(self)
        attributes = module_attributes(modules)
        versions = tensor_versions(modules)  # NOTE: [changed in place] in raijac.guard
        with evaluating(self.x.device):
            before = generator_states(self.x.device)
            y = self._evaluate()
            drew = not same_states(before, generator_states(self.x.device))
        check_no_kept_state(self, attributes)  # NOTE: [kept state] in raijac.guard
        if not isinstance(y, torch.Tensor):
            raise ProblemError(
                f"f must return tensors (one, or a tuple, list, dict or dataclass of them), but returned "
                f"{type(y).__name__}; return tensors, or pick them with outputs=... (a key or index)."
            )
        if y.is_complex() or not y.is_floating_point():
            raise ProblemError(
                f"raijac needs floating-point outputs, but f returned {y.dtype}; cast inside f (return y.float())."
            )
        if y.numel() == 0:
            raise ProblemError(
                f"f returned an empty tensor (shape {tuple(y.shape)}), so J has no rows and there is nothing to compute; "
                "return at least one output."
            )
        if shipped is not None:  # NOTE: [shipped checks] (a y too big to travel with the verdict)
            self.__dict__["_random"] = shipped["random"]
            self.__dict__["_freezable"] = shipped["freezable"]
            return y.detach()
        memo = None
        if self.__dict__.get("_reuse_checks"):  # NOTE: [checked before]
            memo = (tuple(y.shape[1:] if self.batched else y.shape), str(y.dtype), drew)
            kept = memo_get(self, CHECKS, memo)
            if kept is not None:
                self.__dict__["_checks_kept"] = True  # taken on trust: `recheck` runs them where a run fails
                self.__dict__["_random"] = drew
                self.__dict__["_reverse_wrong"] = kept.get("reverse_wrong")
                self.__dict__["_freezable"] = kept.get("freezable", False)
                return y.detach()
        with evaluating(self.x.device):
            again, freezable = self._evaluate_again(y)
        freezable = freezable and self._frozen_vjp_agrees()
        check_not_changed_in_place(versions, y, again)
        if not outputs_agree(y, again):
            cause = (
                "f draws random numbers, but two calls from the same torch generator state differ (a torch.Generator of "
                "its own, numpy or Python random?)"
                if drew
                else "f returned different outputs on two calls at the same x (random numbers from numpy or Python, "
                "or state kept between calls?)"
            )
            raise ProblemError(f"{cause}; raijac differentiates one fixed function: make f deterministic (module.eval()).")
        self.__dict__["_random"] = drew
        if self.batched:
            b = self.x.shape[0]
            if y.ndim == 0 or y.shape[0] != b:
                raise ProblemError(
                    f"batched=True needs f to map (B, ...) to (B, ...), but x has B={b} and f returned shape "
                    f"{tuple(y.shape)}; return one output per sample, or pass batched=False."
                )
            if drew:
                raise ProblemError(
                    "batched=True needs f to be deterministic, but f draws random numbers (dropout in training mode?), "
                    "and each block of samples would draw its own; call module.eval(), or pass batched=False."
                )
            check_independent_samples(self, y)
        if self.wrt == "params":
            check_parameters_are_read(self)  # NOTE: [own backward] in raijac.guard
        wrong = self.__dict__["_reverse_wrong"] = reverse_mode_error(self)  # NOTE: [adjoint test] in raijac.guard
        self.__dict__["_freezable"] = freezable
        if memo is not None:
            memo_put(self, CHECKS, memo, passed=True, reverse_wrong=wrong, freezable=freezable)
        return y.detach()

    def _evaluate_again(self, y: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """f a second time (the determinism check), first with the tensors it holds that
        require grad frozen: (its output, whether f is the same function so, and workers
        may hold them frozen: NOTE: [no outer graph] in raijac.guard)."""
        held = held_grad_leaves(self)
        if held:
            try:
                with grad_stopped(held):
                    again = self._evaluate()
                if outputs_agree(y, again):
                    return again, True
            except Exception:  # f differentiates them itself: it needs them to require grad
                pass
        return self._evaluate(), not held

    def _frozen_vjp_agrees(self) -> bool:
        """Whether one VJP of f w.r.t. x (sample 0 of a batched problem) is the same with the
        tensors f holds frozen: an f whose derivative, not value, depends on their flag (a
        frozen backbone run under `set_grad_enabled(any(p.requires_grad ...))`) gave the same
        y frozen and a J of zeros (NOTE: [no outer graph] in raijac.guard)."""
        held = held_grad_leaves(self)
        if not held:
            return True
        x, ctx = self._sample(0) if self.batched else (self.x, self.ctx)
        try:
            with_grad = self._vjp_at(x, ctx)
            with grad_stopped(held):
                frozen = self._vjp_at(x, ctx)
        except Exception:  # f needs them to require grad, or has no plain backward: keep them as they are
            return False
        return outputs_agree(with_grad, frozen)

    def probe_vjp(self) -> torch.Tensor:
        """u^T J w.r.t. x, flattened, for one fixed random u: one plain backward of f at x. A
        worker that built the problem from its spec compares it with the driver's (NOTE:
        [built apart] in raijac.worker): it sees weights drawn apart where y does not (y = 0
        at x = 0 for any weights)."""
        return self._vjp_at(self.x, self.ctx)

    def _vjp_at(self, x: torch.Tensor, ctx: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        z = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), replaying(z.device), plain_attention():
            out = self._forward(z, self.params, ctx)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return torch.zeros(z.numel(), dtype=z.dtype, device=z.device)
            gen = torch.Generator().manual_seed(PROBE_SEED)
            u = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
            (g,) = torch.autograd.grad(out, z, u, allow_unused=True)
        return (torch.zeros_like(z) if g is None else g).detach().reshape(-1)

    @property
    def freezable(self) -> bool:
        """Whether f gives the same y with the tensors it holds not requiring grad, found
        while evaluating `y` (NOTE: [no outer graph] in raijac.guard)."""
        self.y  # noqa: B018 - evaluates f and runs its checks
        return bool(self.__dict__.get("_freezable", False))

    @property
    def reverse_mode_error(self) -> WrongReverse | None:
        """Why torch's reverse-mode derivative of f is wrong at x, found while evaluating `y`
        (NOTE: [adjoint test] in raijac.guard); None where it agrees with forward mode."""
        self.y  # noqa: B018 - evaluates f and runs its checks
        return self.__dict__.get("_reverse_wrong")

    def recheck(self) -> None:
        """Run f's own checks again, on a fresh copy, where this problem took them from an
        earlier run (NOTE: [checked before]); raises what they find. A run that then finds no
        mode agreeing with plain autograd calls it: an f changed since (a flag that couples
        the samples) is named as such, not as every mode's wrong numbers."""
        if not self.__dict__.get("_checks_kept"):
            return
        fresh = self.replace()
        fresh.__dict__.pop("_reuse_checks", None)
        fresh.y  # noqa: B018 - evaluates f and runs its checks

    def reuse_checks(self) -> None:
        """Let `y` skip the checks this f passed in an earlier run of this process
        (NOTE: [checked before]); only for runs that check every block."""
        self.__dict__["_reuse_checks"] = True

    def _evaluate(self) -> torch.Tensor:
        try:
            return self._structured()
        except ProblemError:
            raise
        except Exception as exc:  # the user's function: show its own message
            if trees.LOSS_NOTE in getattr(exc, "__notes__", ()) and isinstance(self.f, trees.Flat):
                raise ProblemError(
                    f"the loss raised {type(exc).__name__} on f's output and the targets ({self.f.targets_shown}): "
                    f"{first_line(exc)}; pass targets as the loss takes them (F.cross_entropy: int64 class indices "
                    "in [0, C), one per sample)."
                ) from exc
            raise ProblemError(
                f"f raised {type(exc).__name__} on x of shape {tuple(self.x.shape)}: {first_line(exc)}; "
                "fix f or pass x of the shape it expects."
            ) from exc

    @property
    def constants(self) -> tuple[torch.Tensor, ...]:
        """The tensor inputs f gets whole that are not differentiated: an unbatched problem's
        other inputs, a batched one's `shared` ones (part of the fingerprint, as x is)."""
        return self.f.constants if isinstance(self.f, trees.Flat) else ()

    def fingerprint(self, *, mode: str = "auto", dtype: str | None = None) -> str:
        """Hash of everything that fixes the stored Jacobian: spec, flags, shapes, x, parameters,
        the other inputs."""
        h = hashlib.sha256()
        head = {
            "spec": spec_key(self.spec),
            "kind": self.kind,
            "batched": self.batched,
            "batch_aware": self.batch_aware,
            "wrt": self.wrt,
            "x": [list(self.x.shape), str(self.x.dtype)],
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "dtype": str(self.dtype),
            "store_dtype": dtype,
            "mode": mode,
            "params": [[i.name, list(i.shape)] for i in self.param_info],
            "in_leaves": [[i.name, list(i.shape)] for i in self.in_leaves],
            "out_leaves": [[i.name, list(i.shape)] for i in self.out_leaves],
            "ctx": [[list(t.shape), str(t.dtype)] for t in self.ctx or ()],
        }
        if getattr(self, "sparsity", None) is not None:  # the pattern itself is checked apart (cheap workers)
            head["sparse"] = True
        if self.random:
            head["random"] = {"replayed": True, "seed": REPLAY_SEED}
        h.update(json.dumps(head, sort_keys=True).encode())
        for t in (self.x, self.params, *(self.ctx or ()), *self.constants):
            if t is not None:
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(
                f"a Problem is a frozen description of what to differentiate; make a changed copy with "
                f"problem.replace({name}=...) instead of setting {name}."
            )
        object.__setattr__(self, name, value)

    def replace(self, **changes: object) -> Problem:
        """A copy with some fields changed (a new point x, other parameters, a spec), evaluated
        afresh: what was found by evaluating f (y, randomness) is not carried over."""
        unknown = sorted(set(changes) - set(self.__dict__))
        if unknown:
            raise ProblemError(f"Problem has no field {unknown[0]!r}; fields: {', '.join(sorted(self.__getstate__()))}.")
        copy = object.__new__(type(self))
        copy.__setstate__({**self.__getstate__(), **changes})
        return copy

    def __repr__(self) -> str:
        return f"Problem(spec={self.spec!r}, batched={self.batched}, wrt={self.wrt!r}, x={tuple(self.x.shape)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("y", None)  # evaluated where it is used (a worker gets the driver's with its verdict: __reduce_ex__)
        state.pop("_random", None)  # found again with y
        state.pop("_freezable", None)  # likewise
        state.pop("_checks_kept", None)  # likewise
        state.pop("_frozen", None)  # set again by __setstate__
        state.pop("_checked_by_driver", None)
        return state

    def __reduce_ex__(self, protocol: int):
        """Pickled (shipped to workers) with the verdict of y's checks, if they ran here.

        NOTE: [shipped checks] A pickled copy of a problem the driver checked need not repeat
        the checks that call f again: determinism and sample independence (0.6 s per worker
        for ResNet-18 on 8 images); nor evaluate y again (0.03-0.07 s of a worker's load of a
        small CNN or a ResNet-18 on 8 images), when y is small enough to travel with the
        verdict (f's structure, found with y, is in the pickle already: `out_leaves`, a
        flattened f). `replace` starts from __getstate__, so a changed problem is checked afresh.
        """
        state = self.__getstate__()
        if "y" in self.__dict__:
            y = self.__dict__["y"]
            small = y.numel() * y.element_size() <= SHIPPED_Y_BYTES
            state["_checked_by_driver"] = {
                "random": bool(self.__dict__.get("_random", False)),
                "freezable": bool(self.__dict__.get("_freezable", False)),
                "y": y.detach() if small and y.device.type == "cpu" else None,
            }
        return (_unpickle_problem, (type(self), state))

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__["_frozen"] = True


PROBE_SEED = 1234  # the cotangent of `Problem.probe_vjp`, the same in every process
SHIPPED_Y_BYTES = 64 << 20  # a larger y is evaluated again where it is unpickled (NOTE: [shipped checks])


def _unpickle_problem(cls: type, state: dict) -> Problem:
    problem = object.__new__(cls)
    problem.__setstate__(state)
    return problem


def _argnums(argnums: object, n_args: int, kwargs: dict | None) -> tuple[int | str, ...]:
    """The differentiated inputs: positions of `args` (as in torch.func) and keys of `kwargs`."""
    nums = (argnums,) if isinstance(argnums, int | str) else tuple(argnums) if isinstance(argnums, tuple | list) else None
    keys = set(kwargs or ())

    def known(i: object) -> bool:
        if isinstance(i, str):
            return i in keys
        return isinstance(i, int) and not isinstance(i, bool) and -n_args <= i < n_args

    if not nums or not all(known(i) for i in nums):
        named = f"the {n_args} positional inputs" + (f" or the keyword inputs {', '.join(map(repr, keys))}" if keys else "")
        raise ProblemError(
            f"argnums={argnums!r} must name inputs among {named} (an int or keyword, or a tuple of them; torch.func takes ints)."
        )
    return tuple(dict.fromkeys(i % n_args if isinstance(i, int) else i for i in nums))


def _normal_argnums(argnums: int | str | Sequence[int | str], n_args: int) -> int | str | tuple[int | str, ...]:
    """argnums as given, positions made non-negative (the reader's jacrev structure follows it)."""
    if isinstance(argnums, int | str):
        return argnums % n_args if isinstance(argnums, int) else argnums
    return tuple(i % n_args if isinstance(i, int) else i for i in argnums)


def _check_samples(
    ctx: tuple[torch.Tensor, ...] | None, batch: int | None, names: Sequence[str], keys: Sequence[str | int | None]
) -> None:
    """Per-sample inputs must hold as many samples as x; `names` and `keys` (the `shared`
    entry that would pass each whole, None for targets) say which one does not."""
    if batch is None:
        return
    for t, name, key in zip(ctx or (), names, keys, strict=True):
        if t.ndim == 0 or t.shape[0] != batch:
            if key is None:
                raise ProblemError(
                    f"batched=True needs the targets to hold one entry per sample, B={batch}, along their first "
                    f"dimension, but {name} has shape {tuple(t.shape)}; pass the labels of these B samples."
                )
            raise ProblemError(
                f"batched=True needs every input tensor not differentiated to hold B={batch} samples along its first "
                f"dimension, but {name} has shape {tuple(t.shape)}; if it is the same for every sample (a mask), pass "
                f"shared=({key!r},), or close over it inside f."
            )


def _is_dataclass(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _check_input(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ProblemError(f"{name} must be a torch.Tensor, but got {type(x).__name__}; wrap it with torch.as_tensor.")
    if not x.is_complex() and not x.is_floating_point():
        raise ProblemError(
            f"raijac differentiates floating-point inputs, but {name} has dtype {x.dtype}, which has no derivative "
            "(token ids? differentiate the parameters with from_module(..., wrt='params'), or the embeddings: "
            f"kwargs={{'inputs_embeds': e}}, argnums='inputs_embeds'); pass {name}.float() if it holds real values."
        )
    if x.is_complex():
        raise ProblemError(
            f"raijac differentiates floating-point inputs, but {name} has dtype {x.dtype}; "
            f"pass {name}.float() or {name}.double() (complex inputs: split real and imaginary parts)."
        )
    if x.numel() == 0:
        raise ProblemError(
            f"{name} is empty (shape {tuple(x.shape)}), so J has no columns and there is nothing to compute; "
            "pass a point with at least one element."
        )


def _short_repr(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------- specs
def load_problem(spec: str, *, device: torch.device | str | None = None) -> Problem:
    """Build the problem a spec names: `path/to/file.py:NAME` or `package.module:NAME`.

    NAME is a `Problem` or a zero-argument callable returning one (a `device` keyword
    is passed when the callable accepts it, so GPU workers can build on their device).
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ProblemError(f"spec {spec!r} must look like path/to/file.py:NAME or package.module:NAME.")
    with one_thread():
        obj = _build(spec, target, name, device)
    if not isinstance(obj, Problem):
        raise ProblemError(
            f"{spec} must name a raijac.Problem or a zero-argument function returning one, but it gives {type(obj).__name__} {_short_repr(obj)}."
        )
    return obj.replace(spec=normalize_spec(spec))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op torch thread, then give the thread count back.

    NOTE: [one-thread build] The driver (every core) and each worker (its share of them)
    build a spec's tensors, and the fingerprint needs them bit for bit the same: a parallel
    reduction rounds by how many threads split it (a float32 sum of 10^6 draws differs in its
    7th digit between 1 and 2 threads), and torch 2.13's first parallel float64 `sin` in a
    process came out up to 7e-9 off on its second thread in 1 run of 20 here. Built on one
    thread everywhere, the tensors agree; f itself still runs on the process's threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _build(spec: str, target: str, name: str, device: torch.device | str | None) -> object:
    module = import_spec_module(target, spec)
    if not hasattr(module, name):
        names = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ProblemError(f"{target} has no name {name!r}; it defines: {', '.join(names) or 'nothing public'}.")
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, Problem):
        kwargs = {}
        try:
            if device is not None and "device" in inspect.signature(obj).parameters:
                kwargs["device"] = device
        except (TypeError, ValueError):
            pass
        try:
            obj = obj(**kwargs)
        except ProblemError:
            raise  # already says what is wrong with the problem it tried to build
        except Exception as exc:
            raise ProblemError(f"calling {name}() from {target} raised {type(exc).__name__}: {first_line(exc)}.") from exc
    return obj
