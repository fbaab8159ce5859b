"""Every training job's main failure paths, run through the CLI as a user runs them.

Each bad input must end the job with exit status 2 and exactly one line, the package's,
naming the file (or config key) and the problem: no traceback, no Ray log. The checks run on
the driver before Ray starts, so these tests need no cluster. Worker-side failures come back
through `fit` as the package's error; that path is tested without Ray (a fake trainer).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_updown import storage
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.errors import DataError
from ray_updown.features.records import FeatureRecord
from ray_updown.features.schema import StoreMeta
from ray_updown.features.writer import feature_shard_uri, write_feature_shard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16-image synthetic world (every dataset format) and a feature store of its images."""
    root = str(tmp_path_factory.mktemp("failures") / "world")
    build_world(WorldConfig(num_images=16, image_size=80, seed=3), root)
    karpathy = storage.read_json(f"{root}/annotations/dataset_coco.json")
    rng = np.random.default_rng(0)
    records = [FeatureRecord(im["cocoid"], 80, 80, np.array([[0, 0, 10, 10], [5, 5, 40, 40]],
                                                            np.float32),
                             rng.normal(size=(2, 8)).astype(np.float32))
               for im in karpathy["images"]]
    write_feature_shard(records, feature_shard_uri(f"{root}/features", 0), StoreMeta(feature_dim=8))
    return root


