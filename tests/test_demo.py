"""`make demo` at its smallest scale: every stage runs for real on the local Ray cluster (a
50-image world, a detector trained for seconds, tiny captioners and VQA models), the report
has every section with its PNGs, and a second run reuses every stage."""

from __future__ import annotations

import json
import os
import re

import pytest

from ray_updown.demo import report as report_module
from ray_updown.demo.counting import run_study
from ray_updown.demo.number_questions import demo_breakdown
from ray_updown.demo.report import (
    build_table1,
    build_table4,
    per_seed_markdown,
    table1_markdown,
    table4_markdown,
    targets_met,
    write_report,
)
from ray_updown.demo.run import DemoConfig, run_demo
from ray_updown.demo.stages import StageBook
from ray_updown.errors import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_demo(out) -> DemoConfig:
    """The demo at its smallest: scale 0.05 (50 images, one epoch per run: VQA's 20 epochs,
    not the demo's 30, so that 0.05 rounds to one), two VQA grids, two VQA seeds (so an
    ensemble of two), and
    models 32 wide on 10 regions per image (the demo's are 128 and 256 wide on 36). What the
    test checks does not depend on those sizes: that every stage runs on Ray and lands in the
    report's sections, tables, targets and figures, and that a re-run reuses every stage."""
    return DemoConfig(out=str(out), scale=0.05, detector_minutes=1.0, caption_grid=7,
                      vqa_grids=[1, 7], ensemble_members=2, vqa_seeds=2, attention_examples=1,
                      caption_dim=32, vqa_hidden=32, vqa_epochs=20, min_regions=10, max_regions=10)


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = text.find("\n## ", start + len(heading))
    return text[start:following if following >= 0 else len(text)]


