"""Every kernel against independent references, in blocks of sizes that divide nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raijac.errors import ModeError
from raijac.kernels import Kernel, make_target, seed_axis
from tests.problems import BY_NAME, CASES, CountProducts, assert_close

PAIRS = [(c.name, m) for c in CASES for m in c.modes]


def assemble(problem, mode: str, block: int, sample_block: int = 2) -> np.ndarray:
    """The whole Jacobian from blocks of `block` seeds and `sample_block` samples."""
    kernel = Kernel(make_target(problem), mode)
    rows = seed_axis(mode) == "rows"
    n_seed = problem.n_out if rows else problem.n_in
    n_samples = problem.batch_size or 1
    out = np.full((n_samples, problem.n_out, problem.n_in), np.nan, dtype=np.dtype(str(problem.dtype).split(".")[1]))
    for b0 in range(0, n_samples, sample_block):
        b1 = min(b0 + sample_block, n_samples)
        for s0 in range(0, n_seed, block):
            s1 = min(s0 + block, n_seed)
            got = kernel(b0, b1, s0, s1).detach().numpy()
            if rows:
                out[b0:b1, s0:s1, :] = got
            else:
                out[b0:b1, :, s0:s1] = got
    return out if problem.batched else out[0]


@pytest.mark.parametrize("name,mode", PAIRS, ids=[f"{n}-{m}" for n, m in PAIRS])
@pytest.mark.parametrize("block", [1, 3, 7, 1000])
def test_mode_matches_reference(name, mode, block):
    case = BY_NAME[name]
    problem = case.build()
    assert_close(assemble(problem, mode, block), case.reference(problem))


BROKEN = [(c.name, m) for c in CASES for m in c.broken]
# What torch.func itself says when a function defeats a transform: an in-place write to a
# captured tensor, a custom autograd.Function without a jvp, or one without setup_context.
TORCH_REFUSALS = r"in-place operation|jvp function|setup_context"


@pytest.mark.parametrize("name,mode", BROKEN, ids=[f"{n}-{m}" for n, m in BROKEN])
def test_broken_mode_raises(name, mode):
    """Modes a function cannot support fail loudly instead of returning numbers: raijac refuses
    the repeat modes itself; the others fail inside torch.func (the kernel adds no context)."""
    problem = BY_NAME[name].build()
    expected = (ModeError, "needs a stackable") if mode.endswith("-repeat") else (RuntimeError, TORCH_REFUSALS)
    with pytest.raises(expected[0], match=expected[1]):
        Kernel(make_target(problem), mode)(0, 1, 0, 2)


def test_repeat_mode_needs_batch_aware():
    problem = BY_NAME["item_call"].build()
    with pytest.raises(ModeError, match="batch_aware=True"):
        Kernel(make_target(problem), "rev-repeat")


def test_rev_keeps_forward_pass_across_blocks():
    """The rev kernel runs f once per sample block, however many row blocks follow."""
    calls = []
    w = torch.randn(6, 4)

    def f(x):
        calls.append(1)
        return torch.tanh(x @ w.T)

    import raijac

    kernel = Kernel(make_target(raijac.Problem(f, torch.randn(4))), "rev")
    calls.clear()  # building the target evaluated f(x) once for the shapes
    for s0 in range(6):
        kernel(0, 1, s0, s0 + 1)
    assert len(calls) == 1


class _Scaled(torch.nn.Module):
    """A per-sample output scaled by a Python number read from the sample's own data: vmap
    cannot trace `.item()`, so rows of shared parameters go sample by sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * (2.0 if bool((flag > -100).all().item()) else -1.0)


@pytest.mark.parametrize("traceable", [True, False])
def test_rows_of_shared_parameters_match_per_sample_jacrev(traceable):
    """NOTE: [shared parameters]: all rows of several samples at once, and the general path
    where vmap cannot trace f per sample."""
    import raijac

    g = torch.Generator().manual_seed(3)
    model = _Scaled()
    x, flag = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([1.0, -1.0, 2.0, -3.0, 1.0])
    if traceable:
        module, args = torch.nn.Sequential(model.lin, torch.nn.Tanh()), (x,)
    else:
        module, args = model, (x, flag)
    kernel = Kernel(make_target(raijac.Problem.from_module(module, *args, wrt="params", batched=True)), "rev")
    params = dict(module.named_parameters())

    def one(p: dict, *sample: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, p, tuple(t[None] for t in sample))[0]

    for b in range(5):
        ref = torch.func.jacrev(one)({n: v.detach() for n, v in params.items()}, *(t[b] for t in args))
        want = torch.cat([ref[n].reshape(2, -1) for n in params], dim=1)
        assert_close(kernel(0, 5, 0, 2)[b].detach().numpy(), want.numpy())
    assert kernel._per_sample_vjp is traceable


