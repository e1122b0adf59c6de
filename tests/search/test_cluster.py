"""A search on a multi-node Ray cluster, simulated on one machine (a head and two worker nodes)."""

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from autosquash.cli import main
from autosquash.track.mlflow_store import default_tracking_uri

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration


def test_search_runs_across_nodes(tmp_path, smoke_plain):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head schedules, workers run
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "run"
        code = main(
            [
                "search",
                smoke_plain,
                "--trials",
                "4",
                "--workers",
                "2",
                "--out",
                str(out),
                "--ray-address",
                cluster.address,
            ]
        )
        assert code == 0
        with (out / "trials.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
        client = MlflowClient(default_tracking_uri(out))
        runs = client.search_runs(
            [client.get_experiment_by_name("smoke").experiment_id], "tags.`autosquash.role` = 'trial'"
        )
        used = {r.data.tags["autosquash.worker"].split("/")[0] for r in runs}
        assert used == {n.node_id[:12] for n in nodes}  # both worker nodes ran trials, the head none
    finally:
        cluster.shutdown()
