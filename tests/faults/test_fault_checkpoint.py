"""Training failures, run through the CLI as a user runs it (a subprocess joining this
module's Ray): a damaged training checkpoint and a data file that fails only inside a Ray
Train worker. The console then shows the package's lines only: no traceback and no line of
a Ray worker (their output stays in Ray's session logs). Then, without Ray, the manifest's
checks and the fall-back to the newest intact checkpoint."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
from faultkit import console, progress_of, run_cli, vqa_config, write_vqa_world

from ray_updown.errors import CheckpointError
from ray_updown.train.run_checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    find_damage,
    load_checkpoint_dir,
    write_manifest,
)
from ray_updown.vqa.train import train_vqa

TINY = ["model.hidden=16", "model.embed_dim=8", "model.question_len=6", "optimizer=adamax",
        "lr=0.05", "batch_size=8", "patience=0"]


def _truncate(path: str, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _checkpoints(runs: str, name: str) -> list[str]:
    """The run's checkpoint directories, oldest first."""
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(runs, name, "checkpoint_*",
                                                                      MODEL_FILE)))


def _train_vqa_cli(data: dict, runs: str, name: str, *extra: str):
    overrides = [f"data.{k}={v}" for k, v in data.items()] + TINY + list(extra)
    return run_cli(["train-vqa", "--storage-path", runs, "--name", name, *overrides])


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    return write_vqa_world(str(tmp_path_factory.mktemp("vqa")))


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(local_ray, vqa_data, tmp_path):
    runs = str(tmp_path / "runs")
    assert train_vqa(vqa_config(vqa_data, runs, "cut", epochs=2))["metrics"]["epoch"] == 2
    before, latest = _checkpoints(runs, "cut")  # the one before is always kept
    _truncate(os.path.join(latest, MODEL_FILE))

    done = _train_vqa_cli(vqa_data, runs, "cut", "epochs=3")
    assert done.returncode == 0, done.stderr[-3000:]
    [warning], errors = console(done, "train-vqa")
    assert not errors
    assert warning.startswith(f"ray-updown train-vqa: warning: {latest}/{MODEL_FILE}: truncated: ")
    assert warning.endswith(f"; the checkpoint is damaged; resuming from the checkpoint before "
                            f"it, {before}"), warning
    metrics = json.loads(done.stdout)["metrics"]
    assert metrics["resumed_from_epoch"] == 1 and metrics["epoch"] == 3
    # The workers' progress reaches the console: one line per epoch trained in this run.
    epochs = [int(m.group(1)) for m in map(progress_of("train-vqa").match,
                                           done.stderr.splitlines()) if m]
    assert epochs == [2, 3], done.stderr[-3000:]


def test_a_run_with_no_intact_checkpoint_is_one_line_and_so_is_a_worker_failure(
        local_ray, vqa_data, tmp_path):
    runs = str(tmp_path / "runs")
    train_vqa(vqa_config(vqa_data, runs, "cut", epochs=1))
    [checkpoint] = _checkpoints(runs, "cut")
    weights = os.path.join(checkpoint, MODEL_FILE)
    _truncate(weights)

    # Found by the driver before any worker starts.
    done = _train_vqa_cli(vqa_data, runs, "cut", "epochs=2")
    assert done.returncode == 2, done.stderr[-3000:]
    warnings, [line] = console(done, "train-vqa")
    assert not warnings
    assert line.startswith(f"ray-updown train-vqa: error: {weights}: truncated: "), line
    assert line.endswith("the checkpoint is damaged, and no earlier checkpoint of the run is "
                         "intact: start a new run (another name)"), line

    # A checkpoint written before manifests: only the worker that loads it finds the damage.
    os.remove(os.path.join(checkpoint, MANIFEST_FILE))
    done = _train_vqa_cli(vqa_data, runs, "cut", "epochs=2")
    assert done.returncode == 2, done.stderr[-3000:]
    warnings, [line] = console(done, "train-vqa")
    assert line.startswith(f"ray-updown train-vqa: error: {weights}: unreadable weights ("), line
    assert line.endswith("the checkpoint is damaged: resume from an earlier one or start a new run")


