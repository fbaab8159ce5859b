"""Which images an extraction run processes and their ids, as Arrow tables (plan.py shards them).

Inputs come from a URI prefix or glob (`list_inputs`) or a manifest (`read_manifest`: Parquet,
CSV or JSON lines with `image_id` and `uri` columns, and optionally `boxes`). Without a
manifest, ids follow the file naming of the public data sets: COCO
`COCO_val2014_000000391895.jpg` -> 391895, COCO 2017 `000000391895.jpg` -> 391895, Visual Genome
`2345.jpg` -> 2345. When any name does not follow them, every id is the path relative to the
prefix (strings), so a store has one id type.

A listing takes the files whose suffix is an image suffix, in any case (`.JPG` counts). Every
other file under the prefix is skipped, never silently: `list_inputs` returns them with why
(`suffix`: not an image suffix, e.g. `.svg`, `.txt`; `hidden`: a name or folder below the
prefix starting with `.`, e.g. `.DS_Store`, macOS `._IMG_1.jpg`; `no name`: an object key
ending in `/`), and the run's summary counts and names them.

Memory: inputs are Arrow columns, never one Python object per image. An object-store prefix
is listed page by page (1000 keys a request); each page becomes Arrow arrays before the next
is fetched, so a listing of millions holds its URIs once, as Arrow strings.

Given boxes: a manifest's optional `boxes` column holds, per image, a list of [x1, y1, x2, y2]
in original pixels (null or [] where the detector should choose). It becomes the plan's
`given_boxes` column, Arrow list<list<float32>>.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BOXES_TYPE = pa.list_(pa.list_(pa.float32()))
# COCO 2014 (COCO_<split>2014_<12 digits>), COCO 2017 (12 digits) and VG (<digits>).
_ID_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d{4}_)?(\d{1,18})$")
_ID_REGEX = r"^(?:.*/)?(?:COCO_[A-Za-z]+\d{4}_)?(?P<id>\d{1,18})(?:\.[^./]*)?$"
_KEEP_SKIPPED = 10_000  # names kept of skipped files (all are counted)
S3_PAGE_KEYS = 1000  # keys per list request (S3's maximum)


@dataclass
class InputImage:
    """One input row, for small uses and tests; runs keep inputs and plans as Arrow tables."""

    image_id: int | str
    uri: str
    shard: int = -1
    stage: str = ""
    reason: str = ""
    row: int = -1  # position in the plan: the row's identity through the pipeline


@dataclass
class InputListing:
    """The images of a prefix or glob (`table`: image_id, uri, size, version: what the listing
    says of each file, so a re-run sees a file replaced under its name), and the files under it that are
    not taken: counted by reason, the first `_KEEP_SKIPPED` named in `skipped` (uri, why)."""

    table: pa.Table
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_by_reason: Counter = field(default_factory=Counter)

    @property
    def images(self) -> list[InputImage]:
        """The table as objects (small listings only)."""
        return [InputImage(i, u) for i, u in zip(self.table.column("image_id").to_pylist(),
                                                 self.table.column("uri").to_pylist())]

    def skipped_summary(self, first: int = 50) -> dict[str, object]:
        """{count, by_reason, first: the first `first` skipped URIs (sorted)} for the summary."""
        return {"count": int(sum(self.skipped_by_reason.values())),
                "by_reason": dict(sorted(self.skipped_by_reason.items())),
                "first": [uri for uri, _ in self.skipped[:first]]}


def image_id_from_name(uri: str) -> int | None:
    """The integer id in a COCO / VG file name, or None when the name follows neither."""
    stem = posixpath.basename(str(uri)).rsplit(".", 1)[0]
    match = _ID_NAME.match(stem)
    return int(match.group(1)) if match else None


def _glob_root(root: str) -> str:
    if any(ch in root for ch in "*?["):  # a glob: relative to its fixed leading folders
        root = root[: min(root.find(ch) for ch in "*?[" if ch in root)].rsplit("/", 1)[0]
    return root


def _relative(uri: str, root: str) -> str:
    root = _glob_root(str(root).rstrip("/"))
    rel = str(uri)[len(root):] if str(uri).startswith(root) else posixpath.basename(str(uri))
    return rel.lstrip("/") or posixpath.basename(str(uri))


def _normal_suffixes(suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """Lower case with a leading dot: "JPG", ".jpg" and ".JPG" are one suffix."""
    out = [str(x).strip().lower() for x in suffixes if str(x).strip()]
    return tuple(x if x.startswith(".") else "." + x for x in out)


def _skip_reason(uri: str, root: str, suffixes: tuple[str, ...]) -> str:
    """Why a listed file is not an input ("" when it is one)."""
    if str(uri).endswith("/") or not posixpath.basename(str(uri)):
        return "no name"
    # Only the part below the prefix counts: a prefix inside a hidden folder is the user's choice.
    if any(part.startswith(".") for part in _relative(uri, root).split("/")):
        return "hidden"
    if suffixes and not str(uri).lower().endswith(suffixes):
        return "suffix"
    return ""


def _pages(images_uri: str) -> Iterator[list[tuple[str, int, str]]]:
    """The files under a prefix, a page at a time (object stores: one list request a page;
    local folders: one directory a page), each as (uri, size, version): the version is what
    changes when the file is replaced (an object's ETag, a local file's modification time in
    ns). Globs are expanded in one go."""
    fs, path = storage.filesystem(images_uri)
    with storage.listing_errors(images_uri):
        if any(ch in path for ch in "*?["):
            found = fs.glob(path, detail=True)
            yield [_entry(images_uri, p, info) for p, info in sorted(found.items())
                   if info.get("type") != "directory"]
        elif fs.isfile(path):
            yield [_entry(images_uri, path, fs.info(path))]
        elif str(images_uri).startswith("s3://") and hasattr(fs, "_list_pages"):
            yield from _s3_pages(fs, path)
        elif not storage.is_remote(images_uri) and os.path.isdir(path):
            for folder, dirs, _ in os.walk(path):
                dirs.sort()
                with os.scandir(folder) as entries:
                    yield [(e.path, e.stat().st_size, str(e.stat().st_mtime_ns))
                           for e in entries if e.is_file()]
        elif fs.isdir(path):
            yield [_entry(images_uri, p, info) for p, info in
                   sorted(fs.find(path, detail=True).items())]
        else:
            raise StorageError("no such file or prefix", file=images_uri)


def _entry(images_uri: str, path: str, info: dict) -> tuple[str, int, str]:
    """(uri, size, version) from a listing's entry; a local file's as os.walk gives them."""
    uri = storage._unprotocol(images_uri, path)
    if not storage.is_remote(images_uri):
        stat = os.stat(path)
        return uri, stat.st_size, str(stat.st_mtime_ns)
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    return uri, int(info.get("size") or 0), str(version or "").strip('"')


def _s3_pages(fs, path: str) -> Iterator[list[tuple[str, int, str]]]:
    from fsspec.asyn import sync

    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    pages = fs._list_pages("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=S3_PAGE_KEYS)
    while True:
        try:
            page = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        yield [(f"s3://{bucket}/{c['Key']}", int(c.get("Size") or 0), str(c.get("ETag") or "").strip('"'))
               for c in page.get("Contents", [])]


def _ids_from_names(uris: pa.ChunkedArray, images_uri: str) -> pa.ChunkedArray:
    """COCO / VG ids from the file names, or every id the relative path when any is not one."""
    found = pc.extract_regex(uris, _ID_REGEX)
    if len(uris) and not found.null_count:
        return pc.cast(pc.struct_field(found, "id"), pa.int64())
    root = _glob_root(str(images_uri).rstrip("/"))
    if not storage.is_remote(images_uri):
        root = storage.filesystem(root)[1] if root else root
    rel = pc.utf8_ltrim(pc.utf8_slice_codeunits(uris, len(root)), characters="/")
    base = pc.struct_field(pc.extract_regex(uris, r"(?P<b>[^/]*)$"), "b")
    rel = pc.if_else(pc.equal(rel, ""), base, rel)
    return pc.if_else(pc.starts_with(uris, root), rel, base)


def list_inputs(images_uri: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> InputListing:
    """Images under a prefix (recursively) or matching a glob, sorted by URI, with ids from
    their names, and the skipped files (see the module docstring)."""
    wanted = _normal_suffixes(tuple(suffixes))
    # Local listings come back as absolute paths: compare them with an absolute prefix.
    root = images_uri if storage.is_remote(images_uri) else storage.filesystem(images_uri)[1]
    chunks, skipped, reasons = [], [], Counter()
    for page in _pages(images_uri):
        keep = []
        for entry in page:
            why = _skip_reason(entry[0], root, wanted)
            if not why:
                keep.append(entry)
                continue
            reasons[why] += 1
            if len(skipped) < _KEEP_SKIPPED:
                skipped.append((entry[0], why))
        chunks.append(pa.table({"uri": pa.array([e[0] for e in keep], pa.string()),
                                "size": pa.array([e[1] for e in keep], pa.int64()),
                                "version": pa.array([e[2] for e in keep], pa.string())}))
    files = pa.concat_tables(chunks) if chunks else pa.table(
        {"uri": pa.array([], pa.string()), "size": pa.array([], pa.int64()),
         "version": pa.array([], pa.string())})
    files = files.take(pc.sort_indices(files.column("uri")))
    uris = files.column("uri")
    table = pa.table({"image_id": _ids_from_names(uris, images_uri), "uri": uris,
                      "size": files.column("size"), "version": files.column("version")})
    return InputListing(table, sorted(skipped), reasons)


def list_images(images_uri: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[InputImage]:
    """The images of `list_inputs` as objects, without the skipped files (small listings)."""
    return list_inputs(images_uri, suffixes).images


def read_parquet_lean(source, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's `columns` (those it has), a row group at a time on one thread: the
    table plus one group's buffers, not the whole file's decode buffers at once."""
    file = pq.ParquetFile(source, pre_buffer=False)
    names = file.schema_arrow.names
    columns = [c for c in columns if c in names] if columns else names
    groups = [file.read_row_group(i, columns=columns, use_threads=False)
              for i in range(file.num_row_groups)]
    return pa.concat_tables(groups) if groups else file.schema_arrow.empty_table().select(columns)


