"""raijac.peel: a plain function's linear layers and the elementwise ops between them, found by tracing, checked by AD."""

from __future__ import annotations

import pytest
import torch

import raijac
from raijac.chain import chain_stages, is_traced, may_chain
from raijac.kernels import Kernel, make_target
from raijac.peel import Peeled, Pointwise, Traced, peel_chain
from raijac.probe import resolve_mode
from raijac.problem import Chain
from tests.problems import BY_NAME, CountProducts, _ClipGrad, assert_close

G = torch.Generator().manual_seed(0)
W1, W2, B2 = torch.randn(9, 7, generator=G), torch.randn(5, 9, generator=G), torch.randn(5, generator=G)
W3, B1 = torch.randn(6, 5, generator=G), torch.randn(9, generator=G)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = torch.nn.Linear(7, 9), torch.nn.Linear(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x.sum())


PEELED = {
    "mv": lambda x: W2 @ torch.tanh(W1 @ x),
    "mm-transposed+bias": lambda x: torch.tanh(x @ W1.T) @ W2.T + B2,
    "F.linear": lambda x: torch.nn.functional.linear(torch.sin(W1 @ x), W2, B2),
    "module": _Net(),
    "cast weight, float64": lambda x: W2.double() @ torch.tanh(W1.double() @ x),
    "reshape after": lambda x: (W2 @ torch.tanh(W1 @ x)).reshape(1, 5, 1),
    "scalar bias": lambda x: 2.0 + W2 @ torch.tanh(W1 @ x),
    "captured by default arguments": lambda x, w1=W1, w2=W2, b=B2: torch.tanh(x @ w1.T) @ w2.T + b,
    "ends elementwise": lambda x: torch.tanh(W2 @ torch.tanh(W1 @ x)),
    "three layers, biases, relu": lambda x: W3 @ torch.relu(W2 @ torch.tanh(W1 @ x + B1) + B2),
    "F.linear, gelu, leaky_relu": lambda x: torch.nn.functional.linear(
        torch.nn.functional.leaky_relu(torch.nn.functional.gelu(torch.nn.functional.linear(x, W1, B1)), 0.1), W2
    ),
    "constant scalings between": lambda x: 3.0 * (W2 @ (torch.sigmoid(W1 @ x) * 2 + 1)),
    "2-D input": lambda x: W2 @ torch.tanh(W1 @ x.reshape(-1)),
    "traced rest (a slice)": lambda x: W2 @ torch.tanh(torch.cat([x, x])[:9] * (W1 @ x)),
}
REFUSED = {
    "no linear layer": lambda x: torch.tanh(torch.sin(x)),
    "matrix depends on x": lambda x: torch.outer(x, x) @ x,
    "bias broadcasts the product": lambda x: (W2 @ torch.tanh(W1 @ x)) + torch.ones(3, 5),
    "custom backward": lambda x: W2 @ _ClipGrad.apply(torch.tanh(W1 @ x)),
    "untraceable": lambda x: torch.from_numpy((W1 @ x).numpy()) @ W1,
}


@pytest.mark.parametrize("name", PEELED)
def test_peeled_chain_equals_jacrev(name):
    dtype = torch.float64 if "float64" in name else torch.float32
    shape = (1, 7) if "2-D" in name else (7,)
    f, x = PEELED[name], torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    stages = peel_chain(f, x)
    assert isinstance(stages, Peeled) and any(isinstance(s, torch.nn.Linear) for s in stages)
    want = torch.func.jacrev(f)(x).reshape(-1, 7)
    got = torch.func.jacrev(Chain(tuple(stages)))(x).reshape(-1, 7)
    assert_close(got.detach().numpy(), want.detach().to(got.dtype).numpy())
    assert_close(Chain(tuple(stages))(x).reshape(-1).detach().numpy(), f(x).reshape(-1).detach().to(got.dtype).numpy())


def test_a_plain_mlp_peels_into_layers_only():
    """Every layer, bias and activation of a plain-function MLP is a stage: no traced rest."""
    stages = peel_chain(PEELED["three layers, biases, relu"], torch.randn(7))
    assert [type(s) for s in stages] == [torch.nn.Linear, Pointwise, torch.nn.Linear, Pointwise, torch.nn.Linear]
    assert stages[0].weight.data_ptr() == W1.data_ptr()  # the model's own weights, not copies
    assert torch.equal(stages[0].bias, B1) and torch.equal(stages[2].bias, B2) and stages[4].bias is None
    rest = peel_chain(PEELED["traced rest (a slice)"], torch.randn(7))
    assert isinstance(rest[0], Traced) and isinstance(rest[-1], torch.nn.Linear)


