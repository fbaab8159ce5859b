"""The pieces `make demo` (run.py) strings together: stage bookkeeping and one call per stage.

Every stage of the demo is a call of the project's own entry points (world, detector training,
Ray Data extraction, Ray Train captioner runs, Ray Tune VQA runs, evaluation); this module only
builds their configs for the synthetic world and keeps what the report needs from their
summaries: checkpoints, per-epoch metrics (the training curves) and the scores.

Bookkeeping (`StageBook`): a completed stage leaves `<out>/stages/<name>.json` holding its
elapsed seconds and its result, written atomically after the stage's own outputs, so a second
run reads it instead of running the stage again, and a run interrupted mid-stage redoes only
that stage (whose own resume logic then reuses what it had written).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from ray_updown import storage
from ray_updown.config import changed_keys
from ray_updown.errors import ConfigError

STAGES_DIR = "stages"
CONFIG_RECORD = "demo_config.json"
# Settings that change when work runs, never its results: a rerun may change them.
SCHEDULING_ONLY = {"parallel_tracks"}


def log(message: str) -> None:
    """One progress line on stderr (stdout carries the final JSON summary)."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def plain(value: Any) -> Any:
    """`value` as JSON-safe data (NaN and infinities become None; other objects str)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(json.dumps(value, default=str)))


def changed_settings(before: dict, now: dict, ignore: set[str] = frozenset()) -> list[str]:
    """The demo settings that differ between two configs, scheduling-only ones left out."""
    return changed_keys(before, now, ignore=SCHEDULING_ONLY | set(ignore))


class StageBook:
    """Runs stages once: skips those a previous run completed, times and announces the rest."""

    def __init__(self, out: str):
        self.out = out
        self.seconds: dict[str, float] = {}  # this run's time per stage (0 when skipped)
        self.previous_seconds: dict[str, float] = {}  # what a skipped stage took when it ran
        self.skipped: list[str] = []

    def record_uri(self, name: str) -> str:
        return storage.join(self.out, STAGES_DIR, f"{name}.json")

    def check_config(self, config: dict) -> None:
        """A demo folder holds one configuration: a rerun with other settings would mix
        results of both, so it is refused (ConfigError) naming the fields that differ."""
        uri = storage.join(self.out, STAGES_DIR, CONFIG_RECORD)
        config = plain({k: v for k, v in config.items() if k != "out"})
        if storage.exists(uri):
            before = storage.read_json(uri)
            changed = changed_settings(before, config)
            if changed:
                differences = ", ".join(f"{k}: {before.get(k)!r} then, {config.get(k)!r} now"
                                        for k in changed)
                raise ConfigError(f"this folder holds a demo run with other settings "
                                  f"({differences}); "
                                  "use another --out or remove the folder", file=self.out)
            return
        storage.write_json(uri, config, indent=1)

    def run(self, name: str, work: Callable[[], dict]) -> dict:
        uri = self.record_uri(name)
        if storage.exists(uri):
            record = storage.read_json(uri)
            self.seconds[name] = 0.0
            self.previous_seconds[name] = float(record.get("seconds", 0.0))
            self.skipped.append(name)
            log(f"{name}: done by a previous run in {self.previous_seconds[name]:.0f} s - skipped")
            return record["result"]
        log(f"{name}: started")
        started = time.perf_counter()
        result = plain(work())
        seconds = time.perf_counter() - started
        storage.write_json(uri, {"stage": name, "seconds": seconds, "result": result,
                                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1)
        self.seconds[name] = seconds
        log(f"{name}: finished in {seconds:.0f} s")
        return result


def side_by_side(tracks: dict[str, Callable[[], dict]], parallel: int) -> dict[str, dict]:
    """{name: track()}, up to `parallel` tracks at once (threads: each mostly waits on its Ray
    runs). A failure is raised once the other tracks have finished (their stages are
    recorded, so a rerun reuses them)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {name: pool.submit(track) for name, track in tracks.items()}
    return {name: future.result() for name, future in futures.items()}


