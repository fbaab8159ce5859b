"""`make demo`: the whole paper on the synthetic world, in one go, on an embedded local Ray.

    ray-updown demo --out runs/demo --scale 1        (or: make demo)

`run_demo` reads top to bottom as the paper does:

1. world       a synthetic world in the real formats (COCO/Karpathy, VQA v2, Visual Genome,
               GloVe): `data/world.py`.
2. detector    bottom-up attention: Faster R-CNN (ResNet C4) + attribute head trained on the
               world's Visual Genome files on Ray Train (paper 3.1), under a time budget.
3. features    Ray Data extraction with that detector: bottom-up regions, and the ResNet
               grid baseline from the same backbone (paper 4.2) at 1x1, 7x7, 10x10, 14x14.
4. captioner   Up-Down captioner (eq. 2-7) on region features and on the grid baseline:
               cross-entropy (eq. 9), then SCST (eq. 10-11) from the XE checkpoint, on Ray
               Train; beam search (5) on the Karpathy test split, the COCO server results
               file, BLEU/METEOR/ROUGE-L/CIDEr through pycocoevalcap (the paper's Table 1).
5. VQA         the Up-Down VQA model (eq. 12-17) on the grids 1x1, 7x7, 14x14 with each VQA
               seed (Ray Tune trials) and an ensemble on regions whose first members are the
               single Up-Down model's seeds; official accuracy per answer type on VQA val,
               the means over the seeds (the paper's Table 4).
               Stages 4 and 5 run side by side (four tracks sharing the cluster's CPUs).
6. report      <out>/report.md with the training curves, the miniature Tables 1 and 4, the
               targets and whether each was met, and attention pictures (figures 5-7).

Each stage prints when it starts and finishes; a finished stage leaves <out>/stages/<name>.json
so a second run reuses it (see stages.StageBook). `scale` multiplies the world's images,
the detector's time budget and the training epochs; `scale` 0.05 runs everything in minutes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Literal

from ray_updown import storage
from ray_updown.config import check_at_least, from_dict, to_dict, validate_fields
from ray_updown.demo.stages import (
    CONFIG_RECORD,
    STAGES_DIR,
    StageBook,
    WorldFiles,
    detector_history,
    evaluate_caption_model,
    evaluate_vqa_model,
    extract,
    local_or_uri,
    log,
    mean_regions,
    side_by_side,
    train_caption_model,
    train_vqa_ensemble,
    train_vqa_trials,
    vqa_config,
)
from ray_updown.errors import ConfigError


@dataclass
class DemoConfig:
    """The demo; sizes are those of scale 1 (`scale` multiplies images, minutes and epochs)."""

    out: str = "runs/demo"
    scale: float = 1.0
    seed: int = 0
    num_cpus: int = 0  # CPUs of an embedded local Ray; 0 = the machine's
    # 1. world
    images: int = 1000  # 128-px images: Karpathy 85% train+restval / 7.5% val / 7.5% test
    # 2. detector: its training budget (evaluation comes on top); 0 = demo_detector_config's 8.
    # On a quiet 2-core machine mAP@0.5 passes 0.95 after ~2 min and levels at ~0.98 by 4.
    detector_minutes: float = 5.5
    detector_epochs: int = 0
    detector_train_images: int = 0  # 0 = all; n = the first n (tiny runs)
    # The attribute loss weight (MILVLG's port: 0.5). The world's captions and questions are
    # about colours; at 0.5 an 8-minute detector's region features carry colour only in part
    # (a linear probe: 80% on 8 colours), at 2.0 fully (100%), at some cost in mAP.
    detector_attr_loss_weight: float = 2.0
    # 3. features
    extract_threads: int = 2  # torch threads of the one extraction actor
    # Regions kept per image: a fixed 36, as the paper's released features. On the world the
    # paper's 10-100 above 0.2 keeps about 10 (the minimum binds), too few copies of each
    # shape for counting (docs/demo.md, "The counting gap"; demo/counting.py measures both).
    min_regions: int = 36
    max_regions: int = 36
    # 4. captioner (M = H = E = caption_dim; the paper has 1000/512/1000)
    caption_grid: int = 7  # the grid baseline (the paper's is 10x10; 7x7 halves its cost here)
    caption_dim: int = 256
    caption_dropout: float = 0.3
    caption_batch_size: int = 20  # images per step (x 5 captions)
    caption_max_len: int = 16  # words (the paper's 16); longer captions are clipped
    caption_lr: float = 2e-3  # Adam, falling linearly to 0 (the paper: SGD 0.01)
    caption_xe_epochs: int = 12
    scst_lr: float = 1e-4
    scst_epochs: int = 3
    caption_val_images: int = 100  # val images scored (greedy CIDEr-D) after each epoch
    # 5. VQA
    vqa_grids: list[int] = field(default_factory=lambda: [1, 7, 14])
    # The paper: 512. At 128 an epoch costs about half of one at 256, so the models train
    # twice as many epochs for the same CPU time; on worlds 0-2, 30 epochs at 128 gave every
    # ensemble 2-9 points more than 15 at 256 (docs/demo.md, "Hidden 128, 30 epochs").
    vqa_hidden: int = 128
    vqa_optimizer: Literal["adadelta", "adamax"] = "adamax"  # the paper; the re-implementation
    # True: every VQA model scales each region feature to unit length (Teney et al.). Off by
    # default: it meets no more targets on worlds 0-2 than raw features do (18 of 21 each, at
    # constant steps; docs/demo.md, "Tried: unit-length features").
    vqa_l2_normalize: bool = False
    # Dropout between f_o and W_o (eq. 17), the re-implementation's 0.5: without it most
    # Up-Down seeds fall below the answer prior on counts of a colour or a class, which no
    # model of the world learns (docs/demo.md, "Three seeds a model").
    vqa_classifier_dropout: float = 0.5
    # 2e-2, reached by a linear warmup over the first 3 epochs: at Adamax's default 2e-3
    # every model stays at the answer priors for 10+ epochs on the world; at a constant 1e-2
    # some seeds never leave the yes/no prior within 30 epochs (docs/demo.md, "Warmup to 2e-2").
    vqa_lr: float = 2e-2  # 0 = the optimizer's default
    vqa_warmup_epochs: float = 3.0
    vqa_epochs: int = 30
    # Every model trains all its epochs (0 = no early stopping) and keeps its best epoch on
    # val: the models sit at the answer priors for 8-12 epochs before they learn colours and
    # counts, so any patience short of that stops the grids before they learn.
    vqa_patience: int = 0
    vqa_batch_size: int = 64
    vqa_answer_min_count: int = 9  # the paper's threshold
    ensemble_members: int = 3
    # Each model of Table 4 trains with this many VQA seeds (S, S+1, ...): every grid, and
    # Up-Down as the ensemble's first members; the table's rows and the VQA targets are their
    # means. One seed's number accuracy moves by 3-6 points on the world's ~200 val number
    # questions, as much as the models differ (docs/demo.md, "Three seeds a model").
    vqa_seeds: int = 3
    # stages 4 and 5 run as four tracks (captioner on regions, on the grid, VQA grids, VQA
    # ensemble); Ray queues their runs for the CPUs; 1 = in turn
    parallel_tracks: int = 4
    # 6. report
    attention_examples: int = 3  # test images with caption attention pictures

    def validate(self) -> None:
        validate_fields(self)  # vqa_optimizer
        if not self.out:
            raise ConfigError("an output folder is needed", record="out")
        if not 0 < self.scale <= 100:
            raise ConfigError(f"must be in (0, 100], got {self.scale}", record="scale")
        check_at_least(self, 1, "images", "caption_dim", "caption_batch_size", "caption_xe_epochs",
                       "scst_epochs", "vqa_hidden", "vqa_epochs", "vqa_batch_size",
                       "ensemble_members", "caption_grid", "extract_threads", "parallel_tracks",
                       "caption_max_len")
        if self.min_regions < 0 or self.max_regions < 0 or (
                self.max_regions and self.min_regions > self.max_regions):
            raise ConfigError(f"need 0 <= min_regions <= max_regions, got {self.min_regions}, "
                              f"{self.max_regions}", record="min_regions")
        if self.detector_minutes < 0 or self.detector_epochs < 0 or self.detector_attr_loss_weight < 0:
            raise ConfigError("must be >= 0 (0 = the demo detector's default)",
                              record="detector_minutes")
        check_at_least(self, 0, "vqa_lr", "vqa_warmup_epochs")
        if not 0 <= self.vqa_classifier_dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.vqa_classifier_dropout}",
                              record="vqa_classifier_dropout")
        if not 1 <= self.vqa_seeds <= self.ensemble_members:
            raise ConfigError(f"must be between 1 and ensemble_members ({self.ensemble_members}), "
                              f"got {self.vqa_seeds}", record="vqa_seeds")
        if not self.vqa_grids or min(self.vqa_grids) < 1:
            raise ConfigError(f"needs grid sizes >= 1, got {self.vqa_grids}", record="vqa_grids")

    def world_images(self) -> int:
        return max(40, round(self.images * self.scale))

    def epochs(self, base: int) -> int:
        return max(1, round(base * self.scale))


def load_demo_config(demo: str) -> DemoConfig:
    """The DemoConfig a demo folder was run with (its stage record), with `out` the folder:
    ConfigError when the folder has no record, naming the file."""
    uri = storage.join(demo, STAGES_DIR, CONFIG_RECORD)
    if not storage.exists(uri):
        raise ConfigError("not a demo folder: its config record is missing (run `make demo`)",
                          file=uri)
    return from_dict(DemoConfig, {**storage.read_json(uri), "out": demo}, uri)


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo: its config, its folder and the book of its finished stages."""

    cfg: DemoConfig
    out: str
    book: StageBook

    @property
    def world(self) -> WorldFiles:
        return WorldFiles(storage.join(self.out, "world"))

    @property
    def runs(self) -> str:
        return storage.join(self.out, "runs")

    @property
    def results(self) -> str:
        return storage.join(self.out, "results")

    def features(self, name: str) -> str:
        return storage.join(self.out, "features", name)


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or finish) the demo into `cfg.out`; returns the summary (tables, targets, times)."""
    started = time.perf_counter()
    demo = start_demo(cfg)
    world_summary = world_stage(demo)
    detector = detector_stage(demo)
    stores, extraction = features_stage(demo, detector)
    captioning, vqa_grids, ensemble = tracks_stage(demo, detector, stores)
    vqa_scores = demo.book.run("vqa_val", lambda: score_vqa(demo, stores, vqa_grids, ensemble))
    state = {"config": to_dict(cfg), "world": world_summary, "detector": detector,
             "extraction": extraction, "stores": stores, "captioning": captioning,
             "vqa_grids": vqa_grids, "ensemble": ensemble, "vqa_scores": vqa_scores}
    report = report_stage(demo, state, started)
    return summarise(demo, detector, report, started)


def start_demo(cfg: DemoConfig) -> DemoRun:
    """Check the config against the folder's, and start (or connect to) Ray."""
    from ray_updown.ray_cluster import ensure_ray

    cfg.validate()
    out = local_or_uri(cfg.out)
    book = StageBook(out)
    book.check_config(to_dict(cfg))
    log(f"the paper on a synthetic world at scale {cfg.scale:g} into {out}")
    # The tracks of stages 4-5 queue for the two CPUs by design; Ray Train's default 60 s
    # wait for a worker group would fail (then retry) a run that is merely waiting its turn.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    ensure_ray(cfg.num_cpus or None)
    return DemoRun(cfg, out, book)


