"""The synthetic world's language: captions, VQA questions with 10 annotators, VG-style QA, GloVe.

Everything said is grounded in a `Scene`: captions name the classes, colours, textures, sizes,
counts and left/right/above/below/in-front-of relations of the objects actually drawn, so a
model that attends to object regions can say more than one that sees a coarse grid. Question
generators return a canonical answer; `annotate` turns it into 10 human-like answers with the
kinds of disagreement the real VQA v2 annotators show.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ray_updown.data.world_render import CLASS_NAMES, COLOURS, TEXTURES, Scene, WorldObject, overlap_fraction

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve")
_BACKGROUND_PHRASES = {"noise": "a noisy background", "gradient": "a gradient background",
                       "lines": "a background with thin lines"}
SEPARATION = 0.15  # centre distance (fraction of the image side) that makes left/right clear


def number_word(n: int) -> str:
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def plural(cls: str) -> str:
    return cls + "es" if cls.endswith(("s", "x", "ch", "sh")) else cls + "s"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens, punctuation dropped (the Karpathy `tokens` field)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def noun_phrase(obj: WorldObject, rng: np.random.Generator, size_p: float = 0.3,
                texture: bool = True) -> str:
    words = []
    if rng.random() < size_p:
        words.append(obj.size)
    words.append(obj.colour)
    if texture and obj.texture != "plain":
        words.append(obj.texture)
    words.append(obj.cls)
    return f"{article(words[0])} {' '.join(words)}"


def relation(a: WorldObject, b: WorldObject, scene: Scene) -> str | None:
    """Where `a` is relative to `b`, when clear; image y grows downwards."""
    dx, dy = (b.cx - a.cx) / scene.width, (b.cy - a.cy) / scene.height
    if abs(dx) >= max(abs(dy), SEPARATION):
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) >= SEPARATION:
        return "above" if dy > 0 else "below"
    return None


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _counted(counts: Counter, noun: Callable[[str], str], noun_plural: Callable[[str], str]) -> str:
    parts = []
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        parts.append(f"{article(noun(key))} {noun(key)}" if n == 1 else f"{number_word(n)} {noun_plural(key)}")
    return _join(parts)


# ---- captions -------------------------------------------------------------------------------

def _cap_listing(scene: Scene, rng: np.random.Generator) -> str | None:
    objs = sorted(scene.objects, key=lambda o: o.cx)  # left to right, as people read a picture
    text = _join([noun_phrase(o, rng) for o in objs])
    return text + (f" on {_BACKGROUND_PHRASES[scene.background]}" if rng.random() < 0.5 else "")


def _cap_counts(scene: Scene, rng: np.random.Generator) -> str | None:
    text = _counted(Counter(o.cls for o in scene.objects), str, plural)
    return f"{text} on {_BACKGROUND_PHRASES[scene.background]}"


def _cap_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects
             if a is not b and relation(a, b, scene)]
    if not pairs:
        return None
    a, b = pairs[rng.integers(len(pairs))]
    return f"{noun_phrase(a, rng)} {relation(a, b, scene)} {noun_phrase(b, rng)}"


def _cap_colours(scene: Scene, rng: np.random.Generator) -> str | None:
    text = _counted(Counter(o.colour for o in scene.objects), lambda c: f"{c} shape",
                    lambda c: f"{c} shapes")
    return f"{text} on {_BACKGROUND_PHRASES[scene.background]}"


def _cap_largest(scene: Scene, rng: np.random.Generator) -> str | None:
    by_area = sorted(scene.objects, key=lambda o: -o.area)
    if len(by_area) < 2 or by_area[0].area < 1.5 * by_area[1].area:
        return None
    big = by_area[0]
    n = len(scene.objects)
    return f"a large {big.colour} {big.cls} and {number_word(n - 1)} smaller " \
           f"{'shape' if n == 2 else 'shapes'}"


def _cap_overview(scene: Scene, rng: np.random.Generator) -> str | None:
    obj = scene.objects[rng.integers(len(scene.objects))]
    n = len(scene.objects)
    return f"{number_word(n)} shapes including {noun_phrase(obj, rng, size_p=0.0)} " \
           f"on {_BACKGROUND_PHRASES[scene.background]}"


def _cap_front(scene: Scene, rng: np.random.Generator) -> str | None:
    pairs = [(above, below) for i, below in enumerate(scene.objects)
             for above in scene.objects[i + 1:] if overlap_fraction(below, above) >= 0.05]
    if not pairs:
        return None
    above, below = pairs[rng.integers(len(pairs))]
    return f"{noun_phrase(above, rng, size_p=0.0)} in front of {noun_phrase(below, rng, size_p=0.0)}"


CAPTION_TEMPLATES = (_cap_listing, _cap_counts, _cap_relation, _cap_colours, _cap_largest,
                     _cap_overview, _cap_front)


def captions_for(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """`count` different captions (raw text, COCO style: capitalised, full stop)."""
    out: list[str] = []
    for _round in range(4):
        for k in rng.permutation(len(CAPTION_TEMPLATES)):
            text = CAPTION_TEMPLATES[k](scene, rng)
            if text and text not in out:
                out.append(text)
            if len(out) == count:
                return [t[0].upper() + t[1:] + "." for t in out]
    while len(out) < count:  # very small scenes: repeat with fresh random wording
        out.append(_cap_listing(scene, rng) or "some shapes")
    return [t[0].upper() + t[1:] + "." for t in out[:count]]


# ---- questions -------------------------------------------------------------------------------

@dataclass
class Question:
    question: str
    question_type: str
    answer_type: str  # "yes/no", "number" or "other"
    answer: str


def _unique(scene: Scene, key: Callable[[WorldObject], str]) -> list[WorldObject]:
    counts = Counter(key(o) for o in scene.objects)
    return [o for o in scene.objects if counts[key(o)] == 1]


def _pick(rng: np.random.Generator, items: list):
    return items[rng.integers(len(items))] if items else None


def _q_exists(scene: Scene, rng: np.random.Generator) -> Question | None:
    present = {(o.colour, o.cls) for o in scene.objects}
    obj = _pick(rng, scene.objects)
    if rng.random() < 0.5:
        colour, cls, answer = obj.colour, obj.cls, "yes"
    else:  # a near miss: right class with an absent colour, or right colour with an absent class
        if rng.random() < 0.5:
            options = [(c, obj.cls) for c in COLOURS if (c, obj.cls) not in present]
        else:
            options = [(obj.colour, k) for k in CLASS_NAMES if (obj.colour, k) not in present]
        if not options:
            return None
        colour, cls = _pick(rng, options)
        answer = "no"
    return Question(f"is there {article(colour)} {colour} {cls}?", "is there a", "yes/no", answer)


def _q_are_there(scene: Scene, rng: np.random.Generator) -> Question | None:
    present = sorted({o.cls for o in scene.objects})
    absent = [c for c in CLASS_NAMES if c not in present]
    want_yes = rng.random() < 0.5 or not absent
    cls = _pick(rng, present if want_yes else absent)
    return Question(f"are there any {plural(cls)}?", "are there", "yes/no",
                    "yes" if want_yes else "no")


def _q_left_of(scene: Scene, rng: np.random.Generator) -> Question | None:
    unique = _unique(scene, lambda o: o.cls)
    pairs = [(a, b) for a in unique for b in unique
             if a is not b and abs(a.cx - b.cx) >= SEPARATION * scene.width]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    return Question(f"is the {a.cls} to the left of the {b.cls}?", "is the", "yes/no",
                    "yes" if a.cx < b.cx else "no")


COUNT_ALL_QUESTIONS = ("how many shapes are there?", "how many shapes are in the picture?",
                       "how many objects are in the image?")


def _count_class_question(cls: str) -> str:
    return f"how many {plural(cls)} are there?"


def _count_colour_question(colour: str) -> str:
    return f"how many {colour} shapes are there?"


def count_question_form(text: str) -> str | None:
    """What a number question of the world counts: "all" the shapes, the shapes of one
    "colour", or those of one "class" (the three count questions below); None for another."""
    if text in COUNT_ALL_QUESTIONS:
        return "all"
    if text in {_count_colour_question(c) for c in COLOURS}:
        return "colour"
    if text in {_count_class_question(c) for c in CLASS_NAMES}:
        return "class"
    return None


def _q_count_class(scene: Scene, rng: np.random.Generator) -> Question | None:
    cls = (_pick(rng, scene.objects).cls if rng.random() < 0.85
           else CLASS_NAMES[rng.integers(len(CLASS_NAMES))])
    n = sum(o.cls == cls for o in scene.objects)
    return Question(_count_class_question(cls), "how many", "number", str(n))


def _q_count_colour(scene: Scene, rng: np.random.Generator) -> Question | None:
    colour = _pick(rng, scene.objects).colour
    n = sum(o.colour == colour for o in scene.objects)
    return Question(_count_colour_question(colour), "how many", "number", str(n))


def _q_count_all(scene: Scene, rng: np.random.Generator) -> Question | None:
    text = _pick(rng, list(COUNT_ALL_QUESTIONS))
    return Question(text, "how many", "number", str(len(scene.objects)))


def _q_colour_of(scene: Scene, rng: np.random.Generator) -> Question | None:
    obj = _pick(rng, _unique(scene, lambda o: o.cls))
    if obj is None:
        return None
    return Question(f"what color is the {obj.cls}?", "what color is the", "other", obj.colour)


def _q_shape_of(scene: Scene, rng: np.random.Generator) -> Question | None:
    obj = _pick(rng, _unique(scene, lambda o: o.colour))
    if obj is None:
        return None
    return Question(f"what shape is the {obj.colour} object?", "what shape is the", "other", obj.cls)


def _q_pattern_of(scene: Scene, rng: np.random.Generator) -> Question | None:
    obj = _pick(rng, _unique(scene, lambda o: o.cls))
    if obj is None:
        return None
    return Question(f"what pattern is on the {obj.cls}?", "what", "other", obj.texture)


def _q_colour_leftmost(scene: Scene, rng: np.random.Generator) -> Question | None:
    objs = sorted(scene.objects, key=lambda o: o.cx)
    if rng.random() < 0.5:
        objs, side = objs[::-1], "right"
    else:
        side = "left"
    if len(objs) < 2 or abs(objs[0].cx - objs[1].cx) < 0.1 * scene.width:
        return None
    return Question(f"what color is the shape on the {side}?", "what color is the", "other",
                    objs[0].colour)


QUESTION_GENERATORS: dict[str, tuple[Callable[[Scene, np.random.Generator], Question | None], ...]] = {
    "yes/no": (_q_exists, _q_exists, _q_are_there, _q_left_of),
    "number": (_q_count_class, _q_count_class, _q_count_colour, _q_count_all),
    "other": (_q_colour_of, _q_colour_of, _q_shape_of, _q_pattern_of, _q_colour_leftmost),
}
# Per image: two yes/no, one number, two other, then weighted draws (about VQA v2's mix).
_TYPE_PLAN = ("yes/no", "number", "other", "yes/no", "other")
_TYPE_WEIGHTS = {"yes/no": 0.38, "number": 0.2, "other": 0.42}


def questions_for(scene: Scene, rng: np.random.Generator, count: int,
                  types: tuple[str, ...] = ("yes/no", "number", "other")) -> list[Question]:
    """Up to `count` different questions about a scene (fewer only for tiny scenes)."""
    out: list[Question] = []
    seen: set[str] = set()
    weights = np.array([_TYPE_WEIGHTS[t] for t in types])
    for k in range(count * 6):
        if len(out) == count:
            break
        plan = [t for t in _TYPE_PLAN if t in types]
        atype = plan[k] if k < len(plan) else types[rng.choice(len(types), p=weights / weights.sum())]
        gens = QUESTION_GENERATORS[atype]
        q = gens[rng.integers(len(gens))](scene, rng)
        if q is not None and q.question not in seen:
            seen.add(q.question)
            out.append(q)
    return out


# ---- annotators ------------------------------------------------------------------------------

_SURFACE_VARIANTS = {
    "yes": ("Yes", "yes."), "no": ("No", "no."),
    "red": ("dark red", "Red"), "green": ("dark green", "Green"), "blue": ("dark blue", "light blue"),
    "yellow": ("gold", "Yellow"), "purple": ("violet", "Purple"), "orange": ("Orange", "dark orange"),
    "white": ("off white", "White"), "black": ("gray", "grey", "Black"),
    "square": ("box", "Square"), "diamond": ("rhombus",), "cross": ("plus", "plus sign"),
    "ring": ("donut", "circle"), "circle": ("round", "Circle"), "star": ("stars", "Star"),
    "hexagon": ("octagon", "Hexagon"), "triangle": ("triangles", "Triangle"),
    "striped": ("stripes", "lines"), "dotted": ("polka dots", "dots"), "plain": ("solid", "none"),
}


def _variant(answer: str, rng: np.random.Generator) -> str:
    if answer.isdigit():
        return _pick(rng, [number_word(int(answer)), answer + "."])
    return _pick(rng, list(_SURFACE_VARIANTS.get(answer, (answer.capitalize(),))))


def _wrong(q: Question, rng: np.random.Generator) -> str:
    if q.answer_type == "yes/no":
        return "no" if q.answer == "yes" else "yes"
    if q.answer_type == "number":
        n = int(q.answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    for pool in (list(COLOURS), list(CLASS_NAMES), list(TEXTURES)):
        if q.answer in pool:
            return _pick(rng, [a for a in pool if a != q.answer])
    return "yes"


def annotate(q: Question, rng: np.random.Generator, noise: float) -> tuple[list[dict], str]:
    """10 answers ({answer, answer_confidence, answer_id}) and the most common answer.

    At most 4 annotators deviate (a surface variant like "two" for "2" or "grey" for a dark
    shape, or a real mistake such as an off-by-one count), so the canonical answer always wins.
    """
    n_off = min(int(rng.binomial(10, noise)), 4)
    off = set(rng.choice(10, size=n_off, replace=False).tolist()) if n_off else set()
    answers = []
    for i in range(10):
        if i not in off:
            text, conf = q.answer, ("yes" if rng.random() < 0.9 else "maybe")
        elif rng.random() < 0.6:
            text, conf = _variant(q.answer, rng), ("yes" if rng.random() < 0.6 else "maybe")
        else:
            text, conf = _wrong(q, rng), ("maybe" if rng.random() < 0.7 else "no")
        answers.append({"answer": text, "answer_confidence": conf, "answer_id": i + 1})
    counts = Counter(a["answer"] for a in answers)
    best = max(counts.values())
    most_common = next(a["answer"] for a in answers if counts[a["answer"]] == best)
    return answers, most_common


def vg_style(q: Question) -> tuple[str, str]:
    """Visual Genome's QA style: capitalised question, answer as a short sentence."""
    answer = number_word(int(q.answer)) if q.answer.isdigit() else q.answer
    return q.question[0].upper() + q.question[1:], answer.capitalize() + "."


# ---- GloVe -----------------------------------------------------------------------------------

_WORD_GROUPS = {"colour": set(COLOURS), "shape": set(CLASS_NAMES) | {plural(c) for c in CLASS_NAMES},
                "number": set(_NUMBER_WORDS) | {str(i) for i in range(13)},
                "texture": set(TEXTURES) | {"stripes", "dots", "pattern"},
                "space": {"left", "right", "above", "below", "front"}}


def glove_lines(words: list[str], seed: int, dim: int = 300) -> list[str]:
    """GloVe text lines "word v1 ... vD": a per-word random vector plus a shared direction for
    the word's group (colours near colours, shapes near shapes), deterministic in (word, seed)."""
    group_dirs = {g: np.random.default_rng([seed, 7, k]).normal(0, 0.35, dim)
                  for k, g in enumerate(sorted(_WORD_GROUPS))}
    lines = []
    for word in words:
        vec = np.random.default_rng([seed, zlib.crc32(word.encode("utf-8"))]).normal(0, 0.25, dim)
        for g, members in _WORD_GROUPS.items():
            if word in members:
                vec = vec + group_dirs[g]
        lines.append(word + " " + " ".join(f"{v:.5f}" for v in vec))
    return lines
