"""The storage module: local and S3 (moto) round trips, atomic writes, clear errors."""

from __future__ import annotations

import os

import pytest

from ray_updown import storage
from ray_updown.errors import DataError, StorageError


def test_local_round_trip_and_listing(tmp_path):
    root = str(tmp_path / "a")
    storage.write_json(storage.join(root, "x", "one.json"), {"k": [1, 2]})
    storage.write_text(storage.join(root, "two.txt"), "hello")
    assert storage.read_json(storage.join(root, "x", "one.json")) == {"k": [1, 2]}
    assert storage.read_text("file://" + storage.join(root, "two.txt")) == "hello"
    assert storage.list_files(root) == sorted([os.path.join(root, "x", "one.json"),
                                               os.path.join(root, "two.txt")])
    assert storage.list_files(root + "/*.txt") == [os.path.join(root, "two.txt")]
    assert storage.list_files(root, suffixes=(".JSON",)) == [os.path.join(root, "x", "one.json")]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = str(tmp_path / "out.json")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(target, "w") as f:
            f.write('{"half": ')
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []


def test_missing_uri_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError) as err:
        storage.read_json(str(tmp_path / "nope.json"))
    assert "nope.json" in str(err.value) and "no such file" in str(err.value)
    with pytest.raises(StorageError):
        storage.list_files(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("text,kind", [('{"a": 1,, }', "malformed"), ('{"a": [1, 2', "truncated"),
                                       ('{"a": "unfinis', "truncated")])
def test_bad_json_names_file_and_position(tmp_path, text, kind):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        storage.read_json(str(path))
    assert str(path) in str(err.value) and kind in str(err.value) and "line 1" in str(err.value)
    assert " at at " not in str(err.value)


def test_s3_round_trip(s3_bucket):
    uri = storage.join(s3_bucket, "dir", "obj.json")
    storage.write_json(uri, {"hello": "s3"})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"hello": "s3"}
    storage.write_bytes(storage.join(s3_bucket, "dir", "b.bin"), b"\x00\x01")
    assert storage.list_files(storage.join(s3_bucket, "dir")) == [
        f"{s3_bucket}/dir/b.bin", f"{s3_bucket}/dir/obj.json"]
    with pytest.raises(StorageError) as err:
        storage.read_bytes(storage.join(s3_bucket, "missing.bin"))
    assert "missing.bin" in str(err.value)
    assert "testing" not in str(err.value)  # credentials never in messages


def test_missing_files_local_and_s3(tmp_path, s3_bucket):
    storage.write_text(str(tmp_path / "a" / "x.jpg"), "x")
    local = [str(tmp_path / "a" / "x.jpg"), "file://" + str(tmp_path / "a" / "y.jpg"),
             str(tmp_path / "nowhere" / "z.jpg")]
    assert storage.missing_files(local) == local[1:]
    storage.write_text(f"{s3_bucket}/img/x.jpg", "x")
    remote = [f"{s3_bucket}/img/x.jpg", f"{s3_bucket}/img/y.jpg", f"{s3_bucket}/none/z.jpg"]
    assert storage.missing_files(remote) == remote[1:]


def test_an_unwritable_target_is_one_storage_error_naming_it(unwritable_folder):
    target = storage.join(unwritable_folder, "sub", "out.json")
    with pytest.raises(StorageError) as err:
        storage.write_json(target, {"k": 1})
    assert err.value.file == target and "cannot write" in str(err.value)
    assert ".tmp-" not in str(err.value)


def test_the_body_s_own_errors_pass_through_atomic_write(tmp_path):
    with pytest.raises(OSError, match="the body's"):
        with storage.atomic_write(str(tmp_path / "x.bin")) as f:
            f.write(b"1")
            raise OSError("the body's")
    assert os.listdir(tmp_path) == []
