"""A detector actor that keeps dying: more deaths than max_restarts allows end the run with
the package's one line and the re-run hint (not Ray's traceback), and the re-run completes
with every image accounted for once."""

from __future__ import annotations

import functools

import pytest
from faultkit import assert_accounted, make_detector, run_cli, write_images

from ray_updown.detector import save_detector
from ray_updown.extraction.failures import ExtractionError
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture()
def job(tmp_path, detector):
    write_images(str(tmp_path / "imgs"), 8)
    save_detector(detector, str(tmp_path / "ckpt"))
    (tmp_path / "kills").mkdir()
    return tmp_path


def test_actor_dying_at_start_up_beyond_max_restarts_is_one_line_and_a_rerun_completes(job):
    out = str(job / "store")
    args = ["extract", "--images", str(job / "imgs"), "--out", out, "--checkpoint",
            str(job / "ckpt"), "max_restarts=1", "max_task_retries=1", "rows_per_shard=3",
            "batch_size=2"]
    # Three deaths in the actor's start-up: one restart allowed, so the pipeline gives up.
    done = run_cli(args, factory={"checkpoint": str(job / "ckpt"), "kill_dir": str(job / "kills"),
                                  "kills": 3, "when": "start"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("ray-updown extract: error: " + out)
    assert "detector actor" in errors[0] and "max_restarts=1" in errors[0]
    assert errors[0].endswith("re-run to resume")
    assert len(list((job / "kills").iterdir())) >= 2  # the actors really died

    again = run_cli(args)  # the same command, nothing dies now
    assert again.returncode == 0, again.stderr[-3000:]
    assert_accounted(out, 8)


def test_actor_dying_mid_run_beyond_max_restarts_raises_the_package_error(job):
    out = str(job / "store")
    cfg = ExtractConfig(images=str(job / "imgs"), out=out, rows_per_shard=3, batch_size=2,
                        max_restarts=1, max_task_retries=1)
    # The actor dies in every batch: one restart is allowed, so the second death ends the run.
    dying = functools.partial(make_detector, str(job / "ckpt"), kill_dir=str(job / "kills"),
                              kills=1000)
    with pytest.raises(ExtractionError, match="died more often than its restarts allow.*"
                                              "re-run to resume"):
        run_extraction(cfg, model_factory=dying)
    assert len(list((job / "kills").iterdir())) >= 2

    summary = run_extraction(cfg, model_factory=functools.partial(make_detector, str(job / "ckpt")))
    assert (summary["inputs"], summary["features"], summary["errors"]) == (8, 8, 0)
    assert_accounted(out, 8)
