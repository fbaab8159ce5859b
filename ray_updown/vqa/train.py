"""Training the Up-Down VQA model (paper 3.3, supp. 6.3).

`run_vqa_loop(config, session)` is the whole loop; three launchers give it a session
(train/session.py):

* `train_vqa(cfg)`: a Ray Train `TorchTrainer` with `cfg.num_workers` DDP workers; resume =
  re-run with the same `storage_path` and `name`;
* `vqa_trainable(config_dict)`: a Ray Tune function trial (one worker), used by the ensemble
  (ensemble.py) and the ASHA sweep (sweep.py);
* `run_vqa_loop(config, LocalSession(folder))`: one process, no Ray.

Features: `prepare_vqa_data` maps the node's shared copy of the store (one per node, every
trial and worker reading the same pages) or falls back to the store reader; on CUDA the flat
copy moves to the GPU when it fits (`data.device_features_share`) and batches are gathered
there (features/regions.py).

Each epoch: `train_step` over this worker's share of the questions (binary cross-entropy
against soft scores, AdaDelta (paper) or Adamax (re-implementation), clipped gradients, the
learning rate warmed up linearly over the first `warmup_epochs`), then
`evaluate` (the soft score of the top answer, i.e. its official accuracy) and a checkpoint.
Training stops early after `patience` epochs without a better validation accuracy.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from ray_updown import storage
from ray_updown.devices import pick_device
from ray_updown.features.regions import batch_loader, regions_to_device
from ray_updown.train.run_checkpoint import find_damage, load_checkpoint_dir, save_checkpoint_dir
from ray_updown.train.session import LocalSession, RayTrainSession, Session, TuneSession
from ray_updown.train.trainer import build_trainer, checkpoint_uri, fit, storage_kwargs
from ray_updown.train.worker import (
    all_reduce,
    autocast,
    init_wandb,
    optimizer_to,
    set_lr,
    shard_batches,
    steps_per_epoch,
    warmup_factor,
)
from ray_updown.vqa.config import METRIC, VqaTrainConfig
from ray_updown.vqa.data import (
    PreparedVqa,
    VqaDataset,
    VqaVocabularies,
    check_vqa_inputs,
    prepare_vqa_data,
)
from ray_updown.vqa.model import VqaConfig, VqaModel, soft_accuracy, vqa_loss
from ray_updown.weights import load_state_strict

__all__ = ["LocalSession", "run_vqa_loop", "train_vqa", "vqa_trainable"]


def model_config(cfg: VqaTrainConfig, data: PreparedVqa) -> VqaConfig:
    """The preset + overrides, sized to the data's vocabularies and features."""
    values = cfg.model.base().to_dict()
    values.update(num_tokens=len(data.vocabs.questions), num_answers=len(data.vocabs.answers),
                  feat_dim=data.feature_dim, spatial_dim=data.region_dim_extra, pad_index=0)
    return VqaConfig(**values)


def build_optimizer(cfg: VqaTrainConfig, params) -> torch.optim.Optimizer:
    name, lr = cfg.optimizer_name(), cfg.learning_rate()
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adamax(params, lr=lr, weight_decay=cfg.weight_decay)