@pytest.mark.parametrize("name", REFUSED)
def test_not_peeled(name):
    assert peel_chain(REFUSED[name], torch.randn(7, generator=torch.Generator().manual_seed(3))) is None


W_IN, W_OUT = torch.randn(9, 400, generator=G) / 20, torch.randn(300, 9, generator=G) / 3


def _wide_mlp(x: torch.Tensor) -> torch.Tensor:
    """300 outputs (PEEL_MIN_SEEDS or more: auto traces) of 400 inputs (M <= N: chain)."""
    return torch.tanh(x @ W_IN.T) @ W_OUT.T + 1.0


def test_auto_runs_chain_on_a_plain_mlp_with_one_gemm_fewer():
    """A plain-function MLP: auto picks chain, whose block needs one GEMM where rev needs two."""
    problem = raijac.Problem(_wide_mlp, torch.randn(400))
    assert raijac.plan(problem).mode == "chain"
    counts = {}
    for mode in ("rev", "chain"):
        kernel = Kernel(make_target(problem), mode)
        kernel(0, 1, 0, 5)  # the kept forward pass
        with CountProducts() as count:
            block = kernel(0, 1, 0, 300)
        counts[mode] = len(count.calls)
        assert_close(block[0].numpy(), torch.func.jacrev(problem.f)(problem.x).numpy())
    assert counts["chain"] == counts["rev"] - 1


def test_auto_traces_only_functions_with_enough_outputs():
    small = raijac.Problem(PEELED["mv"], torch.randn(7))  # 5 outputs: the GEMM chain would skip is tiny
    assert chain_stages(small, auto=True) is None and not is_traced(small)
    assert chain_stages(small) is not None  # an explicit chain mode still gets it


W_NARROW = torch.randn(600, 32, generator=G) / 6
W_WIDE_IN, W_WIDE_OUT = torch.randn(9, 300, generator=G) / 17, torch.randn(600, 9, generator=G) / 3


@pytest.mark.parametrize(
    ("f", "n_in", "traced"),
    [
        (lambda x: torch.tanh(x @ W_NARROW.T), 32, False),  # M > N: chain-fwd's seeds are N = 32 columns
        (lambda x: torch.tanh(x @ W_WIDE_IN.T) @ W_WIDE_OUT.T, 300, True),  # 300 columns: enough
    ],
    ids=["few-columns", "enough-columns"],
)
def test_auto_counts_the_seeds_of_its_direction(f, n_in, traced):
    """With more outputs than inputs auto would run chain-fwd, whose saving grows with the
    inputs: a function of few inputs is not traced however many outputs it has."""
    problem = raijac.Problem(f, torch.randn(n_in, generator=torch.Generator().manual_seed(3)))
    assert problem.n_out > problem.n_in
    assert may_chain(problem, auto=True) == traced
    chosen, _, _ = resolve_mode(problem, "auto")
    assert chosen == ("chain-fwd" if traced else "fwd")
    kernel = Kernel(make_target(problem), "chain-fwd")  # asked for, it still runs, and right
    assert_close(kernel(0, 1, 0, n_in)[0].numpy(), torch.func.jacfwd(f)(problem.x).numpy())


def test_may_chain_is_known_without_tracing():
    """What workers are told to trace while the driver triages: no trace in the driver for it."""
    wide = raijac.Problem(_wide_mlp, torch.randn(400))
    small = raijac.Problem(PEELED["mv"], torch.randn(7))
    net = torch.nn.Sequential(torch.nn.Linear(7, 5))
    assert may_chain(wide, auto=True) and may_chain(small) and not may_chain(small, auto=True)
    assert may_chain(raijac.Problem(net, torch.randn(7)), auto=True)
    assert not may_chain(raijac.Problem(lambda x: torch.tanh(x @ W1.T) @ W2.T, torch.randn(3, 7), batched=True))
    assert not may_chain(raijac.Problem.from_module(_Net(), torch.randn(7), wrt="params"))
    assert not is_traced(wide) and not is_traced(small)


@pytest.mark.usefixtures("ray_session")
def test_compute_auto_chain_of_a_plain_function(tmp_path):
    problem = raijac.Problem(_wide_mlp, torch.randn(400, generator=torch.Generator().manual_seed(5)))
    jac = raijac.compute(problem, str(tmp_path / "c.zarr"), workers=2, block_size=64)
    assert jac.mode == "chain" and jac.summary["tiles_total"] > 2
    assert_close(jac.numpy(), torch.func.jacrev(_wide_mlp)(problem.x).numpy())


