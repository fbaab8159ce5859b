"""Training the Up-Down captioner: cross-entropy (eq. 9), then SCST (eq. 10-11).

    cfg = load_config(CaptionTrainConfig, "captioner.yaml", ["epochs=3", "num_workers=2"])
    summary = train_captioner(cfg)   # -> {"checkpoint": ..., "metrics": {...}, ...}

`run_captioner_loop(cfg, session)` is the whole loop (train/session.py: Ray Train, or one
process without Ray); `train_captioner` runs it on `num_workers` Ray Train workers (DDP).
Each epoch every worker trains on its shard of the training images, the workers score greedy
captions of a small validation subset with CIDEr-D, and a checkpoint (weights, configs and the
vocabulary; optimizer state) is reported to `storage_path/name`. Running again with the same
storage_path and name resumes after the last reported epoch; raising `epochs` continues a
finished run. An SCST run starts from a cross-entropy checkpoint (`scst.init_from`).

Defaults are the paper's (supplementary 6.2): SGD, momentum 0.9, lr 0.01 falling linearly to
0 over the run (epochs x steps per epoch; resuming with more epochs stretches the remaining
schedule over the new length), 100 captions per step (20 images x 5 references); 11 epochs
of the 113,287 Karpathy training images are ~62K steps, the paper's 60K iterations.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ray_updown import storage
from ray_updown.captioning.config import CaptionTrainConfig
from ray_updown.captioning.data import CaptionData, make_loader
from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
from ray_updown.captioning.objectives import CiderReward, greedy_cider, scst_loss, xe_loss
from ray_updown.config import to_dict
from ray_updown.data.coco import Vocab
from ray_updown.devices import pick_device
from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.features.regions import regions_to_device
from ray_updown.train.run_checkpoint import CONFIG_FILE, check_vocabulary, load_checkpoint_dir, save_checkpoint_dir
from ray_updown.train.session import RayTrainSession, Session
from ray_updown.train.trainer import build_trainer, checkpoint_uri, fit, history, latest_checkpoint
from ray_updown.train.worker import (
    all_reduce,
    autocast,
    init_wandb,
    set_lr,
    shard_batches,
    steps_per_epoch,
)
from ray_updown.weights import load_state_strict

CHECKPOINT_KIND = "updown_captioner"
_SUMS = ("loss_sum", "captions", "reward_sum", "baseline_sum")  # what a step adds up


# ----------------------------------------------------------------------------- building
def model_config(cfg: CaptionTrainConfig, vocab: Vocab, feature_dim: int) -> CaptionerConfig:
    m = cfg.model
    return CaptionerConfig(vocab_size=len(vocab), feat_dim=feature_dim,
                           spatial_dim=cfg.data.spatial_dim, embed_dim=m.embed_dim,
                           hidden_dim=m.hidden_dim, att_dim=m.att_dim, dropout=m.dropout,
                           max_len=cfg.data.max_len, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
                           eos_id=vocab.eos_id)


def checkpoint_config(cfg: CaptionTrainConfig, mcfg: CaptionerConfig, vocab: Vocab) -> dict:
    """config.json of a captioner checkpoint: everything needed to rebuild and feed it."""
    return {"kind": CHECKPOINT_KIND, "model": dataclasses.asdict(mcfg),
            "vocab": list(vocab.itos), "objective": cfg.objective,
            "data": {"features": cfg.data.features, "max_regions": cfg.data.max_regions,
                     "spatial": cfg.data.spatial, "max_len": cfg.data.max_len},
            "train": to_dict(cfg)}


def check_vocab(checkpoint_itos: list[str] | None, vocab: Vocab, source: str) -> None:
    """CheckpointError unless a checkpoint's vocabulary is the data's, word for word."""
    check_vocabulary(checkpoint_itos, list(vocab.itos), "vocabulary", "words", source)


def build_optimizer(params, cfg: CaptionTrainConfig) -> torch.optim.Optimizer:
    if cfg.objective == "scst":
        name, lr, momentum, decay = cfg.scst.optimizer, cfg.scst.lr, cfg.optim.momentum, 0.0
    else:
        o = cfg.optim
        name, lr, momentum, decay = o.optimizer, o.lr, o.momentum, o.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def learning_rate(cfg: CaptionTrainConfig, step: int, total_steps: int) -> float:
    """lr at a step: XE falls linearly to 0 over the run (supp. 6.2); SCST is constant."""
    if cfg.objective == "scst":
        return cfg.scst.lr
    if cfg.optim.schedule == "constant":
        return cfg.optim.lr
    return cfg.optim.lr * max(0.0, 1.0 - step / max(total_steps, 1))


# --------------------------------------------------------------------------- the loop
def train_step(model, optimizer, batch, cfg: CaptionTrainConfig, pad_id: int,
               reward: CiderReward, generator: torch.Generator) -> dict[str, float]:
    """One update with the run's objective: XE (eq. 9) or SCST (eq. 10-11). Returns the
    step's sums (loss, captions, and for SCST reward and baseline)."""
    with autocast(cfg.precision, batch.feats.device):
        if cfg.objective == "xe":
            loss, stats = xe_loss(model, batch, pad_id)
        else:
            loss, stats = scst_loss(model, batch, reward, cfg.scst, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    return stats


def evaluate(model, loader, reward: CiderReward, device: torch.device) -> dict[str, float]:
    """Mean CIDEr-D of greedy captions over all the workers' validation shares."""
    total, count = all_reduce(list(greedy_cider(model, loader, reward, device)))
    return {"val_cider_d": total / count} if count > 0 else {}


def check_resumable(config: dict, objective: str | None, cfg: CaptionTrainConfig, vocab: Vocab,
                    source: str) -> None:
    """CheckpointError unless the run's last checkpoint (its config.json, and the objective it
    was trained with) can be continued by this run."""
    check_vocab(config.get("vocab"), vocab, source)
    if (objective or cfg.objective) != cfg.objective:
        raise CheckpointError(f"was trained with objective {objective!r}, this run is "
                              f"{cfg.objective!r}: give the run a new name", file=source)


def restore(session: Session, cfg: CaptionTrainConfig, model: torch.nn.Module,
            vocab: Vocab) -> dict:
    """Weights from the run's last checkpoint (or, for a new SCST run, from its XE
    checkpoint); returns the trainer state to continue from ({} for a new run)."""
    with session.restore() as path:
        if path is not None:
            weights, config, state = load_checkpoint_dir(path)
            source = f"the last checkpoint of run {cfg.name}"
            check_resumable(config, (state or {}).get("objective"), cfg, vocab, source)
            load_state_strict(model, weights, source)
            return state or {}
    if cfg.objective == "scst":
        weights, config, _ = load_checkpoint_dir(cfg.scst.init_from)
        check_vocab(config.get("vocab"), vocab, cfg.scst.init_from)
        load_state_strict(model, weights, cfg.scst.init_from)
    return {}


def sampling_generator(cfg: CaptionTrainConfig, device: torch.device, epoch: int,
                       rank: int) -> torch.Generator:
    """SCST's sampling stream, reproducible per (seed, epoch, rank), so that a resumed run
    draws the same captions."""
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)
    return generator


