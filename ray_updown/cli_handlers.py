"""What each `ray-updown` subcommand does, given its parsed arguments (cli_commands.py names
them; cli.py parses and runs them).

A handler imports what it runs when it runs, so `--help` stays fast. A command that takes a
typed config builds it as every stage does (defaults, then `--config` YAML, then the flags
given that set config fields, then `key=value` overrides), prints it for `--show-config`, and
otherwise ends with a JSON summary of what it wrote where.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any, Callable

from ray_updown.errors import ConfigError

Handler = Callable[[argparse.Namespace], None]


def load(path: str) -> Any:
    """`module:attribute`, imported when the subcommand runs (keeps `--help` fast)."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def print_summary(summary: Any) -> None:
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


def config_or_show(args: argparse.Namespace):
    """The command's config (`args.spec`: its class and the flags that set its fields), or None
    after printing it when --show-config was given."""
    from ray_updown.config import dump_config, load_config

    overrides = [f"{field}={getattr(args, dest)}" for dest, field in args.spec.field_flags().items()
                 if getattr(args, dest, None) is not None]
    cfg = load_config(load(args.spec.config), args.config, overrides + list(args.overrides))
    if args.show_config:
        print(dump_config(cfg), end="")
        return None
    return cfg


def run_stage(entry: str) -> Handler:
    """The handler of a stage whose entry function (`module:function`) takes only its config."""

    def run(args: argparse.Namespace) -> None:
        cfg = config_or_show(args)
        if cfg is not None:
            print_summary(load(entry)(cfg))

    return run


def run_world(args: argparse.Namespace) -> None:
    from ray_updown.data.world import build_world

    cfg = config_or_show(args)
    if cfg is None:
        return
    if not args.out:
        raise ConfigError("world needs --out")
    print_summary(build_world(cfg, args.out))


def run_ensemble(args: argparse.Namespace) -> None:
    from ray_updown.vqa.ensemble import train_ensemble

    cfg = config_or_show(args)
    if cfg is None:
        return
    manifest = train_ensemble(cfg, members=args.members, cpus_per_trial=args.cpus_per_trial,
                              gpus_per_trial=args.gpus_per_trial, resources_per_trial=args.resources)
    print_summary({"manifest": manifest.get("uri"), "members": len(manifest["members"])})


def run_tune(args: argparse.Namespace) -> None:
    from ray_updown.config import to_dict
    from ray_updown.vqa.sweep import best_config_uri, run_sweep

    cfg = config_or_show(args)
    if cfg is None:
        return
    if not args.space:
        raise ConfigError("tune needs --space (a YAML file of the search space)")
    best = run_sweep(cfg, args.space, num_samples=args.samples,
                     max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                     gpus_per_trial=args.gpus_per_trial, resources_per_trial=args.resources)
    print_summary({"best_config": best_config_uri(best), "config": to_dict(best)})


def run_tune_captioner(args: argparse.Namespace) -> None:
    from ray_updown.captioning.sweep import best_config_uri, run_captioner_sweep
    from ray_updown.config import to_dict

    cfg = config_or_show(args)
    if cfg is None:
        return
    if not args.space:
        raise ConfigError("tune-captioner needs --space (a YAML file of the search space)")
    best = run_captioner_sweep(cfg, args.space, num_samples=args.samples,
                               max_concurrent=args.max_concurrent,
                               workers_per_trial=args.workers_per_trial,
                               resources_per_worker=args.resources)
    print_summary({"best_config": best_config_uri(best), "config": to_dict(best)})


def run_evaluate(args: argparse.Namespace) -> None:
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


def run_predict(args: argparse.Namespace) -> None:
    """Leaderboard files: COCO caption server JSON or VQA server JSON for a split."""
    if args.task == "captions":
        _predict_captions(args)
    else:
        _predict_vqa(args)


def _predict_captions(args: argparse.Namespace) -> None:
    from ray_updown import storage
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
    print_summary({"results": uri, "images": len(captions), "models": len(captioners)})


def _predict_vqa(args: argparse.Namespace) -> None:
    from ray_updown.vqa.ensemble import predict_ensemble, write_server_results

    if not args.questions:
        raise ConfigError("predict vqa needs --questions")
    # One .json is an ensemble manifest; anything else is a list of checkpoint directories.
    single_manifest = len(args.checkpoint) == 1 and args.checkpoint[0].endswith(".json")
    members = args.checkpoint[0] if single_manifest else list(args.checkpoint)
    answers = predict_ensemble(members, args.questions, args.features)
    uri = write_server_results(answers, args.out, args.name, subset=args.split)
    print_summary({"results": uri, "questions": len(answers)})


def run_tsv(args: argparse.Namespace) -> None:
    """`import-tsv` and `export-tsv`."""
    from ray_updown.features.tsv import export_tsv, import_tsv

    if args.command == "import-tsv":
        result = import_tsv(args.tsv, args.store, variant=args.variant)
    else:
        result = export_tsv(args.store, args.tsv, variant=args.variant)
    print_summary({"command": args.command, "tsv": args.tsv, "store": args.store, "result": result})


def run_show(args: argparse.Namespace) -> None:
    from ray_updown.viz.regions import show_regions

    print_summary(show_regions(args.store, args.image_id, out=args.out, image=args.image,
                               images_root=args.images_root, top=args.top,
                               detector=args.detector, zoom=args.zoom))


def run_inspect(args: argparse.Namespace) -> None:
    from ray_updown.features.inspect import format_summary, inspect_store
    from ray_updown.viz.store_plots import plot_store

    summary = inspect_store(args.store)
    if args.png:
        summary["png"] = plot_store(args.store, args.png)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))


def run_export(args: argparse.Namespace) -> None:
    from ray_updown.features.export import export_store

    print_summary(export_store(args.store, args.format, args.out, layout=args.layout))


def run_import_hdf5(args: argparse.Namespace) -> None:
    from ray_updown.features.hdf5 import import_hdf5

    print_summary(import_hdf5(args.hdf5, args.store, ids=args.ids))


def run_convert(args: argparse.Namespace) -> None:
    from ray_updown.detector import load_published, save_detector

    model = load_published(args.published, layout=args.layout, conventions=args.conventions)
    digest = save_detector(model, args.out)
    print_summary({"published": args.published, "layout": args.layout, "out": args.out,
                   "detector": model.name, "sha256": digest})


def run_submit(args: argparse.Namespace) -> None:
    import os

    from ray_updown.job_submission import submit_job

    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    print_summary(submit_job(address, entrypoint, args.working_dir, args.runtime_env,
                             wait=not args.no_wait))


def run_demo(args: argparse.Namespace) -> None:
    from ray_updown.demo.run import run_demo

    cfg = config_or_show(args)  # --show-config prints and never runs: the demo takes minutes
    if cfg is not None:
        print_summary(run_demo(cfg))
