"""`ray-updown show`: one image's regions from a feature store, drawn as in the paper's Figure 2.

Figure 2 of Anderson et al. (CVPR 2018) shows the bottom-up detector's output: the regions on
the image, each box labelled with an attribute and an object class ("red circle"). Here the
top N regions of one store row by object confidence are drawn at the stored coordinates
(original image pixels, x1 y1 x2 y2) in distinct colours, each with the label
"attribute object  0.91/0.78" (object / attribute confidence) on a filled background above
the box.

Names come from the vocabularies in the store's metadata (entry i names id i; entry 0 is the
background / "no attribute", see features/schema.py) or, for stores written before those were
recorded, from a detector checkpoint's detector.json. The image is given as a URI or found by
its id under a folder (COCO_val2014_000000000123.jpg or 123.jpg for id 123).

    regions_picture(...)  -> RegionsPicture (the PIL image and what was drawn; no file)
    show_regions(...)     -> the picture written as a PNG, and a summary

The labels and the drawing itself are region_drawing.py's.
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from ray_updown import storage
from ray_updown.errors import CheckpointError, ConfigError, DataError
from ray_updown.features.schema import StoreMeta, aligned_vocab
from ray_updown.viz.region_drawing import draw_regions, label_text, region_colour, region_label, top_regions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BACKGROUND, NO_ATTRIBUTE = "__background__", "__no_attribute__"
STORE_METADATA = "store metadata"
GRID_CELLS = "none: grid cells have no classes"  # the vocabularies of a grid store
# The largest side of a drawn picture, in pixels, and the most regions drawn on one.
MAX_SIDE = 8192
MAX_TOP = 1000


@dataclass
class Vocabularies:
    """Names of the store's ids: objects[i] names object id i, attributes[i] attribute id i."""

    objects: list[str]
    attributes: list[str]
    source: str  # STORE_METADATA or the detector.json they were read from


@dataclass
class RegionsPicture:
    """What `regions_picture` drew: the image and, per drawn region (best first), its row
    index in the store record, box (original pixels), label, text, colour and where its label
    went in the picture (label_box; None when left out, see draw_regions)."""

    image: Image.Image
    image_id: int | str
    image_uri: str
    regions: list[dict[str, Any]]
    num_boxes: int  # regions in the store row
    vocab_source: str

    @property
    def labels(self) -> list[str]:
        """The texts of the regions, best first (grid cells have none)."""
        return [r["text"] for r in self.regions if r["text"]]

    @property
    def labels_drawn(self) -> int:
        return sum(r["label_box"] is not None for r in self.regions)


# -------------------------------------------------------------------- inputs: ids, files
def store_image_id(image_id: Any, id_type: str, store: str) -> int | str:
    """The id as the store keys it: an integer for int64 stores (the CLI passes text)."""
    if id_type != "int64":
        return str(image_id)
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return int(image_id)
    try:
        return int(str(image_id).strip())
    except ValueError:
        raise DataError(f"image id {image_id!r} is not an integer (the store's ids are int64)",
                        file=store) from None


def _names_id(stem: str, image_id: int | str) -> bool:
    if isinstance(image_id, int):
        # The last number of the name: COCO_val2014_000000000123 -> 123 (the "2014" is not an id).
        numbers = re.findall(r"\d+", stem)
        return bool(numbers) and int(numbers[-1]) == image_id
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(image_id)}(?![0-9A-Za-z])", stem) is not None


def find_image(images_root: str, image_id: int | str) -> str:
    """The one image file under `images_root` (recursively) whose name carries the id."""
    files = storage.list_files(images_root, IMAGE_SUFFIXES)
    found = [u for u in files if _names_id(posixpath.splitext(posixpath.basename(u))[0], image_id)]
    if not found:
        example = f"COCO_val2014_{image_id:012d}.jpg or {image_id}.jpg" if isinstance(image_id, int) \
            else f"{image_id}.jpg"
        raise DataError(f"no image file for image id {image_id!r} among its {len(files)} images "
                        f"(names like {example}); pass --image", file=images_root)
    if len(found) > 1:
        raise DataError(f"{len(found)} image files match image id {image_id!r} "
                        f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); pass --image",
                        file=images_root)
    return found[0]


