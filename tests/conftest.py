"""Shared fixtures: one real local Ray for the whole session, temp stores, markers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, no dashboard) shared by every test that runs workers.

    `address="local"` always starts a fresh cluster, never joining one already running.
    raijac.compute sees Ray initialised and uses it, leaving it running between tests.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture
def store_path(tmp_path):
    """A fresh path for a Zarr store (not created)."""
    return str(tmp_path / "out.zarr")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
