"""Number questions by what they count (demo/number_questions.py), on a small world and a
hand-made demo folder holding only what the breakdown reads."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from ray_updown import storage
from ray_updown.data.world import WorldConfig, build_world
from ray_updown.data.world_language import count_question_form
from ray_updown.demo.number_questions import (
    breakdown_table,
    demo_breakdown,
    draw_all_shapes,
    summary_table,
)
from ray_updown.demo.stages import WorldFiles
from ray_updown.metrics.vqa_eval import vqa_accuracy


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo folder: its world (60 images), its config, and two models' val results: one
    that always answers "1", and one that answers each question's consensus answer."""
    out = tmp_path_factory.mktemp("demo")
    build_world(WorldConfig(num_images=60, seed=5, image_size=80), str(out / "world"))
    world = WorldFiles(str(out / "world"))
    questions = storage.read_json(world.questions("val"))["questions"]
    truth = {a["question_id"]: a["multiple_choice_answer"]
             for a in storage.read_json(world.annotations("val"))["annotations"]}
    scored = {}
    for name, answer in (("always one", lambda q: "1"), ("oracle", lambda q: truth[q])):
        uri = str(out / "results" / f"{name}.json")
        storage.write_json(uri, [{"question_id": q["question_id"], "answer": answer(q["question_id"])}
                                 for q in questions])
        scored[name] = {"results_file": uri}
    storage.write_json(str(out / "stages" / "vqa_val.json"), {"result": scored})
    storage.write_json(str(out / "stages" / "demo_config.json"), {"seed": 5})
    return str(out), world


def test_every_number_question_of_the_world_has_one_count_form(demo):
    _, world = demo
    texts = {q["question_id"]: q["question"]
             for q in storage.read_json(world.questions("train"))["questions"]}
    forms = set()
    for ann in storage.read_json(world.annotations("train"))["annotations"]:
        form = count_question_form(texts[ann["question_id"]])
        assert (form is None) == (ann["answer_type"] != "number"), texts[ann["question_id"]]
        forms.add(form)
    assert forms == {None, "all", "colour", "class"}
    assert count_question_form("how many red shapes are there?") == "colour"
    assert count_question_form("how many crosses are there?") == "class"
    assert count_question_form("how many objects are in the image?") == "all"
    assert count_question_form("how many dogs are there?") is None


def test_the_breakdown_scores_each_model_and_the_prior_on_each_count(demo, tmp_path):
    out, world = demo
    run = demo_breakdown(out)
    assert set(run["models"]) == {"answer prior", "always one", "oracle"}
    questions = sum(run["questions"].values())
    assert set(run["questions"]) == {"all", "colour", "class"}
    ones = run["models"]["always one"]
    assert ones["number"]["n"] == questions
    # Scored by hand: "1" against every all-shapes question's ten answers (2 to 5 shapes).
    anns = [a for a in storage.read_json(world.annotations("val"))["annotations"]
            if a["answer_type"] == "number"]
    texts = {q["question_id"]: q["question"] for q in storage.read_json(world.questions("val"))["questions"]}
    all_shapes = [a for a in anns if count_question_form(texts[a["question_id"]]) == "all"]
    expected = 100 * sum(vqa_accuracy("1", [x["answer"] for x in a["answers"]])
                         for a in all_shapes) / len(all_shapes)
    assert ones["all"]["accuracy"] == pytest.approx(expected, abs=0.01)
    assert ones["all"]["n"] == len(all_shapes) == run["questions"]["all"]
    oracle = run["models"]["oracle"]
    assert oracle["number"]["accuracy"] > 90.0 > ones["all"]["accuracy"]
    assert sum(oracle[f"all={n}"]["n"] for n in "2345" if f"all={n}" in oracle) == len(all_shapes)
    # The consensus answer scores 1 on every question (at least six annotators give it).
    assert (oracle["all"]["accuracy"], oracle["all"]["standard_error"]) == (100.0, 0.0)
    p = expected / 100
    assert ones["all"]["standard_error"] == pytest.approx(
        100 * (p * (1 - p) / len(all_shapes)) ** 0.5, abs=0.01)
    # The prior answers one answer per count form, its commonest in training.
    assert run["prior"]["colour"] == "1"

    table = breakdown_table([run])
    assert f"| seed 5 | *questions* | {questions} |" in table
    assert f"| seed 5 | always one | {ones['number']['accuracy']:.2f} |" in table
    draw_all_shapes([run], str(tmp_path / "all.png"))
    assert Image.open(tmp_path / "all.png").size[0] > 400