def test_a_data_file_that_fails_inside_the_worker_is_one_line(local_ray, vqa_data, tmp_path):
    # The driver checks the first 20 lines of a GloVe file; the worker reads it all.
    glove = tmp_path / "glove.txt"
    good = [f"word{i} " + " ".join(["0.1"] * 8) for i in range(30)]
    glove.write_text("\n".join(good + ["ball 0.1 0.2", ""]))
    runs = str(tmp_path / "runs")
    done = _train_vqa_cli(vqa_data, runs, "glove", "epochs=1", f"data.glove={glove}")
    assert done.returncode == 2, done.stderr[-3000:]
    warnings, [line] = console(done, "train-vqa")
    assert not warnings
    assert line == (f"ray-updown train-vqa: error: {glove}: line 31: has 2 values, "
                    "expected dim = 8"), line
    assert not os.path.exists(os.path.join(runs, "glove"))  # a new run that failed: no folder


@pytest.mark.parametrize("name,keep", [(MODEL_FILE, 0.0), (CONFIG_FILE, 0.5), (STATE_FILE, 0.5)])
def test_each_damaged_checkpoint_file_is_named(tmp_path, name, keep):
    from faultkit import write_checkpoint_dir

    path = write_checkpoint_dir(str(tmp_path / "ckpt"))
    load_checkpoint_dir(path)  # intact: loads
    _truncate(os.path.join(path, name), keep)
    with pytest.raises(CheckpointError, match=f"{path}/{name}: unreadable .*the checkpoint is damaged"):
        load_checkpoint_dir(path)


@pytest.mark.parametrize("damage,problem", [
    (lambda p: _truncate(p), "truncated: "),
    (lambda p: open(p, "ab").write(b"\0"), " bytes, "),
    (lambda p: open(p, "r+b").write(b"\xff"), "other bytes than were written (sha256)"),
    (os.remove, "missing")])
def test_the_manifest_finds_each_kind_of_damage(tmp_path, damage, problem):
    from faultkit import write_checkpoint_dir

    path = write_checkpoint_dir(str(tmp_path / "ckpt"))
    write_manifest(path)
    assert find_damage(path) is None
    damage(os.path.join(path, STATE_FILE))
    found = find_damage(path)
    assert found is not None and found.file == f"{path}/{STATE_FILE}" and problem in str(found)
    if problem.startswith("other bytes"):  # a check of sizes alone cannot see it
        assert find_damage(path, contents=False) is None


def test_a_sweep_trial_that_fails_inside_its_worker_is_one_line(local_ray, vqa_data, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("\n".join([f"word{i} " + " ".join(["0.1"] * 8) for i in range(30)]
                               + ["ball 0.1 0.2", ""]))
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [0.01, 0.1]}\n")
    overrides = [f"data.{k}={v}" for k, v in vqa_data.items()] + TINY + [
        "epochs=1", f"data.glove={glove}", f"storage_path={tmp_path / 'runs'}", "name=sweep"]
    done = run_cli(["tune", "--space", str(space), "--samples", "1", *overrides])
    assert done.returncode == 2, done.stderr[-3000:]
    # Tune's own lines stay (its trial tables on stdout; "Trial task failed for trial …" and
    # "Trials did not complete" on stderr), its traceback goes: it is in the trial's error.txt.
    errors = [line for line in done.stderr.splitlines() if line.startswith("ray-updown tune: ")]
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert errors == [f"ray-updown tune: error: {glove}: line 31: has 2 values, expected dim = 8"]


# -- without Ray: fit's checks before the workers start, a LocalSession's restore ---------

