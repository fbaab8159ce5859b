"""Every byte the package reads or writes goes through here.

A location is always a URI: a local path, `file://`, `s3://` or `gs://`. fsspec resolves it;
S3-compatible endpoints (MinIO, moto) come from the standard `AWS_ENDPOINT_URL` variable or
from `RAY_UPDOWN_S3_ENDPOINT`. Writes are atomic: a local file is written under a temporary
name and renamed; an object-store object only appears once its upload completes. Credentials
are never put into messages: errors name the URI only.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import io
import json
import os
import posixpath
import uuid
from typing import IO, Any, Iterable, Iterator

import fsspec

from ray_updown.errors import DataError, StorageError

_REMOTE = ("s3://", "gs://", "gcs://", "memory://")


def is_remote(uri: str) -> bool:
    return str(uri).startswith(_REMOTE)


def _strip_file(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("RAY_UPDOWN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    # Listings are not cached: a resumed job must see what another process just wrote.
    opts: dict[str, Any] = {"use_listings_cache": False}
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    return opts


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    uri = _strip_file(uri)
    if uri.startswith("s3://"):
        fs = fsspec.filesystem("s3", **_s3_options())
        return fs, uri[len("s3://"):]
    if uri.startswith(("gs://", "gcs://")):
        fs = fsspec.filesystem("gcs")
        return fs, uri.split("://", 1)[1]
    if uri.startswith("memory://"):
        return fsspec.filesystem("memory"), uri[len("memory://"):]
    return fsspec.filesystem("file"), os.path.abspath(uri)


def pyarrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for pyarrow and Ray Data readers and writers."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def open_parquet(uri: str):
    """A Parquet file opened for reading (its footer read): StorageError when it is missing,
    DataError when it is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pa_fs, path = pyarrow_filesystem(uri)
    try:
        # No pre-buffering: it reads through Arrow's I/O thread pool, whose per-thread allocator
        # caches added ~40 MB of RSS in the memory benchmark; s3fs files read ahead anyway.
        return pq.ParquetFile(pa_fs.open_input_file(path), pre_buffer=False)
    except FileNotFoundError:
        raise StorageError("no such file", file=uri) from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"not a readable Parquet file ({exc})", file=uri) from None


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.exists(path)
    except Exception as exc:  # network and permission problems
        raise StorageError(f"cannot check existence ({type(exc).__name__})", file=uri) from None


def _unprotocol(uri: str, fs_path: str) -> str:
    """Turn a path the filesystem returned back into a URI of the same scheme as `uri`."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return "s3://" + fs_path
    if uri.startswith(("gs://", "gcs://")):
        return uri.split("://", 1)[0] + "://" + fs_path
    if uri.startswith("memory://"):
        return "memory://" + fs_path.lstrip("/")
    return fs_path


@contextlib.contextmanager
def listing_errors(uri: str) -> Iterator[None]:
    """Any failure while listing `uri` becomes one StorageError naming it (ours pass through)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"cannot list ({type(exc).__name__})", file=uri) from None


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under a prefix (recursively) or matching a glob, sorted, as URIs."""
    fs, path = filesystem(uri)
    with listing_errors(uri):
        if any(ch in path for ch in "*?["):
            found = fs.glob(path)
            found = [p for p in found if fs.isfile(p)]
        elif fs.isfile(path):
            found = [path]
        elif fs.isdir(path):
            found = fs.find(path)
        else:
            raise StorageError("no such file or prefix", file=uri)
    out = [_unprotocol(uri, p) for p in found]
    if suffixes:
        out = [p for p in out if p.lower().endswith(tuple(s.lower() for s in suffixes))]
    return sorted(out)


def missing_files(uris: Iterable[str]) -> list[str]:
    """Those of `uris` that are not there, found with one listing per folder rather than one
    request per file (a driver checks 100K images in an object store in seconds)."""
    by_folder: dict[str, list[str]] = {}
    for uri in uris:
        folder = posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(filesystem(uri)[1])
        by_folder.setdefault(folder, []).append(uri)
    missing = []
    for folder, members in by_folder.items():
        fs, path = filesystem(folder)
        try:
            listed = set(fs.ls(path, detail=False)) if fs.isdir(path) else set()
        except Exception as exc:
            raise StorageError(f"cannot list ({type(exc).__name__})", file=folder) from None
        listed = {p.rstrip("/") for p in listed}
        missing += [u for u in members if filesystem(u)[1].rstrip("/") not in listed]
    return missing


@contextlib.contextmanager
def open_uri(uri: str, mode: str = "rb") -> Iterator[IO]:
    """Open for reading. Writing goes through `atomic_write`."""
    if "w" in mode or "a" in mode:
        raise ValueError("open_uri is for reading; use atomic_write")
    fs, path = filesystem(uri)
    try:
        f = fs.open(path, mode)
    except FileNotFoundError:
        raise StorageError("no such file", file=uri) from None
    except IsADirectoryError:
        raise StorageError("is a directory, expected a file", file=uri) from None
    except Exception as exc:
        raise StorageError(f"cannot open ({type(exc).__name__})", file=uri) from None
    with f:
        yield f


def read_bytes(uri: str) -> bytes:
    with open_uri(uri, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start})", file=uri) from None


def read_json(uri: str) -> Any:
    """Parse a JSON file; a malformed or truncated file is a DataError naming line and column."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        cut_off = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        what = "truncated JSON" if cut_off else "malformed JSON"
        # Some of json's messages already end in "at" ("Unterminated string starting at").
        problem = exc.msg if exc.msg.endswith(" at") else f"{exc.msg} at"
        raise DataError(f"{what}: {problem} line {exc.lineno} column {exc.colno}",
                        file=uri) from None


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write a file that appears under its name only when complete.

    Local: a temporary sibling renamed over the target. Object stores: an upload is atomic.
    On an exception nothing is left under the target name. A target that cannot be written
    (no permission, a file where a folder should be, a full disk on closing) is one
    StorageError naming `uri`, never the temporary file; the body's own errors pass through.
    """
    fs, path = filesystem(uri)
    if not is_remote(uri):
        yield from _local_atomic_write(uri, path, mode)
        return
    buf: IO = io.BytesIO() if "b" in mode else io.StringIO()
    yield buf
    data = buf.getvalue()
    try:
        fs.pipe_file(path, data.encode("utf-8") if isinstance(data, str) else data)
    except Exception as exc:
        raise StorageError(f"cannot write ({type(exc).__name__})", file=uri) from None


def _cannot_write(uri: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot write ({exc.strerror or type(exc).__name__})", file=uri)


def _local_atomic_write(uri: str, path: str, mode: str) -> Iterator[IO]:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        f = open(tmp, mode)
    except OSError as exc:
        raise _cannot_write(uri, exc) from None
    try:
        yield f
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    try:
        f.close()
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise _cannot_write(uri, exc) from None


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any, indent: int | None = None) -> None:
    write_text(uri, json.dumps(obj, indent=indent))


def makedirs(uri: str) -> None:
    if not is_remote(uri):
        os.makedirs(filesystem(uri)[1], exist_ok=True)


def remove(uri: str, recursive: bool = False) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def local_glob(pattern: str) -> list[str]:
    return sorted(_glob.glob(pattern))