def test_a_folder_without_vqa_scores_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no finished VQA scoring"):
        demo_breakdown(str(tmp_path))


def test_the_summary_gives_each_familys_range_over_seeds_and_who_sits_at_the_prior():
    def scores(number, all_shapes, colour, cls):
        return {"number": {"accuracy": number}, "all": {"accuracy": all_shapes},
                "colour": {"accuracy": colour}, "class": {"accuracy": cls}}

    run = {"seed": 21, "questions": {"all": 41, "colour": 44, "class": 103},
           "models": {"answer prior": scores(58.0, 28.1, 70.2, 65.3),
                      "member21": scores(65.05, 55.6, 66.4, 65.3),
                      "member22": scores(67.93, 72.0, 70.2, 65.3),
                      "ensemble": scores(67.9, 72.0, 70.2, 65.3),
                      "grid14-seed21": scores(61.17, 41.0, 70.2, 65.3),
                      "grid14-seed22": scores(63.0, 47.5, 70.2, 64.0)}}
    lines = summary_table([run]).splitlines()
    assert lines[0].startswith("| world | number questions: all / colour / class | "
                               "Up-Down: number; all shapes | grid14: number; all shapes |")
    assert lines[2] == ("| seed 21 | 41 / 44 / 103 | 65.0–67.9; 55.6–72.0 | 61.2–63.0; 41.0–47.5 "
                        "| 4 / 4 of 5 |")


def test_bars_of_different_worlds_share_labels_by_seed_relative_to_the_world():
    from ray_updown.demo.number_questions import _bar_label

    assert _bar_label("member22", 21) == "Up-Down, seed S+1"
    assert _bar_label("grid14-seed23", 21) == "grid14, seed S+2"
    assert _bar_label("grid7", 21) == "grid7"


def test_model_names_parse_into_family_and_vqa_seed():
    from ray_updown.demo.number_questions import model_family, model_family_and_seed

    assert model_family_and_seed("member22") == ("Up-Down", 22)
    assert model_family_and_seed("grid14-seed23") == ("grid14", 23)
    assert model_family_and_seed("grid7") == ("grid7", None)
    assert model_family_and_seed("ensemble") == (None, None)
    assert [model_family(n) for n in ("member0", "grid1-seed2", "answer prior")] == \
        ["Up-Down", "grid1", None]


def test_a_results_file_missing_from_a_demo_folder_is_one_line_naming_it(demo, tmp_path):
    from ray_updown.demo.number_questions import main

    out = tmp_path / "demo"
    storage.write_json(str(out / "stages" / "demo_config.json"), {"seed": 5})
    storage.write_json(str(out / "stages" / "vqa_val.json"),
                       {"result": {"gone": {"results_file": str(out / "results" / "gone.json")}}})
    # the world is the fixture's: only the results file is missing
    shutil.copytree(demo[0] + "/world", out / "world")
    with pytest.raises(SystemExit, match=r"number_questions: error: .*gone\.json") as exc:
        main([str(out)])
    assert "Traceback" not in str(exc.value)


def test_a_folder_without_a_demo_config_record_is_a_config_error_naming_the_file(tmp_path):
    from ray_updown.demo.run import load_demo_config
    from ray_updown.errors import ConfigError

    with pytest.raises(ConfigError, match=r"demo_config\.json: not a demo folder"):
        load_demo_config(str(tmp_path))
    storage.write_json(str(tmp_path / "stages" / "demo_config.json"), {"seed": 3, "images": 40})
    cfg = load_demo_config(str(tmp_path))
    assert (cfg.seed, cfg.images, cfg.out) == (3, 40, str(tmp_path))