def place_features(data: PreparedVqa, device: torch.device, share: float) -> bool:
    """On CUDA, the flat features (and the questions) go to the device once when they fit
    `share` of its free memory; True when batches are then built there."""
    if not regions_to_device(data.train.regions, device, share):
        return False
    for dataset in (data.train, data.val):
        if dataset is not None:
            dataset.to(device)
    return True


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, optimizer, batch: dict, grad_clip: float,
               precision: str = "fp32") -> torch.Tensor:
    """One update: BCE against soft scores (eq. 17), clipped gradients. Returns the loss as a
    0-d tensor on the batch's device: reading it is the caller's choice, so that a GPU's
    steps queue without waiting for each other."""
    with autocast(precision, batch["feats"].device):
        logits = model(batch["question_tokens"], batch["feats"], batch["mask"])
        loss = vqa_loss(logits.float(), batch["targets"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: VqaModel, dataset: VqaDataset, batch_size: int, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    """Mean soft accuracy overall and per answer type (val_accuracy_yes_no, ..._number,
    ..._other) over all the workers' shares."""
    types = sorted(set(dataset.encoded.answer_types))
    sums = np.zeros((len(types) + 1, 2))  # (accuracy sum, count): overall, then per type
    model.eval()
    for idx in shard_batches(len(dataset), batch_size, rank, world):
        batch = batch_to(dataset.__getitems__(idx), device)
        scores = torch.sigmoid(model(batch["question_tokens"], batch["feats"], batch["mask"]))
        acc = soft_accuracy(scores, batch["targets"]).double().cpu().numpy()
        sums[0] += (acc.sum(), len(acc))
        for j, t in enumerate(types, start=1):
            sel = np.array([dataset.encoded.answer_types[i] == t for i in idx])
            sums[j] += (acc[sel].sum(), sel.sum())
    model.train()
    sums = np.array(all_reduce(sums.ravel().tolist())).reshape(sums.shape)
    out = {METRIC: float(sums[0, 0] / max(sums[0, 1], 1))}
    for j, t in enumerate(types, start=1):
        out[f"{METRIC}_{t.replace('/', '_')}"] = float(sums[j, 0] / max(sums[j, 1], 1))
    return out


def restore_state(resume: tuple | None, model: VqaModel,
                  optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The run's counters (epoch, best accuracy, epochs since it, whether early stopping
    ended the run): a restored checkpoint's, with its weights and optimizer state loaded,
    or a new run's."""
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "since_best": 0, "done": False}
    if resume:
        weights, _, trainer_state = resume
        load_state_strict(model, weights, "restored checkpoint")
        optimizer.load_state_dict(trainer_state["optimizer"])
        state.update({k: trainer_state[k] for k in state if k in trainer_state})
    return state


def update_best(state: dict, accuracy: float) -> None:
    """The best val accuracy so far and the epochs since it, which early stopping counts."""
    if accuracy > state["best"] + 1e-9:
        state["best"], state["since_best"] = accuracy, 0
    else:
        state["since_best"] += 1


def run_vqa_loop(config: dict, session: Session) -> None:
    """One worker's training run (see the module docstring)."""
    cfg = VqaTrainConfig.from_dict(config)
    rank, world = session.rank, session.world
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout streams differ per worker
    device = pick_device()
    with session.restore() as path:
        resume = load_checkpoint_dir(path) if path else None
    vocabs = VqaVocabularies.from_json(resume[1]) if resume else None
    base = cfg.model.base()
    data = prepare_vqa_data(cfg.data, base.question_len, base.embed_dim, vocabs)
    mcfg = model_config(cfg, data)
    model = VqaModel(mcfg, seed=cfg.seed)
    if data.embeddings is not None:
        model.load_embeddings(data.embeddings, source=cfg.data.glove)
    optimizer = build_optimizer(cfg, model.parameters())
    state = restore_state(resume, model, optimizer)
    # Features gathered on the GPU need no loader processes (and CUDA tensors must not cross
    # into them); otherwise the loader workers map the node's shared copy.
    loader_workers = 0 if place_features(data, device, cfg.data.device_features_share) \
        else cfg.loader_workers
    model.to(device)
    optimizer_to(optimizer, device)
    ddp_model = session.wrap(model)
    checkpoint_config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), **data.vocabs.to_json()}
    run = init_wandb(cfg.wandb_project, cfg.to_dict(), cfg.name) if session.logs_to_wandb else None
    early_stopping = cfg.patience > 0 and data.val is not None and "val" not in cfg.data.train_on
    resumed_from_epoch = state["epoch"]
    lr, epoch_steps = cfg.learning_rate(), steps_per_epoch(len(data.train), cfg.batch_size)
    warmup_steps = round(cfg.warmup_epochs * epoch_steps)
    while not state["done"] and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        started, losses = time.perf_counter(), []
        batches = shard_batches(len(data.train), cfg.batch_size, rank, world,
                                seed=cfg.seed, epoch=epoch)
        for step, batch in enumerate(batch_loader(data.train, batches, loader_workers),
                                     start=epoch * epoch_steps):
            if warmup_steps:
                set_lr(optimizer, lr * warmup_factor(step, warmup_steps))
            losses.append(train_step(ddp_model, optimizer, batch_to(batch, device), cfg.grad_clip,
                                     cfg.precision))
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1,
                   "train_loss": float(torch.stack(losses).mean()) if losses else math.nan,
                   "samples_per_s": sum(len(b) for b in batches) * world / max(seconds, 1e-9)}
        if data.val is not None:
            metrics.update(evaluate(model, data.val, cfg.batch_size * 2, rank, world, device))
            update_best(state, metrics[METRIC])
        state["epoch"] = epoch + 1
        state["done"] = early_stopping and state["since_best"] >= cfg.patience
        metrics.update(best_val_accuracy=state["best"], stopped_early=bool(state["done"]),
                       resumed_from_epoch=resumed_from_epoch)
        if run is not None:
            run.log(metrics, step=epoch + 1)
        trainer_state = {**state, "optimizer": optimizer.state_dict()}
        session.report(metrics, lambda path: save_checkpoint_dir(path, model, checkpoint_config,
                                                                 trainer_state))
    if run is not None:
        run.finish()


