"""The dry run of benchmarks/gpu_check.py: every GPU check (extraction and training) at CPU
sizes, so that the script a lent GPU runs cannot rot; and its actor section where Ray is not
installed, as on the GPU machine.

This folder runs in its own pytest process (`make bench-tests`), beside the main suite in
`make test`, on the session's local Ray cluster of tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run_covers_every_section(ray_cluster, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    report = gpu_check.main(["--out", str(tmp_path), "--dry"])
    assert os.path.exists(tmp_path / "gpu_check.json")
    for name in ("detector", "compile", "actor", "ray", "vqa_steps", "vqa_profile", "vqa_epoch",
                 "vqa_loop", "ensemble", "captioner"):
        assert "error" not in report[name], report[name]
    steps = report["vqa_steps"]["samples_per_s"]
    assert steps["projection_parameters"] == 24_851_177 and steps["paper_bf16"] > 0
    assert steps["paper_unpacked_fp32"] > 0 and steps["paper_unpacked_over_packed_bf16"] > 0
    profiled = report["vqa_profile"]["projection_bf16"]
    assert profiled["wall_ms"] > 0 and profiled["costliest_on"] == "cpu" and profiled["costliest_ms"]
    assert report["vqa_epoch"]["bf16"]["precision"] == "bf16"
    assert report["vqa_loop"]["ray_train"]["samples_per_s"] > 0  # Ray Train ran the loop
    for precision in ("fp32", "bf16"):
        shared = report["ensemble"][precision]
        assert shared["trials"] == 2 and shared["summed_samples_per_s"] > 0
        assert shared["precision"] == precision
    assert report["captioner"]["scst_bf16_images_per_s"] > 0
    assert report["ray_version"] != "not installed"
    assert report["actor"]["images"] == 12 and report["actor"]["errors"] == 0
    assert report["ray"]["1_actors_1_gpu_each"]["images"] == 16
    assert report["ray"]["2_actors_0.5_gpu_each"]["errors"] == 0
    compiled = report["compile"]["default"]
    assert compiled["same_regions_share"] == 1.0 and compiled["max_feature_abs_diff"] < 1e-3
    assert report["fidelity"] == {"skipped": "give --checkpoint and --images"}


NO_RAY = """
import json, sys, tempfile
sys.modules["ray"] = None  # import ray fails, as on the GPU machine
sys.path.insert(0, "benchmarks")
import gpu_check
with tempfile.TemporaryDirectory() as root:
    print(json.dumps([gpu_check.through_ray(root, True, "cpu"),
                      gpu_check.actor_without_ray(root, True, "cpu")]))
"""


def test_gpu_check_runs_the_actor_where_ray_is_not_installed():
    done = subprocess.run([sys.executable, "-c", NO_RAY], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    skipped, actor = json.loads(done.stdout.strip().splitlines()[-1])
    assert skipped == {"skipped": "Ray is not importable here"}
    assert actor["images"] == 12 and actor["errors"] == 0
