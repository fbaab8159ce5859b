"""VQA training data: questions + vocabularies + the region-feature store -> padded tensors.

`prepare_vqa_data(data_cfg)` reads the VQA v2 files (data/vqa.py), builds the question and
answer vocabularies from the questions trained on (answers given >= `answer_min_count` times,
paper 3.3), optionally adds Visual Genome QA pairs, checks that every image has features,
and returns `VqaDataset`s whose batches are dicts of tensors:

    question_id [B] int64, question_tokens [B, T] int64, feats [B, K, D'] float32,
    mask [B, K] bool (True = real region), targets [B, A] float32 soft scores (when annotated)

K = `max_boxes` (images with fewer regions are padded, more are cut to the detector's best
ranked); D' = feature dim + 7 when `spatial` adds the box geometry (features/spatial.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ray_updown import storage
from ray_updown.config import validate_config, validate_fields
from ray_updown.data.glove import load_glove
from ray_updown.data.text import Vocab, field, records
from ray_updown.data.vqa import (
    AnswerVocab,
    VqaQuestion,
    build_answer_vocab,
    build_question_vocab,
    encode_question,
    load_vg_qa,
    load_vqa,
    soft_targets,
    tokenize_question,
)
from ray_updown.errors import ConfigError, DataError
from ray_updown.features.spatial import SPATIAL_DIM, spatial_features
from ray_updown.features.store import FeatureStore, pad_regions

log = logging.getLogger(__name__)

MAX_TARGETS = 10  # at most 10 distinct human answers per question


@dataclass
class VqaDataConfig:
    """Where the VQA data lives and how it becomes tensors (all locations are URIs)."""

    train_questions: str = ""        # v2_OpenEnded_mscoco_train2014_questions.json
    train_annotations: str = ""      # v2_mscoco_train2014_annotations.json
    val_questions: str = ""          # v2_OpenEnded_mscoco_val2014_questions.json
    val_annotations: str = ""        # v2_mscoco_val2014_annotations.json
    features: str = ""               # region-feature store (features/ + index.parquet)
    glove: str | None = None         # GloVe text file; None = embeddings learned from scratch
    answer_min_count: int = 9        # paper: answers given >= 9 times -> 3,129 candidates
    question_min_count: int = 1
    vg_qa: str | None = None         # Visual Genome question_answers.json (augmentation)
    vg_image_data: str | None = None  # VG image_data.json: maps VG image ids to COCO ids
    # ["train", "val"]: server runs (test-dev / test-std answers)
    train_on: list[Literal["train", "val"]] = dc_field(default_factory=lambda: ["train"])
    max_boxes: int = 100             # K regions per image after padding / cutting
    spatial: bool = False            # append the 7 box-geometry values to each region
    features_in_memory: bool = True  # decode every needed image once (small stores, demos)

    def validate(self) -> None:
        validate_fields(self)  # train_on
        if not self.train_on:
            raise ConfigError("must name at least one split", record="train_on")
        if "val" in self.train_on and not (self.val_questions and self.val_annotations):
            raise ConfigError("train_on has 'val' but val_questions/val_annotations are not set",
                              record="train_on")
        for name in ("answer_min_count", "max_boxes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", record=name)
        if self.vg_qa and not self.vg_image_data:
            raise ConfigError("vg_qa needs vg_image_data (to map VG images to COCO ids)",
                              record="vg_image_data")

    def absolute(self) -> "VqaDataConfig":
        """A copy whose local relative paths are absolute (Tune trials run in their own cwd)."""
        values = {k: absolute_uri(v) if isinstance(v, str) and k != "train_on" else v
                  for k, v in self.__dict__.items()}
        return VqaDataConfig(**values)


def absolute_uri(uri: str) -> str:
    """Local relative paths made absolute; remote URIs and empty strings unchanged."""
    import os

    if not uri or storage.is_remote(uri) or uri.startswith("file://"):
        return uri
    return os.path.abspath(uri)


@dataclass
class VqaVocabularies:
    """The question words (model input) and candidate answers (model output)."""

    questions: Vocab
    answers: AnswerVocab

    def to_json(self) -> dict:
        return {"question_vocab": list(self.questions.itos), "answer_vocab": list(self.answers.itos)}

    @classmethod
    def from_json(cls, obj: dict, file: str | None = None) -> "VqaVocabularies":
        for key in ("question_vocab", "answer_vocab"):
            if key not in obj:
                raise DataError(f"missing '{key}'", file=file)
        return cls(Vocab.from_json({"itos": obj["question_vocab"]}, file),
                   AnswerVocab.from_json({"itos": obj["answer_vocab"]}, file))


def vg_to_coco_ids(image_data_uri: str) -> dict[int, int]:
    """VG image id -> COCO id from Visual Genome's image_data.json (images without one left out)."""
    out: dict[int, int] = {}
    for i, row in enumerate(records(storage.read_json(image_data_uri), None, image_data_uri)):
        rec = f"[{i}]"
        key = "image_id" if isinstance(row, dict) and "image_id" in row else "id"
        vg_id = field(row, key, int, image_data_uri, rec)
        coco_id = field(row, "coco_id", int, image_data_uri, f"{rec} (image {vg_id})", optional=True)
        if coco_id is not None:
            out[vg_id] = coco_id
    return out


