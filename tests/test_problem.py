"""Problem construction, shapes, spec loading, fingerprints and the bad inputs they refuse."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from ray import cloudpickle

import raijac
from raijac.errors import ProblemError
from tests.problems import BY_NAME


def test_shapes_plain_batched_and_params():
    p = raijac.Problem(lambda x: x.sum(-1), torch.randn(3, 4, 5))
    assert (p.input_shape, p.output_shape, p.jacobian_shape) == ((3, 4, 5), (3, 4), (12, 60))
    b = raijac.Problem(lambda x: x[:, :2] * 2, torch.randn(7, 5), batched=True)
    assert (b.batch_size, b.input_shape, b.output_shape, b.jacobian_shape) == (7, (5,), (2,), (7, 2, 5))
    assert b.batch_aware
    s = raijac.Problem(lambda x: (x**2).sum(), torch.randn(4))
    assert s.output_shape == () and s.jacobian_shape == (1, 4)


def test_parameter_columns_follow_module_parameters_order():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)  # frozen parameters are not columns
    p = raijac.Problem.from_module(net, torch.randn(3), wrt="params")
    trainable = [q for q in net.parameters() if q.requires_grad]
    assert torch.equal(p.params, torch.nn.utils.parameters_to_vector(trainable))
    assert [(i.name, i.shape, i.offset) for i in p.param_info] == [
        ("0.weight", (4, 3), 0),
        ("2.weight", (2, 4), 12),
        ("2.bias", (2,), 20),
    ]
    assert p.jacobian_shape == (2, 22)
    np.testing.assert_allclose(p.y.numpy(), net(p.x).detach().numpy())


def test_integer_module_inputs_are_fine_for_parameter_jacobians():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(0), torch.nn.Linear(12, 2))
    p = raijac.Problem.from_module(net, torch.tensor([1, 5, 7]), wrt="params")
    assert p.jacobian_shape == (2, 40 + 24 + 2)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.arange(4), "floating-point inputs.*int64.*x.float"),
        (torch.randn(4, dtype=torch.complex64), "floating-point inputs.*complex"),
        ([1.0, 2.0], "must be a torch.Tensor"),
    ],
)
def test_bad_inputs(x, match):
    with pytest.raises(ProblemError, match=match):
        raijac.Problem(lambda x: x, x)


@pytest.mark.parametrize(
    "f,match",
    [
        (lambda x: "y", "must return tensors .*but returned str"),
        (lambda x: (x, "y"), r"returned a str at y\[1\]"),
        (lambda x: x.long(), "floating-point outputs, but f returned torch.int64"),
        (lambda x: x.to(torch.complex64), "floating-point outputs"),
        (lambda x: 1 / 0, "f raised ZeroDivisionError.*division by zero"),
    ],
)
def test_bad_outputs(f, match):
    with pytest.raises(ProblemError, match=match):
        _ = raijac.Problem(f, torch.randn(3)).y


def test_batched_output_must_be_per_sample():
    with pytest.raises(ProblemError, match="map \\(B, ...\\) to \\(B, ...\\).*B=4"):
        _ = raijac.Problem(lambda x: x.sum(0), torch.randn(4, 3), batched=True).y
    with pytest.raises(ProblemError, match="treat samples independently"):
        _ = raijac.Problem(lambda x: x - x.mean(0), torch.randn(4, 3), batched=True).y
    with pytest.raises(ProblemError, match="leading batch dimension"):
        raijac.Problem(lambda x: x, torch.tensor(1.0), batched=True)


def test_from_module_refusals():
    with pytest.raises(ProblemError, match="torch.nn.Module"):
        raijac.Problem.from_module(lambda x: x, torch.randn(2))
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ProblemError, match="no trainable parameters"):
        raijac.Problem.from_module(frozen, torch.randn(2))
    with pytest.raises(ProblemError, match="wrt must be"):
        raijac.Problem.from_module(torch.nn.Linear(2, 2), torch.randn(2), wrt="weights")


class _CachedProduct(torch.nn.Module):
    """Reads its weight through a product made at init, which functional_call cannot swap."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.doubled = self.lin.weight * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.doubled.T + self.lin(x)


class _LazyCache(torch.nn.Module):
    """Caches a product of its weight on its first call (a constant to every later call)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.cache = None
        self.mask = None  # a cache of constants: harmless

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            self.cache = self.lin.weight * 2
        if self.mask is None:
            self.mask = torch.ones(2)
        return (x @ self.cache.T + self.lin.bias) * self.mask


class _KeepsItsAttention(torch.nn.Module):
    """Keeps what it computed for a plot: written on every call, never read back."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = torch.softmax(self.lin(x), -1)
        return self.last * 3


class _ConstantCache(_LazyCache):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.mask = torch.ones(2)
        return self.lin(x) * self.mask


