"""The `ray-updown` subcommands as plain data: one `Command` each, in `--help`'s order.

cli.py builds the parser from `COMMANDS`; docs/development.md lists the same names and help
(tests/test_docs.py holds the two together). What each command does is cli_handlers.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from ray_updown import cli_handlers as handlers
from ray_updown.cli_handlers import Handler


@dataclass(frozen=True)
class Arg:
    """One `add_argument` call: its names and keywords, and the config field the flag sets."""

    names: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    config_field: str | None = None

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    """A subcommand. `config` ("module:Class") is its typed config: the command then also takes
    --config, --show-config and key=value overrides. `describe` repeats `help` as the
    description at the top of the subcommand's own --help."""

    name: str
    help: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    config: str | None = None
    describe: bool = False

    def field_flags(self) -> dict[str, str]:
        """{argparse dest: config field} of the flags that set config fields."""
        return {a.dest: a.config_field for a in self.args if a.config_field}


def arg(*names: str, **options: Any) -> Arg:
    return Arg(names, options)


def config_flag(name: str, config_field: str, help: str) -> Arg:
    """A flag that sets one field of the command's config (a shortcut for key=value)."""
    return Arg((name,), {"help": f"{help} (config field {config_field})"}, config_field)


RUN_FLAGS = (config_flag("--storage-path", "storage_path", "where runs and checkpoints go"),
             config_flag("--name", "name", "run name (re-run the same name to resume)"),
             config_flag("--workers", "num_workers", "Ray Train workers"))
SWEEP_ARGS = (arg("--space", help="YAML search space, e.g. {lr: {loguniform: [0.1, 2]}}"),
              arg("--samples", type=int, default=8, help="trials"),
              arg("--max-concurrent", type=int, default=0, help="0 = as resources allow"))
TRIAL_ARGS = (arg("--cpus-per-trial", type=float, default=1.0),
              arg("--gpus-per-trial", type=float, default=None, help="fractions allowed"))
RESOURCES = arg("--resources", type=json.loads, default=None,
                help='custom resources per trial (tune-captioner: per worker) as JSON, '
                     'e.g. \'{"sweep_node": 1}\'')
QUESTIONS = arg("--questions", help="vqa: v2_OpenEnded_mscoco_*_questions.json")
STORE = arg("--store", required=True, help="feature store URI")
VQA_CONFIG = "ray_updown.vqa.config:VqaTrainConfig"


def _tsv(name: str, help: str) -> Command:
    return Command(name, help, handlers.run_tsv, describe=True, args=(
        arg("--tsv", required=True, help="TSV URI"), STORE,
        arg("--variant", choices=["original", "lxmert"], default="original")))


TRAINING = (
    Command("world", "write a synthetic world in the real dataset formats", handlers.run_world,
            config="ray_updown.data.world:WorldConfig", describe=True, args=(
                arg("--out", help="output URI (local path, s3://, gs://)"),
                config_flag("--images", "num_images", "number of images"),
                config_flag("--seed", "seed", "random seed (same seed, same world)"))),
    Command("train-detector",
            "train the bottom-up detector on Visual Genome-format data (Ray Train)",
            handlers.run_stage("ray_updown.detector.train.loop:train_detector"),
            config="ray_updown.detector.train.config:DetectorTrainConfig", describe=True, args=(
                config_flag("--root", "data.root", "dataset root (e.g. a synthetic world)"),
                *RUN_FLAGS)),
    Command("extract", "images in object storage -> Parquet region features (Ray Data)",
            handlers.run_stage("ray_updown.extraction.pipeline:run_extraction"),
            config="ray_updown.extraction.pipeline:ExtractConfig", describe=True, args=(
                config_flag("--images", "images",
                            "prefix or glob of image files or WebDataset .tar shards"),
                config_flag("--manifest", "manifest",
                            "Parquet/CSV/JSON-lines manifest with image_id, uri"),
                config_flag("--table", "table", "Parquet tables with the image bytes in a "
                                                "column (img2dataset, Hugging Face)"),
                config_flag("--out", "out", "feature store URI"),
                config_flag("--checkpoint", "checkpoint",
                            "detector checkpoint (ours, see docs/detector.md)"),
                config_flag("--model", "model", "detector (regions) or grid (baseline)"),
                config_flag("--actors", "num_actors", "detector actors"),
                config_flag("--gpus-per-actor", "num_gpus_per_actor", "GPUs per detector actor"),
                config_flag("--boxes-from", "boxes_from", "feature store whose boxes (per "
                            "image_id) the detector pools instead of choosing its own"))),
    Command("train-captioner", "train the Up-Down captioner, XE or SCST (Ray Train)",
            handlers.run_stage("ray_updown.captioning.train:train_captioner"),
            config="ray_updown.captioning.config:CaptionTrainConfig", describe=True,
            args=(config_flag("--objective", "objective", "xe or scst"), *RUN_FLAGS)),
    Command("train-vqa", "train the Up-Down VQA model (Ray Train)",
            handlers.run_stage("ray_updown.vqa.train:train_vqa"),
            config=VQA_CONFIG, describe=True, args=RUN_FLAGS),
    Command("ensemble", "train an N-member VQA ensemble as Ray Tune trials", handlers.run_ensemble,
            config=VQA_CONFIG, describe=True, args=(
                arg("--members", type=int, default=30, help="ensemble size (paper: 30)"),
                *TRIAL_ARGS, RESOURCES)),
    Command("tune", "ASHA hyperparameter sweep of the VQA model (Ray Tune)", handlers.run_tune,
            config=VQA_CONFIG, describe=True, args=(*SWEEP_ARGS, *TRIAL_ARGS, RESOURCES)),
    Command("tune-captioner",
            "ASHA sweep of the captioner: each trial a multi-worker Ray Train run",
            handlers.run_tune_captioner, config="ray_updown.captioning.config:CaptionTrainConfig",
            describe=True, args=(
                *SWEEP_ARGS,
                arg("--workers-per-trial", type=int, default=None,
                    help="DDP workers per trial (default: config num_workers)"),
                RESOURCES)),
)

