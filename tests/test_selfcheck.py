"""No silent wrong Jacobian: the per-block check (kernels.block_error, run by the worker before
every write) and the chain modes with in-place activations, against torch.func / autograd."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import zarr
from click.testing import CliRunner

import raijac
from raijac import modes, store
from raijac.errors import BlockCheckError, KernelError, WorkerError
from raijac.guard import REPLAY_SEED
from raijac.kernels import Kernel, NoReference, block_error, check_rtol, make_target, relative_error, seed_axis
from raijac.probe import resolve_mode
from raijac.sparsity import choose, resolve_pattern
from raijac.worker import Worker
from tests.problems import CASES, LyingJvp, NumpyDouble


def numpy_middle(x: torch.Tensor) -> torch.Tensor:
    """Batch-aware (K, 64) -> (K, 128): only inputs 24:32 pass through NumpyDouble, so
    fwd-repeat gets exactly those columns wrong (zeros), and rev-repeat all of them right."""
    h = torch.cat([torch.tanh(x[:, :24]), NumpyDouble.apply(x[:, 24:32]), torch.sin(x[:, 32:])], dim=1)
    return torch.cat([h, h * h], dim=1)


def _autograd_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians (B, M, N) from torch.autograd.functional, one sample at a time."""
    return torch.stack([torch.autograd.functional.jacobian(lambda v: f(v[None])[0], xi) for xi in x])


def _corrupt(block: torch.Tensor, rel: float) -> torch.Tensor:
    """The block with its largest entry off by `rel` of the block's norm."""
    bad = block.contiguous().clone()
    flat = bad.view(-1)
    i = int(flat.abs().argmax())
    flat[i] += rel * block.norm() * (1 if flat[i] >= 0 else -1)
    return bad


# ---------------------------------------------------------------------- block_error
CHECKED = [(c, m) for c in CASES for m in c.modes if c.name not in ("old_style_function",)]


@pytest.mark.parametrize("case,mode", CHECKED, ids=[f"{c.name}-{m}" for c, m in CHECKED])
def test_right_blocks_pass_and_wrong_ones_fail(case, mode):
    """Every working mode's blocks of every test problem pass; one entry off by 30% of the block fails."""
    target = make_target(case.build())
    n_seed = target.n_out if seed_axis(mode) == "rows" else target.n_in
    b1, s0, s1 = min(target.n_samples, 3), n_seed // 3, n_seed
    block = Kernel(target, mode)(0, b1, s0, s1).detach()
    rows = seed_axis(mode) == "rows"
    rtol = check_rtol(block.dtype)
    assert block_error(target, block, 0, b1, s0, s1, rows) <= rtol / 10
    assert block_error(target, _corrupt(block, 0.3), 0, b1, s0, s1, rows) > rtol


@pytest.mark.parametrize("mode", ["rev", "fwd", "loop"])
def test_sparse_compressed_blocks_are_checked(mode):
    """A coloured block S^T J or J S is checked against (u^T S^T) J or (u^T J) S."""

    def stencil(u):
        return torch.cat([u[:1], u[:-2] - 2 * u[1:-1] + u[2:] + torch.sin(u[1:-1]), u[-1:] ** 2])

    n = 30
    pattern = sp.diags_array([np.ones(n - abs(k)) for k in (-1, 0, 1)], offsets=[-1, 0, 1], shape=(n, n)).tocsr()
    problem = raijac.Problem(stencil, torch.randn(n, dtype=torch.float64), sparsity=pattern)
    colouring = choose(resolve_pattern(problem), mode)[0]
    colours = torch.from_numpy(colouring.colours.astype(np.int64))
    target = make_target(problem)
    block = Kernel(target, mode, colours)(0, 1, 0, colouring.n_colours).detach()
    rows = seed_axis(mode) == "rows"
    assert block_error(target, block, 0, 1, 0, colouring.n_colours, rows, colours) < 1e-12
    assert block_error(target, _corrupt(block, 0.01), 0, 1, 0, colouring.n_colours, rows, colours) > 1e-3
    # Blocks of one colour only are checked against their own colour's entries.
    one = Kernel(target, mode, colours)(0, 1, 1, 2).detach()
    assert block_error(target, one, 0, 1, 1, 2, rows, colours) < 1e-12


def test_hessian_blocks_are_checked():
    """f is a gradient: the reference VJP is a double backward through it."""

    def energy(x):
        return (x.sin() * x.roll(1)).sum() + x.pow(4).sum() / 4

    problem = raijac.Problem.hessian(energy, torch.randn(12, dtype=torch.float64))
    target = make_target(problem)
    block = Kernel(target, "rev")(0, 1, 3, 9).detach()
    np.testing.assert_allclose(block[0].numpy(), torch.func.hessian(energy)(problem.x)[3:9].numpy(), rtol=1e-12)
    assert block_error(target, block, 0, 1, 3, 9, True) < 1e-12
    assert block_error(target, _corrupt(block, 0.01), 0, 1, 3, 9, True) > 1e-3


