"""peel: finds the layers of a plain function (or custom module), so the chain modes apply to it too.

`f(x) = W_L s(... s(W_1 x + b_1) ...) + b_L` for constant matrices W is common (an MLP as a
function, or a model's head). Its Jacobian is `W_L D ... D W_1`: reverse mode's first step,
multiplying identity rows by W_L, is a GEMM that only yields W_L's rows (NOTE: [chain] in
kernels). The function is traced once with `make_fx` at the point x, and its graph is walked
back from the output: each matrix-vector product with a constant matrix (mv, addmv, or
mm/addmm with one row, through reshapes and constant biases) becomes a `Linear` stage, each
elementwise op of one traced input a `Pointwise` stage, until anything else; what is left
becomes one `Traced` stage (cut there), run by VJP/JVP. Anything untraceable, or a graph that
does not end in such layers, gives None.

Tracing at x bakes in x's control flow and `.item()` values; the result is only ever used
at x. The stages are checked against autograd on f itself (NOTE: [peel check]).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from raijac.problem import Chain

aten = torch.ops.aten
# Ops that only relabel a contiguous result's shape: the flat (row-major) order is unchanged.
RESHAPES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze_.dim, aten.squeeze_.default, aten.unsqueeze.default, aten.alias.default, aten.clone.default,
    aten.flatten.using_ints,
}  # fmt: skip
ADDS = {aten.add.Tensor}


class Traced(torch.nn.Module):
    """The traced function cut at the first peeled layer's input, flattened."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x).reshape(-1)


class Pointwise(torch.nn.Module):
    """A traced elementwise op on a flat vector (other arguments fixed): a diagonal Jacobian."""

    def __init__(self, op: Callable[..., torch.Tensor], args: tuple, kwargs: dict, at: int) -> None:
        super().__init__()
        self.op, self.args, self.kwargs, self.at = op, args, kwargs, at

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        args = (*self.args[: self.at], h, *self.args[self.at + 1 :])
        return self.op(*args, **self.kwargs)

    def extra_repr(self) -> str:
        return str(self.op)


class Peeled(tuple):
    """Stages found by tracing (not declared): the chain modes check them against f."""


