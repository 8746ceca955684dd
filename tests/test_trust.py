"""No silent wrong Jacobian: problems raijac must replay, refuse or leave untouched.

Each case is a failure users met: a random function (dropout) whose J mixed several draws,
batch coupling missed outside sample 0 or with integer inputs, the caller's module changed
by a run, bfloat16 and empty inputs that crashed, a destructive option set from the
environment, and catch-alls that hid raijac's own errors. References are torch.func /
torch.autograd on the same function, never raijac.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import raijac
from raijac.cli import cli
from raijac.errors import ModeError, ProblemError, StoreError
from raijac.guard import REPLAY_SEED, captured_tensors, modules_of
from raijac.kernels import Kernel, make_target
from raijac.verify import verify


def rel_err(got: object, want: torch.Tensor) -> float:
    got = torch.as_tensor(np.asarray(got), dtype=torch.float64)
    want = want.detach().double().reshape(got.shape)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def seeded(fn, *args):
    """fn(*args) from the generator state raijac replays (NOTE: [replay])."""
    torch.manual_seed(REPLAY_SEED)
    return fn(*args)


def dropout_mlp(n_in: int, n_out: int) -> torch.nn.Module:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(n_in, 24), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(24, n_out))
    return net.train()


def dropout_function(x: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1, 1, 30 * x.numel()).reshape(30, x.numel())
    return torch.nn.functional.dropout(torch.tanh(w @ x), p=0.4, training=True)


# ---------------------------------------------------------------------- randomness
@pytest.mark.parametrize(
    "case",
    ["module-rows", "module-cols", "function", "params"],
)
def test_dropout_is_the_jacobian_of_one_draw(ray_session, tmp_path, case):
    """J and y both belong to f with the one replayed generator state, whichever mode auto takes."""
    if case == "function":
        problem, f, primal = raijac.Problem(dropout_function, torch.randn(6)), dropout_function, None
    elif case == "params":
        net = dropout_mlp(5, 3)
        problem = raijac.Problem.from_module(net, torch.randn(5), wrt="params")
        names = [n for n, _ in net.named_parameters()]

        def f(flat):
            return torch.func.functional_call(net, problem.unflatten_params(flat), (problem.x,))

        primal = problem.params
    else:
        n_in, n_out = (40, 3) if case == "module-rows" else (4, 30)  # auto seeds rows / columns
        f = dropout_mlp(n_in, n_out)
        problem, primal = raijac.Problem(f, torch.randn(n_in)), None
    x = problem.x if primal is None else primal
    jac = raijac.compute(problem, tmp_path / "j.zarr", workers=2, block_size=2)
    want_j = seeded(torch.func.jacrev(f), x)
    want_y = seeded(f, x)
    assert rel_err(jac[...], want_j) < 1e-5
    assert rel_err(jac.y, want_y) < 1e-6
    assert jac.summary["random"] == {"replayed": True, "seed": REPLAY_SEED}
    assert jac.meta["random"] == {"replayed": True, "seed": REPLAY_SEED}
    assert jac.summary["mode"] in ("rev", "loop")
    assert verify(str(tmp_path / "j.zarr"), problem=problem).ok  # its fresh products replay the same draw
    if case == "params":
        assert [p["name"] for p in jac.meta["params"]] == names


@pytest.mark.parametrize("mode", ["fwd", "rev-repeat", "fwd-repeat", "chain", "chain-fwd"])
def test_modes_that_redraw_are_refused_for_random_functions(mode):
    net = dropout_mlp(6, 3)
    problem = raijac.Problem(net, torch.randn(4, 6), batch_aware=True)
    with pytest.raises(ModeError, match=f"mode {mode} runs f's forward pass.*draws random numbers.*rev or loop"):
        Kernel(make_target(problem), mode)


@pytest.mark.parametrize("mode", ["rev", "loop"])
def test_replaying_modes_agree_with_jacrev_of_one_draw(mode):
    net = dropout_mlp(6, 5)
    x = torch.randn(6)
    block = Kernel(make_target(raijac.Problem(net, x)), mode)(0, 1, 0, 5)[0]
    torch.testing.assert_close(block, seeded(torch.func.jacrev(net), x), rtol=1e-6, atol=1e-7)


def test_deterministic_functions_are_not_random():
    problem = raijac.Problem(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5)).eval(), torch.randn(3))
    assert not problem.random
    assert "random" not in str(problem.fingerprint())  # fingerprints of deterministic problems are unchanged


_OWN = torch.Generator().manual_seed(0)
_CALLS = itertools.count()


def _numpy_noise(x: torch.Tensor) -> torch.Tensor:
    return x * float(np.random.rand())


def _own_generator(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rand((), generator=_OWN)


def _global_and_own(x: torch.Tensor) -> torch.Tensor:  # draws from the global generator too
    return x * (torch.rand(()) + torch.rand((), generator=torch.Generator().manual_seed(next(_CALLS))))


@pytest.mark.parametrize(
    "f,match",
    [
        (_numpy_noise, "different outputs on two calls"),
        (_own_generator, "different outputs on two calls"),
        (_global_and_own, "same torch generator state differ"),
    ],
    ids=["numpy", "own-generator", "global-and-own"],
)
def test_functions_that_cannot_be_replayed_are_refused(f, match):
    with pytest.raises(ProblemError, match=match):
        _ = raijac.Problem(f, torch.randn(3)).y


def test_batched_random_function_is_refused():
    net = dropout_mlp(4, 2)
    with pytest.raises(ProblemError, match="batched=True needs f to be deterministic.*draws random numbers"):
        _ = raijac.Problem(net, torch.randn(5, 4), batched=True).y


def test_replay_leaves_the_callers_generator_alone():
    problem = raijac.Problem(dropout_mlp(4, 2), torch.randn(4))
    state = torch.get_rng_state()
    problem.call(problem.x)
    assert problem.random
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------- batch coupling
def _coupled_after_zero(x: torch.Tensor) -> torch.Tensor:
    """y_0 = x_0 alone; y_b = x_b * x_{b-1}: sample 0 looks independent, every other is not."""
    return torch.cat([x[:1], x[1:] * x[:-1]])


def _coupled_in_the_middle(x: torch.Tensor) -> torch.Tensor:
    """Only the samples between the first and last mix (a window over the batch)."""
    y = x.clone()
    y[1:-1] = x[1:-1] + 0.5 * x[2:]
    return y


def _coupled_without_gradient(x: torch.Tensor) -> torch.Tensor:
    """y_b = x_b * sign(x_{b-1}): the coupling carries no gradient, only values."""
    return torch.cat([x[:1], x[1:] * torch.sign(x[:-1]).detach()])


def _pairs_the_halves(x: torch.Tensor) -> torch.Tensor:
    """y_b = x_b * x_{b + B/2 mod B}: each sample meets the one half a batch away."""
    return x * x.roll(x.shape[0] // 2, 0)


@pytest.mark.parametrize(
    "f", [_coupled_after_zero, _coupled_in_the_middle, _pairs_the_halves], ids=["after-zero", "middle", "halves"]
)
@pytest.mark.parametrize("b", [2, 3, 7, 64, 255])  # past SUB_BATCH the gradient check runs a sub-batch
def test_batch_coupling_beyond_sample_zero_is_refused(f, b):
    x = torch.randn(b, 3)
    want = torch.func.jacrev(f)(x)  # (B, 3, B, 3): a sample's rows reach another sample's columns
    others = want.clone()
    for i in range(b):
        others[i, :, i, :] = 0
    if b == 2 and f is _coupled_in_the_middle:
        assert others.abs().max() == 0  # no middle sample: nothing coupled, accepted
        _ = raijac.Problem(f, x, batched=True).y
        return
    assert others.abs().max() > 0
    with pytest.raises(ProblemError, match="treat samples independently.*depends on other input samples"):
        _ = raijac.Problem(f, x, batched=True).y


@pytest.mark.parametrize("b", [2, 5, 64])
def test_batch_coupling_without_gradient_is_refused(b):
    x = torch.randn(b, 3)
    assert torch.func.jacrev(_coupled_without_gradient)(x)[1, :, 0, :].abs().max() == 0  # no gradient shows it
    with pytest.raises(ProblemError, match="treat samples independently.*alone by"):
        _ = raijac.Problem(_coupled_without_gradient, x, batched=True).y


def test_the_gradient_check_runs_a_sub_batch_of_a_large_batch():
    """NOTE: [sub-batch]: the check's forward and backwards see at most SUB_BATCH samples,
    the first, the middle pick and the last ones, whatever B."""
    from raijac.guard import SUB_BATCH

    seen = []

    def f(z: torch.Tensor) -> torch.Tensor:
        if z.requires_grad:
            seen.append(z.shape[0])
        return torch.tanh(z) * z.sum(-1, keepdim=True)

    problem = raijac.Problem(f, torch.randn(256, 4), batched=True)
    _ = problem.y
    assert seen and max(seen) <= SUB_BATCH


def test_batch_norm_in_training_mode_is_refused_on_a_large_batch():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)).train()
    with pytest.raises(ProblemError, match="treat samples independently.*depends on other input samples"):
        _ = raijac.Problem.from_module(model, torch.randn(300, 4), wrt="input", batched=True).y
    with pytest.raises(ProblemError, match="treat samples independently"):
        _ = raijac.Problem.from_module(model, torch.randn(300, 4), wrt="params", batched=True).y


def test_independent_batches_pass():
    x = torch.randn(6, 4)
    problem = raijac.Problem(lambda z: torch.tanh(z) * z.sum(-1, keepdim=True), x, batched=True)
    assert problem.output_shape == (4,)


class _TokenModel(torch.nn.Module):
    """Token ids (B, 2) -> Embedding -> BatchNorm1d over the 2 positions -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 5)
        self.norm = torch.nn.BatchNorm1d(2)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)).flatten(1))


