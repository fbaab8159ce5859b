"""The per-image steps of the extraction pipeline: read, decode, detect (actor.py's ShardWriter
runs them on each shard's rows).

Every step keeps the rows it was given: a row that fails gets `stage` (the step's name in the
errors table) and `reason` set and rides along to the end, where it becomes an error row. So
input rows = feature rows + error rows holds by construction, and one bad image never fails a
batch.

    read_stage     uri -> bytes (a thread pool: object stores answer slowly but in parallel)
    decode_stage   bytes -> HxWx3 uint8 pixels + original size (images.decode_image)
    BatchDetector  pixels -> one result row per input: feature columns, or the error

A detect-stage reason names the image as the user knows it, `image <id> (<file name>, <w>x<h>
pixels): <problem>`, with the file's own size, never a position in a batch or a resized size.
"""

from __future__ import annotations

import dataclasses
import posixpath
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ray_updown import storage
from ray_updown.data.images import (
    DecodedImage,
    DecodeLimits,
    ImageDecodeError,
    boxes_to_original,
    decode_image,
)
from ray_updown.errors import RayUpdownError, one_line
from ray_updown.extraction.model import ModelSpec, build_model
from ray_updown.features.records import FeatureRecord, records_to_table
from ray_updown.features.schema import StoreMeta, feature_schema

_EMPTY_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)


def _problem(exc: BaseException) -> str:
    """The problem alone: a package error's `record` inside a model call is a batch position."""
    return " ".join(exc.problem.split())[:500] if isinstance(exc, RayUpdownError) else one_line(exc)


def _strings(values: Any) -> list[str]:
    return ["" if v is None else str(v) for v in values]


# -- read ----------------------------------------------------------------------------------
def read_stage(batch: dict[str, np.ndarray], threads: int = 16) -> dict[str, np.ndarray]:
    """Adds `data` (the file's bytes; empty for rows that failed earlier or now)."""
    uris = _strings(batch["uri"])
    stages, reasons = _strings(batch["stage"]), _strings(batch["reason"])

    def fetch(i: int) -> bytes:
        if reasons[i]:
            return b""
        try:
            return storage.read_bytes(uris[i])
        except Exception as exc:  # missing object, permissions, network: this image only
            stages[i], reasons[i] = "read", one_line(exc)
            return b""

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        data = list(pool.map(fetch, range(len(uris))))
    out = dict(batch)
    out["data"] = np.array(data + [None], dtype=object)[:-1]
    out["stage"], out["reason"] = np.array(stages, dtype=object), np.array(reasons, dtype=object)
    return out


# -- decode --------------------------------------------------------------------------------
def decode_stage(batch: dict[str, np.ndarray], limits: DecodeLimits,
                 pool: Executor | None = None) -> dict[str, np.ndarray]:
    """Replaces `data` by `pixels` (uint8 HxWx3, downscaled to the detector's scale at most),
    the original size `image_w`, `image_h` (viewer frame, after EXIF rotation) and the decoded
    size `pixels_w`, `pixels_h` (what boxes are scaled from once the pixels are gone).
    `pool` decodes the images in parallel (Pillow releases the GIL while it decodes)."""
    n = len(batch["uri"])
    stages, reasons = _strings(batch["stage"]), _strings(batch["reason"])

    def decode(i: int) -> DecodedImage | None:
        if reasons[i]:
            return None
        try:
            return decode_image(bytes(batch["data"][i]), limits)
        except ImageDecodeError as exc:
            stages[i], reasons[i] = "decode", exc.problem
        except Exception as exc:  # a decoder bug must not take the batch with it
            stages[i], reasons[i] = "decode", one_line(exc)
        return None

    images = list(pool.map(decode, range(n)) if pool is not None else map(decode, range(n)))
    pixels = [_EMPTY_PIXELS if image is None else image.pixels for image in images]
    out = {k: v for k, v in batch.items() if k != "data"}
    out["pixels"] = np.array(pixels + [None], dtype=object)[:-1]
    out["image_w"] = np.array([0 if im is None else im.width for im in images], np.int32)
    out["image_h"] = np.array([0 if im is None else im.height for im in images], np.int32)
    out["pixels_w"] = np.array([p.shape[1] for p in pixels], np.int32)
    out["pixels_h"] = np.array([p.shape[0] for p in pixels], np.int32)
    out["stage"], out["reason"] = np.array(stages, dtype=object), np.array(reasons, dtype=object)
    return out


