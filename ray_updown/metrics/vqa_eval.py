"""The official VQA accuracy (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).

Per question, with the 10 human answers g_1..g_10 and a prediction p:

    acc(p) = 1/10 * sum_i min(1, #{j != i : g_j == p} / 3)

i.e. the mean over the 10 leave-one-annotator-out subsets of "correct if at least 3 of the other
9 humans gave it". Before matching, tabs and newlines become spaces and both ends are stripped;
then, ONLY when the 10 answers are not all identical, the answers and the prediction are
normalised (`normalize_answer`): punctuation, periods, lowercase, number words, articles,
contractions. So if all ten humans wrote "2", the prediction "two" scores 0, exactly as on the
evaluation server. Overall, per-answer-type and per-question-type numbers are the mean of the
per-question accuracies, times 100, rounded to 2 decimals.

Results files have the server's format: ``[{"question_id": 42, "answer": "yes"}, ...]`` with
exactly one answer for every question of the annotations.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

from ray_updown import storage
from ray_updown.errors import DataError

# The official tool's contraction table, as "without=with" pairs. Lookups happen after
# lowercasing, so the capitalised keys ("Im", "Ive", ...) can never match; kept for fidelity.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Apostrophes and colons are NOT in the official list (contractions survive).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# As written in the official tool: "(?!<=\d)" is a look-ahead (not a look-behind), so this
# removes every period that is not followed by a digit ("yes." -> "yes", "2.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official tool passes re.UNICODE (= 32) where re.sub expects `count`: at most 32 periods
# are removed from one answer. Reproduced so that scores match the server to the last digit.
_PERIOD_COUNT = int(re.UNICODE)


def strip_whitespace(text: str) -> str:
    """Tabs and newlines to spaces, then strip both ends (applied to every answer)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """A punctuation mark next to a space, or anywhere in an answer holding digit,digit
    ("1,000"), is deleted; elsewhere it becomes a space ("black/white" -> "black white").
    Then periods not followed by a digit are deleted."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the original text, the replacement works on the running result.
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase, number words -> digits, drop a/an/the, add apostrophes to contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The full answer normalisation: whitespace, punctuation, digits, articles, contractions.

    Used for the answer vocabulary and soft targets (as the public re-implementation does) and
    by the accuracy whenever the ten human answers disagree.
    """
    return process_digit_article(process_punctuation(strip_whitespace(answer)))


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
    from ray_updown.data.vqa import load_vqa  # data.vqa imports this module for normalisation

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
