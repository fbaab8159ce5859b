"""The synthetic world: exact file layout, real formats, determinism, grounded language, S3."""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter

import pytest
import yaml
from PIL import Image

from ray_updown import storage
from ray_updown.config import load_config
from ray_updown.data.world import BACKDROP_COLOURS, WorldConfig, backdrop_colour, build_world
from ray_updown.data.world_render import CLASS_NAMES, COLOURS
from ray_updown.errors import ConfigError

EXPECTED_FILES = [
    "annotations/dataset_coco.json", "annotations/captions_train2014.json",
    "annotations/captions_val2014.json",
    "vqa/v2_OpenEnded_mscoco_train2014_questions.json", "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
    "vqa/v2_mscoco_train2014_annotations.json", "vqa/v2_mscoco_val2014_annotations.json",
    "visual_genome/image_data.json", "visual_genome/objects.json", "visual_genome/attributes.json",
    "visual_genome/question_answers.json", "visual_genome/objects_vocab.txt",
    "visual_genome/attributes_vocab.txt", "glove/glove.synthetic.300d.txt",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    stats = build_world(WorldConfig(num_images=20, seed=3, image_size=96), root)
    return root, stats


def _json(root: str, rel: str):
    with open(os.path.join(root, rel)) as f:
        return json.load(f)


def _alias_map(root: str) -> dict[str, str]:
    out = {}
    for line in open(os.path.join(root, "visual_genome/objects_vocab.txt")).read().splitlines():
        names = line.split(",")
        out.update({n: names[0] for n in names})
    return out


def _classes_by_coco_id(root: str) -> dict[int, list[str]]:
    aliases = _alias_map(root)
    vg = {d["image_id"]: d["coco_id"] for d in _json(root, "visual_genome/image_data.json")}
    return {vg[d["image_id"]]: [aliases[o["names"][0]] for o in d["objects"]]
            for d in _json(root, "visual_genome/objects.json")}


def test_files_exist_with_exact_names_and_stats(world):
    root, stats = world
    for rel in EXPECTED_FILES:
        assert os.path.isfile(os.path.join(root, rel)), rel
    karpathy = _json(root, "annotations/dataset_coco.json")["images"]
    for im in karpathy:
        folder = "train2014" if im["split"] in ("train", "restval") else "val2014"
        assert im["filepath"] == folder
        assert im["filename"] == f"COCO_{folder}_{im['cocoid']:012d}.jpg"
        with Image.open(os.path.join(root, "images", folder, im["filename"])) as img:
            assert img.format == "JPEG" and img.size == (96, 96) and img.mode == "RGB"
    assert sorted(im["cocoid"] for im in karpathy) == list(range(1, 21))
    assert stats["images"] == 20 and stats["captions"] == 100
    assert stats["splits"] == {"train": 15, "restval": 1, "val": 2, "test": 2}
    assert stats["objects"] == sum(stats["classes"].values()) >= 40
    assert stats["questions"] == sum(stats["answer_types"].values()) == 120
    assert set(stats["answer_types"]) == {"yes/no", "number", "other"}
    yes, no = stats["yes_no_answers"]["yes"], stats["yes_no_answers"]["no"]
    assert 0.3 < yes / (yes + no) < 0.7


def test_karpathy_and_coco_caption_formats(world):
    root, _ = world
    data = _json(root, "annotations/dataset_coco.json")
    assert data["dataset"] == "coco"
    for i, im in enumerate(data["images"]):
        assert set(im) == {"cocoid", "filepath", "filename", "split", "imgid", "sentids", "sentences"}
        assert im["imgid"] == i and len(im["sentences"]) >= 5
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert set(s) == {"tokens", "raw", "imgid", "sentid"} and s["imgid"] == i
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
    by_split = {im["cocoid"]: im["split"] for im in data["images"]}
    for subtype, splits in (("train2014", {"train", "restval"}), ("val2014", {"val", "test"})):
        coco = _json(root, f"annotations/captions_{subtype}.json")
        assert set(coco) == {"info", "images", "licenses", "annotations"}
        ids = {im["id"] for im in coco["images"]}
        assert ids == {c for c, s in by_split.items() if s in splits}
        for im in coco["images"]:
            assert im["file_name"] == f"COCO_{subtype}_{im['id']:012d}.jpg"
            assert (im["width"], im["height"]) == (96, 96)
        per_image = Counter(a["image_id"] for a in coco["annotations"])
        assert set(per_image) == ids and min(per_image.values()) >= 5
        assert all(isinstance(a["id"], int) and isinstance(a["caption"], str)
                   for a in coco["annotations"])


def test_vqa_formats_and_annotators(world):
    root, _ = world
    coco_split = {im["cocoid"]: im["filepath"]
                  for im in _json(root, "annotations/dataset_coco.json")["images"]}
    for subtype in ("train2014", "val2014"):
        qs = _json(root, f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json")
        anns = _json(root, f"vqa/v2_mscoco_{subtype}_annotations.json")
        assert qs["task_type"] == "Open-Ended" and qs["data_type"] == "mscoco"
        assert qs["data_subtype"] == anns["data_subtype"] == subtype
        assert {"info", "license"} <= set(qs) and {"info", "license"} <= set(anns)
        assert [q["question_id"] for q in qs["questions"]] == [a["question_id"] for a in anns["annotations"]]
        for q in qs["questions"]:
            assert set(q) == {"image_id", "question", "question_id"}
            assert coco_split[q["image_id"]] == subtype and q["question"].endswith("?")
        for a in anns["annotations"]:
            assert set(a) == {"question_type", "multiple_choice_answer", "answers", "image_id",
                              "answer_type", "question_id"}
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in a["answers"])
            counts = Counter(x["answer"] for x in a["answers"])
            assert counts[a["multiple_choice_answer"]] == max(counts.values())
    # Annotators disagree somewhere, as real ones do.
    anns = _json(root, "vqa/v2_mscoco_train2014_annotations.json")["annotations"]
    assert any(len({x["answer"] for x in a["answers"]}) > 1 for a in anns)


def test_visual_genome_and_vocab_formats(world):
    root, stats = world
    images = _json(root, "visual_genome/image_data.json")
    assert all(set(im) == {"image_id", "url", "width", "height", "coco_id", "flickr_id"} for im in images)
    assert all(im["image_id"] == 1_000_000 + im["coco_id"] for im in images)
    assert all(os.path.isfile(os.path.join(root, im["url"])) for im in images)
    aliases = _alias_map(root)
    assert sorted(set(aliases.values())) == sorted([*CLASS_NAMES, "backdrop"])
    assert aliases["box"] == "square" and aliases["background"] == "backdrop"
    attr_vocab = {n for line in open(os.path.join(root, "visual_genome/attributes_vocab.txt"))
                  for n in line.strip().split(",")}
    objects = _json(root, "visual_genome/objects.json")
    attributes = _json(root, "visual_genome/attributes.json")
    assert sum(len(d["objects"]) for d in objects) == stats["vg_objects"] == stats["objects"] + 20
    for d_obj, d_attr in zip(objects, attributes):
        # the background: the last object of each image, over the whole picture
        *shapes, backdrop = d_attr["attributes"]
        assert backdrop["names"] == ["backdrop"] and [backdrop[k] for k in "xywh"] == [0, 0, 96, 96]
        assert backdrop["attributes"][0] in {"noisy", "gradient", "lined"}
        assert backdrop["attributes"][1] in BACKDROP_COLOURS
        assert all(aliases[o["names"][0]] != "backdrop" for o in shapes)
        assert d_obj["image_id"] == d_attr["image_id"]
        for o, a in zip(d_obj["objects"], d_attr["attributes"]):
            assert o["object_id"] == a["object_id"]
            assert all(isinstance(o[k], int) for k in ("x", "y", "w", "h"))
            assert o["w"] >= 10 and o["h"] >= 10 and o["x"] + o["w"] <= 96 and o["y"] + o["h"] <= 96
            assert o["names"][0] in aliases and o["synsets"][0].count(".") == 2
            assert set(a["attributes"]) <= attr_vocab
            assert a is backdrop or a["attributes"][0] in COLOURS
    qas = _json(root, "visual_genome/question_answers.json")
    assert [d["id"] for d in qas] == [d["image_id"] for d in images]
    for d in qas:
        for qa in d["qas"]:
            assert {"qa_id", "image_id", "question", "answer"} <= set(qa) and qa["image_id"] == d["id"]


def test_glove_layout_and_missing_words(world):
    root, stats = world
    lines = open(os.path.join(root, "glove/glove.synthetic.300d.txt")).read().splitlines()
    vectors = {}
    for line in lines:
        word, *values = line.split(" ")
        assert len(values) == 300
        vectors[word] = [float(v) for v in values]
    assert len(vectors) == stats["glove_words"]
    questions = _json(root, "vqa/v2_OpenEnded_mscoco_train2014_questions.json")["questions"]
    question_words = {w for q in questions for w in re.findall(r"[a-z0-9]+", q["question"])}
    missing = set(stats["glove_missing"])
    assert len(missing) == 3 and not missing & set(vectors)
    assert question_words - missing <= set(vectors)
    assert {"red", "circle", "how", "many"} <= set(vectors)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def files(root):
        return {os.path.relpath(p, root): open(p, "rb").read() for p in storage.list_files(root)}

    cfg = WorldConfig(num_images=4, seed=11, image_size=(104, 88))
    build_world(cfg, str(tmp_path / "a"))
    build_world(cfg, str(tmp_path / "b"))
    build_world(WorldConfig(num_images=4, seed=12, image_size=(104, 88)), str(tmp_path / "c"))
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 4 + len(EXPECTED_FILES) and a == b
    assert a["annotations/dataset_coco.json"] != c["annotations/dataset_coco.json"]
    jpg = next(k for k in a if k.endswith(".jpg"))
    assert Image.open(io.BytesIO(a[jpg])).size == (104, 88)  # (width, height)


def test_captions_name_only_what_is_in_the_image(world):
    root, _ = world
    classes = _classes_by_coco_id(root)
    attrs = {}
    vg_to_coco = {d["image_id"]: d["coco_id"] for d in _json(root, "visual_genome/image_data.json")}
    for d in _json(root, "visual_genome/attributes.json"):
        attrs[vg_to_coco[d["image_id"]]] = {a["attributes"][0] for a in d["attributes"]}
    class_words = {c: c for c in CLASS_NAMES} | {c + ("es" if c.endswith("s") else "s"): c
                                                   for c in CLASS_NAMES}
    for im in _json(root, "annotations/dataset_coco.json")["images"]:
        present = set(classes[im["cocoid"]])
        mentioned_classes = set()
        for s in im["sentences"]:
            named = {class_words[t] for t in s["tokens"] if t in class_words}
            assert named <= present, (s["raw"], present)
            assert {t for t in s["tokens"] if t in COLOURS} <= attrs[im["cocoid"]], s["raw"]
            mentioned_classes |= named
        assert mentioned_classes, im["sentences"]


def test_the_backdrop_annotation_names_what_the_captions_say(world):
    """Captions name the background's texture; its VG annotation carries the same texture."""
    root, stats = world
    vg_to_coco = {d["image_id"]: d["coco_id"] for d in _json(root, "visual_genome/image_data.json")}
    texture = {vg_to_coco[d["image_id"]]: d["attributes"][-1]["attributes"][0]
               for d in _json(root, "visual_genome/attributes.json")}
    phrases = {"noisy": "a noisy background", "gradient": "a gradient background",
               "lined": "a background with thin lines"}
    said = 0
    for im in _json(root, "annotations/dataset_coco.json")["images"]:
        for s in im["sentences"]:
            mentioned = [k for k, p in phrases.items() if p in s["raw"]]
            assert mentioned in ([], [texture[im["cocoid"]]]), (s["raw"], texture[im["cocoid"]])
            said += bool(mentioned)
    assert said > 20
    words = {"noise": "noisy", "gradient": "gradient", "lines": "lined"}
    assert Counter(texture.values()) == Counter({words[k]: n for k, n in stats["backgrounds"].items() if n})


def test_backdrop_colour_names_the_hue():
    assert backdrop_colour((128, 128, 128)) == "grey"
    assert backdrop_colour((140, 110, 110)) == "brown"     # a muted red
    assert backdrop_colour((110, 110, 140)) == "slate"     # a muted blue
    assert backdrop_colour((110, 140, 140)) == "teal"
    assert backdrop_colour((140, 140, 110)) == "khaki"     # a muted yellow
    assert backdrop_colour((110, 140, 110)) == "sage"      # a muted green
    assert backdrop_colour((140, 110, 140)) == "mauve"     # a muted magenta
    assert backdrop_colour((140, 110, 115)) == "brown"     # hue ~0.97 wraps round to red
    assert backdrop_colour((130, 121, 121)) == "grey"      # saturation 0.07 < 0.1


def test_answers_agree_with_the_annotations(world):
    root, _ = world
    classes = _classes_by_coco_id(root)
    colours = {}
    vg_to_coco = {d["image_id"]: d["coco_id"] for d in _json(root, "visual_genome/image_data.json")}
    aliases = _alias_map(root)
    for d in _json(root, "visual_genome/attributes.json"):
        colours[vg_to_coco[d["image_id"]]] = [(a["attributes"][0], aliases[a["names"][0]])
                                              for a in d["attributes"]]
    plural = {c + ("es" if c.endswith("s") else "s"): c for c in CLASS_NAMES}
    checked = Counter()
    for subtype in ("train2014", "val2014"):
        qs = _json(root, f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json")["questions"]
        anns = _json(root, f"vqa/v2_mscoco_{subtype}_annotations.json")["annotations"]
        for q, a in zip(qs, anns):
            answers = Counter(x["answer"] for x in a["answers"])
            image = q["image_id"]
            if m := re.fullmatch(r"how many (\w+) are there\?", q["question"]):
                if m.group(1) in plural:
                    truth = str(classes[image].count(plural[m.group(1)]))
                    assert answers[truth] >= 6 and a["multiple_choice_answer"] == truth
                    checked["count"] += 1
            elif m := re.fullmatch(r"what color is the (\w+)\?", q["question"]):
                truth = [c for c, k in colours[image] if k == m.group(1)]
                assert len(truth) == 1 and a["multiple_choice_answer"] == truth[0]
                checked["colour"] += 1
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q["question"]):
                truth = "yes" if (m.group(1), m.group(2)) in colours[image] else "no"
                assert a["multiple_choice_answer"] == truth
                checked["exists"] += 1
    assert min(checked["count"], checked["colour"], checked["exists"]) >= 3, checked


@pytest.mark.parametrize("overrides, key", [
    (["num_images=0"], "num_images"),
    (["min_objects=4", "max_objects=3"], "min_objects"),
    (["image_size=40"], "image_size"),
    (["image_size=[200, 48]"], "image_size"),
    (["image_size=80", "max_objects=40"], "max_objects"),
])
def test_bad_config_is_a_config_error(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(WorldConfig, None, overrides)
    assert err.value.record == key
    # Built in code, the same config is refused before anything is written.
    cfg = WorldConfig(**{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
    with pytest.raises(ConfigError) as err:
        build_world(cfg, str(tmp_path / "w"))
    assert err.value.record == key
    assert not os.path.exists(tmp_path / "w")


def test_world_on_s3_reads_back(s3_bucket):
    root = s3_bucket + "/world"
    stats = build_world(WorldConfig(num_images=3, seed=5, image_size=96, write_threads=4), root)
    names = {f[len(root) + 1:] for f in storage.list_files(root)}
    assert set(EXPECTED_FILES) <= names and sum(n.endswith(".jpg") for n in names) == 3
    karpathy = storage.read_json(storage.join(root, "annotations/dataset_coco.json"))
    im = karpathy["images"][0]
    data = storage.read_bytes(storage.join(root, "images", im["filepath"], im["filename"]))
    assert Image.open(io.BytesIO(data)).size == (96, 96)
    assert stats["images"] == len(karpathy["images"]) == 3


def test_objects_stay_visible(world):
    """Later boxes (drawn on top) hide at most max_occlusion of any earlier box."""
    root, _ = world
    import numpy as np

    limit = WorldConfig().max_occlusion
    for d in _json(root, "visual_genome/objects.json"):
        objs = d["objects"][:-1]  # the shapes: the backdrop (last) lies behind them all
        for i, o in enumerate(objs):
            mask = np.zeros((o["h"], o["w"]), dtype=bool)
            for p in objs[i + 1:]:
                x1, y1 = max(o["x"], p["x"]), max(o["y"], p["y"])
                x2, y2 = min(o["x"] + o["w"], p["x"] + p["w"]), min(o["y"] + o["h"], p["y"] + p["h"])
                if x2 > x1 and y2 > y1:
                    mask[y1 - o["y"]:y2 - o["y"], x1 - o["x"]:x2 - o["x"]] = True
            assert mask.mean() <= limit + 1e-9


def test_cli_writes_a_world(tmp_path, capsys):
    from ray_updown.cli import main

    assert main(["world", "--out", str(tmp_path / "w"), "--images", "2", "image_size=[120, 100]"]) == 0
    assert '"images": 2' in capsys.readouterr().out
    assert main(["world", "--out", str(tmp_path / "x"), "--images", "0"]) == 2


def test_real_loaders_read_the_world(world):
    """Helper loaders for COCO/Karpathy, VQA v2, Visual Genome and GloVe read it unchanged."""
    from ray_updown.data.coco import build_vocab, load_coco_captions, load_karpathy
    from ray_updown.data.glove import load_glove
    from ray_updown.data.vg import load_class_vocab, load_visual_genome
    from ray_updown.data.vqa import build_answer_vocab, load_vg_qa, load_vqa, tokenize_question

    root, stats = world
    j = lambda rel: storage.join(root, rel)  # noqa: E731
    images = load_karpathy(j("annotations/dataset_coco.json"))
    assert Counter(im.split for im in images) == Counter(stats["splits"])
    assert all(os.path.isfile(j("images/" + im.path)) for im in images)
    vocab = build_vocab(images, min_count=5)
    tokens = [t for im in images if im.split in ("train", "restval") for c in im.tokens for t in c]
    assert sum(t in vocab for t in tokens) / len(tokens) > 0.9   # count>=5 words cover captions
    captions = {**load_coco_captions(j("annotations/captions_train2014.json")),
                **load_coco_captions(j("annotations/captions_val2014.json"))}
    assert captions == {im.image_id: list(im.raw) for im in images}

    questions = []
    for subtype in ("train2014", "val2014"):
        questions += load_vqa(j(f"vqa/v2_OpenEnded_mscoco_{subtype}_questions.json"),
                              j(f"vqa/v2_mscoco_{subtype}_annotations.json"))
    assert len(questions) == stats["questions"]
    answers = build_answer_vocab(questions, min_count=1)
    assert {"yes", "no", "1", "2"} <= set(answers.stoi)
    vg_to_coco = {1_000_000 + im.image_id: im.image_id for im in images}
    vg_qa = load_vg_qa(j("visual_genome/question_answers.json"), answers, vg_to_coco)
    assert vg_qa and all(q.image_id in captions for q in vg_qa)

    classes = load_class_vocab(j("visual_genome/objects_vocab.txt"))
    attributes = load_class_vocab(j("visual_genome/attributes_vocab.txt"))
    assert len(classes) == 10 and classes.index("box") == classes.index("square")
    vg = load_visual_genome(j("visual_genome/image_data.json"), j("visual_genome/objects.json"),
                            j("visual_genome/attributes.json"), classes, attributes, root=root)
    assert sum(len(im.labels) for im in vg) == stats["vg_objects"]
    assert all(im.num_unmapped == 0 and os.path.isfile(im.path) for im in vg)
    colour_ids = {attributes.index(c) for c in COLOURS}
    backdrop = classes.index("backdrop")
    assert all(a[0] in colour_ids for im in vg for a, c in zip(im.attributes, im.labels) if c != backdrop)

    words = sorted({t for q in questions for t in tokenize_question(q.question)})
    matrix, n_missing = load_glove(j("glove/glove.synthetic.300d.txt"), words)
    assert matrix.shape == (len(words), 300)
    assert n_missing == len(set(stats["glove_missing"]) & set(words)) >= 1
