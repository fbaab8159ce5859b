"""Training the bottom-up attention detector (Anderson et al. 3.1).

    cfg = load_config(DetectorTrainConfig, "detector.yaml", ["data.root=runs/world"])
    summary = train_detector(cfg)   # -> {"detector": URI for load_detector, "metrics": ..., ...}

Faster R-CNN ResNet-C4 with the attribute head, trained from scratch on Visual Genome-format
data with the four Faster R-CNN losses plus the attribute loss. `run_detector_loop(cfg,
session)` is the whole loop (train/session.py: a Ray Train worker, or one process without
Ray); `train_detector` runs it on `num_workers` DDP workers, each taking an equal share of
every global batch. Each epoch the workers score the held-out split (object mAP@0.5 and
attribute accuracy, `metrics/detection.py`) and rank 0 reports a checkpoint to
`storage_path/name`: our detector format (`detector.safetensors` + `detector.json` with the
vocabularies, readable by `load_detector`) plus `trainer_state.pt` (optimizer, counters).
Re-running with the same storage_path and name resumes; raising `epochs` or `max_minutes`
continues a finished run. The final detector is also exported to `export_uri`.

The schedule is nanoGPT's: linear warmup, then cosine (or step) decay over the run, where
"the run" ends at `epochs` or after `max_minutes` of training, whichever comes first, so a
time-budgeted run on a slow machine still ends annealed.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ray_updown.config import to_dict
from ray_updown.detector.checkpoint import CONFIG_FILE as DETECTOR_JSON
from ray_updown.detector.checkpoint import load_detector, save_detector
from ray_updown.detector.config import DetectorConfig
from ray_updown.detector.model import BottomUpDetector
from ray_updown.detector.train.config import DetectorTrainConfig
from ray_updown.detector.train.data import DetectorData, DetectorImage, evaluate_split, flips_for
from ray_updown.detector.train.optim import build_optimizer, learning_rate
from ray_updown.detector.train.resume import (
    check_vocabularies,
    load_weights_from,
    read_meta,
    read_trainer_state,
    save_training_checkpoint,
)
from ray_updown.devices import pick_device
from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.train.session import RayTrainSession, Session
from ray_updown.train.trainer import build_trainer, checkpoint_uri, fit, history, latest_checkpoint
from ray_updown.train.worker import all_reduce, init_wandb, set_lr, shard_batches, steps_per_epoch

LOSSES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_attr")


def model_config(cfg: DetectorTrainConfig, data: DetectorData) -> DetectorConfig:
    """The architecture of `cfg.model` with the class counts of the data's vocabularies."""
    return dataclasses.replace(cfg.model, num_classes=data.num_classes,
                               num_attributes=data.num_attributes)


# --------------------------------------------------------------------------- the loop
def train_step(model, optimizer, images: list[DetectorImage], flips: list[bool],
               grad_clip: float) -> dict[str, float]:
    """One update on the sum of the five losses (paper 3.1). Returns each loss and their sum."""
    pairs = [image.target(flip) for image, flip in zip(images, flips)]
    losses = model([p for p, _ in pairs], [t for _, t in pairs])
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.item(), **{k: v.detach().item() for k, v in losses.items()}}


def evaluate(model: BottomUpDetector, splits: dict[str, list[DetectorImage]], batch_size: int,
             rank: int, world: int) -> dict[str, float]:
    """mAP@0.5 and attribute accuracy on each held-out split, as `<split>_map50`, ..."""
    metrics: dict[str, float] = {}
    for prefix, images in splits.items():
        metrics.update(evaluate_split(model, images, batch_size, rank, world).as_dict(prefix))
    return metrics


@dataclasses.dataclass
class Progress:
    """Where a run stands: epochs finished, optimizer steps taken, seconds spent training, and
    the training-time budget in seconds (0: none)."""
    epoch: int
    step: int
    train_seconds: float
    budget: float

    def out_of_budget(self) -> bool:
        return self.budget > 0 and self.train_seconds >= self.budget

    def fraction(self, total_steps: int) -> float:
        """How far through the run: by steps or by the time budget, whichever is further."""
        by_time = self.train_seconds / self.budget if self.budget else 0.0
        return max(self.step / total_steps, by_time)


