"""Real models (issue 13): parameter Jacobians whose cost is linear in the parameters, and a
zoo of networks (tests/models.py) through the kernels and raijac.compute against torch.func."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import zarr
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import raijac
from raijac import Problem, modes
from raijac.kernels import Kernel, make_target, plain_attention
from raijac.probe import resolve_mode, try_mode
from tests.models import GPT, LSTMHead, ResNet18, TinyViT, conv_bn


class _Written(TorchDispatchMode):
    """Counts the elements every aten op writes (its outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.n += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def _written_per_entry(layers: int, mode: str, batched: bool) -> float:
    """Elements written by one block of `mode`, per entry of the block, for a stack of tiny Linears."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(layers)])
    problem = Problem.from_module(module, torch.randn(2, 3) if batched else torch.randn(3), wrt="params", batched=batched)
    kernel = Kernel(make_target(problem), mode)
    nb = 2 if batched else 1
    with _Written() as count:
        kernel(0, nb, 0, 3)
    return count.n / (nb * 3 * problem.n_in)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "plain"])
@pytest.mark.parametrize("mode", ["rev", "fwd", "loop"])
def test_param_jacobian_cost_is_linear_in_params(mode, batched):
    """Four times the parameter tensors (and parameters) cost four times the work, not sixteen:
    a slice per tensor made every VJP write a full-length zero gradient per tensor (NOTE: [split])."""
    few, many = _written_per_entry(10, mode, batched), _written_per_entry(40, mode, batched)
    assert many < 1.25 * few, f"{mode}: {many:.1f} elements written per Jacobian entry with 40 tensors, {few:.1f} with 10"


# ---------------------------------------------------------------------- references
def param_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample parameter Jacobians (B, M, P) by torch.func, flattened in parameters() order."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p: dict, xb: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, p, (xb[None],))[0].reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(params, x)
    return torch.cat([j.reshape(x.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)


def block(problem: Problem, mode: str, b1: int, s1: int) -> torch.Tensor:
    """Samples 0:b1, seeds 0:s1 of `mode`, as (b1, M-rows or M, N-cols or N)."""
    return Kernel(make_target(problem), mode)(0, b1, 0, s1)


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Relative to the reference's largest entry: float32 sums of thousands of products."""
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} against a largest entry {scale:.3g}"


# ---------------------------------------------------------------------- attention
def _gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return GPT().eval(), torch.randint(0, 50, (3, 8))


def test_gpt_auto_picks_a_vmapped_mode():
    """F.scaled_dot_product_attention runs on its math backend inside the kernels
    (NOTE: [attention]), so auto keeps rev instead of falling back to loop."""
    model, ids = _gpt()
    problem = Problem.from_module(model, ids, wrt="params", batched=True)
    mode, reason, _ = resolve_mode(problem, "auto")
    assert mode == "rev", reason
    assert_rel_close(block(problem, mode, 3, problem.n_out), param_jacobian(model, ids), 1e-5)


def test_slow_path_note_names_the_op(monkeypatch):
    """Without the math backend, the triage says which op vmap cannot batch."""
    monkeypatch.setitem(modes.REGISTRY, "rev", dataclasses.replace(modes.REGISTRY["rev"], vmaps=False))
    model, ids = _gpt()
    report = try_mode(make_target(Problem.from_module(model, ids, wrt="params", batched=True)), "rev")
    assert report.slow and report.note.startswith("vmap has no batching rule for aten::_scaled_dot_product"), report.note


# ---------------------------------------------------------------------- rev-batched
class _OldTanh(torch.autograd.Function):
    """tanh as an old-style Function (no setup_context): torch.func refuses to transform it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _OldStyleNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_OldTanh.apply(self.inp(x)))


def _autograd_rows(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample parameter Jacobians, one autograd.grad per sample and row: (B, M, P)."""
    params = list(model.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x[i : i + 1])[0, r], params)])
        for i in range(x.shape[0])
        for r in range(model(x[:1]).shape[1])
    ]
    return torch.stack(rows).reshape(x.shape[0], -1, rows[0].numel())


def test_old_style_function_gets_rev_batched():
    """rev is refused (torch.func cannot transform the Function); auto takes rev-batched, one
    batched backward per block of rows, before the row-by-row loop."""
    torch.manual_seed(0)
    model, x = _OldStyleNet().double(), torch.randn(3, 4, dtype=torch.float64)
    problem = Problem.from_module(model, x, wrt="params", batched=True)
    mode, reason, reports = resolve_mode(problem, "auto")
    assert mode == "rev-batched", reason
    assert not reports[0].ok and reports[0].mode == "rev"
    assert_rel_close(block(problem, mode, 3, problem.n_out), _autograd_rows(model, x), 1e-12)


