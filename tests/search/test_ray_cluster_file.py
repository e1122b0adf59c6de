"""ray_cluster.yaml is a valid Ray cluster launcher config that installs autosquash on every node."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CONFIG = Path(__file__).parents[2] / "ray_cluster.yaml"


def test_cluster_config_passes_rays_schema():
    cfg = yaml.safe_load(CONFIG.read_text())
    validate_config(fillout_defaults(cfg))  # raises on a schema violation
    assert any("scripts/setup.sh" in c for c in cfg["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])  # localhost by default
    assert cfg["available_node_types"]["gpu_worker"]["max_workers"] >= 1


def test_a_misspelt_field_is_caught():
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["max_workerz"] = 3
    with pytest.raises(Exception, match="max_workerz"):
        validate_config(fillout_defaults(cfg))