def test_integer_inputs_are_checked_for_batch_coupling():
    model = _TokenModel().train()
    ids = torch.randint(0, 11, (6, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch = model(ids)
        alone = torch.cat([model(ids[i : i + 1]) for i in range(6)])
    assert float((batch - alone).norm() / batch.norm()) > 0.1  # y from the batch, J would come from one sample
    with pytest.raises(ProblemError, match="treat samples independently.*alone by"):
        _ = raijac.Problem.from_module(model, ids, wrt="params", batched=True).y


def test_integer_inputs_through_batch_norm_over_features_are_refused():
    """BatchNorm1d over the embedding features: one sample alone cannot even be normalised."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).train()
    ids = torch.randint(0, 11, (6,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProblemError, match="needs f to map one sample.*on sample 0 alone f raised ValueError"):
        _ = raijac.Problem.from_module(model, ids, wrt="params", batched=True).y


def test_input_functions_that_fail_on_one_sample_are_left_to_their_blocks():
    """Input Jacobians run blocks of samples: a function refusing a lone sample is not refused up front."""

    def f(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            raise RuntimeError("needs two samples")
        return torch.tanh(x)

    assert raijac.Problem(f, torch.randn(4, 3), batched=True).output_shape == (3,)


def test_integer_inputs_of_independent_models_pass(ray_session, tmp_path):
    model = _TokenModel().eval()
    ids = torch.randint(0, 11, (5, 2), generator=torch.Generator().manual_seed(1))
    problem = raijac.Problem.from_module(model, ids, wrt="params", batched=True)
    jac = raijac.compute(problem, tmp_path / "tok.zarr", workers=2)

    def one(flat, i):
        return torch.func.functional_call(model, problem.unflatten_params(flat), (i[None],))[0]

    want = torch.stack([torch.func.jacrev(one)(problem.params, ids[i]) for i in range(5)])
    assert rel_err(jac[...], want) < 1e-5


def test_integer_coupling_without_gradient_is_refused():
    class Shift(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return _coupled_without_gradient(ids.float() - 4.5) * self.w

    ids = torch.randint(0, 10, (5, 3), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ProblemError, match="treat samples independently"):
        _ = raijac.Problem.from_module(Shift(), ids, wrt="params", batched=True).y


# ---------------------------------------------------------------------- the caller's objects
def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).train()


def _snapshot(net: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()},
        "params": {n: p for n, p in net.named_parameters()},
        "training": [m.training for m in net.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(net: torch.nn.Module, before: dict) -> None:
    after = net.state_dict()
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after[k])]
    assert not changed, f"the run changed {changed}"
    for n, p in net.named_parameters():
        assert p is before["params"][n]
        grad, values = before["grads"][n]
        assert p.grad is grad and (grad is None or torch.equal(grad, values))
    assert [m.training for m in net.modules()] == before["training"]
    assert torch.equal(torch.get_rng_state(), before["rng"])


@pytest.mark.parametrize("wrt", ["input", "params"])
def test_compute_plan_and_verify_leave_the_callers_module_as_it_was(ray_session, tmp_path, wrt):
    net = _bn_net()
    net[0].weight.grad = torch.full_like(net[0].weight, 3.0)  # a .grad the caller keeps
    x = torch.randn(5, 4)
    problem = raijac.Problem.from_module(net, x, wrt=wrt)
    reference = copy.deepcopy(net)
    before = _snapshot(net)
    raijac.plan(problem)
    _assert_unchanged(net, before)
    jac = raijac.compute(problem, tmp_path / "bn.zarr", workers=2)
    _assert_unchanged(net, before)
    assert verify(str(tmp_path / "bn.zarr"), problem=problem).ok
    _assert_unchanged(net, before)
    if wrt == "input":  # J through the batch statistics, from the caller's state
        want = torch.autograd.functional.jacobian(reference, x)
    else:
        params = dict(reference.named_parameters())
        flat = problem.params

        def f(p):
            return torch.func.functional_call(reference, problem.unflatten_params(p), (x,))

        assert set(params) == {i.name for i in problem.param_info}
        want = torch.autograd.functional.jacobian(f, flat)
    assert rel_err(jac[...], want) < 1e-5


_BUFFER = torch.zeros(6, dtype=torch.float64)  # a global f writes into


def _writes_a_global(x: torch.Tensor) -> torch.Tensor:
    _BUFFER[:] = torch.tanh(x)
    return _BUFFER * x.sum() + _BUFFER.roll(1)


@pytest.mark.parametrize("where", ["global", "closure"])
def test_an_f_that_writes_into_a_tensor_it_holds_runs_again(ray_session, tmp_path, where):
    """NOTE: [captured tensors]: the first run left the tensor in the graph (requires_grad,
    a grad_fn), and every later run's workers refused f's in-place write."""
    held = torch.zeros(6, dtype=torch.float64)

    def writes_a_closure(x: torch.Tensor) -> torch.Tensor:
        held[:] = torch.tanh(x)
        return held * x.sum() + held.roll(1)

    f, tensor = (_writes_a_global, _BUFFER) if where == "global" else (writes_a_closure, held)
    x = torch.randn(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.func.jacrev(lambda v: torch.tanh(v) * v.sum() + torch.tanh(v).roll(1))(x)
    for run in range(2):
        jac = raijac.compute(raijac.Problem(f, x), tmp_path / f"w{run}.zarr", workers=2)
        assert rel_err(jac[...], want) < 1e-12
        assert not tensor.requires_grad and tensor.grad_fn is None


def _spectral_net(training: bool) -> torch.nn.Module:
    """A spectral-normed layer whose power iteration has not converged: each call in training
    mode moves its `_u`, `_v` buffers in place, and the output with them."""
    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 16), n_power_iterations=1), torch.nn.Tanh()
    )
    return net.train(training)


@pytest.mark.parametrize("wrt", ["input", "params"])
def test_state_changed_in_place_that_moves_the_output_is_refused(wrt):
    """NOTE: [changed in place]: spectral norm in training mode moved y by ~1e-6 between two
    calls (under the two-call agreement's tolerance) and J by ~1e-4, and was stored."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        ProblemError, match=r"f changes 0\.parametrizations\.weight\.0\._u, .*_v in place on every call.*module\.eval"
    ):
        raijac.Problem.from_module(_spectral_net(training=True), x, wrt=wrt, batched=True).y  # noqa: B018


def test_state_changed_in_place_that_leaves_the_output_alone_runs(ray_session, tmp_path):
    """Buffers f changes in place without moving its output pass: BatchNorm's running
    statistics in training mode (unbatched), and spectral norm in eval mode, whose J is
    compared with torch.func."""
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).train()
    x = torch.randn(6, 5, dtype=torch.float64)
    bn = bn.double()
    want = torch.autograd.functional.jacobian(copy.deepcopy(bn), x)  # plain autograd: the running stats are written
    probe = copy.deepcopy(bn)
    probe(x)
    assert probe[1].num_batches_tracked.item() == 1  # f does change them in place
    jac = raijac.compute(raijac.Problem(bn, x), tmp_path / "bn.zarr", workers=2)
    assert rel_err(jac[...], want.reshape(24, 30)) < 1e-12
    net = _spectral_net(training=False)
    xs = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    want = torch.stack([torch.func.jacrev(lambda v: net(v[None])[0])(xs[b]) for b in range(3)])
    spec = tmp_path / "spectral.py"  # parametrized modules travel as specs (torch cannot pickle them)
    spec.write_text(SPECTRAL_SPEC)
    jac = raijac.compute(f"{spec}:problem", tmp_path / "sn.zarr", workers=2)
    assert rel_err(jac[...], want) < 1e-5


SPECTRAL_SPEC = """
import torch
import raijac


def problem():
    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 16), n_power_iterations=1), torch.nn.Tanh()
    )
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    return raijac.Problem.from_module(net.eval(), x, wrt="input", batched=True)
"""


def test_caller_state_is_restored_after_an_error(tmp_path):
    net = _bn_net()
    problem = raijac.Problem(net, torch.randn(5, 4))
    before = _snapshot(net)
    with pytest.raises(ModeError):
        raijac.plan(problem, mode="rev-repeat")
    _assert_unchanged(net, before)


def test_a_module_moved_or_cast_during_a_run_is_given_back():
    """What a probe on a GPU does to the caller's module (Module.to swaps .data, .grad's
    .data and the buffers), shown with a dtype cast, which takes the same path."""
    from raijac.guard import keep_caller_state

    net = _bn_net()
    net[0].weight.grad = torch.ones_like(net[0].weight)
    problem = raijac.Problem.from_module(net, torch.randn(5, 4), wrt="input")
    before = _snapshot(net)
    buffer = net[1].running_mean
    with keep_caller_state(problem):
        net.to(torch.float64).eval()
        net[1].running_mean.add_(1.0)
        net[0].weight.grad = None
    _assert_unchanged(net, before)
    assert net[0].weight.dtype == torch.float32 and net[0].weight.grad.dtype == torch.float32
    assert net[1].running_mean is buffer


def test_modules_in_a_functions_closure_are_given_back(ray_session, tmp_path):
    net = _bn_net()
    x = torch.randn(5, 4)
    before = _snapshot(net)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z).sum(0)

    raijac.compute(raijac.Problem(f, x), tmp_path / "closure.zarr", workers=2)
    _assert_unchanged(net, before)


