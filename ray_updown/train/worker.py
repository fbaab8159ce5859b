"""What a training worker does the same way in every task: split an epoch into batches, sum
numbers over the workers, warm up the learning rate, run under the chosen precision, start
wandb (its device comes from devices.py).

Nothing here needs Ray: a loop run by a LocalSession (session.py) uses the same functions
with a world of one.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ray_updown.errors import ConfigError


def autocast(precision: str, device: torch.device):
    """The context a training step's forward and loss run in: bf16 autocast when `precision`
    is "bf16" (matrix products in bfloat16; weights, gradients and optimizer state stay
    float32), else nothing. bfloat16 has float32's exponent range, so gradients cannot
    underflow as float16's do: no loss scaling (GradScaler) is needed."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel, if wrapped."""
    return model.module if hasattr(model, "module") else model


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move a restored optimizer's state to the model's device."""
    for per_param in optimizer.state.values():
        for k, v in per_param.items():
            if torch.is_tensor(v):
                per_param[k] = v.to(device)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The linear warmup of the learning rate (Goyal et al. 2017): the lr of 0-based `step`
    is its full value times (step + 1) / warmup_steps over the first `warmup_steps` steps,
    then times 1. No warmup when `warmup_steps` is 0."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group, before a step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def distributed() -> bool:
    """True inside a DDP group of more than one worker."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) of a few numbers over the workers; the numbers themselves alone."""
    if not distributed():
        return list(values)
    import torch.distributed as dist

    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    """Training steps of an epoch under `shard_batches`: full global batches, at least one."""
    return max(1, num_items // batch_size) if num_items else 0


def shard_batches(num_items: int, batch_size: int, rank: int, world: int,
                  seed: int | None = None, epoch: int = 0) -> list[list[int]]:
    """This worker's item indices for every step of an epoch; `batch_size` is global.

    Training (`seed` given): one permutation per (seed, epoch), the same on every worker;
    step s takes items [s*B, (s+1)*B) of it and worker r every world-th of those, so all
    workers run the same number of steps (DDP needs lockstep) with shares that differ by at
    most one. The last partial batch is dropped; with fewer items than a batch, items repeat
    to fill one.

    Evaluation (`seed` None): every item exactly once, in order; worker r takes the r-th
    contiguous slice (so gathering the workers' results in rank order restores the order),
    in batches of B / world. Workers may get unequal counts.
    """
    if batch_size < world:
        raise ConfigError(f"batch_size {batch_size} is smaller than the {world} workers: "
                          "every worker needs an item per step", record="batch_size")
    if seed is None:
        per = math.ceil(num_items / world)
        mine = list(range(rank * per, min(num_items, (rank + 1) * per)))
        local = math.ceil(batch_size / world)
        return [mine[i:i + local] for i in range(0, len(mine), local)]
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    if 0 < num_items < batch_size:
        order = np.resize(order, batch_size)
    steps = steps_per_epoch(num_items, batch_size)
    return [order[s * batch_size:(s + 1) * batch_size][rank::world].tolist()
            for s in range(steps)]


def init_wandb(project: str | None, config: dict, name: str | None = None):
    """A wandb run when a project is configured, by the config's `wandb_project` or the
    WANDB_PROJECT variable. WANDB_MODE is offline by default, so nothing leaves the machine
    unless the user asks (`wandb sync` uploads later). Call it on rank 0 only."""
    project = project or os.environ.get("WANDB_PROJECT")
    if not project or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(project=project, name=name, config=config, reinit=True)
