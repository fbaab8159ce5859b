"""Multi-node clusters on this machine, one per test, all with token authentication (run this folder in its own pytest
process, after the main suite: `make cluster-tests`).

Every test starts its own `ray.cluster_utils.Cluster` (separate raylets, all bound to
127.0.0.1) and stops it at its end; nothing here uses the main suite's session cluster.
`autoscaling_cluster` starts the autoscaler's local simulator (provider `fake_multinode`)
through the same `Cluster` head with an autoscaling config written by the test, instead of
`AutoscalingCluster.start()`, which runs `ray stop --force` and so would end every Ray
process on the machine. Processes of a test's cluster that outlive its shutdown (nodes the
simulator launched) are found by the cluster's session directory and ended by pid.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Loopback addresses for every process of these clusters, including the nodes that the
# autoscaler's monitor process starts (on Linux Ray would pick the machine's address).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Token authentication on every cluster here (Ray 2.61 turns it on for every cluster): every
# node and driver of this process's clusters shares this session's own token, never the one
# in ~/.ray. Nothing in these tests depends on auth being off.
# Drivers that the tests start import this file again: they keep the session's token.
os.environ.setdefault("RAY_UPDOWN_TEST_AUTH_TOKEN", uuid.uuid4().hex)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = os.environ["RAY_UPDOWN_TEST_AUTH_TOKEN"]

import pytest  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # worlds.py

# Node deaths noticed within ~2 s instead of Ray's default ~30 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_failure_threshold": 4}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread each."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of_session(session_dir: str) -> list[int]:
    """Processes whose command line names this cluster's session directory."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if session_dir.encode() in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _stop(cluster) -> None:
    import ray

    session_dir = cluster.head_node.get_session_dir_path() if cluster.head_node else None
    ray.shutdown()
    cluster.shutdown()
    if session_dir:
        for pid in _pids_of_session(session_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_cluster(head_cpus: float, workers: list[dict] = (), **head_args):
    """A head (no custom resources) plus worker nodes (`add_node` kwargs), connected."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False,
        "_system_config": FAST_HEALTH_CHECKS, **head_args})
    try:
        for node in workers:
            cluster.add_node(node_ip_address="127.0.0.1", **node)
        ray.init(address=cluster.address, log_to_driver=False)
    except BaseException:
        _stop(cluster)
        raise
    return cluster


@pytest.fixture()
def make_cluster(monkeypatch):
    """make_cluster(head_cpus, workers=[{"num_cpus": 1, "resources": {...}}, ...])."""
    import ray._private.ray_constants

    # The driver's copy of the switch (read at import) must agree with the env var above.
    monkeypatch.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    started = []

    def make(head_cpus: float, workers: list[dict] = (), **head_args):
        started.append(start_cluster(head_cpus, workers, **head_args))
        return started[-1]

    yield make
    for cluster in started:
        _stop(cluster)


def autoscaling_config(port: int, head_cpus: int, worker_types: dict,
                       idle_timeout_minutes: float) -> dict:
    """A `fake_multinode` cluster config: what example.yaml (missing from the wheel) holds."""
    return {
        "cluster_name": "fake_multinode", "max_workers": 8,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                 "max_workers": 0},
            **worker_types},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


@pytest.fixture()
def autoscaling_cluster(make_cluster, monkeypatch, tmp_path):
    """autoscaling_cluster(head_cpus, worker_types, idle_timeout_minutes): a head whose
    monitor runs the autoscaler with the fake_multinode provider (nodes are raylets on this
    machine), checking every second."""
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")

    def make(head_cpus: int, worker_types: dict, idle_timeout_minutes: float):
        port = free_port()
        path = tmp_path / "autoscaling.yaml"
        path.write_text(yaml.safe_dump(autoscaling_config(port, head_cpus, worker_types,
                                                          idle_timeout_minutes)))
        return make_cluster(head_cpus, gcs_server_port=port, autoscaling_config=str(path))

    return make


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll until `predicate()` is truthy; its value, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