@pytest.mark.gpu
def test_plan_on_a_gpu_leaves_the_module_on_the_cpu():
    net = _bn_net()
    net[0].weight.grad = torch.ones_like(net[0].weight)
    problem = raijac.Problem.from_module(net, torch.randn(5, 4), wrt="params")
    before = _snapshot(net)
    raijac.plan(problem)  # measures its memory on the first GPU
    _assert_unchanged(net, before)
    assert all(t.device.type == "cpu" for t in [*net.parameters(), *net.buffers(), net[0].weight.grad])


@pytest.mark.gpu
def test_random_function_on_a_gpu_is_refused_unless_it_draws_the_same():
    problem = raijac.Problem(dropout_mlp(6, 3), torch.randn(6))
    with pytest.raises(ProblemError, match="replayed on cuda.*draws other ones than on cpu"):
        make_target(problem, "cuda")


# ---------------------------------------------------------------------- bfloat16 and empty
def test_bfloat16_input_stored_as_float32(ray_session, tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    x = torch.randn(6, dtype=torch.bfloat16)
    jac = raijac.compute(raijac.Problem(net, x), tmp_path / "bf16.zarr", dtype="float32", workers=2)
    assert jac.dtype == np.float32 and np.asarray(jac.y).dtype == np.float32
    want = torch.func.jacrev(net)(x)  # the same function in bfloat16
    assert rel_err(jac[...], want.float()) < 2e-2
    np.testing.assert_array_equal(np.asarray(jac.x), x.float().numpy())  # bfloat16 fits float32 exactly
    np.testing.assert_array_equal(np.asarray(jac.y), net(x).detach().float().numpy())


def test_bfloat16_needs_a_storage_dtype(tmp_path):
    problem = raijac.Problem(torch.tanh, torch.randn(4, dtype=torch.bfloat16))
    with pytest.raises(ProblemError, match="bfloat16.*--dtype"):
        raijac.plan(problem)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: raijac.Problem(torch.sin, torch.randn(0)), "x is empty.*nothing to compute"),
        (lambda: raijac.Problem(torch.sin, torch.randn(0, 3), batched=True), "x is empty"),
        (lambda: raijac.Problem(lambda x: x[:0], torch.randn(3)), "empty tensor.*no rows"),
        (lambda: raijac.Problem(lambda x: x[:, :0], torch.randn(2, 3), batched=True), "empty tensor"),
        (
            lambda: raijac.Problem.from_module(torch.nn.Linear(3, 2), torch.randn(0, 3), batched=True),
            "no samples",
        ),
    ],
    ids=["x", "batch", "output", "batched-output", "params-batch"],
)
def test_empty_inputs_and_outputs_are_one_clear_error(tmp_path, build, match):
    with pytest.raises(ProblemError, match=match):
        raijac.compute(build(), tmp_path / "empty.zarr")
    assert not (tmp_path / "empty.zarr").exists()


