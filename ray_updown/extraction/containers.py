"""Image sets stored in containers: WebDataset tar shards and Parquet tables of image bytes.

Large image sets are rarely loose files. img2dataset and webdataset write tar shards
(`00000.tar`, with `00000.parquet` of per-sample metadata beside it), in which a sample is
the run of members sharing a key, the member name up to the first dot of its base name:
`000000012.jpg`, `000000012.json`, `000000012.txt`. img2dataset's Parquet output and the
Hugging Face `datasets` export hold the image bytes in a column instead: a binary `jpg`
beside `key`, `url`, `status`, or an `image` struct of {bytes, path}.

Planning reads no image (container_plan.py); this module holds what a container is and how
it is read: `table_spec` and `tar_spec` look at the first file, the actor reads samples.

Reading runs in the actor: `tar_samples` streams one tar once, front to back (one sequential
read, nothing extracted to disk), and `table_samples` a shard's row groups, both as chunks of
rows (image_id, uri, data, stage, reason, row) that the decode stage takes as it takes files'
bytes. A sample's `uri` names where it lives: `<tar>#<member>` or `<table>#row<N>` (counted
from 0 within the file).

Accounting: a sample without an image member, a JSON sidecar without the id field, a tar
damaged mid-way (the sample it was in, or the tar itself when no sample was read) are error
rows; the samples read before the damage count. A table row whose `status` says the download
failed is skipped and counted, not an error.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, StorageError
from ray_updown.extraction.inputs import IMAGE_SUFFIXES

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet",)
ID_COLUMNS = ("image_id", "id", "key")  # an id column chosen by name when it is the only one
CHUNK_COLUMNS = ("image_id", "uri", "data", "stage", "reason", "row")
# What a damaged tar raises while it is read (a network failure, an OSError, fails the shard
# instead, so that a re-run reads it again).
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, ValueError)


@dataclass(frozen=True)
class ContainerSpec:
    """How the actor reads samples out of a container.

    kind: "tar" or "table". image_column: the table's column of image bytes ("jpg", or
    "image.bytes" inside a struct). id_column: the table's id column, or the field of a tar
    sample's `.json` that holds its id ("" in a tar: the key). id_type: "int64" or "string".
    status_column: the table's download status column ("" when it has none)."""

    kind: str
    id_type: str = "string"
    image_column: str = ""
    id_column: str = ""
    status_column: str = ""
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES


def _image_candidates(schema: pa.Schema) -> list[str]:
    """Columns that can hold image bytes: binary ones, and structs with a binary `bytes`."""
    out = []
    for f in schema:
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type):
            out.append(f.name)
        elif pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0 and (
                pa.types.is_binary(f.type.field("bytes").type)
                or pa.types.is_large_binary(f.type.field("bytes").type)):
            out.append(f"{f.name}.bytes")
    return out


def _column_type(schema: pa.Schema, path: str) -> pa.DataType | None:
    """The type at a column path ("key", "image.path"), None when the schema has none."""
    head, _, rest = path.partition(".")
    if head not in schema.names:
        return None
    kind = schema.field(head).type
    if rest:
        if not pa.types.is_struct(kind) or kind.get_field_index(rest) < 0:
            return None
        kind = kind.field(rest).type
    return kind


def _id_kind(kind: pa.DataType) -> str | None:
    if pa.types.is_integer(kind):
        return "int64"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    return None


def table_spec(uri: str, image_column: str = "", id_column: str = "",
               suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> ContainerSpec:
    """The columns to read from a Parquet image table, chosen from its schema where
    unambiguous; otherwise a ConfigError listing the candidates and the option to name one."""
    schema = storage.open_parquet(uri).schema_arrow
    image_column = _choose(schema, image_column, _image_candidates(schema), _is_bytes,
                           "columns of image bytes", "image_column", uri)
    ids = [name for name in ID_COLUMNS if name in schema.names and _id_kind(schema.field(name).type)]
    id_column = _choose(schema, id_column, ids, lambda kind: _id_kind(kind) is not None,
                        "id columns", "id_field", uri, _id_candidates(schema))
    status = "status" if "status" in schema.names and _id_kind(schema.field("status").type) == "string" else ""
    return ContainerSpec("table", _id_kind(_column_type(schema, id_column)), image_column,
                         id_column, status, suffixes)


def _is_bytes(kind: pa.DataType | None) -> bool:
    return kind is not None and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind))


