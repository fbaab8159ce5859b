"""`ray-updown <stage>`: one subcommand per stage of the data's way.

Each subcommand parses its flags, builds the stage's typed config (defaults, then `--config`
YAML, then the convenience flags, then `key=value` overrides) and calls the stage's one entry
function, which ends with a summary of what it wrote where. Errors of the package are printed
as one line on stderr with exit status 2; no stack trace (cli_output.py: errors, warnings
and the Ray workers' output).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable

from ray_updown.errors import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config values (applied before overrides)")
    p.add_argument("--show-config", action="store_true",
                   help="print every config field with its resolved value as YAML, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted for nested fields (e.g. optim.lr=0.02)")


def _load(path: str) -> Any:
    """`module:attribute`, imported when the subcommand runs (keeps `--help` fast)."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def _config(args: argparse.Namespace, config_cls: str, flags: dict[str, str]):
    """The stage's config: YAML, then flags given on the command line, then key=value."""
    from ray_updown.config import load_config

    overrides = [f"{field}={getattr(args, dest)}" for dest, field in flags.items()
                 if getattr(args, dest, None) is not None]
    return load_config(_load(config_cls), args.config, overrides + list(args.overrides))


def _print_summary(summary: Any) -> None:
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


# A stage: (help, config class, entry function, {flag: (config field, help)}).
_CONFIG_COMMANDS: dict[str, tuple[str, str, str, dict[str, tuple[str, str]]]] = {
    "world": ("write a synthetic world in the real dataset formats",
              "ray_updown.data.world:WorldConfig", "ray_updown.data.world:build_world",
              {"--images": ("num_images", "number of images"),
               "--seed": ("seed", "random seed (same seed, same world)")}),
    "train-detector": ("train the bottom-up detector on Visual Genome-format data (Ray Train)",
                       "ray_updown.detector.train.config:DetectorTrainConfig",
                       "ray_updown.detector.train.loop:train_detector",
                       {"--root": ("data.root", "dataset root (e.g. a synthetic world)"),
                        "--storage-path": ("storage_path", "where runs and checkpoints go"),
                        "--name": ("name", "run name (re-run the same name to resume)"),
                        "--workers": ("num_workers", "Ray Train workers")}),
    "extract": ("images in object storage -> Parquet region features (Ray Data)",
                "ray_updown.extraction.pipeline:ExtractConfig", "ray_updown.extraction.pipeline:run_extraction",
                {"--images": ("images", "prefix or glob of image files or WebDataset .tar shards"),
                 "--manifest": ("manifest", "Parquet/CSV/JSON-lines manifest with image_id, uri"),
                 "--table": ("table", "Parquet tables with the image bytes in a column "
                             "(img2dataset, Hugging Face)"),
                 "--out": ("out", "feature store URI"),
                 "--checkpoint": ("checkpoint", "detector checkpoint (ours, see docs/detector.md)"),
                 "--model": ("model", "detector (regions) or grid (baseline)"),
                 "--actors": ("num_actors", "detector actors"),
                 "--gpus-per-actor": ("num_gpus_per_actor", "GPUs per detector actor"),
                 "--boxes-from": ("boxes_from", "feature store whose boxes (per image_id) "
                                  "the detector pools instead of choosing its own")}),
    "train-captioner": ("train the Up-Down captioner, XE or SCST (Ray Train)",
                        "ray_updown.captioning.config:CaptionTrainConfig",
                        "ray_updown.captioning.train:train_captioner",
                        {"--objective": ("objective", "xe or scst"),
                         "--storage-path": ("storage_path", "where runs and checkpoints go"),
                         "--name": ("name", "run name (re-run the same name to resume)"),
                         "--workers": ("num_workers", "Ray Train workers")}),
    "train-vqa": ("train the Up-Down VQA model (Ray Train)",
                  "ray_updown.vqa.config:VqaTrainConfig", "ray_updown.vqa.train:train_vqa",
                  {"--storage-path": ("storage_path", "where runs and checkpoints go"),
                   "--name": ("name", "run name (re-run the same name to resume)"),
                   "--workers": ("num_workers", "Ray Train workers")}),
}


