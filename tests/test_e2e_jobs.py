"""End to end on a real Ray cluster: the commands of cluster/README.md's Path 1, as written
there, run against `ray start --head` with its job API on loopback and the moto S3 bucket.

The steps are read from the README itself (its ```bash blocks): the world, the converted
published detector, extraction, the captioner (XE, then SCST from the XE checkpoint), the VQA
sweep and ensemble, `ray job logs`, and both leaderboard files. A short, visible table turns the
README's cluster into this machine's: the bucket, a tiny published detector file, sizes that fit
2 CPUs (`--actors 8 --gpus-per-actor 1` -> one CPU actor, 30 members -> 2). Every entry must
still match the README, and every command of Path 1 is either run or named as cloud set-up that
this machine cannot do (`ray up`, `ray dashboard`, `aws s3 cp`, ...), so a step added to the
README or changed there fails here until it runs.

The test process never connects to the cluster; it only runs the `ray` CLI in subprocesses, as
a user on a laptop would against a cloud head node. The S3 credentials travel only in the jobs'
runtime environment (the head has the endpoint but no keys), so the checks also prove that the
runtime env reaches every worker (Ray Data actors, Ray Train workers, Tune trials) and that the
jobs do not print the secret.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shlex
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
import yaml
from test_detector_checkpoint import small_published

from ray_updown import storage
from ray_updown.captioning.predict import load_captioner
from ray_updown.detector import load_detector
from ray_updown.features.reader import FeatureStore
from ray_updown.vqa.ensemble import load_vqa_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the project's virtualenv: `ray` and `python` live here
HEAD_START_TIMEOUT_S = 120  # a hang guard, not a performance check
JOB_TIMEOUT_S = 300
NUM_IMAGES = 16
README = REPO / "cluster" / "README.md"


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


# ------------------------------------------------------------------ the README's commands
# README text -> this machine's. Each must match the README (so an edit there shows up here);
# {bucket}, {published}, ... are filled in by the test.
REHEARSAL = [
    ("s3://my-bucket", "{bucket}"),
    ("--images 2000", "--images 16 image_size=80 write_threads=4"),
    ("faster_rcnn_from_caffe_attr.pkl", "{published}"),
    ("cluster/runtime_env.yaml", "{runtime_env}"),
    ("--config cluster/examples/captioner.yaml", "--config {bucket}/examples/captioner.yaml"),
    ("--config cluster/examples/vqa.yaml", "--config {bucket}/examples/vqa.yaml"),
    # GPUs and cluster sizes -> 2 CPUs
    ("--actors 8 --gpus-per-actor 1 half=true",
     "--actors 1 --gpus-per-actor 0 rows_per_shard=6 batch_size=4 read_threads=4 min_side=64 "
     "max_side=107"),
    ("--workers 8 use_gpu=true",
     "--workers 1 epochs=1 batch_size=4 data.vocab_min_count=1 data.val_images=2 "
     "model.embed_dim=16 model.hidden_dim=32 model.att_dim=16"),
    ("--samples 64", "--samples 2 --cpus-per-trial 1"),
    ("--gpus-per-trial 0.25 storage_path",
     "--gpus-per-trial 0 epochs=1 batch_size=16 data.answer_min_count=1 data.max_boxes=10 "
     "data.glove={bucket}/coco/glove/glove.synthetic.300d.txt storage_path"),
    ("--members 30", "--members 2"),
    ("--gpus-per-trial 0.25 name=vqa-ensemble", "--gpus-per-trial 0 name=vqa-ensemble"),
    # the synthetic world has no test2014/test2015 images: its val split stands in
    ("v2_OpenEnded_mscoco_test-dev2015_questions.json", "v2_OpenEnded_mscoco_val2014_questions.json"),
    ("features/updown-test2015/", "features/updown/"),
    ("features/updown-test2014/", "features/updown/"),
]
RUN = ("ray job submit ", "ray job logs ", "ray-updown ")
CLOUD_SET_UP = ("pip install ", "ray get-auth-token ", "ray up ", "ray dashboard ",
                "export RAY_ADDRESS=", "aws s3 ", "ray down ")


def readme_commands(section: str = "## Path 1") -> list[str]:
    """The commands of one section of cluster/README.md, continuation lines joined, comments
    dropped."""
    text = README.read_text().split(section, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def rehearse(command: str, values: dict[str, str]) -> str:
    for before, after in REHEARSAL:
        command = command.replace(before, after.format(**values))
    return command


def _printed_summary(text: str) -> dict:
    """The JSON summary a job prints last (cli_handlers.print_summary: indented, starts with '{')."""
    lines = text.splitlines()
    end = max(i for i, line in enumerate(lines) if line == "}")
    start = max(i for i, line in enumerate(lines[:end]) if line == "{")
    return json.loads("\n".join(lines[start:end + 1]))


@dataclass
class Walk:
    """Runs the README's commands in order, as the user's laptop would."""

    head: Head
    laptop_env: dict[str, str]  # the client: the cluster's token; S3 keys for `ray-updown` only
    secret: str

    def run(self, command: str) -> str:
        args = shlex.split(command)
        env = dict(self.laptop_env)
        if args[0] == "ray-updown":
            args[0] = str(BIN / "ray-updown")
        else:
            args[0] = str(BIN / "ray")
            env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        started = time.monotonic()
        try:
            done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # a hang guard: the head stops in teardown
            pytest.fail(f"still running after {JOB_TIMEOUT_S} s: {command}")
        output = done.stdout + done.stderr
        print(f"{time.monotonic() - started:6.1f} s  {command[:100]}")
        assert done.returncode == 0, f"{command}\nexit {done.returncode}:\n{output[-8000:]}"
        assert self.secret not in output, f"the S3 secret was printed by: {command}"
        if args[1:3] == ["job", "submit"]:
            assert "succeeded" in done.stdout, output[-8000:]
            if "jobs/world.py" not in args:  # every job but the world's uses Ray: the head's
                assert "Connecting to existing Ray cluster" in output
        return done.stdout


def _write_inputs(tmp_path: Path, bucket: str, server: str, secret: str) -> dict[str, str]:
    """The files the README's user brings: the published weights, the runtime env with the
    cluster's S3 (here: keys for moto), the example configs pointing at the bucket."""
    published = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    weights = small_published("py-bottom-up-attention")
    published.write_bytes(pickle.dumps(
        {"model": {k: v.numpy() for k, v in weights.items()}}, protocol=2))
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(AWS_ENDPOINT_URL=server, AWS_ACCESS_KEY_ID="testing",
                                   AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
                                   WANDB_MODE="disabled")
    runtime_env["working_dir"] = str(REPO)
    env_file = tmp_path / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    for name in ("captioner.yaml", "vqa.yaml"):
        text = (REPO / "cluster" / "examples" / name).read_text()
        storage.write_text(f"{bucket}/examples/{name}", text.replace("s3://my-bucket", bucket))
    return {"bucket": bucket, "published": str(published), "runtime_env": str(env_file)}


