"""Visual Genome 1.4 in its real layout, for training the bottom-up detector (paper 3.1).

image_data.json:  [{"image_id": 1, "url": "https://.../VG_100K_2/1.jpg", "width": 800,
                    "height": 600, "coco_id": null, "flickr_id": 2340}]
objects.json:     [{"image_id": 1, "objects": [{"object_id": 1058498, "x": 421, "y": 91,
                    "w": 79, "h": 339, "names": ["clock"], "synsets": ["clock.n.01"]}]}]
attributes.json:  [{"image_id": 1, "attributes": [{"object_id": 1058498, "x": .., "y": ..,
                    "w": .., "h": .., "names": ["clock"], "attributes": ["green", "tall"]}]}]
objects_vocab.txt / attributes_vocab.txt: one class a line, comma-separated aliases
                    ("stop sign,stopsign"); line i is class i + 1, index 0 is background /
                    no attribute (so 1601 object and 401 attribute classes for 1600-400-20).

Boxes become x1 y1 x2 y2 = x, y, x + w, y + h (as the original setup_vg.py), clipped to the
image. Splits (create_splits.py): an image that is also in COCO stays in its Karpathy split so
no test image leaks into detector training; the rest is split by a seeded shuffle.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Mapping, Sequence

import numpy as np

from ray_updown import storage
from ray_updown.data.text import field, records, string_list
from ray_updown.errors import DataError

__all__ = ["ClassVocab", "VgImage", "load_class_vocab", "load_visual_genome",
           "split_visual_genome", "vg_image_path", "COCO_TO_VG_SPLIT"]

COCO_TO_VG_SPLIT = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _clean(name: str) -> str:
    """Lowercase, strip, drop one trailing period (setup_vg.py's clean_string)."""
    name = name.lower().strip()
    return name[:-1].strip() if name.endswith(".") else name


@dataclass
class ClassVocab:
    """Classes of objects_vocab.txt or attributes_vocab.txt. Index 0 = background."""

    names: list[str]                      # names[0] = background, names[i] = line i-1's first alias
    alias_to_index: dict[str, int] = dc_field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int | None:
        """Class index of a raw VG name (lowercased, stripped), or None if unmapped."""
        return self.alias_to_index.get(_clean(name))


def load_class_vocab(uri: str, background: str = "__background__") -> ClassVocab:
    """Parse a vocabulary file; empty file, empty line, duplicate class or alias -> DataError."""
    text = storage.read_text(uri)
    lines = text.splitlines()
    while lines and not lines[-1].strip():     # a trailing newline is not a class
        lines.pop()
    if not lines:
        raise DataError("empty vocabulary file (no classes)", file=uri)
    names = [background]
    alias_to_index: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        aliases = [_clean(a) for a in line.split(",")]
        if not line.strip() or not all(aliases):
            raise DataError(f"empty class name or alias in {line!r:.60}", file=uri,
                            record=f"line {lineno}")
        index = lineno  # line i (1-based) -> index i; 0 is background
        for alias in aliases:
            if alias in alias_to_index:
                what = "class" if alias == aliases[0] else "alias"
                raise DataError(f"duplicate {what} '{alias}' (already on line {first_line[alias]})",
                                file=uri, record=f"line {lineno}")
            alias_to_index[alias] = index
            first_line[alias] = lineno
        names.append(aliases[0])
    return ClassVocab(names, alias_to_index)


@dataclass
class VgImage:
    image_id: int
    url: str                      # relative to the dataset root, or an http address
    width: int
    height: int
    coco_id: int | None
    flickr_id: int | None
    path: str                     # resolved image URI (see vg_image_path)
    object_ids: np.ndarray        # int64 [n]
    boxes: np.ndarray             # float32 [n, 4] x1 y1 x2 y2, original pixels
    labels: np.ndarray            # int64 [n] object class index (>= 1)
    attributes: list[tuple[int, ...]]  # per object: attribute indices (>= 1), possibly empty
    num_unmapped: int = 0         # objects dropped: no name in the object vocabulary
    num_degenerate: int = 0       # objects dropped: empty box after clipping

    def attribute_matrix(self, max_per_object: int = 16) -> np.ndarray:
        """int64 [n, max_per_object] attribute indices padded with 0 (= no attribute)."""
        out = np.zeros((len(self.attributes), max_per_object), dtype=np.int64)
        for i, attrs in enumerate(self.attributes):
            attrs = attrs[:max_per_object]
            out[i, :len(attrs)] = attrs
        return out


def vg_image_path(url: str, root: str | None = None, images_dir: str | None = None) -> str:
    """Where an image of image_data.json lives.

    A relative url is joined to `root`. An http(s) url (the real dataset) names the file by its
    basename: `images_dir/<basename>` when `images_dir` is given, else
    `root/<url folder>/<basename>` (VG_100K/ and VG_100K_2/ as the downloads unpack).
    """
    if url.startswith(("http://", "https://")):
        path = url.split("?", 1)[0].rstrip("/")
        base = posixpath.basename(path)
        if images_dir is not None:
            return storage.join(images_dir, base)
        folder = posixpath.basename(posixpath.dirname(path))
        return storage.join(root, folder, base) if root is not None else f"{folder}/{base}"
    return storage.join(root, url) if root is not None else url


def _image_key(entry: object, uri: str, rec: str) -> int:
    # VG 1.2 wrote "id" where 1.4 writes "image_id".
    key = "image_id" if isinstance(entry, dict) and "image_id" in entry else "id"
    return field(entry, key, int, uri, rec)


def _box(obj: dict, uri: str, rec: str, width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = (float(field(obj, k, (int, float), uri, rec)) for k in ("x", "y", "w", "h"))
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


def _attributes_by_object(attributes_uri: str, vocab: ClassVocab, known_images: set[int]
                          ) -> dict[int, dict[int, list[int]]]:
    """{image_id: {object_id: [attribute index, ...]}} (unknown attribute names dropped)."""
    out: dict[int, dict[int, list[int]]] = {}
    for i, entry in enumerate(records(storage.read_json(attributes_uri), None, attributes_uri)):
        image_id = _image_key(entry, attributes_uri, f"[{i}]")
        rec = f"[{i}] (image_id {image_id})"
        if image_id not in known_images:
            raise DataError("image_id is not in image_data.json", file=attributes_uri, record=rec)
        per_object = out.setdefault(image_id, {})
        for j, obj in enumerate(field(entry, "attributes", list, attributes_uri, rec)):
            orec = f"{rec} attributes[{j}]"
            object_id = field(obj, "object_id", int, attributes_uri, orec)
            indices = per_object.setdefault(object_id, [])
            for name in string_list(obj, "attributes", attributes_uri, orec, optional=True):
                index = vocab.index(name)
                if index is not None and index not in indices:
                    indices.append(index)
    return out


def _image_metas(image_data_uri: str) -> dict[int, dict]:
    """{image_id: url, width, height, coco_id, flickr_id} of image_data.json, in its order."""
    images: dict[int, dict] = {}
    for i, meta in enumerate(records(storage.read_json(image_data_uri), None, image_data_uri)):
        image_id = _image_key(meta, image_data_uri, f"[{i}]")
        rec = f"[{i}] (image_id {image_id})"
        if image_id in images:
            raise DataError("duplicate image_id", file=image_data_uri, record=rec)
        url = field(meta, "url", str, image_data_uri, rec)
        images[image_id] = {
            "url": url,
            "width": field(meta, "width", int, image_data_uri, rec),
            "height": field(meta, "height", int, image_data_uri, rec),
            "coco_id": field(meta, "coco_id", int, image_data_uri, rec, optional=True),
            "flickr_id": field(meta, "flickr_id", int, image_data_uri, rec, optional=True),
        }
    return images


def _objects_by_image(objects_uri: str, known_images: dict[int, dict]
                      ) -> dict[int, tuple[int, list]]:
    """{image_id: (its entry's index in objects.json, its objects)}."""
    out: dict[int, tuple[int, list]] = {}
    for i, entry in enumerate(records(storage.read_json(objects_uri), None, objects_uri)):
        image_id = _image_key(entry, objects_uri, f"[{i}]")
        rec = f"[{i}] (image_id {image_id})"
        if image_id not in known_images:
            raise DataError("image_id is not in image_data.json", file=objects_uri, record=rec)
        if image_id in out:
            raise DataError("image listed twice", file=objects_uri, record=rec)
        out[image_id] = (i, field(entry, "objects", list, objects_uri, rec))
    return out


def _vg_image(image_id: int, meta: dict, index: int, objects: list, objects_uri: str,
                    object_vocab: ClassVocab, image_attrs: dict[int, list[int]],
                    root: str | None, images_dir: str | None) -> VgImage:
    """One image with the objects whose name is in the vocabulary and whose clipped box is not
    empty; the others are counted (num_unmapped, num_degenerate)."""
    rec = f"[{index}] (image_id {image_id})"
    ids, boxes, labels, obj_attrs = [], [], [], []
    unmapped = degenerate = 0
    for j, obj in enumerate(objects):
        orec = f"{rec} objects[{j}]"
        object_id = field(obj, "object_id" if isinstance(obj, dict) and "object_id" in obj
                          else "id", int, objects_uri, orec)
        names = (string_list(obj, "names", objects_uri, orec) if "names" in obj
                 else [field(obj, "name", str, objects_uri, orec)])
        label = next((c for c in map(object_vocab.index, names) if c is not None), None)
        box = _box(obj, objects_uri, orec, meta["width"], meta["height"])
        if label is None:
            unmapped += 1
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            degenerate += 1
            continue
        ids.append(object_id)
        boxes.append(box)
        labels.append(label)
        obj_attrs.append(tuple(image_attrs.get(object_id, ())))
    return VgImage(
        image_id=image_id, url=meta["url"], width=meta["width"], height=meta["height"],
        coco_id=meta["coco_id"], flickr_id=meta["flickr_id"],
        path=vg_image_path(meta["url"], root, images_dir),
        object_ids=np.asarray(ids, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64), attributes=obj_attrs,
        num_unmapped=unmapped, num_degenerate=degenerate)


def load_visual_genome(image_data_uri: str, objects_uri: str, attributes_uri: str | None,
                       object_vocab: ClassVocab, attribute_vocab: ClassVocab | None,
                       root: str | None = None, images_dir: str | None = None) -> list[VgImage]:
    """Images with their mapped objects, boxes and attributes, in image_data.json order.

    An object takes the class of its first name found in `object_vocab` (aliases, lowercased,
    stripped); objects with no such name are dropped and counted in `num_unmapped`. Images with
    no objects entry or no mapped object are kept (with n = 0): training decides what to skip.
    """
    images = _image_metas(image_data_uri)
    attrs = (_attributes_by_object(attributes_uri, attribute_vocab, set(images))
             if attributes_uri is not None and attribute_vocab is not None else {})
    objects_by_image = _objects_by_image(objects_uri, images)
    out: list[VgImage] = []
    for image_id, meta in images.items():
        index, objects = objects_by_image.get(image_id, (-1, []))
        out.append(_vg_image(image_id, meta, index, objects, objects_uri, object_vocab,
                                   attrs.get(image_id, {}), root, images_dir))
    return out


def split_visual_genome(images: Sequence[VgImage], coco_splits: Mapping[int, str],
                        ratios: tuple[float, float, float] = (0.9, 0.05, 0.05),
                        seed: int = 10) -> dict[str, list[VgImage]]:
    """{"train", "val", "test"} lists, each in input order.

    Images whose coco_id is in `coco_splits` (Karpathy split of each COCO id) keep that split
    (train/restval -> train). The others are shuffled with `seed` and fill val and test up to
    round(ratio * total images) each, as create_splits.py fills them to 5,000; the rest train.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise DataError(f"ratios must be three non-negative numbers (train, val, test), got {ratios}")
    split_of: dict[int, str] = {}
    rest: list[int] = []
    for im in images:
        if im.coco_id is not None and im.coco_id in coco_splits:
            coco_split = coco_splits[im.coco_id]
            if coco_split not in COCO_TO_VG_SPLIT:
                raise DataError(f"unknown COCO split '{coco_split}' for coco_id {im.coco_id}",
                                record=f"image_id {im.image_id}")
            split_of[im.image_id] = COCO_TO_VG_SPLIT[coco_split]
        else:
            rest.append(im.image_id)
    total = sum(ratios)
    rest = sorted(rest)
    order = np.random.default_rng(seed).permutation(len(rest))
    pool = [rest[k] for k in order]
    for name, ratio in (("test", ratios[2]), ("val", ratios[1])):
        target = round(ratio / total * len(images))
        have = sum(1 for s in split_of.values() if s == name)
        for _ in range(max(0, min(target - have, len(pool)))):
            split_of[pool.pop()] = name
    for image_id in pool:
        split_of[image_id] = "train"
    out: dict[str, list[VgImage]] = {"train": [], "val": [], "test": []}
    for im in images:
        out[split_of[im.image_id]].append(im)
    return out