def train_epoch(cfg: CaptionTrainConfig, ddp_model, optimizer, loader, device: torch.device,
                pad_id: int, reward: CiderReward, generator: torch.Generator, step: int,
                total_steps: int) -> tuple[dict[str, float], int, float]:
    """One epoch of updates: this worker's sums (_SUMS), the step count after it and the last
    learning rate."""
    sums = dict.fromkeys(_SUMS, 0.0)
    lr = learning_rate(cfg, step, total_steps)
    for batch in loader:
        lr = learning_rate(cfg, step, total_steps)
        set_lr(optimizer, lr)
        stats = train_step(ddp_model, optimizer, batch.to(device), cfg, pad_id, reward, generator)
        step += 1
        for key in sums:
            sums[key] += stats.get(key, 0.0)
    return sums, step, lr


def epoch_statistics(cfg: CaptionTrainConfig, sums: dict[str, float],
                     started: float) -> dict[str, float]:
    """The epoch's mean loss per caption over all workers (for SCST also the mean reward and
    baseline), its seconds and captions per second."""
    totals = dict(zip(_SUMS, all_reduce([sums[k] for k in _SUMS])))
    seconds = time.perf_counter() - started
    captions = max(totals["captions"], 1.0)
    out = {"loss": totals["loss_sum"] / captions, "epoch_seconds": seconds,
           "captions_per_second": totals["captions"] / seconds}
    if cfg.objective == "scst":
        out["train_reward"] = totals["reward_sum"] / captions
        out["train_baseline"] = totals["baseline_sum"] / captions
    return out