def _cmd_submit(args: argparse.Namespace) -> None:
    import os

    from ray_updown.job_submission import submit_job

    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    _print_summary(submit_job(address, entrypoint, args.working_dir, args.runtime_env,
                              wait=not args.no_wait))


def _config_or_show(args: argparse.Namespace, config_cls: str, flags: dict[str, str]):
    """The command's config, or None after printing it when --show-config was given."""
    cfg = _config(args, config_cls, flags)
    if args.show_config:
        from ray_updown.config import dump_config

        print(dump_config(cfg), end="")
        return None
    return cfg


def _run_stage(stage: str) -> Callable[[argparse.Namespace], None]:
    _, config_cls, entry, flags = _CONFIG_COMMANDS[stage]

    def run(args: argparse.Namespace) -> None:
        cfg = _config_or_show(args, config_cls, {f.lstrip("-").replace("-", "_"): field
                                                 for f, (field, _) in flags.items()})
        if cfg is None:
            return
        if stage == "world":
            if not args.out:
                raise ConfigError("world needs --out")
            summary = _load(entry)(cfg, args.out)
        else:
            summary = _load(entry)(cfg)
        _print_summary(summary)

    return run


_VQA_CONFIG = "ray_updown.vqa.config:VqaTrainConfig"  # of `ensemble` and `tune`


def _cmd_ensemble(args: argparse.Namespace) -> None:
    from ray_updown.vqa.ensemble import train_ensemble

    cfg = _config_or_show(args, _VQA_CONFIG, {})  # as the stages build theirs
    if cfg is None:
        return
    manifest = train_ensemble(cfg, members=args.members, cpus_per_trial=args.cpus_per_trial,
                              gpus_per_trial=args.gpus_per_trial, resources_per_trial=args.resources)
    _print_summary({"manifest": manifest.get("uri"), "members": len(manifest["members"])})


def _cmd_tune(args: argparse.Namespace) -> None:
    from ray_updown.config import to_dict
    from ray_updown.vqa.sweep import best_config_uri, run_sweep

    cfg = _config_or_show(args, _VQA_CONFIG, {})  # as the stages build theirs
    if cfg is None:
        return
    if not args.space:
        raise ConfigError("tune needs --space (a YAML file of the search space)")
    best = run_sweep(cfg, args.space, num_samples=args.samples,
                     max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                     gpus_per_trial=args.gpus_per_trial, resources_per_trial=args.resources)
    _print_summary({"best_config": best_config_uri(best), "config": to_dict(best)})


def _cmd_tune_captioner(args: argparse.Namespace) -> None:
    from ray_updown.captioning.sweep import best_config_uri, run_captioner_sweep
    from ray_updown.config import to_dict

    cfg = _config_or_show(args, "ray_updown.captioning.config:CaptionTrainConfig", {})
    if cfg is None:
        return
    if not args.space:
        raise ConfigError("tune-captioner needs --space (a YAML file of the search space)")
    best = run_captioner_sweep(cfg, args.space, num_samples=args.samples,
                               max_concurrent=args.max_concurrent,
                               workers_per_trial=args.workers_per_trial,
                               resources_per_worker=args.resources)
    _print_summary({"best_config": best_config_uri(best), "config": to_dict(best)})


def _cmd_evaluate(args: argparse.Namespace) -> None:
    if args.task == "vqa":
        from ray_updown.metrics.vqa_eval import evaluate_vqa

        if not args.questions or not args.annotations:
            raise ConfigError("evaluate vqa needs --questions and --annotations")
        result = evaluate_vqa(args.questions, args.annotations, args.results)
    else:
        from ray_updown.metrics.caption_eval import evaluate_caption_files

        if not args.references:
            raise ConfigError("evaluate captions needs --references")
        result = evaluate_caption_files(args.references, args.results)
    print(json.dumps(result, indent=2, sort_keys=True))