def _run_with_checkpoints(run: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = run / f"checkpoint_00000{i}"
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(os.urandom(64))
        write_manifest(str(path))
        paths.append(path)
    return paths


class _Trainer:
    fitted = False

    def fit(self):
        self.fitted = True
        return "result"


def test_a_damaged_latest_checkpoint_is_one_warning_line(tmp_path, monkeypatch, capsys):
    from ray_updown import cli

    before, latest = _run_with_checkpoints(tmp_path / "run", 2)
    (latest / "model.safetensors").write_bytes(b"cut")
    trainer = _Trainer()

    def train(cfg):
        from ray_updown.train.trainer import fit

        assert fit(trainer, str(tmp_path / "run")) == "result"

    monkeypatch.setattr("ray_updown.vqa.train.train_vqa", train)
    monkeypatch.setattr("ray_updown.cli_handlers.print_summary", lambda summary: None)
    assert cli.main(["train-vqa"]) == 0 and trainer.fitted
    assert capsys.readouterr().err == (
        f"ray-updown train-vqa: warning: {latest}/model.safetensors: truncated: 3 of its 64 "
        f"bytes; the checkpoint is damaged; resuming from the checkpoint before it, {before}\n")


def test_a_run_with_no_intact_checkpoint_fails_before_its_workers_start(tmp_path):
    from ray_updown.train.trainer import fit

    [only] = _run_with_checkpoints(tmp_path / "run", 1)
    (only / "model.safetensors").write_bytes(b"")
    trainer = _Trainer()
    with pytest.raises(CheckpointError, match="truncated: 0 of its 64 bytes; the checkpoint is "
                                              "damaged, and no earlier checkpoint"):
        fit(trainer, str(tmp_path / "run"))
    assert not trainer.fitted and only.is_dir()


def test_a_local_session_resumes_from_its_newest_intact_checkpoint(tmp_path, caplog):
    from ray_updown.train.session import LocalSession

    session = LocalSession(str(tmp_path))
    for epoch in (1, 2):
        session.report({"epoch": epoch}, lambda d, e=epoch: Path(d, "state.txt").write_text(str(e)))
    first, second = (path for _, path in session.reports)
    Path(second, "state.txt").write_text("")
    with session.restore() as path:
        assert path == first
    assert f"{second}/state.txt: truncated: 0 of its 1 bytes" in caplog.text
    Path(first, "state.txt").unlink()
    with pytest.raises(CheckpointError, match=f"{second}/state.txt: truncated: .* no earlier"):
        with session.restore():
            pass


def test_a_ray_run_resumes_from_a_complete_checkpoint_ray_never_registered(tmp_path, caplog):
    """A worker persisted checkpoint 3 and its node died before Ray took in the report: Ray
    hands over checkpoint 2 (or nothing); the run resumes from 3. A newer one whose upload
    never finished (no manifest, or a file short) is passed over without a warning."""
    import pyarrow.fs
    import ray.train

    from ray_updown.train.session import _newest_intact, _run_checkpoints

    folder = tmp_path / "run"
    written = {}
    for epoch in (1, 2, 3, 4, 5):
        path = folder / f"checkpoint_2026-12-01_00-00-0{epoch}.000000"
        path.mkdir(parents=True)
        (path / "state.txt").write_text(str(epoch))
        write_manifest(str(path))
        written[epoch] = path
    (written[5] / "manifest.json").unlink()  # upload cut before its manifest
    (written[4] / "state.txt").write_text("")  # upload cut mid-file
    fs = pyarrow.fs.LocalFileSystem()

    def restored(registered):
        checkpoint = ray.train.Checkpoint(str(written[registered]), filesystem=fs) \
            if registered else None
        with _newest_intact(_run_checkpoints(checkpoint, fs, str(folder))) as path:
            return Path(path, "state.txt").read_text()

    assert restored(2) == "3" and restored(None) == "3"
    assert restored(4) == "3"  # a registered one that is damaged falls back, with a warning
    assert "truncated" in caplog.text and caplog.text.count("truncated") == 1
