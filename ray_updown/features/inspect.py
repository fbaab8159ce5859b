"""`ray-updown inspect STORE`: what a region-feature store holds, without loading its features.

`inspect_store(uri)` returns a JSON-able summary: feature and error rows (from the Parquet
footers), errors by stage with their most common reasons, boxes per image, feature dim and
dtype, detector, config hash and checkpoint hash, files and bytes, whether every shard is
complete (against the extraction plan when the store has one) and whether `index.parquet` is
current. `format_summary` renders it as aligned text. histograms.py counts boxes per image
and detection confidences for `viz.store_plots.plot_store`'s PNG.

Memory stays bounded however large the store: one listing of the store, the footers, the
small `num_boxes` column per shard, the `stage`/`reason` columns of error shards one row group
at a time, and the plan's `shard` column one row group at a time. The `features` column is
never read.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from ray_updown import storage
from ray_updown.errors import DataError, StorageError
from ray_updown.features.parts import PartAgreement, check_columns, open_part, part_info, read_row_group
from ray_updown.features.schema import ERRORS_DIR, FEATURES_DIR, INDEX_FILE, PLAN_FILE, SHARD_FILE

TOP_REASONS = 5
# Distinct reasons counted per stage; reasons often name the file, so a store with millions
# of errors could otherwise hold millions of strings. Rows beyond it are counted as untracked.
MAX_REASONS_PER_STAGE = 10_000
# Shard numbers listed by name in the summary (the counts are always complete).
MAX_LISTED = 20


def _count_stats(counts: Counter) -> dict[str, Any]:
    """min/median/mean/max/total of a multiset of integers given as {value: count}."""
    n = sum(counts.values())
    if n == 0:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0, "total": 0, "zero": 0}
    values = np.array(sorted(counts), dtype=np.int64)
    cum = np.cumsum([counts[v] for v in values])
    # The median of the sorted list: mean of the elements at (n-1)//2 and n//2 (0-based).
    lower = int(values[np.searchsorted(cum, (n - 1) // 2 + 1)])
    upper = int(values[np.searchsorted(cum, n // 2 + 1)])
    median = (lower + upper) / 2
    total = int(sum(int(v) * c for v, c in counts.items()))
    return {"min": int(values[0]), "median": int(median) if median.is_integer() else median,
            "mean": total / n, "max": int(values[-1]), "total": total, "zero": int(counts.get(0, 0))}


# -- reading ---------------------------------------------------------------------------------

def _list_store(uri: str) -> tuple[dict[str, int], set[str]]:
    """{path relative to the store: size} of every file, and the top-level folders seen."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    try:
        if not fs.isdir(root):
            what = "a file" if fs.exists(root) else "no such folder"
            raise DataError(f"not a feature store ({what})", file=uri)
        found = fs.find(root, withdirs=True, detail=True)
    except DataError:
        raise
    except Exception as exc:  # network, permissions: the store may be fine
        raise StorageError(f"cannot list ({type(exc).__name__})", file=uri) from None
    files: dict[str, int] = {}
    folders: set[str] = set()
    for path, info in found.items():
        rel = path.rstrip("/")[len(root) + 1:]
        if not rel:
            continue
        if info.get("type") == "directory":
            folders.add(rel.split("/", 1)[0])
        else:
            files[rel] = int(info.get("size") or 0)
            if "/" in rel:
                folders.add(rel.split("/", 1)[0])
    return files, folders


def store_files(store: str) -> dict[str, int]:
    """The store's files; a DataError naming `store` when it is not a feature store."""
    files, folders = _list_store(store)
    # An empty local store still has its folders; on object stores (no folders) an empty
    # store is recognised by its index or plan.
    if not ({FEATURES_DIR, ERRORS_DIR} & folders or {INDEX_FILE, PLAN_FILE} & set(files)):
        raise DataError(f"not a feature store (no {FEATURES_DIR}/, {ERRORS_DIR}/, {INDEX_FILE} "
                        f"or {PLAN_FILE})", file=store)
    return files


def numbered_shards(files: dict[str, int], folder: str) -> tuple[dict[int, tuple[str, int]], list[str]]:
    """{shard number: (name, size)} of complete shard files in `folder`, and other files there."""
    shards: dict[int, tuple[str, int]] = {}
    stray: list[str] = []
    for rel, size in sorted(files.items()):
        head, _, name = rel.partition("/")
        if head != folder:
            continue
        if SHARD_FILE.match(name):
            shards[int(name[len("part-"):-len(".parquet")])] = (name, size)
        else:  # e.g. part-00003.parquet.tmp-1a2b3c4d left by a killed local write
            stray.append(rel)
    return shards, stray


