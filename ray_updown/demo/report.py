"""The demo's report: `<out>/report.md` with its PNGs beside it (in `<out>/figures/`).

`write_report(out, world, state, seconds, previous_seconds, wall_seconds)` turns what the demo's stages
returned (run.py) into: the targets and whether each was met, the stages and their times,
the detector's scores and its regions on a few test images (the paper's Figure 2, pictures.py,
viz/regions.py), the miniature Table 1 (captioning: Up-Down vs the grid baseline under
XE and SCST, all metrics) and Table 4 (VQA: Up-Down vs grids 1x1/7x7/14x14 per answer type,
single model vs ensemble), training curves (viz/plots.py) and attention pictures in the style
of the paper's Figures 5-7 (pictures.py, viz/attention.py) on a few test images: pixels from the world's
JPEGs, boxes from the feature store, attention from the trained models.
"""

from __future__ import annotations

import time
from typing import Any

from ray_updown import storage
from ray_updown.data.vqa import ANSWER_TYPES
from ray_updown.demo.pictures import (
    FIGURE2_REGIONS,
    caption_attention_pictures,
    region_pictures,
    vqa_attention_pictures,
)
from ray_updown.viz.plots import plot_bars, plot_curves

FIGURES_DIR = "figures"
CAPTION_METRICS = (("Bleu_1", "BLEU-1"), ("Bleu_2", "BLEU-2"), ("Bleu_3", "BLEU-3"),
                   ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"),
                   ("CIDEr", "CIDEr"), ("SPICE", "SPICE"))
PAPER_TABLE1 = {"xe": {"Bleu_4": 36.2, "CIDEr": 113.5}, "scst": {"Bleu_4": 36.3, "CIDEr": 120.1}}
PAPER_TABLE4 = {"overall": 63.2, "yes/no": 80.3, "number": 42.8, "other": 55.8}


# ------------------------------------------------------------------------------- tables
def build_table1(captioning: dict) -> dict:
    """{objective: {model label: {metric: value x 100}}}: the paper's Table 1 layout."""
    table: dict[str, dict] = {"xe": {}, "scst": {}}
    for feat in sorted(captioning, key=lambda f: f == "regions"):  # grid first, as the paper
        run = captioning[feat]
        for objective in ("xe", "scst"):
            metrics = run[objective]["test"]["metrics"]
            table[objective][run["label"]] = {k: round(100 * float(metrics[k]), 1)
                                              for k, _ in CAPTION_METRICS if k in metrics}
    return table


def build_table4(vqa_scores: dict, ensemble: dict, grid_names: list[str],
                 seeds: list[int]) -> dict:
    """{"rows": {label: {overall, yes/no, number, other}}, "per_seed": {label: {"seed S": row}},
    "members": {label: overall}, "single": label, "ensemble": label, "seeds": seeds}: the
    paper's Table 4 plus single vs ensemble. Each grid row and the single model's row is the
    mean over the VQA seeds (the single model's runs are the ensemble's first members)."""
    def row(scores: dict) -> dict:
        return {"overall": scores["overall"],
                **{t: scores["per_answer_type"].get(t) for t in ANSWER_TYPES}}

    per_seed: dict[str, dict] = {}
    for name in sorted(grid_names, key=lambda n: int(n[len("grid"):])):
        g = int(name[len("grid"):])
        per_seed[f"ResNet {g}x{g}"] = {f"seed {s}": row(vqa_scores[f"{name}-seed{s}"])
                                        for s in seeds}
    single = (f"Up-Down (single model, seed {seeds[0]})" if len(seeds) == 1 else
              f"Up-Down (single model, mean of {len(seeds)} seeds)")
    per_seed[single] = {f"seed {s}": row(vqa_scores[f"member{s}"]) for s in seeds}
    rows = {label: _mean_row(list(runs.values())) for label, runs in per_seed.items()}
    members = ensemble["members"]
    ens = f"Up-Down ensemble of {len(members)}"
    rows[ens] = row(vqa_scores["ensemble"])
    member_scores = {f"seed {m['seed']}": vqa_scores[f"member{m['seed']}"]["overall"]
                     for m in members}
    return {"rows": rows, "per_seed": per_seed, "members": member_scores, "single": single,
            "ensemble": ens, "seeds": list(seeds)}