RESULTS = (
    Command("evaluate", "score a results file as the official tools do", handlers.run_evaluate, args=(
        arg("task", choices=["captions", "vqa"]),
        arg("--results", required=True, help="results file (COCO or VQA server format)"),
        arg("--references", help="captions: official captions_*.json"),
        QUESTIONS,
        arg("--annotations", help="vqa: v2_mscoco_*_annotations.json"))),
    Command("predict", "write leaderboard result files (COCO / VQA server format)",
            handlers.run_predict, args=(
                arg("task", choices=["captions", "vqa"]),
                arg("--checkpoint", required=True, nargs="+",
                    help="captioner checkpoint(s) (several = ensemble) or VQA checkpoint(s) / "
                         "ensemble.json manifest"),
                arg("--features", required=True, help="feature store URI"),
                arg("--out", required=True, help="folder for the results file"),
                arg("--name", default="updown", help="method name in the results file name"),
                arg("--split", default="test", help="captions: Karpathy split (val/test); "
                                                    "vqa: test-dev2015, test2015, val2014"),
                arg("--karpathy",
                    help="captions: dataset_coco.json (else every image of the store)"),
                QUESTIONS,
                arg("--beam-size", type=int, default=5))),
)

STORES = (
    _tsv("import-tsv", "bring released bottom-up TSV features into a store"),
    _tsv("export-tsv", "write a store as the original (or LXMERT) TSV"),
    Command("show", "draw one image's regions as a PNG (the paper's Figure 2)", handlers.run_show, args=(
        STORE,
        arg("--image-id", required=True, help="the image's id in the store"),
        arg("--image", help="the image file's URI"),
        arg("--images-root", help="a folder searched for the image instead"),
        arg("--top", type=int, default=10, help="regions drawn, by confidence"),
        arg("--zoom", type=int, default=1, help="enlarge small images this many times"),
        arg("--out", required=True, help="PNG URI to write"),
        arg("--detector", help="detector checkpoint for the vocabularies, when the store's "
                               "metadata has none"))),
    Command("inspect", "summarise a feature store: images, errors, boxes, detector",
            handlers.run_inspect, args=(
                arg("store", help="feature store URI"),
                arg("--png", help="also write histograms of boxes per image and confidences here"),
                arg("--json", action="store_true", help="print the summary as JSON"))),
    Command("export", "write a store in the layout another trainer reads", handlers.run_export, args=(
        STORE,
        arg("--format", required=True, choices=["self-critical", "hdf5"],
            help="self-critical: self-critical.pytorch's three folders; hdf5: "
                 "bottom-up-attention-vqa's file and id map"),
        arg("--out", required=True, help="output folder URI (hdf5: or the .hdf5 file itself; "
                                         "its id maps go beside it)"),
        arg("--layout", choices=["adaptive", "fixed"], default="adaptive",
            help="hdf5: 'adaptive' boxes per image via pos_boxes (BAN-style loaders), or "
                 "'fixed' images x K x D (bottom-up-attention-vqa's train36.hdf5)"))),
    Command("import-hdf5", "bring a bottom-up-attention-vqa HDF5 file into a store",
            handlers.run_import_hdf5, args=(
                arg("--hdf5", required=True, help="the .hdf5 file"),
                arg("--ids", help="its image-id-to-row JSON (default: beside the file)"),
                arg("--store", required=True, help="feature store URI to write"))),
    # --conventions is checked by the converter (detector/config.py CONVENTIONS), so the CLI
    # starts without importing torch.
    Command("convert-detector",
            "convert published bottom-up weights (pkl/pth/bin) to our checkpoint",
            handlers.run_convert, args=(
                arg("--published", required=True, help="faster_rcnn_from_caffe_attr.pkl, "
                    "bua-caffe-frcn-r101*.pth or pytorch_model.bin"),
                arg("--out", required=True, help="checkpoint directory URI to write"),
                arg("--layout", default="auto",
                    choices=["auto", "py-bottom-up-attention", "milvlg", "hf-frcnn"]),
                arg("--conventions", default=None,
                    help="inference rules to run with: caffe, milvlg, py-bottom-up-attention or "
                         "detectron2 (default: the layout's own port's; 'caffe' reproduces the "
                         "features released with the paper)"))),
)

CLUSTER = (
    Command("submit", "`ray job submit` that says what is wrong in one line "
                      "(refused token, no job API, failed job)", handlers.run_submit, args=(
        arg("--address", default=None, help="the cluster's job API (default: $RAY_ADDRESS, "
                                            "else http://127.0.0.1:8265)"),
        arg("--working-dir", help="ship this folder as the job's working directory"),
        arg("--runtime-env", help="YAML runtime env (e.g. cluster/runtime_env.yaml)"),
        arg("--no-wait", action="store_true", help="return once the job is submitted"),
        arg("entrypoint", nargs=argparse.REMAINDER, help="-- the job's command"))),
    Command("demo", "the whole paper on a synthetic world, with a report", handlers.run_demo,
            config="ray_updown.demo.run:DemoConfig", args=(
                Arg(("--out",), {"help": "output folder (default runs/demo)"}, "out"),
                Arg(("--scale",), {"type": float, "help": "world and training size multiplier "
                                                          "(1 = default)"}, "scale"))),
)

COMMANDS: tuple[Command, ...] = (*TRAINING, *RESULTS, *STORES, *CLUSTER)