def restore_weights(cfg: DetectorTrainConfig, session: Session, model: BottomUpDetector,
                    names: tuple[list[str], list[str]]) -> dict:
    """The run's last checkpoint loaded into `model`, or else `init_from`'s weights; returns the
    restored trainer state ({} when the run starts fresh)."""
    state: dict = {}
    with session.restore() as path:
        if path is not None:
            load_weights_from(model, path, *names, f"{path} (the last checkpoint of run "
                                                   f"{cfg.name}; give a new run another name)")
            state = read_trainer_state(path)
    if not state and cfg.init_from:
        load_weights_from(model, cfg.init_from, *names, cfg.init_from)
    return state


def train_epoch(cfg: DetectorTrainConfig, ddp_model, optimizer, images: list[DetectorImage],
                progress: Progress, total_steps: int, rank: int, world: int,
                wandb_run) -> tuple[dict[str, float], int, float]:
    """One epoch of updates, cut short when the time budget runs out. Advances `progress`;
    returns this worker's sum of each loss, its number of steps and the last learning rate."""
    sums = dict.fromkeys(("loss", *LOSSES), 0.0)
    steps_done, lr = 0, 0.0
    batches = shard_batches(len(images), cfg.batch_size, rank, world,
                            seed=cfg.seed, epoch=progress.epoch)
    for s, indices in enumerate(batches):
        step_started = time.perf_counter()
        lr = learning_rate(cfg.optim, progress.step, progress.fraction(total_steps))
        set_lr(optimizer, lr)
        losses = train_step(ddp_model, optimizer, [images[i] for i in indices],
                            flips_for(indices, progress.epoch, s, rank, cfg.seed, cfg.data.hflip),
                            cfg.optim.grad_clip)
        progress.step += 1
        steps_done += 1
        for key in sums:
            sums[key] += losses[key]
        # All workers agree on the clock (the slowest one's), so they stop together.
        progress.train_seconds += all_reduce([time.perf_counter() - step_started], "max")[0]
        if wandb_run is not None and progress.step % cfg.log_every == 0:
            wandb_run.log({**{"train/" + k: losses[k] for k in LOSSES}, "lr": lr},
                          step=progress.step)
        if progress.out_of_budget():
            break
    return sums, steps_done, lr


def mean_losses(sums: dict[str, float], steps_done: int, world: int) -> dict[str, float]:
    """Each loss averaged over every worker's steps of the epoch."""
    totals = all_reduce([sums[k] for k in sums] + [float(steps_done * world)])
    return {k: v / max(totals[-1], 1.0) for k, v in zip(sums, totals)}


def held_out_splits(cfg: DetectorTrainConfig, data: DetectorData, val_images, decode,
                    epoch: int, finished: bool) -> dict[str, list[DetectorImage]]:
    """The splits scored after `epoch`: val every `eval_every` epochs and at the end, test
    (decoded only then) at the end."""
    held_out = {}
    if finished or epoch % cfg.eval_every == 0:
        held_out["val_"] = val_images
    if finished and cfg.data.test_split and data.splits[cfg.data.test_split]:
        held_out["test_"] = decode(cfg.data.test_split)
    return held_out