def run_captioner_loop(cfg: CaptionTrainConfig, session: Session) -> None:
    """One worker: its shard of the images, the model (DDP), epochs of XE or SCST, reports."""
    rank, world = session.rank, session.world
    torch.manual_seed(cfg.seed + rank)
    device = pick_device()
    data = CaptionData.load(cfg.data, check_features=False)  # the driver checked them
    # The node's shared copy (or the store reader): one copy per node whatever the number of
    # trials and workers; on CUDA it moves to the device when it fits, and batches are then
    # gathered there (and built in this process: make_loader runs no loader processes).
    regions = data.open_regions()
    regions_to_device(regions, device, cfg.data.device_features_share)
    mcfg = model_config(cfg, data.vocab, regions.feature_dim)
    model = UpDownCaptioner(mcfg)
    ckpt_config = checkpoint_config(cfg, mcfg, data.vocab)
    state = restore(session, cfg, model, data.vocab)
    start_epoch, step = int(state.get("epoch", 0)), int(state.get("step", 0))
    ddp_model = session.wrap(model.to(device))
    optimizer = build_optimizer(model.parameters(), cfg)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])

    val_loader = make_loader(data, regions, data.val_ids,
                             shard_batches(len(data.val_ids), cfg.batch_size, rank, world))
    reward = CiderReward(data.training_references(), data.vocab)
    total_steps = cfg.epochs * steps_per_epoch(len(data.train_ids), cfg.batch_size)
    wandb_run = init_wandb(cfg.wandb_project, to_dict(cfg), cfg.name) \
        if session.logs_to_wandb else None
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        loader = make_loader(data, regions, data.train_ids, shard_batches(
            len(data.train_ids), cfg.batch_size, rank, world, seed=cfg.seed, epoch=epoch))
        # SCST without dropout: candidates and their re-scored log-probs share one policy.
        ddp_model.train(cfg.objective == "xe")
        sums, step, lr = train_epoch(cfg, ddp_model, optimizer, loader, device, data.vocab.pad_id,
                                     reward, sampling_generator(cfg, device, epoch, rank),
                                     step, total_steps)
        metrics = {"epoch": epoch + 1, "step": step, "objective": cfg.objective, "lr": lr,
                   **epoch_statistics(cfg, sums, started), "resumed_from_epoch": start_epoch}
        metrics.update(evaluate(ddp_model, val_loader, reward, device))
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in metrics.items() if not isinstance(v, str)},
                          step=step)
        trainer_state = {"epoch": epoch + 1, "step": step, "objective": cfg.objective,
                         "optimizer": optimizer.state_dict()}
        session.report(metrics, lambda path: save_checkpoint_dir(path, model, ckpt_config,
                                                                 trainer_state))
    if wandb_run is not None:
        wandb_run.finish()


def _train_worker(loop_config: dict) -> None:
    run_captioner_loop(loop_config["cfg"], RayTrainSession())


# ------------------------------------------------------------------------- the driver
def check_inputs(cfg: CaptionTrainConfig) -> CaptionData:
    """Check on the driver what would otherwise fail inside the workers: the data (every
    image has references and features), the run's last checkpoint when re-run, and the SCST
    starting checkpoint's vocabulary."""
    cfg.validate()
    data = CaptionData.load(cfg.data, check_features=True)
    last = latest_checkpoint(run_uri(cfg), CONFIG_FILE)
    if last is not None:  # a re-run resumes from it
        config = storage.read_json(storage.join(last, CONFIG_FILE))
        check_resumable(config, config.get("objective"), cfg, data.vocab,
                        f"{last} (the last checkpoint of run {cfg.name})")
    elif cfg.objective == "scst":
        if not cfg.scst.init_from:
            raise ConfigError("SCST starts from a cross-entropy checkpoint: set scst.init_from",
                              record="scst.init_from")
        config_uri = storage.join(cfg.scst.init_from, CONFIG_FILE)
        if not storage.exists(config_uri):
            raise CheckpointError(f"not a checkpoint: no {CONFIG_FILE}", file=cfg.scst.init_from)
        check_vocab(storage.read_json(config_uri).get("vocab"), data.vocab, cfg.scst.init_from)
    return data


def run_uri(cfg: CaptionTrainConfig) -> str:
    return storage.join(cfg.storage_path, cfg.name)


def train_captioner(cfg: CaptionTrainConfig) -> dict:
    """Run (or resume) a captioner training run on the connected Ray cluster.

    Returns {"name", "storage_path", "checkpoint" (URI of the last checkpoint), "metrics"
    (its metrics), "history" (metrics of every kept checkpoint, by epoch), "elapsed_seconds"}.
    """
    started = time.perf_counter()
    check_inputs(cfg)
    trainer = build_trainer(_train_worker, {"cfg": cfg}, name=cfg.name,
                            storage_path=cfg.storage_path, num_workers=cfg.num_workers,
                            use_gpu=cfg.use_gpu, max_failures=cfg.max_failures,
                            keep_checkpoints=cfg.keep_checkpoints or None)
    result = fit(trainer, run_uri(cfg))
    checkpoint = (checkpoint_uri(result.checkpoint, cfg.storage_path)
                  if result.checkpoint is not None else None)
    return {"name": cfg.name, "storage_path": cfg.storage_path, "checkpoint": checkpoint,
            "metrics": dict(result.metrics or {}), "history": history(result),
            "elapsed_seconds": time.perf_counter() - started}
