"""trees: pytrees in and out of f as one flat x and one flat y (torch only; used by problem).

`torch.func.jacrev(f, argnums=(0, 1))(a, {"w": w})` differentiates several inputs, each a
pytree of tensors, and f may return a tuple, a dict or a dataclass. raijac stores one flat
`(M, N)` (or `(B, M, N)`) Jacobian, so `Flat` wraps such an f as a function of one flat
tensor: the differentiated leaves are the columns one after the other (C order within each
leaf), the chosen output leaves the rows. `Leaf` records where each one sits, so a reader
can cut J back into the structure `jacrev` returns.

Inputs that are not differentiated are constants of `Flat` in unbatched problems; in
batched ones their tensors are per-sample data (labels, masks, token ids: leading dimension
B, as `vmap`'s default `in_dims=0`) that travel with their samples as the kernels' context,
except those named in `shared` (a causal mask, a position table: `in_dims=None`), which
every sample gets whole.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from raijac.errors import ProblemError

Select = str | int | Sequence[str | int] | Callable[[Any], Any] | None
LOSS_NOTE = "raijac: raised by the loss"  # noted on what `loss` raises (Flat._loss)


@dataclass(frozen=True)
class Leaf:
    """One input or output leaf's place in the flat vector (per sample)."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset}


def layout(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> tuple[Leaf, ...]:
    """Consecutive leaves with these names and per-sample shapes."""
    leaves, offset = [], 0
    for name, shape in zip(names, shapes, strict=True):
        leaves.append(Leaf(name, tuple(int(s) for s in shape), offset))
        offset += math.prod(shape)
    return tuple(leaves)


def flatten(tree: Any, prefix: str) -> tuple[list[Any], list[str], pytree.TreeSpec]:
    """The leaves of `tree`, their names (`prefix` + key path) and the spec to rebuild it."""
    with_path, spec = pytree.tree_flatten_with_path(tree)
    return [v for _, v in with_path], [prefix + pytree.keystr(k) for k, _ in with_path], spec


def select(out: Any, outputs: Select) -> Any:
    """The outputs picked by key or index (`outputs="logits"`, `outputs=0`, or a list of them),
    or by a function of the output (`outputs=lambda out: out.logits[:, -1]`)."""
    if outputs is None:
        return out
    if callable(outputs):
        return outputs(out)
    if isinstance(outputs, str | int):
        return _pick(out, outputs)
    return tuple(_pick(out, key) for key in outputs)


def _pick(out: Any, key: str | int) -> Any:
    try:
        if isinstance(key, int):
            return out[key]
        if isinstance(out, Mapping):
            return out[key]
        return getattr(out, key)
    except (KeyError, IndexError, AttributeError, TypeError):
        have = list(out.keys()) if isinstance(out, Mapping) else _field_names(out)
        raise ProblemError(
            f"outputs={key!r} names nothing f returned ({type(out).__name__}"
            + (f" with keys {have}" if have else "")
            + ("); pick one of those keys." if have else "); pick an index of what it returned.")
        ) from None


def _field_names(out: Any) -> list[str]:
    if dataclasses.is_dataclass(out):
        return [f.name for f in dataclasses.fields(out)]
    return []


def as_tree(out: Any) -> Any:
    """`out` with unregistered dataclasses turned into dicts of their non-None fields, so
    their tensors become leaves (a registered type, `ModelOutput` say, is left to pytree)."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type) and type(out) not in pytree.SUPPORTED_NODES:
        return {f.name: as_tree(getattr(out, f.name)) for f in dataclasses.fields(out) if getattr(out, f.name) is not None}
    if isinstance(out, tuple | list):
        return type(out)(as_tree(v) for v in out) if not hasattr(out, "_fields") else out
    if isinstance(out, dict):
        return {k: as_tree(v) for k, v in out.items()}
    return out


def output_leaves(out: Any) -> tuple[list[torch.Tensor], list[str]]:
    """The tensor leaves of f's chosen output, with names; None leaves are dropped, any other
    non-tensor is an error (raijac differentiates tensors)."""
    leaves, names, _ = flatten(as_tree(out), "y")
    kept = [(v, n) for v, n in zip(leaves, names, strict=True) if v is not None]
    for v, n in kept:
        if not isinstance(v, torch.Tensor):
            raise ProblemError(
                f"f returned a {type(v).__name__} at {n}; raijac differentiates tensor outputs: choose the tensors with "
                "outputs=... (a key or index), or return only tensors."
            )
    if not kept:
        raise ProblemError("f returned no tensor; return the outputs to differentiate (a tensor, or a tuple/dict of them).")
    return [v for v, _ in kept], [n for _, n in kept]


class Flat(torch.nn.Module):
    """f of several (pytree) inputs, returning a pytree, as `x -> y` of flat tensors.

    `forward(x, ctx)`: x is `(*lead, N)` (lead: the samples, or stacked copies, or nothing),
    ctx the per-sample tensors of the inputs not differentiated (batched problems) or None.
    Returns `(*lead, M)`. A module f is a submodule, so `.to(device)` moves it and the
    constant inputs (buffers) alike.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        argnums: tuple[int | str, ...],
        *,
        kwargs: dict[str, Any] | None = None,
        has_aux: bool = False,
        outputs: Select = None,
        batched: bool = False,
        of_params: bool = False,
        loss: Callable[..., torch.Tensor] | None = None,
        targets: Any = None,
        shared: Sequence[str | int] = (),
    ) -> None:
        super().__init__()
        self.fn = fn  # an nn.Module is registered as a submodule here
        self.slots = param_slots(fn) if of_params else {}  # NOTE: [slots]
        self.has_aux, self.outputs, self.batched, self.of_params = has_aux, outputs, batched, of_params
        self.loss = loss
        targets = () if targets is None else targets if isinstance(targets, tuple) else (targets,)
        if loss is None and targets:
            raise ProblemError("targets are inputs of a loss: pass loss=... with them, or pass them to f as inputs.")
        kwargs = dict(kwargs or {})
        whole = _shared_inputs(shared, len(args), kwargs, () if of_params else argnums)
        self.targets_shown = _describe(targets, "targets")  # for the errors of a loss
        leaves, names, self.spec = flatten((tuple(args), kwargs, targets), "")
        tops = _top_inputs((tuple(args), kwargs, targets))
        self.names = [_arg_name(n) for n in names]
        self.roles: list[str] = []  # per leaf: "x" (differentiated), "ctx" (per-sample), "const", "value"
        self.values: list[Any] = []  # non-tensor leaves, kept as they are
        x_names, x_shapes, self.x_parts, self.ctx_parts = [], [], [], []
        self.ctx_names: list[str] = []  # the per-sample leaves' names, for errors about their shapes
        self.ctx_keys: list[str | int | None] = []  # and the `shared` entry that would pass each whole
        for leaf, raw, name, top in zip(leaves, names, self.names, tops, strict=True):
            if not of_params and (_arg_index(raw) in argnums or (isinstance(top, str) and top in argnums)):
                role = "x"
                x_names.append(name)
                x_shapes.append(_per_sample_shape(leaf, name, batched))
                self.x_parts.append(leaf)
            elif isinstance(leaf, torch.Tensor) and (batched or of_params) and top not in whole:
                role = "ctx"
                _per_sample_shape(leaf, name, batched, shareable=top)
                self.ctx_parts.append(leaf.detach())
                self.ctx_names.append(name)
                self.ctx_keys.append(top)
            elif isinstance(leaf, torch.Tensor):
                role = "const"
                self.register_buffer(f"const{len(self.roles)}", leaf.detach(), persistent=False)
            else:
                role = "value"
            self.roles.append(role)
            self.values.append(leaf if role == "value" else None)
        if not self.x_parts and not of_params:
            raise ProblemError(f"argnums={argnums} selects no input tensors; pick the positions of the inputs to differentiate.")
        self.x_leaves = layout(x_names, x_shapes)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # the spec ships as the structure with 0 for every leaf
        state["spec"] = pytree.tree_unflatten([0] * self.spec.num_leaves, self.spec)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["spec"] = pytree.tree_flatten(state["spec"])[1]
        self.__dict__.update(state)

    @property
    def constants(self) -> tuple[torch.Tensor, ...]:
        """The tensor inputs every call gets whole: this module's own buffers alone (a module
        f's buffers are its business)."""
        return tuple(self._buffers.values())

    def flat_input(self) -> torch.Tensor:
        """The differentiated leaves as one flat `(B, N)` (batched) or `(N,)` tensor; dropped
        from the module afterwards (the Problem holds x)."""
        parts, self.x_parts = self.x_parts, []
        dtypes = {p.dtype for p in parts}
        if len(dtypes) > 1:
            raise ProblemError(
                f"the differentiated inputs mix dtypes {sorted(str(d) for d in dtypes)}; cast them to one floating dtype."
            )
        if len(parts) == 1:  # one differentiated tensor keeps its shape
            return parts[0].detach()
        if self.batched:
            names = [leaf.name for leaf in self.x_leaves]
            for name, part in zip(names[1:], parts[1:], strict=True):
                if part.shape[0] != parts[0].shape[0]:
                    raise ProblemError(
                        f"batched=True needs every differentiated input to hold the same samples along its first "
                        f"dimension, but {names[0]} has {parts[0].shape[0]} and {name} has {part.shape[0]}; close over "
                        "tensors shared by all samples inside f instead."
                    )
        return concat([p.detach() for p in parts], lead=parts[0].shape[:1] if self.batched else ())

    def context(self) -> tuple[torch.Tensor, ...] | None:
        """The per-sample tensors of the inputs not differentiated (batched problems), or None."""
        parts, self.ctx_parts = tuple(self.ctx_parts), []
        return parts or None

    def forward(
        self, x: torch.Tensor | None, ctx: tuple[torch.Tensor, ...] | None = None, params: dict | None = None
    ) -> torch.Tensor:
        """f at the flat x (or, for a module's parameters, at `params` with inputs ctx) as one
        tensor: a single tensor output as f returned it, a structure as `(*lead, M)`."""
        out = self.tree(x, ctx, params)
        if isinstance(out, torch.Tensor):
            return out
        return concat(output_leaves(out)[0], lead=self.lead(x, ctx))

    def lead(self, x: torch.Tensor | None, ctx: tuple[torch.Tensor, ...] | None) -> tuple[int, ...]:
        """The leading dimensions every output leaf has: the samples or stacked copies."""
        if x is not None:
            return self._x_lead(x)
        return (int(ctx[0].shape[0]),) if self.batched and ctx else ()

    def _x_lead(self, x: torch.Tensor) -> tuple[int, ...]:
        if len(self.x_leaves) == 1:
            return tuple(x.shape[: x.ndim - len(self.x_leaves[0].shape)])
        return tuple(x.shape[:-1])

    def tree(self, x: torch.Tensor | None, ctx: tuple[torch.Tensor, ...] | None = None, params: dict | None = None) -> Any:
        """f's chosen output as it returned it (after `has_aux` and `outputs`)."""
        if x is None:
            parts = iter(())
        elif len(self.x_leaves) == 1:
            parts = iter([x])
        else:
            parts = iter(split(x, self.x_leaves, x.shape[:-1]))
        extra = iter(ctx or ())
        consts = iter(self.constants)
        leaves = []
        for role, value in zip(self.roles, self.values, strict=True):
            if role == "x":
                leaves.append(next(parts))
            elif role == "ctx":
                leaves.append(next(extra))
            elif role == "const":
                leaves.append(next(consts))
            else:
                leaves.append(value)
        args, kwargs, targets = pytree.tree_unflatten(leaves, self.spec)
        if params is not None:
            out = functional_call(self.fn, self.slots, params, tuple(args), kwargs)
        else:
            out = self.fn(*args, **kwargs)
        if self.has_aux:
            if not isinstance(out, tuple | list) or len(out) != 2:
                raise ProblemError(
                    f"has_aux=True needs f to return (output, aux), but it returned {type(out).__name__}; "
                    "return a pair or pass has_aux=False."
                )
            out = out[0]
        out = select(out, self.outputs)
        return out if self.loss is None else self._loss(out, targets)

    def _loss(self, out: Any, targets: tuple) -> torch.Tensor:
        """`loss(out, *targets)`; for batched problems sample by sample (vmapped), so a loss
        that averages over its batch (cross_entropy's default) gives each sample's own loss.
        What the loss raises carries LOSS_NOTE, so the problem's error can name the targets."""
        try:
            if not self.batched:
                return self.loss(out, *targets)

            def one(o: Any, t: tuple) -> torch.Tensor:
                value = self.loss(*pytree.tree_map(_unsqueeze, (o, *t)))
                return value.squeeze(0) if value.ndim and value.shape[0] == 1 else value

            return torch.func.vmap(one)(out, targets)
        except Exception as exc:
            exc.add_note(LOSS_NOTE)
            raise


