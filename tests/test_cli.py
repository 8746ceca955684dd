"""cli: `raijac compute | plan | inspect` through click's CliRunner on the session's real local Ray.

Stores are read back with plain zarr and compared with torch.func; every bad input must give
one `error:` line on stderr, a non-zero exit and no traceback, and must leave a store that
already exists at --out byte-for-byte unchanged. Spec files are written into tmp_path, seeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import raijac
from raijac.cli import cli

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2e-5, 2e-6

# ---------------------------------------------------------------------- spec files
HEADER = "import torch\n\nimport raijac\n"

# M=7 < N=11, so auto picks rev; 7 and 11 divide no block size used here.
PLAIN = """
def problem():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 11, generator=g) / 3
    x = torch.randn(11, generator=g)
    return raijac.Problem(lambda x: torch.tanh(w @ torch.sin(x)) * x[:7], x)
"""

# The same function at another point: a different problem for the fingerprint check.
PLAIN_OTHER_POINT = PLAIN.replace("manual_seed(1)", "manual_seed(2)")

BATCHED = """
def problem():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, generator=g) / 2
    x = torch.randn(5, 6, generator=g)
    return raijac.Problem(lambda x: torch.tanh(x @ w.T) * x[:, 1:5] ** 2, x, batched=True)
"""

PARAMS = """
def problem():
    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4))
    x = torch.randn(6, generator=torch.Generator().manual_seed(5))
    return raijac.Problem.from_module(net, x, wrt="params")
"""


def write_spec(folder: Path, body: str, name: str = "spec.py", attr: str = "problem") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(HEADER + textwrap.dedent(body))
    return f"{path}:{attr}"


# ---------------------------------------------------------------------- references
def reference(spec: str) -> np.ndarray:
    """torch.func.jacrev of the spec's function (per sample via vmap; over the parameters for wrt="params")."""
    problem = raijac.load_problem(spec)
    f, x = problem.f, problem.x
    if problem.wrt == "params":
        net = problem.module
        params = {k: v.detach() for k, v in net.named_parameters()}
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (x,)))(params)
        return torch.cat([jac[k].reshape(problem.n_out, -1) for k in params], dim=1).detach().numpy()
    if problem.batched:
        per = torch.func.vmap(torch.func.jacrev(lambda xi: f(xi[None])[0]))(x)
        return per.reshape(x.shape[0], problem.n_out, problem.n_in).detach().numpy()
    return torch.func.jacrev(f)(x).reshape(problem.n_out, problem.n_in).detach().numpy()


def stored(path: str | Path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["jacobian"][...]


def assert_matches(path: str | Path, spec: str) -> None:
    got, want = stored(path), reference(spec)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- running the CLI
def invoke(*args: object):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps result.stderr apart anyway
    return runner.invoke(cli, [str(a) for a in args])


def explain(result) -> str:
    import traceback

    tb = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    return f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{tb}"


def compute(spec: str, out: str | Path, *extra: object) -> dict:
    """`raijac compute SPEC --out OUT --workers 2 --json ...`: exit 0, returns the JSON summary."""
    result = invoke("compute", spec, "--out", out, "--workers", 2, "--json", *extra)
    assert result.exit_code == 0, explain(result)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"out", "mode", "tiles_total", "tiles_skipped", "tiles_computed", "seconds"} <= set(summary)
    assert summary["out"] == str(out)
    assert summary["seconds"] >= 0
    return summary