def _scan_features(store: str, shards: dict[int, tuple[str, int]], warnings: list[str]
                   ) -> tuple[dict[int, int], Counter, dict[str, Any]]:
    """Rows per shard, {num_boxes: images} and the metadata of the first shard."""
    rows: dict[int, int] = {}
    boxes: Counter = Counter()
    agreement = PartAgreement()
    for shard, (name, _) in sorted(shards.items()):
        uri = storage.join(store, FEATURES_DIR, name)
        with open_part(uri) as pf:
            info = part_info(pf, uri, warnings)
            rows[shard] = pf.metadata.num_rows
            # Only num_boxes, one row group at a time; counted by value, so memory is the
            # number of distinct box counts, not of images.
            for rg in range(pf.num_row_groups):
                col = read_row_group(pf, rg, ["num_boxes"], uri).column("num_boxes").to_numpy()
                if col.size and col.min() < 0:
                    raise DataError(f"negative num_boxes ({int(col.min())})", file=uri,
                                    record=f"row group {rg}")
                values, counts = np.unique(col, return_counts=True)
                boxes.update(dict(zip(values.tolist(), counts.tolist())))
        found = agreement.add(name, info)
        if found:
            warnings.append(found)
    return rows, boxes, agreement.first


def _scan_errors(store: str, shards: dict[int, tuple[str, int]]
                 ) -> tuple[dict[int, int], dict[str, Any], str | None]:
    """Rows per shard, errors by stage with top reasons, and the error files' id type."""
    rows: dict[int, int] = {}
    by_stage: Counter = Counter()
    reasons: dict[str, Counter] = {}
    untracked: Counter = Counter()
    id_type = None
    for shard, (name, _) in sorted(shards.items()):
        uri = storage.join(store, ERRORS_DIR, name)
        with open_part(uri) as pf:
            check_columns(pf, ("stage", "reason"), uri)
            rows[shard] = pf.metadata.num_rows
            if id_type is None and "image_id" in pf.schema_arrow.names:
                t = pf.schema_arrow.field("image_id").type
                id_type = "string" if pa.types.is_string(t) or pa.types.is_large_string(t) else "int64"
            for rg in range(pf.num_row_groups):
                table = read_row_group(pf, rg, ["stage", "reason"], uri)
                groups = table.group_by(["stage", "reason"]).aggregate([([], "count_all")])
                for g in groups.to_pylist():
                    stage = g["stage"] if g["stage"] is not None else "(none)"
                    reason = g["reason"] if g["reason"] is not None else "(none)"
                    by_stage[stage] += g["count_all"]
                    counter = reasons.setdefault(stage, Counter())
                    if reason in counter or len(counter) < MAX_REASONS_PER_STAGE:
                        counter[reason] += g["count_all"]
                    else:
                        untracked[stage] += g["count_all"]
    out: dict[str, Any] = {}
    for stage in sorted(by_stage, key=lambda s: (-by_stage[s], s)):
        top = sorted(reasons[stage].items(), key=lambda rc: (-rc[1], rc[0]))[:TOP_REASONS]
        out[stage] = {"count": by_stage[stage],
                      "top_reasons": [{"reason": r, "count": c} for r, c in top]}
        if untracked[stage]:
            out[stage]["untracked_rows"] = untracked[stage]
    return rows, out, id_type


def _plan_rows(uri: str) -> Counter:
    """{shard: planned images} from the plan's `shard` column, one row group at a time. A plan
    of tar shards or tables (one row per shard: extraction/planning.py) gives 0 for each
    shard: its samples are counted when the shard is read, and the extraction checks them."""
    planned: Counter = Counter()
    with open_part(uri) as pf:
        check_columns(pf, ("shard",), uri)
        per_shard = "source" in pf.schema_arrow.names
        for rg in range(pf.num_row_groups):
            col = read_row_group(pf, rg, ["shard"], uri).column("shard").to_numpy()
            values, counts = np.unique(col, return_counts=True)
            planned.update(dict(zip(values.tolist(), [0] * len(values) if per_shard else counts.tolist())))
    return planned