@pytest.mark.parametrize("wrt", ["params", "input"])
def test_state_f_keeps_on_its_module_is_refused_where_it_depends_on_what_is_differentiated(wrt):
    """NOTE: [kept state]: raijac's first call made the cache without a gradient, and every
    later call (the block check and verify too) took it as a constant: J 100% off."""
    lazy = _LazyCache()
    problem = raijac.Problem.from_module(lazy, torch.randn(4, 3), wrt=wrt, batched=True)
    if wrt == "params":
        with pytest.raises(
            ProblemError, match=r"stores _LazyCache.cache on its module .*reads it back, computed from the parameters"
        ):
            _ = problem.y
        assert lazy.cache is None and lazy.mask is None  # the caller's module as it was
    else:  # a cache of the weights is a constant of an input Jacobian
        assert problem.y.shape == (4, 2)
    for fine in (_ConstantCache(), _KeepsItsAttention()):
        assert raijac.Problem.from_module(fine, torch.randn(4, 3), wrt=wrt, batched=True).y.shape == (4, 2)


def test_hessian_of_a_module_read_around_its_parameters_is_refused():
    """hessian_from_module differentiated through the swap only: H was stored with zero
    weight blocks for a weight copied at init or cached on the first call."""
    for module in (_CachedProduct(), _LazyCache()):
        with pytest.raises(ProblemError, match="own parameters differs"):
            raijac.Problem.hessian_from_module(module, lambda out: (out**2).sum(), torch.randn(4, 3))
    lazy = _LazyCache()
    try:
        raijac.Problem.hessian_from_module(lazy, lambda out: (out**2).sum(), torch.randn(4, 3))
    except ProblemError:
        pass
    assert lazy.cache is None
    fine = raijac.Problem.hessian_from_module(torch.nn.Linear(3, 2), lambda out: (out**2).sum(), torch.randn(4, 3))
    assert fine.y.shape == (8,)


def test_a_module_that_changes_its_parameters_in_place_is_refused():
    embed = torch.nn.Embedding(10, 3, max_norm=0.5)
    problem = raijac.Problem.from_module(embed, torch.tensor([[1, 2], [3, 4]]), wrt="params", batched=True)
    with pytest.raises(ProblemError, match=r"changes its parameters in place .*max_norm"):
        _ = problem.y


@pytest.mark.parametrize("batched", [True, False])
def test_a_weight_read_around_its_module_attribute_is_refused(batched):
    """NOTE: [own backward]: J through the swapped parameters would miss the cached path, and
    every block check would agree with it; the module's own backward does not."""
    problem = raijac.Problem.from_module(_CachedProduct(), torch.randn(*(4,) * batched, 3), wrt="params", batched=batched)
    with pytest.raises(ProblemError, match=r"own parameters differs .* by 0\.\d+ \(relative\).*made at init"):
        _ = problem.y
    fine = raijac.Problem.from_module(torch.nn.Linear(3, 2), torch.randn(*(4,) * batched, 3), wrt="params", batched=batched)
    assert fine.replace(params=fine.params + 1).y.shape == ((4, 2) if batched else (2,))  # other values are fine


# ---------------------------------------------------------------------- specs
SPEC = textwrap.dedent(
    """
    import torch
    import raijac

    torch.manual_seed(0)
    W = torch.randn(5, 3)
    ready = raijac.Problem(lambda x: torch.tanh(x @ W.T), torch.randn(3))

    def problem():
        torch.manual_seed(1)
        return raijac.Problem(torch.nn.Linear(3, 2), torch.randn(3))

    def broken():
        raise RuntimeError("no data here")

    number = 3
    """
)


@pytest.fixture
def spec_file(tmp_path, monkeypatch):
    path = tmp_path / "my_spec.py"
    path.write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    return path


def test_spec_from_file_problem_and_callable(spec_file):
    ready = raijac.load_problem("my_spec.py:ready")
    assert ready.spec == f"{spec_file}:ready"  # made absolute for workers elsewhere
    assert ready.jacobian_shape == (5, 3)
    built = raijac.load_problem(f"{spec_file}:problem")
    assert built.jacobian_shape == (2, 3)
    assert built.fingerprint() == raijac.load_problem(f"{spec_file}:problem").fingerprint()


def test_spec_from_module():
    p = raijac.load_problem("tests.problems:matmul_chain")
    assert p.spec == "tests.problems:matmul_chain" and p.jacobian_shape == (17, 23)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("no_colon", "must look like path/to/file.py:NAME"),
        ("missing.py:problem", "spec file missing.py does not exist"),
        ("my_spec.py:nothing", "has no name 'nothing'; it defines: .*problem"),
        ("my_spec.py:number", "must name a raijac.Problem.*gives int 3"),
        ("my_spec.py:broken", "calling broken\\(\\) .* raised RuntimeError: no data here"),
        ("no_such_package_xyz.mod:problem", "cannot import module 'no_such_package_xyz.mod'"),
    ],
)
def test_spec_errors(spec_file, spec, match):
    with pytest.raises(ProblemError, match=match):
        raijac.load_problem(spec)


