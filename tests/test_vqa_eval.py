"""The official VQA accuracy: normalisation traps, hand-computed scores, files and bad results."""

from __future__ import annotations

import pytest

from ray_updown import storage
from ray_updown.data.vqa_answers import normalize_answer, process_punctuation
from ray_updown.errors import DataError
from ray_updown.metrics.vqa_eval import evaluate_vqa, vqa_accuracy, write_vqa_results


def _question(qid, image_id, text):
    return {"question_id": qid, "image_id": image_id, "question": text}


def _annotation(qid, image_id, answers, atype, qtype):
    return {"question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": answers[-1],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(answers)]}


def write_vqa(tmp_path, questions, annotations):
    q_uri = str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json")
    a_uri = str(tmp_path / "v2_mscoco_val2014_annotations.json")
    storage.write_json(q_uri, {"questions": questions})
    storage.write_json(a_uri, {"annotations": annotations})
    return q_uri, a_uri


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("none", "0"), ("ten", "10"),
    ("the dog", "dog"), ("A Dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("isnt", "isn't"), ("don't", "don't"),
    ("1,000", "1000"), ("yes.", "yes"), ("Yes", "yes"), ("no!", "no"),
    ("black/white", "black white"), ("red, white", "red white"), ("hot-dog", "hot dog"),
    ("3.5", "3.5"), (" dog\t", "dog"), ("dog\nhouse", "dog house"),
])
def test_normalize_answer_traps(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_punctuation_next_to_space_is_deleted_not_spaced():
    assert process_punctuation("a / b") == "a  b"
    assert process_punctuation("a/b") == "a b"


def test_hand_computed_accuracy():
    # 2 of 10 said "dog": each of those 2 sees 1 other match (1/3), the other 8 see 2 (2/3).
    answers = ["dog"] * 2 + ["cat"] * 8
    assert vqa_accuracy("dog", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("dog", answers) == pytest.approx(0.6)
    assert vqa_accuracy("cat", answers) == pytest.approx(1.0)
    assert vqa_accuracy("horse", answers) == 0.0
    # 3 of 10: 3 annotators see 2 others (2/3), 7 see 3 (1): 0.9.
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)


def test_normalisation_only_when_answers_disagree():
    # All ten identical: the prediction is compared raw (after whitespace stripping).
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    # Disagreeing answers: both sides normalised.
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("yes.", ["yes"] * 9 + ["yeah"]) == 1.0
    assert vqa_accuracy("the dog", ["dog"] * 5 + ["a dog"] * 4 + ["cat"]) == 1.0
    assert vqa_accuracy("dont", ["don't"] * 4 + ["no"] * 6) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 3 + ["100"] * 7) == pytest.approx(0.9)


@pytest.fixture()
def eval_files(tmp_path):
    return write_vqa(tmp_path, [
        _question(1, 5, "Is it a dog?"), _question(2, 5, "How many?"), _question(3, 6, "What?")],
        [_annotation(1, 5, ["yes"] * 10, atype="yes/no", qtype="is it"),
         _annotation(2, 5, ["2"] * 2 + ["3"] * 8, atype="number", qtype="how many"),
         _annotation(3, 6, ["cat"] * 10, atype="other", qtype="what")])


def test_evaluate_vqa_file_and_list(eval_files, tmp_path):
    q_uri, a_uri = eval_files
    results_uri = str(tmp_path / "results.json")
    write_vqa_results(results_uri, [(1, "yes"), (2, "two"), (3, "dog")])
    assert storage.read_json(results_uri)[1] == {"question_id": 2, "answer": "two"}
    acc = evaluate_vqa(q_uri, a_uri, results_uri)
    # per question: 1.0, 0.6 ("two" -> "2", answers disagree), 0.0 -> mean 0.5333...
    assert acc["overall"] == 53.33
    assert acc["perAnswerType"] == {"yes/no": 100.0, "number": 60.0, "other": 0.0}
    assert acc["perQuestionType"] == {"is it": 100.0, "how many": 60.0, "what": 0.0}
    same = evaluate_vqa(q_uri, a_uri, [{"question_id": 3, "answer": "dog"},
                                       {"question_id": 1, "answer": "yes"},
                                       {"question_id": 2, "answer": "two"}])
    assert same == acc
    assert evaluate_vqa(q_uri, a_uri, [(1, "no"), (2, "3"), (3, "cat")])["overall"] == 66.67


def test_result_for_unknown_question_is_rejected(eval_files, tmp_path):
    q_uri, a_uri = eval_files
    results_uri = str(tmp_path / "results.json")
    write_vqa_results(results_uri, [(1, "yes"), (2, "2"), (3, "cat"), (99, "yes")])
    with pytest.raises(DataError) as err:
        evaluate_vqa(q_uri, a_uri, results_uri)
    assert results_uri in str(err.value) and "question_id 99" in str(err.value)
    assert "not in the annotations" in str(err.value)


def test_missing_results_are_rejected(eval_files, tmp_path):
    q_uri, a_uri = eval_files
    results_uri = str(tmp_path / "results.json")
    write_vqa_results(results_uri, [(1, "yes"), (3, "cat")])
    with pytest.raises(DataError) as err:
        evaluate_vqa(q_uri, a_uri, results_uri)
    assert results_uri in str(err.value) and "question_id 2" in str(err.value)
    assert "no answer" in str(err.value)


@pytest.mark.parametrize("rows, expected", [
    ([{"question_id": 1}], "missing field 'answer'"),
    ([{"question_id": "1", "answer": "yes"}], "question_id must be an integer"),
    ([{"question_id": 1, "answer": 3}], "answer must be a string"),
    ([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}], "answered twice"),
    ({"question_id": 1, "answer": "a"}, "JSON list"),
])
def test_malformed_results_file(eval_files, tmp_path, rows, expected):
    q_uri, a_uri = eval_files
    results_uri = str(tmp_path / "results.json")
    storage.write_json(results_uri, rows)
    with pytest.raises(DataError) as err:
        evaluate_vqa(q_uri, a_uri, results_uri)
    assert results_uri in str(err.value) and expected in str(err.value)
    if isinstance(rows, list):
        assert "results[" in str(err.value)


def test_truncated_results_file(eval_files, tmp_path):
    q_uri, a_uri = eval_files
    results_uri = str(tmp_path / "results.json")
    storage.write_text(results_uri, '[{"question_id": 1, "answer": "yes"')
    with pytest.raises(DataError) as err:
        evaluate_vqa(q_uri, a_uri, results_uri)
    assert results_uri in str(err.value) and "truncated JSON" in str(err.value)


def test_write_results_rejects_duplicates(tmp_path):
    uri = str(tmp_path / "r.json")
    with pytest.raises(DataError, match="question_id 4"):
        write_vqa_results(uri, [(4, "a"), (4, "b")])
    assert not storage.exists(uri)
