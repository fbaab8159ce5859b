"""`make demo` at its smallest scale: every stage runs for real on the local Ray cluster (a
50-image world, a detector trained for seconds, tiny captioners and VQA models), the report
has every section with its PNGs, and a second run reuses every stage."""

from __future__ import annotations

import os
import re

import pytest

from ray_updown.demo.run import DemoConfig, run_demo
from ray_updown.demo.stages import StageBook
from ray_updown.errors import ConfigError
from ray_updown.demo.report import targets_met

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_demo(out) -> DemoConfig:
    return DemoConfig(out=str(out), scale=0.05, detector_minutes=1.0, caption_grid=7,
                      vqa_grids=[1, 7], ensemble_members=2, attention_examples=1)


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
    # Table 4: the grids, the single model and the ensemble, per answer type.
    table4 = _section(text, "## 3. VQA")
    for label in ("ResNet 1x1", "ResNet 7x7", "Up-Down (single model, seed 0)",
                  "Up-Down ensemble of 2"):
        assert re.search(rf"\| {re.escape(label)} \|( \d+\.\d\d \|){{4}}", table4), label

    # Every picture the report links exists as a PNG beside it.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for link in links:
        path = tmp_path / "demo" / link
        assert path.read_bytes()[:8] == PNG_MAGIC, link
    curves = {"detector_losses.png", "detector_val.png", "caption_xe_loss.png",
              "caption_scst.png", "caption_val_cider.png", "vqa_val_accuracy.png"}
    assert curves <= {os.path.basename(l) for l in links}
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
    assert os.path.exists(tmp_path / "demo" / "results" /
                          "captions_test2014_scst-regions_results.json")

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
