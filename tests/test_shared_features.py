"""The per-node shared copy of a feature store (features/shared.py) and the batches gathered
from it (features/regions.py): equal to the store reader's, built once, never stale or half
written, and shared by concurrent processes (PSS, not RSS)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ray_updown.errors import DataError
from ray_updown.features import shared
from ray_updown.features.reader import FeatureStore
from ray_updown.features.records import FeatureRecord
from ray_updown.features.regions import FlatRegions, StoreRegions
from ray_updown.features.schema import StoreMeta
from ray_updown.features.shared import (
    SharedFeatures,
    cache_key,
    shared_features,
    store_fingerprint,
)
from ray_updown.features.writer import feature_shard_uri, write_feature_shard
from ray_updown.memory import pss_bytes

D = 6


def _records(ids, rng, max_k=9):
    out = []
    for n, image_id in enumerate(ids):
        k = 0 if n == 3 else int(rng.integers(1, max_k))  # one image without regions
        xy = rng.uniform(0, 300, size=(k, 2)).astype(np.float32)
        out.append(FeatureRecord(image_id, int(rng.integers(320, 640)), int(rng.integers(240, 480)),
                                 np.concatenate([xy, xy + rng.uniform(5, 50, (k, 2))], 1),
                                 rng.normal(size=(k, D)).astype(np.float32)))
    return out


def write_store(path, ids, seed=0, shards=2):
    """A store of `shards` shards with row groups of 3 images (lookups cross groups and files)."""
    rng = np.random.default_rng(seed)
    records = _records(ids, rng)
    meta = StoreMeta(feature_dim=D, image_id_type="string" if isinstance(ids[0], str) else "int64")
    per = -(-len(records) // shards)
    for s in range(shards):
        write_feature_shard(records[s * per:(s + 1) * per], feature_shard_uri(str(path), s), meta,
                            row_group_rows=3)
    return str(path), records


@pytest.mark.parametrize("ids", [list(range(100, 120)), [f"img{i}" for i in range(20)]])
@pytest.mark.parametrize("spatial", [False, True])
def test_batches_from_the_shared_copy_equal_the_store_readers(tmp_path, ids, spatial):
    uri, records = write_store(tmp_path / "store", ids)
    store = FeatureStore(uri)
    copy = shared_features(uri, str(tmp_path / "cache"))
    assert (copy.num_images, copy.feature_dim) == (20, D)
    assert copy.num_regions == sum(r.num_boxes for r in records)  # no padding stored
    flat, reader = FlatRegions(copy, 5, spatial), StoreRegions(store, ids, 5, spatial)
    rng = np.random.default_rng(1)
    for batch_ids in [ids[:4], [ids[3]], list(rng.permutation(ids)[:7]), [ids[5], ids[5], ids[0]]]:
        got_f, got_m = flat.gather(flat.rows(batch_ids))
        want_f, want_m = reader.gather(reader.rows(batch_ids))
        assert got_f.shape == want_f.shape and got_f.dtype == torch.float32
        assert torch.equal(got_m, want_m) and torch.equal(got_f, want_f)
        # Padding per batch: K is the batch's largest count, capped at max_boxes, at least 1.
        counts = [min(r.num_boxes, 5) for i in batch_ids for r in records if r.image_id == i]
        assert got_f.shape[1] == max(1, max(counts)) and got_m.sum(1).tolist() == counts
    missing = "nope" if isinstance(ids[0], str) else 999
    with pytest.raises(DataError, match=f"image id {missing!r} is not in the shared copy"):
        flat.rows([ids[0], missing])


def test_the_copy_is_built_once_then_mapped(tmp_path, monkeypatch):
    uri, _ = write_store(tmp_path / "store", list(range(12)))
    cache = str(tmp_path / "cache")
    first = shared_features(uri, cache)
    assert isinstance(first.features, np.memmap) and not first.features.flags.writeable
    monkeypatch.setattr(shared, "_build", lambda *a: pytest.fail("rebuilt a valid copy"))
    again = shared_features(uri, cache)
    assert again.path == first.path and np.array_equal(again.features, first.features)
    # Pickled (DataLoader workers, Ray), it is its folder: the arrays are mapped again.
    import pickle

    blob = pickle.dumps(FlatRegions(first, 4, False))
    assert len(blob) < 2000
    back = pickle.loads(blob)
    assert torch.equal(back.gather(np.arange(5))[0], FlatRegions(first, 4, False).gather(np.arange(5))[0])


def test_a_copy_of_another_store_or_an_older_version_is_not_reused(tmp_path):
    cache = str(tmp_path / "cache")
    a, _ = write_store(tmp_path / "a", list(range(10)), seed=0)
    b, _ = write_store(tmp_path / "b", list(range(10)), seed=0)  # same content, other store
    copy_a = shared_features(a, cache)
    assert shared_features(b, cache).path != copy_a.path
    old = np.array(copy_a.features)
    # Rewrite store a in place (new features, same ids): a new key, a new copy.
    os.utime(feature_shard_uri(a, 0), ns=(1, 1))  # also a changed mtime alone is a new version
    assert cache_key(store_fingerprint(a)) != copy_a.key
    _, records = write_store(tmp_path / "a", list(range(10)), seed=5)
    fresh = shared_features(a, cache)
    assert fresh.path != copy_a.path and not np.array_equal(np.array(fresh.features[:len(old)]), old)
    want = np.concatenate([r.features.astype(np.float16) for r in records])
    assert np.array_equal(fresh.features, want)


def test_a_half_written_copy_is_never_used(tmp_path):
    uri, records = write_store(tmp_path / "store", list(range(10)))
    cache = str(tmp_path / "cache")
    key = cache_key(store_fingerprint(uri))
    want = np.concatenate([r.features.astype(np.float16) for r in records])
    # A build that was killed leaves a temporary folder: never opened, removed by the next build.
    tmp = os.path.join(cache, f"{key}.tmp-123-abcd")
    os.makedirs(tmp)
    open(os.path.join(tmp, "manifest.json"), "w").write("{}")
    copy = shared_features(uri, cache)
    assert copy.path == os.path.join(cache, key) and not os.path.exists(tmp)
    # A final folder whose features file was cut short is refused, then rebuilt.
    with open(os.path.join(copy.path, "features.npy"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 10)
    with pytest.raises(DataError, match=r"features\.npy: unreadable"):
        SharedFeatures(copy.path, key)
    assert np.array_equal(shared_features(uri, cache).features, want)
    # ... as is one without its manifest (written last: the copy was not complete).
    os.remove(os.path.join(copy.path, "manifest.json"))
    with pytest.raises(DataError, match="manifest.json: no manifest"):
        SharedFeatures(copy.path, key)
    assert np.array_equal(shared_features(uri, cache).features, want)


def _build_in_child(uri, cache, log):
    real = shared._build

    def counting(*args):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        real(*args)

    shared._build = counting
    shared_features(uri, cache)


def test_concurrent_processes_build_the_copy_once(tmp_path):
    uri, _ = write_store(tmp_path / "store", list(range(30)))
    cache, log = str(tmp_path / "cache"), str(tmp_path / "builds.log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(uri, cache, log)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(open(log).read().split()) == 1
    assert sorted(os.listdir(cache)) == sorted([cache_key(store_fingerprint(uri)),
                                                f"{cache_key(store_fingerprint(uri))}.lock"])


_READER = textwrap.dedent("""
    import sys
    import numpy as np
    from ray_updown.features.shared import SharedFeatures
    s = SharedFeatures(sys.argv[1])
    flat = s.features.reshape(-1)
    print(float(flat[::1024].astype(np.float32).sum()), flush=True)  # one read per 2 KiB page
    sys.stdin.readline()
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_four_processes_hold_one_copy_by_pss(tmp_path):
    images, k, dim = 400, 32, 4096  # 400 x 32 x 4096 float16 = 100 MiB of features
    rng = np.random.default_rng(0)
    base = rng.normal(size=(k, dim)).astype(np.float16)
    store = str(tmp_path / "store")
    records = [FeatureRecord(i, 640, 480, np.tile([0, 0, 10, 10], (k, 1)), base) for i in range(images)]
    write_feature_shard(records, feature_shard_uri(store, 0), StoreMeta(feature_dim=dim))
    copy = shared_features(store, str(tmp_path / "cache"))
    size = copy.features.nbytes
    assert size == 100 * 2 ** 20
    path = os.path.join(copy.path, "features.npy")
    procs = [subprocess.Popen([sys.executable, "-c", _READER, copy.path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        sums = [p.stdout.readline() for p in procs]  # each has touched every page
        assert len(set(sums)) == 1 and sums[0]
        per_process = [pss_bytes(p.pid, path) for p in procs]
    finally:
        for p in procs:
            p.communicate("\n", timeout=30)
    # Each process's share is ~1/4 of the copy and the four together hold ~1x, not 4x.
    assert 0.9 * size <= sum(per_process) <= 1.1 * size
    assert all(0.2 * size <= pss <= 0.3 * size for pss in per_process)


def test_a_batch_is_built_on_the_device_from_indices_alone(tmp_path):
    """After `to(device)`, the batch (regions, mask, tokens, targets) is gathered where the
    copy lives. The meta device holds no data: any host round trip (.item(), .tolist(), a
    copy out) would raise, so building a whole batch there shows there is none."""
    from ray_updown.features.regions import regions_to_device
    from ray_updown.vqa.data import EncodedQuestions, VqaDataset

    uri, records = write_store(tmp_path / "store", list(range(20)))
    n = 30
    index = np.full((n, 10), -1, np.int64)
    index[:, 0] = np.arange(n) % 7
    encoded = EncodedQuestions(np.arange(n), [i % 20 for i in range(n)],
                               np.ones((n, 4), np.int64), index, np.ones((n, 10), np.float32),
                               ["other"] * n, annotated=True)
    regions = FlatRegions(shared_features(uri, str(tmp_path / "cache")), 5, True)
    dataset = VqaDataset(encoded, regions, 7)
    on_host = dataset.__getitems__([0, 5, 7])
    assert not regions_to_device(regions, torch.device("cpu"), 0.5)  # only CUDA gets a copy
    dataset.to("meta")
    batch = dataset.__getitems__([0, 5, 7])
    assert {v.device.type for v in batch.values()} == {"meta"}
    assert {k: v.shape for k, v in batch.items()} == {k: v.shape for k, v in on_host.items()}
    assert on_host["feats"].shape[2] == D + 7 and torch.equal(on_host["targets"].argmax(1),
                                                              torch.tensor([0, 5, 0]))
