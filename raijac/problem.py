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
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from raijac import trees
from raijac.errors import ProblemError

Wrt = Literal["input", "params"]


@dataclass(frozen=True)
class ParamInfo:
    """One trainable parameter's place among the Jacobian's columns."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def unflatten(info: Sequence[ParamInfo], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat parameter vector as `{name: view}` (see NOTE: [split] in Problem.unflatten_params)."""
    parts = torch.split(flat, [i.size for i in info])
    return {i.name: part.view(i.shape) for i, part in zip(info, parts, strict=True)}


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
        argnums: which of `args` to differentiate (an int or a tuple), as in torch.func.
        has_aux: f returns `(output, aux)`; aux is not differentiated.
        outputs: a key or index (or a list of them) choosing what of f's output to
            differentiate (`outputs="logits"`).
        kwargs: keyword arguments for f, not differentiated.
        loss: differentiate `loss(output, *targets)` instead of f's output: with
            `batched=True` sample by sample, so `loss=F.cross_entropy` and the labels as
            `targets` give per-sample losses (their parameter Jacobian: per-sample gradients).
        targets: a tensor or a tuple of them for `loss` (per-sample when batched).
        batched: every input tensor holds independent samples along its leading dimension
            and f maps them sample by sample; the result is the per-sample Jacobians
            `(B, M, N)`. Inputs not differentiated (labels, masks) travel with their samples.
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
        argnums: int | tuple[int, ...] = 0,
        has_aux: bool = False,
        outputs: trees.Select = None,
        kwargs: dict[str, object] | None = None,
        loss: Callable[..., torch.Tensor] | None = None,
        targets: object = None,
        batched: bool = False,
        batch_aware: bool = False,
        sparsity: object = None,
    ) -> None:
        if not callable(f):
            raise ProblemError(f"f must be callable, but got {type(f).__name__}; pass the function itself.")
        if not args:
            raise ProblemError("Problem needs the point to differentiate at: Problem(f, x) or Problem(f, *args, argnums=...).")
        nums = _argnums(argnums, len(args))
        self.ctx: tuple[torch.Tensor, ...] | None = None
        self.in_leaves: tuple[trees.Leaf, ...] = ()
        plain = not (has_aux or outputs is not None or kwargs or loss is not None or targets is not None)
        if len(args) == 1 and nums == (0,) and isinstance(args[0], torch.Tensor) and plain:
            x = args[0]
            _check_input(x, "x")
        else:
            flat = trees.Flat(
                f, args, nums, kwargs=kwargs, has_aux=has_aux, outputs=outputs, batched=batched, loss=loss, targets=targets
            )
            x = flat.flat_input()
            _check_input(x, "the differentiated input" if len(flat.x_leaves) == 1 else "the differentiated inputs")
            if len(flat.x_leaves) > 1 or flat.x_leaves[0].name != "args[0]":
                self.in_leaves = flat.x_leaves
            self.ctx = flat.context()
            f = flat
        if batched and x.ndim == 0:
            raise ProblemError(
                "batched=True needs x with a leading batch dimension, but x is a scalar; pass x of shape (B, ...)."
            )
        _check_samples(self.ctx, x.shape[0] if batched else None)
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
        argnums: int | tuple[int, ...] = 0,
        batched: bool = False,
    ) -> Problem:
        """The Jacobian of `module(*args, **kwargs)` w.r.t. its trainable parameters or its inputs.

        With `wrt="params"` the columns are all parameters with `requires_grad`, flattened
        in `module.parameters()` order; `batched=True` gives per-sample parameter
        Jacobians (the NTK / Fisher case), and the inputs may be any tensors (token ids,
        attention masks: each travels with its samples). With `wrt="input"`, `argnums`
        picks the inputs to differentiate. `outputs` picks what of the module's output to
        differentiate (`outputs="logits"` for a Hugging Face model's `ModelOutput`).
        `loss` and `targets` differentiate a loss of that output instead; with
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
            )
            problem.kind = "module"
            return problem
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
            module, args, (), kwargs=kwargs, outputs=outputs, batched=batched, of_params=True, loss=loss, targets=targets
        )
        ctx = caller.context()
        if not ctx:
            raise ProblemError("from_module needs the module's inputs: from_module(module, x, ...) with at least one tensor.")
        if batched and ctx[0].ndim == 0:
            raise ProblemError(
                "batched=True needs x with a leading batch dimension, but x is a scalar; pass x of shape (B, ...)."
            )
        _check_samples(ctx, ctx[0].shape[0] if batched else None)
        problem = object.__new__(cls)
        problem.__dict__.update(
            f=caller,
            x=ctx[0],  # the first input tensor: stored, and the batch size
            ctx=ctx,
            in_leaves=(),
            out_leaves=(),
            batched=bool(batched),
            batch_aware=bool(batched),
            wrt="params",
            module=module,
            params=torch.cat([p.detach().reshape(-1) for _, p in named]),
            param_info=tuple(infos),
            spec=None,
            kind="module",
            sparsity=None,
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
                raise ProblemError(f"f raised {type(exc).__name__} on x of shape {tuple(x.shape)}: {_first_line(exc)}.") from exc
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
        problem = cls(grad, x, batched=batched, batch_aware=batched, sparsity=sparsity)
        problem.kind = "hessian"
        return problem

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

        def objective(flat: torch.Tensor) -> torch.Tensor:
            return loss(torch.func.functional_call(module, unflatten(info, flat), inputs))

        problem = cls.hessian(objective, template.params)
        problem.param_info = info
        problem.kind = "hessian-params"
        return problem

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
        on its inputs `ctx` (x is then not used)."""
        ctx = self.ctx if ctx is None else ctx
        if self.wrt == "params":
            return self.f(None, ctx, params=self.unflatten_params(params))
        return self.f(x) if ctx is None else self.f(x, ctx)

    def unflatten_params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat parameter vector as a `{name: tensor}` dict (views, no copies).

        NOTE: [split] One `torch.split`, not a slice per tensor: a slice's backward writes
        its gradient into a full-length zero vector, so a VJP through L slices of a P-vector
        costs L x P (92% of a ResNet-18 row, 62 tensors x 11.2M); the split's backward is
        one concatenation, P.
        """
        return unflatten(self.param_info, flat)

    def _evaluate(self) -> torch.Tensor:
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
                self.f = trees.Flat(self.f, (self.x,), (0,), batched=self.batched)  # flattens it from now on
                self.f.flat_input()
        if isinstance(out, torch.Tensor) or not (isinstance(out, tuple | list | dict) or _is_dataclass(out)):
            return out
        leaves, names = trees.output_leaves(out)
        for leaf, name in zip(leaves, names, strict=True):
            if leaf.shape[: len(lead)] != lead:
                raise ProblemError(
                    f"batched=True needs every output to hold one entry per sample, but {name} has shape "
                    f"{tuple(leaf.shape)} for B={lead[0]}; return per-sample outputs, or pass batched=False."
                )
        self.out_leaves = trees.layout(names, [tuple(t.shape[len(lead) :]) for t in leaves])
        return trees.concat(leaves, lead)

    @cached_property
    def y(self) -> torch.Tensor:
        """`f(x)`, checked: one floating-point tensor, per-sample when batched."""
        try:
            with torch.no_grad():
                y = self._evaluate()
        except ProblemError:
            raise
        except Exception as exc:  # the user's function: show its own message
            raise ProblemError(
                f"f raised {type(exc).__name__} on x of shape {tuple(self.x.shape)}: {_first_line(exc)}; "
                "fix f or pass x of the shape it expects."
            ) from exc
        if not isinstance(y, torch.Tensor):
            raise ProblemError(
                f"f must return tensors (one, or a tuple, list, dict or dataclass of them), but returned "
                f"{type(y).__name__}; return tensors, or pick them with outputs=... (a key or index)."
            )
        if y.is_complex() or not y.is_floating_point():
            raise ProblemError(
                f"raijac needs floating-point outputs, but f returned {y.dtype}; cast inside f (return y.float())."
            )
        if self.batched:
            b = self.x.shape[0]
            if y.ndim == 0 or y.shape[0] != b:
                raise ProblemError(
                    f"batched=True needs f to map (B, ...) to (B, ...), but x has B={b} and f returned shape "
                    f"{tuple(y.shape)}; return one output per sample, or pass batched=False."
                )
            self._check_per_sample()
        return y.detach()

    def _check_per_sample(self) -> None:
        """Refuse batched functions whose output sample 0 depends on other samples."""
        if self.x.shape[0] < 2 or not self.x.is_floating_point():
            return
        x = self.x.clone().requires_grad_(True)
        with torch.enable_grad():
            y = self.call(None, self.params, (x, *self.ctx[1:])) if self.wrt == "params" else self.call(x, self.params)
            if not y.requires_grad:
                return
            w = torch.randn(y[0].shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype).to(y.device)
            (g,) = torch.autograd.grad((y[0] * w).sum(), x, allow_unused=True)
        if g is not None and bool(g[1:].abs().max() > 0):
            raise ProblemError(
                "batched=True needs f to treat samples independently, but output sample 0 depends on other input "
                "samples (batch norm in training mode, or a mean over the batch?); call module.eval(), or pass batched=False."
            )

    # ------------------------------------------------------------------ identity
    def fingerprint(self, *, mode: str = "auto", dtype: str | None = None) -> str:
        """Hash of everything that fixes the stored Jacobian: spec, flags, shapes, x, parameters."""
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
        h.update(json.dumps(head, sort_keys=True).encode())
        for t in (self.x, self.params, *(self.ctx or ())):
            if t is not None:
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    def __repr__(self) -> str:
        return f"Problem(spec={self.spec!r}, batched={self.batched}, wrt={self.wrt!r}, x={tuple(self.x.shape)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("y", None)  # recomputed where it is used; never shipped
        return state


def _argnums(argnums: object, n_args: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums) if isinstance(argnums, tuple | list) else None
    if not nums or any(not isinstance(i, int) or not -n_args <= i < n_args for i in nums):
        raise ProblemError(
            f"argnums={argnums!r} must name inputs among the {n_args} given (an int or a tuple of ints, as in torch.func)."
        )
    return tuple(sorted({i % n_args for i in nums}))


def _check_samples(ctx: tuple[torch.Tensor, ...] | None, batch: int | None) -> None:
    """Per-sample inputs must hold as many samples as x."""
    if batch is None:
        return
    for t in ctx or ():
        if t.ndim == 0 or t.shape[0] != batch:
            raise ProblemError(
                f"batched=True needs every input tensor to hold B={batch} samples along its first dimension, but one has "
                f"shape {tuple(t.shape)}; close over tensors shared by all samples inside f instead."
            )


def _is_dataclass(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _check_input(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ProblemError(f"{name} must be a torch.Tensor, but got {type(x).__name__}; wrap it with torch.as_tensor.")
    if x.is_complex() or not x.is_floating_point():
        raise ProblemError(
            f"raijac differentiates floating-point inputs, but {name} has dtype {x.dtype}; "
            f"pass {name}.float() or {name}.double() (complex inputs: split real and imaginary parts)."
        )


def _short_repr(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 40 else text[:37] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


# ---------------------------------------------------------------------- specs
def load_problem(spec: str, *, device: torch.device | str | None = None) -> Problem:
    """Build the problem a spec names: `path/to/file.py:NAME` or `package.module:NAME`.

    NAME is a `Problem` or a zero-argument callable returning one (a `device` keyword
    is passed when the callable accepts it, so GPU workers can build on their device).
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ProblemError(f"spec {spec!r} must look like path/to/file.py:NAME or package.module:NAME.")
    module = _import_spec_module(target, spec)
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
            raise ProblemError(f"calling {name}() from {target} raised {type(exc).__name__}: {_first_line(exc)}.") from exc
    if not isinstance(obj, Problem):
        raise ProblemError(
            f"{spec} must name a raijac.Problem or a zero-argument function returning one, but it gives {type(obj).__name__} {_short_repr(obj)}."
        )
    obj.spec = normalize_spec(spec)
    return obj


def spec_key(spec: str | None) -> str | None:
    """What names a spec wherever it is loaded: `file_stem:NAME` or `package.module:NAME`.

    A spec file shipped to cluster workers is imported there as a module of the same stem,
    so the fingerprint must not depend on the folder it was found in.
    """
    if spec is None:
        return None
    target, _, name = spec.rpartition(":")
    return f"{os.path.splitext(os.path.basename(target))[0]}:{name}" if _is_path(target) else spec


def normalize_spec(spec: str) -> str:
    """The spec with a file path made absolute, so workers in other directories find it."""
    target, _, name = spec.rpartition(":")
    if _is_path(target):
        return f"{os.path.abspath(target)}:{name}"
    return spec


def _is_path(target: str) -> bool:
    return target.endswith(".py") or os.sep in target or "/" in target


def _import_spec_module(target: str, spec: str):
    if _is_path(target):
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
            raise ProblemError(f"importing {target} raised {type(exc).__name__}: {_first_line(exc)}.") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise ProblemError(f"cannot import module {target!r} from spec {spec!r}: {exc}; check the name or install it.") from exc
    except Exception as exc:
        raise ProblemError(f"importing {target} raised {type(exc).__name__}: {_first_line(exc)}.") from exc