def _choose(schema: pa.Schema, given: str, found: list[str], fits, what: str, option: str,
            uri: str, candidates: list[str] | None = None) -> str:
    """The column given (checked), or the only one found; else one line naming the option."""
    candidates = found if candidates is None else candidates
    if given:
        kind = _column_type(schema, given)
        if kind is None or not fits(kind):
            raise ConfigError(f"none of the {what} is named {given!r}; candidates: {candidates or 'none'}",
                              file=uri, record=option)
        return given
    if len(found) != 1:
        raise ConfigError(f"{'several' if found else 'no'} {what} ({found or 'none found'}); "
                          f"name one with {option}= (candidates: {candidates or 'none'})",
                          file=uri, record=option)
    return found[0]


def _id_candidates(schema: pa.Schema) -> list[str]:
    out = [f.name for f in schema if _id_kind(f.type)]
    out += [f"{f.name}.{c.name}" for f in schema if pa.types.is_struct(f.type)
            for c in f.type if _id_kind(c.type)]
    return out


def check_table_columns(uri: str, spec: ContainerSpec) -> None:
    """Every table of a run must hold the columns the first one was read with."""
    schema = storage.open_parquet(uri).schema_arrow
    for path in (spec.image_column, spec.id_column):
        if _column_type(schema, path) is None:
            raise DataError(f"lacks column {path!r}, which the first table of this input has",
                            file=uri)


def tar_spec(first_tar: str, id_field: str = "", suffixes: tuple[str, ...] = IMAGE_SUFFIXES
             ) -> ContainerSpec:
    """Keys are string ids. With `id_field`, the id is that field of each sample's `.json`;
    its type (integer or string) is the one of the first sample that has it."""
    if not id_field:
        return ContainerSpec("tar", "string", id_column="", suffixes=suffixes)
    peek = ContainerSpec("tar", "any", id_column=id_field, suffixes=suffixes)
    for chunk in tar_samples(first_tar, peek, chunk=1):
        first = chunk.slice(0, 1).to_pylist()[0]
        if first["reason"]:
            raise DataError(f"the first sample: {first['reason']} (id_field)", file=first_tar)
        kind = "int64" if isinstance(first["image_id"], int) else "string"
        return ContainerSpec("tar", kind, id_column=id_field, suffixes=suffixes)
    raise DataError("the tar holds no sample", file=first_tar)


# -- reading -------------------------------------------------------------------------------
def sample_key(member: str) -> tuple[str, str]:
    """(key, extension) in webdataset's convention: the key is the path up to the first dot
    of the base name, the extension the rest (lower case)."""
    folder, base = posixpath.split(member)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


class _Chunks:
    """Rows gathered into Arrow chunks of `size` rows, numbered from 0 across chunks."""

    def __init__(self, size: int, id_type: str):
        self.size, self.rows, self.count = max(1, size), [], 0
        self.id_type = pa.string() if id_type == "string" else (
            pa.int64() if id_type == "int64" else None)

    def add(self, image_id, uri: str, data: bytes = b"", stage: str = "", reason: str = "") -> None:
        self.rows.append((image_id, uri, data, stage, reason, self.count))
        self.count += 1

    def full(self) -> bool:
        return len(self.rows) >= self.size

    def take(self) -> pa.Table:
        columns = list(zip(*self.rows)) if self.rows else [[]] * len(CHUNK_COLUMNS)
        self.rows = []
        types = (self.id_type, pa.string(), pa.binary(), pa.string(), pa.string(), pa.int64())
        return pa.table({name: pa.array(list(values), kind)
                         for name, values, kind in zip(CHUNK_COLUMNS, columns, types)})


