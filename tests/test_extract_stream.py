"""The streaming extraction actor (extraction/actor.py): one forward thread behind a bounded
queue, shards through the model one after another while others load and write, the GPU
defaults, the Triton scan's choice, and the compiled RoI head's padding. (The dry run of
benchmarks/gpu_check.py is in tests/benchmarks/.)"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import torch

from ray_updown.detector import BottomUpDetector, tiny_config
from ray_updown.extraction.actor import ForwardThread, ShardWriter
from ray_updown.extraction.model import ModelSpec, _greedy_scan, default_batch_size
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
from ray_updown.features.schema import StoreMeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_forward_thread_runs_in_order_and_holds_back_its_producers():
    release, seen = threading.Event(), []

    def run(item):
        release.wait()
        seen.append((item, threading.current_thread().name))
        return item * 10

    forward = ForwardThread(run, waiting=1)
    first = forward.submit(1)  # taken by the thread, which waits for `release`
    time.sleep(0.1)
    second = forward.submit(2)  # fills the one waiting place
    third: list = []
    blocked = threading.Thread(target=lambda: third.append(forward.submit(3)), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # a third item waits for room: memory stays bounded
    release.set()
    blocked.join(5)
    assert (first.result(5), second.result(5), third[0].result(5)) == (10, 20, 30)
    assert [s[0] for s in seen] == [1, 2, 3] and {s[1] for s in seen} == {"forward"}

    def broken(item):
        raise ValueError(f"bad {item}")

    failed = ForwardThread(broken).submit(7)
    assert isinstance(failed.exception(5), ValueError)


class LoggingModel:
    """Records which shard's rows each forward held, and on which thread, slowly."""

    name, feature_dim = "logging", 4
    log: list = []

    def extract_regions(self, images):
        time.sleep(0.05)
        LoggingModel.log.append((int(images[0][0, 0, 0]), threading.current_thread().name))
        return [{"boxes": np.array([[0, 0, 2, 2]], np.float32), "features": np.ones((1, 4), np.float32)}
                for _ in images]


def _images(folder, count, per_shard):
    from PIL import Image

    os.makedirs(folder)
    for i in range(count):  # the first pixel tells the shard
        Image.fromarray(np.full((8, 10, 3), i // per_shard, np.uint8)).save(f"{folder}/{i + 1:04d}.png")


def test_concurrent_shard_calls_pass_the_model_one_shard_after_another(tmp_path):
    _images(str(tmp_path / "imgs"), 24, per_shard=6)
    cfg = ExtractConfig(images=str(tmp_path / "imgs"), out=str(tmp_path / "s"), rows_per_shard=6,
                        batch_size=2, plan_only=True)
    run_extraction(cfg, model_factory=LoggingModel)
    meta = StoreMeta(feature_dim=4, image_id_type="int64", detector="logging")
    writer = ShardWriter(cfg.out, ModelSpec(factory=LoggingModel), meta, cfg.limits(),
                         forward_batch_size=2, decode_threads=2)
    LoggingModel.log = []
    with ThreadPoolExecutor(3) as calls:  # as Ray Data runs them: concurrent calls, threads
        done = list(calls.map(lambda s: writer.write_shard(s, 6 * s, 6), range(4)))
    assert [d["features"] for d in done] == [6] * 4
    shards = [shard for shard, _ in LoggingModel.log]
    assert len(shards) == 12 and {t for _, t in LoggingModel.log} == {"forward"}
    # Each shard's three forwards in a row: shards leave the model one after another.
    runs = [shards[i] for i in range(12) if i == 0 or shards[i] != shards[i - 1]]
    assert len(runs) == 4 and sorted(runs) == [0, 1, 2, 3]
    rows = sum(pq.read_metadata(f"{cfg.out}/features/part-{s:05d}.parquet").num_rows for s in range(4))
    assert rows == 24


def test_gpu_defaults_and_cpu_defaults():
    cpu, gpu = ExtractConfig(), ExtractConfig(num_gpus_per_actor=1)
    assert (cpu.actor_cpus(), cpu.actor_forwards()) == (1.0, 1)
    assert (gpu.actor_cpus(), gpu.actor_forwards()) == (4.0, 2)
    assert ExtractConfig(num_gpus_per_actor=1, cpus_per_actor=2).actor_cpus() == 2.0
    assert _greedy_scan("auto", "cpu") == "torch" and _greedy_scan("triton", "cpu") == "triton"
    model = BottomUpDetector(tiny_config()).prepare_inference("cpu")
    assert default_batch_size(model) == 4 and default_batch_size(object()) == 4


def test_the_gpu_batch_fills_the_device_memory_up_to_32(monkeypatch):
    class OnGpu:  # what default_batch_size reads of a model on CUDA
        def __init__(self, dtype):
            self.device, self.dtype = torch.device("cuda", 0), dtype

    class Properties:
        total_memory = 0

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties)
    sizes = {}
    for gigabytes in (24, 80, 141):
        Properties.total_memory = gigabytes * 10**9
        sizes[gigabytes] = (default_batch_size(OnGpu(torch.float16)),
                            default_batch_size(OnGpu(torch.float32)))
    assert sizes == {24: (12, 6), 80: (32, 20), 141: (32, 32)}


def test_padding_the_roi_head_for_a_compiled_res5_changes_no_output():
    torch.manual_seed(0)
    model = BottomUpDetector(tiny_config()).prepare_inference("cpu")
    images = [np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in range(2)]
    plain = model.extract_regions(images)
    model.roi_heads.roi_block = 7  # what compile_res5 sets: RoI counts padded to a multiple
    padded = model.extract_regions(images)
    for a, b in zip(plain, padded):
        assert np.array_equal(a["boxes"], b["boxes"])
        np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-5)


def test_bad_streaming_and_gpu_settings_are_named():
    import pytest

    from ray_updown.errors import ConfigError

    for bad, record in (({"shards_in_flight": 0}, "shards_in_flight"),
                        ({"decode_threads": -1}, "decode_threads"),
                        ({"greedy_scan": "fast"}, "greedy_scan"),
                        ({"compile_mode": "fastest"}, "compile_mode")):
        with pytest.raises(ConfigError) as info:
            ExtractConfig(images="x", out="y", **bad).validate()
        assert info.value.record == record
    with pytest.raises(ConfigError, match="compile_mode must be"):
        BottomUpDetector(tiny_config()).prepare_inference("cpu", compile_mode="fastest")
