"""The demo report's pictures, from the world's JPEGs, the feature stores and the trained
models: the detector's regions (the paper's Figure 2, viz/regions.py) and the attention of the
captioners and the VQA models (Figures 5-7, viz/attention.py). Each function writes its PNGs
into `figures` and returns, per picture, its title, what it shows and its path under `prefix`.
"""

from __future__ import annotations

import io

import numpy as np

from ray_updown import storage
from ray_updown.data.vqa import ANSWER_TYPES

ZOOM = 2  # the world's 128-px images drawn at 256 px, so the word labels stay readable


def _image(uri: str) -> np.ndarray:
    """An image's pixels, enlarged ZOOM times."""
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        im = im.convert("RGB")
        return np.asarray(im.resize((im.width * ZOOM, im.height * ZOOM), Image.BILINEAR))


def caption_attention_pictures(world, state: dict, figures: str, prefix: str,
                               count: int | None = None) -> list[dict]:
    """Figure 5/7 style: each generated word's attention (beam search, `return_attention`),
    for the SCST captioner on regions and on the grid, on the same test images."""
    from ray_updown.captioning.predict import load_captioner, predict_with_attention
    from ray_updown.data.coco import images_in_split, load_karpathy
    from ray_updown.viz.attention import caption_attention_figure, save_png

    count = count or int(state["config"]["attention_examples"])
    ids = [im.image_id for im in images_in_split(load_karpathy(world.karpathy), "test")][:count]
    paths = world.image_paths()
    out = []
    for feat, run in state["captioning"].items():
        loaded = load_captioner(run["scst"]["checkpoint"])
        predictions = predict_with_attention(loaded.model, state["stores"][feat], ids,
                                             loaded.vocab, beam_size=5,
                                             max_regions=loaded.max_regions)
        for image_id in ids:
            p = predictions[image_id]
            words = p.words or ["<empty>"]
            attention = p.attention[:max(1, len(p.words))]
            picture = caption_attention_figure(_image(paths[image_id]), p.boxes * ZOOM, words,
                                               attention, columns=6)
            name = f"caption_attention_{feat}_{image_id}.png"
            save_png(picture, storage.join(figures, name))
            out.append({"title": f"{run['label']} (SCST), test image {image_id}",
                        "caption": p.caption, "path": f"{prefix}/{name}"})
    return out


FIGURE2_EXAMPLES = 3  # test images drawn with their regions
FIGURE2_REGIONS = 6  # the world has 2-5 objects an image; the rest are lower-ranked duplicates


def region_pictures(world, state: dict, figures: str, prefix: str,
                    count: int = FIGURE2_EXAMPLES) -> list[dict]:
    """Figure 2 style: the top regions of the region store on a few test images, each labelled
    "attribute object" with its confidences (viz/regions.py). Nothing when the run has no
    region store."""
    from ray_updown.data.coco import images_in_split, load_karpathy
    from ray_updown.viz.attention import save_png
    from ray_updown.viz.regions import regions_picture

    store = state["stores"].get("regions")
    if not store:
        return []
    ids = [im.image_id for im in images_in_split(load_karpathy(world.karpathy), "test")][:count]
    paths = world.image_paths()
    out = []
    for image_id in ids:
        # The store's own vocabularies come first; the detector is the fallback for a store
        # extracted before they were recorded.
        picture = regions_picture(store, image_id, image=paths[image_id], top=FIGURE2_REGIONS,
                                  detector=state["detector"].get("detector"), zoom=ZOOM)
        name = f"regions_{image_id}.png"
        save_png(picture.image, storage.join(figures, name))
        out.append({"title": f"Test image {image_id}", "labels": [r["label"] for r in picture.regions],
                    "path": f"{prefix}/{name}"})
    return out


def vqa_attention_pictures(world, state: dict, figures: str, prefix: str) -> list[dict]:
    """Figure 6 style: the attention of VqaModel.forward(..., return_attention=True) for one
    val question of each answer type, Up-Down (first ensemble member) and the largest grid (its
    first seed, as the member's)."""
    from ray_updown.data.vqa import load_vqa
    from ray_updown.features.reader import FeatureStore
    from ray_updown.viz.attention import save_png, vqa_attention_figure
    from ray_updown.vqa.data import questions_dataset
    from ray_updown.vqa.ensemble import load_vqa_checkpoint

    questions = load_vqa(world.questions("val"), world.annotations("val"))
    chosen = []
    for answer_type in ANSWER_TYPES:
        chosen += [q for q in questions if q.answer_type == answer_type][:1]
    largest = max(state["vqa_grids"], key=lambda n: int(n[len("grid"):]))
    g = largest[len("grid"):]
    models = {"regions": ("Up-Down", state["ensemble"]["members"][0]["checkpoint"]),
              largest: (f"ResNet {g}x{g}", state["vqa_grids"][largest][0]["checkpoint"])}
    loaded = {feat: (label, load_vqa_checkpoint(checkpoint, "cpu"),
                     FeatureStore(state["stores"][feat]))
              for feat, (label, checkpoint) in models.items()}
    paths = world.image_paths()
    out = []
    for q in chosen:
        for feat, (label, trained, store) in loaded.items():
            data_cfg = trained.train_config.data
            batch = questions_dataset([q], trained.vocabs, store, trained.model.config.question_len,
                                      data_cfg.max_boxes, data_cfg.spatial).__getitems__([0])
            scores, attention = trained.model.predict(batch["question_tokens"], batch["feats"],
                                                      batch["mask"], return_attention=True)
            k = int(batch["mask"][0].sum())
            answer = trained.vocabs.answers.itos[int(scores[0].argmax())]
            boxes = store.get(q.image_id).boxes[:k] * ZOOM
            picture = vqa_attention_figure(_image(paths[q.image_id]), boxes, q.question, answer,
                                           attention[0, :k].cpu().numpy())
            name = f"vqa_attention_{feat}_{q.question_id}.png"
            save_png(picture, storage.join(figures, name))
            out.append({"title": f"{label}, {q.answer_type} question {q.question_id}",
                        "question": q.question, "answer": answer,
                        "truth": q.multiple_choice_answer, "path": f"{prefix}/{name}"})
    return out