def world_stage(demo: DemoRun) -> dict:
    """1. The world, in the real datasets' formats."""
    from ray_updown.data.world import WorldConfig, build_world

    cfg = demo.cfg
    return demo.book.run("world", lambda: build_world(
        WorldConfig(num_images=cfg.world_images(), seed=cfg.seed), demo.world.root))


def detector_stage(demo: DemoRun) -> dict:
    """2. Bottom-up attention: the detector with its attribute head (paper 3.1)."""
    from ray_updown.detector.train.loop import train_detector

    def train() -> dict:
        summary = train_detector(detector_config(demo))
        return {"detector": summary["detector"], "metrics": summary["metrics"],
                "history": detector_history(summary), "train_minutes": summary["train_minutes"]}

    return demo.book.run("detector", train)


def detector_config(demo: DemoRun):
    """The demo detector's training config, with the demo's budget, epochs, images and
    attribute loss weight (0 keeps the demo detector's own)."""
    from ray_updown.detector.train.config import demo_detector_config

    cfg = demo.cfg
    det_cfg = demo_detector_config(demo.world.root, demo.runs, "detector", keep_checkpoints=0,
                                   seed=cfg.seed)
    if cfg.detector_attr_loss_weight:
        det_cfg = dataclasses.replace(det_cfg, model=dataclasses.replace(
            det_cfg.model, attr_loss_weight=cfg.detector_attr_loss_weight))
    det_cfg = dataclasses.replace(
        det_cfg, max_minutes=(cfg.detector_minutes or det_cfg.max_minutes) * cfg.scale,
        epochs=cfg.detector_epochs or det_cfg.epochs)
    return dataclasses.replace(det_cfg, data=dataclasses.replace(
        det_cfg.data, train_images=cfg.detector_train_images))