def test_every_sample_of_a_block_is_checked():
    """One wrong sample among many fails the block, however right the others are."""
    x = torch.randn(6, 5, dtype=torch.float64)
    target = make_target(raijac.Problem(lambda v: torch.tanh(v) * v.sum(-1, keepdim=True), x, batched=True))
    block = Kernel(target, "rev")(0, 6, 0, 5).detach()
    assert block_error(target, block, 0, 6, 0, 5, True) < 1e-12
    bad = block.clone()
    bad[4] = _corrupt(bad[4], 0.01)
    assert block_error(target, bad, 0, 6, 0, 5, True) > 1e-3


def test_scale_free():
    """Relative error: a J scaled by 1e-9 is checked as strictly as at scale 1."""
    w = torch.randn(7, 9, dtype=torch.float64)
    for scale in (1.0, 1e-9):
        target = make_target(raijac.Problem(lambda v, s=scale: torch.tanh(w @ v) * s, torch.randn(9, dtype=torch.float64)))
        block = Kernel(target, "rev")(0, 1, 0, 7).detach()
        assert block_error(target, block, 0, 1, 0, 7, True) < 1e-12
        assert block_error(target, block * 1.05, 0, 1, 0, 7, True) == pytest.approx(0.05, rel=1e-6)


def _per_sample_param_problem(n: int = 20, scale: torch.Tensor | None = None) -> raijac.Problem:
    """Per-sample parameter Jacobians of a small MLP (float64), sample b's outputs times scale[b]."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    s = torch.ones(n, dtype=torch.float64) if scale is None else scale

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, v, k):
            return self.net(v) * k[:, None]

    return raijac.Problem.from_module(Scaled(), x, s, wrt="params", batched=True)


def _func_param_jacobian(problem: raijac.Problem) -> torch.Tensor:
    """(B, M, P) from torch.func: jacrev of functional_call per sample, flattened as raijac's columns."""
    module = problem.module
    names = [n for n, _ in module.named_parameters()]
    params = {n: p.detach() for n, p in module.named_parameters()}

    def one(p, v, k):
        return torch.func.functional_call(module, p, (v[None], k[None]))[0]

    jac = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0, 0))(params, *problem.ctx)
    return torch.cat([jac[n].reshape(jac[n].shape[0], jac[n].shape[1], -1) for n in names], dim=2)


def test_batched_parameter_blocks_are_checked_per_sample():
    """A batched parameter problem is checked with one plain forward per group of samples at
    shared parameters (NOTE: [shared reference]): right blocks pass, and one wrong sample
    fails the block even when its gradients are 1e-8 of the others', or all zero."""
    scale = torch.ones(20, dtype=torch.float64)
    scale[13] = 1e-8
    problem = _per_sample_param_problem(scale=scale)
    target = make_target(problem)
    assert target.shared_fn is not None
    block = Kernel(target, "rev")(0, 20, 0, 3).detach()
    torch.testing.assert_close(block, _func_param_jacobian(problem), rtol=1e-12, atol=0)
    assert block_error(target, block, 0, 20, 0, 3, True) < 1e-12
    for b in (0, 13, 19):
        bad = block.clone()
        bad[b] = _corrupt(bad[b], 0.01)
        assert block_error(target, bad, 0, 20, 0, 3, True) > 1e-3, b
        bad[b] = 0
        assert block_error(target, bad, 0, 20, 0, 3, True) > 1e-3, b
    swapped = block.clone()
    swapped[[2, 5]] = block[[5, 2]]
    assert block_error(target, swapped, 0, 20, 0, 3, True) > 1e-3
    # Rows from the middle of the outputs, and samples from the middle of the batch.
    part = Kernel(target, "rev")(7, 18, 1, 3).detach()
    assert block_error(target, part, 7, 18, 1, 3, True) < 1e-12
    assert block_error(target, _corrupt(part, 0.01), 7, 18, 1, 3, True) > 1e-3


@pytest.mark.parametrize("scale", [1.0, 1e-12, 1e-22, 1e-30])
def test_relative_error_is_scale_free_in_float32(scale):
    """A sample 5% off is 5% off however small J is: float32 squares of 1e-22 flush to zero,
    which must not read as no error at all."""
    ref = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)) * scale
    got = ref.clone()
    got[1] *= 1.05
    assert relative_error(got, ref) == pytest.approx(0.05, rel=1e-3)
    assert relative_error(ref, ref) == 0.0