def _manifest_parts(uri: str, columns: list[str], rows: int) -> Iterator[pa.Table]:
    """A manifest's `columns` (those it has) about `rows` rows at a time, streamed."""
    pa_fs, path = storage.pyarrow_filesystem(uri)
    lower = uri.lower()
    if not lower.endswith((".parquet", ".csv", ".jsonl", ".json", ".ndjson")):
        raise ConfigError("manifest must end in .parquet, .csv, .jsonl, .ndjson or .json (JSON lines)",
                          file=uri, record="manifest")
    try:
        if lower.endswith(".parquet"):
            file = pq.ParquetFile(pa_fs.open_input_file(path), pre_buffer=False)
            names = [c for c in columns if c in file.schema_arrow.names]
            parts = (pa.Table.from_batches([b]) for b in
                     file.iter_batches(batch_size=rows, columns=names, use_threads=False))
            yield from parts if file.metadata.num_rows else [file.schema_arrow.empty_table().select(names)]
            return
        with pa_fs.open_input_stream(path) as f:
            reader = (pa_csv.open_csv(f, read_options=pa_csv.ReadOptions(block_size=rows * 64))
                      if lower.endswith(".csv") else
                      pa_json.open_json(f, read_options=pa_json.ReadOptions(block_size=rows * 64)))
            for batch in reader:
                yield pa.Table.from_batches([batch]).select(
                    [c for c in columns if c in batch.schema.names])
    except FileNotFoundError:
        raise StorageError("no such manifest", file=uri) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"unreadable manifest ({exc})", file=uri) from None


