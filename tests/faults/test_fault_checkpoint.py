"""A training checkpoint truncated on disk: the re-run that resumes from it fails with one
line naming the damaged file, instead of a safetensors / torch traceback from inside a Ray
Train worker. (It does not fall back to an earlier checkpoint: Ray Train's restore hands the
loop only the latest one.)"""

from __future__ import annotations

import glob
import os

import pytest
from faultkit import run_cli, vqa_config, write_vqa_world

from ray_updown.errors import CheckpointError
from ray_updown.train.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, load_checkpoint_dir
from ray_updown.vqa.train import train_vqa


def _truncate(path: str, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_a_truncated_checkpoint_is_one_line_naming_it(local_ray, tmp_path):
    data = write_vqa_world(str(tmp_path / "vqa"))
    runs = str(tmp_path / "runs")
    out = train_vqa(vqa_config(data, runs, "cut", epochs=2))
    assert out["metrics"]["epoch"] == 2
    checkpoint = sorted(glob.glob(os.path.join(runs, "cut", "checkpoint_*", MODEL_FILE)))[-1]
    checkpoint = os.path.dirname(checkpoint)  # the latest: what a re-run resumes from
    weights = os.path.join(checkpoint, MODEL_FILE)
    _truncate(weights)

    overrides = [f"data.{k}={v}" for k, v in data.items()] + [
        "model.hidden=16", "model.embed_dim=8", "model.question_len=6", "optimizer=adamax",
        "lr=0.05", "epochs=3", "batch_size=8", "patience=0"]
    done = run_cli(["train-vqa", "--storage-path", runs, "--name", "cut", *overrides])
    assert done.returncode == 2, done.stderr[-3000:]
    # The CLI's own verdict: the package's one line naming the damaged file. (Ray Train's
    # worker and controller logs around it still carry the worker's traceback.)
    [line] = [x for x in done.stderr.splitlines() if x.startswith("ray-updown train-vqa: error:")]
    assert line.startswith(f"ray-updown train-vqa: error: {weights}: unreadable weights ("), line
    assert line.endswith("the checkpoint is damaged: resume from an earlier one or start a new run")


@pytest.mark.parametrize("name,keep", [(MODEL_FILE, 0.0), (CONFIG_FILE, 0.5), (STATE_FILE, 0.5)])
def test_each_damaged_checkpoint_file_is_named(tmp_path, name, keep):
    from faultkit import write_checkpoint_dir

    path = write_checkpoint_dir(str(tmp_path / "ckpt"))
    load_checkpoint_dir(path)  # intact: loads
    _truncate(os.path.join(path, name), keep)
    with pytest.raises(CheckpointError, match=f"{path}/{name}: unreadable .*the checkpoint is damaged"):
        load_checkpoint_dir(path)