def peel_chain(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, check: bool = True) -> Peeled | None:
    """The stages of f near x, first to last, when f ends in a constant linear layer: its
    linear layers (with constant biases) and the elementwise ops between them, walking back
    from the output, and before them the traced rest of f (omitted where the walk reached a
    1-D x). None when f does not end in a linear layer, cannot be traced, or the stages do
    not agree with f (`check=False` skips that check: for workers, whose driver made it)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = None
    try:
        try:
            gm = make_fx(lambda z: f(z))(x.detach())  # one positional input, whatever f's signature (defaults, *args)
        except Exception:  # f's own code cannot be traced (data-dependent Python, an op make_fx lacks): no chain
            return None
        # The walk is raijac's own code: an error there is a bug to see, not "no chain".
        return _peel(gm, f, x, check)
    finally:
        if gm is not None:
            _unlink(gm)  # used (the traced rest) or not, it holds no cycle through the model's tensors
        del gm
        # NOTE: [peel garbage] make_fx's tracer leaves reference cycles that hold the
        # model's tensors; freed now, while they are young (cheap), or the weights would
        # outlive the problem until a full gc pass (a worker's next problem then loads
        # slower next to them: see WorkerHost._build).
        gc.collect(1)


def _peel(gm: fx.GraphModule, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, check: bool) -> Peeled | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if len(placeholders) != 1 or not isinstance(output.args[0], fx.Node):
        return None
    node, n = output.args[0], math.prod(_shape(output.args[0]))
    layers: list[torch.nn.Module] = []  # last first
    while (node := _below_reshapes(node)).op != "placeholder":
        below, bias = _skip_to_product(gm, node, n)
        found = None if below is None else _product(gm, below)
        if found is not None:
            weight, vector, inner_bias = found
            if weight.ndim != 2 or weight.shape[0] != n or not weight.is_floating_point() or weight.dtype != x.dtype:
                break
            layers.append(_linear(weight, _sum_bias(inner_bias, bias, n)))
            node, n = vector, weight.shape[1]
            continue
        step = _pointwise(gm, node)  # an elementwise op between (or after) layers
        if step is None:
            break  # the rest is traced: cut at node
        layers.append(step[0])
        node = step[1]
    if not any(isinstance(layer, torch.nn.Linear) for layer in layers):
        return None
    stages = list(reversed(layers))
    if not (node.op == "placeholder" and x.ndim == 1):  # the rest of f, traced, first
        output.args = (node,)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        stages.insert(0, Traced(gm))
    peeled = Peeled(stages)
    return peeled if not check or _reverse_agrees(f, peeled, x) else None


def _unlink(gm: fx.GraphModule) -> None:
    for each in gm.graph.nodes:
        each.meta.clear()  # make_fx keeps every intermediate's value there (the weights' too)
    gm.graph.owning_module = None  # the compiled forward needs no graph: no module <-> graph cycle


def _below_reshapes(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in RESHAPES:
        node = node.args[0]
    return node


def _skip_to_product(gm: fx.GraphModule, node: fx.Node, n: int) -> tuple[fx.Node | None, torch.Tensor | float | None]:
    """Back from `node` through reshapes and constant bias adds: (the node below them, the
    summed bias or None); (None, None) where a bias would change the shape."""
    bias: torch.Tensor | float | None = None
    while node.op == "call_function":
        if node.target in RESHAPES:
            node = node.args[0]
            continue
        if node.target not in ADDS or len(node.args) != 2 or node.kwargs:
            break
        a, b = node.args
        if isinstance(a, int | float) and isinstance(b, fx.Node):
            a, b = b, a
        if isinstance(b, int | float) and isinstance(a, fx.Node):
            term, node_next = b, a
        elif isinstance(b, fx.Node) and isinstance(a, fx.Node) and (c := _constant(gm, b)) is not None:
            term, node_next = c, a
        elif isinstance(a, fx.Node) and isinstance(b, fx.Node) and (c := _constant(gm, a)) is not None:
            term, node_next = c, b
        else:
            break
        if _shape(node_next) != _shape(node):  # the bias must not broadcast the product out
            return None, None
        bias = _sum_bias(bias, term, n)
        node = node_next
    return node, bias


def _sum_bias(a: torch.Tensor | float | None, b: torch.Tensor | float | None, n: int) -> torch.Tensor | float | None:
    if a is None or b is None:
        return b if a is None else a
    return _flat_bias(a, n) + _flat_bias(b, n)


def _flat_bias(b: torch.Tensor | float, n: int) -> torch.Tensor | float:
    if isinstance(b, torch.Tensor):
        return b.detach().reshape(-1).expand(n) if b.numel() == 1 else b.detach().reshape(n)
    return b


def _linear(weight: torch.Tensor, bias: torch.Tensor | float | None) -> torch.nn.Linear:
    """A Linear stage on the model's own tensors (views, no copies); a scalar bias broadcast."""
    m, h = weight.shape
    linear = torch.nn.Linear(h, m, bias=bias is not None, device="meta")  # no init, no memory
    linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        b = torch.as_tensor(bias, dtype=weight.dtype, device=weight.device)
        linear.bias = torch.nn.Parameter(_flat_bias(b, m), requires_grad=False)
    return linear


