"""detect: traced Jacobian sparsity patterns against the true non-zeros of torch.func.jacrev."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import raijac.detect_deps as detect_deps
from raijac.detect import detect_pattern
from raijac.errors import ProblemError

pytest.importorskip("scipy")

DT = torch.float64


def _truth(f, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Row-major (rows, cols) of |J| > 0, J from reverse-mode autodiff."""
    try:
        jac = torch.func.jacrev(f)(x)
    except Exception:  # in-place writes into fresh tensors can trip functorch; plain autograd copes
        jac = torch.autograd.functional.jacobian(f, x)
    jac = jac.reshape(-1, x.numel())
    rows, cols = torch.nonzero(jac.abs() > 0, as_tuple=True)
    return rows.numpy(), cols.numpy()


def _pairs(rows: np.ndarray, cols: np.ndarray, n: int) -> set[int]:
    return set((rows.astype(np.int64) * n + cols).tolist())


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def _const(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=DT) + 0.5  # no accidental zeros


# --------------------------------------------------------------------------- functions with exact patterns


def _resid(u):
    r = torch.zeros_like(u)
    r[1:-1] = u[:-2] - 2 * u[1:-1] + u[2:] + torch.sinh(u[1:-1])
    r[0] = u[0]
    return r


def _inplace_views(u):
    r = u.clone()
    r[1:-1] += u[:-2]
    r[0] *= 2.0
    r[-1].copy_(u[3])
    return r


def _lap2_pad(u):
    up = F.pad(u, (1, 1, 1, 1))
    return up[:-2, 1:-1] + up[2:, 1:-1] + up[1:-1, :-2] + up[1:-1, 2:] - 4 * u + torch.tanh(u)


def _lap2_set(u):
    r = torch.zeros_like(u)
    r[1:-1, 1:-1] = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1] + u[1:-1, 1:-1] ** 3
    r[0], r[-1], r[:, 0], r[:, -1] = u[0], u[-1], u[:, 0], u[:, -1]
    return r


def _lap2_roll(u):
    return torch.roll(u, 1, 0) + torch.roll(u, -1, 0) + torch.roll(u, 1, 1) + torch.roll(u, -1, 1) - 4 * u + u.exp()


def _lap2_cat(u):
    zr = torch.zeros(1, u.shape[1], dtype=u.dtype)
    zc = torch.zeros(u.shape[0], 1, dtype=u.dtype)
    up, dn = torch.cat([zr, u[:-1]], 0), torch.cat([u[1:], zr], 0)
    lf, rt = torch.cat([zc, u[:, :-1]], 1), torch.cat([u[:, 1:], zc], 1)
    return torch.sin(up + dn + lf + rt - 4 * u)


def _setitem_index(u):
    r = u.clone()
    r[torch.tensor([1, 4])] = u[:2] ** 2
    r[r.detach() > 1.5] = 0.0  # a mask from values, as at x
    return r


def _scatters(u):
    a = torch.zeros(3, 4, dtype=u.dtype).scatter_(1, torch.tensor([[2, 0], [1, 3], [0, 1]]), u.reshape(3, 2) ** 2)
    b = torch.zeros(4, 2, dtype=u.dtype).index_copy(0, torch.tensor([3, 0, 2]), u.reshape(3, 2))
    c = u.reshape(2, 3).index_fill(1, torch.tensor([0, 2]), 1.5) * 2
    return torch.cat([a.flatten(), b.flatten(), c.flatten()])


def _complex(u):
    z = torch.complex(u[:4], u[4:])
    w = z * z * (1 + 2j) + z.conj() * z.roll(1)
    return torch.cat([w.real, w.imag, torch.view_as_real(w).flatten(), w.abs()])


def _complex_write(u):
    w = torch.view_as_complex(u.reshape(4, 2)).exp() * torch.view_as_complex(u.reshape(4, 2)).roll(1)
    r = torch.zeros(8, dtype=u.dtype)
    torch.view_as_complex(r.view(4, 2)).copy_(w)  # whole complex elements, through a view
    z = torch.zeros(4, dtype=torch.complex128)
    torch.view_as_real(z)[:, 0] = u[:4] * 2  # the real halves only
    return torch.cat([r, torch.view_as_real(z).flatten(), z.abs()])


def _transposed_writes(u, out: bool):
    r = torch.empty_like(u)
    r.copy_(u)
    r.mul_(2)
    v = r.view(3, 4).T
    v[1:, :2] = (v[:-1, :2] + 0) * u[:6].reshape(3, 2)
    if out:
        buf = torch.empty(12, dtype=u.dtype)
        torch.add(u.flip(0), r, out=buf)
    else:
        buf = u.flip(0) + r
    r.view(-1)[::2] = 0
    return torch.cat([r, buf])


