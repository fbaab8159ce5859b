"""VQA v2 in its real format, question/answer vocabularies and soft targets (paper 3.3).

v2_OpenEnded_mscoco_{split}_questions.json::

    {"questions": [{"question_id": 458752000, "image_id": 458752, "question": "What is ...?"}],
     "info": ..., "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014"}

v2_mscoco_{split}_annotations.json::

    {"annotations": [{"question_id": 458752000, "image_id": 458752, "question_type": "what is",
      "answer_type": "other", "multiple_choice_answer": "net",
      "answers": [{"answer": "net", "answer_confidence": "maybe", "answer_id": 1}, ... x10]}]}

Visual Genome question_answers.json (augmentation)::

    [{"id": 1, "qas": [{"qa_id": 986768, "image_id": 1, "question": "What color is the clock?",
      "answer": "Green.", "a_objects": [], "q_objects": []}]}]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Iterable, Mapping, Sequence

import numpy as np

from ray_updown import storage
from ray_updown.data.text import PAD_ID, UNK_ID, ListFile, Vocab, field, records, vocab_from_counts
from ray_updown.data.vqa_answers import normalize_answer
from ray_updown.errors import DataError

__all__ = ["VqaQuestion", "AnswerVocab", "load_vqa", "tokenize_question", "encode_question",
           "build_question_vocab", "build_answer_vocab", "soft_score", "soft_targets",
           "load_vg_qa", "normalize_answer", "NUM_ANNOTATORS", "QUESTION_LEN", "ANSWER_TYPES"]

NUM_ANNOTATORS = 10
QUESTION_LEN = 14
ANSWER_TYPES = ("yes/no", "number", "other")  # the annotations' answer_type values


@dataclass(frozen=True)
class VqaQuestion:
    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] = ()          # the 10 human answers; () without annotations
    multiple_choice_answer: str = ""       # the most common human answer
    answer_type: str = ""                  # "yes/no" | "number" | "other"
    question_type: str = ""                # e.g. "what color is the"
    source: str = "vqa"                    # "vqa" | "vg" (Visual Genome augmentation)


def load_vqa(questions_uri: str, annotations_uri: str | None = None) -> list[VqaQuestion]:
    """Questions (and, when given, their 10 answers each), in question-file order.

    A question without an annotation, an annotation without a question, a duplicate id, an
    image_id that differs between the two files or a count of answers other than 10 is a
    DataError naming the file and `question_id N`.
    """
    qrows = records(storage.read_json(questions_uri), "questions", questions_uri)
    questions: dict[int, tuple[int, str]] = {}
    for i, row in enumerate(qrows):
        rec = f"questions[{i}]"
        qid = field(row, "question_id", int, questions_uri, rec)
        rec = f"questions[{i}] (question_id {qid})"
        image_id = field(row, "image_id", int, questions_uri, rec)
        text = field(row, "question", str, questions_uri, rec)
        if qid in questions:
            raise DataError("duplicate question_id", file=questions_uri, record=rec)
        questions[qid] = (image_id, text)
    if annotations_uri is None:
        return [VqaQuestion(qid, image_id, text) for qid, (image_id, text) in questions.items()]

    arows = records(storage.read_json(annotations_uri), "annotations", annotations_uri)
    annotated: dict[int, VqaQuestion] = {}
    for i, row in enumerate(arows):
        rec = f"annotations[{i}]"
        qid = field(row, "question_id", int, annotations_uri, rec)
        rec = f"annotations[{i}] (question_id {qid})"
        image_id = field(row, "image_id", int, annotations_uri, rec)
        if qid not in questions:
            raise DataError(f"not in the questions file {questions_uri}",
                            file=annotations_uri, record=rec)
        if qid in annotated:
            raise DataError("duplicate question_id", file=annotations_uri, record=rec)
        if image_id != questions[qid][0]:
            raise DataError(f"image_id {image_id} differs from the questions file's "
                            f"{questions[qid][0]}", file=annotations_uri, record=rec)
        answers = field(row, "answers", list, annotations_uri, rec)
        if len(answers) != NUM_ANNOTATORS:
            raise DataError(f"expected {NUM_ANNOTATORS} answers, got {len(answers)}",
                            file=annotations_uri, record=rec)
        texts = tuple(field(a, "answer", str, annotations_uri, f"{rec} answers[{j}]")
                      for j, a in enumerate(answers))
        annotated[qid] = VqaQuestion(
            qid, image_id, questions[qid][1], texts,
            field(row, "multiple_choice_answer", str, annotations_uri, rec),
            field(row, "answer_type", str, annotations_uri, rec),
            field(row, "question_type", str, annotations_uri, rec))
    for qid in questions:
        if qid not in annotated:
            raise DataError(f"has no annotation (the question is in {questions_uri})",
                            file=annotations_uri, record=f"question_id {qid}")
    return [annotated[qid] for qid in questions]


def tokenize_question(question: str) -> list[str]:
    """Lowercase; drop ',' and '?'; split "'s" off as its own token; split on whitespace.

    These are the rules of the public re-implementation (hengyuan-hu/bottom-up-attention-vqa,
    Dictionary.tokenize), whose vocabulary and GloVe rows our models follow.
    """
    text = question.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.split()


def encode_question(tokens: Sequence[str], vocab: Vocab, length: int = QUESTION_LEN,
                    pad_front: bool = True) -> np.ndarray:
    """int64 [length]: the first `length` token ids, padded with PAD (0) to `length`.

    Unknown words map to UNK. Padding goes in front by default, as in the re-implementation;
    the model reads only the non-pad tokens, so either side works.
    """
    ids = [vocab.stoi.get(t, UNK_ID) for t in tokens[:length]]
    pad = [PAD_ID] * (length - len(ids))
    return np.asarray(pad + ids if pad_front else ids + pad, dtype=np.int64)


def build_question_vocab(questions: Iterable[VqaQuestion], min_count: int = 1) -> Vocab:
    """Words of `tokenize_question` over the questions with count >= min_count."""
    counts: Counter = Counter()
    for q in questions:
        counts.update(tokenize_question(q.question))
    return vocab_from_counts(counts, min_count, "the questions")


@dataclass
class AnswerVocab(ListFile):
    """Candidate answers (normalised strings) <-> output indices of the VQA classifier."""

    KIND, WHAT = "answer_vocab", "answer vocabulary"

    itos: list[str]
    stoi: dict[str, int] = dc_field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.itos:
            raise DataError("empty answer vocabulary")
        self.stoi = {}
        for i, answer in enumerate(self.itos):
            if not isinstance(answer, str):
                raise DataError(f"answer {i} is not a string: {answer!r}")
            if answer in self.stoi:
                raise DataError(f"answer '{answer}' appears twice (indices {self.stoi[answer]} and {i})")
            self.stoi[answer] = i

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, answer: str) -> bool:
        return normalize_answer(answer) in self.stoi

    def index(self, answer: str) -> int | None:
        """Index of an answer after normalisation, or None if it is not a candidate."""
        return self.stoi.get(normalize_answer(answer))


def build_answer_vocab(questions: Iterable[VqaQuestion], min_count: int = 9) -> AnswerVocab:
    """Normalised `multiple_choice_answer`s given for at least `min_count` questions
    (3,129 candidates on VQA v2 train+val with 9), by decreasing count, ties alphabetical."""
    counts: Counter = Counter()
    n_annotated = 0
    for q in questions:
        if q.answers:
            n_annotated += 1
            counts[normalize_answer(q.multiple_choice_answer)] += 1
    answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not answers:
        raise DataError(f"empty answer vocabulary: no answer is given for at least {min_count} "
                        f"of {n_annotated} annotated questions")
    return AnswerVocab(answers)


def soft_score(n_matches: int, n_annotators: int = NUM_ANNOTATORS) -> float:
    """Soft score of an answer given by `n_matches` of the annotators (paper 3.3).

    The mean over the `n_annotators` leave-one-out subsets of min(1, matches / 3): leaving out
    one of the n who gave the answer leaves n - 1 matches, leaving out another annotator n.
    For 10 annotators: 0, 0.3, 0.6, 0.9, 1 for n = 0, 1, 2, 3, >= 4.
    """
    if not 0 <= n_matches <= n_annotators:
        raise ValueError(f"n_matches must be in [0, {n_annotators}], got {n_matches}")
    total = (n_matches * min(1.0, (n_matches - 1) / 3.0)
             + (n_annotators - n_matches) * min(1.0, n_matches / 3.0))
    return total / n_annotators


def soft_targets(answers: Sequence[str], answer_vocab: AnswerVocab) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, scores float32) of the candidate answers among the human answers.

    Answers are normalised before counting; answers outside the vocabulary get no target.
    Indices are sorted ascending. The binary cross-entropy target is zero elsewhere.
    """
    counts = Counter(normalize_answer(a) for a in answers)
    pairs = sorted((answer_vocab.stoi[a], soft_score(n, len(answers)))
                   for a, n in counts.items() if a in answer_vocab.stoi)
    indices = np.asarray([i for i, _ in pairs], dtype=np.int64)
    scores = np.asarray([s for _, s in pairs], dtype=np.float32)
    return indices, scores