def test_edited_spec_file_is_loaded_afresh(tmp_path):
    spec = tmp_path / "edited.py"
    spec.write_text("import torch, raijac\nproblem = raijac.Problem(torch.sin, torch.ones(3))\n")
    assert raijac.load_problem(f"{spec}:problem").jacobian_shape == (3, 3)
    spec.write_text("import torch, raijac\nproblem = raijac.Problem(torch.cos, torch.zeros(4))\n")
    assert raijac.load_problem(f"{spec}:problem").jacobian_shape == (4, 4)


def test_spec_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad_spec.py"
    bad.write_text("import torch\nraise ImportError('needs scipy 9')\n")
    with pytest.raises(ProblemError, match="importing .*bad_spec.py raised ImportError: needs scipy 9"):
        raijac.load_problem(f"{bad}:problem")


# ---------------------------------------------------------------------- fingerprints
def test_fingerprint_tracks_what_fixes_the_result():
    base = BY_NAME["matmul_chain"].build()
    fp = base.fingerprint()
    assert fp == BY_NAME["matmul_chain"].build().fingerprint()
    assert fp != base.fingerprint(mode="fwd") and fp != base.fingerprint(dtype="float64")
    moved = BY_NAME["matmul_chain"].build()
    moved = moved.replace(x=moved.x + 1e-3)
    assert moved.fingerprint() != fp
    p1, p2 = BY_NAME["params"].build(), BY_NAME["params"].build()
    params = p2.params.clone()
    params[0] += 1
    assert p1.fingerprint() != p2.replace(params=params).fingerprint()


def test_a_problem_is_frozen_and_replace_makes_a_changed_copy():
    problem = BY_NAME["matmul_chain"].build()
    y = problem.y
    with pytest.raises(AttributeError, match=r"frozen.*problem.replace\(x=...\)"):
        problem.x = problem.x + 1
    moved = problem.replace(x=problem.x + 1)
    assert torch.equal(problem.y, y) and not torch.equal(moved.y, y)  # evaluated afresh at the new point
    with pytest.raises(raijac.ProblemError, match="no field 'z'"):
        problem.replace(z=1)


def test_pickling_drops_the_cached_output():
    p = BY_NAME["conv"].build()
    _ = p.y
    import cloudpickle  # what Ray ships problems with (lambdas included)

    clone = cloudpickle.loads(cloudpickle.dumps(p))
    assert "y" not in clone.__dict__
    np.testing.assert_array_equal(clone.y.numpy(), p.y.numpy())


_CALLS: list[int] = []
_W = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))


def _counted(v: torch.Tensor) -> torch.Tensor:
    """Pickled by reference (a module-level function), so a clone's calls count here too."""
    _CALLS.append(1)
    return torch.tanh(v @ _W.T)


def test_a_shipped_problem_carries_its_checked_output(monkeypatch):
    """NOTE: [shipped checks]: a worker's copy of a checked problem takes y from the driver
    instead of calling f again; a y above SHIPPED_Y_BYTES is evaluated again there (and so
    is an unchecked problem's)."""
    import raijac.problem

    problem = raijac.Problem(_counted, torch.randn(4, 3), batched=True)
    y = problem.y
    made = len(_CALLS)
    clone = cloudpickle.loads(cloudpickle.dumps(problem))
    assert torch.equal(clone.y, y) and not clone.random and len(_CALLS) == made
    unchecked = cloudpickle.loads(cloudpickle.dumps(raijac.Problem(_counted, torch.randn(4, 3), batched=True)))
    assert unchecked.y.shape == (4, 5) and len(_CALLS) > made
    monkeypatch.setattr(raijac.problem, "SHIPPED_Y_BYTES", 0)
    made = len(_CALLS)
    assert torch.equal(cloudpickle.loads(cloudpickle.dumps(problem)).y, y) and len(_CALLS) == made + 1


def test_problem_chain_is_its_stages_composed():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 6)
    problem = raijac.Problem.chain([lin, torch.tanh, lambda h: h * 2], torch.randn(4))
    assert torch.allclose(problem.f(problem.x), torch.tanh(lin(problem.x)) * 2)
    assert problem.jacobian_shape == (6, 4) and "Linear" in repr(problem.f)
    shipped = cloudpickle.loads(cloudpickle.dumps(problem))  # as Ray ships it, lambda included
    assert torch.allclose(shipped.f(problem.x), problem.f(problem.x))


@pytest.mark.parametrize(
    "stages,message",
    [([], "needs at least one stage"), ([torch.nn.Tanh(), 3], "stage 1 of the chain is a int, not callable")],
)
def test_problem_chain_refuses_bad_stages(stages, message):
    with pytest.raises(ProblemError, match=message):
        raijac.Problem.chain(stages, torch.randn(3))