_LIN = torch.nn.Linear(6, 5).double()
_W = _const(4, 7)
_BLOCK = torch.block_diag(_const(3, 3), _const(4, 4, seed=2))  # zero off-diagonal blocks
_IDX = torch.tensor([0, 3, 3, 5, 1, 0])

EXACT = {
    "sin": (torch.sin, (11,)),
    "exp": (torch.exp, (3, 4)),
    "tanh_x": (lambda u: torch.tanh(u) * u, (9,)),
    "square_plus_1": (lambda u: u**2 + 1, (9,)),
    "activations": (lambda u: F.softplus(u) + F.gelu(u) + F.silu(u) + F.hardswish(u) + F.elu(u) + torch.sigmoid(u), (8,)),
    "where_const_mask": (lambda u: torch.where(torch.arange(10) % 3 == 0, u, 0.0), (10,)),
    "where_two_branches": (lambda u: torch.where(u > 0, u.exp(), u.sin()), (10,)),
    "clamp_in_range": (lambda u: torch.clamp(u, -50.0, 50.0) * u, (7,)),
    "masked_fill_const": (lambda u: u.masked_fill(torch.arange(8) < 2, 3.0) ** 2, (8,)),
    "stencil_slices": (lambda u: u[:-2] - 2 * u[1:-1] + u[2:] + u[1:-1] ** 3, (12,)),
    "stencil_roll": (lambda u: torch.roll(u, 1) - 2 * u + torch.roll(u, -1) + torch.cos(u), (12,)),
    "stencil_pad": (lambda u: F.pad(u, (1, 1))[:-2] + F.pad(u, (1, 1))[2:] - 2 * u, (12,)),
    "pad_reflect": (lambda u: F.pad(u[None], (2, 2), mode="reflect")[0] ** 2, (9,)),
    "pad_replicate": (lambda u: F.pad(u[None], (1, 2), mode="replicate")[0] ** 2, (9,)),
    "pad_circular": (lambda u: F.pad(u[None], (1, 1), mode="circular")[0].diff(), (9,)),
    "diff_gradient": (lambda u: torch.gradient(u, dim=0)[0] + torch.diff(u, dim=0, prepend=u[:1]), (7, 3)),
    "residual_slice_assign": (_resid, (13,)),
    "inplace_views": (_inplace_views, (10,)),
    "lap2_pad": (_lap2_pad, (12, 13)),
    "lap2_set": (_lap2_set, (12, 13)),
    "lap2_roll": (_lap2_roll, (12, 13)),
    "lap2_cat": (_lap2_cat, (12, 13)),
    "cat_stack": (lambda u: torch.stack([torch.cat([u[3:], u[:3]]), u.flip(0) * u]), (8,)),
    "sum_dim": (lambda u: u.sum(dim=1) ** 2, (5, 4)),
    "mean_all": (lambda u: u.mean() * u, (6,)),
    "norm_dim": (lambda u: torch.linalg.vector_norm(u, dim=0), (5, 4)),
    "logsumexp": (lambda u: torch.logsumexp(u, dim=-1, keepdim=True), (3, 5)),
    "var_std": (lambda u: u.var(dim=0) + u.std(dim=0), (5, 3)),
    "prod": (lambda u: u.prod(dim=1), (4, 3)),
    "cumsum": (lambda u: torch.cumsum(u, dim=1), (3, 5)),
    "amax": (lambda u: u.amax(dim=1), (4, 6)),
    "max_dim_values": (lambda u: u.max(dim=0).values, (4, 6)),
    "sort_values": (lambda u: torch.sort(u, dim=1).values * 2, (3, 5)),
    "softmax": (lambda u: torch.softmax(u, dim=1), (4, 5)),
    "log_softmax_dim0": (lambda u: torch.log_softmax(u, dim=0), (4, 5)),
    "layer_norm": (lambda u: F.layer_norm(u, (5,), weight=_const(5), bias=_const(5, seed=3)), (4, 5)),
    "batch_norm_train": (lambda u: F.batch_norm(u, None, None, training=True), (6, 3, 2)),
    "group_norm": (lambda u: F.group_norm(u, 2, weight=_const(4)), (2, 4, 3)),
    "mv_dense_const": (lambda u: torch.mv(_W, u), (7,)),
    "linear_dense_const": (lambda u: F.linear(u, _W), (3, 7)),
    "matmul_3d": (lambda u: u @ _W.T, (2, 3, 7)),
    "einsum": (lambda u: torch.einsum("bij,kj->bik", u, _W), (2, 3, 7)),
    "block_diag_const": (lambda u: _BLOCK @ u, (7,)),
    "gram_traced": (lambda u: u @ u.T, (4, 3)),
    "addmm_traced_bias": (lambda u: torch.addmm(u[:, 0:1], u, _W.T[:3, :]), (5, 3)),
    "outer": (lambda u: torch.outer(u, u[:3]), (5,)),
    "fancy_index_repeats": (lambda u: u[_IDX] * u[_IDX.flip(0)], (6,)),
    "index_2d": (lambda u: u[:, torch.tensor([2, 0, 2])] + u[torch.tensor([1, 1, 0])][:, 1:], (3, 4)),
    "gather_index_select": (
        lambda u: u.gather(1, torch.tensor([[1, 0], [2, 2]])) + u.index_select(1, torch.tensor([0, 2])),
        (2, 3),
    ),
    "masked_select": (lambda u: u[u.detach() > 0] ** 2, (10,)),
    "index_put": (lambda u: torch.zeros(8, dtype=u.dtype).index_put((torch.tensor([6, 1, 3]),), u[:3] * u[3:]), (6,)),
    "setitem_index": (_setitem_index, (6,)),
    "index_add": (lambda u: torch.zeros(4, dtype=u.dtype).index_add(0, torch.tensor([0, 0, 1, 3, 3, 3]), u), (6,)),
    "scatter_add": (lambda u: torch.zeros(3, 2, dtype=u.dtype).scatter_add(0, torch.tensor([[0, 2], [0, 1]]), u), (2, 2)),
    "multi_dim": (lambda u: torch.tanh(u.permute(2, 0, 1).reshape(5, 12)) * u.sum(0).T.repeat(1, 3), (3, 4, 5)),
    "batched_rows": (lambda u: u[:, 2:] - 2 * u[:, 1:-1] + u[:, :-2] + u[:, 1:-1] ** 2, (4, 9)),
    "broadcast_expand": (lambda u: u[:, :1] * u + u.T[0], (3, 3)),
    "dtype_roundtrip": (lambda u: u.float().double() * u, (6,)),
    "transpose_flatten": (lambda u: u.T.flatten().cumsum(0)[::2], (3, 4)),
    "cross": (lambda u: torch.linalg.cross(u, u.flip(0)), (4, 3)),
    "glu": (lambda u: F.glu(u, dim=0), (6, 2)),
    "trace": (lambda u: torch.trace(u) * u[0], (3, 3)),
    "tril": (lambda u: torch.tril(u) ** 2, (4, 4)),
    "max_pool": (lambda u: F.max_pool1d(u[None], 2)[0], (3, 8)),
    "upsample_nearest": (lambda u: F.interpolate(u[None], scale_factor=2)[0] ** 2, (2, 3)),
    "embedding": (lambda u: F.embedding(torch.tensor([[2, 0], [2, 1]]), u), (3, 2)),
    "unfold_window_sum": (lambda u: u.unfold(0, 3, 1).sum(-1) ** 2, (8,)),
    "topk_median_cummax": (lambda u: torch.cat([u.topk(2).values[0], u.median(1).values, u.cummax(1).values[1]]), (3, 4)),
    "aminmax_item": (lambda u: torch.aminmax(u, dim=1).max * torch.aminmax(u, dim=1).min * u[0, 0].item(), (3, 4)),
    "logcumsumexp": (lambda u: u.logcumsumexp(0), (6,)),
    "normalize_instance_norm": (lambda u: F.normalize(u, dim=1) + F.instance_norm(u[None])[0], (3, 4)),
    "batch_norm_eval": (lambda u: F.batch_norm(u, torch.zeros(4, dtype=DT), torch.ones(4, dtype=DT), weight=_const(4)), (3, 4)),
    "linear_module": (lambda u: _LIN(u).tanh(), (2, 6)),
    "kron_meshgrid": (
        lambda u: torch.kron(u[:2], u[2:5]) + torch.stack(torch.meshgrid(u[:2], u[3:6], indexing="ij")).sum(0).flatten(),
        (6,),
    ),
    "split_tile_repeat_interleave": (
        lambda u: torch.cat([u.split(4)[1], u[:4]]) * u.tile(2)[2:10] + u.repeat_interleave(2)[:8],
        (8,),
    ),
    "rot90_pixel_shuffle": (
        lambda u: torch.rot90(u).flatten() ** 2 + F.pixel_shuffle(u.reshape(1, 4, 3, 1), 2).flatten(),
        (3, 4),
    ),
    "diag_embed_matmul": (lambda u: torch.diag_embed(u[:3]) @ u[3:12].reshape(3, 3), (12,)),
    "scatter_index_copy_fill": (_scatters, (6,)),
    "slice_scatter_take_along": (
        lambda u: (
            torch.slice_scatter(torch.zeros(8, dtype=DT), u[:6].sin(), start=1, end=7)
            + torch.take_along_dim(u, torch.tensor([3, 3, 0, 1, 2, 5, 4, 0]), 0)
        ),
        (8,),
    ),
    "prelu_logsigmoid": (lambda u: F.prelu(u, torch.tensor([0.25], dtype=DT)) + F.logsigmoid(u), (3, 4)),
    "baddbmm": (lambda u: torch.baddbmm(u[:, :2, :2], u[:, :2, :], u[:, :, 1:]), (2, 3, 3)),
    "selection_matrix": (lambda u: torch.eye(12, dtype=DT)[torch.tensor([0, 5, 11])] @ u, (12,)),
    "complex_arith": (_complex, (8,)),
    "complex_views_write": (_complex_write, (8,)),
    "losses_none": (lambda u: F.mse_loss(u, _const(6), reduction="none") + F.huber_loss(u, _const(6), reduction="none"), (6,)),
    "loss_mean_times_x": (lambda u: F.mse_loss(u[:3], u[3:]) * u, (6,)),
    "cross_entropy": (lambda u: F.cross_entropy(u, torch.tensor([0, 2, 1, -100]), reduction="none"), (4, 3)),
    "cross_entropy_2d": (lambda u: F.cross_entropy(u[None], torch.tensor([[[0, 2], [1, 1]]])), (3, 2, 2)),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", sorted(EXACT))
def test_matches_jacrev(name):
    f, shape = EXACT[name]
    x = _rand(*shape)
    rows, cols = detect_pattern(f, x)
    want_rows, want_cols = _truth(f, x)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)


