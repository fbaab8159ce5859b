"""The training-worker skeleton every task shares (ray_updown/train/): checkpoints, strict
weight loading, batch sharding, sessions, wandb. No Ray needed here."""

from __future__ import annotations

import os

import pytest
import torch

from ray_updown.errors import CheckpointError, ConfigError
from ray_updown.train.run_checkpoint import check_vocabulary, load_checkpoint_dir, save_checkpoint_dir
from ray_updown.train.session import LocalSession
from ray_updown.train.worker import all_reduce, init_wandb, shard_batches
from ray_updown.weights import load_state_strict


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_checkpoint_round_trip_restores_weights_and_optimizer_state(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    save_checkpoint_dir(str(tmp_path), model, {"hidden": 4}, {"epoch": 3, "optimizer": opt.state_dict()})
    weights, config, state = load_checkpoint_dir(str(tmp_path))
    assert config == {"hidden": 4} and state["epoch"] == 3
    fresh = _model()
    load_state_strict(fresh, weights, str(tmp_path))
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.5)
    opt2.load_state_dict(state["optimizer"])
    # The momentum buffers and hyper-parameters come back exactly, so a resumed step is the
    # step the original run would have taken.
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    for p_old, p_new in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p_old]["momentum_buffer"], opt2.state[p_new]["momentum_buffer"])
    grad = torch.randn(2, 3)
    for m, o in ((model, opt), (fresh, opt2)):
        o.zero_grad()
        m(grad).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_strict_load_reports_every_problem_and_loads_nothing():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    weights.pop("1.bias")
    weights["0.weight"] = torch.zeros(5, 3)
    weights["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_strict(model, weights, "ckpt/")
    text = str(err.value)
    assert "ckpt/" in text and "1 missing: 1.bias" in text and "1 unexpected: extra" in text
    assert "0.weight [5, 3] (model expects [4, 3])" in text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_strict_load_casts_to_the_models_dtypes():
    model = _model()
    weights = {k: torch.full_like(v, 0.5, dtype=torch.float16) for k, v in model.state_dict().items()}
    load_state_strict(model, weights, "half.safetensors")
    assert all(v.dtype == torch.float32 and bool((v == 0.5).all()) for v in model.state_dict().values())


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint_dir(str(tmp_path))


def test_vocabulary_check_names_the_first_difference():
    check_vocabulary(["a", "b"], ["a", "b"], "vocabulary", "words", "ckpt")
    with pytest.raises(CheckpointError, match=r"has 3 words, the data 2; first difference at index 1: 'x' vs 'b'"):
        check_vocabulary(["a", "x", "c"], ["a", "b"], "vocabulary", "words", "ckpt")
    with pytest.raises(CheckpointError, match="index 2: 'c' vs '<none>'"):
        check_vocabulary(["a", "b", "c"], ["a", "b"], "vocabulary", "words", "ckpt")
    with pytest.raises(CheckpointError, match="has no object_vocab"):
        check_vocabulary(None, ["a"], "object_vocab", "classes", "ckpt")


def test_training_shards_are_equal_disjoint_and_reproducible():
    shards = [shard_batches(14, 4, rank=r, world=2, seed=0, epoch=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3  # 14 // 4 full global batches
    assert all(len(b) == 2 for s in shards for b in s)
    seen = [i for s in shards for b in s for i in b]
    assert len(set(seen)) == len(seen) == 12
    # step s of worker r is its every-world-th share of global batch s
    for step in range(3):
        together = sorted(shards[0][step] + shards[1][step])
        assert together == sorted(shard_batches(14, 4, 0, 1, seed=0, epoch=2)[step])
    assert shard_batches(14, 4, 0, 2, seed=0, epoch=2) == shards[0]  # same on resume
    assert shard_batches(14, 4, 0, 2, seed=0, epoch=3) != shards[0]  # new order each epoch
    assert shard_batches(14, 4, 0, 2, seed=1, epoch=2) != shards[0]
    (few,) = shard_batches(3, 4, 0, 1, seed=0)  # fewer items than a batch: they repeat
    assert len(few) == 4 and set(few) == {0, 1, 2}
    uneven = [shard_batches(103, 8, r, 3, seed=5) for r in range(3)]
    assert len({len(s) for s in uneven}) == 1  # DDP lockstep even when 3 does not divide 8
    assert {len(b) for s in uneven for b in s} == {2, 3}
    with pytest.raises(ConfigError, match="batch_size"):
        shard_batches(10, 2, 0, 3, seed=0)


def test_evaluation_shards_cover_every_item_once_in_rank_order():
    parts = [shard_batches(103, 8, r, 3) for r in range(3)]
    flat = [i for part in parts for b in part for i in b]
    assert flat == list(range(103))
    assert all(len(b) <= 3 for part in parts for b in part)  # 8 / 3 per worker, rounded up
    assert shard_batches(2, 4, 2, 3) == []  # more workers than items: some get none


def test_all_reduce_outside_a_group_returns_the_values():
    assert all_reduce([1.5, 2.0]) == [1.5, 2.0]
    assert all_reduce([3.0], "max") == [3.0]


def test_local_session_numbers_checkpoints_and_restores_the_newest(tmp_path):
    session = LocalSession(str(tmp_path))
    with session.restore() as path:
        assert path is None
    session.report({"epoch": 1})  # metrics only: no checkpoint
    for epoch in (1, 2):
        session.report({"epoch": epoch}, lambda d, e=epoch: open(os.path.join(d, "e"), "w").write(str(e)))
    assert [p for _, p in session.reports] == [None, str(tmp_path / "checkpoint_000000"),
                                               str(tmp_path / "checkpoint_000001")]
    with LocalSession(str(tmp_path)).restore() as path:
        assert open(os.path.join(path, "e")).read() == "2"


def test_local_session_never_restores_a_half_written_checkpoint(tmp_path):
    session = LocalSession(str(tmp_path))
    session.report({"epoch": 1}, lambda d: open(os.path.join(d, "ok"), "w").close())

    def crash(directory: str) -> None:
        open(os.path.join(directory, "half"), "w").close()
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        session.report({"epoch": 2}, crash)
    with LocalSession(str(tmp_path)).restore() as path:
        assert path == str(tmp_path / "checkpoint_000000")
    session.report({"epoch": 2}, lambda d: open(os.path.join(d, "ok"), "w").close())
    assert session.reports[-1][1] == str(tmp_path / "checkpoint_000001")


def test_wandb_is_off_when_disabled_and_offline_when_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert init_wandb("proj", {"a": 1}) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert init_wandb(None, {"a": 1}) is None  # no project configured: no run
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "ray-updown-test")
    run = init_wandb(None, {"lr": 0.1}, name="t")
    run.log({"loss": 1.0})
    run.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_the_trainer_polls_its_workers_every_half_second_unless_told(ray_cluster, tmp_path,
                                                                      monkeypatch):
    """Ray Train's 2-s default poll kept a finished run waiting ~6 s before fit() returned;
    the driver's variable reaches the controller, and a user's own value is kept."""
    from ray_updown.train.trainer import TRAIN_POLL_ENV, build_trainer

    def build():
        build_trainer(lambda config: None, {}, name="poll", storage_path=str(tmp_path),
                      num_workers=1)

    monkeypatch.delenv(TRAIN_POLL_ENV, raising=False)
    build()
    assert os.environ[TRAIN_POLL_ENV] == "0.5"
    monkeypatch.setenv(TRAIN_POLL_ENV, "3")
    build()
    assert os.environ[TRAIN_POLL_ENV] == "3"