def test_demo_writes_the_report_with_every_section_and_a_rerun_skips_every_stage(
        ray_cluster, tmp_path):
    cfg = tiny_demo(tmp_path / "demo")
    summary = run_demo(cfg)

    report = tmp_path / "demo" / "report.md"
    assert summary["report"] == str(report)
    text = report.read_text()
    for heading in ("## Targets", "## Stages", "## 1. Bottom-up attention", "## 2. Captioning: Table 1",
                    "## 3. VQA: Table 4", "## Training curves", "## Attention"):
        assert heading in text, heading

    # Table 1: XE and SCST rows for both features, every metric a number (SPICE absent here).
    table1 = _section(text, "## 2. Captioning")
    rows = [line for line in table1.splitlines() if re.match(r"\| (XE|SCST) \|", line)]
    assert len(rows) == 4
    assert {r.split("|")[2].strip() for r in rows} == {"Up-Down", "ResNet 7x7"}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")][2:9]
        assert all(re.fullmatch(r"\d+\.\d", c) for c in cells), row
    # Table 4: the grids, the single model and the ensemble, per answer type; the single
    # models per VQA seed.
    table4 = _section(text, "## 3. VQA")
    for label in ("ResNet 1x1", "ResNet 7x7", "Up-Down (single model, mean of 2 seeds)",
                  "Up-Down ensemble of 2"):
        assert re.search(rf"\| {re.escape(label)} \|( \d+\.\d\d \|){{4}}", table4), label
        if "ensemble" not in label:
            assert re.search(rf"\| {re.escape(label)} \|( \d+\.\d\d / \d+\.\d\d \|){{2}}",
                             table4), label

    # Every picture the report links exists as a PNG beside it.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for link in links:
        path = tmp_path / "demo" / link
        assert path.read_bytes()[:8] == PNG_MAGIC, link
    curves = {"detector_losses.png", "detector_val.png", "caption_xe_loss.png",
              "caption_scst.png", "caption_val_cider.png", "vqa_val_accuracy.png"}
    assert curves <= {os.path.basename(link) for link in links}
    attention = _section(text, "## Attention")
    assert len(re.findall(r"figures/caption_attention_(regions|grid7)_\d+\.png", attention)) == 2
    assert len(re.findall(r"figures/vqa_attention_(regions|grid7)_\d+\.png", attention)) == 6

    # The summary: per-stage seconds, tables and the seven targets with their verdicts.
    stages = set(summary["stage_seconds"])
    assert {"world", "detector", "extract_regions", "extract_grid1", "extract_grid7",
            "caption_xe_regions", "caption_scst_grid7", "caption_test_scst_regions",
            "vqa_grids", "vqa_ensemble", "vqa_val", "report"} <= stages
    assert summary["skipped"] == []
    assert len(summary["targets"]) == 7
    assert all(isinstance(t["met"], bool) for t in summary["targets"].values())
    # The verdicts are those of the tables the summary reports, and the report says the same.
    recomputed = targets_met(summary["table1"], summary["table4"])
    assert {k: t["met"] for k, t in summary["targets"].items()} == \
        {k: t["met"] for k, t in recomputed.items()}
    met = sum(t["met"] for t in recomputed.values())
    assert f"## Targets: {met} of 7 met" in text
    for name, target in recomputed.items():
        verdict = "yes" if target["met"] else "**no**"
        assert f"| {name} | {verdict} | {target['detail']} |" in text, name
    # The report's tables are the summary's numbers.
    for line in table1_markdown(summary["table1"]) + table4_markdown(summary["table4"]):
        assert line in text, line
    cider = {(objective, label): row["CIDEr"] for objective, rows in summary["table1"].items()
             for label, row in rows.items()}
    assert set(cider) == {(o, label) for o in ("xe", "scst") for label in ("Up-Down", "ResNet 7x7")}
    assert all(0.0 <= v <= 1000.0 for v in cider.values())
    rows4 = summary["table4"]["rows"]
    assert all(0.0 <= rows4[label]["overall"] <= 100.0 for label in rows4)
    assert os.path.exists(tmp_path / "demo" / "results" /
                          "captions_test2014_scst-regions_results.json")

    # The VQA grid trials queue seed by seed, costliest first (Tune numbers its trials in
    # launch order), and the stage still reports the grids in the config's order.
    trials = sorted(os.listdir(tmp_path / "demo" / "runs" / "vqa-grids"))
    trials = [t for t in trials if re.fullmatch(r"\w+_\d{5}-grid\d+-seed\d+", t)]
    assert [t.split("-", 1)[1] for t in trials] == ["grid7-seed0", "grid1-seed0", "grid7-seed1",
                                                    "grid1-seed1"]
    grids = json.loads((tmp_path / "demo" / "stages" / "vqa_grids.json").read_text())["result"]
    assert {name: run["seed"] for name, run in grids.items()} == {
        "grid1-seed0": 0, "grid1-seed1": 1, "grid7-seed0": 0, "grid7-seed1": 1}

    # A second run reuses every stage (and leaves the report as it was).
    written = report.stat().st_mtime_ns
    again = run_demo(tiny_demo(tmp_path / "demo"))
    assert sorted(again["skipped"]) == sorted(stages)
    assert set(again["stage_seconds"].values()) == {0.0}
    assert again["table1"] == summary["table1"] and again["table4"] == summary["table4"]
    assert report.stat().st_mtime_ns == written

    # Other settings in the same folder are refused instead of mixing two runs.
    with pytest.raises(ConfigError, match="scale"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), scale=0.1))

    # The number questions by count form: every model at every VQA seed; Table 4's rows are
    # their means.
    breakdown = demo_breakdown(str(tmp_path / "demo"))
    assert {"answer prior", "member0", "member1", "ensemble", "grid1-seed0", "grid1-seed1",
            "grid7-seed0", "grid7-seed1"} == set(breakdown["models"])
    number = {name: m["number"]["accuracy"] for name, m in breakdown["models"].items()}
    per_seed = summary["table4"]["per_seed"]
    assert number["member1"] == per_seed["Up-Down (single model, mean of 2 seeds)"]["seed 1"]["number"]
    assert number["grid7-seed0"] == per_seed["ResNet 7x7"]["seed 0"]["number"]
    assert rows4["ResNet 7x7"]["number"] == pytest.approx(
        (number["grid7-seed0"] + number["grid7-seed1"]) / 2, abs=0.006)

    # The counting study on the finished folder: both stores with both seeds as trials of one
    # Tune experiment, the costliest (adaptive, up to 100 regions) first in each seed; a
    # re-run reuses every step.
    study = run_study(str(tmp_path / "demo"), 2)
    trials = sorted(os.listdir(tmp_path / "demo" / "counting" / "runs" / "vqa-counting"))
    trials = [t.split("-", 1)[1] for t in trials if re.fullmatch(r"\w+_\d{5}-\w+-seed\d+", t)]
    assert trials == ["regions_adaptive-seed0", "regions-seed0", "regions_adaptive-seed1",
                      "regions-seed1"]
    assert set(study["vqa"]) == {"fixed10", "adaptive"}
    assert all(len(study["vqa"][name]["number"]) == 2 for name in study["vqa"])
    assert (tmp_path / "demo" / "counting" / "counting.png").read_bytes()[:8] == PNG_MAGIC
    assert run_study(str(tmp_path / "demo"), 2) == study