def _mean_row(rows: list[dict]) -> dict:
    """The mean of each column over the seeds' rows (None where a seed has none)."""
    return {key: None if any(r[key] is None for r in rows) else
            round(sum(r[key] for r in rows) / len(rows), 2) for key in rows[0]}


def targets_met(table1: dict, table4: dict) -> dict[str, dict]:
    """The issues' targets, each {"met": bool, "detail": the numbers compared, "margin": by
    how much the first beats the second (<= 0 when missed), "against": the second}."""
    out: dict[str, dict] = {}
    labels = list(table1["xe"])
    updown = next(label for label in labels if label == "Up-Down")
    grid = next(label for label in labels if label != "Up-Down")
    for objective in ("xe", "scst"):
        a, b = table1[objective][updown]["CIDEr"], table1[objective][grid]["CIDEr"]
        out[f"captioning: Up-Down CIDEr > {grid} under {objective.upper()}"] = {
            "met": a > b, "detail": f"{a:.1f} vs {b:.1f}", "margin": round(a - b, 2),
            "against": b}
    for label in (grid, updown):
        a, b = table1["scst"][label]["CIDEr"], table1["xe"][label]["CIDEr"]
        out[f"captioning: SCST CIDEr > XE CIDEr for {label}"] = {
            "met": a > b, "detail": f"{a:.1f} vs {b:.1f}", "margin": round(a - b, 2),
            "against": b}
    rows = table4["rows"]
    single = rows[table4["single"]]
    grids = {k: v for k, v in rows.items() if k.startswith("ResNet")}
    for key in ("overall", "number"):
        best_label = max(grids, key=lambda k: grids[k][key])
        out[f"VQA: Up-Down > every grid baseline ({key})"] = {
            "met": all(single[key] > v[key] for v in grids.values()),
            "detail": f"{single[key]:.2f} vs best grid {best_label} {grids[best_label][key]:.2f}",
            "margin": round(single[key] - grids[best_label][key], 2),
            "against": grids[best_label][key]}
    best_member = max(table4["members"], key=table4["members"].get)
    ens = rows[table4["ensemble"]]["overall"]
    best = table4["members"][best_member]
    out["VQA: ensemble > its best member (overall)"] = {
        "met": ens > best, "detail": f"{ens:.2f} vs {best:.2f} ({best_member})",
        "margin": round(ens - best, 2), "against": best}
    return out


# ------------------------------------------------------------------------------- curves
def _series(history: list[dict], key: str, offset: int = 0) -> list[tuple[float, float]]:
    return [(offset + int(m["epoch"]), float(m[key])) for m in history
            if m.get(key) is not None and m.get("epoch") is not None]


