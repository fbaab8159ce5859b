"""Shared test scaffolding: one local Ray cluster per session and a moto S3 server on loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_ACCEPT_CLUSTER_UNAVAILABLE", "1")
# Ray Data's progress bars are noise in test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Shared VQA feature copies (features/shared.py) go to a folder of this session, not the node's.
os.environ.setdefault("RAY_UPDOWN_FEATURE_CACHE", tempfile.mkdtemp(prefix="ray-updown-test-features-"))
atexit.register(shutil.rmtree, os.environ["RAY_UPDOWN_FEATURE_CACHE"], True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """The one local Ray cluster of the test session (each start costs seconds).

    Started after the S3 server so that its workers inherit the endpoint variables.
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster of our own, never one another process runs.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"WANDB_MODE": "disabled"}})
    yield ray
    # Left running until the interpreter exits: later fixtures may still hold handles.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto) on loopback with dummy credentials.

    The endpoint goes into AWS_ENDPOINT_URL, which s3fs, boto3 and our storage module read,
    and into the Ray cluster's environment when the test session started Ray after this.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:  # put back whatever was set before
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(key, value)
        yield endpoint
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh, empty bucket for one test: returns its s3:// URI."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = name.strip("-") + "-" + os.urandom(3).hex()
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than
    two. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def unwritable_folder(tmp_path):
    """A folder path nothing can be written under, for root too (where a read-only mode does
    not stop writes): a read-only folder, or as root a path below a regular file."""
    if os.geteuid() == 0:
        (tmp_path / "a-file").write_text("not a folder")
        yield str(tmp_path / "a-file" / "out")
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield str(locked)
    locked.chmod(0o700)