def test_stage_book_runs_a_stage_once_and_records_its_result(tmp_path):
    calls = []
    book = StageBook(str(tmp_path))
    assert book.run("one", lambda: calls.append(1) or {"value": float("nan"), "n": 1}) == \
        {"value": None, "n": 1}
    again = StageBook(str(tmp_path))
    assert again.run("one", lambda: calls.append(2) or {}) == {"value": None, "n": 1}
    assert calls == [1] and again.skipped == ["one"] and again.seconds == {"one": 0.0}


def test_targets_compare_the_right_numbers():
    table1 = {"xe": {"ResNet 10x10": {"CIDEr": 50.0}, "Up-Down": {"CIDEr": 60.0}},
              "scst": {"ResNet 10x10": {"CIDEr": 55.0}, "Up-Down": {"CIDEr": 58.0}}}
    rows = {"ResNet 1x1": {"overall": 40.0, "number": 30.0},
            "ResNet 7x7": {"overall": 50.0, "number": 36.0},
            "Up-Down (single model, seed 0)": {"overall": 55.0, "number": 35.0},
            "Up-Down ensemble of 2": {"overall": 56.0, "number": 37.0}}
    table4 = {"rows": rows, "members": {"seed 0": 55.0, "seed 1": 56.5},
              "single": "Up-Down (single model, seed 0)", "ensemble": "Up-Down ensemble of 2"}
    met = {name: t["met"] for name, t in targets_met(table1, table4).items()}
    assert met == {
        "captioning: Up-Down CIDEr > ResNet 10x10 under XE": True,
        "captioning: Up-Down CIDEr > ResNet 10x10 under SCST": True,
        "captioning: SCST CIDEr > XE CIDEr for ResNet 10x10": True,
        "captioning: SCST CIDEr > XE CIDEr for Up-Down": False,
        "VQA: Up-Down > every grid baseline (overall)": True,
        "VQA: Up-Down > every grid baseline (number)": False,
        "VQA: ensemble > its best member (overall)": False,
    }


# ------------------------------------------------------------------ targets, tables, report
GRID = "ResNet 10x10"
SINGLE = "Up-Down (single model, mean of 2 seeds)"
ENSEMBLE = "Up-Down ensemble of 2"


def _table1(xe_updown=60.0, xe_grid=50.0, scst_updown=65.0, scst_grid=55.0,
            updown_first=False) -> dict:
    def rows(updown, grid):
        pairs = [("Up-Down", {"CIDEr": updown}), (GRID, {"CIDEr": grid})]
        return dict(pairs if updown_first else pairs[::-1])
    return {"xe": rows(xe_updown, xe_grid), "scst": rows(scst_updown, scst_grid)}


def _table4(single=(55.0, 35.0), grid1=(40.0, 30.0), grid7=(50.0, 34.0), ensemble=57.0,
            members=(55.0, 56.5)) -> dict:
    rows = {"ResNet 1x1": {"overall": grid1[0], "number": grid1[1]},
            "ResNet 7x7": {"overall": grid7[0], "number": grid7[1]},
            SINGLE: {"overall": single[0], "number": single[1]},
            ENSEMBLE: {"overall": ensemble, "number": 0.0}}
    return {"rows": rows, "members": {f"seed {i}": v for i, v in enumerate(members)},
            "single": SINGLE, "ensemble": ENSEMBLE}


def _verdicts(table1: dict, table4: dict) -> dict[str, bool]:
    return {name: t["met"] for name, t in targets_met(table1, table4).items()}


