"""Training the Up-Down VQA model on Ray (paper 3.3, supp. 6.3).

One loop body, `run_vqa_loop`, serves two launchers:

* `train_vqa(cfg)`: a Ray Train `TorchTrainer` (DDP; gloo on CPU, NCCL on GPU) with
  `cfg.num_workers` workers; resume = re-run with the same `storage_path` and `name`.
* `vqa_trainable(config_dict)`: a Ray Tune function trainable (one worker per trial) used by
  the ensemble (ensemble.py) and the ASHA sweep (sweep.py).

Each epoch: binary cross-entropy against soft scores (`vqa_loss`), AdaDelta (paper) or
Adamax (re-implementation), gradient-norm clipping; then the validation accuracy (the soft
score of the top answer = the official accuracy of it) and a checkpoint to storage. Training
stops early after `patience` epochs without a better validation accuracy.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch

from ray_updown import storage
from ray_updown.vqa.model import VqaConfig, VqaModel, soft_accuracy, vqa_loss
from ray_updown.vqa.config import METRIC, OPTIMIZERS, VqaTrainConfig
from ray_updown.train import common
from ray_updown.vqa.data import (PreparedVqa, VqaDataset, VqaVocabularies,
                                       prepare_vqa_data)

log = logging.getLogger(__name__)

def model_config(cfg: VqaTrainConfig, data: PreparedVqa) -> VqaConfig:
    """The preset + overrides, sized to the data's vocabularies and features."""
    values = cfg.model.base().to_dict()
    values.update(num_tokens=len(data.vocabs.questions), num_answers=len(data.vocabs.answers),
                  feat_dim=data.feature_dim, spatial_dim=data.region_dim_extra, pad_index=0)
    return VqaConfig(**values)


def build_optimizer(cfg: VqaTrainConfig, params) -> torch.optim.Optimizer:
    lr = cfg.lr if cfg.lr is not None else OPTIMIZERS[cfg.optimizer]
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adamax(params, lr=lr, weight_decay=cfg.weight_decay)