def load_image(uri: str) -> Image.Image:
    """RGB pixels of an image file, in the viewer's frame (EXIF rotation applied, as the
    extraction does, so the stored boxes fit)."""
    data = storage.read_bytes(uri)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"not a readable image ({type(exc).__name__}: {exc})", file=uri) from None


# ------------------------------------------------------------------------ vocabularies
def _names(value: Any, key: str, source: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"{key} is not a list of names", file=source)
    return value


def detector_vocabularies(detector: str, num_classes: int | None = None) -> Vocabularies:
    """The vocabularies of a detector checkpoint (its directory or its detector.json), entry i
    for id i. `num_classes`, the class count of the detector that made the store (when it
    says), guards against naming a store's ids with another detector's vocabulary."""
    from ray_updown.detector.checkpoint import CONFIG_FILE, FORMAT

    config_uri = detector if detector.endswith(".json") else storage.join(detector, CONFIG_FILE)
    meta = storage.read_json(config_uri)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a {FORMAT} config", file=config_uri)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    objects = _names(meta.get("object_vocab"), "object_vocab", config_uri)
    attributes = _names(meta.get("attribute_vocab"), "attribute_vocab", config_uri)
    if not objects:
        raise CheckpointError("has no object_vocab: it cannot name the store's object ids",
                              file=config_uri)
    try:
        objects = aligned_vocab(objects, config.get("num_classes"), BACKGROUND)
        attributes = aligned_vocab(attributes, config.get("num_attributes"), NO_ATTRIBUTE)
    except ValueError as exc:
        raise CheckpointError(str(exc), file=config_uri) from None
    if num_classes is not None and len(objects) != int(num_classes):
        raise CheckpointError(f"its {len(objects)} object classes are not the {num_classes} of "
                              "the detector that made the store: pass that detector", file=config_uri)
    return Vocabularies(objects, attributes, config_uri)


def store_vocabularies(store: str, meta: dict[str, Any], feature_files: Sequence[str],
                       detector: str | None = None) -> Vocabularies:
    """The store's vocabularies, else the detector's; one error naming the store if neither."""
    objects, attributes = meta.get("object_vocab") or [], meta.get("attribute_vocab") or []
    if not objects:
        # A run resumed over an older store: its first shard (whose metadata the index keeps)
        # may predate the vocabularies while the shards redone last have them. A few footers
        # at most: on an object store each is a request.
        for uri in list(feature_files[1:])[::-1][:8]:
            pa_fs, path = storage.pyarrow_filesystem(uri)
            shard = StoreMeta.from_kv(pq.read_schema(path, filesystem=pa_fs).metadata, file=uri)
            if shard.object_vocab:
                objects, attributes = shard.object_vocab, shard.attribute_vocab
                break
    if objects:
        return Vocabularies(list(objects), list(attributes), STORE_METADATA)
    if detector:
        config = meta.get("detector_config") or {}
        return detector_vocabularies(detector, config.get("num_classes"))
    raise DataError("has no vocabularies in its metadata (written before they were recorded, "
                    "or by a model without them); pass --detector with the detector checkpoint "
                    "that made it", file=store)


# ------------------------------------------------------------------------------ entry
def _check_size(top: int, zoom: int, width: int, height: int) -> None:
    """`top` in [1, MAX_TOP]; `zoom` >= 1 and, to enlarge, keeping the picture's sides within
    MAX_SIDE pixels."""
    if not 1 <= int(top) <= MAX_TOP:
        raise ConfigError(f"must be between 1 and {MAX_TOP}, got {top}", record="top")
    if int(zoom) < 1:
        raise ConfigError(f"must be >= 1, got {zoom}", record="zoom")
    if int(zoom) > 1 and max(width, height) * int(zoom) > MAX_SIDE:
        raise ConfigError(f"{zoom} would draw this {width}x{height} image at {width * int(zoom)}x"
                          f"{height * int(zoom)}; a picture's side is at most {MAX_SIDE} px, so "
                          f"at most --zoom {max(1, MAX_SIDE // max(width, height))} here",
                          record="zoom")