def _first(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), bool))[0])


def _boxes_column(column: pa.ChunkedArray, uri: str, offset: int = 0) -> pa.ChunkedArray:
    """A manifest's `boxes` as list<list<float32>>; CSV cells may hold JSON text."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        import json

        values = []
        for n, text in enumerate(column.to_pylist()):
            try:
                values.append(json.loads(text) if text not in (None, "") else None)
            except ValueError:
                raise DataError("boxes is not a JSON list of [x1, y1, x2, y2]", file=uri,
                                record=f"row {offset + n + 1}") from None
        column = pa.chunked_array([pa.array(values)]) if values else column
    try:
        return pc.cast(column, BOXES_TYPE) if len(column) else column.cast(BOXES_TYPE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"boxes column must hold, per image, a list of [x1, y1, x2, y2] "
                        f"({column.type}: {exc})", file=uri) from None


def read_manifest(manifest_uri: str, images_root: str | None = None) -> pa.Table:
    """The whole manifest as one table (`manifest_batches`, for small manifests and tests)."""
    parts = list(manifest_batches(manifest_uri, images_root))
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def manifest_batches(manifest_uri: str, images_root: str | None = None,
                     rows: int = 1 << 20) -> Iterator[pa.Table]:
    """image_id, uri (relative URIs resolved against `images_root`, default the manifest's
    folder) and, when the manifest has boxes, given_boxes, about `rows` rows at a time.
    Integer id columns give int64 ids, text columns strings. An error names the row
    (its data rows counted from 1 over the whole manifest, the header not counted)."""
    offset, kind = 0, None
    for table in _manifest_parts(manifest_uri, ["image_id", "uri", "boxes"], rows):
        batch = _manifest_batch(table, manifest_uri, images_root, offset)
        if kind is not None and batch.schema.field("image_id").type != kind:
            raise DataError(f"image_id changes type at row {offset} ({kind} before, "
                            f"{batch.schema.field('image_id').type} here)", file=manifest_uri)
        kind = batch.schema.field("image_id").type
        offset += table.num_rows
        yield batch


def _manifest_batch(table: pa.Table, manifest_uri: str, images_root: str | None,
                    offset: int) -> pa.Table:
    missing = [c for c in ("image_id", "uri") if c not in table.column_names]
    if missing:
        raise DataError(f"manifest lacks column(s) {missing} (needs image_id and uri)",
                        file=manifest_uri)
    ids, uris = table.column("image_id"), table.column("uri")
    if pa.types.is_integer(ids.type):
        ids = pc.cast(ids, pa.int64())
    elif pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        ids = pc.cast(ids, pa.string())
    else:
        raise DataError(f"image_id column must hold integers or strings, not {ids.type}",
                        file=manifest_uri)
    uris = pc.cast(uris, pa.string())
    empty = pc.or_kleene(pc.is_null(uris), pc.equal(uris, ""))
    empty = pc.or_kleene(empty, pc.is_null(ids))
    if pa.types.is_string(ids.type):
        empty = pc.or_kleene(empty, pc.equal(ids, ""))
    empty = pc.fill_null(empty, True)
    if pc.any(empty).as_py():
        raise DataError("empty image_id or uri", file=manifest_uri,
                        record=f"row {offset + _first(empty) + 1}")
    root = (images_root or posixpath.dirname(str(manifest_uri).rstrip("/"))).rstrip("/")
    absolute = pc.or_(pc.match_substring_regex(uris, r"^[a-z][a-z0-9+.-]*://"),
                      pc.starts_with(uris, "/"))
    if not pc.all(absolute).as_py():  # (joined only when needed: a copy of every URI)
        sep = "/" if storage.is_remote(root) or root.startswith("file://") else os.sep
        uris = pc.if_else(absolute, uris, pc.binary_join_element_wise(root, uris, sep))
    columns = {"image_id": ids, "uri": uris}
    if "boxes" in table.column_names:
        columns["given_boxes"] = _boxes_column(table.column("boxes"), manifest_uri, offset)
    return pa.table(columns)
