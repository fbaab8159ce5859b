"""The region-feature store's on-disk layout (docs/features.md, "The feature store").

A store is a folder (local path, `s3://`, `gs://`) holding::

    <store>/features/part-00000.parquet   one row per image (this module's feature schema)
    <store>/errors/part-00000.parquet     one row per failed image (error schema)
    <store>/index.parquet                 image_id -> (file, row group, row), see reader.py

Shard files have deterministic names and only appear once complete (atomic write), so a
re-run can tell finished shards from unfinished ones. Always: input rows = feature rows +
error rows.

Feature rows (k = num_boxes, D = feature dim; every list column holds exactly k entries)::

    image_id     int64 or string (as the source; one type per store)
    image_w      int32            original image width in pixels
    image_h      int32            original image height in pixels
    num_boxes    int32            k
    boxes        list<fixed_size_list<float32>[4]>   k boxes x1, y1, x2, y2, original pixels
    features     list<fixed_size_list<float16>[D]>   k region features (stored as IEEE halfs)
    object_ids   list<int32>      detector class per box (0 = background / none)
    object_conf  list<float32>    its score
    attr_ids     list<int32>      attribute per box (0 = no attribute)
    attr_conf    list<float32>    its score

The ids are the detector's class indices: object class i is the vocabulary's line i (objects_vocab.txt
line 1 -> id 1), 0 being the background; attributes likewise, 0 being "no attribute".

Parquet stores `float16` natively (the FLOAT16 logical type over 2-byte fixed-length
binary); Arrow 15+ writes and reads it (apache/arrow#36036), and `pandas.read_parquet`
yields numpy float16 arrays. Plain pyarrow reads a row's features as
``np.asarray(table["features"][i].values.flatten()).reshape(-1, D)``.

File key-value metadata (all values UTF-8 strings; see `StoreMeta`): `feature_dim`,
`features_dtype` (float16), `boxes_dtype` (float32), `box_format` (xyxy_pixels),
`image_id_type`, `detector`, `detector_config` (JSON), `checkpoint_hash`, `schema_version`,
and `object_vocab` / `attribute_vocab` (JSON lists of names, indexed by id: entry 0 is the
background / "no attribute" entry, entry i names id i; empty when the producer has no
vocabulary, e.g. the grid baseline; absent in stores written before them, read as empty).

Error rows: `image_id` (int64 or string, null when no id could be derived), `uri`, `stage`
(e.g. read, decode, detect), `reason` (one line, human readable).
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

from ray_updown import storage
from ray_updown.errors import DataError, StorageError

SCHEMA_VERSION = "1"
BOX_FORMAT = "xyxy_pixels"
FEATURES_DTYPE = "float16"
BOXES_DTYPE = "float32"
IMAGE_ID_TYPES = ("int64", "string")

FEATURES_DIR = "features"
ERRORS_DIR = "errors"
INDEX_FILE = "index.parquet"
PLAN_FILE = "extract_plan.parquet"  # an extraction's plan (extraction/plan.py writes it)
# The extraction plan's metadata key for the decode and model settings the store's features
# depend on (extraction/plan_build.py writes it, exports compare it).
PLAN_SETTINGS_KEY = b"ray_updown.settings"
SHARD_NAME = "part-{shard:05d}.parquet"

# Columns whose per-row lists must all have num_boxes entries.
PER_BOX_COLUMNS = ("boxes", "features", "object_ids", "object_conf", "attr_ids", "attr_conf")


def _id_type(image_id_type: str) -> pa.DataType:
    if image_id_type not in IMAGE_ID_TYPES:
        raise DataError(f"image_id_type must be one of {IMAGE_ID_TYPES}, got {image_id_type!r}")
    return pa.int64() if image_id_type == "int64" else pa.string()


@dataclass
class StoreMeta:
    """What a store's files say about how their features were made."""

    feature_dim: int
    image_id_type: str = "int64"
    detector: str = "unknown"
    detector_config: dict[str, Any] = field(default_factory=dict)
    checkpoint_hash: str = ""
    schema_version: str = SCHEMA_VERSION
    # Names of the object / attribute ids, entry i for id i (see `aligned_vocab`).
    object_vocab: list[str] = field(default_factory=list)
    attribute_vocab: list[str] = field(default_factory=list)

    def to_kv(self) -> dict[bytes, bytes]:
        kv = {
            "feature_dim": str(int(self.feature_dim)),
            "features_dtype": FEATURES_DTYPE,
            "boxes_dtype": BOXES_DTYPE,
            "box_format": BOX_FORMAT,
            "image_id_type": self.image_id_type,
            "detector": self.detector,
            "detector_config": json.dumps(self.detector_config, sort_keys=True),
            "checkpoint_hash": self.checkpoint_hash,
            "schema_version": self.schema_version,
            "object_vocab": json.dumps(list(self.object_vocab)),
            "attribute_vocab": json.dumps(list(self.attribute_vocab)),
        }
        return {k.encode(): v.encode() for k, v in kv.items()}

    @classmethod
    def from_kv(cls, kv: Mapping[bytes, bytes] | None, file: str | None = None) -> "StoreMeta":
        kv = {k.decode(): v.decode() for k, v in (kv or {}).items()}
        if "feature_dim" not in kv:
            raise DataError("not a region-feature shard (no feature_dim in Parquet metadata)", file=file)
        if kv.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise DataError(f"schema version {kv['schema_version']} is not supported "
                            f"(this reader reads {SCHEMA_VERSION})", file=file)
        try:
            config = json.loads(kv.get("detector_config") or "{}")
            dim = int(kv["feature_dim"])
            # Stores written before the vocabularies existed have neither key: empty.
            vocabs = {key: json.loads(kv.get(key) or "[]") for key in ("object_vocab", "attribute_vocab")}
        except (ValueError, json.JSONDecodeError) as exc:
            raise DataError(f"malformed store metadata: {exc}", file=file) from None
        for key, names in vocabs.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(f"malformed store metadata: {key} is not a list of names", file=file)
        return cls(feature_dim=dim, image_id_type=kv.get("image_id_type", "int64"),
                   detector=kv.get("detector", "unknown"), detector_config=config,
                   checkpoint_hash=kv.get("checkpoint_hash", ""),
                   schema_version=kv.get("schema_version", SCHEMA_VERSION), **vocabs)

    def as_dict(self) -> dict[str, Any]:
        return {"feature_dim": self.feature_dim, "features_dtype": FEATURES_DTYPE,
                "boxes_dtype": BOXES_DTYPE, "box_format": BOX_FORMAT,
                "image_id_type": self.image_id_type, "detector": self.detector,
                "detector_config": dict(self.detector_config),
                "checkpoint_hash": self.checkpoint_hash, "schema_version": self.schema_version,
                "object_vocab": list(self.object_vocab), "attribute_vocab": list(self.attribute_vocab)}


