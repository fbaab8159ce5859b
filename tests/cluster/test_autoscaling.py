"""Autoscaled search with the autoscaler's own local simulator (provider `fake_multinode`):
the head has no `sweep_node` resource, so the trials of an ASHA sweep that ask for one make
the autoscaler launch worker nodes; the sweep completes; the idle nodes are removed after
`idle_timeout_minutes`."""

from __future__ import annotations

import json
import threading

import ray
from conftest import wait_for
from ray import tune
from worlds import vqa_config, write_vqa_world

from ray_updown.vqa.sweep import SWEEP_SUMMARY_FILE, run_sweep

WORKER_TYPE = {"ray.worker.sweep": {"resources": {"CPU": 1, "sweep_node": 1},
                                    "node_config": {}, "min_workers": 0, "max_workers": 2}}


def _sweep_nodes() -> dict[str, bool]:
    """{node id: alive} of the live nodes that declare a sweep_node resource."""
    return {n["NodeID"]: n["Alive"] for n in ray.nodes()
            if n["Alive"] and n.get("Resources", {}).get("sweep_node")}


def _alive(node_ids) -> dict[str, bool]:
    """{node id: alive} of these nodes (dead nodes stay listed, without resources)."""
    return {n["NodeID"]: n["Alive"] for n in ray.nodes() if n["NodeID"] in node_ids}


class Outcomes(tune.Callback):
    def __init__(self):
        self.completed: list[str] = []
        self.errored: list[str] = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed.append(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.errored.append(trial.trial_id)


def test_a_sweep_makes_the_autoscaler_add_nodes_that_go_when_idle(autoscaling_cluster, tmp_path):
    autoscaling_cluster(1, WORKER_TYPE, idle_timeout_minutes=0.1)
    assert _sweep_nodes() == {} and "sweep_node" not in ray.cluster_resources()
    seen: dict[str, bool] = {}
    sweeping = threading.Event()

    def watch() -> None:  # every node that was up at some point during the sweep
        while not sweeping.is_set():
            seen.update(_sweep_nodes())
            sweeping.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    cfg = vqa_config(write_vqa_world(str(tmp_path / "vqa")), str(tmp_path / "runs"), "auto",
                     epochs=2)
    outcomes = Outcomes()
    try:
        best = run_sweep(cfg, {"lr": {"loguniform": [0.005, 0.1]}}, num_samples=4,
                         resources_per_trial={"sweep_node": 1}, callbacks=[outcomes])
    finally:
        sweeping.set()
        watcher.join(timeout=5)

    # Nodes launched: the trials could only run on nodes the autoscaler started.
    assert len(seen) >= 1, "the autoscaler launched no node"
    assert len(seen) <= 2  # max_workers of the node type
    # The sweep completed: every trial terminated (ASHA-stopped ones too), none errored.
    assert len(outcomes.completed) == 4 and not outcomes.errored
    summary = json.loads((tmp_path / "runs" / "auto" / SWEEP_SUMMARY_FILE).read_text())
    assert len(summary["trials"]) == 4 and all(t["error"] is None for t in summary["trials"])
    assert 0.005 <= best.lr <= 0.1
    # Nodes gone: idle for 6 s, the autoscaler terminates every one it launched.
    assert any(_alive(seen).values())  # still up right after the sweep
    wait_for(lambda: not any(_alive(seen).values()), 90, "the idle nodes to be removed")
    assert _alive(seen) == dict.fromkeys(seen, False) and _sweep_nodes() == {}
    assert "sweep_node" not in ray.cluster_resources()