def test_a_block_of_columns_whose_j_is_zero_passes_on_roundoff():
    """NOTE: [noise floor]: a transformer's key bias has J exactly 0 (softmax is shift
    invariant), which fwd and the reference both give as roundoff (1e-17) that differs by
    100% of itself: that block is right, not refused."""
    torch.manual_seed(12)
    layer = torch.nn.TransformerDecoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True).double().eval()
    tgt, memory = torch.randn(4, 6, 16, dtype=torch.float64), torch.randn(4, 5, 16, dtype=torch.float64)
    problem = raijac.Problem.from_module(layer, tgt, memory, outputs=lambda o: o[:, 2], batched=True)
    key_bias = next(i for i in problem.param_info if i.name == "self_attn.in_proj_bias").offset + 16  # q, k, v biases
    target = make_target(problem)
    block = Kernel(target, "fwd")(2, 3, key_bias, key_bias + 16).detach()
    assert float(block.abs().max()) < 1e-15  # zero up to roundoff
    assert block_error(target, block, 2, 3, key_bias, key_bias + 16, False) <= check_rtol(torch.float64) / 100


@pytest.mark.parametrize("mode", ["rev", "rev-batched", "loop"])
def test_a_block_of_rows_whose_j_is_zero_passes_on_roundoff(mode):
    """NOTE: [noise floor] for rows: outputs that are sums of a softmax are constant, so
    their rows of J are zero, computed as roundoff; over seeds whose roundoff differs
    between the two ways of differentiating, those blocks pass, and corrupted they fail."""
    failures = []
    for seed in range(8):
        torch.manual_seed(seed)
        w, v = torch.randn(6, 8, dtype=torch.float64), torch.randn(37, 8, dtype=torch.float64)

        def f(x, w=w, v=v):
            sums = [torch.softmax(c * v @ x, 0).sum(0, keepdim=True) for c in (1.0, 2.0)]
            return torch.cat([torch.tanh(w @ x), *sums])

        target = make_target(raijac.Problem(f, torch.randn(8, dtype=torch.float64)))
        block = Kernel(target, mode)(0, 1, 6, 8).detach()
        assert float(block.abs().max()) < 1e-14
        failures += [block_error(target, block, 0, 1, 6, 8, True) > check_rtol(torch.float64)]
        bad = block.clone()
        bad[0, 0, 3] = 1e-6  # small, but 1e-6 of J's scale is far above roundoff in float64
        assert block_error(target, bad, 0, 1, 6, 8, True) > check_rtol(torch.float64)
    assert not any(failures)


@pytest.mark.parametrize(("dtype", "small"), [(torch.float64, 1e-8), (torch.float32, 1e-2)])
def test_the_noise_floor_does_not_hide_a_wrong_small_block(dtype, small):
    """Columns whose J is `small` of the others' (far above roundoff, below the others'
    tolerance): zeroed, or off by 0.5%, the block still fails its check, held to its own
    relative tolerance; right, it passes."""
    torch.manual_seed(3)
    w = torch.randn(6, 8, dtype=dtype)
    scale = torch.tensor([1.0] * 5 + [small] * 3, dtype=dtype)

    def f(v):
        return torch.tanh(w @ (v * scale))

    target = make_target(raijac.Problem(f, torch.randn(8, dtype=dtype)))
    block = Kernel(target, "fwd")(0, 1, 5, 8).detach()
    rtol = check_rtol(dtype)
    assert block_error(target, block, 0, 1, 5, 8, False) <= rtol / 10
    assert block_error(target, torch.zeros_like(block), 0, 1, 5, 8, False) > rtol * 10
    assert block_error(target, block * 1.005, 0, 1, 5, 8, False) > rtol


# ---------------------------------------------------------------------- the worker's check
def _worker(problem: raijac.Problem, mode: str, **kw) -> Worker:
    args = {"mode": "auto", "dtype": "float64"}
    return Worker(
        problem, name="w0", fingerprint=problem.fingerprint(**args), fingerprint_args=args, mode=mode, dtype="float64", **kw
    )


def test_worker_refuses_a_wrong_block_and_writes_nothing():
    """fwd-repeat loses inputs 24:32 (a numpy backward has no double backward): the worker
    raises naming the block and its error instead of returning the zeros it computed."""
    problem = raijac.Problem(numpy_middle, torch.randn(3, 64, dtype=torch.float64), batched=True, batch_aware=True)
    worker = _worker(problem, "fwd-repeat")
    kernel = worker._ready()
    assert worker._compute(kernel, 0, 3, 0, 24).shape == (3, 128, 24)  # right columns pass
    with pytest.raises(
        BlockCheckError, match=r"columns 16:32\) differs from plain autograd by a relative error of 0\.\d+.*not written"
    ):
        worker._compute(kernel, 0, 3, 16, 32)
    unchecked = _worker(problem, "fwd-repeat", check_blocks=False)
    data = unchecked._compute(unchecked._ready(), 0, 3, 16, 32)
    assert np.all(data[:, :, 8:] == 0)  # what would have been stored without the check