# --------------------------------------------------------------------------- conservative cases: a superset

SUPERSET = {
    "relu": (torch.relu, (10,)),
    "times_zero": (lambda u: u * 0 + u[0], (5,)),
    "clamped": (lambda u: torch.clamp(u, -0.1, 0.1), (10,)),
    "linf_norm": (lambda u: torch.linalg.vector_norm(u, ord=float("inf"), dim=1), (3, 4)),
    "zero_weight_traced": (lambda u: torch.mv(u.reshape(2, 3) * torch.tensor([[1.0, 0, 1], [0, 1, 1]], dtype=DT), u[:3]), (6,)),
}


@pytest.mark.parametrize("name", sorted(SUPERSET))
def test_conservative_superset(name):
    f, shape = SUPERSET[name]
    x = _rand(*shape)
    rows, cols = detect_pattern(f, x)
    got, want = _pairs(rows, cols, x.numel()), _pairs(*_truth(f, x), x.numel())
    assert want <= got
    assert len(got) == len(rows)  # unique


def test_out_argument_and_writes_through_transposed_views():
    x = _rand(12)
    rows, cols = detect_pattern(lambda u: _transposed_writes(u, out=True), x)
    want_rows, want_cols = _truth(lambda u: _transposed_writes(u, out=False), x)  # autograd refuses out=
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)