def features_stage(demo: DemoRun, detector: dict) -> tuple[dict[str, str], dict[str, dict]]:
    """3. Region features and the grid baseline from the same backbone (paper 4.2): the
    stores by name (regions, grid<g>) and what each extraction reported."""
    cfg = demo.cfg
    grid_sizes = sorted(set(cfg.vqa_grids) | {cfg.caption_grid})
    stores = {"regions": demo.features("regions"),
              **{f"grid{g}": demo.features(f"grid{g}") for g in grid_sizes}}
    extraction = {}
    for name, store in stores.items():
        grid = None if name == "regions" else int(name[len("grid"):])
        extraction[name] = demo.book.run(f"extract_{name}", lambda: {
            **extract(demo.world, store, detector["detector"], grid, cfg.extract_threads,
                      (cfg.min_regions, cfg.max_regions)),
            "mean_regions": mean_regions(store)})
    return stores, extraction


def tracks_stage(demo: DemoRun, detector: dict, stores: dict[str, str]) -> tuple[dict, dict, dict]:
    """4 and 5. The captioner on regions and on the grid, the VQA grids and the VQA ensemble,
    as four tracks sharing the cluster: a captioner run takes one CPU, a VQA trial one; Ray
    queues what does not fit, so both CPUs stay busy until the last run ends. The VQA grids,
    the longest track, asks first. Returns the captioners by features, the VQA grid runs and
    the ensemble."""
    # Ray Train and Tune are imported here first: two threads importing them at once trip
    # over ray.train's own circular imports (as when a re-run skips the detector, the first
    # importer).
    import ray.train  # noqa: F401
    import ray.tune  # noqa: F401

    grid = f"grid{demo.cfg.caption_grid}"
    tracks = side_by_side({"vqa_grids": lambda: vqa_grids_track(demo, stores),
                           "caption_regions": lambda: caption_track(demo, stores, "regions"),
                           "caption_grid": lambda: caption_track(demo, stores, grid),
                           "vqa_ensemble": lambda: vqa_ensemble_track(demo, detector, stores)},
                          demo.cfg.parallel_tracks)
    captioning = {"regions": tracks["caption_regions"], grid: tracks["caption_grid"]}
    return captioning, tracks["vqa_grids"], tracks["vqa_ensemble"]