def tar_samples(uri: str, spec: ContainerSpec, chunk: int) -> Iterator[pa.Table]:
    """The samples of one tar, in order, as chunks of rows (see the module docstring)."""
    out = _Chunks(chunk, spec.id_type)
    seen: set[str] = set()
    key, members = None, {}
    try:
        with _open_stream(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name_key, ext = sample_key(member.name)
                if name_key != key:
                    if key is not None:
                        _add_sample(out, uri, key, members, spec, seen)
                        if out.full():
                            yield out.take()
                    key, members = name_key, {}
                if _wanted(ext, members, spec):
                    members[ext] = (member.name, tar.extractfile(member).read())
    except _TAR_ERRORS as exc:
        problem = f"the tar is damaged ({type(exc).__name__}: {exc})"
        if key is not None:
            out.add(_display_id(key, spec), f"{uri}#{key}", stage="read",
                    reason=f"sample {key}: {problem}; the samples before it are read")
        else:
            out.add(None, uri, stage="read", reason=f"{problem}; no sample could be read")
        key = None
    if key is not None:
        _add_sample(out, uri, key, members, spec, seen)
    if out.rows:
        yield out.take()


def _open_stream(uri: str):
    pa_fs, path = storage.pyarrow_filesystem(uri)
    try:
        return pa_fs.open_input_stream(path)
    except FileNotFoundError:
        raise StorageError("no such tar", file=uri) from None


def _wanted(ext: str, members: dict, spec: ContainerSpec) -> bool:
    """Read a member's bytes only for the sample's first image and, with an id field, its
    `.json`; the rest are passed over in the stream."""
    if ext == "json":
        return bool(spec.id_column) and "json" not in members
    return _is_image(ext, spec) and not any(_is_image(e, spec) for e in members)


def _is_image(ext: str, spec: ContainerSpec) -> bool:
    return bool(ext) and "." + ext.rsplit(".", 1)[-1] in spec.suffixes


def _display_id(key: str, spec: ContainerSpec):
    """The id an error row of a sample carries when its own id cannot be read."""
    return key if spec.id_type in ("string", "any") else None


def _add_sample(out: _Chunks, uri: str, key: str, members: dict, spec: ContainerSpec,
                seen: set[str]) -> None:
    image = next((v for e, v in members.items() if _is_image(e, spec)), None)
    where = f"{uri}#{image[0] if image else key}"
    if key in seen:
        out.add(_display_id(key, spec), where, stage="list",
                reason=f"sample {key}: its key appears twice in this tar")
        return
    seen.add(key)
    image_id, problem = _sample_id(key, members, spec)
    if problem:
        out.add(_display_id(key, spec), where, stage="read", reason=f"sample {key}: {problem}")
    elif image is None:
        wanted = ", ".join(spec.suffixes[:4])
        out.add(image_id, where, stage="read",
                reason=f"sample {key} has no image member ({wanted}, ...)")
    else:
        out.add(image_id, where, image[1])


def _sample_id(key: str, members: dict, spec: ContainerSpec):
    """(id, "") or (None, problem)."""
    if not spec.id_column:
        return key, ""
    if "json" not in members:
        return None, f"no .json member to read its id ({spec.id_column!r}) from"
    try:
        value = json.loads(members["json"][1]).get(spec.id_column)
    except (ValueError, AttributeError) as exc:
        return None, f"unreadable .json ({exc})"
    if value is None:
        return None, f"its .json has no {spec.id_column!r} field"
    if spec.id_type == "int64" and (isinstance(value, bool) or not isinstance(value, int)):
        return None, f"id {value!r} is not an integer, as the store's ids are"
    return (str(value) if spec.id_type == "string" else value), ""


def table_samples(uri: str, first_group: int, num_groups: int, spec: ContainerSpec,
                  chunk: int) -> Iterator[tuple[pa.Table, int]]:
    """(chunk of rows, rows skipped for a failed download) per chunk of a shard's row groups."""
    file = storage.open_parquet(uri)
    groups = list(range(first_group, first_group + num_groups))
    if groups and groups[-1] >= file.metadata.num_row_groups:
        raise DataError(f"row groups {first_group}..{groups[-1]} planned, the table has "
                        f"{file.metadata.num_row_groups} (was it rewritten since?)", file=uri)
    first_row = sum(file.metadata.row_group(g).num_rows for g in range(first_group))
    heads = sorted({spec.image_column.split(".")[0], spec.id_column.split(".")[0]}
                   | ({spec.status_column} if spec.status_column else set()))
    out = _Chunks(chunk, spec.id_type)
    n = first_row
    for batch in file.iter_batches(batch_size=max(1, chunk), row_groups=groups, columns=heads,
                                   use_threads=False):
        images, ids = _path(batch, spec.image_column), _path(batch, spec.id_column)
        status = batch.column(spec.status_column).to_pylist() if spec.status_column else None
        skipped = 0
        for i, (data, image_id) in enumerate(zip(images.to_pylist(), ids.to_pylist())):
            where = f"{uri}#row{n + i}"
            if status is not None and status[i] not in (None, "success"):
                skipped += 1
            elif image_id is None or image_id == "":
                out.add(None, where, stage="read", reason=f"row {n + i}: no id in {spec.id_column!r}")
            elif not data:
                out.add(image_id, where, stage="read",
                        reason=f"row {n + i}: no image bytes in {spec.image_column!r}")
            else:
                out.add(image_id, where, data)
        n += batch.num_rows
        yield out.take(), skipped


def _path(batch: pa.RecordBatch, path: str) -> pa.Array:
    head, _, rest = path.partition(".")
    column = batch.column(head)
    return column.field(rest) if rest else column
