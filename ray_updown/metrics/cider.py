"""CIDEr-D, vectorised with numpy; scores equal pycocoevalcap's to floating-point rounding.

CIDEr (Vedantam, Zitnick & Parikh, CVPR 2015) compares a candidate caption c with the m
reference captions S of its image through TF-IDF weighted n-gram vectors g^n (n = 1..4).
CIDEr-D (defined with the COCO caption evaluation server, Chen et al. 2015, sec. 3.5) is
what pycocoevalcap's `Cider` computes and what papers report as "CIDEr":

    CIDEr-D_n(c, S) = 10/m sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                      * min(g^n(c), g^n(s_j)) . g^n(s_j) / (|g^n(c)| |g^n(s_j)|)
    CIDEr-D(c, S)   = 1/4 sum_{n=1..4} CIDEr-D_n(c, S),      sigma = 6

with the TF-IDF weight g_k = tf_k * (log(D) - log(max(1, df_k))), D the number of reference
sets (images) the document frequencies df come from. Facts of pycocoevalcap reproduced here:
words are whitespace tokens (the caller tokenises; pycocoevalcap is fed PTB-tokenised text);
the length l is the number of bigrams (max(0, words - 1)), not of words; a zero norm leaves
the (then zero) dot product undivided.

Two sources of document frequencies:
- corpus mode (`cider_d`): df and D from the references being scored, as pycocoevalcap does;
- fixed corpus (`CiderD(training_references)`): df and D from e.g. the training references,
  as the self-critical reward r(w^s) of the paper's eq. 10-11 is computed (SCST).

How it is fast: every word gets an integer id; an n-gram's id is derived from its (n-1)-gram
prefix's id and its last word by exact compaction (a sort, no hash collisions), so all
n-grams of all sentences are integer arrays. Sentences are laid out image by image
(candidate, then its references), so one sort per order by (n-gram, sentence) also groups
every candidate entry with the reference entries of the same image; term frequencies, norms,
document frequencies and the clipped dot products are then run-length and bincount ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ray_updown.errors import DataError

_INT64_MAX = np.iinfo(np.int64).max
# Joins all sentences into one string split once; it cannot occur inside a whitespace token
# of a sentence that does not contain it (checked), so its positions give sentence lengths.
_SEPARATOR = "\x00"


@dataclass
class _NgramCounts:
    """Term frequencies of the n-grams of a list of sentences, per order n = 1..n_max.

    keys[n-1]: sorted unique n-gram keys; for n = 1 the word id, for n > 1
      prefix_id * vocab_size + last_word with prefix_id an id of order n-1. The id of an
      n-gram is its index in keys[n-1].
    gram[n-1], sentence[n-1], tf[n-1]: one entry per (n-gram, sentence containing it) with
      its count, sorted by (gram, sentence).
    """

    vocab_size: int
    keys: list[np.ndarray]
    gram: list[np.ndarray]
    sentence: list[np.ndarray]
    tf: list[np.ndarray]


class _WordIds(dict):
    """word -> id; a word not yet seen gets the next id (C-speed lookups for known words)."""

    def __missing__(self, word: str) -> int:
        value = self[word] = len(self)
        return value


def _count_ngrams(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int,
                  n_max: int) -> _NgramCounts:
    sentence_of_token = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    # tokens left in the sentence from each position on (itself included)
    remaining = np.cumsum(lengths)[sentence_of_token] - np.arange(len(tokens), dtype=np.int64)
    counts = _NgramCounts(vocab_size, [], [], [], [])
    num_tokens = len(tokens)
    prefix_ids = np.zeros(0, dtype=np.int64)
    for n in range(1, n_max + 1):
        pos = np.flatnonzero(remaining >= n) if n > 1 else np.arange(num_tokens)
        key = tokens[pos] if n == 1 else prefix_ids[pos] * vocab_size + tokens[pos + n - 1]
        # One sort by (n-gram, position) gives the n-gram ids and, since positions run
        # sentence by sentence, the (n-gram, sentence) entries. Packing position into the
        # key lets a plain sort (faster than argsort plus gathers) do it.
        if len(key) and (int(key.max()) + 1) * max(num_tokens, 1) < _INT64_MAX:
            packed = np.sort(key * num_tokens + pos)
            key, pos = np.divmod(packed, num_tokens)
        else:  # astronomically large corpora: a two-key sort instead
            order = np.lexsort((pos, key))
            key, pos = key[order], pos[order]
        sent = sentence_of_token[pos]
        new_gram = np.ones(len(key), dtype=bool)
        np.not_equal(key[1:], key[:-1], out=new_gram[1:])
        gram_id = np.cumsum(new_gram) - 1
        if n < n_max:
            prefix_ids = np.empty(num_tokens, dtype=np.int64)
            prefix_ids[pos] = gram_id
        new_entry = new_gram.copy()
        new_entry[1:] |= sent[1:] != sent[:-1]
        starts = np.flatnonzero(new_entry)
        counts.keys.append(key[new_gram])
        counts.gram.append(gram_id[starts])
        counts.sentence.append(sent[starts])
        counts.tf.append(np.diff(starts, append=len(key)).astype(np.float64))
    return counts


@dataclass
class _Layout:
    """Sentences image by image: [candidate_0, refs of 0..., candidate_1, refs of 1, ...]
    (no candidates when counting a reference corpus)."""

    image: np.ndarray  # image index of each sentence
    is_candidate: np.ndarray  # bool per sentence
    num_images: int


def _runs(gram: np.ndarray, image: np.ndarray) -> np.ndarray:
    """True at the first entry of each (n-gram, image) run of sorted entries."""
    start = np.ones(len(gram), dtype=bool)
    start[1:] = (gram[1:] != gram[:-1]) | (image[1:] != image[:-1])
    return start


def _document_frequency(counts: _NgramCounts, layout: _Layout) -> list[np.ndarray]:
    """Per order: number of images whose references contain each n-gram (an image counts
    once however many of its references repeat it)."""
    dfs = []
    for keys, gram, sent in zip(counts.keys, counts.gram, counts.sentence):
        is_cand = layout.is_candidate[sent]
        run_start = _runs(gram, layout.image[sent])
        # a run holds at most one candidate entry, always first: the run's first reference
        # entry starts the run or follows the candidate entry
        after_cand = np.zeros(len(gram), dtype=bool)
        after_cand[1:] = is_cand[:-1]
        first_ref = ~is_cand & (run_start | after_cand)
        dfs.append(np.bincount(gram[first_ref], minlength=len(keys)).astype(np.float64))
    return dfs


def _cider_d_scores(counts: _NgramCounts, weights: list[np.ndarray], lengths: np.ndarray,
                    layout: _Layout, sigma: float) -> np.ndarray:
    """Per-image CIDEr-D of each candidate against its references.

    weights[n-1][g] = log(D) - log(max(1, df)) of n-gram g: vectors are tf * weight.
    """
    n_max = len(counts.keys)
    num_sentences = len(lengths)
    norm = np.zeros((num_sentences, n_max))
    dot = np.zeros((num_sentences, n_max))  # rows of reference sentences are filled
    for n in range(n_max):
        gram, sent = counts.gram[n], counts.sentence[n]
        value = counts.tf[n] * weights[n][gram]
        norm[:, n] = np.sqrt(np.bincount(sent, weights=value * value, minlength=num_sentences))
        # each (n-gram, image) run starts with the candidate's entry when it has one
        run_start = _runs(gram, layout.image[sent])
        first = np.maximum.accumulate(np.where(run_start, np.arange(len(gram)), 0))
        is_cand = layout.is_candidate[sent]
        pair = np.flatnonzero(is_cand[first] & ~is_cand)
        ref_value = value[pair]
        # clipping (CIDEr-D): min(g(c), g(s)) . g(s)
        clipped = np.minimum(value[first[pair]], ref_value) * ref_value
        dot[:, n] = np.bincount(sent[pair], weights=clipped, minlength=num_sentences)
    cand = np.flatnonzero(layout.is_candidate)  # sentence of image i's candidate
    refs = np.flatnonzero(~layout.is_candidate)
    ref_image = layout.image[refs]
    denom = norm[cand[ref_image]] * norm[refs]
    # pycocoevalcap leaves the dot product undivided when a norm is zero (it is zero then)
    sim = dot[refs] / np.where(denom != 0, denom, 1.0)
    bigrams = np.maximum(lengths - 1, 0) if n_max >= 2 else np.zeros_like(lengths)
    delta = (bigrams[cand[ref_image]] - bigrams[refs]).astype(np.float64)
    per_ref = sim.sum(axis=1) * np.exp(-(delta ** 2) / (2 * sigma ** 2))
    per_image = np.bincount(ref_image, weights=per_ref, minlength=layout.num_images)
    refs_per_image = np.bincount(ref_image, minlength=layout.num_images)
    return per_image / n_max / refs_per_image * 10.0


def _interleave(candidates: Sequence, references: Sequence[Sequence]) -> tuple[list, _Layout]:
    """Sentences image by image (candidate first) and their layout."""
    sentences: list = []
    for cand, refs in zip(candidates, references):
        sentences.append(cand)
        sentences.extend(refs)
    per_image = np.array([len(r) + 1 for r in references], dtype=np.int64)
    image = np.repeat(np.arange(len(references), dtype=np.int64), per_image)
    is_candidate = np.zeros(len(sentences), dtype=bool)
    is_candidate[np.cumsum(per_image) - per_image] = True
    return sentences, _Layout(image, is_candidate, len(references))


class CiderD:
    """CIDEr-D with document frequencies from a fixed reference corpus.

    `reference_corpus` is one list of reference captions per image (e.g. the training
    references, for the SCST reward of eq. 10-11); df of an n-gram = number of those images
    whose references contain it, D = number of images. `vocabulary` (token id -> word), when
    given, lets `score_ids` take token-id sequences of the same words. A CiderD built with
    `from_token_ids` works on token ids only (the ids are the words).
    """

    def __init__(self, reference_corpus: Sequence[Sequence[str]],
                 vocabulary: Sequence[str] | None = None, n: int = 4, sigma: float = 6.0,
                 *, _ids_are_words: bool = False):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if len(reference_corpus) == 0:
            raise DataError("the reference corpus for document frequencies is empty")
        self.n = n
        self.sigma = float(sigma)
        self._ids_are_words = _ids_are_words
        _check_reference_lists(reference_corpus, None if _ids_are_words else str)
        sentences = [r for refs in reference_corpus for r in refs]
        per_image = np.array([len(r) for r in reference_corpus], dtype=np.int64)
        layout = _Layout(np.repeat(np.arange(len(per_image), dtype=np.int64), per_image),
                         np.zeros(len(sentences), dtype=bool), len(per_image))
        # word id 0 is the separator of _flatten_words, never part of an n-gram
        self._word_index = _WordIds({_SEPARATOR: 0})
        if _ids_are_words:
            tokens, lengths = _flatten_ids(sentences)
            self._vocab_size = int(tokens.max()) + 1 if len(tokens) else 1
        else:
            tokens, lengths = _flatten_words(sentences, self._word_index)
            self._vocab_size = len(self._word_index)
        self.num_documents = len(reference_corpus)
        self.ref_len = float(np.log(float(self.num_documents)))
        # token id -> corpus word id (-1: word absent from the corpus), for score_ids
        self._id_map: np.ndarray | None = None
        if vocabulary is not None:
            if _ids_are_words:
                raise ValueError("a CiderD built from token ids takes no vocabulary")
            self._id_map = np.array([self._word_index.get(w, -1) if w != _SEPARATOR else -1
                                     for w in vocabulary], dtype=np.int64)
        counts = _count_ngrams(tokens, lengths, self._vocab_size, n)
        self._keys = counts.keys
        self._df = _document_frequency(counts, layout)

    @classmethod
    def from_token_ids(cls, reference_corpus: Sequence[Sequence[Sequence[int]]],
                       n: int = 4, sigma: float = 6.0) -> CiderD:
        """Document frequencies from references given as token-id sequences."""
        return cls(reference_corpus, n=n, sigma=sigma, _ids_are_words=True)

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]
              ) -> tuple[float, np.ndarray]:
        """(mean CIDEr-D, per-candidate CIDEr-D) of candidates[i] against references[i]."""
        if self._ids_are_words:
            raise ValueError("this CiderD was built from token ids; use score_ids")
        _check_pairs(candidates, references, str)
        sentences, layout = _interleave(candidates, references)
        # words absent from the corpus get fresh ids >= the corpus vocabulary size
        index = _WordIds(self._word_index)
        tokens, lengths = _flatten_words(sentences, index)
        return self._score(tokens, lengths, len(index), layout)

    def score_ids(self, candidates: Sequence[Sequence[int]],
                  references: Sequence[Sequence[Sequence[int]]]) -> tuple[float, np.ndarray]:
        """`score` on token-id sequences (EOS and padding already stripped by the caller)."""
        _check_pairs(candidates, references, None)
        sentences, layout = _interleave(candidates, references)
        ids, lengths = _flatten_ids(sentences)
        top = int(ids.max()) + 1 if len(ids) else 0
        if self._ids_are_words:
            return self._score(ids, lengths, max(self._vocab_size, top), layout)
        if self._id_map is None:
            raise ValueError("score_ids needs a CiderD built with `vocabulary` or from_token_ids")
        base = self._vocab_size
        known = ids < len(self._id_map)
        mapped = np.where(known, self._id_map[np.where(known, ids, 0)], -1)
        # ids whose word is absent from the corpus still match each other: ids >= base
        words = np.where(mapped >= 0, mapped, base + ids)
        return self._score(words, lengths, base + top, layout)

    def _score(self, tokens: np.ndarray, lengths: np.ndarray, vocab_size: int,
               layout: _Layout) -> tuple[float, np.ndarray]:
        counts = _count_ngrams(tokens, lengths, vocab_size, self.n)
        weights = [self.ref_len - np.log(np.maximum(1.0, df)) for df in self._corpus_df(counts)]
        scores = _cider_d_scores(counts, weights, lengths, layout, self.sigma)
        return float(scores.mean()), scores

    def _corpus_df(self, counts: _NgramCounts) -> list[np.ndarray]:
        """Corpus df of each n-gram of a scoring call: walk the prefix chain into the corpus's
        n-gram tables (an n-gram whose prefix is absent from the corpus is absent too)."""
        v_call, v_corpus = counts.vocab_size, self._vocab_size
        dfs: list[np.ndarray] = []
        corpus_ids = np.zeros(0, dtype=np.int64)
        for n, keys in enumerate(counts.keys, start=1):
            if n == 1:
                query, ok = keys, keys < v_corpus
            else:
                prefix, word = corpus_ids[keys // v_call], keys % v_call
                ok = (prefix >= 0) & (word < v_corpus)
                query = prefix * v_corpus + word
            table = self._keys[n - 1]
            if len(table) == 0:
                corpus_ids = np.full(len(keys), -1, dtype=np.int64)
                dfs.append(np.zeros(len(keys)))
                continue
            at = np.minimum(np.searchsorted(table, query), len(table) - 1)
            found = ok & (table[at] == query)
            corpus_ids = np.where(found, at, -1)
            dfs.append(np.where(found, self._df[n - 1][at], 0.0))
        return dfs


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """Corpus-mode CIDEr-D, equal to pycocoevalcap's `Cider().compute_score`.

    Document frequencies and D come from `references` themselves (one document per
    candidate's reference list), counted in the same pass that scores.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _check_pairs(candidates, references, str)
    sentences, layout = _interleave(candidates, references)
    index = _WordIds({_SEPARATOR: 0})
    tokens, lengths = _flatten_words(sentences, index)
    counts = _count_ngrams(tokens, lengths, len(index), n)
    ref_len = np.log(float(len(references)))
    weights = [ref_len - np.log(np.maximum(1.0, df))
               for df in _document_frequency(counts, layout)]
    scores = _cider_d_scores(counts, weights, lengths, layout, sigma)
    return float(scores.mean()), scores


def _flatten_words(sentences: list[str], index: _WordIds) -> tuple[np.ndarray, np.ndarray]:
    """Whitespace tokens (pycocoevalcap's str.split()) -> word ids, and sentence lengths.

    `index` maps _SEPARATOR to 0. One join and one split for all sentences: much faster
    than splitting each sentence.
    """
    if not sentences:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    joined = f" {_SEPARATOR} ".join(sentences)
    if joined.count(_SEPARATOR) != max(len(sentences) - 1, 0):  # a sentence contains it
        split = [s.split() for s in sentences]
        lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        words = [w for ws in split for w in ws]
        return np.fromiter(map(index.__getitem__, words), dtype=np.int64,
                           count=len(words)), lengths
    words = joined.split()
    ids = np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words))
    separators = np.flatnonzero(ids == 0)
    lengths = np.diff(separators, prepend=-1, append=len(ids)) - 1
    return ids[ids != 0], lengths


def _flatten_ids(sequences: list) -> tuple[np.ndarray, np.ndarray]:
    arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if len(ids) and ids.min() < 0:
        raise DataError("negative token id in a caption")
    return ids, lengths


# ---------------------------------------------------------------------- validation
def _check_reference_lists(references, kind) -> np.ndarray:
    """Refs per image; each image needs a non-empty list (of strings when kind is str)."""
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence | np.ndarray):
            raise DataError("references must be a list of captions", record=f"image {i}")
        if len(refs) == 0:
            raise DataError("has no reference captions", record=f"image {i}")
        if kind is str and not all(isinstance(r, str) for r in refs):
            raise DataError("reference captions must be strings", record=f"image {i}")
    return np.array([len(r) for r in references], dtype=np.int64)


def _check_pairs(candidates, references, kind) -> np.ndarray:
    if len(candidates) != len(references):
        raise DataError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if len(candidates) == 0:
        raise DataError("no candidates to score")
    if kind is str:
        for i, cand in enumerate(candidates):
            if not isinstance(cand, str):
                raise DataError(f"candidate is {type(cand).__name__}, expected str",
                                record=f"candidate {i}")
    return _check_reference_lists(references, kind)