def test_float64_against_finite_differences():
    """AD itself under test: central differences in float64 agree to ~1e-7."""
    problem = BY_NAME["float64"].build()
    x, f = problem.x, problem.f
    eps = 1e-6
    fd = torch.stack([(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in torch.eye(x.numel(), dtype=x.dtype)], 1)
    for mode in ("rev", "fwd", "fwd-repeat", "loop"):
        np.testing.assert_allclose(assemble(problem, mode, 5), fd.numpy(), rtol=1e-6, atol=1e-8)


def test_zero_jacobian_when_output_ignores_input():
    import raijac

    problem = raijac.Problem(lambda x: torch.ones(3) * 2.0, torch.randn(4), batch_aware=False)
    for mode in ("rev", "fwd", "loop"):
        assert np.array_equal(assemble(problem, mode, 2), np.zeros((3, 4), np.float32))


def test_chain_modes_need_a_sequential():
    problem = BY_NAME["conv"].build()
    for mode in ("chain", "chain-fwd"):
        with pytest.raises(ModeError, match="needs f to be a torch.nn.Sequential"):
            Kernel(make_target(problem), mode)


def test_chain_skips_the_identity_gemm():
    """The chain kernel's first product is the last Linear's weight rows themselves."""
    import raijac

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    kernel = Kernel(make_target(raijac.Problem(net, torch.randn(5))), "chain")
    kernel(0, 1, 0, 4)  # the kept forward pass
    with CountProducts() as count:
        kernel(0, 1, 0, 4)
    assert len(count.calls) == 1  # W2 rows * tanh' then @ W1: one GEMM; rev would need two


@pytest.mark.parametrize(
    "mode, layers",
    [
        ("chain", (torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.Sigmoid(), torch.nn.Tanh())),
        ("chain-fwd", (torch.nn.Tanh(), torch.nn.GELU(), torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 9))),
    ],
)
def test_chain_scales_weight_rows_by_elementwise_stages_at_the_seed_end(mode, layers):
    """Elementwise stages at the seed end scale the first Linear's rows (columns): still one GEMM."""
    import raijac

    torch.manual_seed(0)
    net = torch.nn.Sequential(*layers)
    problem = raijac.Problem(net, torch.randn(5))
    kernel = Kernel(make_target(problem), mode)
    n = problem.n_out if mode == "chain" else problem.n_in
    kernel(0, 1, 0, 2)  # the kept forward pass
    with CountProducts() as count:
        block = kernel(0, 1, 1, n)  # rows (columns) 1.. : the scale is taken at the block's offset
    assert len(count.calls) == 1
    want = torch.func.jacrev(net)(problem.x).detach()
    want = want[1:] if mode == "chain" else want[:, 1:]
    assert_close(block[0].numpy(), want.numpy())


@pytest.mark.parametrize("mode", ["chain", "chain-fwd"])
def test_a_peeled_plain_mlp_costs_one_gemm_per_layer_but_one(mode):
    import raijac

    g = torch.Generator().manual_seed(1)
    w1, w2, w3 = torch.randn(12, 6, generator=g), torch.randn(10, 12, generator=g), torch.randn(7, 10, generator=g)
    b1 = torch.randn(12, generator=g)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w3 @ torch.relu(w2 @ torch.tanh(w1 @ x + b1)))

    problem = raijac.Problem(f, torch.randn(6, generator=g))
    kernel = Kernel(make_target(problem), mode)
    n = problem.n_out if mode == "chain" else problem.n_in
    kernel(0, 1, 0, n)
    with CountProducts() as count:
        block = kernel(0, 1, 0, n)
    assert len(count.calls) == 2  # three layers: rev would multiply three times
    assert_close(block[0].numpy(), torch.func.jacrev(f)(problem.x).numpy())


def test_batched_chain_keeps_seeds_shared_until_a_sample_factor():
    """Per sample the chain is one GEMM too: the last Linear's rows scaled per sample by
    tanh', then one product with W1 for every sample of the block at once."""
    import raijac

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 5)
    kernel = Kernel(make_target(raijac.Problem(net, x, batched=True)), "chain")
    kernel(0, 3, 0, 4)  # the kept forward pass
    with CountProducts() as count:
        block = kernel(0, 3, 0, 4)
    assert len(count.calls) == 1
    want = torch.func.vmap(torch.func.jacrev(net))(x)
    assert_close(block.numpy(), want.detach().numpy())


def test_chain_blocks_of_samples_and_seeds_match_whole():
    """Blocks over samples b0:b1 and seeds s0:s1 of a batched chain tile the whole Jacobian."""
    case = BY_NAME["sequential_batched"]
    problem = case.build()
    want = case.reference(problem)
    for mode in ("chain", "chain-fwd"):
        kernel = Kernel(make_target(problem), mode)
        got = np.zeros_like(want)
        n_seed = want.shape[1] if mode == "chain" else want.shape[2]
        for b0, b1 in ((0, 2), (2, 7)):
            for s0 in range(0, n_seed, 4):
                s1 = min(s0 + 4, n_seed)
                block = kernel(b0, b1, s0, s1).numpy()
                if mode == "chain":
                    got[b0:b1, s0:s1] = block
                else:
                    got[b0:b1, :, s0:s1] = block
        assert_close(got, want)