def caption_track(demo: DemoRun, stores: dict[str, str], feat: str) -> dict:
    """The captioner on one feature store: XE, then SCST from it, each scored on the Karpathy
    test split (Table 1)."""
    cfg, book = demo.cfg, demo.book
    label = "Up-Down" if feat == "regions" else f"ResNet {cfg.caption_grid}x{cfg.caption_grid}"
    xe = book.run(f"caption_xe_{feat}", lambda: train_caption_model(
        cfg, demo.world, stores[feat], demo.runs, f"caption-xe-{feat}", "xe",
        cfg.epochs(cfg.caption_xe_epochs)))
    scst = book.run(f"caption_scst_{feat}", lambda: train_caption_model(
        cfg, demo.world, stores[feat], demo.runs, f"caption-scst-{feat}", "scst",
        cfg.epochs(cfg.scst_epochs), init_from=xe["checkpoint"]))
    for objective, run in (("xe", xe), ("scst", scst)):
        run["test"] = book.run(f"caption_test_{objective}_{feat}", lambda: evaluate_caption_model(
            demo.world, stores[feat], run["checkpoint"], f"{objective}-{feat}", demo.results))
    return {"label": label, "xe": xe, "scst": scst}


def vqa_grids_track(demo: DemoRun, stores: dict[str, str]) -> dict[str, list[dict]]:
    """The VQA model on each grid baseline with each VQA seed, as Ray Tune trials:
    {"grid<g>": [its run per seed]}."""
    cfg, epochs, seeds = demo.cfg, demo.cfg.epochs(demo.cfg.vqa_epochs), vqa_seeds(demo.cfg)
    configs = {f"grid{g}-seed{seed}": vqa_config(dataclasses.replace(cfg, seed=seed), demo.world,
                                                 stores[f"grid{g}"], g * g, demo.runs,
                                                 f"vqa-grid{g}", epochs)
               for g in cfg.vqa_grids for seed in seeds}
    runs = demo.book.run("vqa_grids", lambda: train_vqa_trials(configs, demo.runs, "vqa-grids"))
    return {f"grid{g}": [runs[f"grid{g}-seed{seed}"] for seed in seeds] for g in cfg.vqa_grids}


