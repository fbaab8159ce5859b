"""The fault-injection suite's own scaffolding (run it in its own pytest process:
`pytest tests/faults`, as `make faults` and `make test` do).

It never uses the main suite's session cluster (`ray_cluster`): the single-node modules share
a Ray of this process (`local_ray`), and multi-node tests stop it and start their own
`ray.cluster_utils.Cluster` (one process holds one Ray at a time).
All S3 traffic, from the test process and from every Ray worker, goes through a
fault-injecting proxy (flaky_proxy.py) in front of a moto server.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # flaky_proxy, faultkit

from flaky_proxy import FlakyProxy  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_quick_retry_data(folder: str) -> str:
    """`folder` made a botocore data folder (for AWS_DATA_PATH): its `_retry.json` is botocore's
    own with the backoff before a retry cut from rand(0, 1) s * 2^(attempt-1) to 5 ms *
    2^(attempt-1).

    Every client keeps botocore's retry policy: the same errors are retried, as often. Only the
    waits between attempts are shorter, which on a loopback endpoint that answers SlowDown to
    every third request is what a run's time is otherwise spent on."""
    import botocore.loaders

    data = botocore.loaders.Loader().load_data("_retry")
    data["retry"]["__default__"]["delay"]["base"] = 0.005
    with open(os.path.join(folder, "_retry.json"), "w") as f:
        json.dump(data, f)
    return folder


@pytest.fixture(scope="session")
def flaky_s3():
    """A moto S3 server behind a FlakyProxy; AWS_ENDPOINT_URL points at the proxy, and
    AWS_DATA_PATH at botocore's retry policy with short backoffs (_write_quick_retry_data).

    Started before any Ray of this session, so that every worker, and every CLI the tests
    start, inherits both."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    moto.start()
    proxy = FlakyProxy(f"http://127.0.0.1:{port}").start()
    with tempfile.TemporaryDirectory(prefix="ray-updown-faults-botocore-") as data, \
            pytest.MonkeyPatch.context() as env:  # put back whatever was set before
        for key, value in {"AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_DATA_PATH": _write_quick_retry_data(data)}.items():
            env.setenv(key, value)
        proxy.moto_endpoint = f"http://127.0.0.1:{port}"
        yield proxy
    proxy.stop()
    moto.stop()


@pytest.fixture()
def proxy(flaky_s3):
    """The session's proxy, healthy at the start and at the end of every test."""
    flaky_s3.healthy()
    yield flaky_s3
    flaky_s3.healthy()


@pytest.fixture()
def bucket(flaky_s3, request):
    """A fresh bucket (made directly on moto, past the proxy's faults); its s3:// URI."""
    import boto3

    name = "f-" + request.node.name.lower().replace("_", "-")[:30].strip("-") + "-" + os.urandom(3).hex()
    boto3.client("s3", endpoint_url=flaky_s3.moto_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def _single_node_ray(flaky_s3):
    """Which single-node Ray `local_ray` started last ({"address": its GCS address}); Ray is
    shut down at the session's end."""
    import ray

    started: dict[str, str] = {}
    yield started
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_single_node_ray):
    """A single-node Ray (2 CPUs). Consecutive modules that use it share one instance (a start
    and a stop cost seconds each); a multi-node module's fixture shuts it down before it starts
    its cluster (one process holds one Ray at a time), and the next module that needs it
    starts a new one."""
    import ray

    if not (ray.is_initialized() and
            ray.get_runtime_context().gcs_address == _single_node_ray.get("address")):
        ray.shutdown()
        # "local": a new instance even when another Ray on this machine left its address behind.
        context = ray.init(address="local", num_cpus=2, include_dashboard=False,
                           log_to_driver=False, runtime_env={"env_vars": {"WANDB_MODE": "disabled"}})
        _single_node_ray["address"] = context.address_info["gcs_address"]
    yield ray


@pytest.fixture(scope="session")
def detector():
    """The tests' tiny bottom-up detector (random weights, named vocabularies)."""
    from ray_updown.detector import BottomUpDetector, tiny_config

    torch.manual_seed(0)
    return BottomUpDetector(tiny_config(), object_vocab=["ball", "cube", "cone", "ring"],
                            attribute_vocab=["red", "green", "blue"]).eval()