# ----------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class WorldFiles:
    """Where the synthetic world's files are (ray_updown/data/world.py writes them)."""

    root: str

    @property
    def images(self) -> str:
        return storage.join(self.root, "images") + "/"

    @property
    def karpathy(self) -> str:
        return storage.join(self.root, "annotations", "dataset_coco.json")

    def questions(self, split: str) -> str:
        return storage.join(self.root, "vqa", f"v2_OpenEnded_mscoco_{split}2014_questions.json")

    def annotations(self, split: str) -> str:
        return storage.join(self.root, "vqa", f"v2_mscoco_{split}2014_annotations.json")

    @property
    def glove(self) -> str:
        return storage.join(self.root, "glove", "glove.synthetic.300d.txt")

    def image_paths(self) -> dict[int, str]:
        """COCO id -> its JPEG (Karpathy's train/restval in train2014, val/test in val2014)."""
        from ray_updown.data.coco import load_karpathy

        return {im.image_id: storage.join(self.root, "images", im.path)
                for im in load_karpathy(self.karpathy)}


# ------------------------------------------------------------------------------ detector
def detector_history(summary: dict) -> list[dict]:
    """Per-epoch numbers of a detector run (every checkpoint is kept for the curves)."""
    keys = ("epoch", "step", "train_seconds", "loss", "loss_rpn_cls", "loss_rpn_box", "loss_cls",
            "loss_box", "loss_attr", "val_map50", "val_attr_acc", "val_recall50")
    return [{k: m.get(k) for k in keys} for m in summary.get("history", [])]


def detector_input_sides(detector_uri: str) -> tuple[int, int]:
    """(min_size, max_size) of the detector's test scale, from its checkpoint config."""
    config = storage.read_json(storage.join(detector_uri, "detector.json")).get("config", {})
    return int(config.get("min_size", 600)), int(config.get("max_size", 1000))


# ---------------------------------------------------------------------------- extraction
def extract(world: WorldFiles, store: str, detector_uri: str, grid_size: int | None,
            torch_threads: int, boxes: tuple[int, int] = (0, 0)) -> dict:
    """Region (grid_size None) or grid features of every world image into `store`; `boxes`
    (min, max) clamps the number of regions kept per image (0 = the detector's own)."""
    from ray_updown.extraction.pipeline import ExtractConfig, run_extraction

    min_side, max_side = detector_input_sides(detector_uri)
    cfg = ExtractConfig(images=world.images, out=store, checkpoint=detector_uri,
                        model="detector" if grid_size is None else "grid",
                        grid_size=grid_size or 7, batch_size=8, num_actors=1, cpus_per_actor=1,
                        torch_threads=torch_threads, min_side=min_side, max_side=max_side,
                        min_boxes=boxes[0], max_boxes=boxes[1])
    summary = run_extraction(cfg)
    keep = ("inputs", "features", "errors", "errors_by_stage", "seconds", "images_per_s",
            "detector", "feature_dim", "store")
    return {k: summary.get(k) for k in keep}


def mean_regions(store: str) -> float:
    """Mean number of regions per image of a feature store (for the report)."""
    from ray_updown.features.reader import FeatureStore

    fs = FeatureStore(store)
    counts = [r.num_boxes for r in fs.iter_records()]
    return float(sum(counts) / max(1, len(counts)))


# ----------------------------------------------------------------------------- captioner
def train_caption_model(cfg, world: WorldFiles, features: str, runs: str, name: str,
                        objective: str, epochs: int, init_from: str = "") -> dict:
    """One captioner run (XE, eq. 9, or SCST, eq. 10-11) on Ray Train; its per-epoch curve."""
    from ray_updown.captioning.config import CaptionModelConfig, CaptionTrainConfig, OptimConfig
    from ray_updown.captioning.data import CaptionDataConfig
    from ray_updown.captioning.objectives import SCSTConfig
    from ray_updown.captioning.train import train_captioner

    # max_regions only caps: batches pad to their largest image (<= 36 regions, 196 cells).
    data = CaptionDataConfig(karpathy=world.karpathy, features=features,
                             max_len=cfg.caption_max_len, max_regions=256, val_images=cfg.caption_val_images,
                             feature_access="shared",
                             feature_cache_dir=os.path.join(runs, "feature_cache"))
    dim = cfg.caption_dim
    train_cfg = CaptionTrainConfig(
        name=name, storage_path=runs, objective=objective, data=data,
        model=CaptionModelConfig(embed_dim=dim, hidden_dim=dim, att_dim=dim,
                                 dropout=cfg.caption_dropout),
        optim=OptimConfig(optimizer="adam", lr=cfg.caption_lr, schedule="linear", grad_clip=5.0),
        scst=SCSTConfig(form="beam", num_candidates=5, optimizer="adam", lr=cfg.scst_lr,
                        init_from=init_from),
        epochs=epochs, batch_size=cfg.caption_batch_size, num_workers=1, seed=cfg.seed,
        keep_checkpoints=0)
    summary = train_captioner(train_cfg)
    keys = ("epoch", "loss", "val_cider_d", "train_reward", "train_baseline", "epoch_seconds",
            "captions_per_second")
    history = [{k: m[k] for k in keys if k in m} for m in summary["history"]]
    return {"checkpoint": summary["checkpoint"], "history": history,
            "elapsed_seconds": summary["elapsed_seconds"]}