def _invoke(*args: object, env: dict | None = None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def _spec(tmp_path, body: str) -> str:
    path = tmp_path / "spec.py"
    path.write_text("import torch\nimport raijac\n\n" + textwrap.dedent(body))
    return f"{path}:problem"


def test_cli_empty_input_is_one_line(tmp_path):
    spec = _spec(tmp_path, "def problem():\n    return raijac.Problem(torch.sin, torch.zeros(0))\n")
    result = _invoke("compute", spec, "--out", tmp_path / "e.zarr")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: x is empty"), result.stderr


# ---------------------------------------------------------------------- destructive options
@pytest.fixture
def finished_store(ray_session, tmp_path):
    spec = _spec(tmp_path, "problem = raijac.Problem(torch.sin, torch.arange(4.0))\n")
    out = tmp_path / "done.zarr"
    raijac.compute(spec, out, workers=2)
    return spec, out


def _tree(path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(path)
        for f in files
    }


@pytest.mark.parametrize("variable", ["RAIJAC_COMPUTE_OVERWRITE", "RAIJAC_COMPUTE_RESUME"])
def test_environment_cannot_turn_on_destructive_options(finished_store, variable):
    spec, out = finished_store
    before = _tree(out)
    result = _invoke("compute", spec, "--out", out, "--workers", 2, env={variable: "1"})
    assert result.exit_code == 1, result.output
    assert "already holds a raijac store" in result.stderr and "--overwrite" in result.stderr
    assert _tree(out) == before


def test_environment_still_sets_harmless_options(finished_store, tmp_path):
    spec, _ = finished_store
    result = _invoke("plan", spec, env={"RAIJAC_PLAN_MODE": "loop"})
    assert result.exit_code == 0, result.output
    assert "loop" in result.stdout


# ---------------------------------------------------------------------- narrowed catch-alls
_READ_META = """
import sys
from raijac import store
from raijac.errors import StoreError
try:
    store.check_out(sys.argv[1], resume=False, overwrite=True)
except StoreError as exc:
    print(exc)
"""


def test_unreadable_store_says_permission(finished_store, tmp_path):
    """A store we may not read is not 'not a raijac store' (which sends users to delete it)."""
    _, out = finished_store
    os.chmod(out / "zarr.json", 0)
    command = [sys.executable, "-c", _READ_META, str(out)]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    os.chmod(out / "zarr.json", 0o644)
    assert done.returncode == 0, done.stderr
    assert "permission denied" in done.stdout and "not a raijac store" not in done.stdout, done.stdout


@pytest.mark.parametrize("content", [b"{not json", b"plain text"], ids=["bad-zarr-json", "text"])
def test_other_data_is_still_not_a_raijac_store(tmp_path, content):
    out = tmp_path / "other"
    out.mkdir()
    (out / ("zarr.json" if content.startswith(b"{") else "notes.txt")).write_bytes(content)
    with pytest.raises(StoreError, match="not a raijac store"):
        raijac.compute(raijac.Problem(torch.sin, torch.randn(3)), out, overwrite=True)


def test_peel_surfaces_its_own_errors(monkeypatch):
    """Only f that cannot be traced turns the chain off; an error in raijac's walk is a bug to see."""
    from raijac import peel

    w1, w2 = torch.randn(5, 4), torch.randn(3, 5)

    def f(x):
        return w2 @ torch.tanh(w1 @ x)

    assert peel.peel_chain(f, torch.randn(4)) is not None

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the walk")

    monkeypatch.setattr(peel, "_pointwise", broken)
    with pytest.raises(RuntimeError, match="a bug in the walk"):
        peel.peel_chain(f, torch.randn(4))


def test_peel_off_for_untraceable_function():
    from raijac import peel

    def f(x):
        raise NotImplementedError("no tracing here")

    assert peel.peel_chain(f, torch.randn(4)) is None


def test_rounding_level_differences_between_calls_are_not_randomness():
    """A large product may round differently from one call to the next (MKL splits it by the
    threads it has): that f is deterministic; a change of 1% between calls is not."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    calls = [0]

    def wobbly(scale: float):
        def f(x):
            calls[0] += 1
            return (x @ w.T) * (1 + scale * calls[0])

        return f

    problem = raijac.Problem(wobbly(2e-5), torch.randn(64))  # refused by the old per-entry 1e-5 of the largest
    assert problem.y.shape == (64,) and not problem.random
    with pytest.raises(ProblemError, match="different outputs on two calls"):
        _ = raijac.Problem(wobbly(1e-2), torch.randn(64)).y


def _count_checks(monkeypatch) -> list[int]:
    """Spies on f's own checks (NOTE: [checked before]): one entry per batch checked."""
    import raijac.problem

    calls: list[int] = []
    real = raijac.problem.check_independent_samples
    monkeypatch.setattr(raijac.problem, "check_independent_samples", lambda p, y: calls.append(int(y.shape[0])) or real(p, y))
    return calls


def test_a_loop_over_new_points_checks_f_once(ray_session, tmp_path, monkeypatch):
    """NOTE: [checked before]: the same module at the same shapes, at a new x and with new
    weights, skips the second f(x) and the independence checks when every block is checked;
    J stays right against torch.func at every point."""
    calls = _count_checks(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    evaluations = []
    model.register_forward_hook(lambda *_: evaluations.append(1))
    for step in range(3):
        x = torch.randn(6, 5)
        with torch.no_grad():
            model[0].weight.add_(0.1)  # a training step between the runs
        evaluations.clear()
        jac = raijac.compute(
            raijac.Problem.from_module(model, x, wrt="input", batched=True), str(tmp_path / f"{step}.zarr"), workers=2
        )
        expected = torch.func.vmap(torch.func.jacrev(lambda xb: model(xb[None])[0]))(x)
        np.testing.assert_allclose(jac.numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-6)
        if step == 0:
            full = len(evaluations)
    assert calls == [6]  # the first run only
    assert len(evaluations) < full  # no second f(x), no one-sample passes on the driver


def test_checks_run_again_where_the_function_or_its_flags_changed(ray_session, tmp_path, monkeypatch):
    """A module switched to training mode, other shapes, or a run without block checks, is
    checked again: batch norm in training mode is still refused after its eval-mode twin passed."""
    calls = _count_checks(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)).eval()

    def run(x: torch.Tensor, name: str, **options) -> None:
        raijac.compute(
            raijac.Problem.from_module(model, x, wrt="input", batched=True), str(tmp_path / name), workers=2, **options
        )

    run(torch.randn(8, 4), "a.zarr")
    run(torch.randn(8, 4), "b.zarr", check_blocks=False)  # unchecked blocks: f's own checks stand alone
    run(torch.randn(9, 4), "c.zarr")  # another batch size
    assert calls == [8, 8, 9]
    model.train()
    with pytest.raises(ProblemError, match="treat samples independently"):
        run(torch.randn(8, 4), "d.zarr")
    assert calls == [8, 8, 9, 8]


def test_a_refused_function_is_refused_every_time(ray_session, tmp_path):
    """Only passes are kept (NOTE: [checked before]): a function refused once is checked,
    and refused, again on the next run."""
    state = {"calls": 0}

    def f(z: torch.Tensor) -> torch.Tensor:
        state["calls"] += 1
        return torch.sin(z) * (1 + state["calls"] * 1e-3)  # state kept between calls

    for name in ("a.zarr", "b.zarr"):
        with pytest.raises(ProblemError, match="different outputs on two calls"):
            raijac.compute(raijac.Problem(f, torch.randn(4)), str(tmp_path / name), workers=2)


def test_a_parametrized_module_from_python_is_one_clear_error(ray_session, tmp_path):
    """torch cannot pickle torch.nn.utils.parametrize modules; the error was torch's own,
    several lines long, from raijac's shipping step."""
    net = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(3, 2))
    problem = raijac.Problem.from_module(net, torch.randn(4, 3), wrt="params", batched=True)
    with pytest.raises(raijac.ProblemError, match=r"parametrize .* cannot pickle .* spec file"):
        raijac.compute(problem, tmp_path / "p.zarr", workers=2)
    assert not any(tmp_path.iterdir())  # nor a staged store beside it (NOTE: [staged store])