class RegionFeatures:
    """Padded region tensors of a set of images, from a `FeatureStore`.

    In memory: every image is decoded once into float16 [I, K, D'] (fast batches; for stores
    that fit in RAM). Otherwise each batch reads its images from the store (row-group cache).
    """

    def __init__(self, store: FeatureStore, image_ids: Sequence[Any], max_boxes: int,
                 spatial: bool, in_memory: bool):
        self.store = store
        self.max_boxes = int(max_boxes)
        self.spatial = bool(spatial)
        self.in_memory = bool(in_memory)
        self.feature_dim = store.feature_dim
        self.row = {image_id: i for i, image_id in enumerate(dict.fromkeys(image_ids))}
        self._feats: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        if self.in_memory and self.row:
            ids = list(self.row)
            chunks = [self._read(ids[i:i + 256]) for i in range(0, len(ids), 256)]
            self._feats = torch.cat([c[0].half() for c in chunks])
            self._mask = torch.cat([c[1] for c in chunks])

    @property
    def region_dim(self) -> int:
        return self.feature_dim + (SPATIAL_DIM if self.spatial else 0)

    def _read(self, image_ids: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        records_ = [self.store.get(i) for i in image_ids]
        feats, boxes, mask = pad_regions(records_, self.max_boxes)
        if self.spatial:
            w = torch.tensor([float(r.image_w) for r in records_])
            h = torch.tensor([float(r.image_h) for r in records_])
            geometry = spatial_features(boxes, w, h) * mask.unsqueeze(2)
            feats = torch.cat([feats, geometry], dim=2)
        return feats, mask

    def batch(self, image_ids: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, K, D'] float32 and mask [B, K] bool for these images."""
        if self._feats is None:
            return self._read(image_ids)
        rows = torch.as_tensor([self.row[i] for i in image_ids], dtype=torch.long)
        return self._feats[rows].float(), self._mask[rows]


@dataclass
class EncodedQuestions:
    """Questions as arrays (targets sparse: up to 10 (answer index, soft score) pairs each)."""

    question_ids: np.ndarray      # [N] int64
    image_ids: list               # [N] as the store keys them
    tokens: np.ndarray            # [N, T] int64
    target_index: np.ndarray      # [N, 10] int64, -1 = none
    target_score: np.ndarray      # [N, 10] float32
    answer_types: list[str]
    annotated: bool

    def __len__(self) -> int:
        return len(self.question_ids)


def encode_questions(questions: Sequence[VqaQuestion], vocabs: VqaVocabularies,
                     question_len: int) -> EncodedQuestions:
    n = len(questions)
    tokens = np.zeros((n, question_len), dtype=np.int64)
    index = np.full((n, MAX_TARGETS), -1, dtype=np.int64)
    score = np.zeros((n, MAX_TARGETS), dtype=np.float32)
    for i, q in enumerate(questions):
        tokens[i] = encode_question(tokenize_question(q.question), vocabs.questions, question_len)
        if q.answers:
            idx, sc = soft_targets(q.answers, vocabs.answers)
            index[i, :len(idx)], score[i, :len(sc)] = idx[:MAX_TARGETS], sc[:MAX_TARGETS]
    return EncodedQuestions(np.asarray([q.question_id for q in questions], dtype=np.int64),
                            [q.image_id for q in questions], tokens, index, score,
                            [q.answer_type for q in questions],
                            annotated=bool(questions) and all(q.answers for q in questions))


class VqaDataset(torch.utils.data.Dataset):
    """Questions with their images' regions; `__getitems__` builds a whole batch at once."""

    def __init__(self, encoded: EncodedQuestions, regions: RegionFeatures, num_answers: int):
        self.encoded = encoded
        self.regions = regions
        self.num_answers = int(num_answers)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        e = self.encoded
        feats, mask = self.regions.batch([e.image_ids[i] for i in idx])
        batch = {"question_id": torch.from_numpy(e.question_ids[idx]),
                 "question_tokens": torch.from_numpy(e.tokens[idx]), "feats": feats, "mask": mask}
        if e.annotated:
            targets = torch.zeros(len(idx), self.num_answers + 1)  # last column absorbs -1
            cols = torch.from_numpy(e.target_index[idx]).clamp(min=-1) % (self.num_answers + 1)
            targets.scatter_(1, cols, torch.from_numpy(e.target_score[idx]))
            batch["targets"] = targets[:, :self.num_answers].contiguous()
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def check_features(questions: Sequence[VqaQuestion], store: FeatureStore, questions_uri: str) -> None:
    """Every question's image must be in the store: a DataError names the first that is not."""
    for q in questions:
        if q.image_id not in store:
            raise DataError(f"image_id {q.image_id} has no region features in the store "
                            f"{store.uri}", file=questions_uri,
                            record=f"question_id {q.question_id}")


@dataclass
class PreparedVqa:
    vocabs: VqaVocabularies
    train: VqaDataset
    val: VqaDataset | None
    embeddings: np.ndarray | None   # [num_tokens, embed_dim] from GloVe, or None
    region_dim_extra: int           # spatial values appended to each region (0 or 7)
    feature_dim: int
    stats: dict


def require_inputs(cfg: VqaDataConfig) -> None:
    """ConfigError unless the config is valid and names the files training needs (they are
    empty by default, so that a defaults-only config can be shown and loaded)."""
    validate_config(cfg, "data")
    for name in ("train_questions", "train_annotations", "features"):
        if not getattr(cfg, name):
            raise ConfigError("is required", record=f"data.{name}")


@dataclass
class VqaSources:
    """The VQA files read and cross-checked, before any encoding."""

    loaded: dict[str, list[VqaQuestion]]   # "train" (and "val") questions with annotations
    store: FeatureStore
    answers: AnswerVocab
    vg: list[VqaQuestion]                  # Visual Genome pairs with features and a known answer


def read_vqa_sources(cfg: VqaDataConfig, answers: AnswerVocab | None = None) -> VqaSources:
    """Read every file the config names and check them against each other: questions and
    annotations match, every image has features, the answer vocabulary is not empty.
    `answers` (e.g. from a checkpoint) replaces building them from the training questions."""
    require_inputs(cfg)
    splits = {"train": (cfg.train_questions, cfg.train_annotations)}
    if cfg.val_questions and cfg.val_annotations:
        splits["val"] = (cfg.val_questions, cfg.val_annotations)
    loaded = {name: load_vqa(q, a) for name, (q, a) in splits.items()}
    store = FeatureStore(cfg.features)
    for name, questions in loaded.items():
        check_features(questions, store, splits[name][0])
    if answers is None:
        try:
            answers = build_answer_vocab([q for s in cfg.train_on for q in loaded[s]],
                                         cfg.answer_min_count)
        except DataError as exc:
            files = ", ".join(splits[s][1] for s in cfg.train_on)
            raise DataError(f"{exc.problem} (data.answer_min_count = {cfg.answer_min_count})",
                            file=files) from None
    vg: list[VqaQuestion] = []
    if cfg.vg_qa:
        candidates = load_vg_qa(cfg.vg_qa, answers, vg_to_coco_ids(cfg.vg_image_data))
        vg = [q for q in candidates if q.image_id in store]  # VG images outside the store: skipped
        log.info("Visual Genome augmentation: %d of %d pairs with features", len(vg), len(candidates))
    return VqaSources(loaded, store, answers, vg)


# Lines of the GloVe file the driver checks: the workers stream the whole (GB-sized) file.
_GLOVE_LINES_CHECKED = 20


def check_vqa_inputs(cfg: VqaDataConfig, embed_dim: int) -> None:
    """What training would otherwise find inside the Ray workers, checked on the driver:
    every file is read and cross-checked (`read_vqa_sources`), and the GloVe file's first
    lines have `embed_dim` values."""
    read_vqa_sources(cfg)
    if cfg.glove:
        load_glove(cfg.glove, [], dim=embed_dim, max_lines=_GLOVE_LINES_CHECKED)


def prepare_vqa_data(cfg: VqaDataConfig, question_len: int = 14, embed_dim: int = 300,
                     vocabs: VqaVocabularies | None = None) -> PreparedVqa:
    """Load, validate and encode the training (and validation) data (paper 3.3).

    `vocabs` (e.g. from a checkpoint) replaces building them from the training questions.
    """
    sources = read_vqa_sources(cfg, vocabs.answers if vocabs is not None else None)
    loaded, store, answers, vg = sources.loaded, sources.store, sources.answers, sources.vg
    train_questions = [q for s in cfg.train_on for q in loaded[s]]
    if vocabs is None:
        vocabs = VqaVocabularies(build_question_vocab(train_questions + vg, cfg.question_min_count),
                                 answers)
    train_questions = train_questions + vg
    embeddings = None
    if cfg.glove:
        embeddings, missing = load_glove(cfg.glove, vocabs.questions.itos, dim=embed_dim)
        log.info("GloVe: %d of %d words not found in %s", missing, len(vocabs.questions), cfg.glove)
    all_ids = [q.image_id for q in train_questions] + [q.image_id for q in loaded.get("val", [])]
    regions = RegionFeatures(store, all_ids, cfg.max_boxes, cfg.spatial, cfg.features_in_memory)
    train = VqaDataset(encode_questions(train_questions, vocabs, question_len), regions, len(answers))
    val = None
    if "val" in loaded:
        val = VqaDataset(encode_questions(loaded["val"], vocabs, question_len), regions, len(answers))
    stats = {"train_questions": len(train), "vg_questions": len(vg),
             "val_questions": len(val) if val is not None else 0,
             "answers": len(answers), "question_words": len(vocabs.questions)}
    return PreparedVqa(vocabs, train, val, embeddings, SPATIAL_DIM if cfg.spatial else 0,
                       store.feature_dim, stats)


def questions_dataset(questions: Sequence[VqaQuestion], vocabs: VqaVocabularies,
                      store: FeatureStore, question_len: int, max_boxes: int, spatial: bool,
                      questions_uri: str = "<questions>") -> VqaDataset:
    """A dataset for prediction (test-dev / test-std questions need no annotations)."""
    check_features(questions, store, questions_uri)
    regions = RegionFeatures(store, [q.image_id for q in questions], max_boxes, spatial,
                             in_memory=False)
    encoded = encode_questions(questions, vocabs, question_len)
    return VqaDataset(encoded, regions, len(vocabs.answers))