# -- detect --------------------------------------------------------------------------------
def result_schema(meta: StoreMeta) -> pa.Schema:
    """What the actor stage emits: the row's identity and outcome, then the feature columns
    (null on error rows)."""
    features = feature_schema(meta)
    head = [features.field("image_id").with_nullable(True), pa.field("uri", pa.string()),
            pa.field("row", pa.int64()), pa.field("shard", pa.int32()), pa.field("stage", pa.string()),
            pa.field("reason", pa.string())]
    return pa.schema(head + [f.with_nullable(True) for f in features if f.name != "image_id"])


MAX_GIVEN_BOXES = 1000  # per image: a bound on res5 work and memory, far above real use


def check_given_boxes(value: Any, width: int, height: int,
                      limit: int = MAX_GIVEN_BOXES) -> np.ndarray:
    """A manifest's boxes for one image -> (k, 4) float32 x1 y1 x2 y2, or ValueError naming
    the first bad box: not four numbers, NaN/inf, empty or inverted, outside the image."""
    if len(value) > limit:
        raise ValueError(f"{len(value)} boxes given, at most {limit} per image")
    for j, box in enumerate(value):
        if box is None or any(v is None for v in box):
            raise ValueError(f"box {j} {'is null' if box is None else 'holds a null'}: "
                             "not four numbers x1, y1, x2, y2")
    rows = [np.asarray(box, dtype=np.float64).reshape(-1) for box in value]
    for j, box in enumerate(rows):
        shown = "[" + ", ".join(f"{v:g}" for v in box) + "]"
        if box.shape != (4,):
            raise ValueError(f"box {j} {shown}: not four numbers x1, y1, x2, y2")
        if not np.isfinite(box).all():
            raise ValueError(f"box {j} {shown}: not a finite number")
        x1, y1, x2, y2 = box
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"box {j} {shown}: empty or inverted (x2 <= x1 or y2 <= y1)")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise ValueError(f"box {j} {shown}: outside the {width}x{height} image")
    return np.array(rows, dtype=np.float32).reshape(-1, 4)


def _decoded_size(batch: dict[str, np.ndarray], i: int) -> tuple[int, int]:
    """(w, h) of row i's decoded pixels: decode_stage records them; a hand-made batch has
    only the pixels."""
    if "pixels_w" in batch:
        return int(batch["pixels_w"][i]), int(batch["pixels_h"][i])
    shape = np.asarray(batch["pixels"][i]).shape
    return int(shape[1]), int(shape[0])


@dataclass
class Detected:
    """What `BatchDetector.detect` gives `to_table`: per row index the model's result (or a
    reason string), the rows' stages and reasons so far, and the checked given boxes."""

    results: dict[int, dict[str, Any] | str]
    stages: list[str]
    reasons: list[str]
    given: dict[int, np.ndarray]


