"""Input paths of extraction: read-and-decode images/s per core, on the same JPEGs stored three ways.

    .venv/bin/python benchmarks/inputs.py [--images 400] [--per-tar 100] [--row-group 100] [--repeats 3] [--workdir DIR]

The same --images photo-like JPEGs (640x480: smoothed noise, texture and shapes; Pillow,
quality 90) are written once as
  loose: one file each, read with `storage.read_bytes`;
  tar:   WebDataset shards of --per-tar samples (KEY.jpg, KEY.json, KEY.txt), read with
         `containers.tar_samples(tar, ContainerSpec("tar"), chunk=64)`;
  table: one Parquet table in img2dataset's layout (key, url, caption, status, width, height,
         jpg), row groups of --row-group rows, read with `table_samples` over the shards of
         `plan_containers` (rows_per_shard = ExtractConfig's default).
Each image's bytes go through `decode_image` with `ExtractConfig().limits()` (600/1000: a
640x480 image is decoded at full size, not reduced). Everything runs in this process on one
thread (Arrow's pools set to 1, no decode pool), so images/s is per core. One warm-up pass of
each path runs first, so every timed pass reads from the page cache ("cache": "warm"). Then
--repeats rounds, the order of the paths reversed every other round; per path and mode
(read_decode, read_only: the bytes read, nothing decoded) the JSON gives the images, best and
median wall seconds, images/s from the median, and the median CPU seconds of this process
(CPU close to wall: the core was ours; much less: others shared it). `ratios` compares
read_decode rates: tar/loose (target >= 0.9) and table/loose. JSON on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ray_updown import storage
from ray_updown.data.images import DecodeLimits, decode_image
from ray_updown.extraction.config import ExtractConfig
from ray_updown.extraction.container_plan import plan_containers
from ray_updown.extraction.containers import ContainerSpec, table_samples, table_spec, tar_samples

WIDTH, HEIGHT, QUALITY, CHUNK = 640, 480, 90, 64


def make_jpegs(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes): a smooth colour field, fine texture and a few filled shapes each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        coarse = rng.uniform(0, 255, (HEIGHT // 40 + 1, WIDTH // 40 + 1, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 10, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = int(rng.integers(0, WIDTH - 60)), int(rng.integers(0, HEIGHT - 60))
            box = (x, y, x + int(rng.integers(30, 200)), y + int(rng.integers(30, 150)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=QUALITY)
        out.append((f"{i:09d}", buffer.getvalue()))
    return out


def write_loose(folder: str, images) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    for key, data in images:
        with open(os.path.join(folder, f"{key}.jpg"), "wb") as f:
            f.write(data)
    return [os.path.join(folder, f"{key}.jpg") for key, _ in images]


def write_tars(folder: str, images, per_tar: int) -> list[str]:
    """WebDataset shards as img2dataset names them: 00000.tar, members KEY.jpg/.json/.txt."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(images), per_tar)):
        paths.append(os.path.join(folder, f"{n:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for key, data in images[start:start + per_tar]:
                meta = json.dumps({"key": key, "status": "success", "width": WIDTH, "height": HEIGHT})
                for ext, body in (("jpg", data), ("json", meta.encode()), ("txt", b"a caption")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))
    return paths


def write_table(path: str, images, row_group: int) -> str:
    """img2dataset's Parquet output: key, url, caption, status, width, height, jpg."""
    keys = [key for key, _ in images]
    pq.write_table(pa.table({
        "key": keys, "url": [f"http://example.com/{k}.jpg" for k in keys],
        "caption": ["a caption"] * len(keys), "status": ["success"] * len(keys),
        "width": pa.array([WIDTH] * len(keys), pa.int64()), "height": pa.array([HEIGHT] * len(keys), pa.int64()),
        "jpg": pa.array([data for _, data in images], pa.binary())}), path, row_group_size=row_group)
    return path


def loose_bytes(paths: list[str]):
    for path in paths:
        yield storage.read_bytes(path)


def tar_bytes(paths: list[str]):
    for path in paths:
        for chunk in tar_samples(path, ContainerSpec("tar"), chunk=CHUNK):
            assert not any(chunk.column("reason").to_pylist()), "a tar sample failed to read"
            yield from chunk.column("data").to_pylist()


def table_bytes(path: str, plan: pa.Table, spec: ContainerSpec):
    for first, groups in zip(plan.column("first_group").to_pylist(), plan.column("num_groups").to_pylist()):
        for chunk, _skipped in table_samples(path, first, groups, spec, chunk=CHUNK):
            assert not any(chunk.column("reason").to_pylist()), "a table row failed to read"
            yield from chunk.column("data").to_pylist()


def one_pass(source, limits: DecodeLimits | None) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of reading every image, and decoding it unless
    `limits` is None."""
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for data in source():
        if limits is not None:
            decode_image(data, limits)
        n += 1
    return n, time.perf_counter() - wall, time.process_time() - cpu


def summary(runs: list[tuple[int, float, float]]) -> dict:
    seconds = [r[1] for r in runs]
    median = statistics.median(seconds)
    return {"images": runs[0][0], "seconds_best": round(min(seconds), 4), "seconds_median": round(median, 4),
            "cpu_seconds_median": round(statistics.median(r[2] for r in runs), 4),
            "images_per_s": round(runs[0][0] / median, 2)}


def measure(sources: dict, limits: DecodeLimits, repeats: int) -> dict:
    """Warm-up pass of each path, then `repeats` rounds in alternating order."""
    for name, source in sources.items():
        print(f"warm-up {name}: {one_pass(source, limits)[1]:.3f} s", file=sys.stderr)
    runs: dict = {(name, mode): [] for name in sources for mode in ("read_decode", "read_only")}
    for r in range(repeats):
        order = list(sources) if r % 2 == 0 else list(reversed(sources))
        for name in order:
            for mode, lim in (("read_decode", limits), ("read_only", None)):
                runs[name, mode].append(one_pass(sources[name], lim))
                print(f"round {r + 1}/{repeats} {name} {mode}: {runs[name, mode][-1][1]:.3f} s", file=sys.stderr)
    return {name: {mode: summary(runs[name, mode]) for mode in ("read_decode", "read_only")} for name in sources}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--per-tar", type=int, default=100)
    parser.add_argument("--row-group", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="", help="folder for the inputs (default: a temporary one, removed)")
    args = parser.parse_args()
    pa.set_cpu_count(1)  # one thread: the rates are per core
    pa.set_io_thread_count(1)
    root = args.workdir or tempfile.mkdtemp(prefix="inputs-bench-")
    config = ExtractConfig()
    limits = config.limits()  # the pipeline's defaults
    try:
        print(f"writing {args.images} JPEGs under {root}", file=sys.stderr)
        images = make_jpegs(args.images)
        loose = write_loose(f"{root}/loose", images)
        tars = write_tars(f"{root}/tars", images, args.per_tar)
        table = write_table(f"{root}/table.parquet", images, args.row_group)
        spec = table_spec(table)
        plan, _ = plan_containers([table], spec, rows_per_shard=config.rows_per_shard)
        sources = {"loose": lambda: loose_bytes(loose), "tar": lambda: tar_bytes(tars),
                   "table": lambda: table_bytes(table, plan, spec)}
        paths = measure(sources, limits, args.repeats)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    rate = {name: paths[name]["read_decode"]["images_per_s"] for name in paths}
    print(json.dumps({
        "measured": "read-and-decode images/s per core (one thread) of each input path", "cache": "warm",
        "threads": 1, "repeats": args.repeats, "order": "alternating",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(), "load_average_at_end": os.getloadavg()},
        "images": {"count": args.images, "size": f"{WIDTH}x{HEIGHT}", "jpeg_quality": QUALITY,
                   "mean_jpeg_bytes": round(sum(len(d) for _, d in images) / max(1, len(images)))},
        "layout": {"tars": len(tars), "per_tar": args.per_tar, "table_row_group": args.row_group,
                   "rows_per_shard": config.rows_per_shard, "table_shards": plan.num_rows, "chunk": CHUNK},
        "decode_limits": dataclasses.asdict(limits),
        "paths": paths,
        "ratios": {"tar_over_loose": round(rate["tar"] / rate["loose"], 3),
                   "table_over_loose": round(rate["table"] / rate["loose"], 3),
                   "target": "tar >= 0.9x loose per core"}}, indent=1))


if __name__ == "__main__":
    main()