@pytest.mark.parametrize("mode", ["rev", "rev-batched", "loop"])
def test_the_check_shares_the_plain_forward_and_still_refuses_a_wrong_block(mode):
    """NOTE: [shared forward]: rev-batched and loop make f's plain autograd forward, rev the
    same function's under torch.func.vjp, and the worker's check differentiates that same
    graph instead of building it again; right blocks pass (each against torch.func), a
    block 1% off is still refused, and so is a block of other samples' rows."""
    torch.manual_seed(1)
    w = torch.randn(12, 5, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    problem = raijac.Problem(lambda v: torch.tanh(v @ w.T), x, batched=True)
    want = torch.func.vmap(torch.func.jacrev(lambda v: torch.tanh(w @ v)))(x).numpy()
    worker = _worker(problem, mode)
    kernel = worker._ready()
    np.testing.assert_allclose(worker._compute(kernel, 0, 2, 0, 7), want[0:2, 0:7], rtol=1e-12, atol=1e-14)
    assert worker._reference._graphs[(0, 2)] is kernel.plain_forward(0, 2)  # shared, not built again
    np.testing.assert_allclose(worker._compute(kernel, 2, 4, 7, 12), want[2:4, 7:12], rtol=1e-12, atol=1e-14)
    block = kernel(2, 4, 0, 7).detach()
    with pytest.raises(BlockCheckError, match="relative error of 0.0"):
        worker._check(kernel, _corrupt(block, 0.01), 2, 4, 0, 7)
    with pytest.raises(BlockCheckError):
        worker._check(kernel, kernel(0, 2, 0, 7).detach(), 2, 4, 0, 7)


def test_the_check_builds_its_own_forward_where_the_mode_runs_another_function():
    """fwd's forward pass carries tangents, and rev over per-sample parameters runs f
    vmapped over the samples' copies, not the check's plain f: nothing is shared there."""
    x, w = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    kernel = Kernel(make_target(raijac.Problem(lambda v: torch.tanh(v @ w.T), x, batched=True)), "fwd")
    kernel(0, 2, 0, 3)
    assert kernel.plain_forward(0, 2) is None
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh()).double()
    kernel = Kernel(make_target(raijac.Problem.from_module(net, x, wrt="params", batched=True)), "rev")
    kernel(0, 2, 0, 1)  # one row of two samples: the general path, each sample's own copy of the parameters
    assert kernel.plain_forward(0, 2) is None


def test_compute_fails_the_wrong_tile_and_keeps_the_others(ray_session, store_path):
    """The triage's trial columns miss 24:32, so only the block check stands between
    fwd-repeat's zeros and the store: that tile fails, the finished ones stay written."""
    x = torch.randn(2, 64, dtype=torch.float64)
    problem = raijac.Problem(numpy_middle, x, batched=True, batch_aware=True)
    with pytest.raises(WorkerError, match=r"relative error of .*finished tiles are kept.*requested.*--mode loop"):
        raijac.compute(problem, store_path, mode="fwd-repeat", block_size=8, workers=1, progress=False)
    jac = raijac.open(store_path, allow_partial=True)
    assert jac.meta["block_check"]["enabled"] is True
    stored = jac.array[...]
    assert np.isnan(stored[:, :, 24:32]).all()  # never written
    written = ~np.isnan(stored)
    assert 0 < jac.tiles_done < jac.n_tiles and written.sum() >= 8 * 128  # at least one tile of 8 columns
    ref = _autograd_jacobian(numpy_middle, x).numpy()
    np.testing.assert_allclose(stored[written], ref[written], rtol=1e-12, atol=1e-12)


