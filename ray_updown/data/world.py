"""A synthetic world written in the real formats of COCO/Karpathy, VQA v2, Visual Genome and GloVe.

`build_world(WorldConfig(), "runs/world")` draws `num_images` pictures of coloured, textured
shapes (world_render.py), describes and questions them (world_language.py) and writes, under
the root URI (local path, s3://, gs://)::

    images/train2014/COCO_train2014_{id:012d}.jpg       Karpathy train + restval
    images/val2014/COCO_val2014_{id:012d}.jpg           Karpathy val + test
    annotations/dataset_coco.json                       Karpathy split
    annotations/captions_{train,val}2014.json           official COCO captions
    vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json, vqa/v2_mscoco_{train,val}2014_annotations.json
    visual_genome/{image_data,objects,attributes,question_answers}.json,
    visual_genome/{objects,attributes}_vocab.txt
    glove/glove.synthetic.300d.txt

so the real loaders read it unchanged. Visual Genome annotates each shape and, as the real data
set annotates "stuff", the background: a `backdrop` over the whole picture with its texture
(noisy, gradient, lined) and colour as attributes. Image i has COCO id i + 1 and VG id 1_000_000 + i + 1.
Each image draws from its own random stream (seed, i), so the same seed gives byte-identical
files. Every file is written atomically through `ray_updown.storage`, images from a thread
pool (object stores are slow per request).
"""

from __future__ import annotations

import collections
import colorsys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ray_updown import storage
from ray_updown.config import validate_fields
from ray_updown.data import world_language as lang
from ray_updown.data.world_render import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    SHAPE_CLASSES,
    SIZES,
    TEXTURES,
    Scene,
    encode_jpeg,
    object_pixel_range,
    render_scene,
    sample_scene,
)
from ray_updown.errors import ConfigError

VG_ID_OFFSET = 1_000_000
_DATE = "2017-04-21 00:00:00"  # fixed, so files do not change with the day they were written
_KEEP_IN_GLOVE = {"yes", "no", "is", "are", "there", "a", "an", "the", "what", "how", "many", "to",
                  "of", "on", "in", "any", "left", "right", "color", "shape", "shapes"}
# The background is annotated as the real Visual Genome annotates "stuff" (wall, sky, grass):
# one object over the whole picture, its texture and colour as attributes. The captions name
# the texture; without the annotation the detector never proposes the region that shows it.
BACKDROP_CLASS = ("backdrop", ("background", "wall"), "backdrop.n.01")
BACKDROP_TEXTURES = {"noise": "noisy", "gradient": "gradient", "lines": "lined"}
# Background colours are desaturated mid tones; named by hue sextant from red, grey when
# nearly colourless.
BACKDROP_COLOURS = ("brown", "khaki", "sage", "teal", "slate", "mauve", "grey")
_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0 (synthetic)"}


