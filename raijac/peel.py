"""peel: finds a final linear layer in a plain function, so the chain modes apply to it too.

`f(x) = W g(x) + b` for a constant matrix W is common (a model's output layer). Its
Jacobian is `W J_g`: row i is the VJP of g with cotangent W[i], so reverse mode's first
step, multiplying identity rows by W, is a GEMM that only yields W's rows (NOTE: [chain] in
kernels). The function is traced once with `make_fx` at the point x; when its graph ends in
a matrix-vector product with a constant matrix (mv, addmv, or mm/addmm with one row, then
only reshapes and a constant bias), the chain is `(g, Linear(W))`, g being the traced graph
cut at that product's vector input. Anything else, or any tracing failure, gives None.

Tracing at x bakes in x's control flow and `.item()` values; the result is only ever used
at x. The cut is checked against autograd on f itself (NOTE: [peel check]).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
# Ops that only relabel a contiguous result's shape: the flat (row-major) order is unchanged.
RESHAPES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze_.dim, aten.squeeze_.default, aten.unsqueeze.default, aten.alias.default, aten.clone.default,
    aten.flatten.using_ints,
}  # fmt: skip
ADDS = {aten.add.Tensor}
# Ops whose result is still a constant when their input is one (a transposed or cast weight).
CONSTANT_OPS = {
    aten.t.default, aten.permute.default, aten.transpose.int, aten._to_copy.default, aten.detach.default,
    aten.clone.default, aten.alias.default, aten.contiguous.default,
}  # fmt: skip


class Traced(torch.nn.Module):
    """The traced function cut at the last product's vector input, flattened."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x).reshape(-1)


def peel_last_linear(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.nn.Module, ...] | None:
    """`(g, Linear(W))` with `f(x) = W g(x) + b` near x, or None when f does not end so."""
    try:
        from torch.fx.experimental.proxy_tensor import make_fx

        gm = make_fx(lambda z: f(z))(x.detach())  # one positional input, whatever f's signature (defaults, *args)
        return _peel(gm, f, x)
    except Exception:  # tracing is an optimisation: any failure just means no chain
        return None
    finally:
        # NOTE: [peel garbage] make_fx's tracer leaves reference cycles that hold the
        # model's tensors; freed now, while they are young (cheap), or the weights would
        # outlive the problem until a full gc pass (a worker's next problem then loads
        # 1 s slower next to them: see WorkerHost._build).
        gc.collect(1)


def _peel(gm: fx.GraphModule, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.nn.Module, ...] | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if len(placeholders) != 1 or not isinstance(output.args[0], fx.Node):
        return None
    node = output.args[0]
    n_out = math.prod(_shape(node))
    while node.op == "call_function":  # through reshapes and a constant bias
        if node.target in RESHAPES:
            node = node.args[0]
        elif node.target in ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if isinstance(b, int | float) and isinstance(a, fx.Node):  # a scalar bias
                node = a
                continue
            if isinstance(a, int | float) and isinstance(b, fx.Node):
                node = b
                continue
            if isinstance(b, fx.Node) and _constant(gm, b) is not None and isinstance(a, fx.Node):
                node_next = a
            elif isinstance(a, fx.Node) and _constant(gm, a) is not None and isinstance(b, fx.Node):
                node_next = b
            else:
                return None
            if _shape(node_next) != _shape(node):  # the bias must not broadcast the product out
                return None
            node = node_next
        else:
            break
    found = _product(gm, node)
    if found is None:
        return None
    weight, vector = found
    if weight.ndim != 2 or weight.shape[0] != n_out or not weight.is_floating_point() or weight.dtype != x.dtype:
        return None
    output.args = (vector,)
    gm.graph.eliminate_dead_code()
    for n in gm.graph.nodes:
        n.meta.clear()  # make_fx keeps every intermediate's value there
    gm.recompile()
    gm.graph.owning_module = None  # the compiled forward needs no graph: no module <-> graph cycle
    g = Traced(gm)
    with torch.no_grad():
        h = g(x.detach())
    if h.numel() != weight.shape[1]:
        return None
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no init, no memory
    linear.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)  # a view of the model's weight, no copy
    return (g, linear) if _reverse_agrees(f, g, linear.weight, x) else None


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


def _reverse_agrees(f: Callable, g: torch.nn.Module, weight: torch.Tensor, x: torch.Tensor) -> bool:
    z = x.detach()
    y, vjp_f = torch.func.vjp(f, z)
    v = torch.randn(y.shape, generator=torch.Generator(device=x.device).manual_seed(0), device=x.device, dtype=y.dtype)
    _, vjp_g = torch.func.vjp(g, z)
    return _close(vjp_f(v)[0], vjp_g(v.reshape(-1) @ weight)[0])


def forward_agrees(f: Callable, stages: tuple[torch.nn.Module, ...], x: torch.Tensor) -> bool:
    """Whether forward mode through a peeled chain gives f's J t (True where f has no
    forward-mode rules to compare with: the reverse check stands)."""
    g, linear = stages
    z = x.detach()
    t = torch.randn(z.shape, generator=torch.Generator(device=x.device).manual_seed(1), device=x.device, dtype=z.dtype)
    try:
        jt = torch.func.jvp(f, (z,), (t,))[1]
    except Exception:
        return True
    return _close(jt.reshape(-1), linear.weight @ torch.func.jvp(g, (z,), (t,))[1])


def _product(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, fx.Node] | None:
    """(W, the node of the vector W multiplies) for a matrix-vector product with constant W."""
    if node.op != "call_function":
        return None
    args = node.args
    if node.target in (aten.mv.default, aten.addmv.default):
        if node.target is aten.addmv.default and (node.kwargs or _constant(gm, args[0]) is None):
            return None
        w_node, v_node = args[-2], args[-1]
        w = _constant(gm, w_node)
        return None if w is None or not isinstance(v_node, fx.Node) else (w, v_node)
    if node.target in (aten.mm.default, aten.addmm.default):
        if node.target is aten.addmm.default and (node.kwargs or _constant(gm, args[0]) is None):
            return None
        u_node, p_node = args[-2], args[-1]
        p = _constant(gm, p_node)
        if p is not None and isinstance(u_node, fx.Node) and _shape(u_node)[:1] == (1,):
            return p.T, u_node  # (1, H) @ (H, M): W = P^T
        p = _constant(gm, u_node)
        if p is not None and isinstance(p_node, fx.Node) and _shape(p_node)[1:] == (1,):
            return p, p_node  # (M, H) @ (H, 1)
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    value = node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The value of a node that depends on no input (a captured tensor, or ops on them)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = getattr(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    if node.op != "call_function" or node.target not in CONSTANT_OPS:
        return None
    inner = _constant(gm, node.args[0])
    return None if inner is None else node.target(inner, *node.args[1:], **node.kwargs)