def evaluate_caption_model(world: WorldFiles, features: str, checkpoint: str, name: str,
                           results_dir: str) -> dict:
    """Beam search (5) on the Karpathy test split, the server results file, pycocoevalcap."""
    from ray_updown.captioning.predict import evaluate_split

    out = evaluate_split(checkpoint, karpathy=world.karpathy, features=features, split="test",
                         name=name, out_dir=results_dir, beam_size=5)
    examples = dict(list(out["captions"].items())[:5])
    return {"metrics": out["metrics"], "results_file": out["results_file"],
            "num_images": out["num_images"], "examples": examples}


# ---------------------------------------------------------------------------------- VQA
def vqa_config(cfg, world: WorldFiles, features: str, max_boxes: int, runs: str, name: str,
               epochs: int):
    """The demo's VQA run: the paper's model (3.3: gated tanh, GloVe) at the demo's sizes."""
    from ray_updown.vqa.config import VqaModelOptions, VqaTrainConfig
    from ray_updown.vqa.data import VqaDataConfig

    data = VqaDataConfig(train_questions=world.questions("train"),
                         train_annotations=world.annotations("train"),
                         val_questions=world.questions("val"),
                         val_annotations=world.annotations("val"), features=features,
                         glove=world.glove, answer_min_count=cfg.vqa_answer_min_count,
                         max_boxes=max_boxes,
                         # The demo's shared feature copies live in its own folder.
                         feature_cache_dir=os.path.join(runs, "feature_cache"))
    return VqaTrainConfig(data=data, model=VqaModelOptions(
                              preset="paper", hidden=cfg.vqa_hidden,
                              l2_normalize_features=cfg.vqa_l2_normalize,
                              classifier_dropout=cfg.vqa_classifier_dropout),
                          optimizer=cfg.vqa_optimizer, lr=cfg.vqa_lr or None,
                          warmup_epochs=cfg.vqa_warmup_epochs, epochs=epochs,
                          batch_size=cfg.vqa_batch_size, patience=cfg.vqa_patience,
                          seed=cfg.seed, storage_path=runs, name=name)