def shard_batches(n: int, batch_size: int, rank: int, world: int, seed: int | None) -> list[np.ndarray]:
    """This rank's batches of an epoch: a seeded permutation (None: in order), dealt round-robin.

    Every rank gets the same number of batches (DDP needs it): the tail that does not fill
    `world` batches is dropped when training, kept (uneven) when `seed` is None (evaluation).
    """
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    mine = order[rank::world]
    if seed is not None:
        mine = mine[:n // world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, optimizer, batch: dict, grad_clip: float) -> float:
    """One update: BCE against soft scores (eq. 17), clipped gradients. Returns the loss."""
    logits = model(batch["question_tokens"], batch["feats"], batch["mask"])
    loss = vqa_loss(logits, batch["targets"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: VqaModel, dataset: VqaDataset, batch_size: int, rank: int, world: int,
             device: torch.device) -> dict[str, float]:
    """Mean soft accuracy overall and per answer type (val_accuracy_yes_no, ..._number,
    ..._other), all-reduced over the workers."""
    types = sorted(set(dataset.encoded.answer_types))
    sums = torch.zeros(len(types) + 1, 2, dtype=torch.float64)  # (accuracy sum, count)
    model.eval()
    for idx in shard_batches(len(dataset), batch_size, rank, world, seed=None):
        batch = batch_to(dataset.__getitems__(idx), device)
        scores = torch.sigmoid(model(batch["question_tokens"], batch["feats"], batch["mask"]))
        acc = soft_accuracy(scores, batch["targets"]).double().cpu()
        sums[0] += torch.stack([acc.sum(), torch.tensor(float(len(acc)), dtype=torch.float64)])
        for j, t in enumerate(types, start=1):
            sel = torch.tensor([dataset.encoded.answer_types[i] == t for i in idx])
            sums[j] += torch.stack([acc[sel].sum(), sel.sum().double()])
    model.train()
    if world > 1:
        torch.distributed.all_reduce(sums)
    out = {METRIC: float(sums[0, 0] / sums[0, 1].clamp(min=1))}
    for j, t in enumerate(types, start=1):
        out[f"{METRIC}_{t.replace('/', '_')}"] = float(sums[j, 0] / sums[j, 1].clamp(min=1))
    return out


class _TrainSession:
    """Ray Train worker: DDP-wrapped model, ray.train.report, rank-0 wandb."""

    wandb_in_loop = True

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def restore(self) -> common.Resume | None:
        return common.restore_from_ray()

    def wrap(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world > 1 else model

    def report(self, metrics, model, config, state) -> None:
        common.report_with_checkpoint(metrics, model, config, state)


class _TuneSession:
    """Ray Tune function trainable: one worker, ray.tune.report (wandb via Tune's callback)."""

    rank, world, wandb_in_loop = 0, 1, False

    def restore(self) -> common.Resume | None:
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            weights, config, state = common.load_checkpoint_dir(path)
        return common.Resume(weights, config, state or {})

    def wrap(self, model):
        return model

    def report(self, metrics, model, config, state) -> None:
        import ray.tune

        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            common.save_checkpoint_dir(tmp, model, config, state)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def run_vqa_loop(config: dict, session) -> None:
    """The training loop both launchers run (see the module docstring)."""
    cfg = VqaTrainConfig.from_dict(config)
    rank, world = session.rank, session.world
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout streams differ per worker
    device = common.pick_device()
    resume = session.restore()
    vocabs = VqaVocabularies.from_json(resume.config) if resume else None
    base = cfg.model.base()
    data = prepare_vqa_data(cfg.data, base.question_len, base.embed_dim, vocabs)
    mcfg = model_config(cfg, data)
    model = VqaModel(mcfg, seed=cfg.seed)
    if data.embeddings is not None:
        model.load_embeddings(data.embeddings, source=cfg.data.glove)
    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "since_best": 0, "done": False}
    optimizer = build_optimizer(cfg, model.parameters())
    if resume:
        common.load_weights_strict(model, resume.weights, "restored checkpoint")
        optimizer.load_state_dict(resume.trainer_state["optimizer"])
        state.update({k: resume.trainer_state[k] for k in state if k in resume.trainer_state})
    model.to(device)
    _optimizer_to(optimizer, device)
    ddp_model = session.wrap(model)
    checkpoint_config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), **data.vocabs.to_json()}
    use_wandb = rank == 0 and getattr(session, "wandb_in_loop", False)
    run = common.init_wandb(cfg.wandb_project, cfg.to_dict(), cfg.name) if use_wandb else None
    local_batch = max(1, cfg.batch_size // world)
    early_stopping = cfg.patience > 0 and data.val is not None and "val" not in cfg.data.train_on
    resumed_from_epoch = state["epoch"]
    while not state["done"] and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        started, losses = time.perf_counter(), []
        batches = shard_batches(len(data.train), local_batch, rank, world, seed=cfg.seed * 7919 + epoch)
        loader = torch.utils.data.DataLoader(
            data.train, batch_sampler=batches, num_workers=cfg.loader_workers,
            collate_fn=_identity)  # the dataset's __getitems__ builds whole batches
        for batch in loader:
            losses.append(train_step(ddp_model, optimizer, batch_to(batch, device), cfg.grad_clip))
        seconds = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else math.nan,
                   "samples_per_s": sum(len(b) for b in batches) * world / max(seconds, 1e-9)}
        if data.val is not None:
            metrics.update(evaluate(model, data.val, local_batch * 2, rank, world, device))
            if metrics[METRIC] > state["best"] + 1e-9:
                state["best"], state["since_best"] = metrics[METRIC], 0
            else:
                state["since_best"] += 1
        state["epoch"] = epoch + 1
        state["done"] = early_stopping and state["since_best"] >= cfg.patience
        metrics.update(best_val_accuracy=state["best"], stopped_early=bool(state["done"]),
                       resumed_from_epoch=resumed_from_epoch)
        if run is not None:
            run.log(metrics, step=epoch + 1)
        session.report(metrics, model, checkpoint_config,
                       {**state, "optimizer": optimizer.state_dict()})
    if run is not None:
        run.finish()