def wrong_under_vmap(rows: slice) -> type[torch.autograd.Function]:
    """Identity, whose backward is right in plain autograd but, when vmap batches its
    cotangents (rev), adds half the cotangent on outputs `rows` to every input: wrong there
    only, which the triage's trial rows (0:2, 51:53, 98:100 of 100) miss."""

    class WrongUnderVmap(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(h):
            return h.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            if torch._C._functorch.is_batchedtensor(grad):
                return grad + 0.5 * grad[rows].sum()
            return grad

    return WrongUnderVmap


WrongUnderVmap = wrong_under_vmap(slice(70, 80))


def test_auto_falls_back_to_the_next_mode_when_a_block_fails_its_check(ray_session, tmp_path):
    """NOTE: [fallback]: rev's tile of rows 70:80 fails its check and is not written; auto
    goes on in the next row mode (rev-batched: one plain forward, the backward batched by
    autograd itself, which this backward gets right). The store holds the right J, says
    which mode failed where, and the tiles rev finished stay."""
    torch.manual_seed(3)
    w = torch.randn(100, 40, dtype=torch.float64)

    def f(v):
        return WrongUnderVmap.apply(torch.tanh(w @ v))

    x = torch.randn(40, dtype=torch.float64)
    expected = ((1 - torch.tanh(w @ x) ** 2)[:, None] * w).numpy()
    assert resolve_mode(raijac.Problem(f, x), "auto")[0] == "rev"  # the triage alone is fooled
    with pytest.warns(UserWarning, match="going on in mode"):
        jac = raijac.compute(raijac.Problem(f, x), str(tmp_path / "j.zarr"), workers=2, block_size=10, progress=False)
    np.testing.assert_allclose(jac.numpy(), expected, rtol=1e-12, atol=1e-14)
    fell = jac.meta["fallbacks"]
    assert [(f["from"], f["to"]) for f in fell] == [("rev", "rev-batched")]
    assert jac.complete and jac.mode == "rev-batched"
    assert fell[0]["tiles"] == [7] and "relative error" in fell[0]["why"]
    assert "after a block of rev failed its check" in jac.meta["mode_reason"]
    assert jac.summary["tiles_computed"] == jac.summary["tiles_total"] == 10
    # An explicit mode does not fall back: the tile is named and nothing wrong is stored.
    with pytest.raises(WorkerError, match=r"rows 70:80.*mode rev was requested.*--mode loop"):
        raijac.compute(raijac.Problem(f, x), str(tmp_path / "r.zarr"), mode="rev", workers=2, block_size=10, progress=False)
    stored = raijac.open(str(tmp_path / "r.zarr"), allow_partial=True).array[...]
    assert np.isnan(stored[70:80]).all()
    done = ~np.isnan(stored)
    np.testing.assert_allclose(stored[done], expected[done], rtol=1e-12, atol=1e-14)


def test_auto_crosses_to_a_row_mode_when_no_column_mode_is_left(ray_session, store_path):
    """NOTE: [crossed fallback]: fwd-repeat's columns 24:32 are wrong (a numpy backward has no
    forward rule) and no other column mode runs f, so a row mode fills the column tiles left,
    each from blocks of all rows cut to its columns; the tiles fwd-repeat finished stay, the
    store keeps its column layout, and J is autograd's."""
    x = torch.randn(2, 64, dtype=torch.float64)
    problem = raijac.Problem(numpy_middle, x, batched=True, batch_aware=True)
    with pytest.warns(UserWarning, match="going on in mode"):
        jac = raijac.compute(problem, store_path, block_size=8, workers=2, progress=False)
    assert jac.complete and jac.meta["seed_axis"] == "cols"
    (fell,) = jac.meta["fallbacks"]
    assert fell["from"] == "fwd-repeat" and fell["crossed"] and modes.get(fell["to"]).axis == "rows"
    assert "column tiles from its blocks" in jac.meta["mode_reason"]
    np.testing.assert_allclose(jac.numpy(), _autograd_jacobian(numpy_middle, x).numpy(), rtol=1e-12, atol=1e-12)
    # A resumed run keeps the column tiles and fills them with the row mode it ended in.
    group = zarr.open_group(store_path, mode="r+")
    assert jac.meta["layout"]["tile_samples"] == 1  # tiles 1 and 2: sample 0, columns 8:24
    group["tiles"][1:3] = 0
    group["jacobian"][0, :, 8:24] = np.nan
    store.update_meta(group, complete=False)
    again = raijac.compute(problem, store_path, block_size=8, workers=2, progress=False, resume=True)
    assert again.complete and again.summary["tiles_computed"] == 2 and again.mode == fell["to"]
    np.testing.assert_allclose(again.numpy(), _autograd_jacobian(numpy_middle, x).numpy(), rtol=1e-12, atol=1e-12)


def test_compute_records_the_check(ray_session, tmp_path):
    """Checked by default (recorded with its tolerance); check_blocks=False records that it was not."""
    x = torch.randn(4, 6)
    problem = raijac.Problem(lambda v: torch.tanh(v) * v.sum(-1, keepdim=True), x, batched=True)
    jac = raijac.compute(problem, str(tmp_path / "a.zarr"), progress=False)
    assert jac.meta["block_check"] == {"enabled": True, "rtol": check_rtol(torch.float32), "reference": "autograd.grad VJP"}
    assert jac.summary["block_check"]["enabled"] is True and jac.meta["runs"][-1]["block_check"] is True
    ref = _autograd_jacobian(problem.f, x).numpy()
    np.testing.assert_allclose(jac.numpy(), ref, rtol=1e-5, atol=1e-6)
    off = raijac.compute(problem, str(tmp_path / "b.zarr"), progress=False, check_blocks=False)
    assert off.meta["block_check"]["enabled"] is False and off.meta["runs"][-1]["block_check"] is False


def test_cli_no_block_check(ray_session, tmp_path):
    from raijac.cli import cli

    spec = tmp_path / "spec.py"
    spec.write_text("import torch, raijac\nproblem = raijac.Problem(torch.tanh, torch.linspace(-1, 1, 5))\n")
    out = str(tmp_path / "o.zarr")
    result = CliRunner().invoke(cli, ["compute", f"{spec}:problem", "--out", out, "--no-block-check", "--json"])
    assert result.exit_code == 0, result.output
    assert raijac.open(out).meta["block_check"]["enabled"] is False
    shown = CliRunner().invoke(cli, ["inspect", out])
    assert "checked   not every block" in shown.output
    # Switching the check off takes the flag: the env var click would otherwise read is ignored.
    env = {"RAIJAC_COMPUTE_NO_BLOCK_CHECK": "1", "RAIJAC_NO_BLOCK_CHECK": "1"}
    result = CliRunner().invoke(cli, ["compute", f"{spec}:problem", "--out", out, "--overwrite"], env=env)
    assert result.exit_code == 0, result.output
    assert raijac.open(out).meta["block_check"]["enabled"] is True
    shown = CliRunner().invoke(cli, ["inspect", out])
    assert "checked   every block, against a plain autograd VJP before it was written (rtol 0.001; worst relative error" in (
        shown.output
    )
    info = raijac.open(out).info()
    assert info["block_check"]["enabled"] and 0 <= info["block_check_max_rel_err"] < 1e-3


# ---------------------------------------------------------------------- chain modes, in-place stages
INPLACE = {
    "silu": lambda: torch.nn.SiLU(inplace=True),
    "mish": lambda: torch.nn.Mish(inplace=True),
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.1, inplace=True),
    "relu": lambda: torch.nn.ReLU(inplace=True),
}


