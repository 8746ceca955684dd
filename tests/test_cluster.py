"""A real two-node Ray cluster on loopback (`ray start --head` + `ray start --address`),
with token authentication on, and `raijac compute --address` against it from a spec file
that is shipped to the workers. Only the processes this test started are stopped."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest
import torch

import raijac
from tests.problems import assert_close

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SPEC = textwrap.dedent(
    """
    import torch
    import raijac

    def problem():
        torch.manual_seed(0)
        w = torch.randn(6, 4)
        return raijac.Problem(lambda x: torch.tanh(x @ w.T) * 2, torch.randn(20, 4), batched=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def _stop(temp_dir: str) -> None:
    """Kill the Ray processes of this cluster only: those naming its temp dir, and their children."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                mine.append(proc)
                mine.extend(proc.children(recursive=True))
        except psutil.Error:
            pass
    for proc in mine:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(mine, timeout=10)


def _start_cluster(dashboard_port: int | None = None):
    """Start the two nodes; on a loaded machine a raylet may miss Ray's fixed 30 s start-up
    window ("timed out during startup"), so a failed start is torn down and tried once more."""
    for attempt in range(2):
        temp_dir = tempfile.mkdtemp(prefix="rjc", dir="/tmp")  # short: AF_UNIX paths are limited
        try:
            address, env = _launch(temp_dir, dashboard_port)
            break
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            _stop(temp_dir)
            if attempt:
                raise RuntimeError(f"ray start failed twice; last: {exc}; stderr: {exc.stderr!r}") from exc
    try:
        yield address, env
    finally:
        _stop(temp_dir)


def _launch(temp_dir: str, dashboard_port: int | None) -> tuple[str, dict[str, str]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]

    def own_ports() -> list[str]:
        """Every node its own agent ports: a Ray already running here (the session fixture's)
        holds the defaults, and a head without its dashboard agent cannot take jobs."""
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
        return [f"--{name}={_free_port()}" for name in names]

    dashboard = ["--include-dashboard=false"]
    if dashboard_port:  # the job server lives in the dashboard: bound to loopback only
        dashboard = ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    subprocess.run(
        [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", *dashboard,
         '--resources={"head_node": 1}', *common, *own_ports()],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    subprocess.run(
        [_ray_bin(), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
         '--resources={"second_node": 1}', *common, *own_ports()],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return f"127.0.0.1:{port}", env


def _plain(text: str) -> str:
    """Ray's CLI output without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _submit(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the job server answers before its agent is up."""
    for _ in range(30):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(2)
    return result


@pytest.fixture
def two_node_cluster():
    yield from _start_cluster()


@pytest.fixture
def two_node_cluster_with_jobs():
    port = _free_port()
    for _address, env in _start_cluster(dashboard_port=port):
        yield f"http://127.0.0.1:{port}", env


def test_job_on_two_nodes_uses_both_and_is_right(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    spec = tmp_path / "cluster_spec.py"
    spec.write_text(SPEC)
    out = str(tmp_path / "cluster.zarr")
    cmd = [sys.executable, "-m", "raijac", "compute", f"{spec}:problem", "--out", out, "--address", address,
           "--block-size", "6", "--json", "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["workers"] == 2 and len(summary["nodes"]) == 2, summary
    assert all(n > 0 for n in summary["tiles_by_worker"].values())
    problem = raijac.load_problem(f"{spec}:problem")
    want = torch.func.vmap(torch.func.jacrev(lambda xi: problem.f(xi[None])[0]))(problem.x).detach().numpy()
    assert_close(raijac.open(out).numpy(), want)


@pytest.mark.parametrize("client", ["wrong token", "no token"])
def test_token_refusal_fails_fast_quietly_and_says_where_the_token_is(two_node_cluster, tmp_path, client):
    """One line, no pages of Ray's retry warnings: the client's token is refused, or it has
    none (RAY_AUTH_MODE unset, no ~/.ray/auth_token), and the message says where the token is."""
    address, env = two_node_cluster
    spec = tmp_path / "cluster_spec.py"
    spec.write_text(SPEC)
    if client == "wrong token":
        env = env | {"RAY_AUTH_TOKEN": "0" * 32}
    else:
        env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "raijac", "compute", f"{spec}:problem", "--out", str(tmp_path / "x.zarr"), "--address", address]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error:") and "RAY_AUTH_TOKEN" in lines[0] and "ray get-auth-token" in lines[0]
    assert ("refused this client's authentication token" if client == "wrong token" else "sent none") in lines[0]
    assert not (tmp_path / "x.zarr").exists()


def test_ray_job_submit_runs_raijac_compute(two_node_cluster_with_jobs, tmp_path):
    """`ray job submit -- raijac compute ...`: the job's driver joins the cluster via RAY_ADDRESS."""
    jobs, env = two_node_cluster_with_jobs
    work = tmp_path / "job"
    work.mkdir()
    (work / "cluster_spec.py").write_text(SPEC)
    attempts = 0
    while True:  # a fresh store per attempt: a retry must not meet an earlier attempt's store
        attempts += 1
        out = str(tmp_path / f"job{attempts}.zarr")
        cmd = [_ray_bin(), "job", "submit", "--address", jobs, "--working-dir", str(work), "--",
               "raijac", "compute", "cluster_spec.py:problem", "--out", out, "--block-size", "6", "--json", "--no-progress"]  # fmt: skip
        result = _submit(cmd, env)
        log = _plain(result.stdout + result.stderr)
        refused = any(line.startswith("error:") for line in log.splitlines())
        # Retried (at most twice) only when Ray failed around the job (runtime env, supervisor,
        # agent), never when raijac itself failed.
        if result.returncode == 0 or refused or attempts == 3:
            break
    if result.returncode != 0:
        pytest.fail(f"the job failed ({attempts} attempts); its output:\n{log[-6000:]}", pytrace=False)
    summary = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    assert summary["complete"] and summary["workers"] == 2 and len(summary["nodes"]) == 2
    problem = raijac.load_problem(f"{work / 'cluster_spec.py'}:problem")
    want = torch.func.vmap(torch.func.jacrev(lambda xi: problem.f(xi[None])[0]))(problem.x).detach().numpy()
    assert_close(raijac.open(out).numpy(), want)
