"""Training the Up-Down captioner on Ray Train: cross-entropy (eq. 9), then SCST (eq. 10-11).

    cfg = load_config(CaptionTrainConfig, "captioner.yaml", ["epochs=3", "num_workers=2"])
    summary = train_captioner(cfg)   # -> {"checkpoint": ..., "metrics": {...}, ...}

One `TorchTrainer` runs `train_loop` on `num_workers` workers (DDP; gloo on CPU, NCCL on GPU).
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
import math
import time

import torch

from ray_updown import storage
from ray_updown.config import to_dict
from ray_updown.data.coco import Vocab
from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
from ray_updown.captioning.config import CaptionTrainConfig
from ray_updown.captioning.data import CaptionData, make_loader
from ray_updown.captioning.objectives import (CiderReward, greedy_cider,
                                                 scst_loss, xe_loss)
from ray_updown.train.common import (CONFIG_FILE, checkpoint_uri, fit, init_wandb,
                                     load_checkpoint_dir, load_weights_strict, pick_device,
                                     report_with_checkpoint, restore_from_ray, run_storage)

CHECKPOINT_KIND = "updown_captioner"


# ----------------------------------------------------------------------------- building
def captioner_config(cfg: CaptionTrainConfig, vocab: Vocab, feature_dim: int) -> CaptionerConfig:
    m = cfg.model
    return CaptionerConfig(vocab_size=len(vocab), feat_dim=feature_dim,
                           spatial_dim=cfg.data.spatial_dim, embed_dim=m.embed_dim,
                           hidden_dim=m.hidden_dim, att_dim=m.att_dim, dropout=m.dropout,
                           max_len=cfg.data.max_len, pad_id=vocab.pad_id, bos_id=vocab.bos_id,
                           eos_id=vocab.eos_id)


def checkpoint_config(cfg: CaptionTrainConfig, model_config: CaptionerConfig,
                      vocab: Vocab) -> dict:
    """config.json of a captioner checkpoint: everything needed to rebuild and feed it."""
    return {"kind": CHECKPOINT_KIND, "model": dataclasses.asdict(model_config),
            "vocab": list(vocab.itos), "objective": cfg.objective,
            "data": {"features": cfg.data.features, "max_regions": cfg.data.max_regions,
                     "spatial": cfg.data.spatial, "max_len": cfg.data.max_len},
            "train": to_dict(cfg)}


def check_vocab(checkpoint_itos: list[str] | None, vocab: Vocab, source: str) -> None:
    """CheckpointError unless a checkpoint's vocabulary is the data's, word for word."""
    if checkpoint_itos is None:
        raise CheckpointError("has no vocabulary: not a captioner checkpoint", file=source)
    if list(checkpoint_itos) == list(vocab.itos):
        return
    first = next((i for i, (a, b) in enumerate(zip(checkpoint_itos, vocab.itos)) if a != b),
                 min(len(checkpoint_itos), len(vocab)))
    ours = vocab.itos[first] if first < len(vocab) else "<none>"
    theirs = checkpoint_itos[first] if first < len(checkpoint_itos) else "<none>"
    raise CheckpointError(f"vocabulary does not match the data's: the checkpoint has "
                          f"{len(checkpoint_itos)} words, the data {len(vocab)}; first "
                          f"difference at id {first}: '{theirs}' vs '{ours}'", file=source)


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


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- the loop
def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: data shard, model (DDP), epochs of XE or SCST, reports."""
    import ray.train
    import ray.train.torch

    cfg: CaptionTrainConfig = loop_config["cfg"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = pick_device()

    data = CaptionData.load(cfg.data, check_features=False)  # the driver checked them
    store = data.open_store()
    model_config = captioner_config(cfg, data.vocab, store.feature_dim)
    model = UpDownCaptioner(model_config)
    ckpt_config = checkpoint_config(cfg, model_config, data.vocab)
    resume, start_epoch, step = restore_from_ray(), 0, 0
    if resume is not None:
        source = f"the last checkpoint of run {cfg.name}"
        check_vocab(resume.config.get("vocab"), data.vocab, source)
        if resume.trainer_state.get("objective", cfg.objective) != cfg.objective:
            raise CheckpointError(f"was trained with objective "
                                  f"{resume.trainer_state['objective']!r}, this run is "
                                  f"{cfg.objective!r}: give the run a new name", file=source)
        load_weights_strict(model, resume.weights, source)
        start_epoch, step = int(resume.trainer_state["epoch"]), int(resume.trainer_state["step"])
    elif cfg.objective == "scst":
        weights, config, _ = load_checkpoint_dir(cfg.scst.init_from)
        check_vocab(config.get("vocab"), data.vocab, cfg.scst.init_from)
        load_weights_strict(model, weights, cfg.scst.init_from)
    model = ray.train.torch.prepare_model(model.to(device))  # DDP when world > 1
    optimizer = build_optimizer(model.parameters(), cfg)
    if resume is not None and "optimizer" in resume.trainer_state:
        optimizer.load_state_dict(resume.trainer_state["optimizer"])

    images_per_worker = math.ceil(cfg.batch_size / world)
    loader = make_loader(data, store, data.train_ids, images_per_worker, rank, world,
                         shuffle=True, seed=cfg.seed)
    val_loader = make_loader(data, store, data.val_ids[rank::world], images_per_worker,
                             shuffle=False) if data.val_ids[rank::world] else []
    reward = CiderReward(data.training_references(), data.vocab)
    total_steps = cfg.epochs * len(loader)
    wandb_run = init_wandb(cfg.wandb_project, to_dict(cfg), cfg.name) if rank == 0 else None

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        # SCST samples: reproducible per (seed, epoch, rank), so a resumed run draws the same
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)
        # SCST without dropout: candidates and their re-scored log-probs share one policy.
        model.train(cfg.objective == "xe")
        sums = {"loss_sum": 0.0, "captions": 0.0, "reward_sum": 0.0, "baseline_sum": 0.0}
        lr = learning_rate(cfg, step, total_steps)
        for batch in loader:
            batch = batch.to(device)
            lr = learning_rate(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.objective == "xe":
                loss, stats = xe_loss(model, batch, data.vocab.pad_id)
            else:
                loss, stats = scst_loss(model, batch, reward, cfg.scst, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            for key in sums:
                sums[key] += stats.get(key, 0.0)
        val_sum, val_count = greedy_cider(model, val_loader, reward, device)
        totals = _all_reduce_sum([sums["loss_sum"], sums["captions"], sums["reward_sum"],
                                  sums["baseline_sum"], val_sum, val_count], device)
        seconds = time.perf_counter() - started
        captions = max(totals[1], 1.0)
        metrics = {"epoch": epoch + 1, "step": step, "objective": cfg.objective, "lr": lr,
                   "loss": totals[0] / captions, "epoch_seconds": seconds,
                   "captions_per_second": totals[1] / seconds, "resumed_from_epoch": start_epoch}
        if cfg.objective == "scst":
            metrics["train_reward"] = totals[2] / captions
            metrics["train_baseline"] = totals[3] / captions
        if totals[5] > 0:
            metrics["val_cider_d"] = totals[4] / totals[5]
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in metrics.items() if not isinstance(v, str)},
                          step=step)
        report_with_checkpoint(metrics, model, ckpt_config,
                               {"epoch": epoch + 1, "step": step, "objective": cfg.objective,
                                "optimizer": optimizer.state_dict()})
    if wandb_run is not None:
        wandb_run.finish()


