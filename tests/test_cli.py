"""The command line: summaries on success, one line and exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ray_updown import storage
from ray_updown.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "world")
    assert main(["world", "--out", out, "--images", "16", "--seed", "3", "image_size=80"]) == 0
    return out


def test_evaluate_vqa_scores_the_majority_answers(world, tmp_path, capsys):
    annotations = storage.read_json(f"{world}/vqa/v2_mscoco_val2014_annotations.json")["annotations"]
    results = [{"question_id": a["question_id"], "answer": a["multiple_choice_answer"]} for a in annotations]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    capsys.readouterr()
    code = main(["evaluate", "vqa", "--questions", f"{world}/vqa/v2_OpenEnded_mscoco_val2014_questions.json",
                 "--annotations", f"{world}/vqa/v2_mscoco_val2014_annotations.json",
                 "--results", str(results_file)])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"overall", "perAnswerType", "perQuestionType"}
    assert 80.0 < scores["overall"] <= 100.0


def test_bad_input_is_one_line_and_exit_2(world, tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text('[{"question_id": 1, "answer": ')
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "vqa",
                           "--questions", f"{world}/vqa/v2_OpenEnded_mscoco_val2014_questions.json",
                           "--annotations", f"{world}/vqa/v2_mscoco_val2014_annotations.json",
                           "--results", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "results.json" in proc.stderr and "truncated JSON" in proc.stderr


def test_jobs_document_their_flags():
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "world.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--images" in proc.stdout and "--seed" in proc.stdout


@pytest.mark.parametrize("stage,key", [("world", "seed"), ("train-detector", "seed"),
                                       ("extract", "max_boxes"), ("train-captioner", "seed"),
                                       ("train-vqa", "seed"), ("demo", "seed")])
def test_show_config_prints_the_resolved_config_and_runs_nothing(stage, key, tmp_path, capsys,
                                                                 monkeypatch):
    import yaml

    monkeypatch.chdir(tmp_path)  # a stage that ran anyway would write here
    assert main([stage, "--show-config", f"{key}=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown[key] == 7
    assert list(tmp_path.iterdir()) == []


def test_a_bad_override_is_one_line_naming_the_key(capsys):
    assert main(["train-vqa", "--show-config", "optimizer=sgd"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer" in err and "adamax" in err


def test_submit_to_an_address_with_no_job_api_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    done = subprocess.run([sys.executable, "-m", "ray_updown.cli", "submit", "--address",
                           f"http://127.0.0.1:{port}", "--", "echo", "hi"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"ray-updown submit: error: http://127.0.0.1:{port}: "
                                   "no Ray job API answers there (ConnectionError)"), done.stderr
    missing = subprocess.run([sys.executable, "-m", "ray_updown.cli", "submit", "--address",
                              f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert missing.returncode == 2 and "give the job's command after --" in missing.stderr


@pytest.fixture()
def small_store(tmp_path):
    """A one-image store with vocabularies and that image's file, for the writing commands."""
    import numpy as np
    from PIL import Image

    from ray_updown.features.records import FeatureRecord
    from ray_updown.features.schema import StoreMeta
    from ray_updown.features.writer import feature_shard_uri, write_feature_shard

    store = str(tmp_path / "store")
    record = FeatureRecord(5, 64, 48, np.array([[4, 4, 40, 30]], np.float32), np.ones((1, 8), np.float32),
                           object_ids=[1], object_conf=[0.9])
    meta = StoreMeta(feature_dim=8, detector="d", object_vocab=["__background__", "cat"])
    write_feature_shard([record], feature_shard_uri(store, 0), meta)
    Image.new("RGB", (64, 48)).save(tmp_path / "5.png")
    return store, str(tmp_path / "5.png")


@pytest.mark.parametrize("command", ["export", "export-hdf5", "export-tsv", "show", "inspect"])
def test_a_destination_that_cannot_be_written_is_one_line_and_exit_2(command, small_store,
                                                                     unwritable_folder, capsys):
    store, image = small_store
    dest = unwritable_folder
    argv = {"export": ["export", "--store", store, "--format", "self-critical", "--out", dest],
            "export-hdf5": ["export", "--store", store, "--format", "hdf5", "--out", dest],
            "export-tsv": ["export-tsv", "--store", store, "--tsv", f"{dest}/f.tsv"],
            "show": ["show", "--store", store, "--image-id", "5", "--image", image,
                     "--out", f"{dest}/5.png"],
            "inspect": ["inspect", store, "--png", f"{dest}/h.png"]}[command]
    capsys.readouterr()
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "error" in line]  # besides progress bars
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    assert err[0].startswith(f"ray-updown {argv[0]}: error: {dest}") and "cannot write" in err[0]
    assert ".tmp-" not in err[0]