def _loop_stencil(u):
    r = torch.empty_like(u)
    r[0], r[-1] = u[0], u[-1]
    for i in range(1, len(u) - 1):
        r[i] = u[i - 1] - 2 * u[i] + u[i + 1]
    return r


def _loop_recurrence(u):
    r = torch.zeros_like(u)
    r[0] = u[0]
    for i in range(1, len(u)):
        r[i] = 0.5 * r[i - 1] + u[i]  # reads back its own small writes
    return r[::3] * 2 + r[1::3]


@pytest.mark.parametrize("f", [_loop_stencil, _loop_recurrence], ids=["stencil", "recurrence"])
def test_python_loops_of_small_writes(f):
    x = _rand(150)
    rows, cols = detect_pattern(f, x)
    want_rows, want_cols = _truth(f, x)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_constant_matmul(layout):
    g = torch.Generator().manual_seed(4)
    dense = (torch.rand(9, 9, generator=g) < 0.3) * (torch.rand(9, 9, generator=g, dtype=DT) + 0.5) + torch.eye(9, dtype=DT)
    a = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    want_rows, want_cols = np.nonzero(dense.numpy())  # a sparse constant's own zeros are honoured
    for f in (
        lambda u: a @ u.sin(),
        lambda u: (a @ u[:, None]).flatten(),
        lambda u: torch.sparse.addmm(torch.zeros(9, 1, dtype=DT), a, u[:, None]).flatten(),
    ):
        rows, cols = detect_pattern(f, _rand(9))
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(cols, want_cols)


