"""The official VQA accuracy (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).

Per question, with the 10 human answers g_1..g_10 and a prediction p:

    acc(p) = 1/10 * sum_i min(1, #{j != i : g_j == p} / 3)

i.e. the mean over the 10 leave-one-annotator-out subsets of "correct if at least 3 of the other
9 humans gave it". Before matching, tabs and newlines become spaces and both ends are stripped;
then, ONLY when the 10 answers are not all identical, the answers and the prediction are
normalised (`normalize_answer` in `ray_updown.data.vqa_answers`): punctuation, periods,
lowercase, number words, articles, contractions. So if all ten humans wrote "2", the prediction
"two" scores 0, exactly as on the evaluation server. Overall, per-answer-type and
per-question-type numbers are the mean of the per-question accuracies, times 100, rounded to 2
decimals.

Results files have the server's format: ``[{"question_id": 42, "answer": "yes"}, ...]`` with
exactly one answer for every question of the annotations.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from ray_updown import storage
from ray_updown.data.vqa import load_vqa
from ray_updown.data.vqa_answers import process_digit_article, process_punctuation, strip_whitespace
from ray_updown.errors import DataError


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official accuracy of one prediction in [0, 1] (see the module docstring)."""
    gts = [strip_whitespace(a) for a in gt_answers]
    pred = strip_whitespace(prediction)
    if not gts:
        raise DataError("no ground-truth answers to score against")
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    hits = [g == pred for g in gts]
    total = sum(hits)
    # Leaving annotator i out removes their own vote from the match count.
    return sum(min(1.0, (total - hit) / 3.0) for hit in hits) / len(gts)


def _rounded(values: list[float], digits: int) -> float:
    return round(100 * float(sum(values)) / len(values), digits)


def evaluate_predictions(questions: Sequence[Any], predictions: Mapping[int, str],
                         digits: int = 2, results_name: str = "<results>",
                         annotations_name: str = "<annotations>") -> dict:
    """Accuracy of `predictions` {question_id: answer} on annotated `VqaQuestion`s.

    Every question needs exactly one prediction and every prediction a question, as on the
    server; otherwise a DataError names the first offending question id.
    """
    by_id = {q.question_id: q for q in questions}
    extra = sorted(set(predictions) - set(by_id))
    if extra:
        raise DataError(f"question_id {extra[0]} is not in the annotations {annotations_name}"
                        f" ({len(extra)} such ids)", file=results_name,
                        record=f"question_id {extra[0]}")
    missing = sorted(set(by_id) - set(predictions))
    if missing:
        raise DataError(f"no answer for question_id {missing[0]} ({len(missing)} of "
                        f"{len(by_id)} questions unanswered)", file=results_name,
                        record=f"question_id {missing[0]}")
    if not by_id:
        raise DataError("no questions to evaluate", file=annotations_name)
    overall: list[float] = []
    per_answer_type: dict[str, list[float]] = defaultdict(list)
    per_question_type: dict[str, list[float]] = defaultdict(list)
    for qid, q in by_id.items():
        if not q.answers:
            raise DataError("question has no annotated answers", file=annotations_name,
                            record=f"question_id {qid}")
        acc = vqa_accuracy(predictions[qid], q.answers)
        overall.append(acc)
        per_answer_type[q.answer_type].append(acc)
        per_question_type[q.question_type].append(acc)
    return {"overall": _rounded(overall, digits),
            "perAnswerType": {k: _rounded(v, digits) for k, v in per_answer_type.items()},
            "perQuestionType": {k: _rounded(v, digits) for k, v in per_question_type.items()}}


def _parse_results(results: str | Iterable[Any]) -> tuple[dict[int, str], str]:
    """A results file URI, or a list of {"question_id", "answer"} dicts or (id, answer) pairs."""
    if isinstance(results, str):
        name = results
        rows = storage.read_json(results)
        if not isinstance(rows, list):
            raise DataError(f"results must be a JSON list of objects, got {type(rows).__name__}",
                            file=name)
    else:
        name, rows = "<results>", list(results)
    out: dict[int, str] = {}
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            qid, answer = row.get("question_id"), row.get("answer")
            if "question_id" not in row or "answer" not in row:
                missing = "question_id" if "question_id" not in row else "answer"
                raise DataError(f"missing field '{missing}'", file=name, record=f"results[{i}]")
        elif isinstance(row, (tuple, list)) and len(row) == 2:
            qid, answer = row
        else:
            raise DataError(f"expected {{'question_id', 'answer'}} or a pair, got {row!r:.60}",
                            file=name, record=f"results[{i}]")
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise DataError(f"question_id must be an integer, got {qid!r:.40}", file=name,
                            record=f"results[{i}]")
        if not isinstance(answer, str):
            raise DataError(f"answer must be a string, got {type(answer).__name__}", file=name,
                            record=f"results[{i}] (question_id {qid})")
        if qid in out:
            raise DataError("question_id answered twice", file=name,
                            record=f"results[{i}] (question_id {qid})")
        out[qid] = answer
    return out, name


def evaluate_vqa(questions_uri: str, annotations_uri: str,
                 results_uri_or_list: str | Iterable[Any], digits: int = 2) -> dict:
    """Official accuracy of a results file (or list) against VQA questions + annotations.

    Returns {"overall": 63.2, "perAnswerType": {"yes/no": ...}, "perQuestionType": {...}}.
    """
    questions = load_vqa(questions_uri, annotations_uri)
    predictions, name = _parse_results(results_uri_or_list)
    return evaluate_predictions(questions, predictions, digits, results_name=name,
                                annotations_name=annotations_uri)


def write_vqa_results(uri: str, answers: Iterable[tuple[int, str]]) -> None:
    """Write [{"question_id", "answer"}] for the evaluation server (atomically)."""
    rows, seen = [], set()
    for i, (qid, answer) in enumerate(answers):
        qid = int(qid)
        if not isinstance(answer, str):
            raise DataError(f"answer must be a string, got {type(answer).__name__}",
                            file=uri, record=f"question_id {qid}")
        if qid in seen:
            raise DataError("question_id answered twice", file=uri, record=f"question_id {qid}")
        seen.add(qid)
        rows.append({"question_id": qid, "answer": answer})
    storage.write_json(uri, rows)
