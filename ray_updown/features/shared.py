"""One read-only, padding-free copy of a feature store per node, memory-mapped by every process.

Why: a trial that decodes the store into its own padded tensor [images, K, D] holds mostly
padding (K = max_boxes) and holds it once per trial: eight trials of COCO at K = 100 need
~400 GB. Here the store is decoded ONCE per node into flat NumPy files under a node-local
cache folder (default the temp folder, on disk); every trial, DDP worker and DataLoader process on
the node maps them with `np.load(mmap_mode="r")`. The pages are the kernel's page cache,
shared by all the mappings, so N processes hold ~1x the features (measure PSS, not RSS: RSS
counts every shared page once per process). Batches are padded when gathered, to the batch's
own largest region count.

A cache is a folder `<cache_dir>/<key>/`; `key` hashes the store's URI and the name, size and
modification time (or ETag) of each feature shard, so a cache of another store, or of an
older version of this one, is never reused::

    manifest.json   key, store URI, shard listing, counts (written last)
    features.npy    [R, D] float16  every region of every image, image after image
    boxes.npy       [R, 4] float32  x1 y1 x2 y2, original pixels
    offsets.npy     [I + 1] int64   image i's regions are rows offsets[i]:offsets[i + 1]
    sizes.npy       [I, 2] int32    image_w, image_h
    image_ids.npy   [I] int64 or unicode (the store's id type), in the same order

It is built under an exclusive lock (`<key>.lock`, flock), in a temporary folder renamed to
`<key>` when complete: concurrent trials build it once, and a half-written copy (a build that
was killed) is never under the final name. A final folder that fails its checks (a file cut
short, a manifest of another key) is set aside and rebuilt. Caches are not evicted:
`remove_cache` deletes one. The default folder is on disk, not /dev/shm: the page cache shares
the pages just as well and the kernel can drop them, where a /dev/shm copy would hold RAM after
every run (the demo alone would leave several) until someone deletes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.features.records import DecodedRows
from ray_updown.features.schema import FEATURES_DIR, StoreMeta, list_shards
from ray_updown.memory import memory_available

log = logging.getLogger(__name__)

VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("features", "boxes", "offsets", "sizes", "image_ids")
_INFO_KEYS = ("size", "mtime", "ETag", "etag", "LastModified", "last_modified", "generation")


def default_cache_dir() -> str:
    """$RAY_UPDOWN_FEATURE_CACHE, else `ray-updown-features` in the node's temp folder."""
    if os.environ.get("RAY_UPDOWN_FEATURE_CACHE"):
        return os.environ["RAY_UPDOWN_FEATURE_CACHE"]
    return os.path.join(tempfile.gettempdir(), "ray-updown-features")


def store_fingerprint(store_uri: str) -> dict[str, Any]:
    """The store's identity: its URI and (name, size, mtime/ETag) of each feature shard."""
    uri = str(store_uri).rstrip("/")
    if not storage.is_remote(uri) and not uri.startswith("file://"):
        uri = os.path.abspath(uri)
    shards = [[part.name] + [str(part.info[k]) for k in _INFO_KEYS if part.info.get(k) is not None]
              for part in list_shards(uri, FEATURES_DIR)]
    if not shards:
        raise StorageError("not a feature store with features (no shards under features/)",
                           file=uri)
    return {"store": uri, "shards": shards}


def cache_key(fingerprint: dict[str, Any]) -> str:
    blob = json.dumps({"version": VERSION, **fingerprint}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class SharedFeatures:
    """A cache folder's arrays, memory-mapped read-only (see the module docstring).

    Pickles as its folder (DataLoader workers, Ray tasks remap the same files)."""

    def __init__(self, path: str, key: str | None = None):
        self.path = path
        self.manifest = _read_manifest(path, key)
        self.key = self.manifest["key"]
        arrays = {name: _load(path, name) for name in ARRAYS}
        self.features, self.boxes = arrays["features"], arrays["boxes"]
        self.offsets, self.sizes, self.image_ids = arrays["offsets"], arrays["sizes"], arrays["image_ids"]
        _check_shapes(self)
        self._index: pd.Index | None = None

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_regions(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, name).nbytes for name in ARRAYS))

    def rows(self, image_ids: Sequence[Any]) -> np.ndarray:
        """Row (image index) of each id; a DataError names the first id not in the copy."""
        if self._index is None:
            self._index = pd.Index(self.image_ids)
        keys = [i.item() if isinstance(i, np.generic) else i for i in image_ids]
        rows = self._index.get_indexer(pd.Index(keys, dtype=self._index.dtype)
                                       if keys else pd.Index([], dtype=self._index.dtype))
        if (rows < 0).any():
            missing = keys[int(np.flatnonzero(rows < 0)[0])]
            raise DataError(f"image id {missing!r} is not in the shared copy of "
                            f"{self.manifest['store']}", file=self.path)
        return rows.astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["key"])


