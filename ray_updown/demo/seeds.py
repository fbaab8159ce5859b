"""The demo's targets on several worlds: one table and one picture from finished demo folders.

    python -m ray_updown.demo.seeds runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 \
        --png docs/demo_targets_by_seed.png

Each folder is a finished `make demo` (`python jobs/demo.py --out DIR seed=S`). Prints a
Markdown table, one row per target and one column per world (met or not, with the numbers
compared), then a JSON summary; `--png` draws each target's margin per world, relative (how
far the first number is above the second, in % of the second; zero or below is a miss).
The folders must differ in their seed only (or in scheduling): other settings are refused.
"""

from __future__ import annotations

import argparse
import json
import sys

from ray_updown import storage
from ray_updown.demo.report import targets_met
from ray_updown.demo.stages import CONFIG_RECORD, STAGES_DIR, StageBook, changed_settings


def demo_targets(demo: str) -> dict:
    """{"demo", "seed", "config", "detector", "targets"} of a finished demo folder."""
    book = StageBook(demo)
    if not storage.exists(book.record_uri("report")):
        raise SystemExit(f"{demo}: no finished demo here (no {STAGES_DIR}/report.json)")
    report = storage.read_json(book.record_uri("report"))["result"]
    config = storage.read_json(storage.join(demo, STAGES_DIR, CONFIG_RECORD))
    detector = storage.read_json(book.record_uri("detector"))["result"]
    return {"demo": demo, "seed": config["seed"], "config": config,
            "detector": {k: detector["metrics"].get(k) for k in ("epoch", "val_map50", "test_map50")},
            "targets": targets_met(report["table1"], report["table4"])}


def check_same_settings(runs: list[dict]) -> None:
    """Worlds are compared under one configuration: refuse folders whose settings differ."""
    first = runs[0]["config"]
    for run in runs[1:]:
        changed = changed_settings(first, run["config"], ignore={"seed"})
        if changed:
            raise SystemExit(f"{run['demo']} ran with other settings than {runs[0]['demo']}: "
                             + ", ".join(f"{k} {first.get(k)!r} vs {run['config'].get(k)!r}"
                                         for k in changed))


def targets_table(runs: list[dict]) -> str:
    """Markdown: a row per target, a column per world."""
    names = list(runs[0]["targets"])
    lines = ["| target | " + " | ".join(_column(r, runs) for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    for name in names:
        cells = []
        for r in runs:
            t = r["targets"][name]
            cells.append(f"{'met' if t['met'] else '**missed**'} ({t['detail']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    met = [sum(t["met"] for t in r["targets"].values()) for r in runs]
    lines.append("| **targets met** | " + " | ".join(f"**{m} of {len(names)}**" for m in met) + " |")
    return "\n".join(lines)


def _column(run: dict, runs: list[dict]) -> str:
    """"seed S", or the folder's name when two folders share a seed."""
    same_seed = sum(r["seed"] == run["seed"] for r in runs) > 1
    return run["demo"].rstrip("/").rsplit("/", 1)[-1] if same_seed else f"seed {run['seed']}"


def draw_margins(runs: list[dict], uri: str) -> None:
    """Each target's margin per world in % of the number it is compared with (CIDEr margins
    are tens of points, VQA margins a few: relative margins share one axis)."""
    from ray_updown.viz.plots import plot_bars

    short = {name: name.split(": ", 1)[1].replace("CIDEr ", "").replace("every grid baseline", "grids")
             for name in runs[0]["targets"]}
    groups = {short[name]: {_column(r, runs): _relative_margin(r["targets"][name]) for r in runs}
              for name in runs[0]["targets"]}
    plot_bars(groups, "demo targets on each world: margin (<= 0 = missed)", "margin, % of the compared number",
              uri, rotate_labels=True)


def _relative_margin(target: dict) -> float:
    """The margin in % of the number it is compared with."""
    return 100.0 * target["margin"] / target["against"] if target["against"] else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demos", nargs="+", help="finished demo folders")
    parser.add_argument("--png", default="", help="write the margins picture here")
    args = parser.parse_args(argv)
    runs = [demo_targets(d) for d in args.demos]
    check_same_settings(runs)
    print(targets_table(runs))
    if args.png:
        draw_margins(runs, args.png)
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