def _index_state(store: str, files: dict[str, int], features: dict[int, tuple[str, int]]) -> str:
    """absent, current (lists exactly the shard files present) or stale (rebuilt on open)."""
    if INDEX_FILE not in files:
        return "absent"
    uri = storage.join(store, INDEX_FILE)
    try:
        with open_part(uri) as pf:
            listed = json.loads((pf.schema_arrow.metadata or {}).get(b"files", b"null"))
    except (DataError, json.JSONDecodeError):
        return "unreadable"  # derived data: FeatureStore rebuilds it, so not an error here
    present = sorted(features.values())
    return "current" if listed is not None and sorted(tuple(x) for x in listed) == present else "stale"


def _listed(numbers: Iterable[int]) -> list[int]:
    return sorted(numbers)[:MAX_LISTED]


def _against_plan(store: str, features: dict, errors: dict, present_rows: Counter,
                  warnings: list[str]) -> tuple[dict[str, Any], list[int], list[int]]:
    """The store's shards against its extraction plan: the plan's summary, the planned shards
    not complete, and the shards present that the plan does not have (neither complete nor
    incomplete: another job's, or left from a plan since rewritten)."""
    planned = _plan_rows(storage.join(store, PLAN_FILE))
    # The pipeline writes a shard's errors part first and its features part last; a
    # planned shard is complete when both are there (extraction/shards.py complete_shards).
    complete = [s for s in planned if s in features and s in errors]
    missing = [s for s in planned if s not in complete]
    mismatched = [{"shard": s, "planned": planned[s], "present": present_rows[s]}
                  for s in sorted(complete) if planned[s] and present_rows[s] != planned[s]]
    unplanned = [s for s in sorted(set(features) | set(errors)) if s not in planned]
    plan = {"planned_rows": int(sum(planned.values())), "present_rows": int(sum(present_rows.values())),
            "planned_shards": len(planned), "complete_shards": len(complete),
            "missing_shards": len(missing), "missing_shard_numbers": _listed(missing),
            "mismatched_shards": mismatched[:MAX_LISTED], "unplanned_shards": _listed(unplanned)}
    if missing:
        warnings.append(f"{len(missing)} planned shard(s) not complete (re-run extract to finish)")
    if mismatched:
        warnings.append(f"{len(mismatched)} shard(s) hold a different row count than planned")
    if unplanned:
        warnings.append(f"{len(unplanned)} shard(s) not in the plan (another job's?), counted as "
                        "neither complete nor incomplete")
    return plan, missing, unplanned


def inspect_store(uri: str) -> dict[str, Any]:
    """A JSON-able summary of the store at `uri` (local path, s3://, gs://); see the module doc.

    A path that is not a store is a DataError naming it; a store without feature shards gives
    zeros.
    """
    store = str(uri).rstrip("/") or str(uri)
    files = store_files(store)
    warnings: list[str] = []
    features, stray_f = numbered_shards(files, FEATURES_DIR)
    errors, stray_e = numbered_shards(files, ERRORS_DIR)
    feature_rows, boxes, meta = _scan_features(store, features, warnings)
    error_rows, by_stage, error_id_type = _scan_errors(store, errors)

    present_rows = Counter(feature_rows) + Counter(error_rows)
    shards = sorted(set(features) | set(errors))
    plan, incomplete, unplanned = None, [], []
    if PLAN_FILE in files:
        plan, incomplete, unplanned = _against_plan(store, features, errors, present_rows, warnings)
    else:
        # Without a plan only the commit order tells: an errors part without its features part
        # is a shard whose write did not finish. (Non-pipeline writers have no errors parts.)
        incomplete = [s for s in errors if s not in features]
        if incomplete:
            warnings.append(f"{len(incomplete)} shard(s) have an errors part but no features part")
    stray = stray_f + stray_e
    if stray:
        warnings.append(f"{len(stray)} unfinished or foreign file(s) in {FEATURES_DIR}/ or {ERRORS_DIR}/")

    index = _index_state(store, files, features)
    if index == "stale":
        warnings.append(f"{INDEX_FILE} does not list the current shards (rebuilt on the next open)")
    n_images = int(sum(feature_rows.values()))
    return {
        "store": store,
        "images": n_images,
        "errors": int(sum(error_rows.values())),
        "errors_by_stage": by_stage,
        "boxes_per_image": _count_stats(boxes),
        "feature_dim": meta.get("feature_dim"),
        "features_dtype": meta.get("features_dtype"),
        "image_id_type": meta.get("image_id_type") or error_id_type,
        "detector": meta.get("detector"),
        "detector_config_hash": meta.get("detector_config_hash"),
        "checkpoint_hash": meta.get("checkpoint_hash"),
        "object_vocab_size": meta.get("object_vocab_size"),
        "attribute_vocab_size": meta.get("attribute_vocab_size"),
        "files": {
            "feature_files": len(features), "feature_bytes": sum(s for _, s in features.values()),
            "error_files": len(errors), "error_bytes": sum(s for _, s in errors.values()),
            "total_files": len(files), "total_bytes": sum(files.values()),
            "stray_files": stray[:MAX_LISTED],
        },
        "shards": {"count": len(shards), "complete": len(shards) - len(incomplete) if plan is None
                   else plan["complete_shards"], "incomplete": len(incomplete),
                   "incomplete_shard_numbers": _listed(incomplete), "unplanned": len(unplanned)},
        "plan": plan,
        "index": index,
        "warnings": warnings,
    }


