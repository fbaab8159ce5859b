"""End to end on a real Ray cluster: `ray start --head` with its job API on loopback,
`ray job submit` of the extraction and VQA training jobs, outputs checked in the moto S3 bucket.

This is the cluster path of docs/cluster.md: the test process never connects to the cluster; it
only runs the `ray` CLI in subprocesses, as a user on a laptop would against a cloud head node.
The S3 credentials travel only in the jobs' runtime environment (the head has the endpoint but
no keys), so the checks also prove that the runtime env reaches every worker (Ray Data actors,
Ray Train workers) and that the jobs do not print the secret.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ray_updown import storage
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.detector import BottomUpDetector, save_detector, tiny_config
from ray_updown.features.reader import FeatureStore
from ray_updown.vqa.ensemble import load_vqa_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's virtualenv: `ray` and `python` live here
HEAD_START_TIMEOUT_S = 120  # a hang guard, not a performance check
JOB_TIMEOUT_S = 300
NUM_IMAGES = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:<port>: the job submission address
    cli_env: dict[str, str]  # environment for `ray job ...` (the cluster's auth token)
    log: Path


def _head_processes(marker: str) -> list[int]:
    """Pids of the processes of our head: every one inherits the marker in its environment.

    Ray's workers call setsid and rename themselves (`ray::IDLE`), so neither the process group
    nor the command line finds them all; the environment does, and only ours carry the marker.
    """
    needle = f"RAY_UPDOWN_E2E_HEAD={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _stop_head(proc: subprocess.Popen, marker: str) -> None:
    """Stop only this test's head, never `ray stop` (it stops every Ray on the machine,
    including the session's `ray_cluster` fixture and other users' clusters).

    `ray start --block` handles SIGTERM by terminating the processes it started (GCS, raylet,
    dashboard, ...), and the raylet takes its workers with it. Anything left after that, e.g.
    a job driver, is found by the environment marker and killed.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while _head_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _head_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_job_api(head: Head, proc: subprocess.Popen, token: str) -> None:
    """Poll the dashboard's job API until it answers (the head takes seconds to come up)."""
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{head.log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"the job API did not come up in {HEAD_START_TIMEOUT_S} s:\n"
                f"{head.log.read_text()[-4000:]}")


