"""`ray-updown <stage>`: one subcommand per stage of the data's way.

Each subcommand parses its flags, builds the stage's typed config (defaults, then `--config`
YAML, then `key=value` overrides) and calls the stage's one entry function. Errors of the
package are printed as one line on stderr with exit status 2; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys

from ray_updown.errors import ConfigError, RayUpdownError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with config values (applied before overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted for nested fields (e.g. optim.lr=0.02)")


def _cmd_world(args: argparse.Namespace) -> None:
    from ray_updown.config import load_config
    from ray_updown.data.world import WorldConfig, build_world

    overrides = list(args.overrides)
    if args.images is not None:
        overrides.append(f"num_images={args.images}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = load_config(WorldConfig, args.config, overrides)
    stats = build_world(cfg, args.out)
    print(json.dumps(stats, indent=2))
    print(f"world: {stats['images']} images, {stats['captions']} captions, "
          f"{stats['questions']} questions, {stats['objects']} objects written to {args.out}")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-updown", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("world", help="write a synthetic world in the real dataset formats")
    p.add_argument("--out", required=True, help="output URI (local path, s3://, gs://)")
    p.add_argument("--images", type=int, help="number of images")
    p.add_argument("--seed", type=int, help="random seed (same seed, same world)")
    _add_config_args(p)
    p.set_defaults(run=_cmd_world)

    p = sub.add_parser("evaluate", help="score a results file as the official tools do")
    p.add_argument("task", choices=["captions", "vqa"])
    p.add_argument("--results", required=True, help="results file (COCO or VQA server format)")
    p.add_argument("--references", help="captions: official captions_*.json")
    p.add_argument("--questions", help="vqa: v2_OpenEnded_mscoco_*_questions.json")
    p.add_argument("--annotations", help="vqa: v2_mscoco_*_annotations.json")
    p.set_defaults(run=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except RayUpdownError as exc:
        print(f"ray-updown {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ray-updown {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