XE, SCST = f"captioning: Up-Down CIDEr > {GRID} under XE", f"captioning: Up-Down CIDEr > {GRID} under SCST"
SCST_GRID, SCST_UPDOWN = (f"captioning: SCST CIDEr > XE CIDEr for {GRID}",
                          "captioning: SCST CIDEr > XE CIDEr for Up-Down")
VQA_OVERALL, VQA_NUMBER = ("VQA: Up-Down > every grid baseline (overall)",
                           "VQA: Up-Down > every grid baseline (number)")
ENS = "VQA: ensemble > its best member (overall)"


def test_targets_all_met_when_every_comparison_goes_the_papers_way():
    verdicts = _verdicts(_table1(), _table4())
    assert list(verdicts) == [XE, SCST, SCST_GRID, SCST_UPDOWN, VQA_OVERALL, VQA_NUMBER, ENS]
    assert all(verdicts.values())


@pytest.mark.parametrize("table1, failed", [
    (_table1(xe_updown=49.0), {XE}),  # the grid better under XE only
    (_table1(xe_updown=50.0), {XE}),  # a tie is not a win
    (_table1(scst_updown=54.0), {SCST, SCST_UPDOWN}),
    (_table1(scst_grid=49.0), {SCST_GRID}),  # SCST hurt the grid only
    (_table1(scst_updown=59.5), {SCST_UPDOWN}),
    (_table1(scst_updown=60.0), {SCST_UPDOWN}),  # SCST equal to XE is not an improvement
    (_table1(xe_updown=45.0, xe_grid=50.0, scst_updown=40.0, scst_grid=55.0),
     {XE, SCST, SCST_UPDOWN}),
])
def test_captioning_targets_compare_the_right_cells(table1, failed):
    verdicts = _verdicts(table1, _table4())
    assert {name for name, met in verdicts.items() if not met} == failed


def test_captioning_targets_do_not_depend_on_the_row_order():
    for table1 in (_table1(scst_grid=49.0), _table1(scst_grid=49.0, updown_first=True)):
        verdicts = _verdicts(table1, _table4())
        assert {name for name, met in verdicts.items() if not met} == {SCST_GRID}
    details = targets_met(_table1(updown_first=True), _table4())
    assert details[XE]["detail"] == "60.0 vs 50.0"
    assert details[SCST]["detail"] == "65.0 vs 55.0"
    assert details[SCST_GRID]["detail"] == "55.0 vs 50.0"
    assert details[SCST_UPDOWN]["detail"] == "65.0 vs 60.0"


@pytest.mark.parametrize("table4, failed", [
    (_table4(grid7=(56.0, 34.0)), {VQA_OVERALL}),  # the best grid, not the first, is the bar
    (_table4(grid1=(55.0, 30.0)), {VQA_OVERALL}),  # a tie with any grid is not a win
    (_table4(grid1=(40.0, 36.0)), {VQA_NUMBER}),  # number and overall are judged apart
    (_table4(single=(39.0, 29.0)), {VQA_OVERALL, VQA_NUMBER}),
    (_table4(ensemble=56.0), {ENS}),  # beats seed 0 but not seed 1, the best member
    (_table4(ensemble=56.5), {ENS}),
    (_table4(ensemble=54.0, members=(55.0, 50.0)), {ENS}),
    (_table4(ensemble=55.5, members=(55.0, 50.0)), set()),
])
def test_vqa_targets_compare_the_right_cells(table4, failed):
    verdicts = _verdicts(_table1(), table4)
    assert {name for name, met in verdicts.items() if not met} == failed


def test_vqa_target_details_name_the_best_grid_and_member():
    details = targets_met(_table1(), _table4(grid1=(52.0, 30.0), ensemble=56.0))
    assert details[VQA_OVERALL]["detail"] == "55.00 vs best grid ResNet 1x1 52.00"
    assert details[VQA_NUMBER]["detail"] == "35.00 vs best grid ResNet 7x7 34.00"
    assert details[ENS]["detail"] == "56.00 vs 56.50 (seed 1)"


