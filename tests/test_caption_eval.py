"""COCO caption evaluation (pycocoevalcap + Java) and its files."""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError
from ray_updown.metrics import caption_eval
from ray_updown.metrics.caption_eval import (
    METRIC_KEYS,
    JavaMissingError,
    evaluate_caption_files,
    evaluate_captions,
    load_caption_references,
    load_caption_results,
    results_filename,
    write_caption_results,
)
from ray_updown.metrics.cider import cider_d

# already lowercase and without punctuation: PTB tokenisation leaves them unchanged
REFERENCES = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse near the sea",
        "a man on a horse at the beach"],
    2: ["two dogs playing with a ball in the grass", "dogs chase a ball on a lawn"],
    3: ["a plate of food on a wooden table", "a pizza on a plate on a table",
        "a table with a plate of pizza", "food served on a table"],
    4: ["a cat sleeping on a couch", "a cat lying on a sofa"],
}
RESULTS = {1: "a man riding a horse on a beach", 2: "two dogs playing in the grass",
           3: "a pizza on a table", 4: "a dog on a bed"}


def _references_json(refs: dict) -> dict:
    anns = [{"image_id": i, "id": 100 * i + k, "caption": c}
            for i, caps in refs.items() for k, c in enumerate(caps)]
    return {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in refs],
            "annotations": anns}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation (Java tokenizer + METEOR start once) through the file API."""
    root = tmp_path_factory.mktemp("captions")
    refs_uri = str(root / "captions_val2014.json")
    storage.write_json(refs_uri, _references_json(REFERENCES))
    results_uri = str(root / results_filename("val", "updown"))
    write_caption_results(results_uri, {i: RESULTS[i] for i in (3, 1, 4, 2)})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(caption_eval.__name__)
    logger.addHandler(handler)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            metrics = evaluate_caption_files(refs_uri, results_uri)
    finally:
        logger.removeHandler(handler)
    return {"metrics": metrics, "stdout": stdout.getvalue(), "log": records,
            "results_uri": results_uri}


def test_evaluation_returns_all_metrics(evaluated):
    metrics = evaluated["metrics"]
    for key in METRIC_KEYS:
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["num_images"] == 4
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L"):
        assert 0.0 < metrics[key] < 1.0, key
    assert metrics["Bleu_1"] >= metrics["Bleu_2"] >= metrics["Bleu_3"] >= metrics["Bleu_4"]
    # our CIDEr-D on the same (tokenisation-invariant) captions gives the server's number
    ids = sorted(RESULTS)
    ours, _ = cider_d([RESULTS[i] for i in ids], [REFERENCES[i] for i in ids])
    assert metrics["CIDEr"] == pytest.approx(ours, abs=1e-6)
    assert metrics["CIDEr"] > 0.5


def test_spice_skipped_with_one_message_and_stdout_kept_clean(evaluated):
    if caption_eval.spice_available():
        assert "SPICE" in evaluated["metrics"]
    else:
        assert "SPICE" not in evaluated["metrics"]
        messages = [r.getMessage() for r in evaluated["log"]]
        assert len(messages) == 1 and messages[0].startswith("SPICE skipped")
        assert "\n" not in messages[0]
    assert evaluated["stdout"] == ""  # the CLI prints the metrics as JSON on stdout


def test_results_file_layout_and_round_trip(evaluated):
    uri = evaluated["results_uri"]
    assert uri.endswith("captions_val2014_updown_results.json")
    records = json.loads(storage.read_text(uri))
    assert records == [{"image_id": i, "caption": RESULTS[i]} for i in (1, 2, 3, 4)]
    assert load_caption_results(uri, REFERENCES) == RESULTS


def test_results_on_object_storage(s3_bucket):
    uri = f"{s3_bucket}/results/{results_filename('test', 'ens30')}"
    write_caption_results(uri, {7: "a dog", 5: "a cat"})
    assert load_caption_results(uri) == {5: "a cat", 7: "a dog"}


def test_java_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    with pytest.raises(JavaMissingError, match="Java is missing.*install"):
        evaluate_captions(REFERENCES, RESULTS)


def test_spice_required_without_jars(monkeypatch):
    monkeypatch.setattr(caption_eval, "spice_available", lambda: False)
    with pytest.raises(ConfigError, match="stanford-corenlp-3.6.0"):
        evaluate_captions(REFERENCES, RESULTS, spice=True)


def _write(tmp_path, name, obj) -> str:
    uri = str(tmp_path / name)
    storage.write_json(uri, obj)
    return uri


def test_bad_results_files(tmp_path):
    refs_uri = _write(tmp_path, "refs.json", {
        "images": [{"id": 1}, {"id": 2}, {"id": 9}],
        "annotations": [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}]})
    refs = load_caption_references(refs_uri)
    assert refs == {1: ["a dog"], 2: ["a cat"], 9: []}

    dup = _write(tmp_path, "dup.json", [{"image_id": 1, "caption": "a"},
                                        {"image_id": 2, "caption": "b"},
                                        {"image_id": 1, "caption": "c"}])
    with pytest.raises(DataError, match=r"dup.json: \[2\]: duplicate image_id 1 \(first at \[0\]\)"):
        load_caption_results(dup)
    unknown = _write(tmp_path, "unknown.json", [{"image_id": 1, "caption": "a"},
                                                {"image_id": 5, "caption": "b"}])
    with pytest.raises(DataError, match=r"unknown.json: \[1\] image_id 5: image is not in the "
                                        r"references .*refs.json"):
        load_caption_results(unknown, refs, refs_uri)
    no_refs = _write(tmp_path, "norefs.json", [{"image_id": 9, "caption": "a"}])
    with pytest.raises(DataError, match=r"norefs.json: \[0\] image_id 9: image has no reference"):
        evaluate_caption_files(refs_uri, no_refs)
    for name, obj, problem in [
        ("obj.json", {"image_id": 1, "caption": "a"}, "expected a list"),
        ("empty.json", [], "no results"),
        ("nocap.json", [{"image_id": 1}], r"\[0\]: record needs"),
        ("intcap.json", [{"image_id": 1, "caption": 3}], r"\[0\]: caption must be a string"),
        ("boolid.json", [{"image_id": True, "caption": "a"}], r"\[0\]: image_id must be"),
    ]:
        with pytest.raises(DataError, match=f"{name}: {problem}"):
            load_caption_results(_write(tmp_path, name, obj))
    truncated = str(tmp_path / "trunc.json")
    storage.write_text(truncated, '[{"image_id": 1, "capt')
    with pytest.raises(DataError, match="trunc.json: truncated JSON"):
        load_caption_results(truncated)


def test_bad_reference_files(tmp_path):
    for name, obj, problem in [
        ("list.json", [], 'expected a COCO captions file'),
        ("blank.json", {"annotations": [{"image_id": 1, "caption": "a"},
                                        {"image_id": 1, "caption": "  "}]},
         r"annotations\[1\]: empty reference caption for image_id 1"),
        ("noid.json", {"annotations": [{"caption": "a"}]}, r"annotations\[0\]: annotation needs"),
        ("none.json", {"images": [{"id": 1}], "annotations": []}, "no reference captions"),
    ]:
        with pytest.raises(DataError, match=f"{name}: {problem}"):
            load_caption_references(_write(tmp_path, name, obj))


def test_bad_in_memory_inputs_and_names():
    with pytest.raises(DataError, match="image_id 8: image is not in the references"):
        evaluate_captions(REFERENCES, {8: "a dog"})
    with pytest.raises(DataError, match="no results"):
        evaluate_captions(REFERENCES, {})
    with pytest.raises(DataError, match="caption must be a string"):
        write_caption_results("unused.json", {1: ["a", "dog"]})
    assert results_filename("test", "updown") == "captions_test2014_updown_results.json"
    for split, name in [("train", "x"), ("val", ""), ("val", "a/b"), ("test", "my model")]:
        with pytest.raises(ConfigError):
            results_filename(split, name)
