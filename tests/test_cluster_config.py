"""cluster.yaml is a valid Ray cluster-launcher config, checked with the schema inside `ray`."""

from __future__ import annotations

import copy
import pathlib

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import validate_config

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "cluster.yaml"


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CONFIG.read_text())


def test_cluster_yaml_passes_rays_schema(config):
    validate_config(copy.deepcopy(config))


def test_cluster_yaml_has_gpu_workers_a_cpu_head_and_installs_raijac(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    gpu = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu and head["resources"].get("GPU", 0) == 0
    setup = " ".join(config["setup_commands"])
    assert "raijac" in setup and "s3fs" in setup and "torch" in setup
    assert "py311-gpu" in config["docker"]["image"]
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


def test_the_schema_check_can_fail(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["no_such_key"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