def _regions(record: Any, top: int, vocabs: Vocabularies | None, where: dict[str, Any]
             ) -> list[dict[str, Any]]:
    """The `top` regions of a store row, best first, each with its box, label and text; a
    grid store's cells (`vocabs` None) have neither label nor text."""
    regions = []
    for rank, i in enumerate(top_regions(record.object_conf, top)):
        i = int(i)
        entry = {"index": i, "box": [float(v) for v in record.boxes[i]],
                 "object_id": int(record.object_ids[i]), "attr_id": int(record.attr_ids[i]),
                 "label": "", "text": "", "colour": region_colour(rank)}
        if vocabs is not None:
            try:
                label = region_label(record.object_ids[i], record.attr_ids[i], vocabs.objects,
                                     vocabs.attributes)
            except DataError as exc:
                raise DataError(f"{exc.problem} (names from {vocabs.source})", file=where["store"],
                                record=f"image {where['image']!r} region {i}") from None
            attr_conf = (float(record.attr_conf[i])
                         if vocabs.attributes and int(record.attr_ids[i]) > 0 else None)
            entry.update(label=label, text=label_text(label, record.object_conf[i], attr_conf))
        regions.append(entry)
    return regions


def regions_picture(store: str, image_id: Any, *, image: str | None = None,
                    images_root: str | None = None, top: int = 10, detector: str | None = None,
                    zoom: int = 1) -> RegionsPicture:
    """Figure 2 for one image of `store`, as a PIL image (no file written); see show_regions.
    `zoom` enlarges the picture (boxes scaled with it) for small images. A grid store's cells
    are drawn without labels: they are not detections (`detector` is not used)."""
    from ray_updown.features.reader import FeatureStore

    _check_size(top, zoom, 0, 0)  # before opening the store; the size once the row is read
    features = FeatureStore(store)
    meta = features.metadata
    if not meta:
        raise DataError("has no feature rows (every image failed?)", file=features.uri)
    key = store_image_id(image_id, meta.get("image_id_type", "int64"), features.uri)
    if key not in features:
        raise DataError(f"image id {key!r} is not in the store ({len(features)} images)",
                        file=features.uri)
    record = features.get(key)
    _check_size(top, zoom, record.image_w, record.image_h)
    grid = "grid_size" in (meta.get("detector_config") or {})
    vocabs = None if grid else store_vocabularies(features.uri, meta, features.feature_files(), detector)
    if image:
        uri = image
    elif images_root:
        uri = find_image(images_root, key)
    else:
        raise ConfigError(f"no image file for image id {key!r}: pass --image or --images-root",
                          record="image")
    pixels = load_image(uri)
    if pixels.size != (record.image_w, record.image_h):
        raise DataError(f"is {pixels.width}x{pixels.height} but image {key!r} of {features.uri} is "
                        f"{record.image_w}x{record.image_h}: not the image its boxes were found on",
                        file=uri)
    regions = _regions(record, top, vocabs, {"store": features.uri, "image": key})
    picture, places = draw_regions(pixels, [r["box"] for r in regions], [r["text"] for r in regions],
                                   [r["colour"] for r in regions], int(zoom))
    for region, place in zip(regions, places):
        region["label_box"] = place
    return RegionsPicture(picture, key, uri, regions, record.num_boxes,
                          GRID_CELLS if vocabs is None else vocabs.source)


def show_regions(store: str, image_id: str, *, out: str, image: str | None = None,
                 images_root: str | None = None, top: int = 10,
                 detector: str | None = None, zoom: int = 1) -> dict:
    """Draw the top `top` regions of `image_id` in `store` on its image, at `zoom` times the
    image's own size, as a PNG at `out`. The image is `image`, or the file under `images_root` named by
    the id; names come from the store's metadata, else from the `detector` checkpoint.
    Returns a summary: out, image_id, image, size, regions drawn and their labels."""
    picture = regions_picture(store, image_id, image=image, images_root=images_root, top=top,
                              detector=detector, zoom=zoom)
    buf = io.BytesIO()
    picture.image.save(buf, format="PNG")
    storage.write_bytes(out, buf.getvalue())
    return {"out": out, "store": store, "image_id": picture.image_id, "image": picture.image_uri,
            "size": list(picture.image.size), "regions": len(picture.regions),
            "regions_in_store": picture.num_boxes, "labels": picture.labels,
            "labels_drawn": picture.labels_drawn, "vocabularies": picture.vocab_source}
