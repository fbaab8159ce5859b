"""An ensemble survives a lost node: a head (no member resource) and two worker nodes with
`member_node: 1` each, so each member trains on a worker node. When the first member
checkpoint is registered, the node that member runs on is killed; Tune (max_failures)
restarts the member from that checkpoint on the surviving node, and the manifest ends with
every seed exactly once."""

from __future__ import annotations

import time

import ray
from conftest import FAST_HEALTH_CHECKS
from ray import tune
from worlds import vqa_config, write_vqa_world

from ray_updown.train.run_checkpoint import load_checkpoint_dir
from ray_updown.vqa.ensemble import read_manifest, train_ensemble

_CLUSTERS: list = []  # the test's Cluster; kept off the callback, which Tune may pickle


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1:
        found.add(pid)
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid
    return found


def _node_of(pid: int):
    """The worker node whose raylet started process `pid`."""
    lineage = _ancestors(pid)
    return next(n for n in _CLUSTERS[-1].worker_nodes
                if n.all_processes["raylet"][0].process.pid in lineage)


class LoseAMembersNode(tune.Callback):
    """Kills the node of the first member whose checkpoint Tune registers; logs results."""

    def __init__(self):
        self.removed: dict | None = None
        self.results: list[dict] = []
        self.failures: dict[int, int] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.append({"seed": trial.config["seed"], "epoch": result["epoch"],
                             "resumed_from_epoch": result["resumed_from_epoch"],
                             "failures_before": trial.num_failures})

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.removed is None:
            node = _node_of(trial.last_result["pid"])
            _CLUSTERS[-1].remove_node(node, allow_graceful=False)
            self.removed = {"seed": trial.config["seed"], "node": node.node_id,
                            "epoch": trial.last_result["epoch"]}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.failures[trial.config["seed"]] = trial.num_failures


def _marked_dead(node_id: str, within_s: float = 30.0) -> bool:
    """The GCS marks a killed raylet dead after its health checks fail; the run may end first."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if any(n["NodeID"] == node_id and not n["Alive"] for n in ray.nodes()):
            return True
        time.sleep(0.5)
    return False


def test_a_member_whose_node_is_lost_resumes_from_its_checkpoint(make_cluster, tmp_path):
    member_node = {"num_cpus": 1, "resources": {"member_node": 1}}
    # A worker whose raylet was killed runs on until it notices (Ray checks every second by
    # default): check every 100 ms, and give the member enough epochs that it cannot finish
    # in between, or the loss would go unnoticed.
    _CLUSTERS.append(make_cluster(1, [member_node, member_node], _system_config={
        **FAST_HEALTH_CHECKS, "raylet_death_check_interval_milliseconds": 100}))
    cfg = vqa_config(write_vqa_world(str(tmp_path / "vqa")), str(tmp_path / "runs"), "ens",
                     epochs=16, max_failures=2)
    log = LoseAMembersNode()
    manifest = train_ensemble(cfg, members=2, resources_per_trial={"member_node": 1},
                              callbacks=[log])

    removed = log.removed
    assert removed is not None, "no node was removed"
    assert removed["epoch"] < cfg.epochs  # the member was still training
    assert _marked_dead(removed["node"]), "the removed node is still alive in the GCS"
    # The lost member failed once and went on from its checkpoint, not from epoch 0.
    assert log.failures == {removed["seed"]: 1, 1 - removed["seed"]: 0}
    # (not "after the removal": a result already on its way may arrive after it)
    later = [r for r in log.results if r["seed"] == removed["seed"] and r["failures_before"]]
    resumed = later[0]["resumed_from_epoch"]
    assert removed["epoch"] <= resumed < cfg.epochs
    assert [r["epoch"] for r in later] == list(range(resumed + 1, cfg.epochs + 1))
    assert all(r["resumed_from_epoch"] == resumed for r in later)
    # The other member never failed and trained every epoch once.
    other = [r["epoch"] for r in log.results if r["seed"] != removed["seed"]]
    assert other == list(range(1, cfg.epochs + 1))
    # Every seed exactly once in the manifest, each with a loadable checkpoint of its seed.
    assert [m["seed"] for m in manifest["members"]] == [0, 1]
    assert read_manifest(manifest["uri"])["members"] == manifest["members"]
    for member in manifest["members"]:
        _, config, state = load_checkpoint_dir(member["checkpoint"])
        assert config["train"]["seed"] == member["seed"] and state["epoch"] == member["epoch"]