def _train_worker(config: dict) -> None:
    run_vqa_loop(config, RayTrainSession())


def vqa_trainable(config: dict) -> None:
    """Ray Tune function trainable: one trial = one single-worker training run."""
    run_vqa_loop(config, TuneSession())


def has_val(cfg: VqaTrainConfig) -> bool:
    return bool(cfg.data.val_questions and cfg.data.val_annotations)


def check_inputs(cfg: VqaTrainConfig) -> VqaTrainConfig:
    """The config with absolute paths, after checking on the driver what the workers would
    otherwise find: the config, and every data file read and cross-checked
    (`check_vqa_inputs`). Shared by train_vqa, the ensemble and the sweep."""
    cfg = cfg.absolute()
    cfg.validate()
    check_vqa_inputs(cfg.data, cfg.model.base().embed_dim)
    return cfg


def train_vqa(cfg: VqaTrainConfig) -> dict:
    """Train with Ray Train (`cfg.num_workers` DDP workers); re-running resumes.

    Returns {"best_checkpoint", "latest_checkpoint" (URIs), "best_val_accuracy", "metrics"
    (the last epoch's), "path" (the run's folder)}. The best checkpoint by val accuracy and
    the latest are kept.
    """
    cfg = check_inputs(cfg)
    trainer = build_trainer(
        _train_worker, cfg.to_dict(), name=cfg.name, storage_path=cfg.storage_path,
        num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
        max_failures=cfg.max_failures, keep_checkpoints=2,
        score_metric=METRIC if has_val(cfg) else None)
    result = fit(trainer, storage.join(cfg.storage_path, cfg.name))
    best = best_intact_checkpoint(result.best_checkpoints, cfg.storage_path)
    best = best[0] if best else result.checkpoint
    metrics = dict(result.metrics or {})
    return {"best_checkpoint": checkpoint_uri(best, cfg.storage_path) if best else None,
            "latest_checkpoint": checkpoint_uri(result.checkpoint, cfg.storage_path)
            if result.checkpoint else None,
            "best_val_accuracy": metrics.get("best_val_accuracy"), "metrics": metrics,
            "path": storage.join(cfg.storage_path, cfg.name)}


def best_intact_checkpoint(pairs, storage_path: str):
    """(checkpoint, metrics) of the best-scoring kept checkpoint that is intact, or None (a
    damaged one the run fell back from stays in the run's folder and in Ray's record)."""
    scored = [(m.get(METRIC, -math.inf), c, m) for c, m in (pairs or [])
              if find_damage(checkpoint_uri(c, storage_path), contents=False) is None]
    return max(scored, key=lambda p: p[0])[1:] if scored else None


# -- Ray Tune plumbing shared by the ensemble and the sweep ---------------------------------

def tune_trainable(cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0):
    """`vqa_trainable` with per-trial resources (a fractional GPU lets trials share one),
    registered with Tune: its name (train/search.py `registered_trainable`)."""
    from ray import tune

    from ray_updown.train.search import registered_trainable

    resources = {"cpu": cpus_per_trial}
    if gpus_per_trial > 0:
        resources["gpu"] = gpus_per_trial
    return registered_trainable("vqa_trainable", tune.with_resources(vqa_trainable, resources),
                                resources)


def tune_run_config(cfg: VqaTrainConfig, root: str, experiment: str, callbacks=None):
    """RunConfig of one Tune experiment at <root>/<experiment>: the two best checkpoints (an
    earlier one to fall back to, session.restore) and the latest are kept."""
    from ray import tune

    callbacks = list(callbacks or [])
    project = cfg.wandb_project or os.environ.get("WANDB_PROJECT")  # as init_wandb
    if project and os.environ.get("WANDB_MODE") != "disabled":
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=project, group=experiment))
    scoring = {"checkpoint_score_attribute": METRIC, "checkpoint_score_order": "max"} \
        if has_val(cfg) else {}
    return tune.RunConfig(
        name=experiment, **storage_kwargs(root), callbacks=callbacks or None,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, **scoring))