def _inplace_net(act: str, dtype: torch.dtype, n_in: int, n_out: int) -> torch.nn.Sequential:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, 16), INPLACE[act](), torch.nn.Linear(16, 16), INPLACE[act](), torch.nn.Linear(16, n_out)
    ).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("act", list(INPLACE))
@pytest.mark.parametrize("mode", ["chain", "chain-fwd", "auto"])
def test_chain_modes_with_inplace_activations(mode, act, dtype):
    """SiLU/Mish in place made the chain modes 4-7% off (their input was overwritten);
    ReLU/LeakyReLU were right by luck (same derivative at the output) and stay covered."""
    n_in, n_out = (12, 7) if mode != "chain-fwd" else (7, 12)
    net = _inplace_net(act, dtype, n_in, n_out)
    x = torch.randn(n_in, dtype=dtype)
    ref = torch.func.jacrev(net)(x).detach()
    problem = raijac.Problem(net, x)
    chosen = resolve_mode(problem, mode)[0]
    assert chosen in ("chain", "chain-fwd")
    n_seed = n_out if chosen == "chain" else n_in
    got = Kernel(make_target(problem), chosen)(0, 1, 0, n_seed)[0].detach()
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    torch.testing.assert_close(got, ref, **tol)
    assert torch.equal(x, problem.x)  # the caller's input is untouched


@pytest.mark.parametrize("mode", ["chain", "chain-fwd"])
def test_batched_chain_with_inplace_activations(mode):
    torch.manual_seed(4)
    net = _inplace_net("silu", torch.float64, 5, 6)
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = torch.func.vmap(torch.func.jacrev(net))(x)
    kernel = Kernel(make_target(raijac.Problem(net, x, batched=True)), mode)
    got = kernel(0, 4, 0, 6 if mode == "chain" else 5).detach()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_compute_chain_inplace(ray_session, store_path):
    """End to end through auto (chain) and the workers' check, in float32."""
    net = _inplace_net("mish", torch.float32, 40, 9)
    x = torch.randn(40)
    jac = raijac.compute(raijac.Problem(net, x), store_path, progress=False)
    assert jac.summary["mode"] == "chain"
    np.testing.assert_allclose(jac.numpy(), torch.func.jacrev(net)(x).detach().numpy(), rtol=1e-4, atol=1e-6)


class _JvpOnly(LyingJvp):
    """2x with a forward-mode formula and no backward: fwd can compute it, nothing can check it."""

    @staticmethod
    def backward(ctx, g):
        raise NotImplementedError("no backward formula")

    @staticmethod
    def jvp(ctx, t):
        return t * 2


