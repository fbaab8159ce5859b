"""An S3 endpoint that fails: the real extraction from S3 to S3 through a proxy that answers
every Nth request with 503 SlowDown or resets the connection, or that disappears mid-run.

Every request of the run goes through the proxy: the driver's listing, plan and shard writes
and every Ray worker's reads (the workers inherit AWS_ENDPOINT_URL)."""

from __future__ import annotations

import functools
import threading
import time

import boto3
import pytest
from faultkit import assert_accounted, make_detector, run_cli, write_images

from ray_updown.detector import save_detector
from ray_updown.errors import StorageError
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

pytestmark = pytest.mark.usefixtures("local_ray")
IMAGES = 10


@pytest.fixture()
def s3_job(bucket, detector):
    write_images(f"{bucket}/imgs", IMAGES)
    save_detector(detector, f"{bucket}/ckpt")
    return bucket


def _config(bucket: str) -> ExtractConfig:
    return ExtractConfig(images=f"{bucket}/imgs/", out=f"{bucket}/store", rows_per_shard=2,
                         batch_size=2, read_threads=2)


@pytest.mark.parametrize("kind,every", [("503", 3), ("reset", 4)])
def test_a_share_of_failed_requests_is_absorbed_by_the_clients_retries(proxy, s3_job, kind, every):
    proxy.fail_every(every, kind)
    before = proxy.faults
    summary = run_extraction(_config(s3_job), model_factory=functools.partial(
        make_detector, f"{s3_job}/ckpt"))
    assert proxy.faults - before >= 10  # the faults really hit the run
    assert (summary["inputs"], summary["features"], summary["errors"]) == (IMAGES, IMAGES, 0)
    proxy.healthy()
    assert_accounted(f"{s3_job}/store", IMAGES)


def _when_first_shard_is_written(proxy, bucket: str, action) -> threading.Thread:
    """Call `action()` as soon as the store's first features part exists (polled on moto
    directly, past the proxy)."""
    client = boto3.client("s3", endpoint_url=proxy.moto_endpoint)
    name = bucket[len("s3://"):]

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = client.list_objects_v2(Bucket=name, Prefix="store/features/part-")
            if found.get("KeyCount"):
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_endpoint_gone_mid_run_is_one_line_and_a_rerun_completes(proxy, s3_job):
    out = f"{s3_job}/store"
    args = ["extract", "--images", f"{s3_job}/imgs/", "--out", out, "--checkpoint",
            f"{s3_job}/ckpt", "rows_per_shard=2", "batch_size=2",
            "read_threads=2"]
    watcher = _when_first_shard_is_written(proxy, s3_job, proxy.down)
    # A slow detector keeps the run going after its first shard: the outage hits mid-run.
    done = run_cli(args, factory={"checkpoint": f"{s3_job}/ckpt", "delay": 1.0})
    watcher.join(timeout=5)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("ray-updown extract: error: s3://"), \
        done.stderr[-3000:]
    assert errors[0].endswith("re-run to resume"), errors[0]

    proxy.up()
    summary = run_extraction(_config(s3_job), model_factory=functools.partial(
        make_detector, f"{s3_job}/ckpt"))
    assert 0 < summary["shards_skipped"] < summary["shards"]  # kept what was written, redid the rest
    assert (summary["features"], summary["errors"]) == (IMAGES, 0)  # no image lost to the outage
    assert_accounted(out, IMAGES)


def test_an_endpoint_gone_before_the_run_is_one_line(proxy, s3_job):
    proxy.down()
    with pytest.raises(StorageError, match=f"{s3_job}/store"):
        run_extraction(_config(s3_job), model_factory=functools.partial(
            make_detector, f"{s3_job}/ckpt"))