def test_the_cluster_readme_path_runs_on_a_real_head(ray_head, s3_bucket, s3_server, tmp_path):
    commands = readme_commands()
    text = "\n".join(commands)
    for before, _ in REHEARSAL:
        assert before in text, f"cluster/README.md no longer has {before!r}: update REHEARSAL"
    unknown = [c for c in commands if not c.startswith(RUN + CLOUD_SET_UP)]
    assert not unknown, f"steps this test neither runs nor names as cloud set-up: {unknown}"

    secret = f"e2e-secret-{uuid.uuid4().hex}"  # no other output contains it by chance
    values = _write_inputs(tmp_path, s3_bucket, s3_server, secret)
    laptop = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_JOB"))}
    laptop |= ray_head.cli_env | {"RAY_ADDRESS": ray_head.dashboard}  # the README's export
    walk = Walk(ray_head, laptop, secret)
    printed: dict[str, dict] = {}
    job_ids: dict[str, str] = {}
    for command in commands:
        if not command.startswith(RUN):
            continue
        command = rehearse(command, values)
        for step, summary in printed.items():  # <checkpoint>: what that step printed last
            command = command.replace(f"{s3_bucket}/runs/{step}/<checkpoint>", summary.get(
                "checkpoint", ""))
        if "<submission-id>" in command:
            command = command.replace("<submission-id>", job_ids["extract"])
        out = walk.run(command)
        script = next((a for a in shlex.split(command) if a.startswith("jobs/")), "")
        if script:
            step = Path(script).stem
            step = {"train_captioner": "xe" if "--objective xe" in command else "scst"}.get(step, step)
            job_ids[step] = re.search(r"Job '(\S+)' submitted successfully", out).group(1)
            printed[step] = _printed_summary(out)
        elif command.startswith("ray job logs"):
            printed["logs"] = _printed_summary(out)
        else:  # ray-updown convert-detector / predict
            printed["ray-updown " + shlex.split(command)[1]] = _printed_summary(out)

    assert [s for s in printed if not s.startswith("ray-updown")] == [
        "world", "extract", "logs", "xe", "scst", "tune_vqa", "ensemble_vqa"]
    bucket = s3_bucket
    # Extraction with the converted published weights, read back from S3.
    detector = load_detector(f"{bucket}/weights/updown/")
    assert detector.config.extra["converted_from"] == "py-bottom-up-attention"
    summary = printed["extract"]
    assert (summary["inputs"], summary["features"], summary["errors"]) == (NUM_IMAGES, NUM_IMAGES, 0)
    assert printed["logs"] == summary  # `ray job logs --follow <submission-id>`
    store = FeatureStore(f"{bucket}/features/updown/")
    assert len(store.image_ids) == NUM_IMAGES
    assert store.metadata["checkpoint_hash"] == detector.checkpoint_hash
    record = store.get(store.image_ids[0])
    assert (record.image_w, record.image_h) == (80, 80)
    assert record.features.shape == (record.num_boxes, store.feature_dim) and record.num_boxes >= 10
    # The captioner: SCST started from the XE checkpoint and kept its vocabulary.
    xe, scst = printed["xe"]["checkpoint"], printed["scst"]["checkpoint"]
    assert xe.startswith(f"{bucket}/runs/xe/") and scst.startswith(f"{bucket}/runs/scst/")
    assert load_captioner(scst).config["objective"] == "scst"
    assert load_captioner(scst).vocab.itos == load_captioner(xe).vocab.itos
    # The sweep's best config trained the ensemble; its members are VQA checkpoints.
    manifest = storage.read_json(f"{bucket}/runs/vqa-ensemble/ensemble.json")
    assert len(manifest["members"]) == 2
    member = load_vqa_checkpoint(manifest["members"][0]["checkpoint"], device="cpu")
    assert member.model.config.feat_dim == store.feature_dim
    assert member.train_config.data.features == f"{bucket}/features/updown/"
    # The leaderboard files, in the server formats.
    files = storage.list_files(f"{bucket}/leaderboard/")
    vqa = next(f for f in files if "vqa_OpenEnded_mscoco_test-dev2015_updown_results" in f)
    answers = storage.read_json(vqa)
    assert answers and set(answers[0]) == {"question_id", "answer"}
    captions = storage.read_json(next(f for f in files if f.endswith("_results.json")
                                      and "captions_test2014" in f))
    assert {c["image_id"] for c in captions} == set(store.image_ids)
