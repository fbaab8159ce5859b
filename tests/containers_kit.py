"""Image sets in the layouts large sets are stored in, written the way their tools write them:
WebDataset tar shards (img2dataset's naming: KEY.jpg, KEY.json, KEY.txt, a .parquet of
per-sample metadata beside each tar) and Parquet tables with the image bytes in a column
(img2dataset's `jpg` beside key/url/caption/status; Hugging Face's `image` struct)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP")
SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def make_images(n: int, seed: int = 0, size: int = 56) -> list[tuple[str, str, bytes]]:
    """(key, suffix, encoded bytes) of n small images, the formats in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size + 8 * (i % 3), 3), dtype=np.uint8)
        pixels[size // 4: size // 2, size // 4: size // 2] = (255, 40 * (i % 5), 0)
        fmt = FORMATS[i % len(FORMATS)]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        out.append((f"{i:09d}", SUFFIX[fmt], buffer.getvalue()))
    return out


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A tar of samples (key, {extension: bytes}), members in webdataset order, plus the
    img2dataset metadata Parquet beside it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tar, f"{key}.{ext}", data)
    pq.write_table(pa.table({"key": [k for k, _ in samples],
                             "status": ["success"] * len(samples)}), path[:-4] + ".parquet")
    return path


def image_samples(images, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [(key, {suffix: data, "json": json.dumps({"key": key, "image_id": start + n}).encode(),
                   "txt": b"a caption"})
            for n, (key, suffix, data) in enumerate(images)]


def write_img2dataset_table(path: str, images, failed: int = 0, row_group_size: int = 4) -> str:
    """img2dataset's Parquet output: key, url, caption, status, error_message, width, height,
    jpg; `failed` extra rows whose download failed (no bytes)."""
    keys = [k for k, _, _ in images] + [f"9{i:08d}" for i in range(failed)]
    data = [d for _, _, d in images] + [None] * failed
    status = ["success"] * len(images) + ["failed_to_download"] * failed
    table = pa.table({
        "url": [f"http://example.com/{k}" for k in keys], "key": keys,
        "caption": ["a caption"] * len(keys), "status": status,
        "error_message": [None] * len(images) + ["timeout"] * failed,
        "width": pa.array([56] * len(keys), pa.int64()), "height": pa.array([56] * len(keys), pa.int64()),
        "jpg": pa.array(data, pa.binary())})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_hf_table(path: str, images, ids: list[int]) -> str:
    """A Hugging Face `datasets` Parquet export: an `image` struct {bytes, path} and an id."""
    image = pa.array([{"bytes": d, "path": f"{k}.{s}"} for k, s, d in images],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "image_id": pa.array(ids, pa.int64())})
    table = table.replace_schema_metadata({b"huggingface": json.dumps(
        {"info": {"features": {"image": {"_type": "Image"}, "image_id": {"dtype": "int64",
                                                                        "_type": "Value"}}}}).encode()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=3)
    return path