def test_a_block_without_a_reference_is_counted_unchecked_not_passed_off_as_checked(ray_session, tmp_path):
    from raijac.cli import cli

    problem = raijac.Problem(_JvpOnly.apply, torch.randn(6, dtype=torch.float64))
    target = make_target(problem)
    with pytest.raises(NoReference, match="no backward formula"):
        block_error(target, torch.zeros(1, 6, 2, dtype=torch.float64), 0, 1, 0, 2, False)
    out = str(tmp_path / "j.zarr")
    jac = raijac.compute(problem, out, mode="fwd", workers=2, progress=False)
    np.testing.assert_array_equal(jac.numpy(), 2 * np.eye(6))  # the exact J
    assert jac.meta["block_check"]["enabled"] and jac.meta["block_check"]["unchecked"] >= 1
    shown = CliRunner().invoke(cli, ["inspect", out])
    assert "checked   every block but" in shown.output and "could not differentiate f" in shown.output


def test_a_second_run_of_the_same_f_reuses_the_triage_and_its_fallback(ray_session, tmp_path, monkeypatch):
    """NOTE: [triage memo]: the same function at a new x skips the trial blocks (every block is
    still checked), starting from the mode the last run ended in; without the block check, or
    for another function, the triage runs."""
    import raijac.api
    import raijac.probe

    torch.manual_seed(4)
    w = torch.randn(100, 40, dtype=torch.float64)

    def f(v):
        return WrongUnderVmap.apply(torch.tanh(w @ v))

    def expected(v):
        return ((1 - torch.tanh(w @ v) ** 2)[:, None] * w).numpy()

    x1, x2 = torch.randn(40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    with pytest.warns(UserWarning, match="going on in mode"):
        first = raijac.compute(raijac.Problem(f, x1), str(tmp_path / "1.zarr"), workers=2, block_size=10, progress=False)
    assert first.mode == "rev-batched"
    triaged = []
    real = raijac.probe.resolve_mode
    monkeypatch.setattr(raijac.api, "resolve_mode", lambda *a, **k: triaged.append(1) or real(*a, **k))
    second = raijac.compute(raijac.Problem(f, x2), str(tmp_path / "2.zarr"), workers=2, block_size=10, progress=False)
    assert not triaged and second.mode == "rev-batched" and "earlier run of this f" in second.meta["mode_reason"]
    assert "fallbacks" not in second.meta
    np.testing.assert_allclose(second.numpy(), expected(x2), rtol=1e-12, atol=1e-14)
    unchecked = raijac.compute(
        raijac.Problem(f, x2), str(tmp_path / "3.zarr"), workers=2, block_size=10, progress=False, check_blocks=False
    )
    assert triaged and unchecked.mode == "rev"  # the triage alone is fooled, as the first run's was


def test_a_sparse_run_falls_back_along_its_colouring_axis(ray_session, store_path):
    """A banded J (half-width 10, 21 row colours): rev passes the triage (its trial rows miss
    row 75), the compressed tile holding row 75's colour fails its check, and auto goes on in
    rev-batched with the same row colouring; the stored non-zeros are autograd's."""
    torch.manual_seed(5)
    n = 100
    band = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() <= 10
    a = torch.randn(n, n, dtype=torch.float64) * band

    def f(v):
        return wrong_under_vmap(slice(75, 76)).apply(a @ torch.tanh(v))

    x = torch.randn(n, dtype=torch.float64)
    pattern = sp.csr_array(band.numpy())
    problem = raijac.Problem(f, x, sparsity=pattern)
    with pytest.warns(UserWarning, match="going on in mode rev-batched"):
        jac = raijac.compute(problem, store_path, workers=2, block_size=3, progress=False)
    (fell,) = jac.meta["fallbacks"]
    assert (fell["from"], fell["to"], fell["crossed"]) == ("rev", "rev-batched", False)
    assert jac.meta["mode"] == "rev-batched" and jac.meta["seed_axis"] == "rows"
    expected = (a * (1 - torch.tanh(x) ** 2)[None, :]).numpy()
    np.testing.assert_allclose(jac.to_scipy().toarray(), expected, rtol=1e-12, atol=1e-14)


def test_a_mode_that_raises_only_on_the_workers_falls_back(ray_session, tmp_path):
    """NOTE: [worker-only failure]: rev passes the driver's triage but raises on every worker
    (as an op without a CUDA batching rule would on GPU workers); auto goes on in rev-batched,
    which runs f outside torch.func, and says so. A requested mode names the failure instead."""
    import os

    driver = os.getpid()
    torch.manual_seed(4)
    w = torch.randn(12, 30, dtype=torch.float64)  # M < N: auto's first choice is rev

    def f(v):
        if os.getpid() != driver and torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError("no batching rule for aten::made_up on this device")
        return torch.tanh(w @ v)

    x = torch.randn(30, dtype=torch.float64)
    expected = ((1 - torch.tanh(w @ x) ** 2)[:, None] * w).numpy()
    assert resolve_mode(raijac.Problem(f, x), "auto")[0] == "rev"  # the driver's triage passes it
    with pytest.warns(UserWarning, match="mode rev raised RuntimeError on worker cpu.*going on in mode rev-batched"):
        jac = raijac.compute(raijac.Problem(f, x), str(tmp_path / "j.zarr"), workers=2, block_size=4, progress=False)
    np.testing.assert_allclose(jac.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert jac.complete and jac.mode == "rev-batched"
    assert [(fell["from"], fell["to"]) for fell in jac.meta["fallbacks"]] == [("rev", "rev-batched")]
    assert "rev raised on a worker" in jac.meta["mode_reason"]  # in its probe, or a block of the run
    with pytest.raises(WorkerError, match="made_up on this device.*mode rev was requested"):
        raijac.compute(raijac.Problem(f, x), str(tmp_path / "r.zarr"), mode="rev", workers=2, progress=False)


def test_a_refusal_before_any_block_keeps_the_workers_warm(ray_session, tmp_path):
    """NOTE: [keep after refusal]: a mode refused by the driver's triage leaves the actors
    running for the next call, which uses them."""
    from raijac import executor
    from raijac.errors import ModeError

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)).train()
    x = torch.randn(6)
    raijac.compute(raijac.Problem.from_module(model, x, wrt="input"), str(tmp_path / "a.zarr"), workers=2)

    def pool() -> list:
        return list(executor._POOLS[executor._session_key()][1])[:2]

    hosts = pool()
    with pytest.raises(ModeError, match="fwd"):  # forward mode would draw the dropout mask again
        raijac.compute(raijac.Problem.from_module(model, x, wrt="input"), str(tmp_path / "b.zarr"), workers=2, mode="fwd")
    assert pool() == hosts
    jac = raijac.compute(raijac.Problem.from_module(model, x, wrt="input"), str(tmp_path / "c.zarr"), workers=2)
    assert pool() == hosts
    assert jac.complete
    torch.manual_seed(REPLAY_SEED)  # J of the one replayed dropout draw (NOTE: [replay])
    np.testing.assert_allclose(jac.numpy(), torch.func.jacrev(model)(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_mode_that_raises_on_a_worker_part_way_falls_back_for_the_tiles_left(ray_session, tmp_path):
    """NOTE: [worker-only failure] during the run: rev passes the triage and the workers'
    probes (sample 0) and raises on a worker's tile of the marked last sample; the tiles rev
    finished stay, and rev-batched fills the rest."""
    import os

    driver = os.getpid()
    torch.manual_seed(5)
    w = torch.randn(6, 3, dtype=torch.float64)

    def f(z):
        marked = bool((z.detach()[..., 0] > 50).any())
        if marked and os.getpid() != driver and torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError("no batching rule for aten::made_up on this device")
        return torch.tanh(z @ w)

    x = torch.randn(6, 6, dtype=torch.float64)
    x[5, 0] = 100.0
    expected = torch.func.vmap(torch.func.jacrev(lambda v: torch.tanh(v @ w)))(x).numpy()
    with pytest.warns(UserWarning, match="mode rev raised RuntimeError on worker cpu.*going on in mode rev-batched"):
        jac = raijac.compute(raijac.Problem(f, x, batched=True), str(tmp_path / "j.zarr"), workers=2, progress=False)
    np.testing.assert_allclose(jac.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert jac.complete and jac.mode == "rev-batched"
    assert [(fell["from"], fell["to"]) for fell in jac.meta["fallbacks"]] == [("rev", "rev-batched")]
    assert jac.meta["fallbacks"][0]["tiles"]  # a tile of the run, not a probe
    assert "after a block of rev raised on a worker" in jac.meta["mode_reason"]


@pytest.mark.parametrize(
    ("fail", "raised"),
    [
        (lambda: torch.empty(2**50, dtype=torch.uint8), RuntimeError),  # a CPU allocation: the budget's matter
        (lambda: torch.ops.aten.made_up_op, KernelError),  # the mode's: auto may go on in another
    ],
    ids=["allocation", "mode"],
)
def test_a_worker_tells_a_mode_failure_from_running_out_of_memory(fail, raised):
    """NOTE: [worker-only failure]: only an error the mode makes (plain f runs, memory was
    there) becomes a KernelError; a failed CPU allocation stays itself, so the run stops
    advising a smaller budget instead of trying every mode."""
    from raijac.errors import KernelError

    def f(v):
        if torch._C._functorch.peek_interpreter_stack() is not None:
            fail()
        return torch.sin(v)

    worker = _worker(raijac.Problem(f, torch.randn(6, dtype=torch.float64)), "rev")
    with pytest.raises(raised) as err:
        worker._compute(worker._ready(), 0, 1, 0, 3)
    assert (err.type is KernelError) is (raised is KernelError)