def vqa_seeds(cfg: DemoConfig, count: int | None = None) -> list[int]:
    """The VQA seeds S, S+1, ... from the demo's seed: `count` of them, by default the
    `vqa_seeds` every model of Table 4 trains with."""
    return [cfg.seed + k for k in range(cfg.vqa_seeds if count is None else count)]


def vqa_ensemble_track(demo: DemoRun, detector: dict, stores: dict[str, str]) -> dict:
    """The VQA ensemble on regions; its first `vqa_seeds` members are the single Up-Down
    model's runs."""
    cfg = demo.cfg
    detector_boxes = cfg.max_regions or int(storage.read_json(storage.join(
        detector["detector"], "detector.json"))["config"].get("max_boxes", 100))
    ensemble_cfg = vqa_config(cfg, demo.world, stores["regions"], detector_boxes, demo.runs,
                              "vqa-ensemble", cfg.epochs(cfg.vqa_epochs))
    return demo.book.run("vqa_ensemble", lambda: train_vqa_ensemble(ensemble_cfg,
                                                                    cfg.ensemble_members))


def score_vqa(demo: DemoRun, stores: dict[str, str], vqa_grids: dict, ensemble: dict) -> dict:
    """The official VQA val accuracy of each member, the ensemble and each grid's run per
    seed ("grid<g>-seed<s>"): Table 4's numbers."""
    members = {f"member{m['seed']}": [m["checkpoint"]] for m in ensemble["members"]}
    models = {**members, "ensemble": [m["checkpoint"] for m in ensemble["members"]]}
    scores = {name: evaluate_vqa_model(demo.world, checkpoints, stores["regions"], name,
                                       demo.results)
              for name, checkpoints in models.items()}
    for grid, runs in vqa_grids.items():
        for run in runs:
            name = f"{grid}-seed{run['seed']}"
            scores[name] = evaluate_vqa_model(demo.world, [run["checkpoint"]], stores[grid],
                                              name, demo.results)
    return scores


def report_stage(demo: DemoRun, state: dict, started: float) -> dict:
    """6. The report: curves, Tables 1 and 4, targets, attention pictures."""
    from ray_updown.demo.report import write_report

    book = demo.book
    return book.run("report", lambda: write_report(
        demo.out, demo.world, state, dict(book.seconds), dict(book.previous_seconds),
        time.perf_counter() - started))


def summarise(demo: DemoRun, detector: dict, report: dict, started: float) -> dict:
    """The run's summary: the report, the times per stage, the tables and the targets."""
    from ray_updown.demo.report import targets_met

    book = demo.book
    minutes = (time.perf_counter() - started) / 60
    summary = {"report": report["report"], "minutes": round(minutes, 2),
               "stage_seconds": {k: round(v, 1) for k, v in book.seconds.items()},
               "skipped": list(book.skipped),
               "previous_stage_seconds": {k: round(v, 1) for k, v in book.previous_seconds.items()},
               "detector": {k: detector["metrics"].get(k) for k in
                            ("val_map50", "val_attr_acc", "test_map50", "test_attr_acc", "epoch")},
               "table1": report["table1"], "table4": report["table4"],
               "targets": targets_met(report["table1"], report["table4"])}
    log(f"demo finished in {minutes:.1f} min ({len(book.skipped)} stages reused); "
        f"report: {report['report']}")
    return summary