def test_rev_batched_compressed_rows_match_rev():
    """With colours (a sparse problem's seeds), rev-batched gives rev's compressed rows S^T J."""
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64)
    problem = Problem(lambda z: torch.tanh(z[..., :6]) * z[..., 1:], x, batched=True)
    colours = torch.tensor([0, 1, 2, 0, 1, 2])
    want = Kernel(make_target(problem), "rev", colours)(0, 4, 0, 3)
    got = Kernel(make_target(problem), "rev-batched", colours)(1, 4, 1, 3)
    assert_rel_close(got, want[1:, 1:], 1e-14)


# ---------------------------------------------------------------------- the zoo on Ray
def input_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample input Jacobians (B, M, N) by torch.func."""
    jac = torch.func.vmap(torch.func.jacrev(lambda xb: model(xb[None])[0].reshape(-1)))(x)
    return jac.reshape(x.shape[0], jac.shape[1], -1)


def whole_param_jacobian(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole batch's output w.r.t. the parameters, (B*M, P), by plain autograd: train-mode
    BatchNorm couples the samples and updates its running statistics, which torch.func refuses."""
    names, params = zip(*((n, p.detach()) for n, p in model.named_parameters()), strict=True)

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def _zoo(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "resnet":
        return ResNet18(width=2).eval(), torch.randn(2, 3, 4, 4)
    if name == "resnet-train":
        return ResNet18(width=2).train(), torch.randn(2, 3, 4, 4)
    if name == "conv-bn":
        return conv_bn().eval(), torch.randn(2, 1, 8, 8)
    if name == "gpt":
        return GPT().eval(), torch.randint(0, 50, (2, 8))
    if name == "vit":
        return TinyViT().eval(), torch.randn(3, 1, 4, 4)
    return LSTMHead(), torch.randn(2, 5, 3)


# (network, wrt, auto's mode): vmapped modes, or rev-batched where torch.func refuses the
# forward (train-mode BatchNorm updates its statistics in place; aten::lstm has no batching
# rule for per-sample weights); never the row-by-row loop.
ZOO = [
    ("resnet", "params", "rev"),
    ("resnet", "input", "rev"),
    ("resnet-train", "params", "rev-batched"),
    ("conv-bn", "params", "rev"),
    ("conv-bn", "input", "chain"),
    ("gpt", "params", "rev"),
    ("vit", "params", "rev"),  # torch's fused encoder layer: its fast path off (NOTE: [attention])
    ("vit", "input", "rev"),
    ("lstm", "params", "rev-batched"),
    ("lstm", "input", "rev"),
]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("name,wrt,mode", ZOO, ids=[f"{n}-{w}" for n, w, _ in ZOO])
def test_zoo_matches_torch_func(name, wrt, mode, store_path):
    """Each network through raijac.compute (auto, two Ray workers, several tiles) against torch.func:
    per sample in eval mode; train-mode BatchNorm mixes the samples, so the whole batch's Jacobian."""
    model, x = _zoo(name)
    batched = model.training is False or name == "lstm"
    problem = Problem.from_module(model, x, wrt=wrt, batched=batched)
    jac = raijac.compute(problem, store_path, workers=2, block_size=4)
    assert jac.mode == mode, jac.meta["mode_reason"]
    if not batched:
        want = whole_param_jacobian(model, x)
    else:
        with plain_attention():  # torch.func's own vmap cannot batch the fused attention either
            want = param_jacobian(model, x) if wrt == "params" else input_jacobian(model, x)
    assert_rel_close(torch.from_numpy(jac.numpy()), want, 1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # the caller's setting, given back


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("wrt", ["params", "input"])
def test_verify_differentiates_fused_attention(wrt, store_path):
    """raijac verify's fresh JVPs and VJPs of a model with torch's attention kernels: the fused
    CPU kernel has no forward derivative, and the encoder layer's fast path none at all."""
    from raijac.verify import verify

    model, x = _zoo("vit")
    raijac.compute(Problem.from_module(model, x, wrt=wrt, batched=True), store_path, workers=2)
    report = verify(store_path, problem=Problem.from_module(model, x, wrt=wrt, batched=True), probes=3)
    assert report.ok, report
    assert max(report.jvp_errors + report.vjp_errors) < 1e-5
    array = zarr.open_group(store_path, mode="r+")["jacobian"]
    array[1, 2, 5] = array[1, 2, 5] + 1.0  # one wrong entry is still caught
    assert not verify(store_path, problem=Problem.from_module(model, x, wrt=wrt, batched=True), probes=3).ok


# ---------------------------------------------------------------------- Hugging Face
def _hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the mask's values steer transformers' masking code
    return model, ids, mask


def _hf_reference(model, ids, mask) -> torch.Tensor:
    """jacrev per sample (vmap over samples fails: transformers branches on the mask's values)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def last_logits(p, i, m):
        return torch.func.functional_call(model, p, (i[None],), {"attention_mask": m[None]}).logits[0, -1]

    rows = []
    for b in range(ids.shape[0]):
        jac = torch.func.jacrev(last_logits)(params, ids[b], mask[b])
        rows.append(torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1))
    return torch.stack(rows)


@pytest.mark.usefixtures("ray_session")
def test_hugging_face_gpt2_with_an_attention_mask_as_a_user_writes_it(store_path):
    """A transformers GPT-2 with token ids and a padding mask, no wrapper: the mask travels with
    its samples (kwargs), outputs= picks the last token's logits from the ModelOutput, and a
    vmapped mode runs although vmap cannot batch the mask (NOTE: [per-sample loop])."""
    model, ids, mask = _hf_gpt2()
    problem = Problem.from_module(
        model, ids, kwargs={"attention_mask": mask}, outputs=lambda out: out.logits[:, -1], wrt="params", batched=True
    )
    jac = raijac.compute(problem, store_path, workers=2, progress=False)
    assert jac.mode == "rev", jac.meta["mode_reason"]
    assert jac.shape == (3, 50, sum(p.numel() for p in model.parameters()))
    assert_rel_close(torch.from_numpy(jac.numpy()), _hf_reference(model, ids, mask), 1e-5)
    # The mask matters: without it the first sample's Jacobian is another one.
    plain = Problem.from_module(model, ids, outputs=lambda out: out.logits[:, -1], wrt="params", batched=True)
    assert not torch.allclose(Kernel(make_target(plain), "rev")(0, 1, 0, 50), torch.from_numpy(jac.numpy()[:1]), rtol=1e-3)


@pytest.mark.usefixtures("ray_session")
def test_hugging_face_bert_without_a_mask_keeps_a_vmapped_mode(store_path):
    """A transformers BERT given no attention mask calls `.item()` on the mask it makes, which
    vmap over samples cannot batch: the samples are looped, the rows still vmapped (NOTE:
    [per-sample loop]), where auto fell back to rev-batched."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 60, (3, 6))
    problem = Problem.from_module(model, ids, outputs="pooler_output", wrt="params", batched=True)
    jac = raijac.compute(problem, store_path, workers=2)
    assert jac.mode == "rev", jac.meta["mode_reason"]
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for b in range(3):
        one = torch.func.jacrev(lambda p, i: torch.func.functional_call(model, p, (i[None],)).pooler_output[0])(params, ids[b])
        rows.append(torch.cat([one[n].reshape(one[n].shape[0], -1) for n in names], dim=1))
    assert_rel_close(torch.from_numpy(jac.numpy()), torch.stack(rows), 1e-5)


def _distilbert() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=60, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=3,
        attn_implementation="eager",
    )  # fmt: skip
    ids, mask = torch.randint(0, 60, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return transformers.DistilBertForSequenceClassification(config).eval(), ids, mask


@pytest.mark.usefixtures("ray_session")
def test_hugging_face_eager_attention_masks_keep_rev_off_the_slow_path(store_path, monkeypatch):
    """DistilBERT's eager attention fills its padding mask with masked_fill(mask, tensor), which
    vmap has no batching rule for; raijac batches it with torch's decomposition (NOTE:
    [batching rules]), so auto keeps rev where it fell back to rev-batched."""
    model, ids, mask = _distilbert()
    problem = Problem.from_module(model, ids, kwargs={"attention_mask": mask}, outputs="logits", wrt="params", batched=True)
    jac = raijac.compute(problem, store_path, workers=2, progress=False)
    assert jac.mode == "rev" and "slow path" not in jac.meta["mode_reason"], jac.meta["mode_reason"]
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for b in range(3):  # one sample at a time: no vmap, so no batching rule, in the reference
        one = torch.func.jacrev(
            lambda p, i, m: torch.func.functional_call(model, p, (i[None],), {"attention_mask": m[None]}).logits[0]
        )(params, ids[b], mask[b])
        rows.append(torch.cat([one[n].reshape(3, -1) for n in params], dim=1))
    assert_rel_close(torch.from_numpy(jac.numpy()), torch.stack(rows), 1e-5)
    # Without the rule the triage finds rev on the slow path, naming the op.
    monkeypatch.setattr(raijac.batching, "OPS", ())
    raijac.batching.missing.cache_clear()
    try:
        report = try_mode(make_target(Problem.from_module(model, ids, kwargs={"attention_mask": mask}, outputs="logits",
                                                          wrt="params", batched=True)), "rev")  # fmt: skip
    finally:
        raijac.batching.missing.cache_clear()
    assert report.slow and "masked_fill" in report.note, report.note


# ---------------------------------------------------------------------- a neural ODE
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("adjoint", [False, True], ids=["odeint", "adjoint"])
def test_neural_ode_input_jacobian(adjoint, store_path):
    """torchdiffeq's dopri5 solve (its autograd.Functions are old-style, so torch.func cannot
    transform them): auto runs rev-batched, right against autograd one row at a time; the
    adjoint's backward copies in place, which batched backwards cannot (vectorize=True in
    torch.autograd.functional.jacobian fails there too), so it runs loop."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    field = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16)).double()
    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = field

        def forward(self, t, y):
            return self.net(y)

    vector_field = Field()

    def flow(x0):
        return solve(vector_field, x0, times, method="dopri5", rtol=1e-9, atol=1e-10)[-1]

    x = torch.randn(16, dtype=torch.float64)
    jac = raijac.compute(Problem(flow, x), store_path, workers=2, block_size=4, progress=False)
    assert jac.mode == ("loop" if adjoint else "rev-batched"), jac.meta["mode_reason"]
    want = torch.autograd.functional.jacobian(flow, x)  # one backward per row: no batching at all
    assert_rel_close(torch.from_numpy(jac.numpy()), want, 1e-8)


class _SharedTwice(torch.nn.Module):
    """T5's layout without transformers: an embedding module registered under two names
    (`shared`, `encoder.embed`) whose weight is also the output head's (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
        self.encoder = torch.nn.Module()
        self.encoder.embed = self.shared
        self.mid = torch.nn.Linear(4, 4, dtype=torch.float64)
        self.head = torch.nn.Linear(4, 4, bias=False, dtype=torch.float64)
        self.head.weight = self.shared.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.encoder.embed(x))))