@dataclass
class WorldConfig:
    """The synthetic world. `image_size` is one side (square) or (width, height)."""

    num_images: int = 1000
    seed: int = 0
    image_size: int | tuple[int, int] = 128
    min_objects: int = 2
    max_objects: int = 5
    min_object_fraction: float = 0.11   # smallest object side / shorter image side (14 px at 128)
    max_object_fraction: float = 0.34
    max_occlusion: float = 0.3          # at most this fraction of a box hidden by later boxes
    captions_per_image: int = 5
    questions_per_image: int = 6
    vg_questions_per_image: int = 3
    restval_fraction: float = 0.05
    val_fraction: float = 0.075
    test_fraction: float = 0.075
    annotator_noise: float = 0.12       # chance that one VQA annotator deviates
    alias_fraction: float = 0.15        # VG object names given as an alias ("box" for square)
    glove_dim: int = 300
    glove_missing_words: int = 3
    jpeg_quality: int = 90
    write_threads: int = 16

    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        if len(self.image_size) != 2:
            raise ConfigError(f"expected one side or (width, height), got {self.image_size!r}",
                              record="image_size")
        return int(self.image_size[0]), int(self.image_size[1])

    def validate(self) -> None:
        def bad(key: str, problem: str) -> ConfigError:
            return ConfigError(problem, record=key)

        validate_fields(self)
        if self.num_images < 1:
            raise bad("num_images", f"must be at least 1, got {self.num_images}")
        if self.min_objects < 1:
            raise bad("min_objects", f"must be at least 1, got {self.min_objects}")
        if self.min_objects > self.max_objects:
            raise bad("min_objects", f"min_objects {self.min_objects} > max_objects {self.max_objects}")
        if not 0 < self.min_object_fraction < self.max_object_fraction <= 1:
            raise bad("min_object_fraction", "need 0 < min_object_fraction < max_object_fraction <= 1")
        width, height = self.size()
        if width < 1 or height < 1:
            raise bad("image_size", f"sides must be positive, got {width}x{height}")
        smallest = object_pixel_range(width, height, self.min_object_fraction,
                                      self.max_object_fraction)[0]
        if smallest < 8:
            raise bad("image_size", f"image {width}x{height} too small for the objects: the smallest "
                                    f"would be {smallest} px (at least 8 px; use >= 73 px sides)")
        if self.max_objects * smallest ** 2 > 0.5 * width * height:
            raise bad("max_objects", f"image {width}x{height} too small for {self.max_objects} objects")
        if not 0 <= self.max_occlusion < 1:
            raise bad("max_occlusion", "must be in [0, 1)")
        fractions = (self.restval_fraction, self.val_fraction, self.test_fraction)
        if min(fractions) < 0 or sum(fractions) >= 1:
            raise bad("val_fraction", "split fractions must be >= 0 and leave room for train")
        for key in ("captions_per_image", "questions_per_image", "glove_dim", "write_threads"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be at least 1, got {getattr(self, key)}")
        if self.vg_questions_per_image < 0 or self.glove_missing_words < 0:
            raise bad("vg_questions_per_image", "counts must be >= 0")
        if not 0 <= self.annotator_noise <= 1 or not 0 <= self.alias_fraction <= 1:
            raise bad("annotator_noise", "probabilities must be in [0, 1]")
        if not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", "must be in [1, 100]")


def assign_splits(cfg: WorldConfig) -> list[str]:
    """Karpathy split per image index: a seeded shuffle cut by the configured fractions."""
    n = cfg.num_images
    counts = {}
    for name, frac in (("val", cfg.val_fraction), ("test", cfg.test_fraction),
                       ("restval", cfg.restval_fraction)):
        counts[name] = max(int(round(n * frac)), 1 if frac > 0 and n >= 8 else 0)
    order = np.random.default_rng([cfg.seed, 2**31 - 1]).permutation(n)
    splits = ["train"] * n
    start = 0
    for name in ("val", "test", "restval"):
        for idx in order[start:start + counts[name]]:
            splits[int(idx)] = name
        start += counts[name]
    return splits


def image_path(coco_id: int, split: str) -> str:
    """Path of an image relative to the world root."""
    folder = "train2014" if split in ("train", "restval") else "val2014"
    return f"images/{folder}/COCO_{folder}_{coco_id:012d}.jpg"


def build_world(cfg: WorldConfig, out_uri: str) -> dict:
    """Write the whole world under `out_uri`; return its statistics."""
    cfg.validate()
    width, height = cfg.size()
    splits = assign_splits(cfg)
    docs = _Documents(cfg, width, height)
    pending: collections.deque[Future] = collections.deque()
    with ThreadPoolExecutor(max_workers=cfg.write_threads) as pool, \
            tqdm(total=cfg.num_images, desc="world images", unit="img", mininterval=0.5) as bar:
        for i in range(cfg.num_images):
            rng = np.random.default_rng([cfg.seed, i])
            scene = sample_scene(rng, width, height, cfg.min_objects, cfg.max_objects,
                                 cfg.min_object_fraction, cfg.max_object_fraction, cfg.max_occlusion)
            jpeg = encode_jpeg(render_scene(scene, rng), cfg.jpeg_quality)
            rel = image_path(i + 1, splits[i])
            pending.append(pool.submit(storage.write_bytes, storage.join(out_uri, rel), jpeg))
            # Language has its own stream: changing caption counts leaves the pictures alone.
            docs.add(i + 1, splits[i], rel, scene, np.random.default_rng([cfg.seed, i, 1]))
            while len(pending) > 4 * cfg.write_threads or (pending and pending[0].done()):
                pending.popleft().result()
                bar.update(1)
        while pending:
            pending.popleft().result()
            bar.update(1)
        files = docs.files()
        for fut in [pool.submit(_write, storage.join(out_uri, name), body)
                    for name, body in files.items()]:
            fut.result()
    return docs.stats(out_uri)


def backdrop_colour(rgb: tuple[int, int, int]) -> str:
    """The attribute naming a background colour (one of BACKDROP_COLOURS)."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    if saturation < 0.1:
        return "grey"
    return BACKDROP_COLOURS[int(hue * 6 + 0.5) % 6]


def _write(uri: str, body: object) -> None:
    if isinstance(body, str):
        storage.write_text(uri, body)
    else:
        storage.write_json(uri, body)


class _Documents:
    """Accumulates every annotation record while images are drawn, then lays out the files."""

    def __init__(self, cfg: WorldConfig, width: int, height: int):
        self.cfg, self.width, self.height = cfg, width, height
        self.karpathy: list[dict] = []
        self.coco = {"train2014": ([], []), "val2014": ([], [])}     # (images, annotations)
        self.vqa = {"train2014": ([], []), "val2014": ([], [])}      # (questions, annotations)
        self.vg_images, self.vg_objects, self.vg_attributes, self.vg_qas = [], [], [], []
        self.words: set[str] = set()
        self.question_words: set[str] = set()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.next_sentid = self.next_object_id = self.next_qa_id = 1
        self.glove_words, self.glove_missing = 0, []

    def add(self, coco_id: int, split: str, rel: str, scene: Scene, rng: np.random.Generator) -> None:
        subtype = rel.split("/")[1]
        filename = rel.rsplit("/", 1)[1]
        self.counts["splits"][split] += 1
        captions = lang.captions_for(scene, rng, self.cfg.captions_per_image)
        sentences = []
        for raw in captions:
            tokens = lang.tokenize(raw)
            self.words.update(tokens)
            sentences.append({"tokens": tokens, "raw": raw, "imgid": len(self.karpathy),
                              "sentid": self.next_sentid})
            self.coco[subtype][1].append({"image_id": coco_id, "id": self.next_sentid, "caption": raw})
            self.next_sentid += 1
        self.karpathy.append({"filepath": subtype, "sentids": [s["sentid"] for s in sentences],
                              "filename": filename, "imgid": len(self.karpathy), "split": split,
                              "sentences": sentences, "cocoid": coco_id})
        self.coco[subtype][0].append({"license": 1, "file_name": filename, "coco_url": rel,
                                      "height": self.height, "width": self.width,
                                      "date_captured": _DATE, "flickr_url": rel, "id": coco_id})
        for k, q in enumerate(lang.questions_for(scene, rng, self.cfg.questions_per_image)):
            qid = coco_id * 1000 + k
            answers, best = lang.annotate(q, rng, self.cfg.annotator_noise)
            self.vqa[subtype][0].append({"image_id": coco_id, "question": q.question, "question_id": qid})
            self.vqa[subtype][1].append({"question_type": q.question_type, "multiple_choice_answer": best,
                                         "answers": answers, "image_id": coco_id,
                                         "answer_type": q.answer_type, "question_id": qid})
            self.question_words.update(lang.tokenize(q.question))
            self.words.update(lang.tokenize(q.question + " " + " ".join(a["answer"] for a in answers)))
            self.counts["answer_types"][q.answer_type] += 1
            if q.answer_type == "yes/no":
                self.counts["yes_no_answers"][q.answer] += 1
        self._add_visual_genome(coco_id, rel, scene, rng)

    def _add_visual_genome(self, coco_id: int, rel: str, scene: Scene, rng: np.random.Generator) -> None:
        vg_id = VG_ID_OFFSET + coco_id
        self.vg_images.append({"image_id": vg_id, "url": rel, "width": self.width,
                               "height": self.height, "coco_id": coco_id, "flickr_id": None})
        objects, attributes = [], []
        for obj in scene.objects:
            name, aliases, synset = next(c for c in SHAPE_CLASSES if c[0] == obj.cls)
            if aliases and rng.random() < self.cfg.alias_fraction:
                name = aliases[rng.integers(len(aliases))]
            attrs = [obj.colour]  # colour first: it is the attribute the detector must get right
            if obj.texture != "plain" or rng.random() < 0.5:
                attrs.append(obj.texture)
            attrs.append("big" if obj.size == "large" and rng.random() < 0.1 else obj.size)
            record = {"object_id": self.next_object_id, "x": obj.x, "y": obj.y, "w": obj.w,
                      "h": obj.h, "names": [name], "synsets": [synset]}
            objects.append({**record, "merged_object_ids": []})
            attributes.append({**record, "attributes": attrs})
            self.next_object_id += 1
            for key, value in (("classes", obj.cls), ("colours", obj.colour),
                               ("textures", obj.texture), ("sizes", obj.size)):
                self.counts[key][value] += 1
        backdrop = {"object_id": self.next_object_id, "x": 0, "y": 0, "w": self.width,
                    "h": self.height, "names": [BACKDROP_CLASS[0]], "synsets": [BACKDROP_CLASS[2]]}
        objects.append({**backdrop, "merged_object_ids": []})
        attributes.append({**backdrop, "attributes": [BACKDROP_TEXTURES[scene.background],
                                                      backdrop_colour(scene.base_colour)]})
        self.next_object_id += 1
        self.counts["backgrounds"][scene.background] += 1
        self.vg_objects.append({"image_id": vg_id, "objects": objects, "image_url": rel})
        self.vg_attributes.append({"image_id": vg_id, "attributes": attributes})
        qas = []
        for q in lang.questions_for(scene, rng, self.cfg.vg_questions_per_image, ("number", "other")):
            question, answer = lang.vg_style(q)
            qas.append({"qa_id": self.next_qa_id, "image_id": vg_id, "question": question,
                        "answer": answer, "q_objects": [], "a_objects": []})
            self.next_qa_id += 1
        self.vg_qas.append({"id": vg_id, "qas": qas})

    def _glove(self) -> tuple[str, list[str]]:
        # Leave out a few question words (never a colour, shape, pattern, number, spatial or
        # function word), as a real GloVe vocabulary misses some words of any data set.
        content = set(COLOURS) | set(CLASS_NAMES) | {lang.plural(c) for c in CLASS_NAMES} \
            | set(TEXTURES) | _KEEP_IN_GLOVE
        candidates = sorted(w for w in self.question_words if w not in content and not w.isdigit())
        rng = np.random.default_rng([self.cfg.seed, 3])
        k = min(self.cfg.glove_missing_words, len(candidates))
        missing = sorted(rng.choice(candidates, size=k, replace=False).tolist()) if k else []
        words = sorted(self.words - set(missing))
        return "\n".join(lang.glove_lines(words, self.cfg.seed, self.cfg.glove_dim)) + "\n", missing

    def files(self) -> dict[str, object]:
        info = {"description": "ray-updown synthetic world", "url": "", "version": "1.0",
                "year": 2017, "contributor": "ray-updown", "date_created": _DATE}
        out: dict[str, object] = {"annotations/dataset_coco.json": {"images": self.karpathy,
                                                                     "dataset": "coco"}}
        for subtype, (images, anns) in self.coco.items():
            out[f"annotations/captions_{subtype}.json"] = {
                "info": info, "images": images, "licenses": [{**_LICENSE, "id": 1}], "annotations": anns}
        for subtype, (questions, anns) in self.vqa.items():
            out[f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json"] = {
                "info": info, "task_type": "Open-Ended", "data_type": "mscoco", "license": _LICENSE,
                "data_subtype": subtype, "questions": questions}
            out[f"vqa/v2_mscoco_{subtype}_annotations.json"] = {
                "info": info, "license": _LICENSE, "data_subtype": subtype, "data_type": "mscoco",
                "annotations": anns}
        out["visual_genome/image_data.json"] = self.vg_images
        out["visual_genome/objects.json"] = self.vg_objects
        out["visual_genome/attributes.json"] = self.vg_attributes
        out["visual_genome/question_answers.json"] = self.vg_qas
        out["visual_genome/objects_vocab.txt"] = "".join(
            ",".join((name, *aliases)) + "\n" for name, aliases, _ in (*SHAPE_CLASSES, BACKDROP_CLASS))
        attr_lines = [*COLOURS, "striped,stripes", "dotted,spotted", "plain", "small", "large,big",
                      "noisy,noise", "gradient", "lined,lines", *BACKDROP_COLOURS]
        out["visual_genome/attributes_vocab.txt"] = "".join(line + "\n" for line in attr_lines)
        glove_text, self.glove_missing = self._glove()
        out["glove/glove.synthetic.300d.txt"] = glove_text
        self.glove_words = glove_text.count("\n")
        return out

    def stats(self, out_uri: str) -> dict:
        n = len(self.karpathy)
        objects = sum(self.counts["classes"].values())
        return {
            "out": out_uri, "images": n, "image_size": [self.width, self.height],
            "captions": self.next_sentid - 1,
            "questions": sum(len(q) for q, _ in self.vqa.values()),
            "objects": objects, "objects_per_image": round(objects / n, 3),
            "vg_objects": objects + n,  # the shapes and one backdrop per image
            "vg_qas": self.next_qa_id - 1,
            "splits": {s: self.counts["splits"][s] for s in ("train", "restval", "val", "test")},
            "vqa_questions": {k: len(q) for k, (q, _) in self.vqa.items()},
            "answer_types": dict(sorted(self.counts["answer_types"].items())),
            "yes_no_answers": dict(sorted(self.counts["yes_no_answers"].items())),
            "classes": {c: self.counts["classes"][c] for c in CLASS_NAMES},
            "colours": {c: self.counts["colours"][c] for c in COLOURS},
            "textures": {t: self.counts["textures"][t] for t in TEXTURES},
            "sizes": {s: self.counts["sizes"][s] for s in SIZES},
            "backgrounds": {b: self.counts["backgrounds"][b] for b in BACKGROUNDS},
            "caption_words": len({w for im in self.karpathy for s in im["sentences"] for w in s["tokens"]}),
            "glove_words": self.glove_words, "glove_missing": self.glove_missing,
        }