def _read_manifest(path: str, key: str | None) -> dict[str, Any]:
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DataError("no manifest: the shared copy is incomplete", file=file) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable manifest ({exc})", file=file) from None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION:
        raise DataError(f"manifest version is not {VERSION}", file=file)
    if key is not None and manifest.get("key") != key:
        raise DataError(f"manifest is of key {manifest.get('key')}, expected {key}", file=file)
    return manifest


def _load(path: str, name: str) -> np.ndarray:
    file = os.path.join(path, f"{name}.npy")
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError("missing from the shared copy", file=file) from None
    except (OSError, ValueError) as exc:  # a file cut short cannot be mapped at its shape
        raise DataError(f"unreadable ({exc})", file=file) from None


def _check_shapes(s: SharedFeatures) -> None:
    m = s.manifest
    images, regions, dim = m.get("images"), m.get("regions"), m.get("feature_dim")
    expect = {"features": ((regions, dim), np.float16), "boxes": ((regions, 4), np.float32),
              "offsets": ((images + 1,) if isinstance(images, int) else None, np.int64),
              "sizes": ((images, 2), np.int32), "image_ids": ((images,), None)}
    for name, (shape, dtype) in expect.items():
        arr = getattr(s, name)
        if arr.shape != shape or (dtype is not None and arr.dtype != dtype):
            raise DataError(f"shape {arr.shape} {arr.dtype}, the manifest says {shape} "
                            f"{np.dtype(dtype) if dtype else ''}".rstrip(),
                            file=os.path.join(s.path, f"{name}.npy"))
    if images and (s.offsets[0] != 0 or s.offsets[-1] != regions):
        raise DataError("offsets do not span the regions", file=os.path.join(s.path, "offsets.npy"))