@pytest.fixture()
def ray_head(s3_server):
    """A Ray head on loopback with the dashboard (the job API), in a temp dir of its own."""
    # Its own --temp-dir: Ray records the cluster's address there, not in /tmp/ray, so no
    # other process's `ray.init()` can attach to this head by accident. A short path: Ray's
    # unix sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rue2e-", dir="/tmp"))
    marker, token = uuid.uuid4().hex, uuid.uuid4().hex
    dashboard_port = _free_port()
    # The cluster's own auth token (Ray 2.60 enables token auth): independent of ~/.ray.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # Every port explicit: other Ray clusters on this machine hold the defaults.
    ports = {flag: _free_port() for flag in (
        "--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
        "--object-manager-port", "--ray-client-server-port")}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_JOB", "AWS_ACCESS_KEY", "AWS_SECRET"))}
    env.update(auth, RAY_UPDOWN_E2E_HEAD=marker, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` of a job = the venv's
               AWS_ENDPOINT_URL=s3_server,  # like a cluster's node config; no keys
               # Actors that look their cluster up without an address (Ray Train's
               # PlacementGroupCleaner) would otherwise find every Ray on this machine.
               RAY_ADDRESS=f"127.0.0.1:{ports['--port']}")
    # The dashboard (the job API) listens on loopback only. Ray itself replaces a loopback
    # node IP with the machine's address, so the GCS and raylet use that.
    cmd = [str(BIN / "ray"), "start", "--head", "--block",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"{flag}={port}" for flag, port in ports.items())]
    log = temp_dir.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    cli_env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "AWS_"))} | auth
    head = Head(f"http://127.0.0.1:{dashboard_port}", cli_env, log)
    try:
        _wait_for_job_api(head, proc, token)
        yield head
    finally:
        _stop_head(proc, marker)
        survivors = _head_processes(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
        assert not survivors, f"processes {survivors} of the test's Ray head survived it"


def _submit(head: Head, job_id: str, runtime_env: dict, entrypoint: list[str]) -> tuple[str, str]:
    """`ray job submit` and wait for the job. Returns (the CLI's output, the job's logs as the
    cluster kept them)."""
    ray = str(BIN / "ray")

    def job_logs() -> str:
        return subprocess.run([ray, "job", "logs", "--address", head.dashboard, job_id],
                              env=head.cli_env, capture_output=True, text=True, timeout=60).stdout

    try:
        submit = subprocess.run(
            [ray, "job", "submit", "--address", head.dashboard, "--submission-id", job_id,
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
             "--", *entrypoint],
            env=head.cli_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # a hang guard: the head (and the job) stop in teardown
        pytest.fail(f"job {job_id} still running after {JOB_TIMEOUT_S} s:\n{job_logs()[-6000:]}")
    logs = job_logs()
    assert submit.returncode == 0 and "succeeded" in submit.stdout, (
        f"job {job_id} failed (exit {submit.returncode}):\n{submit.stdout[-6000:]}\n"
        f"{submit.stderr[-3000:]}\n{logs[-6000:]}")
    return submit.stdout + submit.stderr, logs


def _printed_summary(logs: str) -> dict:
    """The JSON summary a job prints last (cli_handlers.print_summary: indented, starts with '{')."""
    lines = logs.splitlines()
    end = max(i for i, line in enumerate(lines) if line == "}")
    start = max(i for i, line in enumerate(lines[:end]) if line == "{")
    return json.loads("\n".join(lines[start:end + 1]))


def test_extract_and_train_vqa_jobs_on_a_real_head(ray_head, s3_bucket, s3_server):
    # Inputs in the bucket: the synthetic world and a tiny detector checkpoint.
    world, detector_uri = f"{s3_bucket}/world", f"{s3_bucket}/detector"
    build_world(WorldConfig(num_images=NUM_IMAGES, image_size=80, write_threads=4), world)
    torch.manual_seed(0)
    detector = BottomUpDetector(tiny_config()).eval()
    save_detector(detector, detector_uri)

    # A secret no other output could contain by chance (moto accepts any keys).
    secret = f"e2e-secret-{uuid.uuid4().hex}"
    runtime_env = {
        "excludes": [".venv", ".git", "runs", "world", "__pycache__", ".pytest_cache",
                     "*.egg-info"],
        "env_vars": {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                     "WANDB_MODE": "disabled"}}

    features = f"{s3_bucket}/features"
    output, logs = _submit(ray_head, "e2e-extract", runtime_env, [
        "python", "jobs/extract.py", "--images", f"{world}/images/", "--out", f"{features}/",
        "--checkpoint", f"{detector_uri}/", "--actors", "1",
        "rows_per_shard=6", "batch_size=4", "read_threads=4",
        "min_side=64", "max_side=107"])
    assert secret not in logs and secret not in output
    assert "Connecting to existing Ray cluster" in logs  # the head's workers, no embedded Ray
    summary = _printed_summary(logs)
    assert (summary["inputs"], summary["features"], summary["errors"]) == (NUM_IMAGES, NUM_IMAGES, 0)
    assert summary["shards"] == 3 and summary["store"] == features
    # The store in S3, read back here: one row per image, the detector that made it.
    store = FeatureStore(features)
    assert sorted(store.image_ids) == list(range(1, NUM_IMAGES + 1))
    assert store.metadata["detector"] == "bua-tiny-r10-w8"
    assert store.metadata["checkpoint_hash"] == detector.checkpoint_hash
    record = store.get(1)
    assert (record.image_w, record.image_h) == (80, 80)
    assert 2 <= record.num_boxes <= 10 and record.features.shape == (record.num_boxes, store.feature_dim)
    assert storage.read_json(f"{features}/extract_summary.json")["features"] == NUM_IMAGES

    # A short VQA training run on those features, its checkpoints in S3.
    vqa = f"{world}/vqa"
    runs = f"{s3_bucket}/runs"
    output, logs = _submit(ray_head, "e2e-train-vqa", runtime_env, [
        "python", "jobs/train_vqa.py", "--storage-path", runs, "--name", "vqa-e2e",
        f"data.train_questions={vqa}/v2_OpenEnded_mscoco_train2014_questions.json",
        f"data.train_annotations={vqa}/v2_mscoco_train2014_annotations.json",
        f"data.val_questions={vqa}/v2_OpenEnded_mscoco_val2014_questions.json",
        f"data.val_annotations={vqa}/v2_mscoco_val2014_annotations.json",
        f"data.features={features}", f"data.glove={world}/glove/glove.synthetic.300d.txt",
        "data.answer_min_count=1", "data.max_boxes=10", "model.hidden=32", "epochs=2",
        "batch_size=64", "optimizer=adamax"])
    assert secret not in logs and secret not in output
    assert "Connecting to existing Ray cluster" in logs
    summary = _printed_summary(logs)
    assert summary["metrics"]["epoch"] == 2 and summary["path"] == f"{runs}/vqa-e2e"
    checkpoint = summary["latest_checkpoint"]
    assert checkpoint.startswith(f"{runs}/vqa-e2e/")
    assert storage.exists(f"{checkpoint}/model.safetensors")
    trained = load_vqa_checkpoint(checkpoint, device="cpu")
    assert trained.train_config.data.features == features and trained.train_config.epochs == 2
    assert len(trained.vocabs.answers) > 2 and trained.model.config.feat_dim == store.feature_dim
