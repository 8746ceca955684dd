"""Output to object storage: `--out s3://bucket/run.zarr` against an S3-compatible server
(moto's standalone server) started on loopback by the test, with resume and a bad bucket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
import torch

import raijac
from tests.problems import assert_close

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.slow

SPEC = textwrap.dedent(
    """
    import torch
    import raijac

    def problem():
        torch.manual_seed(0)
        w = torch.randn(7, 5)
        return raijac.Problem(lambda x: torch.sin(x @ w.T), torch.randn(12, 5), batched=True)
    """
)


@pytest.fixture(scope="module")
def s3_env():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("raijac-test")
    yield {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.kill()
    server.wait()


def _cli(args, env, cwd):
    cmd = [sys.executable, "-m", "raijac", "compute", *args, "--workers", "2", "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_s3_output_and_resume(s3_env, tmp_path):
    spec = tmp_path / "s3_spec.py"
    spec.write_text(SPEC)
    out = "s3://raijac-test/run.zarr"
    first = _cli([f"{spec}:problem", "--out", out, "--block-size", "7", "--json"], s3_env, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    problem = raijac.load_problem(f"{spec}:problem")
    want = torch.func.vmap(torch.func.jacrev(lambda xi: problem.f(xi[None])[0]))(problem.x).detach().numpy()
    jac = raijac.open(out)
    assert_close(jac.numpy(), want)
    total = json.loads(first.stdout.strip().splitlines()[-1])["tiles_total"]

    import zarr

    group = zarr.open_group(out, mode="r+")
    group["tiles"][2:5] = 0  # as if the run had died before these tiles were recorded
    meta = dict(group.attrs["raijac"]) | {"complete": False}
    group.attrs["raijac"] = meta
    again = _cli([f"{spec}:problem", "--out", out, "--block-size", "7", "--resume", "--json"], s3_env, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["tiles_computed"] == 3 and summary["tiles_skipped"] == total - 3
    assert_close(raijac.open(out).numpy(), want)

    inspect = subprocess.run(
        [sys.executable, "-m", "raijac", "inspect", out, "--json"], env=s3_env, capture_output=True, text=True
    )
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["complete"] is True


def test_missing_bucket_fails_before_any_compute(s3_env, tmp_path):
    spec = tmp_path / "s3_spec.py"
    spec.write_text(SPEC)
    result = _cli([f"{spec}:problem", "--out", "s3://no-such-bucket-here/run.zarr"], s3_env, tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write s3://no-such-bucket-here/run.zarr")
