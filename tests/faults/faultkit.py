"""Helpers of the fault suite: inputs, slow or dying detectors (they travel to the Ray actors
by value, through ModelSpec.factory, the pipeline's model hook) and the accounting checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from ray import cloudpickle

from ray_updown import storage
from ray_updown.detector import load_detector, save_detector
from ray_updown.extraction.config import ExtractConfig
from ray_updown.features.reader import FeatureStore

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from tiny_vqa import vqa_config, write_vqa_world  # noqa: E402,F401

# Ray workers cannot import this module: the detector wrappers travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_images(uri: str, count: int, size=(48, 40)) -> None:
    """`count` random PNGs named 1.png ... count.png (image ids 1..count) under `uri`."""
    rng = np.random.default_rng(count)
    for i in range(1, count + 1):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = f"/tmp/faultkit-{os.getpid()}.png"
        Image.fromarray(arr).save(path, format="PNG")
        with open(path, "rb") as f:
            storage.write_bytes(storage.join(uri, f"{i}.png"), f.read())
        os.remove(path)


def assert_accounted(out: str, count: int, errors: int = 0) -> FeatureStore:
    """Images 1..count are each exactly once in the store: a feature row or an error row."""
    store = FeatureStore(out)
    ids = store.image_ids
    failed = [e["image_id"] for e in store.errors()]
    assert len(ids) == len(set(ids)), "duplicate feature rows"
    assert len(failed) == len(set(failed)), "duplicate error rows"
    assert not set(ids) & set(failed), "an image is both a feature and an error row"
    assert sorted(ids + failed) == list(range(1, count + 1)), "inputs != features + errors"
    assert len(failed) == errors, store.errors()
    return store


class Detector:
    """Wraps the tiny detector: `delay` seconds per batch (so a run lasts long enough to be
    hit mid-way), and the process dies (os._exit, as an OOM kill would) while fewer than
    `kills` marker files are in `kill_dir`: in extract_regions, or in the actor's start-up
    (`when="start"`). An actor appends its node's id to `node_file` when it starts."""

    def __init__(self, checkpoint: str, delay: float = 0.0, kill_dir: str = "", kills: int = 0,
                 when: str = "batch", node_file: str = ""):
        self.model = load_detector(checkpoint)
        self.delay, self.kill_dir, self.kills = delay, kill_dir, kills
        if _in_actor():
            if node_file:
                import ray

                with open(node_file, "a") as f:
                    f.write(ray.get_runtime_context().get_node_id() + "\n")
            if when == "start":
                self._maybe_die()

    def __getattr__(self, name):
        if name == "extract_batches":  # the actor's fast path would bypass extract_regions
            raise AttributeError(name)
        return getattr(self.model, name)

    def _maybe_die(self) -> None:
        if self.kills and len(os.listdir(self.kill_dir)) < self.kills:
            open(os.path.join(self.kill_dir, f"killed-{os.getpid()}"), "w").close()
            os._exit(1)

    def extract_regions(self, images):
        self._maybe_die()
        time.sleep(self.delay)
        return self.model.extract_regions(images)


def _in_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def make_detector(checkpoint: str, delay: float = 0.0, kill_dir: str = "", kills: int = 0,
                  when: str = "batch", node_file: str = "") -> Detector:
    return Detector(checkpoint, delay, kill_dir, kills, when, node_file)


_DRIVER = """
import functools, sys
sys.path.insert(0, {here!r})
import faultkit
import ray_updown.extraction.pipeline as pipeline
factory = functools.partial(faultkit.make_detector, **{factory!r})
pipeline.run_extraction = functools.partial(pipeline.run_extraction, model_factory=factory)
from ray_updown.cli import main
sys.exit(main({argv!r}))
"""


def run_cli(args: list[str], factory: dict | None = None, timeout: float = 180
            ) -> subprocess.CompletedProcess:
    """`ray-updown <args>` in a subprocess, as a user runs it, connected to this process's
    Ray. With `factory` (make_detector's arguments) `extract` runs that detector: the CLI
    itself, with the pipeline's model hook set."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    if factory is None:
        command = [sys.executable, "-m", "ray_updown.cli", *args]
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        command = [sys.executable, "-c", _DRIVER.format(here=here, factory=factory, argv=args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


# What Ray itself logs on a driver's console when it starts or joins a cluster (e.g. "INFO
# worker.py:2029 -- Started a local Ray instance."): the only lines a command may print
# besides its own.
_RAY_DRIVER_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+\.py:\d+ -- ")


def progress_of(command: str) -> re.Pattern:
    """A worker's progress line as the CLI shows it: `ray-updown <command>: <run>: epoch N: ...`."""
    return re.compile(rf"ray-updown {re.escape(command)}: \S+: epoch (\d+): ")


def console(done: subprocess.CompletedProcess, command: str) -> tuple[list[str], list[str]]:
    """(the command's warning lines, its error lines) on stdout + stderr, after checking that
    nothing else is there but Ray's start-up lines and the summary on stdout: no traceback,
    no line of a Ray worker."""
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.strip()
            and not _RAY_DRIVER_LINE.match(line) and not progress_of(command).match(line)]
    assert all(line.startswith(f"ray-updown {command}: ") for line in ours), text[-3000:]
    warnings = [line for line in ours if line.startswith(f"ray-updown {command}: warning: ")]
    errors = [line for line in ours if line.startswith(f"ray-updown {command}: error: ")]
    assert len(warnings) + len(errors) == len(ours), ours
    return warnings, errors


def write_checkpoint_dir(path: str) -> str:
    """A small real checkpoint directory (weights, config, trainer state with an optimizer)."""
    import torch

    from ray_updown.train.run_checkpoint import save_checkpoint_dir

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adamax(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    save_checkpoint_dir(path, model, {"model": {"in": 4, "out": 3}},
                        {"epoch": 1, "optimizer": optimizer.state_dict()})
    return path


def loose_file_extraction(root, detector, count: int, batch_size: int) -> ExtractConfig:
    """`count` PNGs in root/imgs and `detector` saved in root/ckpt: the config of their store
    at root/store, two images a shard."""
    write_images(str(root / "imgs"), count)
    save_detector(detector, str(root / "ckpt"))
    return ExtractConfig(images=str(root / "imgs"), out=str(root / "store"),
                         checkpoint=str(root / "ckpt"), rows_per_shard=2, batch_size=batch_size)