def draw_curves(state: dict, figures: str) -> dict[str, str]:
    """Training curves as PNGs; {title: file name relative to the report}."""
    out: dict[str, str] = {}

    def save(name: str, title: str, series: dict, xlabel: str, ylabel: str) -> None:
        if any(series.values()):
            plot_curves(series, title, xlabel, ylabel, storage.join(figures, name))
            out[title] = f"{FIGURES_DIR}/{name}"

    history = state["detector"]["history"]
    save("detector_losses.png", "Detector training losses",
         {k: _series(history, k) for k in ("loss_rpn_cls", "loss_rpn_box", "loss_cls",
                                           "loss_box", "loss_attr")}, "epoch", "mean loss")
    save("detector_val.png", "Detector on VG val",
         {"object mAP@0.5": _series(history, "val_map50"),
          "attribute accuracy": _series(history, "val_attr_acc")}, "epoch", "score")
    captioning = state["captioning"]
    save("caption_xe_loss.png", "Captioner XE loss (eq. 9)",
         {run["label"]: _series(run["xe"]["history"], "loss") for run in captioning.values()},
         "epoch", "cross-entropy per caption")
    save("caption_scst.png", "Captioner SCST: mean CIDEr-D reward of the beam (eq. 10-11)",
         {run["label"]: _series(run["scst"]["history"], "train_reward") for run in captioning.values()},
         "SCST epoch", "reward")
    cider = {}
    for run in captioning.values():
        xe_epochs = max((int(m["epoch"]) for m in run["xe"]["history"]), default=0)
        cider[f"{run['label']} XE"] = _series(run["xe"]["history"], "val_cider_d")
        cider[f"{run['label']} SCST"] = _series(run["scst"]["history"], "val_cider_d", xe_epochs)
    save("caption_val_cider.png", "Captioner val CIDEr-D (greedy), XE then SCST", cider,
         "epoch", "CIDEr-D")
    vqa = {f"ResNet {name[len('grid'):]}x{name[len('grid'):]} seed {run['seed']}":
           _series(run["history"], "val_accuracy")
           for name, runs in state["vqa_grids"].items() for run in runs[:1]}
    vqa.update({f"Up-Down seed {m['seed']}": _series(m.get("history", []), "val_accuracy")
                for m in state["ensemble"]["members"]})
    save("vqa_val_accuracy.png", "VQA val accuracy (soft score of the top answer)", vqa,
         "epoch", "accuracy")
    return out


def draw_bars(table1: dict, table4: dict, figures: str) -> dict[str, str]:
    out = {}
    groups = {objective.upper(): {label: m["CIDEr"] for label, m in rows.items()}
              for objective, rows in table1.items()}
    plot_bars(groups, "Table 1 (miniature): CIDEr on the test split", "CIDEr",
              storage.join(figures, "table1_cider.png"))
    out["Table 1: CIDEr"] = f"{FIGURES_DIR}/table1_cider.png"
    groups = {key: {label: row[key] for label, row in table4["rows"].items()}
              for key in ("overall", *ANSWER_TYPES)}
    plot_bars(groups, "Table 4 (miniature): VQA val accuracy", "accuracy",
              storage.join(figures, "table4_accuracy.png"))
    out["Table 4: accuracy"] = f"{FIGURES_DIR}/table4_accuracy.png"
    return out


# ------------------------------------------------------------------------------ markdown
def _fmt(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def table1_markdown(table1: dict) -> list[str]:
    lines = ["| objective | features | " + " | ".join(n for _, n in CAPTION_METRICS) + " |",
             "|---|---|" + "---|" * len(CAPTION_METRICS)]
    for objective, rows in table1.items():
        for label, m in rows.items():
            lines.append(f"| {objective.upper()} | {label} | " +
                         " | ".join(_fmt(m.get(k)) for k, _ in CAPTION_METRICS) + " |")
    return lines


def table4_markdown(table4: dict) -> list[str]:
    lines = ["| model | overall | yes/no | number | other |", "|---|---|---|---|---|"]
    for label, row in table4["rows"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(k), 2) for k in
                                                   ("overall", *ANSWER_TYPES)) + " |")
    return lines


