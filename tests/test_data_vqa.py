"""VQA v2 loaders, tokenisation, vocabularies, soft scores and VG QA augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from ray_updown import storage
from ray_updown.data.text import PAD_ID, UNK_ID
from ray_updown.data.vqa import (
    AnswerVocab,
    VqaQuestion,
    build_answer_vocab,
    build_question_vocab,
    encode_question,
    load_vg_qa,
    load_vqa,
    soft_score,
    soft_targets,
    tokenize_question,
)
from ray_updown.errors import DataError, StorageError


def _question(qid, image_id, text):
    return {"question_id": qid, "image_id": image_id, "question": text}


def _annotation(qid, image_id, answers, mc=None, atype="other", qtype="what is"):
    return {"question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
            "multiple_choice_answer": mc or answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(answers)]}


def write_vqa(tmp_path, questions, annotations):
    q_uri = str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json")
    a_uri = str(tmp_path / "v2_mscoco_val2014_annotations.json")
    storage.write_json(q_uri, {"task_type": "Open-Ended", "data_type": "mscoco",
                               "data_subtype": "val2014", "questions": questions})
    storage.write_json(a_uri, {"data_subtype": "val2014", "annotations": annotations})
    return q_uri, a_uri


@pytest.fixture()
def vqa_files(tmp_path):
    return write_vqa(tmp_path,
                     [_question(10, 1, "What color is the dog?"),
                      _question(11, 1, "How many dogs are there?")],
                     [_annotation(10, 1, ["Brown"] * 6 + ["tan"] * 4),
                      _annotation(11, 1, ["2"] * 9 + ["two"], atype="number", qtype="how many")])


def test_load_vqa_with_and_without_annotations(vqa_files):
    q_uri, a_uri = vqa_files
    questions = load_vqa(q_uri, a_uri)
    assert [q.question_id for q in questions] == [10, 11]
    q = questions[1]
    assert (q.image_id, q.question, q.answer_type, q.question_type) == (1, "How many dogs are there?",
                                                                         "number", "how many")
    assert len(q.answers) == 10 and q.answers[-1] == "two" and q.multiple_choice_answer == "2"
    bare = load_vqa(q_uri)
    assert bare[0].answers == () and bare[0].question == "What color is the dog?"


def test_question_missing_from_annotations_is_named(tmp_path):
    q_uri, a_uri = write_vqa(tmp_path, [_question(10, 1, "a?"), _question(42, 1, "b?")],
                             [_annotation(10, 1, ["yes"] * 10)])
    with pytest.raises(DataError) as err:
        load_vqa(q_uri, a_uri)
    assert a_uri in str(err.value) and "question_id 42" in str(err.value)
    # The id is named once, as the record (the paths are left out: pytest's folder may hold 42).
    assert str(err.value).replace(a_uri, "").replace(q_uri, "").count("42") == 1


def test_annotation_without_question_is_named(tmp_path):
    q_uri, a_uri = write_vqa(tmp_path, [_question(10, 1, "a?")],
                             [_annotation(10, 1, ["yes"] * 10), _annotation(77, 1, ["no"] * 10)])
    with pytest.raises(DataError) as err:
        load_vqa(q_uri, a_uri)
    assert a_uri in str(err.value) and "annotations[1] (question_id 77)" in str(err.value)
    assert str(err.value).count("77") == 1 and "not in the questions file" in str(err.value)


@pytest.mark.parametrize("mutate, expected", [
    (lambda a: a.__setitem__("answers", a["answers"][:9]), "expected 10 answers, got 9"),
    (lambda a: a.__setitem__("image_id", 2), "image_id 2 differs"),
    (lambda a: a.pop("answer_type"), "missing field 'answer_type'"),
    (lambda a: a["answers"][3].__setitem__("answer", 5), "answers[3]"),
])
def test_bad_annotation_names_question(tmp_path, mutate, expected):
    ann = _annotation(10, 1, ["yes"] * 10)
    mutate(ann)
    q_uri, a_uri = write_vqa(tmp_path, [_question(10, 1, "a?")], [ann])
    with pytest.raises(DataError) as err:
        load_vqa(q_uri, a_uri)
    assert a_uri in str(err.value) and "question_id 10" in str(err.value) and expected in str(err.value)


def test_bad_questions_file(tmp_path):
    q_uri, _ = write_vqa(tmp_path, [_question(10, 1, "a?"), {"question_id": 11, "image_id": "1",
                                                              "question": "b?"}], [])
    with pytest.raises(DataError) as err:
        load_vqa(q_uri)
    assert q_uri in str(err.value) and "questions[1] (question_id 11)" in str(err.value)
    storage.write_text(q_uri, '{"questions": [{"question_id": 1,')
    with pytest.raises(DataError, match="truncated JSON"):
        load_vqa(q_uri)
    with pytest.raises(StorageError):
        load_vqa(str(tmp_path / "missing.json"))


def test_tokenize_question_follows_the_reimplementation():
    assert tokenize_question("What is the man's dog, really?") == \
        ["what", "is", "the", "man", "'s", "dog", "really"]
    assert tokenize_question("  Is  it RED ?") == ["is", "it", "red"]


def test_encode_question_trims_pads_and_maps_unknowns():
    vocab = build_question_vocab([VqaQuestion(1, 1, "is the dog brown?"),
                                  VqaQuestion(2, 1, "is the cat black?")], min_count=2)
    assert vocab.itos[4:] == ["is", "the"]
    ids = encode_question(tokenize_question("Is the bird red?"), vocab, length=6)
    assert ids.dtype == np.int64
    assert ids.tolist() == [PAD_ID, PAD_ID, vocab.stoi["is"], vocab.stoi["the"], UNK_ID, UNK_ID]
    back = encode_question(["is", "the"], vocab, length=4, pad_front=False)
    assert back.tolist() == [vocab.stoi["is"], vocab.stoi["the"], PAD_ID, PAD_ID]
    assert encode_question(["is"] * 20, vocab, length=14).tolist() == [vocab.stoi["is"]] * 14


def test_soft_score_hand_computed():
    # n annotators agree; leaving one of them out leaves n-1 matches (n times), leaving
    # another out leaves n (10-n times): score = (n*min(1,(n-1)/3) + (10-n)*min(1,n/3)) / 10.
    assert soft_score(0) == 0.0
    assert soft_score(1) == pytest.approx((1 * 0 + 9 * (1 / 3)) / 10)   # 0.3
    assert soft_score(2) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert soft_score(3) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)   # 0.9
    assert [round(soft_score(n), 6) for n in range(11)] == [0, 0.3, 0.6, 0.9] + [1.0] * 7
    with pytest.raises(ValueError):
        soft_score(11)


def test_answer_vocab_counts_normalised_answers():
    qs = [VqaQuestion(i, 1, "q?", ("x",) * 10, mc) for i, mc in
          enumerate(["Two", "2", "two.", "yes", "Yes", "the dog", "dog", "cat", "cat"])]
    vocab = build_answer_vocab(qs, min_count=2)
    # "Two", "2", "two." -> "2" (3 questions); then cat, dog, yes with 2 each, alphabetical.
    assert vocab.itos == ["2", "cat", "dog", "yes"]
    assert vocab.index("TWO") == 0 and vocab.index("a Dog") == vocab.stoi["dog"]
    assert vocab.index("horse") is None
    unannotated = [VqaQuestion(1, 1, "q?")]
    with pytest.raises(DataError, match="empty answer vocabulary"):
        build_answer_vocab(unannotated, min_count=1)
    with pytest.raises(DataError, match="empty answer vocabulary"):
        build_answer_vocab(qs, min_count=9)


def test_answer_vocab_round_trip(tmp_path):
    vocab = AnswerVocab(["yes", "no", "2"])
    uri = str(tmp_path / "answers.json")
    vocab.save(uri)
    assert AnswerVocab.load(uri).itos == ["yes", "no", "2"]
    storage.write_json(uri, {"itos": ["yes", "yes"]})
    with pytest.raises(DataError) as err:
        AnswerVocab.load(uri)
    assert uri in str(err.value) and "appears twice" in str(err.value)


def test_soft_targets():
    vocab = AnswerVocab(["yes", "2", "dog"])
    answers = ["2", "two", "Two", "2.", "dog", "the dog", "cat", "cat", "cat", "no"]
    indices, scores = soft_targets(answers, vocab)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    assert indices.tolist() == [1, 2]                 # "2" x4 -> 1.0, "dog" x2 -> 0.6
    assert scores.tolist() == pytest.approx([1.0, 0.6])
    empty_i, empty_s = soft_targets(["cat"] * 10, vocab)
    assert empty_i.shape == (0,) and empty_s.shape == (0,)


def test_load_vg_qa_keeps_in_vocabulary_answers(tmp_path):
    uri = str(tmp_path / "question_answers.json")
    storage.write_json(uri, [
        {"id": 1000001, "qas": [
            {"qa_id": 5, "image_id": 1000001, "question": "How many dogs?", "answer": "Three.",
             "a_objects": [], "q_objects": []},
            {"qa_id": 6, "image_id": 1000001, "question": "What is it?", "answer": "A zebra"}]},
        {"id": 1000002, "qas": [{"qa_id": 7, "image_id": 1000002, "question": "Is it red?",
                                 "answer": "Yes"}]},
        {"id": 2000000, "qas": [{"qa_id": 8, "image_id": 2000000, "question": "Is it?",
                                 "answer": "yes"}]},
    ])
    vocab = AnswerVocab(["yes", "3"])
    qs = load_vg_qa(uri, vocab)
    assert [(q.question_id, q.image_id, q.multiple_choice_answer) for q in qs] == \
        [(5, 1000001, "3"), (7, 1000002, "yes"), (8, 2000000, "yes")]
    assert qs[0].answers == ("3",) * 10 and qs[0].answer_type == "number" and qs[0].source == "vg"
    idx, scores = soft_targets(qs[1].answers, vocab)
    assert idx.tolist() == [0] and scores.tolist() == [1.0]
    mapped = load_vg_qa(uri, vocab, vg_to_coco={1000001: 1, 1000002: 2})
    assert [(q.question_id, q.image_id) for q in mapped] == [(5, 1), (7, 2)]


def test_load_vg_qa_bad_record(tmp_path):
    uri = str(tmp_path / "question_answers.json")
    storage.write_json(uri, [{"id": 3, "qas": [{"qa_id": 9, "question": "q?"}]}])
    with pytest.raises(DataError) as err:
        load_vg_qa(uri, AnswerVocab(["yes"]))
    assert uri in str(err.value) and "(qa_id 9)" in str(err.value) and "'answer'" in str(err.value)