def _cmd_predict(args: argparse.Namespace) -> None:
    """Leaderboard files: COCO caption server JSON or VQA server JSON for a split."""
    from ray_updown import storage

    if args.task == "captions":
        from ray_updown.captioning.predict import load_captioner, predict_captions
        from ray_updown.features.reader import FeatureStore
        from ray_updown.metrics.caption_eval import results_filename, write_caption_results

        captioners = [load_captioner(uri) for uri in args.checkpoint]
        store = FeatureStore(args.features)
        if args.karpathy:
            from ray_updown.data.coco import images_in_split, load_karpathy

            image_ids = [im.image_id for im in images_in_split(load_karpathy(args.karpathy), args.split)]
        else:
            image_ids = list(store.image_ids)
        captions = predict_captions([c.model for c in captioners], store, image_ids,
                                    captioners[0].vocab, beam_size=args.beam_size,
                                    max_regions=captioners[0].max_regions)
        uri = storage.join(args.out, results_filename(args.split, args.name))
        write_caption_results(uri, captions)
        _print_summary({"results": uri, "images": len(captions), "models": len(captioners)})
        return
    from ray_updown.vqa.ensemble import predict_ensemble, write_server_results

    if not args.questions:
        raise ConfigError("predict vqa needs --questions")
    # One .json is an ensemble manifest; anything else is a list of checkpoint directories.
    single_manifest = len(args.checkpoint) == 1 and args.checkpoint[0].endswith(".json")
    members = args.checkpoint[0] if single_manifest else list(args.checkpoint)
    answers = predict_ensemble(members, args.questions, args.features)
    uri = write_server_results(answers, args.out, args.name, subset=args.split)
    _print_summary({"results": uri, "questions": len(answers)})


def _cmd_tsv(args: argparse.Namespace) -> None:
    from ray_updown.features.tsv import export_tsv, import_tsv

    if args.command == "import-tsv":
        result = import_tsv(args.tsv, args.store, variant=args.variant)
    else:
        result = export_tsv(args.store, args.tsv, variant=args.variant)
    _print_summary({"command": args.command, "tsv": args.tsv, "store": args.store, "result": result})


def _cmd_show(args: argparse.Namespace) -> None:
    from ray_updown.viz.regions import show_regions

    _print_summary(show_regions(args.store, args.image_id, out=args.out, image=args.image,
                                images_root=args.images_root, top=args.top,
                                detector=args.detector, zoom=args.zoom))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from ray_updown.features.inspect import format_summary, inspect_store
    from ray_updown.viz.store_plots import plot_store

    summary = inspect_store(args.store)
    if args.png:
        summary["png"] = plot_store(args.store, args.png)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))


def _cmd_export(args: argparse.Namespace) -> None:
    from ray_updown.features.export import export_store

    _print_summary(export_store(args.store, args.format, args.out, layout=args.layout))


def _cmd_import_hdf5(args: argparse.Namespace) -> None:
    from ray_updown.features.hdf5 import import_hdf5

    _print_summary(import_hdf5(args.hdf5, args.store, ids=args.ids))


def _cmd_convert(args: argparse.Namespace) -> None:
    from ray_updown.detector import load_published, save_detector

    model = load_published(args.published, layout=args.layout, conventions=args.conventions)
    digest = save_detector(model, args.out)
    _print_summary({"published": args.published, "layout": args.layout, "out": args.out,
                    "detector": model.name, "sha256": digest})


