"""Which images an extraction run processes, their ids, and their deterministic shards.

Inputs come from a URI prefix or glob (`list_images`) or a manifest (`read_manifest`: Parquet,
CSV or JSON lines with `image_id` and `uri` columns). Without a manifest, ids follow the file
naming of the public data sets: COCO `COCO_val2014_000000391895.jpg` -> 391895, COCO 2017
`000000391895.jpg` -> 391895, Visual Genome `2345.jpg` -> 2345. When any name does not follow
them, every id is the path relative to the prefix (strings), so a store has one id type.

`plan_shards` sorts by URI and cuts the list into shards of `rows_per_shard`. The plan is
saved beside the output (`extract_plan.parquet`) on the first run and is the source of truth
afterwards: a re-run keeps every planned image in its shard and gives images that appeared
since then new shards after the last one, so a finished shard never changes meaning. An image
whose id or URI repeats one already planned becomes an error row (stage "list"), not a
silent duplicate. Each plan row's position (`row`) identifies it through the pipeline.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PLAN_FILE = "extract_plan.parquet"
# COCO 2014 (COCO_<split>2014_<12 digits>), COCO 2017 (12 digits) and VG (<digits>).
_ID_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d{4}_)?(\d{1,18})$")


@dataclass
class InputImage:
    """One input row. A non-empty `reason` means the row is already an error (stage "list")."""

    image_id: int | str
    uri: str
    shard: int = -1
    stage: str = ""
    reason: str = ""
    row: int = -1  # position in the plan: the row's identity through the pipeline


def image_id_from_name(uri: str) -> int | None:
    """The integer id in a COCO / VG file name, or None when the name follows neither."""
    stem = posixpath.basename(str(uri)).rsplit(".", 1)[0]
    match = _ID_NAME.match(stem)
    return int(match.group(1)) if match else None


def _relative(uri: str, root: str) -> str:
    root = str(root).rstrip("/")
    if any(ch in root for ch in "*?["):  # a glob: relative to its fixed leading folders
        root = root[: min(root.find(ch) for ch in "*?[" if ch in root)].rsplit("/", 1)[0]
    rel = str(uri)[len(root):] if str(uri).startswith(root) else posixpath.basename(str(uri))
    return rel.lstrip("/") or posixpath.basename(str(uri))


def list_images(images_uri: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[InputImage]:
    """Images under a prefix (recursively) or matching a glob, with ids from their names."""
    uris = storage.list_files(images_uri, tuple(suffixes) or None)
    ids = [image_id_from_name(u) for u in uris]
    if any(i is None for i in ids):
        ids = [_relative(u, images_uri) for u in uris]
    return [InputImage(image_id=i, uri=u) for i, u in zip(ids, uris)]


def _read_table(uri: str) -> pa.Table:
    pa_fs, path = storage.pyarrow_filesystem(uri)
    lower = uri.lower()
    try:
        if lower.endswith(".parquet"):
            return pq.read_table(path, filesystem=pa_fs)
        with pa_fs.open_input_stream(path) as f:
            if lower.endswith(".csv"):
                return pa_csv.read_csv(f)
            if lower.endswith((".jsonl", ".json", ".ndjson")):
                return pa_json.read_json(f)
    except FileNotFoundError:
        raise StorageError("no such manifest", file=uri) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"unreadable manifest ({exc})", file=uri) from None
    raise ConfigError("manifest must end in .parquet, .csv, .jsonl, .ndjson or .json (JSON lines)",
                      file=uri, record="manifest")


def read_manifest(manifest_uri: str, images_root: str | None = None) -> list[InputImage]:
    """Rows (image_id, uri) of a manifest; relative URIs resolve against `images_root`
    (default: the manifest's folder). Integer id columns give int ids, text columns strings."""
    table = _read_table(manifest_uri)
    missing = [c for c in ("image_id", "uri") if c not in table.column_names]
    if missing:
        raise DataError(f"manifest lacks column(s) {missing} (needs image_id and uri)",
                        file=manifest_uri)
    id_type = table.schema.field("image_id").type
    if pa.types.is_integer(id_type):
        as_id = int
    elif pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
        as_id = str
    else:
        raise DataError(f"image_id column must hold integers or strings, not {id_type}",
                        file=manifest_uri)
    root = images_root or posixpath.dirname(str(manifest_uri).rstrip("/"))
    out = []
    for n, (image_id, uri) in enumerate(zip(table.column("image_id").to_pylist(),
                                            table.column("uri").to_pylist())):
        if image_id is None or image_id == "" or uri is None or str(uri) == "":
            raise DataError("empty image_id or uri", file=manifest_uri, record=f"row {n}")
        uri = str(uri)
        if not (storage.is_remote(uri) or uri.startswith(("/", "file://"))):
            uri = storage.join(root, uri)
        out.append(InputImage(image_id=as_id(image_id), uri=uri))
    return out


def _id_kind(images: list[InputImage]) -> set[str]:
    return {"string" if isinstance(i.image_id, str) else "int64" for i in images}


def plan_shards(inputs: list[InputImage], rows_per_shard: int,
                previous: list[InputImage] | None = None) -> list[InputImage]:
    """Shard assignment: the previous plan unchanged, then new URIs (sorted) in new shards."""
    if rows_per_shard < 1:
        raise ConfigError(f"must be >= 1, got {rows_per_shard}", record="rows_per_shard")
    previous = list(previous or [])
    kinds = _id_kind(previous) | _id_kind(inputs)
    if len(kinds) > 1:
        raise DataError("image ids mix integers and strings (the store was started with one "
                        "kind, the inputs give the other); use a manifest or a new output")
    known = {p.uri for p in previous}
    # Stable sort: rows of a manifest naming one file twice keep their order.
    fresh = sorted((i for i in inputs if i.uri not in known), key=lambda i: i.uri)
    first_new = max((p.shard for p in previous), default=-1) + 1
    plan = [InputImage(p.image_id, p.uri, p.shard, p.stage, p.reason, n)
            for n, p in enumerate(previous)]
    plan += [InputImage(i.image_id, i.uri, first_new + n // rows_per_shard, row=len(previous) + n)
             for n, i in enumerate(fresh)]
    first_uri: dict[int | str, str] = {}
    first_id: dict[str, int | str] = {}
    for row in plan:  # previous rows first, so an already-stored image keeps its row
        if row.reason:
            continue
        if row.uri in first_id:
            row.stage, row.reason = "list", (f"duplicate uri (already listed as image id "
                                             f"{first_id[row.uri]!r})")
        elif row.image_id in first_uri:
            row.stage, row.reason = "list", (f"duplicate image id {row.image_id!r} "
                                             f"(first at {first_uri[row.image_id]})")
        else:
            first_uri[row.image_id], first_id[row.uri] = row.uri, row.image_id
    return plan


def plan_table(plan: list[InputImage]) -> pa.Table:
    id_type = pa.string() if _id_kind(plan) == {"string"} else pa.int64()
    return pa.table({
        "image_id": pa.array([p.image_id for p in plan], type=id_type),
        "uri": pa.array([p.uri for p in plan], type=pa.string()),
        "shard": pa.array([p.shard for p in plan], type=pa.int32()),
        "stage": pa.array([p.stage for p in plan], type=pa.string()),
        "reason": pa.array([p.reason for p in plan], type=pa.string()),
        "row": pa.array([p.row for p in plan], type=pa.int64()),
    })


def save_plan(out_uri: str, plan: list[InputImage]) -> None:
    with storage.atomic_write(storage.join(out_uri, PLAN_FILE), "wb") as f:
        pq.write_table(plan_table(plan), f, compression="zstd")


def load_plan(out_uri: str) -> list[InputImage] | None:
    """The saved plan of a store, or None when the store has none yet."""
    uri = storage.join(out_uri, PLAN_FILE)
    if not storage.exists(uri):
        return None
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        table = pq.read_table(path, filesystem=pa_fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"unreadable extraction plan ({exc}); delete it to re-plan", file=uri) from None
    cols = {c: table.column(c).to_pylist() for c in ("image_id", "uri", "shard", "stage", "reason")}
    return [InputImage(*values, row=n) for n, values in enumerate(zip(*cols.values()))]
