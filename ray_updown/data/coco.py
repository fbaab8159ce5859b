"""COCO captions in their real formats: Karpathy's dataset_coco.json and the official
captions_*.json, plus the caption vocabulary (paper 3.2).

dataset_coco.json::

    {"dataset": "coco", "images": [{"cocoid": 391895, "filepath": "val2014",
      "filename": "COCO_val2014_000000391895.jpg", "split": "test", "imgid": 0,
      "sentids": [...], "sentences": [{"tokens": ["a", "man"], "raw": "A man ...",
      "imgid": 0, "sentid": 0}, ...]}, ...]}

Splits are train / restval / val / test; train + restval form the 113,287-image training set
(`TRAIN_SPLITS`). Image paths are `filepath/filename`, relative to the COCO images folder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from ray_updown import storage
from ray_updown.data.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Vocab,
    caption_tokens,
    field,
    records,
    string_list,
    vocab_from_counts,
)
from ray_updown.errors import DataError

__all__ = ["CaptionImage", "Vocab", "KARPATHY_SPLITS", "TRAIN_SPLITS", "load_karpathy",
           "load_coco_captions", "build_vocab", "caption_tokens", "references", "image_files",
           "coco_split_map", "images_in_split", "encode_captions", "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID"]

KARPATHY_SPLITS = ("train", "restval", "val", "test")
TRAIN_SPLITS = ("train", "restval")
DEFAULT_MAX_CAPTION_LEN = 16


@dataclass(frozen=True)
class CaptionImage:
    """One image of the Karpathy split with its (usually five) reference captions."""

    image_id: int                          # COCO id ("cocoid")
    split: str                             # train | restval | val | test
    filepath: str                          # "train2014" | "val2014"
    filename: str                          # "COCO_val2014_000000391895.jpg"
    raw: tuple[str, ...]                   # captions as written by the annotators
    tokens: tuple[tuple[str, ...], ...]    # lowercased tokens, one tuple per caption

    @property
    def path(self) -> str:
        """Image file relative to the COCO images folder."""
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename


def load_karpathy(uri: str) -> list[CaptionImage]:
    """Parse dataset_coco.json. Every malformed record is a DataError naming `images[i]`.

    Tokens come from each sentence's `tokens` field (lowercased); a sentence without it is
    tokenised from `raw` with `caption_tokens`.
    """
    data = storage.read_json(uri)
    rows = records(data, "images", uri)
    images: list[CaptionImage] = []
    seen: dict[int, int] = {}
    for i, row in enumerate(rows):
        rec = f"images[{i}]"
        image_id = field(row, "cocoid", int, uri, rec)
        rec = f"images[{i}] (cocoid {image_id})"
        filepath = field(row, "filepath", str, uri, rec, optional=True, default="")
        filename = field(row, "filename", str, uri, rec)
        split = field(row, "split", str, uri, rec)
        if split not in KARPATHY_SPLITS:
            raise DataError(f"unknown split '{split}' (expected one of {', '.join(KARPATHY_SPLITS)})",
                            file=uri, record=rec)
        if image_id in seen:
            raise DataError(f"cocoid {image_id} already given by images[{seen[image_id]}]",
                            file=uri, record=rec)
        seen[image_id] = i
        raws, toks = [], []
        for j, sentence in enumerate(field(row, "sentences", list, uri, rec)):
            srec = f"{rec} sentences[{j}]"
            raw = field(sentence, "raw", str, uri, srec)
            if isinstance(sentence, dict) and "tokens" in sentence:
                tokens = [t.lower() for t in string_list(sentence, "tokens", uri, srec)]
            else:
                tokens = caption_tokens(raw)
            raws.append(raw)
            toks.append(tuple(tokens))
        images.append(CaptionImage(image_id, split, filepath, filename, tuple(raws), tuple(toks)))
    return images


def load_coco_captions(uri: str) -> dict[int, list[str]]:
    """Official captions_{train,val}2014.json -> {image_id: [caption, ...]}.

    Every image listed under `images` appears (with an empty list if it has no caption); a
    caption whose image_id is not listed is a DataError naming `annotations[i]`.
    """
    data = storage.read_json(uri)
    out: dict[int, list[str]] = {}
    for i, row in enumerate(records(data, "images", uri)):
        out.setdefault(field(row, "id", int, uri, f"images[{i}]"), [])
    for i, row in enumerate(records(data, "annotations", uri)):
        rec = f"annotations[{i}]"
        image_id = field(row, "image_id", int, uri, rec)
        caption = field(row, "caption", str, uri, rec)
        if image_id not in out:
            raise DataError(f"image_id {image_id} is not listed under 'images'", file=uri, record=rec)
        out[image_id].append(caption)
    return out


def _split_set(split: str | Sequence[str]) -> set[str]:
    wanted = {split} if isinstance(split, str) else set(split)
    unknown = wanted - set(KARPATHY_SPLITS)
    if unknown:
        raise DataError(f"unknown split(s) {sorted(unknown)} (expected {', '.join(KARPATHY_SPLITS)})")
    return wanted


def images_in_split(images: Iterable[CaptionImage], split: str | Sequence[str]) -> list[CaptionImage]:
    """The images of one split or of several (e.g. `TRAIN_SPLITS`), in file order."""
    wanted = _split_set(split)
    return [im for im in images if im.split in wanted]


def build_vocab(images: Iterable[CaptionImage], min_count: int = 5,
                splits: Sequence[str] = TRAIN_SPLITS) -> Vocab:
    """Caption vocabulary (paper 3.2): lowercase whitespace tokens of the training captions
    occurring at least `min_count` times (10,010 words on COCO), plus PAD/BOS/EOS/UNK.

    An empty result (no captions, or a threshold above every count) is a DataError.
    """
    counts: Counter = Counter()
    for im in images_in_split(images, splits):
        for tokens in im.tokens:
            counts.update(tokens)
    return vocab_from_counts(counts, min_count, f"the captions of splits {list(splits)}")


def references(images: Iterable[CaptionImage], split: str | Sequence[str]) -> dict[int, list[str]]:
    """{image_id: raw reference captions} for evaluation (pycocoevalcap, CIDEr-D)."""
    return {im.image_id: list(im.raw) for im in images_in_split(images, split)}


def image_files(images: Iterable[CaptionImage], split: str | Sequence[str]) -> list[tuple[int, str]]:
    """[(image_id, "val2014/COCO_val2014_....jpg")] of a split, relative to the images folder."""
    return [(im.image_id, im.path) for im in images_in_split(images, split)]


def coco_split_map(images: Iterable[CaptionImage]) -> dict[int, str]:
    """{cocoid: Karpathy split}, e.g. for keeping COCO images in their split in Visual Genome."""
    return {im.image_id: im.split for im in images}


def encode_captions(images: Iterable[CaptionImage], vocab: Vocab,
                    max_len: int = DEFAULT_MAX_CAPTION_LEN) -> dict[int, list[list[int]]]:
    """{image_id: [ids of each caption clipped to max_len, then EOS]}."""
    return {im.image_id: [vocab.encode(t, max_len) for t in im.tokens] for im in images}