def test_a_cache_f_keeps_on_its_module_is_given_back(ray_session, tmp_path):
    """NOTE: [kept state]: a run leaves the caller's module without the attributes f set on it."""
    from tests.test_problem import _ConstantCache

    module = _ConstantCache()
    x = torch.randn(4, 3)
    jac = raijac.compute(raijac.Problem.from_module(module, x, wrt="input", batched=True), tmp_path / "c.zarr", workers=2)
    assert module.mask is None and module.cache is None
    want = torch.func.vmap(torch.func.jacrev(lambda v: module.lin(v)))(x)
    assert rel_err(jac[...], want) < 1e-6


def test_an_f_returning_float16_passes_its_block_check(ray_session, tmp_path):
    """The check compared a float32 block's float16 projection at float32's tolerance: a
    right J failed every mode."""
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(4))

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w.T).half()

    x = torch.randn(5, generator=torch.Generator().manual_seed(5))
    jac = raijac.compute(raijac.Problem(f, x), tmp_path / "h.zarr", workers=2, block_size=3)
    want = torch.func.jacrev(lambda v: torch.tanh(v.double() @ w.double().T))(x)
    assert rel_err(jac[...].astype("float64"), want) < 2e-3


def test_float16_storage_that_would_overflow_is_refused(ray_session, tmp_path):
    x = torch.linspace(1, 2, 6)
    with pytest.raises(raijac.WorkerError, match=r"beyond the largest float16 \(65504\).*dtype='float32'"):
        raijac.compute(raijac.Problem(lambda v: (400 * v) ** 2, x), tmp_path / "o.zarr", workers=2, dtype="float16")