def _answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() else "other"


def load_vg_qa(question_answers_uri: str, answer_vocab: AnswerVocab,
               vg_to_coco: Mapping[int, int] | None = None) -> list[VqaQuestion]:
    """Visual Genome QA pairs whose normalised answer is a candidate answer (paper 3.3).

    A VG pair has one answer; it becomes 10 identical (normalised) answers, so its soft target
    is 1. With `vg_to_coco`, image ids become COCO ids and images without one are skipped
    (their features are keyed by COCO id). source = "vg", question_type = "vg", and the
    answer_type is inferred (yes/no, number, other).
    """
    uri = question_answers_uri
    out: list[VqaQuestion] = []
    for i, entry in enumerate(records(storage.read_json(uri), None, uri)):
        rec = f"[{i}]"
        vg_image = field(entry, "id", int, uri, rec) if isinstance(entry, dict) and "id" in entry \
            else field(entry, "image_id", int, uri, rec)
        rec = f"[{i}] (image {vg_image})"
        qas = field(entry, "qas", list, uri, rec)
        if vg_to_coco is not None and vg_image not in vg_to_coco:
            continue
        image_id = vg_to_coco[vg_image] if vg_to_coco is not None else vg_image
        for j, qa in enumerate(qas):
            qrec = f"{rec} qas[{j}]"
            qa_id = field(qa, "qa_id", int, uri, qrec)
            qrec = f"{rec} qas[{j}] (qa_id {qa_id})"
            question = field(qa, "question", str, uri, qrec)
            answer = normalize_answer(field(qa, "answer", str, uri, qrec))
            if answer not in answer_vocab.stoi:
                continue
            out.append(VqaQuestion(qa_id, image_id, question, (answer,) * NUM_ANNOTATORS, answer,
                                   _answer_type(answer), "vg", source="vg"))
    return out
