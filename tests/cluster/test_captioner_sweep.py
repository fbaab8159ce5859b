"""A captioner sweep whose trials are Ray Train runs of two DDP workers each (Train V2 inside
Tune), two trials at once, on a cluster of its own: 6 logical CPUs = 2 trials x (1 for the
trial's driver + 2 workers x 1)."""

from __future__ import annotations

import glob
import json
import os

from ray import tune
from worlds import build_toy_world, toy_config

from ray_updown.captioning.config import CaptionTrainConfig
from ray_updown.captioning.predict import load_captioner
from ray_updown.captioning.sweep import BEST_CONFIG_FILE, SWEEP_SUMMARY_FILE, run_captioner_sweep
from ray_updown.config import load_config


class TrialLog(tune.Callback):
    """The order trials started and completed in, and what each reported."""

    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.results: dict[str, list[dict]] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.events.append(("start", trial.trial_id))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results.setdefault(trial.trial_id, []).append(dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.events.append(("complete", trial.trial_id))


def test_each_trial_of_a_captioner_sweep_is_a_two_worker_train_run(make_cluster, tmp_path):
    make_cluster(6)
    karpathy, store = build_toy_world(str(tmp_path / "toy"))
    cfg = toy_config(karpathy, store, tmp_path, name="capsweep", epochs=2, num_workers=1)
    log = TrialLog()
    best = run_captioner_sweep(cfg, {"optim.lr": {"grid": [0.02, 0.002]}}, num_samples=1,
                               max_concurrent=2, workers_per_trial=2, callbacks=[log])

    root = tmp_path / "runs" / "capsweep"
    summary = json.loads((root / SWEEP_SUMMARY_FILE).read_text())
    assert summary["workers_per_trial"] == 2 and len(summary["trials"]) == 2
    assert all(t["error"] is None and 1 <= t["epochs"] <= 2 for t in summary["trials"])
    # Both trials ran at once: each started before either completed.
    assert [kind for kind, _ in log.events] == ["start", "start", "complete", "complete"]
    # Every epoch of every trial was reported by a DDP group of two workers.
    assert len(log.results) == 2
    for results in log.results.values():
        assert [r["epoch"] for r in results] == list(range(1, len(results) + 1))
        assert all(r["workers_reporting"] == 2 for r in results)
        assert all(r["checkpoint_path"].startswith(str(root / "sweep-runs")) for r in results)
    # The best config file is the returned config: the better lr, two workers per run.
    assert load_config(CaptionTrainConfig, str(root / BEST_CONFIG_FILE)) == best
    assert best.optim.lr in (0.02, 0.002) and best.num_workers == 2 and best.name == "capsweep"
    top = summary["trials"][0]
    assert top["config"] == {"optim.lr": best.optim.lr}
    assert top["val_cider_d"] == max(t["val_cider_d"] for t in summary["trials"])
    # Each trial's Train run kept its checkpoints under <name>/sweep-runs/<trial id>/.
    runs = sorted(os.path.basename(p) for p in glob.glob(str(root / "sweep-runs" / "*")))
    assert runs == sorted(log.results)
    assert top["checkpoint"].startswith(str(root / "sweep-runs"))
    loaded = load_captioner(top["checkpoint"])
    assert loaded.config["train"]["optim"]["lr"] == best.optim.lr