def test_resume_refuses_a_float64_f_that_moved_by_rounding_size(ray_session, tmp_path):
    """A 1e-5 tolerance on y let an f whose weights moved by 2e-7 resume a float64 store."""
    w = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = torch.randn(4, dtype=torch.float64)
    out = tmp_path / "r.zarr"
    raijac.compute(raijac.Problem(lambda v: torch.tanh(v @ w.T), x), out, workers=2)
    moved = w * (1 + 2e-7)
    with pytest.raises(raijac.StoreError, match="f\\(x\\) differs from the y stored"):
        raijac.compute(raijac.Problem(lambda v: torch.tanh(v @ moved.T), x), out, workers=2, resume=True)


# ---------------------------------------------------------------------- torch's own derivatives
def _cube(wrong: str) -> type[torch.autograd.Function]:
    """x**3 as a custom Function whose `wrong` formula ("backward": reverse mode, "jvp":
    forward mode) says 2x**2 instead of 3x**2."""

    class Cube(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x**3

        @staticmethod
        def setup_context(ctx, inputs, output):
            (x,) = inputs
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (2 if wrong == "backward" else 3) * x**2

        @staticmethod
        def jvp(ctx, t):
            (x,) = ctx.saved_tensors
            return t * (2 if wrong == "jvp" else 3) * x**2

    return Cube


_CUBES = {wrong: _cube(wrong) for wrong in ("backward", "jvp", "none")}


def _cube_net(x: torch.Tensor, wrong: str = "backward") -> torch.Tensor:
    w = torch.linspace(-1.0, 1.0, x.shape[-1] * 4, dtype=x.dtype).reshape(4, x.shape[-1])
    return torch.tanh(_CUBES[wrong].apply(x) @ w.T)


def _cube_net_wrong_jvp(x: torch.Tensor) -> torch.Tensor:
    return _cube_net(x, "jvp")


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["auto", "rev", "loop", "fwd"])
def test_a_wrong_backward_formula_is_refused_before_anything_is_stored(store_path, dtype, mode):
    """NOTE: [adjoint test]: every mode and the block check use the wrong backward alike, so
    only forward mode and finite differences can tell; mode fwd without the block check
    then gives the right J (against the closed form and float64 finite differences)."""
    x = torch.linspace(0.5, 1.5, 6, dtype=dtype)
    with pytest.raises(ProblemError, match=r"reverse-mode derivative of f is wrong here.*mode='fwd' and check_blocks=False"):
        raijac.compute(raijac.Problem(_cube_net, x), store_path, workers=2, mode=mode)
    assert not os.path.exists(store_path)
    jac = raijac.compute(raijac.Problem(_cube_net, x), store_path, workers=2, mode="fwd", check_blocks=False)
    w = torch.linspace(-1.0, 1.0, 24, dtype=torch.float64).reshape(4, 6)
    x64 = x.double()
    want = (1 - torch.tanh(x64**3 @ w.T) ** 2)[:, None] * w * 3 * x64**2  # d tanh(x^3 W^T) / dx
    fd = torch.stack(
        [(_cube_net(x64 + 1e-6 * e) - _cube_net(x64 - 1e-6 * e)) / 2e-6 for e in torch.eye(6, dtype=torch.float64)], 1
    )
    assert rel_err(fd, want) < 1e-8
    assert rel_err(np.asarray(jac.numpy()), want) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.usefixtures("ray_session")
def test_a_wrong_forward_formula_is_left_to_the_block_check(store_path):
    """A wrong jvp is no reason to refuse f: auto's forward blocks fail their check against
    autograd and it falls back to a row mode, whose J is right."""
    x = torch.linspace(0.5, 1.5, 2, dtype=torch.float64)  # M=4 > N=2: auto starts with fwd
    problem = raijac.Problem(_cube_net_wrong_jvp, x)
    assert problem.reverse_mode_error is None
    jac = raijac.compute(problem, store_path, workers=2)
    assert jac.mode != "fwd"
    assert rel_err(jac.numpy(), torch.func.jacrev(_cube_net)(x, "none")) < 1e-12


def test_torchs_wrong_as_strided_scatter_backward_is_caught():
    """The torch bug that motivated NOTE: [adjoint test]: the gradient of as_strided_scatter
    into an offset of a larger tensor lands on the wrong entries (J 100% off)."""

    def f(x):
        return torch.cat([2 * x, torch.as_strided_scatter(torch.zeros(36, dtype=x.dtype), x, (6,), (5,), 3)])

    x = torch.arange(1.0, 7.0, dtype=torch.float64)
    truth = torch.zeros(42, 6, dtype=torch.float64)
    truth[torch.arange(6), torch.arange(6)] = 2.0
    truth[9 + 5 * torch.arange(6), torch.arange(6)] = 1.0
    if rel_err(torch.autograd.functional.jacobian(f, x), truth) < 1e-12:
        pytest.skip("this torch's as_strided_scatter backward is right")
    wrong = raijac.Problem(f, x).reverse_mode_error
    assert wrong is not None and "reverse-mode derivative of f is wrong" in str(wrong)
    # mode fwd cannot vmap as_strided_scatter's forward mode: the refusal says no mode works.
    assert not wrong.fwd_works and "no mode gives this J right" in str(wrong)