def inspect_json(path: str | Path) -> dict:
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, explain(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_one_line_error(result, *needles: str) -> str:
    """A deliberate raijac error: non-zero exit, one `error:` line naming the problem, no traceback."""
    assert result.exit_code != 0, explain(result)
    assert isinstance(result.exception, SystemExit), explain(result)  # not an exception escaping the command
    assert "Traceback" not in result.output + result.stderr, explain(result)
    assert result.stdout == "", explain(result)  # nothing half-printed before the error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, explain(result)
    line = lines[0]
    assert line.startswith("error: "), line
    assert "error: unexpected" not in line, f"not a RaijacError (caught by the CLI's catch-all): {line}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def tree_digest(path: str | Path) -> dict[str, str]:
    """Every file (and folder) under path with a hash of its bytes."""
    root = Path(path)
    return {
        str(p.relative_to(root)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
    }


# ---------------------------------------------------------------------- shared stores
@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, ray_session):
    """The plain problem computed once in auto mode: spec, store and summary."""
    base = tmp_path_factory.mktemp("plain")
    spec = write_spec(base / "spec", PLAIN)
    out = base / "plain.zarr"
    summary = compute(spec, out)
    return SimpleNamespace(spec=spec, out=out, summary=summary)


@pytest.fixture
def existing(plain_run, tmp_path) -> Path:
    """A private copy of the finished plain store."""
    out = tmp_path / "existing.zarr"
    shutil.copytree(plain_run.out, out)
    return out


# ---------------------------------------------------------------------- compute: results
def test_compute_plain_auto(plain_run):
    s = plain_run.summary
    assert s["mode"] == "rev"  # M=7 <= N=11
    assert s["tiles_computed"] == s["tiles_total"] >= 1
    assert s["tiles_skipped"] == 0
    assert s["complete"] is True
    assert_matches(plain_run.out, plain_run.spec)


def test_compute_batched(ray_session, tmp_path):
    spec = write_spec(tmp_path / "spec", BATCHED)
    out = tmp_path / "batched.zarr"
    s = compute(spec, out)
    assert s["tiles_computed"] == s["tiles_total"] and s["tiles_skipped"] == 0
    assert stored(out).shape == (5, 4, 6)
    assert_matches(out, spec)
    info = inspect_json(out)
    assert info["batched"] is True and info["shape"] == [5, 4, 6]
    assert info["input_shape"] == [6] and info["output_shape"] == [4]


CHAIN_SPEC = """
def problem():
    torch.manual_seed(6)
    stages = [torch.nn.Linear(9, 14), torch.nn.Tanh(), lambda h: torch.sin(h) * h.mean(-1, keepdim=True), torch.nn.Linear(14, 7)]
    x = torch.randn(3, 9, generator=torch.Generator().manual_seed(7))
    return raijac.Problem.chain(stages, x, batched=True)
"""


@pytest.mark.parametrize("mode", ["auto", "chain", "chain-fwd"])
def test_compute_declared_batched_chain(ray_session, tmp_path, mode):
    """A spec declaring its stages (one a lambda) runs the chain modes per sample from the CLI."""
    spec = write_spec(tmp_path / "spec", CHAIN_SPEC)
    out = tmp_path / "chain.zarr"
    s = compute(spec, out, "--mode", mode, "--block-size", 4)
    assert s["mode"] == ("chain" if mode == "auto" else mode) and s["tiles_total"] > 1
    assert stored(out).shape == (3, 7, 9)
    assert_matches(out, spec)


def test_compute_parameter_jacobian(ray_session, tmp_path):
    spec = write_spec(tmp_path / "spec", PARAMS)
    out = tmp_path / "params.zarr"
    s = compute(spec, out)
    n_params = 6 * 9 + 9 + 9 * 4 + 4
    assert stored(out).shape == (4, n_params)
    assert s["tiles_computed"] == s["tiles_total"]
    assert_matches(out, spec)
    info = inspect_json(out)
    assert info["wrt"] == "params" and info["input_shape"] == [n_params]


HESSIAN_SPEC = """
def f(x):
    return ((1 - x[:-1]) ** 2 + 10 * (x[1:] - x[:-1] ** 2) ** 2).sum() + torch.logsumexp(x, 0)

def problem():
    return raijac.Problem.hessian(f, torch.linspace(-1, 1, 17, dtype=torch.float64))
"""


def test_compute_hessian_says_so_and_verify_checks_symmetry(ray_session, tmp_path):
    spec = write_spec(tmp_path / "spec", HESSIAN_SPEC)
    out = tmp_path / "h.zarr"
    result = invoke("compute", spec, "--out", out, "--workers", 2, "--block-size", 5, "--no-progress", "--verify")
    assert result.exit_code == 0, explain(result)
    assert "17 x 17 float64 Hessian to" in result.stdout and "verify: OK" in result.stdout
    ns = {}
    exec(HEADER + HESSIAN_SPEC, ns)
    want = torch.func.hessian(ns["f"])(torch.linspace(-1, 1, 17, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(stored(out), want, rtol=1e-12, atol=1e-12)
    shown = invoke("inspect", out)
    assert "kind      Hessian of a scalar f" in shown.stdout, explain(shown)
    info = inspect_json(out)
    assert info["kind"] == "hessian" and info["hessian"] is True
    checked = invoke("verify", out, "--spec", spec)
    assert checked.exit_code == 0 and "symmetry" in checked.stdout, explain(checked)


@pytest.mark.parametrize(
    ("options", "mode", "dtype"),
    [
        (["--mode", "fwd"], "fwd", np.float32),
        (["--mode", "loop"], "loop", np.float32),
        (["--block-size", "3"], "rev", np.float32),
        (["--dtype", "float64"], "rev", np.float64),
    ],
    ids=["fwd", "loop", "block-size-3", "float64"],
)
def test_compute_options(plain_run, tmp_path, options, mode, dtype):
    out = tmp_path / "opt.zarr"
    s = compute(plain_run.spec, out, *options)
    assert s["mode"] == mode
    assert s["tiles_computed"] == s["tiles_total"] and s["tiles_skipped"] == 0
    assert stored(out).dtype == dtype
    if "--block-size" in options:
        # 7 rows in blocks of 3: tiles 0:3, 3:6, 6:7, one chunk of rows each
        assert s["tiles_total"] == 3
        assert zarr.open_group(str(out), mode="r")["jacobian"].chunks == (3, 11)
    assert_matches(out, plain_run.spec)


# ---------------------------------------------------------------------- plan and inspect
def test_plan_prints_the_plan_and_creates_nothing(plain_run, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = tree_digest(plain_run.out)
    result = invoke("plan", plain_run.spec, "--workers", 2)
    assert result.exit_code == 0, explain(result)
    text = result.stdout
    assert "mode        rev" in text
    for word in ("triage", "chunks", "workers"):
        assert word in text, text
    assert "cpu0" in text and "cpu1" in text  # --workers 2
    assert list(cwd.iterdir()) == []
    assert tree_digest(plain_run.out) == before


def test_inspect_complete_store(plain_run):
    s = plain_run.summary
    result = invoke("inspect", plain_run.out)
    assert result.exit_code == 0, explain(result)
    text = result.stdout
    n = s["tiles_total"]
    assert f"complete, {n}/{n} tiles" in text
    assert "(7, 11) float32" in text
    assert "compression" in text

    info = inspect_json(plain_run.out)
    assert info["complete"] is True
    assert info["tiles_done"] == info["tiles_total"] == n
    assert info["shape"] == [7, 11]
    assert info["mode"] == "rev"
    assert info["bytes"] == 7 * 11 * 4
    chunks = [p for p in (plain_run.out / "jacobian").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert info["bytes_stored"] == sum(p.stat().st_size for p in chunks)  # chunk data only, not metadata
    assert info["compression_ratio"] == pytest.approx(info["bytes"] / info["bytes_stored"], rel=1e-2)


# ---------------------------------------------------------------------- resume / overwrite
def test_resume_finished_store_computes_nothing(plain_run, existing):
    s = compute(plain_run.spec, existing, "--resume")
    assert s["tiles_computed"] == 0
    assert s["tiles_skipped"] == s["tiles_total"] == plain_run.summary["tiles_total"]
    assert_matches(existing, plain_run.spec)


def test_resume_partial_store_computes_the_missing_tile(plain_run, existing):
    group = zarr.open_group(str(existing), mode="r+")
    seeds = group.attrs["raijac"]["layout"]["tile_seeds"]
    group["jacobian"][:seeds, :] = np.nan  # tile 0's rows, lost
    group["tiles"][0] = 0

    result = invoke("inspect", existing)
    assert result.exit_code == 0, explain(result)
    total = plain_run.summary["tiles_total"]
    assert f"INCOMPLETE, {total - 1}/{total} tiles" in result.stdout

    s = compute(plain_run.spec, existing, "--resume")
    assert s["tiles_computed"] == 1
    assert s["tiles_skipped"] == total - 1
    assert_matches(existing, plain_run.spec)


def test_overwrite_recomputes(plain_run, existing):
    zarr.open_group(str(existing), mode="r+")["jacobian"][...] = 0.0  # must not survive
    s = compute(plain_run.spec, existing, "--overwrite")
    assert s["tiles_computed"] == s["tiles_total"] == plain_run.summary["tiles_total"]
    assert s["tiles_skipped"] == 0
    assert_matches(existing, plain_run.spec)


def test_overwrite_without_json_prints_one_summary_line(plain_run, existing):
    result = invoke("compute", plain_run.spec, "--out", existing, "--workers", 2, "--overwrite", "--no-progress")
    assert result.exit_code == 0, explain(result)
    n = plain_run.summary["tiles_total"]
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"wrote 7 x 11 float32 Jacobian to {existing} in ")
    assert f"(mode rev; {n} tiles computed, 0 skipped, 2 workers)" in line
    assert_matches(existing, plain_run.spec)


DEPRECATING = """
import warnings
import torch
import raijac


def f(x):
    warnings.warn("old_api is deprecated", DeprecationWarning)  # as torch.jit.script's notice at import
    return torch.tanh(x)


problem = raijac.Problem(f, torch.linspace(-1, 1, 5))
"""


def test_library_deprecation_notices_stay_hidden(ray_session, tmp_path):
    """torch.jit.script's deprecation notice (at the import of torch's jvp decompositions)
    showed as a warning line on every run of the bundled example."""
    spec = tmp_path / "deprecating.py"
    spec.write_text(DEPRECATING)
    result = invoke("compute", f"{spec}:problem", "--out", tmp_path / "d.zarr", "--workers", 2, "--no-progress")
    assert result.exit_code == 0, explain(result)
    assert "deprecated" not in result.stderr, explain(result)


def test_one_tile_one_worker_reads_in_the_singular(plain_run, tmp_path):
    result = invoke("compute", plain_run.spec, "--out", tmp_path / "o.zarr", "--workers", 1, "--no-progress")
    assert result.exit_code == 0, explain(result)
    assert "(mode rev; 1 tile computed, 0 skipped, 1 worker)" in result.stdout
    shown = invoke("inspect", tmp_path / "o.zarr").stdout
    assert "complete, 1/1 tile\n" in shown and "over 1 run:" in shown


# x**3 whose backward (reverse mode) says 2x**2 and whose jvp (forward mode) says 3x**2.
WRONG_BACKWARD = """
class Cube(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x**2

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * 3 * x**2


def problem():
    return raijac.Problem(lambda x: torch.tanh(Cube.apply(x)), torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
"""


def test_a_wrong_backward_formula_runs_in_mode_fwd_without_the_block_check(ray_session, tmp_path):
    """NOTE: [adjoint test]: the way out the refusal names (`BAD_SPECS`) works from the CLI."""
    spec = write_spec(tmp_path, WRONG_BACKWARD)
    compute(spec, tmp_path / "w.zarr", "--mode", "fwd", "--no-block-check")
    x = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    want = torch.diag((1 - torch.tanh(x**3) ** 2) * 3 * x**2).numpy()
    np.testing.assert_allclose(stored(tmp_path / "w.zarr"), want, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------- bad input
# Each case: spec body (None: PLAIN), the spec's NAME, extra options, words the error must contain.
# They all run with --overwrite against a copy of a finished store, which must survive untouched:
# bad input is refused before anything is deleted or written.
BAD_SPECS = {
    "spec-syntax-error": ("def problem(:\n", "problem", [], ["importing", "SyntaxError"]),
    "zstd-level-out-of-range": (PLAIN, "problem", ["--compression-level", 99], ["compression level 99", "-7..22"]),
    "blosc-level-out-of-range": (
        PLAIN,
        "problem",
        ["--compressor", "blosc", "--compression-level", 12],
        ["compression level 12", "blosc", "0..9"],
    ),
    "name-missing": (PLAIN, "nope", [], ["has no name 'nope'", "problem"]),
    "wrong-backward-in-torch": (
        WRONG_BACKWARD,
        "problem",
        [],
        ["reverse-mode derivative of f is wrong", "--mode fwd --no-block-check"],
    ),
    "state-changed-in-place": (
        """
        def problem():
            torch.manual_seed(5)
            net = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 16), n_power_iterations=1)
            return raijac.Problem.from_module(torch.nn.Sequential(net, torch.nn.Tanh()), torch.randn(3, 6), batched=True)
        """,
        "problem",
        [],
        ["in place on every call", "module.eval()"],
    ),
    "not-a-problem": (PLAIN + "\nNAME = 3\n", "NAME", [], ["must name a raijac.Problem", "int"]),
    "function-raises": (
        """
        def f(x):
            raise RuntimeError("the flux capacitor overheated")

        def problem():
            return raijac.Problem(f, torch.ones(3))
        """,
        "problem",
        [],
        ["RuntimeError", "the flux capacitor overheated"],
    ),
    "output-not-tensor": (
        """
        def problem():
            return raijac.Problem(lambda x: (x, "label"), torch.ones(3))
        """,
        "problem",
        [],
        ["returned a str at y[1]", "outputs="],
    ),
    "output-integer": (
        """
        def problem():
            return raijac.Problem(lambda x: (x * 10).long(), torch.ones(3))
        """,
        "problem",
        [],
        ["floating-point outputs", "int64"],
    ),
    "x-integer": (
        """
        def problem():
            return raijac.Problem(torch.sin, torch.arange(5))
        """,
        "problem",
        [],
        ["floating-point inputs", "int64"],
    ),
    "x-complex": (
        """
        def problem():
            return raijac.Problem(torch.sin, torch.randn(5, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)))
        """,
        "problem",
        [],
        ["complex64"],
    ),
    "batched-wrong-leading-dim": (
        """
        def problem():
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
            return raijac.Problem(lambda x: x.reshape(-1), x, batched=True)
        """,
        "problem",
        [],
        ["B=4", "(12,)"],
    ),
    "batched-mixes-samples": (
        """
        def problem():
            x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
            return raijac.Problem(lambda x: x - x.mean(0), x, batched=True)
        """,
        "problem",
        [],
        ["depends on other input samples"],
    ),
    "not-deterministic": (
        """
        import os

        def problem():  # seeded by the process id: every worker builds another x than the driver
            return raijac.Problem(torch.sin, torch.randn(5, generator=torch.Generator().manual_seed(os.getpid())))
        """,
        "problem",
        [],
        ["differs from the driver's", "deterministic", "seed"],
    ),
    "weights-drawn-apart": (
        """
        import os

        def problem():  # x is seeded, the weights are not: every worker holds another f than the driver
            torch.manual_seed(os.getpid())
            net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
            x = torch.randn(6, generator=torch.Generator().manual_seed(0))
            return raijac.Problem.from_module(net, x, wrt="input")
        """,
        "problem",
        [],
        ["gives another f(x) or derivative than the driver's", "seed", "weights"],
    ),
    "weights-drawn-apart-at-zero": (
        """
        import os

        def problem():  # y = tanh(W 0) = 0 whatever W: only a derivative shows the weights drawn apart
            torch.manual_seed(os.getpid())
            net = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Tanh())
            return raijac.Problem.from_module(net, torch.zeros(6), wrt="input")
        """,
        "problem",
        [],
        ["gives another f(x) or derivative than the driver's", "seed"],
    ),
    "captured-drawn-apart": (
        """
        import os

        def problem():  # a constant f closes over, drawn unseeded
            w = torch.randn(5, 6, generator=torch.Generator().manual_seed(os.getpid()))
            x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
            return raijac.Problem(lambda v: torch.tanh(v @ w.T), x, batched=True)
        """,
        "problem",
        [],
        ["gives another f(x) or derivative than the driver's", "seed"],
    ),
    "rev-repeat-not-batch-aware": (None, "problem", ["--mode", "rev-repeat"], ["rev-repeat"]),
    "fwd-repeat-not-batch-aware": (None, "problem", ["--mode", "fwd-repeat"], ["fwd-repeat"]),
    "budget-unparseable": (None, "problem", ["--memory-budget", "lots"], ["'lots'", "512MB"]),
    "budget-too-small": (None, "problem", ["--memory-budget", "1KB"], ["too small", "one seed", "needs about"]),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_input_is_one_line_and_keeps_the_store(ray_session, existing, tmp_path, case):
    body, name, options, needles = BAD_SPECS[case]
    spec = write_spec(tmp_path / "spec", PLAIN if body is None else body, attr=name)
    before, beside = tree_digest(existing), sorted(os.listdir(existing.parent))
    result = invoke("compute", spec, "--out", existing, "--workers", 2, "--overwrite", *options)
    assert_one_line_error(result, *needles)
    assert tree_digest(existing) == before
    assert sorted(os.listdir(existing.parent)) == beside  # no staged store left (NOTE: [staged store])


def test_missing_spec_file(existing, tmp_path):
    before = tree_digest(existing)
    missing = tmp_path / "nowhere" / "spec.py"
    result = invoke("compute", f"{missing}:problem", "--out", existing, "--overwrite")
    assert_one_line_error(result, "does not exist", str(missing.name))
    assert tree_digest(existing) == before


def test_bad_raijac_blas_is_one_line_and_keeps_the_store(existing, tmp_path, monkeypatch):
    monkeypatch.setenv("RAIJAC_BLAS", "openblas")
    spec = write_spec(tmp_path / "spec", PLAIN)
    before = tree_digest(existing)
    result = invoke("compute", spec, "--out", existing, "--workers", 2, "--overwrite")
    assert_one_line_error(result, "RAIJAC_BLAS must be torch or numpy", "'openblas'")
    assert tree_digest(existing) == before


def test_malformed_spec(tmp_path):
    result = invoke("compute", "no-colon-here", "--out", tmp_path / "o.zarr")
    assert_one_line_error(result, "path/to/file.py:NAME")
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_mode_is_a_usage_error(plain_run, tmp_path):
    result = invoke("compute", plain_run.spec, "--out", tmp_path / "o.zarr", "--mode", "sideways")
    assert result.exit_code == 2
    assert "Traceback" not in result.output + result.stderr
    assert "sideways" in result.stderr and "rev-repeat" in result.stderr  # names the value and the choices
    assert not (tmp_path / "o.zarr").exists()


def test_existing_out_needs_resume_or_overwrite(plain_run, existing):
    before = tree_digest(existing)
    result = invoke("compute", plain_run.spec, "--out", existing, "--workers", 2)
    n = plain_run.summary["tiles_total"]
    assert_one_line_error(result, str(existing), f"({n}/{n} tiles done)", "--resume", "--overwrite")
    assert tree_digest(existing) == before


def test_out_folder_missing(plain_run, tmp_path):
    out = tmp_path / "no" / "such" / "folder" / "o.zarr"
    result = invoke("compute", plain_run.spec, "--out", out)
    assert_one_line_error(result, "does not exist", str(out.parent))
    assert not (tmp_path / "no").exists()


def test_zero_workers_is_a_usage_error(plain_run, tmp_path):
    result = invoke("compute", plain_run.spec, "--out", tmp_path / "o.zarr", "--workers", 0)
    assert result.exit_code == 2
    assert "--workers" in result.stderr and "Traceback" not in result.output + result.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_resume_and_overwrite_together(plain_run, existing):
    before = tree_digest(existing)
    result = invoke("compute", plain_run.spec, "--out", existing, "--resume", "--overwrite")
    assert_one_line_error(result, "--resume", "--overwrite")
    assert tree_digest(existing) == before


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ("other-point", ["(--resume) refused", "another point x", "--overwrite"]),
        ("other-dtype", ["(--resume) refused", "storage dtype (dtype= / --dtype) (stored float32, this run float64)"]),
        ("other-mode", ["(--resume) refused", "mode (mode= / --mode) (stored auto, this run fwd)"]),
        ("old-store", ["(--resume) refused", "fingerprint"]),
    ],
)
def test_resume_refusal_names_what_differs(ray_session, existing, tmp_path, plain_run, change, needles):
    args = {
        "other-point": [write_spec(tmp_path / "b", PLAIN_OTHER_POINT)],
        "other-dtype": [plain_run.spec, "--dtype", "float64"],
        "other-mode": [plain_run.spec, "--mode", "fwd"],
        "old-store": [write_spec(tmp_path / "b", PLAIN_OTHER_POINT)],
    }[change]
    if change == "old-store":  # written before the fingerprint's parts were stored: only the whole is compared
        group = zarr.open_group(str(existing), mode="r+")
        group.attrs["raijac"] = {k: v for k, v in group.attrs["raijac"].items() if k != "fingerprint_parts"}
    before = tree_digest(existing)
    result = invoke("compute", *args, "--out", existing, "--workers", 2, "--resume")
    line = assert_one_line_error(result, *needles)
    assert line.count("another") == 1, line  # only what differs is named
    assert tree_digest(existing) == before


def test_resume_takes_the_stored_mode_and_dtype(ray_session, plain_run, tmp_path):
    """Ctrl-C says "rerun with --resume": that alone must do, whatever --mode and --dtype the run had."""
    out = tmp_path / "fwd64.zarr"
    first = compute(plain_run.spec, out, "--mode", "fwd", "--dtype", "float64", "--block-size", 3)
    group = zarr.open_group(str(out), mode="r+")
    seeds = group.attrs["raijac"]["layout"]["tile_seeds"]
    group["jacobian"][:, :seeds] = np.nan  # tile 0's columns, lost as if interrupted
    group["tiles"][0] = 0
    group.attrs["raijac"] = {**group.attrs["raijac"], "complete": False}

    s = compute(plain_run.spec, out, "--resume")
    assert (s["mode"], s["requested_mode"], s["dtype"]) == ("fwd", "fwd", "float64")
    assert s["tiles_computed"] == 1 and s["tiles_skipped"] == first["tiles_total"] - 1
    got = stored(out)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, reference(plain_run.spec), rtol=RTOL, atol=ATOL)


def test_resume_accepts_the_mode_auto_chose_by_name(ray_session, plain_run, existing):
    """`inspect` shows the mode a store runs in: resuming an auto store with that --mode is
    the same run (it was refused: "stored auto, this run rev")."""
    group = zarr.open_group(str(existing), mode="r+")
    meta = dict(group.attrs["raijac"])
    assert meta["requested_mode"] == "auto"
    group["tiles"][0] = 0
    group.attrs["raijac"] = {**meta, "complete": False}
    s = compute(plain_run.spec, existing, "--resume", "--mode", meta["mode"])
    assert (s["mode"], s["requested_mode"], s["tiles_computed"]) == (meta["mode"], "auto", 1)
    np.testing.assert_allclose(stored(existing), reference(plain_run.spec), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["folder", "file", "zarr-group", "missing"])
def test_inspect_refuses_what_is_not_a_store(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "folder":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    elif kind == "file":
        path.write_text("hello")
    elif kind == "zarr-group":
        zarr.open_group(str(path), mode="w").create_array("a", shape=(3,), dtype="f4")
    before = tree_digest(path) if path.is_dir() else None
    result = invoke("inspect", path)
    assert_one_line_error(result, str(path), "not a raijac store")
    if before is not None:
        assert tree_digest(path) == before


@pytest.mark.parametrize("kind", ["folder", "zarr-group"])
def test_overwrite_refuses_what_is_not_a_store(plain_run, tmp_path, kind):
    path = tmp_path / "precious"
    if kind == "folder":
        path.mkdir()
        (path / "thesis.tex").write_text("years of work")
        (path / "sub").mkdir()
        (path / "sub" / "data.bin").write_bytes(os.urandom(64))
    else:
        zarr.open_group(str(path), mode="w").create_array("a", shape=(3,), dtype="f4")[...] = 1.0
    before = tree_digest(path)
    result = invoke("compute", plain_run.spec, "--out", path, "--overwrite")
    assert_one_line_error(result, str(path), "not a raijac store")
    assert tree_digest(path) == before


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        (["--memory-budget", "1KB"], ["too small", "needs about"]),
        (["--memory-budget", "-3GB"], ["'-3GB'"]),
        (["--mode", "rev-repeat"], ["rev-repeat", "batch-aware"]),
    ],
    ids=["budget-too-small", "budget-negative", "repeat-not-batch-aware"],
)
def test_plan_bad_input(plain_run, tmp_path, monkeypatch, options, needles):
    monkeypatch.chdir(tmp_path)
    result = invoke("plan", plain_run.spec, "--workers", 2, *options)
    assert_one_line_error(result, *needles)


@pytest.mark.parametrize("which", ["plain", "mlp"])
def test_plans_advised_budget_is_one_compute_accepts(plain_run, tmp_path, monkeypatch, which):
    """`plan` measures in a warm process, compute on fresh workers: the advice must cover both."""
    spec = plain_run.spec if which == "plain" else f"{REPO / 'examples' / 'mlp.py'}:problem"
    monkeypatch.chdir(tmp_path)
    refused = invoke("plan", spec, "--workers", 2, "--memory-budget", "1KB")
    line = assert_one_line_error(refused, "too small", "at least")
    advised = line.rsplit("at least ", 1)[1].rstrip(".")
    out = tmp_path / "o.zarr"
    compute(spec, out, "--memory-budget", advised, "--no-progress")
    assert_matches(out, spec)


def test_budget_beyond_this_machine_warns(plain_run, tmp_path, monkeypatch):
    import psutil

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    huge = f"{psutil.virtual_memory().total * 2 // 10**9}GB"
    planned = invoke("plan", plain_run.spec, "--workers", 2, "--memory-budget", huge)
    assert planned.exit_code == 0, explain(planned)
    assert "more than this machine's" in planned.stdout and "note" in planned.stdout
    result = invoke("compute", plain_run.spec, "--out", tmp_path / "o.zarr", "--workers", 2, "--memory-budget", huge, "--json")
    assert result.exit_code == 0, explain(result)
    assert result.stderr.startswith("warning: memory budget") and "more than this machine's" in result.stderr
    assert_matches(tmp_path / "o.zarr", plain_run.spec)
    fits = invoke("plan", plain_run.spec, "--workers", 2, "--memory-budget", "64MB")
    assert fits.exit_code == 0 and "more than this machine's" not in fits.stdout + fits.stderr


def test_plan_refuses_a_budget_list_that_does_not_match_workers(plain_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("plan", plain_run.spec, "--workers", 2, "--memory-budget", "1MB,2MB,3MB")
    assert_one_line_error(result, "lists 3 budgets for 2 workers", "one per worker")


def test_plan_missing_spec(tmp_path):
    result = invoke("plan", f"{tmp_path / 'gone.py'}:problem")
    assert_one_line_error(result, "does not exist", "gone.py")


# ---------------------------------------------------------------------- --debug
def test_debug_raises_instead_of_one_line(tmp_path):
    spec = f"{tmp_path / 'missing.py'}:problem"
    result = invoke("compute", spec, "--out", tmp_path / "o.zarr", "--debug")
    assert isinstance(result.exception, raijac.ProblemError)
    assert "error:" not in result.stderr


def test_debug_prints_the_traceback(tmp_path):
    spec = f"{tmp_path / 'missing.py'}:problem"
    proc = subprocess.run(
        [sys.executable, "-m", "raijac", "compute", spec, "--out", str(tmp_path / "o.zarr"), "--debug"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ProblemError" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


# ---------------------------------------------------------------------- the real console script, cold
def _console_script() -> str:
    beside = Path(sys.executable).with_name("raijac")
    found = str(beside) if beside.exists() else shutil.which("raijac")
    if not found:
        pytest.skip("the raijac console script is not installed")
    return found


@pytest.mark.slow
def test_console_script_example_cold(tmp_path):
    """The README's first command (plus --json), into tmp_path: no RAY_ADDRESS, so its own embedded Ray."""
    out = tmp_path / "mlp.zarr"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.run(
        [_console_script(), "compute", "examples/mlp.py:problem", "--out", str(out), "--overwrite", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["complete"] is True
    assert summary["tiles_computed"] == summary["tiles_total"]
    assert_matches(out, str(REPO / "examples" / "mlp.py") + ":problem")


def test_a_ctrl_c_says_what_it_left(existing, tmp_path):
    """Ctrl-C in `compute`: before any store, nothing to resume; in a store with tiles left,
    rerun with --resume; a complete store, nothing to resume (it used to say --resume always)."""
    from raijac.cli import _interrupted

    assert _interrupted(str(tmp_path / "none.zarr")) == "interrupted before any tile was written: nothing to resume."
    assert "holds a complete store; nothing to resume" in _interrupted(str(existing))
    group = zarr.open_group(existing, mode="r+")
    group.attrs["raijac"] = {**dict(group.attrs["raijac"]), "complete": False}
    assert "finished tiles are recorded" in _interrupted(str(existing)) and "--resume" in _interrupted(str(existing))


def test_an_out_path_with_a_double_colon_is_one_line(plain_run, tmp_path):
    """zarr reads '::' as chained URLs: such an --out failed with a bare FileNotFoundError on a
    truncated path; it is refused before any work, and nothing is written."""
    result = invoke("compute", plain_run.spec, "--out", tmp_path / "x::1.zarr", "--workers", 2)
    assert_one_line_error(result, "'::'", "chained URLs", "--out")
    assert os.listdir(tmp_path) == []