# -- text ------------------------------------------------------------------------------------

def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def _bytes(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({_human(n)})"


def format_summary(summary: dict[str, Any]) -> str:
    """Aligned `label  value` lines, ending with a one-line summary."""
    s = summary
    lines: list[tuple[str, str]] = [("store", s["store"]), ("images", f"{s['images']} (feature rows)"),
                                    ("errors", f"{s['errors']} (error rows)")]
    for stage, info in s["errors_by_stage"].items():
        lines.append((f"  {stage}", f"{info['count']}"))
        shown = [(r["count"], r["reason"]) for r in info["top_reasons"]]
        if info.get("untracked_rows"):
            shown.append((info["untracked_rows"], "(other reasons, not tracked)"))
        w = max((len(str(c)) for c, _ in shown), default=1)
        lines.extend(("", f"  {c:>{w}}  {reason}") for c, reason in shown)
    b = s["boxes_per_image"]
    lines.append(("boxes per image", f"min {b['min']}  median {b['median']}  mean {b['mean']:.2f}  "
                                     f"max {b['max']}  ({b['total']} boxes, {b['zero']} images without)"))
    if s["feature_dim"] is None:
        lines.append(("features", "none (no feature shards)"))
    else:
        lines.append(("features", f"{s['feature_dim']} x {s['features_dtype']} per box"))
    lines.append(("image ids", str(s["image_id_type"] or "unknown")))
    if s["detector"] is not None:
        lines.append(("detector", s["detector"]))
        lines.append(("config hash", s["detector_config_hash"]))
        lines.append(("checkpoint", s["checkpoint_hash"] or "(none)"))
    vocab = [f"{what} {s[key]}" for what, key in (("objects", "object_vocab_size"),
                                                  ("attributes", "attribute_vocab_size"))
             if s.get(key) is not None]
    lines.append(("vocabularies", ", ".join(vocab) if vocab else "not in metadata"))
    f = s["files"]
    lines.append(("feature files", f"{f['feature_files']}  {_bytes(f['feature_bytes'])}"))
    lines.append(("error files", f"{f['error_files']}  {_bytes(f['error_bytes'])}"))
    lines.append(("all files", f"{f['total_files']}  {_bytes(f['total_bytes'])}"))
    sh = s["shards"]
    text = f"{sh['count']} present, {sh['complete']} complete, {sh['incomplete']} incomplete"
    if sh["incomplete_shard_numbers"]:
        more = ", ..." if sh["incomplete"] > len(sh["incomplete_shard_numbers"]) else ""
        text += f" (shard {', '.join(map(str, sh['incomplete_shard_numbers']))}{more})"
    if sh.get("unplanned"):
        text += f", {sh['unplanned']} not in the plan"
    lines.append(("shards", text))
    p = s["plan"]
    if p is None:
        lines.append(("plan", "none (not written by `extract`)"))
    else:
        lines.append(("plan", f"{p['planned_rows']} images in {p['planned_shards']} shards planned, "
                              f"{p['present_rows']} rows present"))
        for m in p["mismatched_shards"]:
            lines.append(("", f"  shard {m['shard']}: {m['present']} rows, {m['planned']} planned"))
    lines.append(("index", s["index"]))
    if s.get("png"):
        lines.append(("histograms", s["png"]))
    for w in s["warnings"]:
        lines.append(("warning", w))
    width = max(len(label) for label, _ in lines)
    out = [f"{label:<{width}}  {value}".rstrip() for label, value in lines]
    status = "ok" if not s["warnings"] else f"{len(s['warnings'])} warning(s)"
    detector = f"{s['detector']}, D={s['feature_dim']} {s['features_dtype']}" if s["detector"] else "no features"
    out.append(f"summary: {s['images']} images, {s['errors']} errors, median {b['median']} boxes/image, "
               f"{detector}, {_human(f['total_bytes'])} in {f['total_files']} files; {status}")
    return "\n".join(out)