def test_peel_is_traced_once_per_device_and_not_shipped():
    from ray import cloudpickle

    problem = raijac.Problem(PEELED["mv"], torch.randn(7))
    first = chain_stages(problem)
    assert first is not None and chain_stages(problem) is first
    shipped = cloudpickle.loads(cloudpickle.dumps(problem))
    assert is_traced(problem) and not is_traced(shipped) and chain_stages(shipped) is not None


def test_batched_and_parameter_problems_are_not_traced():
    batched = raijac.Problem(lambda x: torch.tanh(x @ W1.T) @ W2.T, torch.randn(3, 7), batched=True)
    params = raijac.Problem.from_module(_Net(), torch.randn(7), wrt="params")
    assert chain_stages(batched) is None and chain_stages(params) is None
    assert not is_traced(batched)


class _WrongJvp(torch.autograd.Function):
    """A right backward but a jvp that is not its forward's derivative."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 1.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


def test_chain_fwd_is_refused_where_forward_mode_through_the_cut_disagrees():
    g = torch.Generator().manual_seed(4)
    w_in, wide = torch.randn(9, 260, generator=g) / 16, torch.randn(300, 9, generator=g)  # M > N >= PEEL_MIN_SEEDS: auto traces
    problem = raijac.Problem(lambda x: wide @ _WrongJvp.apply(torch.tanh(w_in @ x)), torch.randn(260, generator=g))
    with pytest.raises(raijac.errors.ModeError, match="chain-fwd cannot differentiate this problem"):
        Kernel(make_target(problem), "chain-fwd")
    block = Kernel(make_target(problem), "chain")(0, 1, 0, 300)  # the reverse check passed
    assert_close(block[0].numpy(), torch.func.jacrev(problem.f)(problem.x).numpy())
    mode, reason, _ = resolve_mode(problem, "auto")  # chain-fwd first (M > N); fwd disagrees with autograd too
    assert mode == "rev" and "chain-fwd fails" in reason


def test_a_traced_problem_frees_its_weights_without_a_gc_pass():
    """Workers drop a finished run's problem before loading the next (NOTE: [peel garbage])."""
    import gc
    import weakref

    def traced() -> weakref.ref:
        w1, w2 = torch.randn(50, 40), torch.randn(30, 50)
        problem = raijac.Problem(lambda x: w2 @ torch.tanh(w1 @ x), torch.randn(40))
        assert chain_stages(problem) is not None
        return weakref.ref(w2)

    gc.disable()
    try:
        assert traced()() is None  # the problem is gone: so are its weights, with no gc pass
    finally:
        gc.enable()


def test_workers_trust_the_drivers_check():
    """A worker's target (trusted) skips the peel's check, which its driver made before choosing
    chain: where that check fails, the driver never runs chain (and resuming one is refused)."""
    problem = BY_NAME["clipped_backward_tail"].build()
    assert chain_stages(problem) is None
    assert make_target(problem, trusted=True).stages is not None  # traced, not checked
    with pytest.raises(raijac.errors.ModeError, match="needs f to be"):
        resolve_mode(problem, "chain")


def _leapfrog(steps: int):
    """A simulator: every step reads both halves of the last state (a graph of shared nodes)."""
    g = torch.Generator().manual_seed(5)
    n = 8
    k = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5

    def sim(z: torch.Tensor) -> torch.Tensor:
        q, p = z[:n], z[n:]
        for _ in range(steps):
            p = p - 0.05 * (torch.sin(q) + 0.1 * p - 0.2 * (k @ torch.tanh(q)))
            q = q + 0.05 * p
        return q

    return sim, torch.randn(2 * n, generator=g, dtype=torch.float64)


def test_a_long_simulator_is_traced_in_linear_time():
    """Deciding which nodes are constants visited 2^steps paths; 60 steps never finished."""
    sim, z = _leapfrog(60)
    peeled = peel_chain(sim, z)
    assert peeled is None or isinstance(peeled, Peeled)
    sim, z = _leapfrog(250)  # a walk of its nodes by recursion would pass Python's limit
    peel_chain(sim, z)


@pytest.mark.usefixtures("ray_session")
def test_auto_on_a_simulator_matches_jacrev(store_path):
    sim, z = _leapfrog(60)
    jac = raijac.compute(raijac.Problem(sim, z), store_path, workers=2)
    assert_close(jac.numpy(), torch.func.jacrev(sim)(z).numpy())