@pytest.mark.usefixtures("ray_session")
def test_a_module_under_two_names_with_tied_weights_stays_right(store_path):
    """NOTE: [slots]: torch's functional_call untied such a module from its second call on
    (J 97% off, every block check passing). Plain autograd on the module is the reference,
    for two runs in a row, and the caller's module keeps its tie and its Parameters."""
    torch.manual_seed(0)
    net, x = _SharedTwice(), torch.randn(3, 4, dtype=torch.float64)
    params = list(net.parameters())
    assert len(params) == 3  # shared/head weight (once), mid weight and bias
    want = []
    for b in range(3):
        out = net(x[b : b + 1])[0]
        rows = [torch.autograd.grad(out[r], params, retain_graph=True) for r in range(4)]
        want.append(torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]))
    for _ in range(2):
        jac = raijac.compute(Problem.from_module(net, x, wrt="params", batched=True), store_path, workers=2, overwrite=True)
        torch.testing.assert_close(jac.torch(), torch.stack(want), rtol=1e-10, atol=0)
    assert net.head.weight is net.shared.weight and isinstance(net.encoder.embed.weight, torch.nn.Parameter)
    hessian = raijac.compute(
        Problem.hessian_from_module(net, lambda out: (out**2).sum(), x), store_path, workers=2, overwrite=True
    )
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(v: torch.Tensor) -> torch.Tensor:
        w, mw, mb = v[:16].reshape(4, 4), v[16:32].reshape(4, 4), v[32:]
        return ((torch.tanh(x @ w.T @ mw.T + mb) @ w.T) ** 2).sum()

    torch.testing.assert_close(hessian.torch(), torch.func.hessian(loss)(flat), rtol=1e-9, atol=1e-12)