class BatchDetector:
    """The model of one actor process: a batch of decoded rows -> a result table (the
    actor is actor.py's ShardWriter, which holds one of these)."""

    def __init__(self, spec: ModelSpec, meta: StoreMeta, torch_threads: int = 1,
                 use_gpu: bool = False, forward_batch_size: int = 0):
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = build_model(spec, device)
        self.meta = meta
        self.schema = result_schema(meta)
        self.forward_batch_size = forward_batch_size  # 0: the whole call in one forward

    def _run(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        out = self.model.extract_regions(images)
        if len(out) != len(images):
            raise RuntimeError(f"model returned {len(out)} results for {len(images)} images")
        return out

    def _forwards(self, chunks: list[list[np.ndarray]]):
        """Each chunk's results or exception; the detector overlaps its GPU uploads."""
        if hasattr(self.model, "extract_batches"):
            yield from self.model.extract_batches(chunks)
            return
        for chunk in chunks:
            try:
                yield self.model.extract_regions(chunk)
            except Exception as exc:
                yield exc

    def _chunked(self, items: list) -> list[list]:
        size = self.forward_batch_size or len(items)
        return [items[i: i + size] for i in range(0, len(items), size)]

    @staticmethod
    def _retry_failed_chunks(chunks: list[list], outputs, run_one) -> list[dict[str, Any] | str]:
        """Each chunk's output where it is a full list; where a forward raised (or returned
        the wrong count), its items one at a time, so one bad image costs only its own row."""
        results: list[dict[str, Any] | str] = []
        for chunk, out in zip(chunks, outputs):
            if isinstance(out, list) and len(out) == len(chunk):
                results.extend(out)
                continue
            for item in chunk:
                try:
                    results.append(run_one(item))
                except Exception as exc:
                    results.append(_problem(exc))
        return results

    def _detect(self, images: list[np.ndarray]) -> list[dict[str, Any] | str]:
        """Forwards of `forward_batch_size` images, errors as reasons."""
        if not images:
            return []
        chunks = self._chunked(images)
        return self._retry_failed_chunks(chunks, self._forwards(chunks),
                                         lambda image: self._run([image])[0])

    def _given_boxes(self, batch: dict[str, np.ndarray], stages: list[str],
                     reasons: list[str]) -> dict[int, np.ndarray]:
        """Rows whose manifest gave boxes -> their checked (k, 4) boxes; bad ones become
        error rows (stage "boxes") naming the image and the box."""
        column = batch.get("given_boxes")
        out: dict[int, np.ndarray] = {}
        if column is None:
            return out
        sizes = batch.get("given_size")  # boxes_from: the image's size in that store
        for i, value in enumerate(column):
            if reasons[i] or value is None or len(value) == 0:
                continue  # no boxes given: the detector chooses
            try:
                width, height = int(batch["image_w"][i]), int(batch["image_h"][i])
                if sizes is not None and sizes[i] is not None and tuple(sizes[i]) != (width, height):
                    raise ValueError(f"the boxes_from store's row of this id is {sizes[i][0]}x"
                                     f"{sizes[i][1]} pixels: not the same image")
                out[i] = check_given_boxes(value, width, height)
            except ValueError as exc:
                stages[i], reasons[i] = "boxes", self._reason(
                    batch["image_id"][i], _strings(batch["uri"])[i], int(batch["image_w"][i]),
                    int(batch["image_h"][i]), str(exc))
        return out

    def _pool_given(self, batch: dict[str, np.ndarray], rows: list[int],
                    given: dict[int, np.ndarray]) -> list[dict[str, Any] | str]:
        """Features for given boxes, in forwards of `forward_batch_size` (one at a time where
        a forward fails). Boxes go into the decoded image's frame first."""
        if not rows:
            return []
        if not hasattr(self.model, "extract_given_boxes"):
            return [f"{getattr(self.model, 'name', 'this model')} cannot pool given boxes"] * len(rows)
        images, boxes = [], []
        for i in rows:
            pixels = np.asarray(batch["pixels"][i])
            scale = np.array([pixels.shape[1] / int(batch["image_w"][i]),
                              pixels.shape[0] / int(batch["image_h"][i])] * 2, np.float32)
            images.append(pixels)
            boxes.append(given[i] * scale)
        chunks = self._chunked(list(zip(images, boxes)))

        def pool(pairs):
            try:
                return self.model.extract_given_boxes([image for image, _ in pairs],
                                                      [b for _, b in pairs])
            except Exception as exc:
                return exc

        return self._retry_failed_chunks(
            chunks, map(pool, chunks),
            lambda pair: self.model.extract_given_boxes([pair[0]], [pair[1]])[0])

    @staticmethod
    def _reason(image_id: Any, uri: str, width: int, height: int, problem: str) -> str:
        name = posixpath.basename(uri.rstrip("/")) or uri
        return " ".join(f"image {image_id} ({name}, {width}x{height} pixels): {problem}".split())[:700]

    def detect(self, batch: dict[str, np.ndarray]) -> Detected:
        """The model's share of a call: given boxes checked, then the forwards (or the pooling
        of given boxes). The streaming actor runs it on its one forward thread (actor.py) and
        builds the table (`to_table`) on another, so the model never waits for Arrow."""
        n = len(batch["uri"])
        stages, reasons = _strings(batch["stage"]), _strings(batch["reason"])
        given = self._given_boxes(batch, stages, reasons)
        todo = [i for i in range(n) if not reasons[i] and i not in given]
        pooled = [i for i in range(n) if not reasons[i] and i in given]
        results = dict(zip(todo, self._detect([np.asarray(batch["pixels"][i]) for i in todo])))
        results.update(zip(pooled, self._pool_given(batch, pooled, given)))
        return Detected(results, stages, reasons, given)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.to_table(batch, self.detect(batch))

    def to_table(self, batch: dict[str, np.ndarray], detected: Detected) -> pa.Table:
        """One result row per input row: its feature columns, or its stage and reason. Needs
        the decoded size (`pixels_w`, `pixels_h`, or the pixels themselves), not the pixels."""
        n = len(batch["uri"])
        ids = list(batch["image_id"])
        uris, shards = _strings(batch["uri"]), [int(s) for s in batch["shard"]]
        plan_rows = [int(r) for r in batch["row"]]
        results, given = detected.results, detected.given
        stages, reasons = list(detected.stages), list(detected.reasons)
        records: dict[int, FeatureRecord] = {}
        for i, result in sorted(results.items()):
            try:
                if isinstance(result, str):
                    raise RuntimeError(result)
                records[i] = self._record(ids[i], batch, i, result)
                if i in given:  # stored exactly as given, not through the decode-scale round trip
                    records[i] = dataclasses.replace(records[i], boxes=given[i])
            except Exception as exc:
                problem = result if isinstance(result, str) else one_line(exc)
                stages[i], reasons[i] = "detect", self._reason(
                    ids[i], uris[i], int(batch["image_w"][i]), int(batch["image_h"][i]), problem)
        ok = [i for i in range(n) if i in records]
        bad = [i for i in range(n) if i not in records]
        parts = []
        if ok:
            table = records_to_table([records[i] for i in ok], self.meta)
            parts.append(self._with_row_columns(table, {
                "uri": [uris[i] for i in ok], "row": [plan_rows[i] for i in ok],
                "shard": [shards[i] for i in ok], "stage": [""] * len(ok), "reason": [""] * len(ok)}))
        if bad:
            parts.append(self._error_table([ids[i] for i in bad], {
                "uri": [uris[i] for i in bad], "row": [plan_rows[i] for i in bad],
                "shard": [shards[i] for i in bad], "stage": [stages[i] for i in bad],
                "reason": [reasons[i] for i in bad]}))
        return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def _record(self, image_id: Any, batch: dict[str, np.ndarray], i: int,
                result: dict[str, Any]) -> FeatureRecord:
        width, height = int(batch["image_w"][i]), int(batch["image_h"][i])
        decoded_w, decoded_h = _decoded_size(batch, i)
        scale_x, scale_y = decoded_w / width, decoded_h / height
        features = np.asarray(result["features"])
        if features.ndim == 2 and features.shape[0] == 0:
            # A port's selection may keep nothing (no class scores above its threshold); an
            # image without regions would break every consumer, so it is an error row.
            raise ValueError("the detector kept no regions for this image")
        if features.ndim == 2 and features.shape[1] != self.meta.feature_dim:
            raise ValueError(f"model gave {features.shape[1]}-d features, the store holds "
                             f"{self.meta.feature_dim}-d")
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(features.astype(np.float16)).all():
                raise ValueError("features are not finite in float16 (NaN, inf or beyond 65504)")
        return FeatureRecord(
            image_id=image_id.item() if isinstance(image_id, np.generic) else image_id,
            image_w=width, image_h=height,
            boxes=boxes_to_original(result["boxes"], scale_x, scale_y, width, height),
            features=features, object_ids=result.get("object_ids"),
            object_conf=result.get("object_conf"), attr_ids=result.get("attr_ids"),
            attr_conf=result.get("attr_conf"))

    def _row_arrays(self, values: dict[str, list]) -> dict[str, pa.Array]:
        return {name: pa.array(values[name], self.schema.field(name).type)
                for name in ("uri", "row", "shard", "stage", "reason")}

    def _with_row_columns(self, table: pa.Table, values: dict[str, list]) -> pa.Table:
        columns = {"image_id": table.column("image_id"), **self._row_arrays(values)}
        arrays = [columns[f.name] if f.name in columns else table.column(f.name)
                  for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _error_table(self, ids: list, values: dict[str, list]) -> pa.Table:
        id_type = self.schema.field("image_id").type
        clean = [i.item() if isinstance(i, np.generic) else i for i in ids]
        if pa.types.is_string(id_type):
            clean = [None if i is None else str(i) for i in clean]
        columns = {"image_id": pa.array(clean, id_type), **self._row_arrays(values)}
        arrays = [columns[f.name] if f.name in columns else pa.nulls(len(ids), f.type)
                  for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)
