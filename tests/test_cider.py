"""Our vectorised CIDEr-D against pycocoevalcap's CIDEr-D, computed here directly."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, precook

from ray_updown.errors import DataError
from ray_updown.metrics.cider import CiderD, _count_ngrams, cider_d

WORDS = ("a the an man woman dog cat two on in with of is sitting riding standing red blue "
         "white table street field ball frisbee plate pizza near next to").split()


def _sentence(rng: random.Random, low: int = 0, high: int = 16) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def _random_set(seed: int, images: int, max_refs: int = 5):
    rng = random.Random(seed)
    candidates = [_sentence(rng) for _ in range(images)]
    references = [[_sentence(rng, 1) for _ in range(rng.randint(1, max_refs))]
                  for _ in range(images)]
    return candidates, references


def _pycoco(candidates, references):
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    mean, scores = Cider().compute_score(gts, res)
    return float(mean), np.asarray(scores, dtype=np.float64)


class _FixedDfScorer(CiderScorer):
    """pycocoevalcap's CiderScorer with document frequencies of a given corpus."""

    def __init__(self, corpus):
        super().__init__(n=4, sigma=6.0)
        self._corpus_df = defaultdict(float)
        for refs in corpus:
            for ngram in {g for r in refs for g in precook(r, 4)}:
                self._corpus_df[ngram] += 1

    def compute_doc_freq(self):
        self.document_frequency = defaultdict(float, self._corpus_df)


