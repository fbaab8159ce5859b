"""VQA ensembles: N members with different seeds as Ray Tune trials, averaged sigmoid scores.

The paper's test-std entry averages 30 models (supp. 6.3). `train_ensemble` runs the members
as trials of one Tune experiment sharing the cluster (each trial asks for `cpus_per_trial`
CPUs and optionally a fraction of a GPU; Tune runs as many at once as the resources, or
`max_concurrent_trials`, allow; custom `resources_per_trial` place members on chosen node
types), then writes the manifest `<storage_path>/<name>/ensemble.json`:

    {"kind": "vqa_ensemble", "config": {...VqaTrainConfig...},
     "members": [{"seed": 0, "checkpoint": "s3://.../checkpoint_000004", "val_accuracy": 0.61,
                  "epoch": 5, "experiment": "members-000", "trial": "vqa_trainable_..."}, ...]}

Resuming: members already in the manifest are never trained again. An experiment that was
interrupted (driver killed, node lost) is continued with `Tuner.restore` - its finished trials
stay finished, unfinished ones continue from their last checkpoint - before a new experiment
trains whatever members are still missing (e.g. when more members are asked for).
A member whose node is lost mid-training is a failed trial: with `max_failures` > 0 in the
config, Tune restarts it (on any node with room) from its last reported checkpoint.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ray_updown import storage
from ray_updown.config import load_config
from ray_updown.data.vqa import VqaQuestion, load_vqa
from ray_updown.devices import pick_device
from ray_updown.errors import CheckpointError, ConfigError, DataError
from ray_updown.features.reader import FeatureStore
from ray_updown.metrics.vqa_eval import write_vqa_results
from ray_updown.train.run_checkpoint import load_checkpoint_dir
from ray_updown.train.search import restore_tuner
from ray_updown.train.trainer import checkpoint_uri, raise_unwrapped
from ray_updown.train.worker import shard_batches
from ray_updown.vqa.config import METRIC, VqaTrainConfig
from ray_updown.vqa.data import VqaVocabularies, questions_dataset
from ray_updown.vqa.model import VqaConfig, VqaModel, ensemble_scores
from ray_updown.vqa.sweep import vqa_trial
from ray_updown.vqa.train import best_intact_checkpoint, check_inputs, tune_run_config
from ray_updown.weights import load_state_strict

log = logging.getLogger(__name__)

MANIFEST_FILE = "ensemble.json"
PLAN_FILE = "ensemble_plan.json"      # the experiment in progress and the seeds it trains
SERVER_SUBSETS = ("test-dev2015", "test2015", "val2014", "train2014")  # test2015 = test-std


def ensemble_root(cfg: VqaTrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name)


def read_manifest(uri: str) -> dict:
    manifest = storage.read_json(uri)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), list):
        raise DataError("not an ensemble manifest (needs a 'members' list)", file=uri)
    for i, m in enumerate(manifest["members"]):
        if not isinstance(m, dict) or not isinstance(m.get("checkpoint"), str):
            raise DataError("member needs a 'checkpoint' URI", file=uri, record=f"members[{i}]")
    return manifest


def resume_interrupted_members(plan: dict | None, root: str, trainable, cfg: VqaTrainConfig,
                               manifest: dict, manifest_uri: str) -> list[BaseException]:
    """Continue the planned experiment when some of its members are not in the manifest yet
    (an interrupted run); adds the finished ones to the manifest and returns the failures."""
    if not plan or not set(plan.get("seeds", [])) - _done_seeds(manifest):
        return []
    tuner = restore_tuner(root, plan["experiment"], trainable, logger=log,
                          message="resuming the interrupted ensemble experiment %s")
    if tuner is None:
        return []
    failures = _collect(tuner.fit(), plan["experiment"], cfg, manifest)
    storage.write_json(manifest_uri, manifest, indent=2)
    return failures


def train_missing_members(todo: list[int], plan: dict | None, root: str, trainable,
                          cfg: VqaTrainConfig, manifest: dict, manifest_uri: str,
                          max_concurrent_trials: int,
                          callbacks: Iterable[Any] | None) -> list[BaseException]:
    """A new experiment (the next `members-NNN`, saved as the plan first) training the seeds
    in `todo`; adds the finished members to the manifest and returns the failures."""
    from ray import tune

    number = int(plan.get("number", -1)) + 1 if plan else 0
    experiment = f"members-{number:03d}"
    storage.write_json(storage.join(root, PLAN_FILE),
                       {"experiment": experiment, "number": number, "seeds": todo})
    param_space = {**cfg.to_dict(), "seed": tune.grid_search(todo)}
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=1,
                                    max_concurrent_trials=max_concurrent_trials or None),
        run_config=tune_run_config(cfg, root, experiment, callbacks))
    failures = _collect(tuner.fit(), experiment, cfg, manifest)
    storage.write_json(manifest_uri, manifest, indent=2)
    return failures


def train_ensemble(cfg: VqaTrainConfig | str, members: int = 30, *,
                   overrides: Sequence[str] = (), cpus_per_trial: float = 1.0,
                   gpus_per_trial: float | None = None,
                   resources_per_trial: Mapping[str, float] | None = None,
                   max_concurrent_trials: int = 0, callbacks: Iterable[Any] | None = None) -> dict:
    """Train (or finish training) an ensemble of `members` models, seeds cfg.seed + 0..N-1.

    `cfg` is a config or a YAML file (e.g. a sweep's best_config.yaml) with `overrides`.
    `gpus_per_trial` defaults to 1 when cfg.use_gpu, else 0 (fractions such as 0.25 share a
    GPU: 8 GPUs at 0.25 run 32 members at once); `resources_per_trial` adds custom resources
    ({"member_node": 1}). Returns the manifest (with its "uri"). A member whose trial fails is
    not in the manifest; the first failure is re-raised after the manifest of the others is
    written.
    """

    from ray_updown.ray_cluster import ensure_ray

    if isinstance(cfg, str):
        cfg = load_config(VqaTrainConfig, cfg, overrides)
    elif overrides:
        raise ConfigError("overrides apply to a config file; edit the VqaTrainConfig instead")
    if members < 1:
        raise ConfigError(f"must be >= 1, got {members}", record="members")
    cfg = check_inputs(cfg)  # before Ray starts: bad data is one line, not N failed trials
    if cfg.num_workers > 1:
        log.warning("ensemble members train on one worker each; num_workers=%d is ignored",
                    cfg.num_workers)
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if cfg.use_gpu else 0.0)
    trainable = vqa_trial(cpus_per_trial, gpus, resources_per_trial)
    ensure_ray()
    root = ensemble_root(cfg)
    manifest_uri = storage.join(root, MANIFEST_FILE)
    manifest = read_manifest(manifest_uri) if storage.exists(manifest_uri) else \
        {"kind": "vqa_ensemble", "config": cfg.to_dict(), "members": []}
    plan_uri = storage.join(root, PLAN_FILE)
    plan = storage.read_json(plan_uri) if storage.exists(plan_uri) else None
    failures = resume_interrupted_members(plan, root, trainable, cfg, manifest, manifest_uri)
    todo = [cfg.seed + i for i in range(members) if cfg.seed + i not in _done_seeds(manifest)]
    if todo and not failures:
        failures = train_missing_members(todo, plan, root, trainable, cfg, manifest, manifest_uri,
                                         max_concurrent_trials, callbacks)
    if failures:
        log.error("%d ensemble member(s) failed; re-run to retry them", len(failures))
        raise_unwrapped(failures[0])
    return {**manifest, "uri": manifest_uri}


def _done_seeds(manifest: dict) -> set[int]:
    return {int(m["seed"]) for m in manifest["members"]}


def _collect(grid, experiment: str, cfg: VqaTrainConfig, manifest: dict) -> list[BaseException]:
    """Add each finished trial's best checkpoint (by val accuracy) to the manifest."""
    failures = []
    done = _done_seeds(manifest)
    for result in grid:
        if result.error is not None:
            failures.append(result.error)
            continue
        seed = int(result.config["seed"])
        best = best_intact_checkpoint(result.best_checkpoints, cfg.storage_path)
        if best is None:
            failures.append(CheckpointError(f"member with seed {seed} left no intact checkpoint",
                                            file=result.path))
            continue
        checkpoint, metrics = best
        if seed in done:
            continue
        manifest["members"].append({
            "seed": seed, "checkpoint": checkpoint_uri(checkpoint, cfg.storage_path),
            "val_accuracy": metrics.get(METRIC), "epoch": metrics.get("epoch"),
            "experiment": experiment, "trial": result.path.rstrip("/").rsplit("/", 1)[-1]})
        done.add(seed)
    manifest["members"].sort(key=lambda m: m["seed"])
    return failures


@dataclass
class TrainedVqa:
    """A trained model with what it needs to read questions and features."""

    model: VqaModel
    vocabs: VqaVocabularies
    train_config: VqaTrainConfig
    uri: str


def load_vqa_checkpoint(uri: str, device: torch.device | str | None = None) -> TrainedVqa:
    """Load one of our VQA checkpoint directories (local or object store)."""
    weights, config, _ = load_checkpoint_dir(uri)
    for key in ("model", "train", "question_vocab", "answer_vocab"):
        if key not in config:
            raise CheckpointError(f"not a VQA checkpoint: config.json lacks '{key}'", file=uri)
    model = VqaModel(VqaConfig.from_dict(config["model"]))
    load_state_strict(model, weights, uri)
    model.to(device or pick_device()).eval()
    return TrainedVqa(model, VqaVocabularies.from_json(config, uri),
                      VqaTrainConfig.from_dict(config["train"], uri), uri)


def member_checkpoints(manifest_or_checkpoints: str | dict | Sequence[str]) -> list[str]:
    """Checkpoint URIs from a manifest URI, a manifest dict or a list of checkpoint URIs."""
    source = manifest_or_checkpoints
    if isinstance(source, str):
        source = read_manifest(source)
    if isinstance(source, dict):
        source = [m["checkpoint"] for m in source["members"]]
    uris = list(source)
    if not uris:
        raise ConfigError("an ensemble needs at least one member checkpoint", record="ensemble")
    return uris


def score_questions(manifest_or_checkpoints, questions: str | Sequence[VqaQuestion],
                    store: str | FeatureStore, batch_size: int = 256
                    ) -> tuple[np.ndarray, torch.Tensor, list[str]]:
    """(question ids [N], averaged member scores [N, A], answer strings [A]).

    Members must share the vocabularies (they do when trained on the same data).
    """
    members = [load_vqa_checkpoint(u) for u in member_checkpoints(manifest_or_checkpoints)]
    first = members[0]
    for m in members[1:]:
        if m.vocabs.to_json() != first.vocabs.to_json():
            raise CheckpointError(f"vocabularies differ from those of {first.uri}", file=m.uri)
        if m.model.config.region_dim != first.model.config.region_dim:
            raise CheckpointError(f"region size differs from that of {first.uri}", file=m.uri)
    questions_uri = questions if isinstance(questions, str) else "<questions>"
    if isinstance(questions, str):
        questions = load_vqa(questions)
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    data_cfg = first.train_config.data
    dataset = questions_dataset(questions, first.vocabs, store, first.model.config.question_len,
                                data_cfg.max_boxes, data_cfg.spatial, questions_uri)
    scores = []
    for idx in shard_batches(len(dataset), batch_size, 0, 1):
        scores.append(ensemble_scores([m.model for m in members], dataset.__getitems__(idx)).cpu())
    all_scores = torch.cat(scores) if scores else torch.zeros(0, len(first.vocabs.answers))
    return dataset.encoded.question_ids, all_scores, list(first.vocabs.answers.itos)


def predict_ensemble(manifest_or_checkpoints, questions: str | Sequence[VqaQuestion],
                     store: str | FeatureStore, batch_size: int = 256) -> dict[int, str]:
    """{question_id: answer}: the top answer of the members' mean sigmoid scores (eq. 17).

    One checkpoint is a single-model prediction.
    """
    ids, scores, answers = score_questions(manifest_or_checkpoints, questions, store, batch_size)
    best = scores.argmax(1).tolist() if len(ids) else []
    return {int(q): answers[a] for q, a in zip(ids, best)}


def server_results_name(subset: str, name: str) -> str:
    """The evaluation server's file name, e.g. vqa_OpenEnded_mscoco_test-dev2015_updown_results.json."""
    if subset not in SERVER_SUBSETS:
        raise ConfigError(f"subset must be one of {list(SERVER_SUBSETS)} (test2015 = test-std), "
                          f"got {subset!r}", record="subset")
    if not re.fullmatch(r"[A-Za-z0-9-]+", name):
        raise ConfigError(f"the method name may use letters, digits and '-', got {name!r}",
                          record="name")
    return f"vqa_OpenEnded_mscoco_{subset}_{name}_results.json"


def write_server_results(predictions: dict[int, str], out_dir: str, name: str,
                         subset: str = "test-dev2015") -> str:
    """Write [{"question_id", "answer"}] under the server's file name; returns its URI."""
    uri = storage.join(out_dir, server_results_name(subset, name))
    write_vqa_results(uri, sorted(predictions.items()))
    return uri