@pytest.mark.parametrize(
    "f",
    [
        lambda x: torch.relu(x).amax(dim=-1),  # ties at 0
        lambda x: torch.sort(x).values * torch.arange(6.0),
        lambda x: torch.floor(3 * x) + x.abs(),
        lambda x: torch.nn.functional.max_pool1d(torch.relu(x)[None], 2)[0],
        # |x| at 0 where forward mode (fmax: 0) and reverse mode (relu: 1) take different valid
        # slopes, and central differences agree with forward mode: one-sided ones jump there.
        lambda x: torch.fmax(x, torch.zeros_like(x)) + torch.relu(-x),
    ],
)
def test_functions_that_are_not_smooth_everywhere_are_not_refused(f):
    """Where f is not differentiable at x, finite differences side with neither mode: no refusal."""
    for x in (torch.zeros(6), torch.randn(6, generator=torch.Generator().manual_seed(0))):
        assert raijac.Problem(f, x).reverse_mode_error is None


def test_a_shared_tensor_passed_as_a_batched_argument_is_named():
    """A weight given as an argument of a batched problem is cut into samples with x: f on one
    sample then returns another shape, which used to surface as every mode's reshape error;
    the error names the argument and `shared`, which passes it whole."""
    w, x = torch.randn(8, 7), torch.randn(8, 7)
    problem = raijac.Problem(lambda x, w: torch.tanh(x @ w.T), x, w, argnums=0, batched=True)
    with pytest.raises(
        ProblemError,
        match=r"on sample 0 alone it returned shape \(1, 1\) where the batch gives \(8,\).*slice of args\[1\].*in shared=",
    ):
        problem.y  # noqa: B018
    whole = raijac.Problem(lambda x, w: torch.tanh(x @ w.T), x, w, argnums=0, batched=True, shared=(1,))
    assert torch.equal(whole.y, torch.tanh(x @ w.T))


def test_a_causal_mask_cut_into_as_many_samples_as_it_has_rows_is_named():
    """A (6, 6) causal mask passed positionally with B=6 samples is cut into rows, one per
    sample, which reads as samples coupled: the refusal names the mask and `shared`, not
    only batch norm; passed whole, the problem is accepted."""
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) / 3
    causal = torch.full((6, 6), float("-inf")).triu(1)

    def attend(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax((x @ w) @ x.transpose(-1, -2) / 8**0.5 + mask, -1) @ x

    x = torch.randn(6, 6, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        ProblemError, match=r"or args\[1\] the same for every sample but cut into samples\? pass that whole with shared=\(1,\)"
    ):
        raijac.Problem(attend, x, causal, batched=True).y  # noqa: B018
    assert raijac.Problem(attend, x, causal, batched=True, shared=(1,)).y.shape == (6, 6, 8)


@pytest.mark.usefixtures("ray_session")
def test_a_sample_whose_gradient_is_nan_is_no_coupling(store_path):
    """sqrt of a zero sample's squared norm: the independence check's backward gives that
    sample NaN (a zero cotangent times an infinite slope), which read as a dependence."""
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], dtype=torch.float64)

    def norm(x):
        return torch.sqrt((x**2).sum(-1, keepdim=True))

    jac = raijac.compute(raijac.Problem(norm, x, batched=True), store_path, workers=2)
    want = torch.func.vmap(torch.func.jacrev(norm))(x)
    np.testing.assert_array_equal(np.isnan(jac.numpy()), torch.isnan(want).numpy())
    assert rel_err(np.nan_to_num(jac.numpy()), torch.nan_to_num(want)) < 1e-15


def _nan_where_every_key_is_masked(z: torch.Tensor) -> torch.Tensor:
    """Attention over z's entries with the negative ones masked out: a sample whose entries are
    all negative has every key masked, and softmax over only -inf gives NaN, alone or in the batch."""
    scores = (z[:, :, None] * z[:, None, :]).masked_fill(z[:, None, :] < 0, float("-inf"))
    return torch.softmax(scores, -1) @ z[:, :, None]


def _nan_only_in_the_batch(z: torch.Tensor) -> torch.Tensor:
    y = torch.tanh(z)
    return y if z.shape[0] == 1 else torch.where(torch.arange(z.shape[0])[:, None] == 1, torch.nan, y)


@pytest.mark.usefixtures("ray_session")
def test_a_sample_that_is_nan_alone_and_in_the_batch_is_independent(store_path):
    """A padding mask that hides every key of a sample makes that sample NaN whichever way f sees
    it; the independence check compared NaN with NaN and refused the batch as coupled. The run
    goes on, says J is not all finite, and the other samples' J are right."""
    x = torch.tensor([[1.0, 2.0, -0.5], [-1.0, -2.0, -0.5], [0.5, -1.0, 2.0]])
    assert torch.isnan(_nan_where_every_key_is_masked(x)[1]).all()
    jac = raijac.compute(raijac.Problem(_nan_where_every_key_is_masked, x, batched=True), store_path, workers=2)
    assert jac.summary["all_finite"] is False
    got = jac.numpy()
    assert np.isnan(got[1]).all()
    for b in (0, 2):
        want = torch.func.jacrev(lambda z: _nan_where_every_key_is_masked(z[None])[0])(x[b]).reshape(3, 3)
        np.testing.assert_allclose(got[b], want.numpy(), rtol=1e-5, atol=1e-6)
    # NaN in the batch where f on the sample alone has none is still coupling.
    with pytest.raises(ProblemError, match=r"treat samples independently.*sample 1 alone in where it is NaN or inf"):
        _ = raijac.Problem(_nan_only_in_the_batch, torch.randn(3, 2), batched=True).y


def test_a_workers_own_copy_of_an_input_problem_holds_weights_that_do_not_require_grad(ray_session):
    """NOTE: [no outer graph]: the host's copy of an input problem stops the weights and
    captured leaves f holds requiring grad (torch.func would record its backward for them),
    and its blocks stay torch.func's; the caller's module, and a parameter problem, keep
    their flags."""
    import ray

    from raijac.guard import stop_outer_grad
    from raijac.shipping import pack
    from raijac.worker import WorkerHost

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    scale = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 5, dtype=torch.float64)
    problem = raijac.Problem(lambda v: net(v) * scale, x, batched=True)
    host = WorkerHost.__new__(WorkerHost)  # its loading alone (its __init__ tunes this process's heap)
    copy = host._source([ray.put(pack(problem))])
    held = [p for m in modules_of(copy) for p in m.parameters()]
    assert len(held) == 4 and not any(p.requires_grad for p in held)
    assert not any(t.requires_grad for t in captured_tensors(copy))
    assert all(p.requires_grad for p in net.parameters()) and scale.requires_grad  # the caller's
    kernel = Kernel(make_target(copy), "rev")
    block = kernel(0, 4, 0, 3)
    assert block.grad_fn is None
    want = torch.func.vmap(torch.func.jacrev(lambda v: net(v) * scale))(x).detach()
    np.testing.assert_allclose(block.numpy(), want.numpy(), rtol=1e-12, atol=1e-14)
    params = raijac.Problem.from_module(net, x, wrt="params", batched=True)
    stop_outer_grad(params)
    assert all(p.requires_grad for p in net.parameters())


