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


def test_trials_land_on_gpu_nodes_and_each_worker_resolves_its_own_device(tmp_path, smoke_plain, monkeypatch):
    """A CPU-only head that could run trials (as ray_cluster.yaml's does) and two nodes that declare a GPU to Ray.
    The driver, on the head, has no CUDA and resolves no worker's device: an `auto` search asks Ray for GPUs
    because the cluster has some, so its trials land on the GPU nodes, not on the head Ray prefers for tasks
    that ask for none, each worker resolving `auto` and sizing itself on its own node. Ray's
    GPUs here are declared, not real (torch sees none on those nodes, so their trials compute on the CPU); a
    fake CUDA, installed inside single-use task workers only, shows what a `cuda` experiment's workers resolve
    on nodes that have one, while the driver's preflight takes its own CPU instead of refusing."""
    import os
    from types import SimpleNamespace

    import ray
    import torch

    from autosquash.search.experiment import HardwareSpec, load_experiment
    from autosquash.search.study import SearchOptions, _preflight, _resources
    from autosquash.search.trial import TrialContext, for_this_node, workers_on_node

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the driver: no GPU, whatever this machine has
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_nodes = {cluster.add_node(num_cpus=1, num_gpus=1).node_id for _ in range(2)}
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "run"
        args = ["search", smoke_plain, "--trials", "2", "--workers", "2", "--out", str(out)]
        assert main([*args, "--ray-address", cluster.address]) == 0
        client = MlflowClient(default_tracking_uri(out))
        runs = client.search_runs(
            [client.get_experiment_by_name("smoke").experiment_id], "tags.`autosquash.role` = 'trial'"
        )
        assert len(runs) == 2
        used = {r.data.tags["autosquash.worker"].split("/")[0] for r in runs}
        assert used <= {n[:12] for n in gpu_nodes} and cluster.head_node.node_id[:12] not in used
        # Resolved by each worker on its node (no CUDA there), with that node's CPUs: one trial at a time.
        assert {r.data.tags["autosquash.device"] for r in runs} == {"cpu"}
        assert {r.data.metrics["torch_threads"] for r in runs} == {float(os.cpu_count())}

        exp = load_experiment(smoke_plain).model_copy(update={"hardware": HardwareSpec(device="cuda")})
        opts = SearchOptions(out_dir=tmp_path / "cuda", trials=2, workers=2, ray_address=cluster.address)
        assert _preflight(exp, opts)[0] == torch.device("cpu")  # not refused: the GPUs are the workers' to have
        ray.init(address=cluster.address)
        resources = _resources(exp, ray.cluster_resources().get("GPU", 0.0))
        assert resources == {"num_cpus": 1, "num_gpus": 1.0}
        # What sizing a worker reads: the experiment's hardware, the search's workers and the base model.
        ctx = TrialContext(torch.nn.Linear(8, 8), *[None] * 6, 0, 1, hardware=exp.hardware, workers=2)

        @ray.remote(**resources, max_calls=1)  # max_calls: the worker process, and its fake, end with the task
        def resolve_on_node(ctx):
            torch.cuda.is_available = lambda: True  # the fake: torch sees one 24 GiB GPU, in this process only
            torch.cuda.get_device_properties = lambda device: SimpleNamespace(total_memory=24 << 30)
            sized = for_this_node(ctx, workers_on_node(ctx.workers))
            node = ray.get_runtime_context().get_node_id()
            return node, sized.compute_device, sized.memory_share_bytes, sized.threads_per_worker

        for node, device, share, threads in ray.get([resolve_on_node.remote(ctx) for _ in range(2)]):
            assert node in gpu_nodes
            assert (device, share, threads) == ("cuda", 24 << 30, os.cpu_count())
    finally:
        ray.shutdown()
        cluster.shutdown()