def _caption_run(label: str, xe: dict, scst: dict) -> dict:
    def objective(metrics, epochs):
        return {"test": {"metrics": metrics, "num_images": 25},
                "history": [{"epoch": e, "loss": 3.0 - e, "val_cider_d": 0.1 * e,
                             "train_reward": 0.2 * e} for e in range(1, epochs + 1)],
                "checkpoint": "unused"}
    return {"label": label, "xe": objective(xe, 3), "scst": objective(scst, 2)}


def _captioning() -> dict:
    metrics = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
    up_xe = dict(zip(metrics, (0.701, 0.52, 0.38, 0.284, 0.243, 0.512, 0.9134)))
    grid_xe = dict(zip(metrics, (0.651, 0.47, 0.33, 0.2449, 0.221, 0.49, 0.8051)))
    up_scst = {**up_xe, "CIDEr": 0.9561}
    grid_scst = {**grid_xe, "CIDEr": 0.8296}
    return {"regions": _caption_run("Up-Down", up_xe, up_scst),
            "grid7": _caption_run("ResNet 7x7", grid_xe, grid_scst)}


def _vqa_scores() -> dict:
    def score(overall, yes_no, number, other):
        return {"overall": overall, "results_file": f"/r/vqa_{overall}_results.json",
                "per_answer_type": {"yes/no": yes_no, "number": number, "other": other}}
    return {"grid1-seed0": score(41.0, 60.0, 20.0, 30.0), "grid1-seed1": score(43.0, 62.0, 22.0, 32.0),
            "grid7-seed0": score(50.25, 68.0, 30.0, 40.0), "grid7-seed1": score(50.75, 68.0, 32.0, 42.0),
            "grid14-seed0": score(52.5, 70.0, 31.0, 44.0), "grid14-seed1": score(52.5, 70.0, 31.0, 44.0),
            "member0": score(55.0, 72.0, 35.0, 47.0), "member1": score(56.5, 73.0, 32.0, 48.0),
            "ensemble": score(57.75, 74.0, 33.0, 49.5)}


def _ensemble() -> dict:
    return {"members": [{"seed": 0, "checkpoint": "unused",
                         "history": [{"epoch": 1, "val_accuracy": 0.4}, {"epoch": 2, "val_accuracy": 0.5}]},
                        {"seed": 1, "checkpoint": "unused", "history": []}]}


def test_build_table1_scales_rounds_and_puts_the_grid_first():
    table = build_table1(_captioning())
    assert list(table) == ["xe", "scst"]
    assert list(table["xe"]) == ["ResNet 7x7", "Up-Down"]  # the paper's order
    assert table["xe"]["Up-Down"] == {"Bleu_1": 70.1, "Bleu_2": 52.0, "Bleu_3": 38.0,
                                      "Bleu_4": 28.4, "METEOR": 24.3, "ROUGE_L": 51.2,
                                      "CIDEr": 91.3}
    assert table["xe"]["ResNet 7x7"]["Bleu_4"] == 24.5 and table["xe"]["ResNet 7x7"]["CIDEr"] == 80.5
    assert table["scst"]["Up-Down"]["CIDEr"] == 95.6 and table["scst"]["ResNet 7x7"]["CIDEr"] == 83.0
    assert "SPICE" not in table["xe"]["Up-Down"]  # absent metrics stay absent


def test_build_table4_orders_grids_numerically_and_names_single_and_ensemble():
    table = build_table4(_vqa_scores(), _ensemble(), ["grid14", "grid7", "grid1"], [0, 1])
    assert list(table["rows"]) == ["ResNet 1x1", "ResNet 7x7", "ResNet 14x14", SINGLE, ENSEMBLE]
    assert table["single"] == SINGLE and table["ensemble"] == ENSEMBLE
    assert table["rows"]["ResNet 14x14"] == {"overall": 52.5, "yes/no": 70.0, "number": 31.0,
                                             "other": 44.0}
    assert table["rows"]["ResNet 7x7"] == {"overall": 50.5, "yes/no": 68.0, "number": 31.0,
                                           "other": 41.0}  # the mean of its two seeds
    assert table["rows"][SINGLE] == {"overall": 55.75, "yes/no": 72.5, "number": 33.5,
                                     "other": 47.5}  # the members' mean, not the best
    assert table["per_seed"]["ResNet 1x1"]["seed 1"] == {"overall": 43.0, "yes/no": 62.0,
                                                        "number": 22.0, "other": 32.0}
    assert list(table["per_seed"]) == ["ResNet 1x1", "ResNet 7x7", "ResNet 14x14", SINGLE]
    assert table["seeds"] == [0, 1]
    one = build_table4(_vqa_scores(), _ensemble(), ["grid1"], [0])
    assert list(one["rows"]) == ["ResNet 1x1", "Up-Down (single model, seed 0)", ENSEMBLE]
    assert one["rows"]["Up-Down (single model, seed 0)"]["overall"] == 55.0
    assert table["rows"][ENSEMBLE] == {"overall": 57.75, "yes/no": 74.0, "number": 33.0,
                                       "other": 49.5}
    assert table["members"] == {"seed 0": 55.0, "seed 1": 56.5}


