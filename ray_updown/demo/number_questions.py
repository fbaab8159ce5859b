"""Where the demo's number target is decided: VQA accuracy on number questions by what they count.

    python -m ray_updown.demo.number_questions runs/demo-seed0 runs/demo-seed21 … \
        --png docs/demo_number_questions.png

The world asks three counts (data/world_language.py): of *all* the shapes ("how many shapes are
there?", 2-5), of the shapes of one *colour*, and of the shapes of one *class* (sometimes a
class that is absent). For each finished demo folder this scores every VQA results file of its
`vqa_val` stage (each grid, each ensemble member, the ensemble) on each count, beside the
answer prior (the commonest training answer of each count). A model that scores its prior on a
count does not count there; the number target is decided where the models differ.

Every model runs with the demo's VQA seeds (`vqa_seeds`, 3 by default): each grid, and Up-Down
as the ensemble's first members, so both sides of the number target have a seed spread.

Prints a Markdown table (one row per world and model) and a JSON summary; `--png` draws the
accuracy on the questions that count all the shapes, per model and world.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter

from ray_updown import storage
from ray_updown.data.world_language import count_question_form
from ray_updown.demo.run import load_demo_config
from ray_updown.demo.stages import (
    STAGES_DIR,
    StageBook,
    WorldFiles,
)
from ray_updown.errors import RayUpdownError
from ray_updown.metrics.vqa_eval import vqa_accuracy

FORMS = ("all", "colour", "class")


def number_questions(world: WorldFiles, split: str) -> list[dict]:
    """The split's number questions: id, count form, the 10 answers and the consensus answer."""
    texts = {q["question_id"]: q["question"]
             for q in storage.read_json(world.questions(split))["questions"]}
    out = []
    for ann in storage.read_json(world.annotations(split))["annotations"]:
        if ann["answer_type"] != "number":
            continue
        form = count_question_form(texts[ann["question_id"]])
        out.append({"question_id": ann["question_id"], "form": form,
                    "answers": [a["answer"] for a in ann["answers"]],
                    "answer": ann["multiple_choice_answer"]})
    return out


def answer_prior(world: WorldFiles) -> dict[str, str]:
    """The commonest training answer of each count form."""
    counts: dict[str, Counter] = {}
    for q in number_questions(world, "train"):
        counts.setdefault(q["form"], Counter())[q["answer"]] += 1
    return {form: c.most_common(1)[0][0] for form, c in counts.items()}


def accuracy_by_form(questions: list[dict], answer_of) -> dict[str, dict]:
    """Official accuracy (x100) per count form, on all number questions ("number"), and on the
    all-shapes questions per true count ("all=N"); each with its question count and, for the
    all-shapes questions, the binomial standard error of its accuracy."""
    groups: dict[str, list[float]] = {}
    for q in questions:
        score = vqa_accuracy(answer_of(q), q["answers"])
        for key in ("number", q["form"], *([f"all={q['answer']}"] if q["form"] == "all" else [])):
            groups.setdefault(key, []).append(score)
    out = {}
    for key, scores in groups.items():
        p = sum(scores) / len(scores)
        out[key] = {"n": len(scores), "accuracy": round(100 * p, 2)}
        if key == "all":
            out[key]["standard_error"] = round(100 * math.sqrt(p * (1 - p) / len(scores)), 2)
    return out


def demo_breakdown(demo: str) -> dict:
    """{"demo", "seed", "questions", "prior", "models"} of a finished demo folder: per model
    of its `vqa_val` stage and for the answer prior, the accuracy by count form
    (`accuracy_by_form`)."""
    book = StageBook(demo)
    if not storage.exists(book.record_uri("vqa_val")):
        raise SystemExit(f"{demo}: no finished VQA scoring here (no {STAGES_DIR}/vqa_val.json)")
    seed = load_demo_config(demo).seed
    world = WorldFiles(storage.join(demo, "world"))
    questions = number_questions(world, "val")
    prior = answer_prior(world)
    models = {"answer prior": accuracy_by_form(questions, lambda q: prior.get(q["form"], ""))}
    results = {name: scored["results_file"]
               for name, scored in storage.read_json(book.record_uri("vqa_val"))["result"].items()}
    for name, results_file in results.items():
        answers = {r["question_id"]: r["answer"] for r in storage.read_json(results_file)}
        models[name] = accuracy_by_form(questions, lambda q: answers.get(q["question_id"], ""))
    return {"demo": demo, "seed": seed, "prior": prior,
            "questions": dict(Counter(q["form"] for q in questions)), "models": models}