def _pointwise(gm: fx.GraphModule, node: fx.Node) -> tuple[Pointwise, fx.Node] | None:
    """(the stage, its input) for an elementwise op of one traced input (others constant) that
    keeps its input's shape and dtype (tanh, relu, gelu, x * 2, ...)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    if torch.Tag.pointwise not in node.target.tags or node.target._schema.is_mutable:  # never an in-place op
        return None
    traced = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and _constant(gm, a) is None]
    if len(traced) != 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    at = traced[0]
    inner = node.args[at]
    value, inner_value = node.meta.get("val"), inner.meta.get("val")
    if not isinstance(value, torch.Tensor) or not isinstance(inner_value, torch.Tensor):
        return None
    if value.shape != inner_value.shape or value.dtype != inner_value.dtype:
        return None
    args = tuple(_constant(gm, a) if isinstance(a, fx.Node) and i != at else a for i, a in enumerate(node.args))
    if any(isinstance(a, torch.Tensor) and a.numel() != 1 and a.shape != value.shape for a in args):
        return None  # a constant operand of another shape: flat vectors would not line up
    args = tuple(a.reshape(-1) if isinstance(a, torch.Tensor) and a.numel() != 1 else a for a in args)
    return Pointwise(node.target, args, dict(node.kwargs), at), inner


# NOTE: [peel check] A custom autograd.Function whose backward (or jvp) is not its forward's
# derivative is traced as its forward, so the cut chain would differentiate it differently
# from f. Comparing one random projection v^T J (J t) of f with the chain's catches that with
# probability one: a nonzero difference D has v^T D = 0 only for v in a null set. The reverse
# check runs when the chain is found; the forward one only when chain-fwd is built on it.
def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-4 if a.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    a, b = a.detach(), b.detach()
    scale = max(float(a.abs().max()), float(b.abs().max()), 1.0) if a.numel() else 1.0
    return a.shape == b.shape and bool(((a - b).abs() <= tol * scale).all())


def _reverse_agrees(f: Callable, stages: tuple, x: torch.Tensor) -> bool:
    z = x.detach()
    try:
        y, vjp_f = torch.func.vjp(f, z)
        v = torch.randn(y.shape, generator=torch.Generator(device=x.device).manual_seed(0), device=x.device, dtype=y.dtype)
        want = vjp_f(v)[0]
    except Exception:  # f itself has no reverse-mode derivative here: nothing for the chain to agree with
        return False
    h, vjp_c = torch.func.vjp(Chain(tuple(stages)), z)
    if not _close(y.reshape(-1), h.reshape(-1)):  # the stages' forward pass is f's (biases included)
        return False
    return _close(want, vjp_c(v.reshape(-1))[0])


def forward_agrees(f: Callable, stages: tuple, x: torch.Tensor) -> bool:
    """Whether forward mode through peeled stages gives f's J t (True where f has no
    forward-mode rules to compare with: the reverse check stands)."""
    z = x.detach()
    t = torch.randn(z.shape, generator=torch.Generator(device=x.device).manual_seed(1), device=x.device, dtype=z.dtype)
    try:
        jt = torch.func.jvp(f, (z,), (t,))[1]
    except Exception:
        return True
    return _close(jt.reshape(-1), torch.func.jvp(Chain(tuple(stages)), (z,), (t,))[1].reshape(-1))


def _product(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, fx.Node, torch.Tensor | None] | None:
    """(W, the node of the vector W multiplies, addmv/addmm's constant bias or None) for a
    matrix-vector product with constant W."""
    if node.op != "call_function":
        return None
    args = node.args
    bias = None
    if node.target in (aten.addmv.default, aten.addmm.default):
        bias = _constant(gm, args[0])
        if node.kwargs or bias is None:
            return None
    if node.target in (aten.mv.default, aten.addmv.default):
        w_node, v_node = args[-2], args[-1]
        w = _constant(gm, w_node)
        return None if w is None or not isinstance(v_node, fx.Node) else (w, v_node, bias)
    if node.target in (aten.mm.default, aten.addmm.default):
        u_node, p_node = args[-2], args[-1]
        p = _constant(gm, p_node)
        if p is not None and isinstance(u_node, fx.Node) and _shape(u_node)[:1] == (1,):
            return p.T, u_node, bias  # (1, H) @ (H, M): W = P^T
        p = _constant(gm, u_node)
        if p is not None and isinstance(p_node, fx.Node) and _shape(p_node)[1:] == (1,):
            return p, p_node, bias  # (M, H) @ (H, 1)
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The value of a node that depends on no input: a captured tensor, or a deterministic,
    non-mutating op of such tensors (a transposed, sliced or cast weight), evaluated here.

    Each node is decided once per graph, without recursion: a simulator's steps each read
    both halves of the last state, so a recursive walk visited 2^steps paths (50 steps of
    a leapfrog never finished), and a long loop would have passed the recursion limit.
    """
    if not isinstance(node, fx.Node):
        return None
    memo: dict[fx.Node, torch.Tensor | None] = gm.__dict__.setdefault("_raijac_constants", {})
    stack = [node]
    while stack:
        current = stack[-1]
        if current in memo:
            stack.pop()
            continue
        inputs = _operands(gm, current)
        if isinstance(inputs, tuple):  # decided without its operands
            memo[current] = inputs[0]
        elif any(memo.get(n, _UNDECIDED) is None for n in inputs):
            memo[current] = None
        elif undecided := [n for n in inputs if n not in memo]:
            stack.extend(undecided)
            continue
        else:
            args, kwargs = fx.node.map_arg((current.args, current.kwargs), memo.__getitem__)
            value = current.target(*args, **kwargs)
            memo[current] = value if isinstance(value, torch.Tensor) else None
        stack.pop()
    return memo[node]


_UNDECIDED = object()


def _operands(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | tuple[torch.Tensor | None]:
    """The nodes whose values decide `node`'s (`_constant`), or `(value,)` where none do."""
    if node.op == "get_attr":
        value = getattr(gm, node.target)
        return (value if isinstance(value, torch.Tensor) else None,)
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return (None,)
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return (None,)
    nodes: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), nodes.append)
    if not nodes:
        return (None,)  # a tensor made from nothing (zeros, arange): f builds it, not a weight
    return nodes
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return None
    nodes: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), nodes.append)
    if not nodes:
        return None  # a tensor made from nothing (zeros, arange): f builds it, not a weight
    values = {n: _constant(gm, n) for n in nodes}
    if any(v is None for v in values.values()):
        return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
    value = target(*args, **kwargs)
    return value if isinstance(value, torch.Tensor) else None