@contextlib.contextmanager
def _locked(cache_dir: str, key: str) -> Iterator[None]:
    # flock: released by the kernel if the holder dies, so a killed build never wedges a node.
    with open(os.path.join(cache_dir, f"{key}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_shared(store_uri: str, cache_dir: str | None = None) -> SharedFeatures | None:
    """The node's valid copy of the store, or None (no copy, or one that fails its checks)."""
    key = cache_key(store_fingerprint(store_uri))
    try:
        return SharedFeatures(os.path.join(cache_dir or default_cache_dir(), key), key)
    except DataError:
        return None


def shared_features(store_uri: str, cache_dir: str | None = None) -> SharedFeatures:
    """The node's shared copy of the store, built first when there is none (once per node)."""
    cache_dir = cache_dir or default_cache_dir()
    fingerprint = store_fingerprint(store_uri)
    key = cache_key(fingerprint)
    final = os.path.join(cache_dir, key)
    with contextlib.suppress(DataError):
        return SharedFeatures(final, key)  # the common case: built by an earlier process
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the feature cache folder ({exc})", file=cache_dir) from None
    with _locked(cache_dir, key):
        if os.path.exists(final):
            try:
                return SharedFeatures(final, key)  # another process built it while we waited
            except DataError as exc:
                log.warning("rebuilding the shared feature copy: %s", exc)
                aside = f"{final}.bad-{uuid.uuid4().hex[:8]}"
                os.rename(final, aside)  # processes mapping it keep their pages
                shutil.rmtree(aside, ignore_errors=True)
        for stale in glob.glob(f"{final}.tmp-*"):  # builds that were killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(fingerprint, key, tmp)
            if store_fingerprint(store_uri) != fingerprint:
                raise DataError("the store changed while it was being copied; retry",
                                file=fingerprint["store"])
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("shared feature copy of %s built at %s", fingerprint["store"], final)
    return SharedFeatures(final, key)


def remove_cache(store_uri: str, cache_dir: str | None = None) -> bool:
    """Delete the node's copy of a store (mappings still open keep working). True if one was."""
    cache_dir = cache_dir or default_cache_dir()
    key = cache_key(store_fingerprint(store_uri))
    final = os.path.join(cache_dir, key)
    if not os.path.isdir(final):
        return False
    with _locked(cache_dir, key):
        shutil.rmtree(final, ignore_errors=True)
    return True


def _shard_uris(fingerprint: dict[str, Any]) -> list[str]:
    return [storage.join(fingerprint["store"], FEATURES_DIR, s[0]) for s in fingerprint["shards"]]


def scan_store(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Images, regions, D and id type of a store from its shards' footers and two small
    columns (no features decoded): what a copy would hold, before building it."""
    images = regions = 0
    meta: StoreMeta | None = None
    for uri in _shard_uris(fingerprint):
        pf = storage.open_parquet(uri)
        file_meta = StoreMeta.from_kv(pf.schema_arrow.metadata, file=uri)
        if meta is not None and file_meta.feature_dim != meta.feature_dim:
            raise DataError(f"feature dim {file_meta.feature_dim} differs from the other shards' "
                            f"{meta.feature_dim}", file=uri)
        meta = meta or file_meta
        counts = pf.read(columns=["num_boxes"], use_threads=False).column("num_boxes")
        images += len(counts)
        regions += int(pc.sum(counts).as_py() or 0)
    assert meta is not None  # store_fingerprint found shards
    dim = meta.feature_dim
    nbytes = regions * (dim * 2 + 16) + images * (8 + 8 + 8)
    return {"images": images, "regions": regions, "feature_dim": dim,
            "image_id_type": meta.image_id_type, "nbytes": nbytes}


def _build(fingerprint: dict[str, Any], key: str, tmp: str) -> None:
    """Decode the store row group by row group straight into the .npy files of `tmp`."""
    info = scan_store(fingerprint)
    images, regions, dim = info["images"], info["regions"], info["feature_dim"]
    os.makedirs(tmp)
    ids_dtype = np.int64 if info["image_id_type"] == "int64" else None
    mm = np.lib.format.open_memmap
    feats = mm(os.path.join(tmp, "features.npy"), "w+", np.float16, (regions, dim))
    boxes = mm(os.path.join(tmp, "boxes.npy"), "w+", np.float32, (regions, 4))
    offsets = np.zeros(images + 1, np.int64)
    sizes = np.zeros((images, 2), np.int32)
    ids: list[Any] = []
    i = r = 0
    for uri in _shard_uris(fingerprint):
        pf = storage.open_parquet(uri)
        for rg in range(pf.num_row_groups):
            try:
                group = DecodedRows(pf.read_row_group(rg, use_threads=False), file=uri)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(f"cannot read row group {rg} ({exc})", file=uri) from None
            n, k = len(group), int(group.offsets[-1])
            if group.feature_dim != dim or i + n > images or r + k > regions:
                raise DataError(f"row group {rg} does not match the shard footers (D "
                                f"{group.feature_dim}, {n} images, {k} regions)", file=uri)
            feats[r:r + k] = group.values["features"]
            boxes[r:r + k] = group.values["boxes"]
            offsets[i + 1:i + n + 1] = r + group.offsets[1:]
            sizes[i:i + n, 0], sizes[i:i + n, 1] = group.image_w, group.image_h
            ids.extend(group.image_ids)
            i, r = i + n, r + k
    if (i, r) != (images, regions):
        raise DataError(f"read {i} images / {r} regions, the footers say {images} / {regions}",
                        file=fingerprint["store"])
    id_array = np.asarray(ids, dtype=ids_dtype) if ids else np.zeros(0, ids_dtype or "U1")
    if not pd.Index(id_array).is_unique:
        dup = pd.Index(id_array)[pd.Index(id_array).duplicated()][0]
        raise DataError(f"image id {dup!r} appears more than once", file=fingerprint["store"])
    feats.flush()
    boxes.flush()
    del feats, boxes
    for name, arr in (("offsets", offsets), ("sizes", sizes), ("image_ids", id_array)):
        np.save(os.path.join(tmp, f"{name}.npy"), arr, allow_pickle=False)
    manifest = {"version": VERSION, "key": key, **fingerprint, "images": images,
                "regions": regions, "feature_dim": dim, "image_id_type": info["image_id_type"]}
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # last: its presence marks completeness
        json.dump(manifest, f)


def shared_copy_fits(store_uri: str, cache_dir: str | None = None,
                     memory_share: float = 0.5) -> tuple[bool, str]:
    """Whether the node should hold a shared copy: one is already there, or the copy fits
    the cache folder's free space and `memory_share` of the node's available memory.
    Returns (decision, reason) for the log."""
    cache_dir = cache_dir or default_cache_dir()
    if find_shared(store_uri, cache_dir) is not None:
        return True, "a shared copy is already on this node"
    need = scan_store(store_fingerprint(store_uri))["nbytes"]
    probe = cache_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "/"
    free, available = shutil.disk_usage(probe).free, memory_available()
    gib = 2 ** 30
    if need > free:
        return False, f"the copy ({need / gib:.2f} GiB) exceeds {probe}'s free {free / gib:.2f} GiB"
    if available and need > memory_share * available:
        return False, (f"the copy ({need / gib:.2f} GiB) exceeds {memory_share:g} of available "
                       f"memory ({available / gib:.2f} GiB)")
    return True, f"the copy ({need / gib:.2f} GiB) fits {cache_dir} and memory"