def _cmd_demo(args: argparse.Namespace) -> None:
    from ray_updown.config import load_config
    from ray_updown.demo.run import DemoConfig, run_demo

    overrides = [f"out={args.out}"] if args.out else []
    if args.scale is not None:
        overrides.append(f"scale={args.scale}")
    cfg = load_config(DemoConfig, args.config, overrides + list(args.overrides))
    if args.show_config:  # print, never run: the demo takes minutes and writes a folder
        from ray_updown.config import dump_config

        print(dump_config(cfg), end="")
        return
    _print_summary(run_demo(cfg))


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, as the package's (its usage block is --help's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ray-updown", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for stage, (help_text, _, _, flags) in _CONFIG_COMMANDS.items():
        p = sub.add_parser(stage, help=help_text, description=help_text)
        if stage == "world":
            p.add_argument("--out", help="output URI (local path, s3://, gs://)")
        for flag, (field, flag_help) in flags.items():
            p.add_argument(flag, help=f"{flag_help} (config field {field})")
        _add_config_args(p)
        p.set_defaults(run=_run_stage(stage))

    for name, help_text in (("ensemble", "train an N-member VQA ensemble as Ray Tune trials"),
                            ("tune", "ASHA hyperparameter sweep of the VQA model (Ray Tune)"),
                            ("tune-captioner", "ASHA sweep of the captioner: each trial a "
                                               "multi-worker Ray Train run")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "ensemble":
            p.add_argument("--members", type=int, default=30, help="ensemble size (paper: 30)")
        else:
            p.add_argument("--space", help="YAML search space, e.g. {lr: {loguniform: [0.1, 2]}}")
            p.add_argument("--samples", type=int, default=8, help="trials")
            p.add_argument("--max-concurrent", type=int, default=0, help="0 = as resources allow")
        if name == "tune-captioner":
            p.add_argument("--workers-per-trial", type=int, default=None,
                           help="DDP workers per trial (default: config num_workers)")
        else:
            p.add_argument("--cpus-per-trial", type=float, default=1.0)
            p.add_argument("--gpus-per-trial", type=float, default=None, help="fractions allowed")
        p.add_argument("--resources", type=json.loads, default=None,
                       help='custom resources per trial (tune-captioner: per worker) as JSON, '
                            'e.g. \'{"sweep_node": 1}\'')
        _add_config_args(p)
        p.set_defaults(run={"ensemble": _cmd_ensemble, "tune": _cmd_tune,
                            "tune-captioner": _cmd_tune_captioner}[name])

    p = sub.add_parser("evaluate", help="score a results file as the official tools do")
    p.add_argument("task", choices=["captions", "vqa"])
    p.add_argument("--results", required=True, help="results file (COCO or VQA server format)")
    p.add_argument("--references", help="captions: official captions_*.json")
    p.add_argument("--questions", help="vqa: v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--annotations", help="vqa: v2_mscoco_*_annotations.json")
    p.set_defaults(run=_cmd_evaluate)

    p = sub.add_parser("predict", help="write leaderboard result files (COCO / VQA server format)")
    p.add_argument("task", choices=["captions", "vqa"])
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="captioner checkpoint(s) (several = ensemble) or VQA checkpoint(s) / "
                        "ensemble.json manifest")
    p.add_argument("--features", required=True, help="feature store URI")
    p.add_argument("--out", required=True, help="folder for the results file")
    p.add_argument("--name", default="updown", help="method name in the results file name")
    p.add_argument("--split", default="test",
                   help="captions: Karpathy split (val/test); vqa: test-dev2015, test2015, val2014")
    p.add_argument("--karpathy", help="captions: dataset_coco.json (else every image of the store)")
    p.add_argument("--questions", help="vqa: v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--beam-size", type=int, default=5)
    p.set_defaults(run=_cmd_predict)

    for name, help_text in (("import-tsv", "bring released bottom-up TSV features into a store"),
                            ("export-tsv", "write a store as the original (or LXMERT) TSV")):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--tsv", required=True, help="TSV URI")
        p.add_argument("--store", required=True, help="feature store URI")
        p.add_argument("--variant", choices=["original", "lxmert"], default="original")
        p.set_defaults(run=_cmd_tsv)

    p = sub.add_parser("show", help="draw one image's regions as a PNG (the paper's Figure 2)")
    p.add_argument("--store", required=True, help="feature store URI")
    p.add_argument("--image-id", required=True, help="the image's id in the store")
    p.add_argument("--image", help="the image file's URI")
    p.add_argument("--images-root", help="a folder searched for the image instead")
    p.add_argument("--top", type=int, default=10, help="regions drawn, by confidence")
    p.add_argument("--zoom", type=int, default=1, help="enlarge small images this many times")
    p.add_argument("--out", required=True, help="PNG URI to write")
    p.add_argument("--detector", help="detector checkpoint for the vocabularies, when the "
                                      "store's metadata has none")
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser("inspect", help="summarise a feature store: images, errors, boxes, detector")
    p.add_argument("store", help="feature store URI")
    p.add_argument("--png", help="also write histograms of boxes per image and confidences here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("export", help="write a store in the layout another trainer reads")
    p.add_argument("--store", required=True, help="feature store URI")
    p.add_argument("--format", required=True, choices=["self-critical", "hdf5"],
                   help="self-critical: self-critical.pytorch's three folders; hdf5: "
                        "bottom-up-attention-vqa's file and id map")
    p.add_argument("--out", required=True,
                   help="output folder URI (hdf5: or the .hdf5 file itself; its id maps go beside it)")
    p.add_argument("--layout", choices=["adaptive", "fixed"], default="adaptive",
                   help="hdf5: 'adaptive' boxes per image via pos_boxes (BAN-style loaders), or "
                        "'fixed' images x K x D (bottom-up-attention-vqa's train36.hdf5)")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("import-hdf5", help="bring a bottom-up-attention-vqa HDF5 file into a store")
    p.add_argument("--hdf5", required=True, help="the .hdf5 file")
    p.add_argument("--ids", help="its image-id-to-row JSON (default: beside the file)")
    p.add_argument("--store", required=True, help="feature store URI to write")
    p.set_defaults(run=_cmd_import_hdf5)

    p = sub.add_parser("convert-detector",
                       help="convert published bottom-up weights (pkl/pth/bin) to our checkpoint")
    p.add_argument("--published", required=True,
                   help="faster_rcnn_from_caffe_attr.pkl, bua-caffe-frcn-r101*.pth or pytorch_model.bin")
    p.add_argument("--out", required=True, help="checkpoint directory URI to write")
    p.add_argument("--layout", default="auto",
                   choices=["auto", "py-bottom-up-attention", "milvlg", "hf-frcnn"])
    # Checked by the converter (detector/config.py CONVENTIONS), so the CLI starts without torch.
    p.add_argument("--conventions", default=None,
                   help="inference rules to run with: caffe, milvlg, py-bottom-up-attention or "
                        "detectron2 (default: the layout's own port's; 'caffe' reproduces the "
                        "features released with the paper)")
    p.set_defaults(run=_cmd_convert)

    p = sub.add_parser("submit", help="`ray job submit` that says what is wrong in one line "
                                      "(refused token, no job API, failed job)")
    p.add_argument("--address", default=None,
                   help="the cluster's job API (default: $RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--working-dir", help="ship this folder as the job's working directory")
    p.add_argument("--runtime-env", help="YAML runtime env (e.g. cluster/runtime_env.yaml)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- the job's command")
    p.set_defaults(run=_cmd_submit)

    p = sub.add_parser("demo", help="the whole paper on a synthetic world, with a report")
    p.add_argument("--out", help="output folder (default runs/demo)")
    p.add_argument("--scale", type=float, help="world and training size multiplier (1 = default)")
    _add_config_args(p)
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ray_updown.cli_output import run_command

    args = build_parser().parse_args(argv)
    return run_command(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