def run_detector_loop(cfg: DetectorTrainConfig, session: Session) -> None:
    """One worker: data, model (DDP), epochs of the five losses, evaluation, reports."""
    rank, world = session.rank, session.world
    torch.set_num_threads(cfg.torch_threads or cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed * 1009 + rank)
    device = pick_device()

    data = DetectorData.load(cfg.data)
    model_cfg = model_config(cfg, data)
    model = BottomUpDetector(model_cfg, data.object_vocab.names, data.attribute_vocab.names)
    state = restore_weights(cfg, session, model,
                            (data.object_vocab.names, data.attribute_vocab.names))
    progress = Progress(int(state.get("epoch", 0)), int(state.get("step", 0)),
                        float(state.get("train_seconds", 0.0)), cfg.max_minutes * 60.0)
    start_epoch = progress.epoch
    model.to(device).train()
    ddp_model = session.wrap(model)
    optimizer = build_optimizer(model, cfg.optim)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])

    def decode(split: str) -> list[DetectorImage]:
        return data.decode(split, model_cfg.min_size, model_cfg.max_size)

    def checkpoint(trainer_state: dict):
        return lambda path: save_training_checkpoint(path, model, to_dict(cfg), trainer_state)

    train_images, val_images = decode("train"), decode(cfg.data.val_split)
    total_steps = cfg.epochs * steps_per_epoch(len(train_images), cfg.batch_size)
    wandb_run = init_wandb(cfg.wandb_project, to_dict(cfg), cfg.name) \
        if session.logs_to_wandb else None

    stopped = progress.out_of_budget() or start_epoch >= cfg.epochs
    if stopped and "metrics" in state:
        # Nothing left to train: report the finished run again so fit() returns it.
        session.report({**state["metrics"], "resumed_from_epoch": start_epoch}, checkpoint(state))
    while not stopped:
        started = time.perf_counter()
        sums, steps_done, lr = train_epoch(cfg, ddp_model, optimizer, train_images, progress,
                                           total_steps, rank, world, wandb_run)
        progress.epoch += 1
        stopped = progress.out_of_budget() or progress.epoch >= cfg.epochs
        epoch_seconds = time.perf_counter() - started
        metrics = {"epoch": progress.epoch, "step": progress.step, "lr": lr,
                   "train_seconds": progress.train_seconds, "epoch_seconds": epoch_seconds,
                   "resumed_from_epoch": start_epoch,
                   "images_per_second": steps_done * cfg.batch_size / max(epoch_seconds, 1e-9),
                   "finished": stopped, **mean_losses(sums, steps_done, world)}
        eval_started = time.perf_counter()
        held_out = held_out_splits(cfg, data, val_images, decode, progress.epoch, stopped)
        metrics.update(evaluate(model, held_out, cfg.eval_batch_size, rank, world))
        metrics["eval_seconds"] = time.perf_counter() - eval_started
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                          step=progress.step)
        session.report(metrics, checkpoint({
            "epoch": progress.epoch, "step": progress.step, "train_seconds": progress.train_seconds,
            "optimizer": optimizer.state_dict(), "metrics": metrics}))
    if wandb_run is not None:
        wandb_run.finish()


def _train_worker(loop_config: dict) -> None:
    run_detector_loop(loop_config["cfg"], RayTrainSession())


# ------------------------------------------------------------------------- the driver
def check_inputs(cfg: DetectorTrainConfig) -> DetectorData:
    """Check on the driver what would otherwise fail inside the workers: the VG files and
    vocabularies, that every image file exists, the architecture, and the vocabularies of
    the checkpoint the run starts from (`init_from`, or the run's own last checkpoint when
    re-run)."""
    cfg.validate()
    data = DetectorData.load(cfg.data)
    data.check_images()
    try:
        model_config(cfg, data).validate()
    except ConfigError as exc:
        raise ConfigError(exc.problem, record=f"model.{exc.record}") from None
    names = (data.object_vocab.names, data.attribute_vocab.names)
    last = latest_checkpoint(cfg.run_uri(), DETECTOR_JSON)
    if last is not None:  # a re-run resumes from it
        check_vocabularies(read_meta(last), *names, f"{last} (the last checkpoint of run "
                                                    f"{cfg.name}; give a new run another name)")
    elif cfg.init_from:
        check_vocabularies(read_meta(cfg.init_from), *names, cfg.init_from)
    return data


def train_detector(cfg: DetectorTrainConfig) -> dict:
    """Run (or resume) a detector training run on the connected Ray cluster.

    Returns {"name", "storage_path", "checkpoint" (the last Ray checkpoint, itself a detector
    directory), "detector" (the exported final detector for `load_detector`), "metrics" (the
    last epoch's: val_/test_ map50, attr_acc, ...), "history" (kept checkpoints' metrics),
    "train_minutes", "elapsed_seconds"}.
    """
    started = time.perf_counter()
    check_inputs(cfg)
    trainer = build_trainer(_train_worker, {"cfg": cfg}, name=cfg.name,
                            storage_path=cfg.storage_path, num_workers=cfg.num_workers,
                            use_gpu=cfg.use_gpu, cpus_per_worker=cfg.cpus_per_worker,
                            max_failures=cfg.max_failures,
                            keep_checkpoints=cfg.keep_checkpoints or None)
    result = fit(trainer, cfg.run_uri())
    if result.checkpoint is None:
        raise CheckpointError("the run reported no checkpoint", file=cfg.run_uri())
    checkpoint = checkpoint_uri(result.checkpoint, cfg.storage_path)
    detector_uri = cfg.detector_uri()
    save_detector(load_detector(checkpoint), detector_uri)
    metrics = dict(result.metrics or {})
    return {"name": cfg.name, "storage_path": cfg.storage_path, "checkpoint": checkpoint,
            "detector": detector_uri, "metrics": metrics, "history": history(result),
            "train_minutes": metrics.get("train_seconds", 0.0) / 60.0,
            "elapsed_seconds": time.perf_counter() - started}