def test_markdown_tables_hold_the_numbers_in_the_right_columns():
    table1 = build_table1(_captioning())
    lines = table1_markdown(table1)
    assert lines[0] == ("| objective | features | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | "
                        "ROUGE-L | CIDEr | SPICE |")
    assert lines[1].count("---") == 10
    assert lines[2:] == [
        "| XE | ResNet 7x7 | 65.1 | 47.0 | 33.0 | 24.5 | 22.1 | 49.0 | 80.5 | — |",
        "| XE | Up-Down | 70.1 | 52.0 | 38.0 | 28.4 | 24.3 | 51.2 | 91.3 | — |",
        "| SCST | ResNet 7x7 | 65.1 | 47.0 | 33.0 | 24.5 | 22.1 | 49.0 | 83.0 | — |",
        "| SCST | Up-Down | 70.1 | 52.0 | 38.0 | 28.4 | 24.3 | 51.2 | 95.6 | — |"]
    table4 = build_table4(_vqa_scores(), _ensemble(), ["grid1", "grid7"], [0, 1])
    table4["rows"]["ResNet 7x7"]["number"] = None  # a missing answer type prints as a dash
    assert table4_markdown(table4) == [
        "| model | overall | yes/no | number | other |", "|---|---|---|---|---|",
        "| ResNet 1x1 | 42.00 | 61.00 | 21.00 | 31.00 |",
        "| ResNet 7x7 | 50.50 | 68.00 | — | 41.00 |",
        f"| {SINGLE} | 55.75 | 72.50 | 33.50 | 47.50 |",
        f"| {ENSEMBLE} | 57.75 | 74.00 | 33.00 | 49.50 |"]
    assert per_seed_markdown(table4) == [
        "| model | seed 0 | seed 1 |", "|---|---|---|",
        "| ResNet 1x1 | 41.00 / 20.00 | 43.00 / 22.00 |",
        "| ResNet 7x7 | 50.25 / 30.00 | 50.75 / 32.00 |",
        f"| {SINGLE} | 55.00 / 35.00 | 56.50 / 32.00 |"]


def _state(captioning: dict) -> dict:
    history = [{"epoch": e, "loss_rpn_cls": 0.7 / e, "loss_rpn_box": 0.2 / e, "loss_cls": 1.5 / e,
                "loss_box": 0.4 / e, "loss_attr": 1.0 / e, "val_map50": 0.1 * e,
                "val_attr_acc": 0.2 * e} for e in (1, 2, 3)]
    return {
        "config": {"scale": 0.05, "min_regions": 10, "max_regions": 36, "attention_examples": 1},
        "world": {"images": 50, "image_size": [128, 128], "splits": {"train": 30, "val": 10, "test": 10}},
        "detector": {"history": history, "train_minutes": 1.5,
                     "metrics": {"epoch": 3, "val_map50": 0.4321, "test_map50": 0.3987,
                                 "val_attr_acc": 0.25, "test_attr_acc": None}},
        "extraction": {"regions": {"features": 50, "errors": 0, "mean_regions": 21.46,
                                   "feature_dim": 64, "seconds": 12.3},
                       "grid7": {"features": 50, "errors": 1, "mean_regions": 49.0,
                                 "feature_dim": 64, "seconds": 4.0}},
        "stores": {}, "captioning": captioning,
        "vqa_grids": {"grid1": [{"seed": 0, "history": [{"epoch": 1, "val_accuracy": 0.3}]},
                                {"seed": 1, "history": [{"epoch": 1, "val_accuracy": 0.32}]}],
                      "grid7": [{"seed": 0, "history": [{"epoch": 1, "val_accuracy": 0.35}]},
                                {"seed": 1, "history": [{"epoch": 1, "val_accuracy": 0.36}]}]},
        "ensemble": _ensemble(),
        "vqa_scores": {k: v for k, v in _vqa_scores().items() if not k.startswith("grid14")},
    }