# ------------------------------------------------------------------------- the driver
def validate(cfg: CaptionTrainConfig) -> CaptionData:
    """Check on the driver what would otherwise fail inside the workers: the data (every
    image has references and features) and the SCST starting checkpoint's vocabulary."""
    data = CaptionData.load(cfg.data, check_features=True)
    if cfg.objective == "scst":
        if not cfg.scst.init_from:
            raise ConfigError("SCST starts from a cross-entropy checkpoint: set scst.init_from",
                              record="scst.init_from")
        config_uri = storage.join(cfg.scst.init_from, CONFIG_FILE)
        if not storage.exists(config_uri):
            raise CheckpointError(f"not a checkpoint: no {CONFIG_FILE}", file=cfg.scst.init_from)
        check_vocab(storage.read_json(config_uri).get("vocab"), data.vocab, cfg.scst.init_from)
    return data


def train_captioner(cfg: CaptionTrainConfig) -> dict:
    """Run (or resume) a captioner training run on the connected Ray cluster.

    Returns {"name", "storage_path", "checkpoint" (URI of the last checkpoint), "metrics"
    (its metrics), "history" (metrics of every kept checkpoint, by epoch), "elapsed_seconds"}.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_updown.ray_session import ensure_ray

    started = time.perf_counter()
    validate(cfg)
    ensure_ray()
    path, filesystem = run_storage(cfg.storage_path)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=cfg.name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.keep_checkpoints or None)))
    result = fit(trainer)
    checkpoint = (checkpoint_uri(result.checkpoint, cfg.storage_path)
                  if result.checkpoint is not None else None)
    history = sorted((m for _, m in (result.best_checkpoints or [])), key=lambda m: m["epoch"])
    return {"name": cfg.name, "storage_path": cfg.storage_path, "checkpoint": checkpoint,
            "metrics": dict(result.metrics or {}), "history": history,
            "elapsed_seconds": time.perf_counter() - started}