def _pycoco_fixed_df(corpus, candidates, references):
    """Scores with df from `corpus`. pycocoevalcap takes D = number of scored reference sets,
    so filler pairs bring it to len(corpus); their scores are dropped."""
    assert len(corpus) >= len(candidates)
    scorer = _FixedDfScorer(corpus)
    for cand, refs in zip(candidates, references):
        scorer += (cand, list(refs))
    for _ in range(len(corpus) - len(candidates)):
        scorer += ("filler", ["filler"])
    _, scores = scorer.compute_score()
    return np.asarray(scores[:len(candidates)], dtype=np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_mode_equals_pycocoevalcap_on_random_captions(seed):
    candidates, references = _random_set(seed, images=150)
    expected_mean, expected = _pycoco(candidates, references)
    mean, scores = cider_d(candidates, references)
    assert scores.shape == (150,)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert abs(mean - expected_mean) < 1e-6
    assert expected.max() > 0.5  # the data has real overlaps, not only zeros


def test_corpus_mode_edge_cases_equal_pycocoevalcap():
    candidates = [
        "",                                             # empty candidate
        "a a a a a a dog dog dog",                      # repeated n-grams (clipping)
        "a man riding a horse",                         # one reference
        "a man riding a red horse on a long long beach next to the blue sea at noon",  # longer
        "a cat on a table",                             # identical to its reference
        "zebra giraffe elephant",                       # no word in any reference
        "two dogs\tplay  with a   ball ",               # odd whitespace (str.split semantics)
        "a dog",                                        # one bigram
        "dog",                                          # no bigram: length 0
    ]
    references = [
        ["a man on a horse", "a person riding"],
        ["a dog on a dog bed", "dogs dogs everywhere", "a a dog"],
        ["a man riding a horse on a beach"],
        ["a man on a horse", "a rider"],
        ["a cat on a table", "a cat sitting on a wooden table"],
        ["a dog with a ball", "a ball"],
        ["two dogs play with a ball", " two  dogs playing\nwith a ball"],
        ["a dog", "a dog in the grass", ""],             # an empty reference counts as one
        ["dog", "a dog"],
    ]
    expected_mean, expected = _pycoco(candidates, references)
    mean, scores = cider_d(candidates, references)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert abs(mean - expected_mean) < 1e-6
    assert scores[0] == 0.0 and scores[5] == 0.0
    assert scores[4] > scores[3]


def test_single_image_and_separator_character():
    # one image: D = 1, every idf weight is log(1) - log(1) = 0 -> score 0, as pycocoevalcap
    np.testing.assert_allclose(cider_d(["a dog"], [["a dog"]])[1],
                               _pycoco(["a dog"], [["a dog"]])[1], atol=1e-12)
    # a sentence containing our join separator takes the per-sentence path, same scores
    candidates, references = _random_set(5, images=20)
    candidates[3] = "a\x00b dog on a table"
    references[7][0] = "x\x00 man with a dog"
    np.testing.assert_allclose(cider_d(candidates, references)[1],
                               _pycoco(candidates, references)[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("corpus_images", [60, 97])
def test_fixed_corpus_df_equals_pycocoevalcap_fed_same_df(corpus_images):
    corpus = _random_set(10, images=corpus_images)[1]
    candidates, references = _random_set(11, images=60)
    # words the corpus never saw, in candidates and references
    candidates[0] += " unicorn rides"
    references[0].append("a unicorn rides a dog")
    scorer = CiderD(corpus)
    assert scorer.num_documents == corpus_images
    assert scorer.ref_len == pytest.approx(np.log(corpus_images))
    mean, scores = scorer.score(candidates, references)
    expected = _pycoco_fixed_df(corpus, candidates, references)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert mean == pytest.approx(expected.mean(), abs=1e-6)
    # df from a different corpus gives different scores than corpus mode
    assert np.abs(scores - cider_d(candidates, references)[1]).max() > 1e-3


def test_fixed_corpus_equal_to_scored_refs_is_corpus_mode():
    candidates, references = _random_set(3, images=80)
    fixed = CiderD(references).score(candidates, references)[1]
    np.testing.assert_allclose(fixed, cider_d(candidates, references)[1], rtol=0, atol=1e-12)


def test_score_ids_equals_string_scores():
    corpus = _random_set(20, images=70)[1]
    candidates, references = _random_set(21, images=40)
    candidates[1] = "a kangaroo on a kangaroo"       # in the vocabulary, not in the corpus
    references[1] = ["a kangaroo", "kangaroo on a table"]
    candidates[2] = ""
    vocabulary = ["<pad>", "<eos>"] + sorted(set(WORDS) | {"kangaroo"})
    token = {w: i for i, w in enumerate(vocabulary)}

    def ids(s: str):
        return np.array([token[w] for w in s.split()], dtype=np.int64)

    cand_ids = [ids(c) for c in candidates]
    cand_ids[5] = list(cand_ids[5])                  # lists work as well as arrays
    ref_ids = [[ids(r) for r in refs] for refs in references]
    expected = CiderD(corpus).score(candidates, references)[1]
    by_vocab = CiderD(corpus, vocabulary=vocabulary).score_ids(cand_ids, ref_ids)[1]
    np.testing.assert_allclose(by_vocab, expected, rtol=0, atol=1e-9)
    corpus_ids = [[ids(r) for r in refs] for refs in corpus]
    by_ids = CiderD.from_token_ids(corpus_ids).score_ids(cand_ids, ref_ids)[1]
    np.testing.assert_allclose(by_ids, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(expected, _pycoco_fixed_df(corpus, candidates, references),
                               rtol=0, atol=1e-6)


def test_ngram_counting_with_overflowing_packed_keys_is_the_same():
    tokens = np.array([3, 1, 3, 1, 3, 2, 1, 3, 1, 3], dtype=np.int64)
    lengths = np.array([5, 0, 5], dtype=np.int64)
    small = _count_ngrams(tokens, lengths, 4, 4)
    huge = _count_ngrams(tokens, lengths, 2 ** 55, 4)   # packed sort key would overflow
    for n in range(4):
        np.testing.assert_array_equal(small.gram[n], huge.gram[n])
        np.testing.assert_array_equal(small.sentence[n], huge.sentence[n])
        np.testing.assert_array_equal(small.tf[n], huge.tf[n])
    # "3 1 3 1 3" has the bigram "3 1" twice and the trigram "3 1 3" twice in sentence 0
    assert sorted(small.tf[1][small.sentence[1] == 0]) == [2.0, 2.0]
    assert sorted(small.tf[2][small.sentence[2] == 0]) == [1.0, 2.0]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(DataError, match="2 candidates but 1 reference lists"):
        cider_d(["a", "b"], [["a"]])
    with pytest.raises(DataError, match="image 1: has no reference captions"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(DataError, match="candidate 0: candidate is int"):
        cider_d([3], [["a"]])
    with pytest.raises(DataError, match="image 0: references must be a list"):
        cider_d(["a"], ["a dog"])
    with pytest.raises(DataError, match="no candidates"):
        cider_d([], [])
    with pytest.raises(DataError, match="corpus .* is empty"):
        CiderD([])
    with pytest.raises(DataError, match="negative token id"):
        CiderD.from_token_ids([[[1, 2]]]).score_ids([[1, -1]], [[[1, 2]]])
    with pytest.raises(ValueError, match="vocabulary"):
        CiderD([["a dog"]]).score_ids([[1]], [[[1]]])
    with pytest.raises(ValueError, match="use score_ids"):
        CiderD.from_token_ids([[[1, 2]]]).score(["a"], [["a"]])


def test_the_scst_reward_on_token_ids_equals_the_string_path():
    """CiderReward scores the decoder's token ids directly; references hold words outside the
    vocabulary (and a validation word of no training reference), candidates hold <unk>, EOS
    and padding: every score equals the string path's."""
    import torch

    from ray_updown.captioning.objectives import CiderReward
    from ray_updown.data.text import SPECIALS, Vocab

    rng = np.random.default_rng(0)
    known = [f"w{i}" for i in range(12)]
    rare = ["zebra", "kite", "surf"]  # in references, never in the vocabulary
    vocab = Vocab(list(SPECIALS) + known)

    def caption():
        return " ".join(rng.choice(known + rare, rng.integers(3, 9)))

    corpus = [[caption() for _ in range(5)] for _ in range(30)]
    reward = CiderReward(corpus, vocab)
    references = [corpus[i % 30] for i in range(40)]
    references[3] = references[3][:4] + ["w1 w2 unseen w3"]
    tokens = torch.randint(len(SPECIALS), len(vocab), (40, 10))
    tokens[0, 2] = vocab.unk_id
    tokens[1, 5:] = vocab.pad_id
    tokens[2, 4] = vocab.eos_id
    by_ids, by_strings = reward(tokens, references), reward.score_strings(tokens, references)
    assert by_ids.shape == (40,) and by_strings.max() > 0
    np.testing.assert_allclose(by_ids, by_strings, rtol=0, atol=1e-12)