def test_write_report_writes_targets_tables_stages_and_figures(tmp_path, monkeypatch):
    pictures = {"caption": [{"title": "Up-Down (SCST), test image 7", "caption": "a red ball",
                             "path": "figures/caption_attention_regions_7.png"}],
                "vqa": [{"title": "Up-Down, number question 3", "question": "how many balls?",
                         "answer": "2", "truth": "3", "path": "figures/vqa_attention_regions_3.png"}]}
    monkeypatch.setattr(report_module, "caption_attention_pictures",
                        lambda world, state, figures, prefix, count=None: pictures["caption"])
    monkeypatch.setattr(report_module, "vqa_attention_pictures",
                        lambda world, state, figures, prefix: pictures["vqa"])
    captioning = _captioning()
    # Make the grid win under SCST: two targets missed (Up-Down > grid under SCST is one,
    # Up-Down's SCST > XE the other).
    captioning["regions"]["scst"]["test"]["metrics"]["CIDEr"] = 0.7
    state = _state(captioning)
    out = tmp_path / "demo"
    result = write_report(str(out), None, state, {"world": 3.2, "detector": 61.6, "report": 0.0},
                          {"world": 2.9, "detector": 70.0}, 125.0)

    text = (out / "report.md").read_text()
    assert result["report"] == str(out / "report.md")
    assert result["table1"] == build_table1(captioning)
    assert result["table4"] == build_table4(state["vqa_scores"], state["ensemble"], ["grid1", "grid7"],
                                            [0, 1])
    verdicts = {name: t["met"] for name, t in result["targets"].items()}
    assert sorted(name for name, met in verdicts.items() if not met) == [
        "captioning: SCST CIDEr > XE CIDEr for Up-Down",
        "captioning: Up-Down CIDEr > ResNet 7x7 under SCST"]
    # Targets: the count, and each row's verdict (misses in bold) with its numbers.
    assert "## Targets: 5 of 7 met" in text
    assert ("| captioning: Up-Down CIDEr > ResNet 7x7 under SCST | **no** | 70.0 vs 83.0 |"
            in text)
    assert "| captioning: SCST CIDEr > XE CIDEr for Up-Down | **no** | 70.0 vs 91.3 |" in text
    assert "| captioning: Up-Down CIDEr > ResNet 7x7 under XE | yes | 91.3 vs 80.5 |" in text
    assert ("| VQA: Up-Down > every grid baseline (overall) | yes | 55.75 vs best grid "
            "ResNet 7x7 50.50 |") in text
    assert "| VQA: ensemble > its best member (overall) | yes | 57.75 vs 56.50 (seed 1) |" in text
    target_rows = [line for line in _section(text, "## Targets").splitlines()
                   if line.startswith("| captioning") or line.startswith("| VQA")]
    assert len(target_rows) == 7 and sum("| **no** |" in r for r in target_rows) == 2
    # Stages: this run's seconds and, where known, the seconds when the stage last ran.
    assert "| world | 3 | 3 |" in text and "| detector | 62 | 70 |" in text
    assert "| report | 0 |  |" in text
    assert "| wall clock of this run, before the report | 125 (2.1 min) | |" in text
    # Section 1: the detector's scores and the extraction table.
    detector = _section(text, "## 1. Bottom-up attention")
    assert "object mAP@0.5 val 0.432, test 0.399" in detector
    assert "attribute accuracy val 0.250, test —" in detector and "10-36" in detector
    assert "| regions | 50 (+0 errors) | 21.5 | 64 | 12.3 |" in detector
    assert "| grid7 | 50 (+1 errors) | 49.0 | 64 | 4.0 |" in detector
    # Tables 1 and 4 with every number, in their sections.
    table1 = _section(text, "## 2. Captioning")
    assert "Karpathy test split (25 images)" in table1
    for line in table1_markdown(result["table1"]):
        assert line in table1, line
    assert "| SCST | Up-Down | 70.1 | 52.0 | 38.0 | 28.4 | 24.3 | 51.2 | 70.0 | — |" in table1
    table4 = _section(text, "## 3. VQA")
    for line in table4_markdown(result["table4"]):
        assert line in table4, line
    assert "Ensemble members (overall): seed 0 55.00, seed 1 56.50" in table4
    for line in per_seed_markdown(result["table4"]):
        assert line in table4, line
    assert "mean over the VQA seeds 0-1" in table4
    # Curves and bars are real PNGs beside the report; the attention pictures are linked.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"detector_losses.png", "detector_val.png", "caption_xe_loss.png",
                "caption_scst.png", "caption_val_cider.png", "vqa_val_accuracy.png",
                "table1_cider.png", "table4_accuracy.png"}
    assert {os.path.basename(link) for link in links} == expected | {
        "caption_attention_regions_7.png", "vqa_attention_regions_3.png"}
    for link in links:
        if os.path.basename(link) in expected:
            assert (out / link).read_bytes()[:8] == PNG_MAGIC, link
    assert sorted(os.listdir(out / "figures")) == sorted(expected)
    attention = _section(text, "## Attention")
    assert '**Up-Down (SCST), test image 7**: "a red ball"' in attention
    assert "Q: how many balls? A: 2 (humans: 3)" in attention