def run_job(job: str, *args: str, cwd: Path) -> tuple[int, list[str]]:
    """(exit status, non-empty lines of stdout + stderr) of `python jobs/<job>.py args`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["WANDB_MODE"] = "disabled"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode, lines


def assert_one_line(code: int, lines: list[str], command: str, *named: str) -> str:
    assert code == 2, lines
    assert len(lines) == 1, "\n".join(lines)
    line = lines[0]
    assert line.startswith(f"ray-updown {command}: error: ") and "Traceback" not in line
    for text in named:
        assert text in line, line
    return line


def copy_with(src: str, dst: Path, edit) -> str:
    """`src` rewritten by `edit(text) -> text` at `dst`; returns dst as a string."""
    dst.write_text(edit(Path(src).read_text()))
    return str(dst)


def truncated(text: str) -> str:
    return text[:len(text) // 2]


# -- train-vqa (and the ensemble and sweep, which share its checks) -----------------------

def vqa_args(world: str, tmp_path: Path, **files: str) -> list[str]:
    paths = {"train_questions": f"{world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
             "train_annotations": f"{world}/vqa/v2_mscoco_train2014_annotations.json",
             "features": f"{world}/features", **files}
    return [f"data.{k}={v}" for k, v in paths.items()] + [
        "data.answer_min_count=1", f"storage_path={tmp_path / 'runs'}", "name=bad", "epochs=1"]


def test_vqa_missing_questions_file(world, tmp_path):
    missing = str(tmp_path / "nope_questions.json")
    code, lines = run_job("train_vqa", *vqa_args(world, tmp_path, train_questions=missing),
                          cwd=tmp_path)
    assert_one_line(code, lines, "train-vqa", missing, "no such file")
    assert not (tmp_path / "runs").exists()  # a run that fails its checks leaves no folder


def test_vqa_truncated_questions_file(world, tmp_path):
    bad = copy_with(f"{world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                    tmp_path / "questions.json", truncated)
    code, lines = run_job("train_vqa", *vqa_args(world, tmp_path, train_questions=bad),
                          cwd=tmp_path)
    line = assert_one_line(code, lines, "train-vqa", bad, "truncated JSON", "line 1 column")
    assert " at at " not in line
    assert not (tmp_path / "runs").exists()


def test_vqa_annotations_with_other_question_ids(world, tmp_path):
    def shift_ids(text: str) -> str:
        obj = json.loads(text)
        for a in obj["annotations"]:
            a["question_id"] += 7_000_000
        return json.dumps(obj)

    bad = copy_with(f"{world}/vqa/v2_mscoco_train2014_annotations.json",
                    tmp_path / "annotations.json", shift_ids)
    code, lines = run_job("train_vqa", *vqa_args(world, tmp_path, train_annotations=bad),
                          cwd=tmp_path)
    line = assert_one_line(code, lines, "train-vqa", bad, "annotations[0] (question_id 7",
                           "not in the questions file")
    qid = line.split("(question_id ", 1)[1].split(")", 1)[0]
    assert line.count(qid) == 1  # the id is named once


def test_vqa_image_without_features(world, tmp_path):
    def move_first_image(key: str):
        def edit(text: str) -> str:
            obj = json.loads(text)
            obj[key][0]["image_id"] = 999
            return json.dumps(obj)
        return edit

    questions = copy_with(f"{world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                          tmp_path / "questions.json", move_first_image("questions"))
    annotations = copy_with(f"{world}/vqa/v2_mscoco_train2014_annotations.json",
                            tmp_path / "annotations.json", move_first_image("annotations"))
    code, lines = run_job("train_vqa", *vqa_args(world, tmp_path, train_questions=questions,
                                                 train_annotations=annotations), cwd=tmp_path)
    assert_one_line(code, lines, "train-vqa", questions, "image_id 999", f"{world}/features")


def test_vqa_glove_of_another_dimension(world, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("the 0.1 0.2 0.3\nball 0.1 0.2 0.3\n")
    code, lines = run_job("train_vqa", *vqa_args(world, tmp_path), f"data.glove={glove}",
                          cwd=tmp_path)
    assert_one_line(code, lines, "train-vqa", str(glove), "expected dim = 300")


@pytest.mark.parametrize("override,named", [("optimizer=sgd", "optimizer"),
                                            ("data.no_such_key=1", "no_such_key"),
                                            ("data.features=", "data.features")])
def test_vqa_bad_config(world, tmp_path, override, named):
    code, lines = run_job("train_vqa", *vqa_args(world, tmp_path), override, cwd=tmp_path)
    assert_one_line(code, lines, "train-vqa", named)


def test_an_unknown_flag_is_one_line(tmp_path):
    code, lines = run_job("train_vqa", "--no-such-flag", cwd=tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("ray-updown") and "--no-such-flag" in lines[0]


def test_vqa_missing_config_file(tmp_path):
    missing = str(tmp_path / "vqa.yaml")
    code, lines = run_job("train_vqa", "--config", missing, cwd=tmp_path)
    assert_one_line(code, lines, "train-vqa", missing)


def test_ensemble_checks_the_data_before_ray_starts(world, tmp_path):
    bad = copy_with(f"{world}/vqa/v2_OpenEnded_mscoco_train2014_questions.json",
                    tmp_path / "questions.json", truncated)
    code, lines = run_job("ensemble_vqa", "--members", "2",
                          *vqa_args(world, tmp_path, train_questions=bad), cwd=tmp_path)
    assert_one_line(code, lines, "ensemble", bad, "truncated JSON")
    assert not (tmp_path / "runs").exists()


def test_sweep_checks_the_data_before_ray_starts(world, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [0.001, 0.1]}\n")
    missing = str(tmp_path / "annotations.json")
    code, lines = run_job("tune_vqa", "--space", str(space), "--samples", "2",
                          *vqa_args(world, tmp_path, train_annotations=missing), cwd=tmp_path)
    assert_one_line(code, lines, "tune", missing, "no such file")


# -- train-captioner ---------------------------------------------------------------------

def captioner_args(world: str, tmp_path: Path, karpathy: str | None = None,
                   features: str | None = None) -> list[str]:
    return ["--storage-path", str(tmp_path / "runs"), "--name", "bad",
            f"data.karpathy={karpathy or world + '/annotations/dataset_coco.json'}",
            f"data.features={features or world + '/features'}", "data.vocab_min_count=1",
            "epochs=1"]


def test_captioner_truncated_karpathy_file(world, tmp_path):
    bad = copy_with(f"{world}/annotations/dataset_coco.json", tmp_path / "dataset_coco.json",
                    truncated)
    code, lines = run_job("train_captioner", *captioner_args(world, tmp_path, karpathy=bad),
                          cwd=tmp_path)
    assert_one_line(code, lines, "train-captioner", bad, "truncated JSON")
    assert not (tmp_path / "runs").exists()


def test_captioner_missing_feature_store(world, tmp_path):
    missing = str(tmp_path / "no_features")
    code, lines = run_job("train_captioner", *captioner_args(world, tmp_path, features=missing),
                          cwd=tmp_path)
    assert_one_line(code, lines, "train-captioner", missing)


# -- train-detector ----------------------------------------------------------------------

def detector_args(world: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["--root", world, "--storage-path", str(tmp_path / "runs"), "--name", "bad",
            "epochs=1", *extra]


def test_detector_missing_image_file(world, tmp_path):
    images = storage.read_json(f"{world}/visual_genome/image_data.json")
    image_data = tmp_path / "image_data.json"
    images[0]["url"] = "images/train2014/gone.jpg"
    image_data.write_text(json.dumps(images))
    code, lines = run_job("train_detector", *detector_args(
        world, tmp_path, f"data.image_data={image_data}"), cwd=tmp_path)
    assert_one_line(code, lines, "train-detector", f"{world}/images/train2014/gone.jpg",
                    f"image_id {images[0]['image_id']}", "no such image file")
    assert not (tmp_path / "runs").exists()


def test_detector_truncated_objects_file(world, tmp_path):
    bad = copy_with(f"{world}/visual_genome/objects.json", tmp_path / "objects.json", truncated)
    code, lines = run_job("train_detector", *detector_args(world, tmp_path, f"data.objects={bad}"),
                          cwd=tmp_path)
    assert_one_line(code, lines, "train-detector", bad, "truncated JSON")


# -- unsafe checkpoints ----------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["bua-caffe-frcn-r101_with_attributes.pth", "pytorch_model.bin",
                                  "faster_rcnn_from_caffe_attr.pkl"])
def test_convert_refuses_a_file_that_would_run_code(tmp_path, name):
    marker, path = tmp_path / "pwned", tmp_path / name
    payload = {"model": {"w": np.zeros(2, np.float32), "evil": _RunsCode(str(marker))}}
    if name.endswith(".pkl"):
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    proc = subprocess.run([sys.executable, "-m", "ray_updown.cli", "convert-detector",
                           "--published", str(path), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    line = assert_one_line(proc.returncode, lines, "convert-detector", str(path), "system")
    assert "posix.system" in line or "os.system" in line
    assert "weights_only" not in line.replace(" ", "_").lower()
    assert not marker.exists() and not (tmp_path / "out").exists()


# -- worker-side failures (no cluster: a trainer that fails as Ray Train does) --------------

class _FailingTrainer:
    """Fails like a Ray Train run whose worker raised `error`, after Ray made the run folder."""

    def __init__(self, run_uri: str, error: BaseException):
        self.run_uri, self.error = run_uri, error

    def fit(self):
        from ray.train import WorkerGroupError

        storage.write_text(storage.join(self.run_uri, ".validate_storage_marker"), "")
        raise WorkerGroupError("Training failed due to worker errors", {0: self.error})


def test_a_worker_error_is_the_package_error_and_a_new_run_leaves_no_folder(tmp_path):
    from ray_updown.train.trainer import fit

    run = str(tmp_path / "runs" / "new")
    error = DataError("truncated JSON", file="q.json")
    with pytest.raises(DataError) as err:
        fit(_FailingTrainer(run, error), run)
    assert str(err.value) == "q.json: truncated JSON" and err.value.__cause__ is None
    assert not os.path.exists(run)


def test_a_failed_resume_keeps_its_run_folder(tmp_path):
    from ray_updown.train.trainer import fit

    run = tmp_path / "runs" / "old"
    (run / "checkpoint_000000").mkdir(parents=True)
    with pytest.raises(DataError):
        fit(_FailingTrainer(str(run), DataError("bad", file="x")), str(run))
    assert (run / "checkpoint_000000").is_dir()


def test_tune_and_ray_task_wrappers_are_unwrapped():
    from ray.exceptions import RayTaskError

    from ray_updown.errors import package_error

    inner = DataError("has no annotation", file="a.json", record="question_id 5")
    wrapped = RayTaskError("vqa_trainable", "Traceback ...", inner)
    assert str(package_error(wrapped)) == str(inner)
    outer = RuntimeError("trial failed")  # e.g. TuneError
    outer.__cause__ = wrapped
    assert str(package_error(outer)) == str(inner)
    assert package_error(RuntimeError("out of memory")) is None
    handling = RuntimeError("a bug while handling it")
    handling.__context__ = inner  # not the cause: the bug is the failure to report
    assert package_error(handling) is None


def test_the_cli_prints_a_wrapped_package_error_as_one_line(monkeypatch, capsys):
    from ray.exceptions import RayTaskError

    from ray_updown import cli

    def fails(cfg):
        raise RayTaskError("vqa_trainable", "Traceback ...", DataError("bad", file="q.json"))

    monkeypatch.setattr("ray_updown.vqa.train.train_vqa", fails)
    assert cli.main(["train-vqa"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "ray-updown train-vqa: error: q.json: bad" and not captured.out


def test_any_other_worker_failure_is_one_line_naming_it_and_the_logs(monkeypatch, capsys):
    from ray.train import WorkerGroupError

    from ray_updown import cli

    def fails(cfg):
        raise WorkerGroupError("Training failed due to worker errors\nTraceback ...",
                               {0: RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")})

    monkeypatch.setattr("ray_updown.vqa.train.train_vqa", fails)
    assert cli.main(["train-vqa"]) == 1
    captured = capsys.readouterr()
    assert not captured.out and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("ray-updown train-vqa: error: a Ray worker failed: "
                                   "RuntimeError: CUDA out of memory.; its traceback is in "
                                   "Ray's worker logs"), captured.err


def test_a_bug_on_the_driver_keeps_its_traceback(monkeypatch):
    from ray_updown import cli

    def fails(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("ray_updown.vqa.train.train_vqa", fails)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train-vqa"])
