"""Extraction on a real multi-node Ray cluster on this machine: a head and two
worker nodes as separate raylets on 127.0.0.1; the `extract_node` resource places one
extraction actor on each worker node. (a) Both nodes' actors write shards. (b) A worker node
removed mid-run: the run completes on the other node (or, if Ray gives up on the lost actor,
its re-run does), nothing lost or duplicated. (c) The driver killed mid-run (SIGKILL, in its
own process): a re-run completes what was missing, nothing lost or duplicated.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import wait_for
from PIL import Image
from ray import cloudpickle

from ray_updown.detector import BottomUpDetector, load_detector, save_detector, tiny_config
from ray_updown.extraction.failures import ExtractionError
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
from ray_updown.features.reader import FeatureStore

# Ray workers cannot import this test module: the slow detector travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])
WORKER = {"num_cpus": 1, "resources": {"extract_node": 1}}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SlowDetector:
    """The tiny detector, `delay` seconds a forward: a run lasts long enough to be hit.

    With a `barrier` folder, its first forward waits until `parties` detectors have been
    built (each leaves a file there): on a busy machine one actor could otherwise take every
    shard before the other has loaded its model.
    """

    def __init__(self, checkpoint: str, delay: float, barrier: str | None = None,
                 parties: int = 0):
        self.model, self.delay = load_detector(checkpoint), delay
        self.barrier, self.parties = barrier, parties
        if barrier:
            open(os.path.join(barrier, f"built-{os.getpid()}"), "w").close()

    def __getattr__(self, name):
        if name == "extract_batches":  # every forward through extract_regions
            raise AttributeError(name)
        return getattr(self.model, name)

    def extract_regions(self, images):
        if self.barrier:  # a loop of its own: this runs in a Ray worker, without conftest
            deadline = time.monotonic() + 120
            while len(os.listdir(self.barrier)) < self.parties:
                assert time.monotonic() < deadline, f"{self.parties} detectors never built"
                time.sleep(0.1)
            self.barrier = None
        time.sleep(self.delay)
        return self.model.extract_regions(images)


def slow_detector(checkpoint: str, delay: float, barrier: str | None = None,
                  parties: int = 0) -> SlowDetector:
    return SlowDetector(checkpoint, delay, barrier, parties)


@pytest.fixture()
def job(tmp_path):
    torch.manual_seed(0)
    save_detector(BottomUpDetector(tiny_config()), str(tmp_path / "ckpt"))
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 17):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{i}.png")
    return tmp_path


def _config(job, **kw) -> ExtractConfig:
    values = {"images": str(job / "imgs"), "out": str(job / "store"), "rows_per_shard": 2,
              "batch_size": 2, "num_actors": 2, "cpus_per_actor": 1, "torch_threads": 1,
              "read_threads": 2, "actor_resources": {"extract_node": 1}, "max_restarts": 3,
              "max_task_retries": 3, **kw}
    return ExtractConfig(**values)


def _assert_accounted(out: str, count: int = 16) -> None:
    store = FeatureStore(out)
    ids, failed = store.image_ids, [e["image_id"] for e in store.errors()]
    assert len(ids) == len(set(ids)) and not failed, (ids, failed)
    assert sorted(ids) == list(range(1, count + 1))


def _first_part(job) -> str:
    return str(job / "store" / "features" / "part-00000.parquet")


def test_actors_on_both_worker_nodes_write_their_shards(make_cluster, job):
    cluster = make_cluster(1, [WORKER, WORKER])
    (job / "barrier").mkdir()
    factory = functools.partial(slow_detector, str(job / "ckpt"), 0.2, str(job / "barrier"), 2)
    summary = run_extraction(_config(job), model_factory=factory)
    assert (summary["inputs"], summary["features"], summary["errors"]) == (16, 16, 0)
    workers = {n.node_id for n in cluster.worker_nodes}
    # Each shard's counts come from the actor that wrote it, with its node: both nodes wrote.
    assert set(summary["shards_by_node"]) == workers
    assert sum(summary["shards_by_node"].values()) == 8
    # The driver received counts, never features: well under a kilobyte an image.
    assert 0 < summary["driver_received_bytes"] / 16 < 1024
    _assert_accounted(str(job / "store"))


def test_a_worker_node_removed_mid_run_loses_and_duplicates_nothing(make_cluster, job):
    cluster = make_cluster(1, [WORKER, WORKER])
    doomed = next(iter(cluster.worker_nodes))
    removed = []

    def remove() -> None:
        wait_for(lambda: os.path.exists(_first_part(job)), 120, "the first shard")
        cluster.remove_node(doomed, allow_graceful=False)
        removed.append(doomed.node_id)

    killer = threading.Thread(target=remove, daemon=True)
    killer.start()
    factory = functools.partial(slow_detector, str(job / "ckpt"), 0.5)
    runs = []
    try:
        runs.append(run_extraction(_config(job), model_factory=factory))
    except ExtractionError as exc:  # the lost actor's retries spent: the re-run resumes
        runs.append(str(exc))
        runs.append(run_extraction(_config(job), model_factory=factory))
    killer.join(timeout=30)
    print("node removed mid-run; runs:", [r if isinstance(r, str) else "completed" for r in runs])
    assert removed == [doomed.node_id]
    summary = runs[-1]
    # The surviving node finished what the lost one left, in this run or its re-run.
    survivor = next(n.node_id for n in cluster.worker_nodes if n.node_id != doomed.node_id)
    assert survivor in summary["shards_by_node"]
    assert (summary["inputs"], summary["features"], summary["errors"]) == (16, 16, 0)
    _assert_accounted(str(job / "store"))


_DRIVER = """
import functools, sys
sys.path.insert(0, {here!r})
import test_extract_nodes as t
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
run_extraction(ExtractConfig(**{values!r}),
               model_factory=functools.partial(t.slow_detector, {ckpt!r}, 0.5))
"""


def test_a_driver_killed_mid_run_then_rerun_loses_and_duplicates_nothing(make_cluster, job):
    cluster = make_cluster(1, [WORKER, WORKER])
    cfg = _config(job)
    values = {f: getattr(cfg, f) for f in ("images", "out", "rows_per_shard", "batch_size",
                                           "num_actors", "torch_threads", "read_threads",
                                           "actor_resources")}
    here = os.path.dirname(os.path.abspath(__file__))
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER.format(here=here, ckpt=str(job / "ckpt"), values=values)],
        cwd=REPO, env={**os.environ, "RAY_ADDRESS": cluster.address},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(_first_part(job)) or driver.poll() is not None, 120,
                 "the first shard")
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    written = len([n for n in os.listdir(job / "store" / "features") if n.endswith(".parquet")])
    assert 0 < written < 8  # killed mid-run, with shards left to do

    factory = functools.partial(slow_detector, str(job / "ckpt"), 0.0)
    summary = run_extraction(cfg, model_factory=factory)
    assert summary["shards_skipped"] >= 1 and summary["shards_processed"] >= 1
    assert summary["shards_skipped"] + summary["shards_processed"] == 8
    assert (summary["inputs"], summary["features"], summary["errors"]) == (16, 16, 0)
    _assert_accounted(str(job / "store"))