def test_sorted_unique_and_x_untouched():
    x = _rand(5, 6)
    before = x.clone()
    rows, cols = detect_pattern(_lap2_set, x)
    keys = rows * x.numel() + cols
    assert np.all(np.diff(keys) > 0)
    assert torch.equal(x, before)


def test_noncontiguous_input():
    base = _rand(6, 5)
    x = base.T  # (5, 6), not contiguous
    rows, cols = detect_pattern(_lap2_pad, x)
    want = _truth(_lap2_pad, x.contiguous())
    np.testing.assert_array_equal(rows, want[0])
    np.testing.assert_array_equal(cols, want[1])


def test_constant_output_is_empty():
    rows, cols = detect_pattern(lambda u: torch.ones(3, dtype=u.dtype) + (u > 0).sum(), _rand(4))
    assert rows.size == 0 and cols.size == 0


def test_untraced_unsupported_op_is_fine():
    k = F.conv1d(_const(1, 2, 6), _const(1, 2, 3))[0, 0]  # unsupported op, but on constants only
    x = _rand(4)
    rows, cols = detect_pattern(lambda u: u * F.conv1d(_const(1, 2, 6), _const(1, 2, 3))[0, 0] + k, x)
    np.testing.assert_array_equal(rows, np.arange(4))
    np.testing.assert_array_equal(cols, np.arange(4))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("f", "op"),
    [
        (lambda u: F.conv1d(u[None, None], torch.ones(1, 1, 3, dtype=u.dtype)), "aten.convolution.default"),
        (lambda u: torch.fft.fft(u).real, "aten._fft_r2c.default"),
        (lambda u: torch.linalg.solve(u.reshape(3, 3), torch.ones(3, dtype=u.dtype)), "aten._linalg_solve_ex.default"),
    ],
    ids=["conv1d", "fft", "solve"],
)
def test_unsupported_op_raises(f, op):
    with pytest.raises(ProblemError) as info:
        detect_pattern(f, _rand(9))
    msg = str(info.value)
    assert op in msg and "pass the pattern" in msg and 'sparsity="detect"' in msg
    assert msg.count(". ") == 0  # one sentence


def test_swallowed_refusal_still_raises():
    def f(u):
        try:
            return torch.fft.fft(u).real
        except Exception:
            return u

    with pytest.raises(ProblemError, match="aten._fft_r2c.default"):
        detect_pattern(f, _rand(4))


def test_too_dense_refused(monkeypatch):
    monkeypatch.setattr(detect_deps, "MAX_NNZ", 50)  # read where the guard checks it
    with pytest.raises(ProblemError, match="too dense"):
        detect_pattern(lambda u: u - u.mean(), _rand(20))


def test_bad_inputs():
    with pytest.raises(ProblemError, match="floating-point"):
        detect_pattern(lambda u: u, torch.arange(3))
    with pytest.raises(ProblemError, match="return a tensor"):
        detect_pattern(lambda u: (u, u), _rand(3))


# --------------------------------------------------------------------------- scale


def _lap2_expected(n: int) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.divmod(np.arange(n * n), n)
    rows, cols = [], []
    for di, dj in ((-1, 0), (0, -1), (0, 0), (0, 1), (1, 0)):
        ok = (i + di >= 0) & (i + di < n) & (j + dj >= 0) & (j + dj < n)
        rows.append(np.flatnonzero(ok))
        cols.append((i + di)[ok] * n + (j + dj)[ok])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order]


def test_scale_1d_stencil_fast():
    x = _rand(8192)
    detect_pattern(_resid, x[:16])  # warm up (first TorchDispatchMode use imports torch._dynamo)
    t0 = time.perf_counter()
    rows, cols = detect_pattern(_resid, x)
    assert time.perf_counter() - t0 < 1.0
    assert rows.size == 3 * (8192 - 2) + 1


def test_scale_2d_laplacian_million():
    n = 1000
    x = _rand(n, n)
    t0 = time.perf_counter()
    rows, cols = detect_pattern(_lap2_pad, x)
    assert time.perf_counter() - t0 < 30
    assert rows.size == 5 * n * n - 4 * n
    want_rows, want_cols = _lap2_expected(n)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(cols, want_cols)