def test_a_demo_folder_refuses_other_settings_but_not_other_scheduling(tmp_path):
    from ray_updown.demo.stages import StageBook
    from ray_updown.errors import ConfigError

    StageBook(str(tmp_path)).check_config({"out": "a", "seed": 0, "parallel_tracks": 4})
    StageBook(str(tmp_path)).check_config({"out": "b", "seed": 0, "parallel_tracks": 1})
    with pytest.raises(ConfigError, match="seed: 0 then, 1 now") as info:
        StageBook(str(tmp_path)).check_config({"out": "a", "seed": 1, "parallel_tracks": 4})
    assert "parallel_tracks" not in str(info.value)


def test_every_demo_vqa_model_shares_the_feature_scaling_and_the_schedule(tmp_path):
    """The grids and the Up-Down members differ only in their data: raw features by default,
    unit-length ones for all with `vqa_l2_normalize`, and one classifier dropout, optimiser,
    step, warmup and epochs."""
    import torch

    from ray_updown.demo.stages import WorldFiles, vqa_config
    from ray_updown.vqa.model import VqaConfig, VqaModel

    world = WorldFiles(str(tmp_path / "world"))
    for unit_length in (False, True):
        cfg = DemoConfig(out=str(tmp_path), vqa_l2_normalize=unit_length)
        grid = vqa_config(cfg, world, "grid7", 49, str(tmp_path), "vqa-grids", cfg.vqa_epochs)
        regions = vqa_config(cfg, world, "regions", 36, str(tmp_path), "vqa-ensemble",
                             cfg.vqa_epochs)
        for run in (grid, regions):
            assert run.model.base().l2_normalize_features is unit_length
            assert run.model.base().classifier_dropout == cfg.vqa_classifier_dropout == 0.5
            assert (run.optimizer, run.lr, run.warmup_epochs, run.epochs, run.batch_size) == (
                "adamax", cfg.vqa_lr, cfg.vqa_warmup_epochs, cfg.vqa_epochs, cfg.vqa_batch_size)
        assert (grid.data.features, grid.data.max_boxes) != (regions.data.features,
                                                             regions.data.max_boxes)
    # What the option does: a region 12 long and the same region 32 long give the same answer.
    unit_length_model = VqaConfig.paper(l2_normalize_features=True, num_tokens=5, num_answers=3,
                                        feat_dim=8, embed_dim=4, hidden=6, pad_index=0)
    model = VqaModel(unit_length_model, seed=0).eval()
    feats = torch.randn(2, 3, 8)
    tokens = torch.tensor([[1, 2, 0], [3, 4, 1]])
    short = feats * (12 / feats.norm(dim=2, keepdim=True))
    torch.testing.assert_close(model(tokens, short), model(tokens, short * 32 / 12))