def breakdown_table(runs: list[dict]) -> str:
    """Markdown: a row per world and model; number accuracy overall and per count form."""
    lines = ["| world | model | number | all shapes (± s.e.) | one colour | one class |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        n = run["questions"]
        lines.append(f"| seed {run['seed']} | *questions* | {sum(n.values())} | "
                     + " | ".join(str(n.get(f, 0)) for f in FORMS) + " |")
        for name, acc in run["models"].items():
            all_shapes = acc.get("all", {"accuracy": 0.0, "standard_error": 0.0})
            cells = [f"{acc['number']['accuracy']:.2f}",
                     f"{all_shapes['accuracy']:.1f} ± {all_shapes['standard_error']:.1f}",
                     *(f"{acc[f]['accuracy']:.1f}" if f in acc else "–" for f in FORMS[1:])]
            lines.append(f"| seed {run['seed']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_family_and_seed(name: str) -> tuple[str | None, int | None]:
    """A demo model's name parsed: ("Up-Down", s) for ensemble member "member<s>",
    ("grid<g>", s) for "grid<g>-seed<s>", ("grid<g>", None) for a bare "grid<g>" (a demo
    folder whose grids ran once, at the world's seed), (None, None) for the ensemble and the
    prior."""
    if name.startswith("member"):
        return "Up-Down", int(name[len("member"):])
    if name.startswith("grid"):
        grid, _, seed = name.partition("-seed")
        return grid, int(seed) if seed else None
    return None, None


def model_family(name: str) -> str | None:
    """"Up-Down" for an ensemble member, "grid<g>" for a grid at any seed; None for the
    ensemble and the prior."""
    return model_family_and_seed(name)[0]


def summary_table(runs: list[dict]) -> str:
    """Markdown, a row per world: each family's number and all-shapes accuracy (the range over
    its seeds), and how many of the world's models score exactly the answer prior on the
    one-colour and one-class counts (they answer its commonest answer there)."""
    families = list(dict.fromkeys(f for run in runs for f in map(model_family, run["models"]) if f))
    lines = ["| world | number questions: all / colour / class | "
             + " | ".join(f"{f}: number; all shapes" for f in families)
             + " | models at the prior on colour / class counts |",
             "|---|---|" + "---|" * len(families) + "---|"]
    for run in runs:
        models = {n: m for n, m in run["models"].items() if n != "answer prior"}
        cells = []
        for family in families:
            members = [m for n, m in models.items() if model_family(n) == family]
            cells.append(f"{_span([m['number']['accuracy'] for m in members])}; "
                         f"{_span([m['all']['accuracy'] for m in members if 'all' in m])}")
        prior = run["models"]["answer prior"]
        at_prior = [sum(m.get(f, {}).get("accuracy") == prior.get(f, {}).get("accuracy")
                        for m in models.values()) for f in FORMS[1:]]
        n = run["questions"]
        lines.append(f"| seed {run['seed']} | " + " / ".join(str(n.get(f, 0)) for f in FORMS)
                     + " | " + " | ".join(cells)
                     + f" | {at_prior[0]} / {at_prior[1]} of {len(models)} |")
    return "\n".join(lines)


def _span(values: list[float]) -> str:
    if not values:
        return "–"
    low, high = min(values), max(values)
    return f"{low:.1f}" if low == high else f"{low:.1f}–{high:.1f}"


def _bar_label(name: str, world_seed: int) -> str:
    """A model's name with its VQA seed relative to the world's (the demo's VQA seeds start at
    the world's seed), so that bars of different worlds share labels: "Up-Down, seed S+1"."""
    family, seed = model_family_and_seed(name)
    return name if seed is None else f"{family}, seed S+{seed - world_seed}"


def draw_all_shapes(runs: list[dict], uri: str) -> None:
    """Accuracy on the questions that count all the shapes, per world and model."""
    from ray_updown.viz.plots import plot_bars

    groups = {f"seed {run['seed']}": {_bar_label(name, run["seed"]): acc.get("all", {}).get("accuracy", 0.0)
                                      for name, acc in run["models"].items()} for run in runs}
    plot_bars(groups, '"how many shapes are there?": accuracy per model and world',
              "VQA accuracy", uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demos", nargs="+", help="finished demo folders")
    parser.add_argument("--png", default="", help="write the all-shapes picture here")
    args = parser.parse_args(argv)
    try:
        runs = [demo_breakdown(d) for d in args.demos]
    except RayUpdownError as exc:  # a missing or malformed file of a demo folder: one line
        raise SystemExit(f"number_questions: error: {exc}") from None
    print(breakdown_table(runs))
    print()
    print(summary_table(runs))
    if args.png:
        draw_all_shapes(runs, args.png)
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