def aligned_vocab(names: list[str] | None, size: int | None, zero_name: str) -> list[str]:
    """A detector's vocabulary as a store keeps it: entry i names id i, entry 0 `zero_name`.

    Detectors carry either the full list (`size` entries with the background / "no attribute"
    entry first, as detector training writes it) or only the real classes (`size` - 1, the lines
    of objects_vocab.txt). With `size` unknown the list is taken as aligned already. Any other
    length cannot be mapped to ids: ValueError.
    """
    names = [str(n) for n in names or []]
    if not names or size is None or len(names) == size:
        return names
    if len(names) == size - 1:
        return [zero_name] + names
    raise ValueError(f"{len(names)} names for {size} class ids (expected {size} with the "
                     f"'{zero_name}' entry first, or {size - 1} without it)")


def feature_schema(meta: StoreMeta) -> pa.Schema:
    """The Arrow schema of feature shards for a store with `meta` (D is part of the type)."""
    dim = int(meta.feature_dim)
    if dim <= 0:
        raise DataError(f"feature_dim must be positive, got {dim}")
    return pa.schema([
        pa.field("image_id", _id_type(meta.image_id_type), nullable=False),
        pa.field("image_w", pa.int32(), nullable=False),
        pa.field("image_h", pa.int32(), nullable=False),
        pa.field("num_boxes", pa.int32(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        pa.field("features", pa.list_(pa.list_(pa.float16(), dim))),
        pa.field("object_ids", pa.list_(pa.int32())),
        pa.field("object_conf", pa.list_(pa.float32())),
        pa.field("attr_ids", pa.list_(pa.int32())),
        pa.field("attr_conf", pa.list_(pa.float32())),
    ], metadata=meta.to_kv())


def error_schema(image_id_type: str = "string") -> pa.Schema:
    """The Arrow schema of error shards: one row per image that produced no features."""
    return pa.schema([
        pa.field("image_id", _id_type(image_id_type), nullable=True),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
    ], metadata={b"schema_version": SCHEMA_VERSION.encode()})


SHARD_FILE = re.compile(r"^part-\d+\.parquet$")  # a shard's part; temporary files never match


@dataclass(frozen=True)
class ShardFile:
    """One shard part found in a store's folder, with what its listing said of it."""

    name: str
    uri: str
    size: int
    info: Mapping[str, Any]

    @property
    def number(self) -> int:
        return int(self.name[len("part-"):-len(".parquet")])


def list_shards(store_uri: str, folder: str) -> list[ShardFile]:
    """The shard parts in <store>/<folder>, sorted by name ([] when the folder is absent): the
    one listing of a store's shards, by the reader, the shared copy and the extraction."""
    uri = storage.join(store_uri, folder)
    fs, path = storage.filesystem(uri)
    try:
        found = fs.find(path, detail=True, maxdepth=1) if fs.exists(path) else {}
    except Exception as exc:
        raise StorageError(f"cannot list ({type(exc).__name__})", file=uri) from None
    parts = []
    for key, info in found.items():
        name = posixpath.basename(key.rstrip("/"))
        if SHARD_FILE.match(name):
            parts.append(ShardFile(name, storage.join(uri, name), int(info.get("size") or 0), info))
    return sorted(parts, key=lambda part: part.name)


def shard_name(shard: int) -> str:
    if shard < 0:
        raise ValueError(f"shard number must be >= 0, got {shard}")
    return SHARD_NAME.format(shard=shard)
