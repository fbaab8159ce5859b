"""A node removed mid-run, on a real multi-node Ray cluster on this machine: a head and two
worker nodes as separate raylets (`ray.cluster_utils.Cluster`, bound to 127.0.0.1), with a
custom resource that places the detector actor on the worker nodes. The node that hosts the
actor is killed after the first shard is written; the run completes on the other node. The
same for a VQA training run (Ray Train, FailureConfig(max_failures)): the node of its worker
is killed after its second checkpoint; the run completes on the other node."""

from __future__ import annotations

import functools
import glob
import os
import threading
import time

import pytest
from faultkit import assert_accounted, make_detector, vqa_config, write_images, write_vqa_world

from ray_updown.detector import save_detector
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

# Node deaths noticed within ~2 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 4}


@pytest.fixture()
def cluster(flaky_s3, monkeypatch, request):
    """Head (2 CPUs, or `head_cpus` by indirect parametrization; no detector resource) + two
    worker nodes (1 CPU, detector: 1 each)."""
    import ray
    import ray._private.ray_constants
    from ray.cluster_utils import Cluster

    ray.shutdown()  # one Ray per process: never the module clusters of other files
    # ray.init turns a 127.0.0.1 address into the machine's address on Linux, where nothing
    # of this cluster listens; this switch keeps the driver on the loopback address too.
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": getattr(request, "param", 2), "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"detector": 1}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _remove_actor_node(cluster, node_file, first_part, removed: list) -> None:
    """Once the first shard is written, kill the worker node the detector actor runs on."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(first_part) and os.path.exists(node_file)):
        time.sleep(0.05)
    with open(node_file) as f:
        node_id = f.read().split()[0]
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)
    removed.append(node_id)


def test_a_node_removed_mid_extraction_loses_and_duplicates_nothing(cluster, tmp_path, detector):
    write_images(str(tmp_path / "imgs"), 10)
    save_detector(detector, str(tmp_path / "ckpt"))
    out, node_file = tmp_path / "store", str(tmp_path / "actor-nodes")
    cfg = ExtractConfig(images=str(tmp_path / "imgs"), out=str(out), rows_per_shard=2,
                        batch_size=2, actor_resources={"detector": 1},
                        max_restarts=3, max_task_retries=3)
    removed: list[str] = []
    killer = threading.Thread(target=_remove_actor_node, daemon=True, args=(
        cluster, node_file, str(out / "features" / "part-00000.parquet"), removed))
    killer.start()
    factory = functools.partial(make_detector, str(tmp_path / "ckpt"), delay=0.5,
                                node_file=node_file)
    summary = run_extraction(cfg, model_factory=factory)
    killer.join(timeout=5)
    assert removed, "the actor's node was not removed"
    nodes = open(node_file).read().split()
    assert nodes[0] == removed[0] and nodes[-1] != removed[0]  # restarted on the other node
    assert (summary["inputs"], summary["features"], summary["errors"]) == (10, 10, 0)
    assert_accounted(str(out), 10)


def _busy_worker_node(cluster) -> object:
    """The worker node whose CPU is taken (by the training worker)."""
    import ray._private.state

    free = ray._private.state.available_resources_per_node()
    return next(n for n in cluster.worker_nodes if free.get(n.node_id, {}).get("CPU", 0) < 1)


@pytest.mark.parametrize("cluster", [0], indirect=True)  # no CPU on the head: workers on nodes
def test_a_node_removed_mid_training_resumes_from_the_last_checkpoint(cluster, tmp_path):
    from ray_updown.vqa.train import train_vqa

    data = write_vqa_world(str(tmp_path / "vqa"))
    runs = str(tmp_path / "runs")
    removed: list[str] = []

    def remove_on_second_checkpoint() -> None:
        # The second: a checkpoint's files appear before Ray Train has registered it.
        pattern = os.path.join(runs, "n", "checkpoint_*", "model.safetensors")
        seen: set[str] = set()  # the run keeps one or two checkpoints: count them as they come
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(seen) < 2:
            seen.update(glob.glob(pattern))
            time.sleep(0.02)
        node = _busy_worker_node(cluster)
        cluster.remove_node(node, allow_graceful=False)
        removed.append(node.node_id)

    killer = threading.Thread(target=remove_on_second_checkpoint, daemon=True)
    killer.start()
    out = train_vqa(vqa_config(data, runs, "n", epochs=12, max_failures=2))
    killer.join(timeout=5)
    assert removed, "no node was removed"
    assert out["metrics"]["epoch"] == 12  # completed despite losing its worker's node
    # The node died after the second checkpoint's files began to appear, so the first is
    # complete on disk, registered or not: the restarted worker group resumes from a
    # checkpoint, never from scratch (Ray alone sometimes handed it none: session.restore).
    assert out["metrics"]["resumed_from_epoch"] >= 1