def _inner_gradient(model: torch.nn.Module):
    """An influence function's inner step: f(x) is the gradient of a loss w.r.t. the model's
    own weight, so f needs that weight to require grad."""

    def f(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (g,) = torch.autograd.grad((torch.tanh(model(x)) ** 2).sum(), model.weight, create_graph=True)
        return g.reshape(-1)

    return f


def test_an_f_that_differentiates_its_own_weights_keeps_them_requiring_grad_on_the_workers(ray_session, store_path):
    """NOTE: [no outer graph]: the driver's second call of f runs with the weights frozen,
    where this f raises, so the workers leave them requiring grad (they refused every
    block before), and J is plain autograd's (torch.func cannot run this f)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    f = _inner_gradient(model)
    x = torch.randn(4, dtype=torch.float64)
    problem = raijac.Problem(f, x)
    assert not problem.freezable
    assert raijac.Problem(lambda v: model(v), x).freezable
    jac = raijac.compute(problem, store_path, workers=2)
    want = torch.autograd.functional.jacobian(f, x).numpy()  # torch.func cannot run autograd.grad inside
    np.testing.assert_allclose(jac.numpy(), want, rtol=1e-10, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())


class _FrozenBackbone(torch.nn.Module):
    """The frozen-backbone idiom: the backbone runs without a graph when none of its weights
    train, so with them frozen y is the same and dy/dx through the backbone is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh()).double()
        self.head = torch.nn.Linear(6, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = any(p.requires_grad for p in self.backbone.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            h = self.backbone(x)
        return self.head(h)


def test_an_f_whose_derivative_hangs_on_its_weights_flags_keeps_them_requiring_grad(ray_session, store_path):
    """NOTE: [no outer graph]: the same y with the weights frozen is not enough (a frozen
    backbone gives J 0 through itself then): one VJP of f, frozen and not, must agree too
    before workers freeze them; J is plain autograd's."""
    torch.manual_seed(0)
    net = _FrozenBackbone()
    x = torch.randn(4, dtype=torch.float64)
    problem = raijac.Problem.from_module(net, x, wrt="input")
    assert not problem.freezable
    jac = raijac.compute(problem, store_path, workers=2)
    want = torch.autograd.functional.jacobian(net, x)
    np.testing.assert_allclose(jac.numpy(), want.numpy(), rtol=1e-10, atol=1e-12)


def test_y_is_f_on_the_path_its_jacobian_differentiates(ray_session, store_path):
    """NOTE: [y on the path differentiated]: an nn.TransformerEncoder in eval mode given a key
    padding mask returns 0 at padded positions under no_grad (torch's fast path) and values on
    its autograd path; the stored y is the autograd path's, J torch.func's, and verify agrees."""
    from raijac.verify import verify

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(4, 6, 16)
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[1, 4:], pad[3, 2:] = True, True
    with torch.no_grad():
        fast = enc(x, src_key_padding_mask=pad)
    differentiated = enc(x, src_key_padding_mask=pad).detach()
    assert float((fast - differentiated).abs().max()) > 0.1  # torch's two paths differ: the case
    problem = raijac.Problem.from_module(enc, x, kwargs=dict(src_key_padding_mask=pad), wrt="input", batched=True)
    jac = raijac.compute(problem, store_path, workers=2)
    np.testing.assert_allclose(jac.y, differentiated.numpy(), rtol=1e-5, atol=1e-5)
    want = torch.stack(
        [torch.func.jacrev(lambda v, b=b: enc(v[None], src_key_padding_mask=pad[b : b + 1])[0])(x[b]) for b in range(4)]
    )
    np.testing.assert_allclose(jac.numpy(), want.detach().reshape(jac.shape).numpy(), rtol=1e-4, atol=1e-6)
    assert verify(store_path, problem=problem).ok


class _Toggled(torch.nn.Module):
    """A module whose plain attribute switches on a mean over the batch (a coupling of samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.couple = torch.nn.Linear(6, 5).double(), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.tanh(h - h.mean(0, keepdim=True) if self.couple else h)


@pytest.mark.parametrize("mode", ["auto", "loop"])
def test_a_run_that_took_fs_checks_on_trust_names_what_changed(ray_session, store_path, mode):
    """NOTE: [checked before]: a second run of the same module object skips f's own checks;
    coupled since by a flag the memo cannot see, every mode then disagrees with plain
    autograd. The run checks f again and names the coupling, not every mode's numbers."""
    net = _Toggled()
    x = torch.randn(4, 6, dtype=torch.float64)
    raijac.compute(raijac.Problem.from_module(net, x, wrt="input", batched=True), store_path, workers=2)
    net.couple = True
    with pytest.raises(ProblemError, match=r"batched=True needs f to treat samples independently.*a mean over the batch"):
        raijac.compute(
            raijac.Problem.from_module(net, x, wrt="input", batched=True), store_path, workers=2, overwrite=True, mode=mode
        )


def test_which_tensors_f_holds_require_grad_is_part_of_the_memo_key():
    """NOTE: [no outer graph]: workers freeze the tensors f holds only where f is the same
    function frozen (`Problem.freezable`, kept in the memo with f's checks). Freezing or
    unfreezing a weight since may change that, so the memo's key holds the flags, of module
    parameters and of captured tensors alike."""
    from raijac.memo import memo_key

    torch.manual_seed(0)
    net = _FrozenBackbone()
    scale = torch.ones(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, dtype=torch.float64)

    def key() -> tuple:
        return memo_key(raijac.Problem(lambda v: net(v) * scale, x), "auto")[1]

    first = key()
    assert key() == first
    net.backbone[0].weight.requires_grad_(False)
    second = key()
    assert second != first
    scale.requires_grad_(False)
    assert key() != second