def train_vqa_trials(configs: dict[str, Any], root: str, experiment: str) -> dict[str, dict]:
    """Single VQA models as trials of one Ray Tune experiment (they share the cluster, one CPU
    each); resumes an interrupted experiment. The configs differ only in their data section
    (features, K) and their seed, and cover every store with every seed. Tune starts trials
    seed by seed and, within a seed, in the order of its grid, so the models with the most
    regions per image (the costliest epochs) queue first: a long trial started last would run
    alone on one CPU while the others sit idle. Returns per model, in the order given, its
    seed, its best checkpoint (by val accuracy) and every epoch's metrics (Tune keeps them
    all; Ray Train keeps only those of retained checkpoints)."""
    from ray import tune

    from ray_updown.train.search import restore_or_new_tuner
    from ray_updown.train.trainer import checkpoint_uri
    from ray_updown.vqa.config import METRIC
    from ray_updown.vqa.train import tune_run_config, tune_trainable

    names = list(configs)
    absolute = {name: cfg.absolute() for name, cfg in configs.items()}
    first = configs[names[0]]
    by_trial = {(cfg.data.features, cfg.seed): name for name, cfg in absolute.items()}
    trainable = tune_trainable(cpus_per_trial=1.0)

    def new_tuner():
        costliest_first = sorted(absolute.values(), key=lambda c: -c.data.max_boxes)
        datas = list({c.data.features: c.to_dict()["data"] for c in costliest_first}.values())
        seeds = sorted({c.seed for c in absolute.values()})
        if len(datas) * len(seeds) != len(by_trial):
            raise ValueError(f"{experiment}: the VQA trials must pair every store with every "
                             f"seed, got {sorted(by_trial)}")
        # Tune varies "data" fastest (its keys in sorted order): seed by seed, costliest first.
        param_space = {**absolute[names[0]].to_dict(), "data": tune.grid_search(datas),
                       "seed": tune.grid_search(seeds)}
        return tune.Tuner(trainable, param_space=param_space,
                          tune_config=tune.TuneConfig(trial_dirname_creator=_trial_dirname),
                          run_config=tune_run_config(first, root, experiment))

    grid = restore_or_new_tuner(root, experiment, trainable, new_tuner).fit()
    out: dict[str, dict] = {}
    for result in grid:
        if result.error is not None:
            raise result.error
        seed = int(result.config["seed"])
        name = by_trial[(result.config["data"]["features"], seed)]
        pairs = [(m.get(METRIC, -math.inf), c) for c, m in (result.best_checkpoints or [])]
        best = max(pairs, key=lambda p: p[0])[1] if pairs else result.checkpoint
        out[name] = {"seed": seed, "checkpoint": checkpoint_uri(best, first.storage_path),
                     "history": _vqa_history(result.metrics_dataframe)}
    return {n: out[n] for n in names}


def _trial_dirname(trial) -> str:
    """A short folder name per trial: its feature store's name and its seed."""
    store = trial.config['data']['features'].rstrip('/').rsplit('/', 1)[-1]
    return f"{trial.trial_id}-{store}-seed{trial.config['seed']}"


def _vqa_history(frame) -> list[dict]:
    if frame is None or len(frame) == 0:
        return []
    keys = [k for k in ("epoch", "train_loss", "val_accuracy", "val_accuracy_yes_no",
                        "val_accuracy_number", "val_accuracy_other") if k in frame.columns]
    return [{k: float(row[k]) for k in keys} for _, row in frame[keys].iterrows()]


def train_vqa_ensemble(cfg, members: int) -> dict:
    """The ensemble (ray_updown.vqa.ensemble): N seeds as Tune trials; manifest + curves."""
    from ray_updown.vqa.ensemble import ensemble_root, train_ensemble

    manifest = train_ensemble(cfg, members=members, cpus_per_trial=1.0)
    root = ensemble_root(cfg.absolute())
    for member in manifest["members"]:
        member["history"] = _trial_history(storage.join(root, member["experiment"], member["trial"]))
    return {"uri": manifest["uri"], "members": manifest["members"]}


def _trial_history(trial_dir: str) -> list[dict]:
    """Every epoch's metrics of a Tune trial, from its result.json (one JSON object a line)."""
    uri = storage.join(trial_dir, "result.json")
    if not storage.exists(uri):
        return []
    keys = ("epoch", "train_loss", "val_accuracy")
    rows = [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]
    return [{k: r[k] for k in keys if k in r} for r in rows]


def evaluate_vqa_model(world: WorldFiles, checkpoints: list[str], features: str, name: str,
                       results_dir: str) -> dict:
    """Official accuracy (overall and per answer type) on VQA val of one model or an
    ensemble (averaged sigmoid scores), and its results file in the server format."""
    from ray_updown.metrics.vqa_eval import evaluate_vqa
    from ray_updown.vqa.ensemble import predict_ensemble, write_server_results

    predictions = predict_ensemble(checkpoints, world.questions("val"), features)
    results = write_server_results(predictions, results_dir, name, subset="val2014")
    scores = evaluate_vqa(world.questions("val"), world.annotations("val"), results)
    return {"overall": scores["overall"], "per_answer_type": scores["perAnswerType"],
            "results_file": results, "members": len(checkpoints)}


def local_or_uri(path: str) -> str:
    """Local paths made absolute (Ray workers have their own working directory)."""
    return path if storage.is_remote(path) or path.startswith("file://") else os.path.abspath(path)