def param_slots(module: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Each parameter (by its `named_parameters()` name) with every place that holds it: one
    name per (submodule, attribute), however many names reach that submodule.

    NOTE: [slots] `torch.func.functional_call` swaps a tied parameter under every name that
    reaches it and puts back what it found there. A submodule registered under two names
    (T5's `shared` and `encoder.embed_tokens`) holds one attribute under both, so the second
    swap "puts back" the first one's tensor: from the second call on, the module is untied
    and holds a plain tensor, and the derivative through the other tied places is lost (J
    was 97% off, with every block check passing, since the reference calls f the same way).
    Passing each place once, with `tie_weights=False`, swaps and restores each exactly once.
    """
    slots: dict[int, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False, remove_duplicate=False):
            if (id(sub), attr) not in seen:
                seen.add((id(sub), attr))
                slots.setdefault(id(param), []).append(f"{prefix}.{attr}" if prefix else attr)
    return {name: tuple(slots[id(param)]) for name, param in module.named_parameters()}


def functional_call(
    module: torch.nn.Module, slots: dict[str, tuple[str, ...]], params: dict[str, torch.Tensor], args: tuple, kwargs: dict
) -> Any:
    """`module(*args, **kwargs)` with `params` (by parameter name) in place of its own, each
    put in every place that holds it (NOTE: [slots])."""
    placed = {slot: value for name, value in params.items() for slot in slots.get(name, (name,))}
    return torch.func.functional_call(module, placed, args, kwargs, tie_weights=False)


def split(x: torch.Tensor, leaves: tuple[Leaf, ...], lead: torch.Size | tuple[int, ...]) -> list[torch.Tensor]:
    """Views of the flat `(*lead, N)` as each leaf `(*lead, *shape)` (one split: its backward is one cat)."""
    parts = x.split([leaf.size for leaf in leaves], dim=-1)
    return [p.reshape((*lead, *leaf.shape)) for p, leaf in zip(parts, leaves, strict=True)]  # a tuple: () for a 0-dim leaf


def concat(tensors: Sequence[torch.Tensor], lead: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Tensors `(*lead, *shape_i)` as one `(*lead, sum size_i)`."""
    flat = [t.reshape(*lead, -1) for t in tensors]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=-1)


def _unsqueeze(leaf: Any) -> Any:
    return leaf.unsqueeze(0) if isinstance(leaf, torch.Tensor) else leaf


def _per_sample_shape(leaf: Any, name: str, batched: bool, shareable: str | int | None = None) -> tuple[int, ...]:
    """A per-sample input's shape of one sample; `shareable`: the `shared` entry that would
    pass it whole (None for differentiated inputs and targets)."""
    if not isinstance(leaf, torch.Tensor):
        raise ProblemError(
            f"the differentiated input {name} must be a torch.Tensor, but is a {type(leaf).__name__}; wrap it with "
            "torch.as_tensor, or leave it out of argnums."
        )
    if batched and leaf.ndim == 0:
        fix = "" if shareable is None else f"pass shared=({shareable!r},) if it is the same for every sample, or "
        raise ProblemError(
            f"batched=True needs every tensor input to hold one entry per sample, but {name} is a scalar; "
            f"{fix}close over it inside f."
        )
    return tuple(leaf.shape[1:] if batched else leaf.shape)


def _describe(tree: Any, prefix: str) -> str:
    """A pytree's leaves as `targets[0] int64 (4,)`, for error messages."""
    leaves, names, _ = flatten(tree, prefix)
    return ", ".join(
        f"{name} {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"{name} {t!r}"
        for t, name in zip(leaves, names, strict=True)
    )


def _shared_inputs(shared: Sequence[str | int], n_args: int, kwargs: dict, argnums: tuple[int | str, ...]) -> set[str | int]:
    """The inputs every sample gets whole: keyword names and positions of `args`, checked."""
    if isinstance(shared, str | int):
        shared = (shared,)
    whole: set[str | int] = set()
    for item in shared:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise ProblemError(f"shared names inputs by keyword (a str) or position (an int), but got {item!r}.")
        if isinstance(item, str) and item not in kwargs:
            known = ", ".join(map(repr, kwargs)) or "none"
            raise ProblemError(
                f"shared names {item!r}, which is not one of the keyword arguments (kwargs: {known}); name a keyword "
                "argument, or a positional input by its position."
            )
        if isinstance(item, int):
            if not -n_args <= item < n_args:
                raise ProblemError(
                    f"shared names position {item}, but there are {n_args} positional inputs; name one of 0..{n_args - 1}."
                )
            item %= n_args
        if item in argnums:
            raise ProblemError(
                f"shared names input {item!r}, which is differentiated (argnums); leave it out of shared or of argnums."
            )
        whole.add(item)
    return whole


def _top_inputs(tree: tuple[tuple, dict, tuple]) -> list[str | int | None]:
    """For each leaf of `(args, kwargs, targets)`: the position or keyword it belongs to
    (None for targets)."""
    tops: list[str | int | None] = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        group, key = path[0].idx, path[1]
        tops.append(key.idx if group == 0 else key.key if group == 1 else None)
    return tops


def _arg_index(name: str) -> int | None:
    """The positional argument a leaf name belongs to (`[0][1]['w']` -> 1), None for keywords."""
    if not name.startswith("[0]["):
        return None
    return int(name[4 : name.index("]", 4)])


def _arg_name(name: str) -> str:
    """`[0][1]['w']` -> `args[1]['w']`; `[1]['mask']` -> `kwargs['mask']`; `[2][0]` -> `targets[0]`."""
    return {"[0]": "args", "[1]": "kwargs", "[2]": "targets"}[name[:3]] + name[3:]