def per_seed_markdown(table4: dict) -> list[str]:
    """Table 4's single models per VQA seed: overall / number accuracy."""
    seeds = table4["seeds"]
    lines = ["| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    for label, runs in table4["per_seed"].items():
        lines.append(f"| {label} | " + " | ".join(
            f"{_fmt(run['overall'], 2)} / {_fmt(run['number'], 2)}" for run in runs.values()) + " |")
    return lines


def write_report(out: str, world, state: dict, seconds: dict[str, float],
                 previous_seconds: dict[str, float], wall_seconds: float) -> dict:
    """Write <out>/report.md and its figures; returns {"report", "table1", "table4", ...}."""
    figures = storage.join(out, FIGURES_DIR)
    table1 = build_table1(state["captioning"])
    seeds = [run["seed"] for run in next(iter(state["vqa_grids"].values()))]
    table4 = build_table4(state["vqa_scores"], state["ensemble"], list(state["vqa_grids"]), seeds)
    targets = targets_met(table1, table4)
    curves = {**draw_curves(state, figures), **draw_bars(table1, table4, figures)}
    caption_pictures = caption_attention_pictures(world, state, figures, FIGURES_DIR)
    vqa_pictures = vqa_attention_pictures(world, state, figures, FIGURES_DIR)
    figure2 = region_pictures(world, state, figures, FIGURES_DIR)

    lines = (targets_section(state, targets)
             + stages_section(seconds, previous_seconds, wall_seconds)
             + detector_section(state, figure2)
             + captioning_section(state, table1)
             + vqa_section(out, state, table4)
             + ["## Training curves", ""]
             + [f"![{title}]({path})" for title, path in curves.items()]
             + attention_section(caption_pictures, vqa_pictures))
    report_uri = storage.join(out, "report.md")
    storage.write_text(report_uri, "\n".join(lines) + "\n")
    pictures = [i["path"] for i in figure2 + caption_pictures + vqa_pictures]
    return {"report": report_uri, "table1": table1, "table4": table4, "targets": targets,
            "figures": list(curves.values()) + pictures}


def targets_section(state: dict, targets: dict[str, dict]) -> list[str]:
    """The title, what the run was, and each target with whether it was met."""
    world = state["world"]
    met = sum(t["met"] for t in targets.values())
    lines = [f"# Bottom-up and top-down attention on a synthetic world (scale {state['config']['scale']:g})", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by `ray-updown demo` (ray_updown/demo/run.py). "
             f"World: {world['images']} images of {world['image_size'][0]} px "
             f"(Karpathy splits {world['splits']}); everything below was trained and "
             "scored on it by this run, on Ray on this machine.", "",
             f"## Targets: {met} of {len(targets)} met", "",
             "| target | met | numbers |", "|---|---|---|"]
    return lines + [f"| {name} | {'yes' if t['met'] else '**no**'} | {t['detail']} |"
                    for name, t in targets.items()]


def stages_section(seconds: dict[str, float], previous_seconds: dict[str, float],
                   wall_seconds: float) -> list[str]:
    """Each stage's seconds in this run and, for a reused one, when it ran."""
    lines = ["", "## Stages", "", "| stage | seconds (this run) | seconds (when it ran) |",
             "|---|---|---|"]
    for name in list(seconds):
        then = previous_seconds.get(name)
        lines.append(f"| {name} | {seconds[name]:.0f} | {'' if then is None else f'{then:.0f}'} |")
    return lines + [
        f"| wall clock of this run, before the report | {wall_seconds:.0f} ({wall_seconds / 60:.1f} min) | |",
        "", "The captioner and VQA stages run side by side (tracks sharing the "
        "cluster's CPUs), so their seconds overlap.", ""]


def detector_section(state: dict, figure2: list[dict]) -> list[str]:
    """The detector's scores, the feature stores and the detector's regions (Figure 2)."""
    cfg, det = state["config"], state["detector"]
    m = det["metrics"]
    lines = ["## 1. Bottom-up attention: the detector (paper 3.1)", "",
             f"Faster R-CNN ResNet C4 with the attribute head, trained {det['train_minutes']:.1f} "
             f"min ({m.get('epoch')} epochs) on the world's Visual Genome files. Held-out VG "
             f"images: object mAP@0.5 val {_fmt(m.get('val_map50'), 3)}, test "
             f"{_fmt(m.get('test_map50'), 3)}; attribute accuracy val "
             f"{_fmt(m.get('val_attr_acc'), 3)}, test {_fmt(m.get('test_attr_acc'), 3)}. "
             f"Regions kept per image: {cfg['min_regions'] or 'min'}-{cfg['max_regions'] or 'max'}"
             " by detection score (the paper: 10-100 above 0.2 confidence; its released features also come "
             "with a fixed 36).", ""]
    lines += ["| features | images | regions per image | feature dim | extraction s |",
              "|---|---|---|---|---|"]
    for name, ex in state["extraction"].items():
        lines.append(f"| {name} | {ex['features']} (+{ex['errors']} errors) | "
                     f"{ex['mean_regions']:.1f} | {ex['feature_dim']} | {_fmt(ex['seconds'])} |")
    if figure2:
        lines += ["", "### The detector's regions (in the style of the paper's Figure 2)", "",
                  f"The {FIGURE2_REGIONS} most confident regions of the region store on test images, "
                  "each labelled with its attribute and object class and their confidences "
                  "(`ray-updown show` draws any image this way).", ""]
        for item in figure2:
            lines += [f"**{item['title']}**: {', '.join(item['labels'])}", "",
                      f"![{item['title']}]({item['path']})", ""]
    return lines


def captioning_section(state: dict, table1: dict) -> list[str]:
    """Table 1 in miniature, with how it was scored."""
    from ray_updown.metrics.caption_eval import spice_available, spice_jar_dir

    test_images = next(iter(state["captioning"].values()))["xe"]["test"]["num_images"]
    spice_note = ("SPICE ran." if spice_available() else
                  f"SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in {spice_jar_dir()}.")
    return ["", "## 2. Captioning: Table 1 in miniature", "",
            f"Karpathy test split ({test_images} images), beam search 5, scores x100 through "
            f"pycocoevalcap (PTB tokenizer). {spice_note} The paper (COCO, single model): "
            "XE BLEU-4 36.2 / CIDEr 113.5, SCST BLEU-4 36.3 / CIDEr 120.1.", ""] + table1_markdown(table1)


def vqa_section(out: str, state: dict, table4: dict) -> list[str]:
    """Table 4 in miniature, the ensemble's members and where the results files are."""
    val_q = next(iter(state["vqa_scores"].values()))
    lines = ["", "## 3. VQA: Table 4 in miniature", "",
             "VQA val, official accuracy (vqaEval normalisation, min(1, matches/3) over the 10 "
             "leave-one-out subsets). Each model's checkpoint is its best epoch by val accuracy "
             "(the world has no other annotated split), so all rows share that optimism. The "
             "paper (VQA v2 val, single model): 63.2 overall, 80.3 yes/no, 42.8 number, 55.8 "
             "other; ResNet 7x7 59.4.", ""]
    lines += table4_markdown(table4)
    seeds = table4["seeds"]
    if len(seeds) > 1:
        lines += ["", f"Each row but the ensemble is the mean over the VQA seeds {seeds[0]}-"
                  f"{seeds[-1]}: each grid model trained with each seed, and Up-Down's runs are "
                  "the ensemble's first members. Per seed, overall / number:", ""]
        lines += per_seed_markdown(table4)
    return lines + ["", "Ensemble members (overall): " + ", ".join(
        f"{k} {v:.2f}" for k, v in table4["members"].items()) + f"; results files in "
        f"`{storage.join(out, 'results')}` (e.g. `{val_q['results_file'].rsplit('/', 1)[-1]}`).", ""]


def attention_section(caption_pictures: list[dict], vqa_pictures: list[dict]) -> list[str]:
    """The captioners' and the VQA models' attention pictures (Figures 5-7)."""
    lines = ["", "## Attention (in the style of the paper's Figures 5-7)", "",
             "Each panel: the image darkened where attention is low, the most attended regions "
             "outlined (line width by weight), the strongest in red. Captions: one panel per "
             "generated word (beam search 5, SCST models); Up-Down attends to detected "
             "objects, the baseline to grid cells.", ""]
    for item in caption_pictures:
        lines += [f"**{item['title']}**: \"{item['caption']}\"", "", f"![{item['title']}]({item['path']})", ""]
    lines += ["VQA: the attention of the question over the regions (Figure 6 style), Up-Down "
              "single model and the largest grid baseline on the same questions.", ""]
    for item in vqa_pictures:
        lines += [f"**{item['title']}**: Q: {item['question']} A: {item['answer']} "
                  f"(humans: {item['truth']})", "", f"![{item['title']}]({item['path']})", ""]
    return lines
