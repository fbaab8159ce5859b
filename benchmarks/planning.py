"""Planning at scale: the driver's seconds and peak memory to plan very large inputs.

    python benchmarks/planning.py [--rows 10000000 100000000] [--tars 10000] [--root DIR]

(a) a Parquet manifest of `--rows` image URIs (COCO-style ids and S3 URIs), written a chunk at
    a time, planned by `run_extraction(plan_only=True)` in a fresh process (only the
    pipeline imported, a trivial model): first run (plans and saves the plan) and resumed run
    (sees the same inputs, plans nothing). Peak RSS is the child process's own (VmHWM).
(b) `--tars` WebDataset tar shards of 10,000 samples each, planned the same way: a tar is one
    shard, and planning reads no tar (only the listing), so the files here are sparse
    (their nominal size, no data on disk).

Prints one JSON object. Targets (issue 23): 100,000,000 rows in <= 2 GB peak RSS, first and
resumed run, with time linear in rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1 << 22

_PLAN_CHILD = """
import json, sys, time
from ray_updown.extraction.pipeline import ExtractConfig, run_extraction
def peak_rss_mb():
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
    with open("/proc/self/status") as f:
        return round(int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024)
class TrivialModel:
    name, feature_dim = "trivial", 4
    def extract_regions(self, images):
        return []
kind, source, out = sys.argv[1:4]
start = time.time()
cfg = ExtractConfig(out=out, plan_only=True, **{kind: source})
summary = run_extraction(cfg, model_factory=TrivialModel)
print(json.dumps({"inputs": summary["inputs"], "shards": summary["shards"],
                  "shards_to_do": summary["shards_to_do"], "plan_seconds": summary["plan_seconds"],
                  "wall_seconds": round(time.time() - start, 2),
                  "peak_rss_mb": peak_rss_mb()}))
"""


def write_manifest(path: str, rows: int) -> None:
    """image_id, uri: COCO train2014 names in S3, written CHUNK rows at a time."""
    schema = pa.schema([("image_id", pa.int64()), ("uri", pa.string())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, CHUNK):
            ids = pa.array(np.arange(start, min(rows, start + CHUNK), dtype=np.int64))
            uris = pc.binary_join_element_wise(
                "s3://bucket/train2014/COCO_train2014_",
                pc.utf8_lpad(pc.cast(ids, pa.string()), 12, "0"), ".jpg", "")
            writer.write_table(pa.table({"image_id": ids, "uri": uris}, schema=schema),
                               row_group_size=1 << 20)


def write_sparse_tars(folder: str, count: int, nominal_bytes: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for n in range(count):
        with open(os.path.join(folder, f"{n:05d}.tar"), "wb") as f:
            f.truncate(nominal_bytes)


def plan_twice(kind: str, source: str, out: str) -> dict:
    runs = {}
    for name in ("first_run", "resumed_run"):
        print(f"planning: {kind} {source}, {name}", file=sys.stderr)
        done = subprocess.run([sys.executable, "-c", _PLAN_CHILD, kind, source, out],
                              capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[10_000_000, 100_000_000])
    parser.add_argument("--tars", type=int, default=10_000)
    parser.add_argument("--root", default="")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="ray-updown-planning-")
    os.makedirs(root, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": sys.platform}, "manifests": []}
    try:
        for rows in args.rows:
            manifest = os.path.join(root, f"manifest-{rows}.parquet")
            print(f"planning: writing a {rows:,}-row manifest", file=sys.stderr)
            write_manifest(manifest, rows)
            runs = plan_twice("manifest", manifest, os.path.join(root, f"store-{rows}"))
            results["manifests"].append({"rows": rows, "manifest_mb": round(os.path.getsize(manifest) / 1e6, 1),
                                         **runs})
            shutil.rmtree(os.path.join(root, f"store-{rows}"), ignore_errors=True)
            os.remove(manifest)
        if args.tars:
            folder = os.path.join(root, "tars")
            write_sparse_tars(folder, args.tars, 10_000 * 100_000)  # 10,000 samples of ~100 kB
            results["tar_shards"] = {"tars": args.tars, "samples_per_tar": 10_000,
                                     **plan_twice("images", folder, os.path.join(root, "store-tars"))}
        results["target"] = "100,000,000 rows: <= 2048 MB peak RSS, first and resumed run; time linear in rows"
        print(json.dumps(results, indent=1))
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