def _identity(batch):
    return batch


def _optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    for per_param in optimizer.state.values():
        for k, v in per_param.items():
            if torch.is_tensor(v):
                per_param[k] = v.to(device)


def _train_worker(config: dict) -> None:
    run_vqa_loop(config, _TrainSession())


def vqa_trainable(config: dict) -> None:
    """Ray Tune function trainable: one trial = one single-worker training run."""
    run_vqa_loop(config, _TuneSession())


def storage_kwargs(storage_path: str) -> dict:
    """RunConfig's `storage_path` (+ `storage_filesystem` for object stores)."""
    path, filesystem = common.run_storage(storage_path)
    return {"storage_path": path, **({"storage_filesystem": filesystem} if filesystem else {})}


def checkpoint_retention(cfg: VqaTrainConfig) -> dict:
    """Keep the best checkpoint by val accuracy (plus the latest, which Ray always keeps)."""
    if cfg.data.val_questions and cfg.data.val_annotations:
        return {"num_to_keep": 1, "checkpoint_score_attribute": METRIC,
                "checkpoint_score_order": "max"}
    return {"num_to_keep": 1}


def train_vqa(cfg: VqaTrainConfig) -> dict:
    """Train with Ray Train (`cfg.num_workers` DDP workers); re-running resumes.

    Returns {"best_checkpoint", "latest_checkpoint" (URIs), "best_val_accuracy", "metrics"
    (the last epoch's), "path" (the run's folder)}.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_updown.ray_session import ensure_ray

    cfg = cfg.absolute()
    cfg.check()
    ensure_ray()
    trainer = TorchTrainer(
        _train_worker, train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name, **storage_kwargs(cfg.storage_path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(**checkpoint_retention(cfg))))
    result = common.fit(trainer)  # a worker's package error surfaces as itself
    best = _best_checkpoint(result.best_checkpoints) or result.checkpoint
    metrics = dict(result.metrics or {})
    return {"best_checkpoint": common.checkpoint_uri(best, cfg.storage_path) if best else None,
            "latest_checkpoint": common.checkpoint_uri(result.checkpoint, cfg.storage_path)
            if result.checkpoint else None,
            "best_val_accuracy": metrics.get("best_val_accuracy"), "metrics": metrics,
            "path": storage.join(cfg.storage_path, cfg.name)}


def _best_checkpoint(pairs):
    scored = [(m.get(METRIC, -math.inf), c) for c, m in (pairs or [])]
    return max(scored, key=lambda p: p[0])[1] if scored else None


# -- Ray Tune plumbing shared by the ensemble and the sweep ---------------------------------

def tune_trainable(cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0):
    """`vqa_trainable` with per-trial resources (a fractional GPU lets trials share one)."""
    from ray import tune

    resources = {"cpu": cpus_per_trial}
    if gpus_per_trial > 0:
        resources["gpu"] = gpus_per_trial
    return tune.with_resources(vqa_trainable, resources)


def tune_run_config(cfg: VqaTrainConfig, root: str, experiment: str, callbacks=None):
    """RunConfig of one Tune experiment at <root>/<experiment>: best + latest checkpoint kept."""
    from ray import tune

    callbacks = list(callbacks or [])
    project = cfg.wandb_project or os.environ.get("WANDB_PROJECT")  # as common.init_wandb
    if project and os.environ.get("WANDB_MODE") != "disabled":
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=project, group=experiment))
    return tune.RunConfig(
        name=experiment, **storage_kwargs(root), callbacks=callbacks or None,
        failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=tune.CheckpointConfig(**checkpoint_retention(cfg)))


def tune_experiment_path(root: str, experiment: str) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) of an experiment, as Tuner.restore wants them."""
    kwargs = storage_kwargs(root)
    path = kwargs["storage_path"].rstrip("/") + "/" + experiment
    return path, kwargs.get("storage_filesystem")
