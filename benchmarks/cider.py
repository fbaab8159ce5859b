"""Speed and agreement of our CIDEr-D against pycocoevalcap's, printed as JSON.

5,000 candidates x 5 references of synthetic COCO-like captions (deterministic: fixed seed):
each image has a scene (subjects, action, object, place, attributes); its references and the
candidate are differently worded descriptions of it, with Zipf-distributed word choices so
that n-gram overlaps and document frequencies look like real captions (about 10 words
each, as PTB-tokenised COCO captions).

    python benchmarks/cider.py [--images 5000] [--refs 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

SUBJECTS = ("man woman person boy girl child dog cat horse giraffe elephant zebra bear bird "
            "cow sheep player skier surfer skateboarder couple group train bus truck car "
            "motorcycle bicycle plane boat kite pizza sandwich cake clock").split()
OBJECTS = ("frisbee ball umbrella skateboard surfboard laptop phone book bag tie hat table "
           "bench fence field street road beach water grass snow wave tree building window "
           "kitchen bed couch toilet sink plate bowl banana apple donut vase computer").split()
ADJECTIVES = ("red blue white black green yellow large small young old little big wooden "
              "tall brown orange pink empty busy clean tiled dirty grassy snowy sandy").split()
VERBS = ("sitting standing riding holding eating walking playing flying looking carrying "
         "laying parked driving watching throwing catching using talking crossing waiting").split()
PREPOSITIONS = "on in with at near next to behind under by of".split()
PLACES = ("park street kitchen room field beach road table city sidewalk bathroom yard "
          "counter track water snow grass airport ocean lot").split()
DETERMINERS = ["a", "a", "a", "the", "an", "two", "some", "several"]


def _zipf(rng: random.Random, items: list[str]) -> str:
    # rank-frequency ~ 1/rank like natural language
    weights = [1.0 / (r + 1) for r in range(len(items))]
    return rng.choices(items, weights)[0]


def _describe(rng: random.Random, scene: dict) -> str:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.6:
        words.append(scene["adjective"] if rng.random() < 0.7 else _zipf(rng, ADJECTIVES))
    words.append(scene["subject"] if rng.random() < 0.85 else _zipf(rng, SUBJECTS))
    if rng.random() < 0.8:
        words += ["is"] if rng.random() < 0.3 else []
        words.append(scene["verb"] if rng.random() < 0.75 else _zipf(rng, VERBS))
    words.append(rng.choice(["a", "the"]))
    if rng.random() < 0.35:
        words.append(_zipf(rng, ADJECTIVES))
    words.append(scene["object"] if rng.random() < 0.8 else _zipf(rng, OBJECTS))
    if rng.random() < 0.85:
        words += [_zipf(rng, PREPOSITIONS), rng.choice(["a", "the"]),
                  scene["place"] if rng.random() < 0.8 else _zipf(rng, PLACES)]
    if rng.random() < 0.35:
        words += ["with", rng.choice(["a", "some"]), _zipf(rng, ADJECTIVES), _zipf(rng, OBJECTS)]
    return " ".join(words)


def synthetic_captions(num_images: int, refs_per_image: int, seed: int = 0
                       ) -> tuple[list[str], list[list[str]]]:
    """(candidates, references): one candidate and `refs_per_image` references per image."""
    rng = random.Random(seed)
    candidates, references = [], []
    for _ in range(num_images):
        scene = {"subject": _zipf(rng, SUBJECTS), "object": _zipf(rng, OBJECTS),
                 "verb": _zipf(rng, VERBS), "place": _zipf(rng, PLACES),
                 "adjective": _zipf(rng, ADJECTIVES)}
        references.append([_describe(rng, scene) for _ in range(refs_per_image)])
        candidates.append(_describe(rng, scene))
    return candidates, references


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    from pycocoevalcap.cider.cider import Cider

    from ray_updown.metrics.cider import CiderD, cider_d

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    candidates, references = synthetic_captions(args.images, args.refs)
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}

    # pycocoevalcap is slow and its timing stable: one run
    t_ref, (ref_mean, ref_scores) = _best_time(lambda: Cider().compute_score(gts, res), 1)
    t_ours, (our_mean, our_scores) = _best_time(lambda: cider_d(candidates, references),
                                                args.repeats)
    # SCST-style: df fixed in advance, then score a batch (strings and token ids)
    scorer = CiderD(references, vocabulary=None)
    t_fixed, _ = _best_time(lambda: scorer.score(candidates, references), args.repeats)
    vocab = sorted({w for refs in references for r in refs for w in r.split()}
                   | {w for c in candidates for w in c.split()})
    word_id = {w: i for i, w in enumerate(vocab)}
    id_scorer = CiderD(references, vocabulary=vocab)
    cand_ids = [np.array([word_id[w] for w in c.split()], dtype=np.int64) for c in candidates]
    ref_ids = [[np.array([word_id[w] for w in r.split()], dtype=np.int64) for r in refs]
               for refs in references]
    t_ids, (_, id_scores) = _best_time(lambda: id_scorer.score_ids(cand_ids, ref_ids),
                                       args.repeats)

    words = [len(s.split()) for refs in references for s in refs]
    print(json.dumps({
        "candidates": args.images,
        "references_per_candidate": args.refs,
        "mean_reference_words": round(float(np.mean(words)), 2),
        "pycocoevalcap_cider_seconds": round(t_ref, 4),
        "ours_cider_d_corpus_seconds": round(t_ours, 4),
        "ours_fixed_df_score_seconds": round(t_fixed, 4),
        "ours_fixed_df_score_ids_seconds": round(t_ids, 4),
        "speedup_corpus_mode": round(t_ref / t_ours, 1),
        "speedup_fixed_df_score_ids": round(t_ref / t_ids, 1),
        "pycocoevalcap_mean": float(ref_mean),
        "ours_mean": our_mean,
        "max_abs_diff": float(np.max(np.abs(np.asarray(ref_scores) - our_scores))),
        "max_abs_diff_score_ids": float(np.max(np.abs(np.asarray(ref_scores) - id_scores))),
    }, indent=2))


if __name__ == "__main__":
    main()
