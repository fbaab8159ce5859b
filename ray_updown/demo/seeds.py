"""The demo's targets on several worlds: one table and one picture from finished demo folders.

    python -m ray_updown.demo.seeds runs/demo-seed0 runs/demo-seed1 runs/demo-seed2 \
        --png docs/demo_targets_by_seed.png

Each folder is a finished `make demo` (`python jobs/demo.py --out DIR seed=S`). Prints a
Markdown table, one row per target and one column per world (met or not, with the numbers
compared), then a JSON summary; `--png` draws each target's margin per world (how far the
first number is above the second; below zero is a miss).
"""

from __future__ import annotations

import argparse
import json
import sys

from ray_updown import storage
from ray_updown.demo.report import targets_met
from ray_updown.demo.stages import CONFIG_RECORD, STAGES_DIR


def demo_targets(demo: str) -> dict:
    """{"seed", "minutes", "detector", "targets"} of a finished demo folder."""
    report_uri = storage.join(demo, STAGES_DIR, "report.json")
    if not storage.exists(report_uri):
        raise SystemExit(f"{demo}: no finished demo here (no {STAGES_DIR}/report.json)")
    report = storage.read_json(report_uri)["result"]
    config = storage.read_json(storage.join(demo, STAGES_DIR, CONFIG_RECORD))
    detector = storage.read_json(storage.join(demo, STAGES_DIR, "detector.json"))["result"]
    return {"demo": demo, "seed": config["seed"],
            "detector": {k: detector["metrics"].get(k) for k in ("epoch", "val_map50", "test_map50")},
            "targets": targets_met(report["table1"], report["table4"])}


def targets_table(runs: list[dict]) -> str:
    """Markdown: a row per target, a column per world."""
    names = list(runs[0]["targets"])
    lines = ["| target | " + " | ".join(f"seed {r['seed']}" for r in runs) + " |",
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


def draw_margins(runs: list[dict], uri: str) -> None:
    from ray_updown.viz.plots import plot_bars

    short = {name: name.split(": ", 1)[1].replace("CIDEr ", "").replace("every grid baseline", "grids")
             for name in runs[0]["targets"]}
    groups = {short[name]: {f"seed {r['seed']}": r["targets"][name]["margin"] for r in runs}
              for name in runs[0]["targets"]}
    plot_bars(groups, "demo targets: margin per world (< 0 = missed; CIDEr or VQA accuracy points)",
              "margin", uri, rotate_labels=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demos", nargs="+", help="finished demo folders")
    parser.add_argument("--png", default="", help="write the margins picture here")
    args = parser.parse_args(argv)
    runs = [demo_targets(d) for d in args.demos]
    print(targets_table(runs))
    if args.png:
        draw_margins(runs, args.png)
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
