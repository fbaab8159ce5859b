"""VQA training data: questions + vocabularies + the region-feature store -> padded tensors.

`prepare_vqa_data(data_cfg)` reads the VQA v2 files (data/vqa.py), builds the question and
answer vocabularies from the questions trained on (answers given >= `answer_min_count` times,
paper 3.3), optionally adds Visual Genome QA pairs, checks that every image has features,
and returns `VqaDataset`s whose batches are dicts of tensors:

    question_id [B] int64, question_tokens [B, T] int64, feats [B, K, D'] float32,
    mask [B, K] bool (True = real region), targets [B, A] float32 soft scores (when annotated)

K = the batch's largest region count, at most `max_boxes` (images with fewer regions are
padded, more are cut to the detector's best ranked); D' = feature dim + 7 when `spatial` adds
the box geometry (features/spatial.py). The regions come from the node's shared copy of the
store or from the store's reader (`feature_access`, features/regions.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Literal, Sequence

import numpy as np
import torch

from ray_updown import storage
from ray_updown.config import check_at_least, validate_config, validate_fields
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
from ray_updown.features.reader import FeatureStore
from ray_updown.features.regions import FlatRegions, Regions, StoreRegions, open_regions
from ray_updown.features.spatial import SPATIAL_DIM

log = logging.getLogger(__name__)

MAX_TARGETS = 10  # at most 10 distinct human answers per question


@dataclass
class VqaDataConfig:
    """Where the VQA data lives and how it becomes tensors (all locations are URIs)."""

    # Older configs' `features_in_memory: false` meant the store reader (config.py replaces it).
    DEPRECATED = {"features_in_memory": lambda on: {} if on else {"feature_access": "store"}}

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
    # Where batches read regions (features/regions.py): "shared" = one padding-free copy per node,
    # memory-mapped by every trial and worker; "store" = the row-group reader (stores larger
    # than memory); "auto" = shared when the copy fits the cache folder and memory.
    feature_access: Literal["auto", "shared", "store"] = "auto"
    feature_cache_dir: str = ""      # node-local folder of the shared copy; "" = $TMPDIR/ray-updown-features
    device_features_share: float = 0.5  # on CUDA: copy to the GPU when <= this share of free memory

    def validate(self) -> None:
        validate_fields(self)  # train_on
        if not self.train_on:
            raise ConfigError("must name at least one split", record="train_on")
        if "val" in self.train_on and not (self.val_questions and self.val_annotations):
            raise ConfigError("train_on has 'val' but val_questions/val_annotations are not set",
                              record="train_on")
        check_at_least(self, 1, "answer_min_count", "max_boxes")
        if not 0.0 <= self.device_features_share <= 1.0:
            raise ConfigError(f"must be in [0, 1], got {self.device_features_share}",
                              record="device_features_share")
        if self.vg_qa and not self.vg_image_data:
            raise ConfigError("vg_qa needs vg_image_data (to map VG images to COCO ids)",
                              record="vg_image_data")

    def absolute(self) -> "VqaDataConfig":
        """A copy whose local relative paths are absolute (Tune trials run in their own cwd)."""
        values = {k: absolute_uri(v) if k in _URI_FIELDS and isinstance(v, str) else v
                  for k, v in self.__dict__.items()}
        return VqaDataConfig(**values)



_URI_FIELDS = ("train_questions", "train_annotations", "val_questions", "val_annotations",
               "features", "glove", "vg_qa", "vg_image_data", "feature_cache_dir")


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
    """Questions with their images' regions; `__getitems__` builds a whole batch at once.

    `to(device)` moves the question arrays and (a flat copy's) regions to the device: the
    batch is then built there from its indices alone (features/regions.py)."""

    def __init__(self, encoded: EncodedQuestions, regions: Regions, num_answers: int):
        self.encoded = encoded
        self.regions = regions
        self.num_answers = int(num_answers)
        self.image_rows = regions.rows(encoded.image_ids)  # question -> image row, once
        self.device = torch.device("cpu")
        self._arrays = {"question_id": torch.from_numpy(encoded.question_ids),
                        "question_tokens": torch.from_numpy(encoded.tokens),
                        "target_index": torch.from_numpy(encoded.target_index),
                        "target_score": torch.from_numpy(encoded.target_score)}

    def __len__(self) -> int:
        return len(self.encoded)

    def to(self, device: torch.device | str) -> "VqaDataset":
        device = torch.device(device)
        if isinstance(self.regions, FlatRegions):
            self.regions.to(device)
        elif device.type != "cpu":
            raise DataError("only the shared flat copy of the features can move to a device")
        self._arrays = {k: v.to(device) for k, v in self._arrays.items()}
        self.device = device
        return self

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        feats, mask = self.regions.gather(self.image_rows[idx])
        at = torch.from_numpy(idx).to(self.device, non_blocking=True)
        a = self._arrays
        batch = {"question_id": a["question_id"][at], "question_tokens": a["question_tokens"][at],
                 "feats": feats, "mask": mask}
        if self.encoded.annotated:
            targets = torch.zeros(len(idx), self.num_answers + 1, device=self.device)
            cols = a["target_index"][at].clamp(min=-1) % (self.num_answers + 1)  # -1 -> last
            targets.scatter_(1, cols, a["target_score"][at])
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
    regions = open_regions(store, all_ids, cfg.max_boxes, cfg.spatial, cfg.feature_access,
                           cfg.feature_cache_dir or None)
    train = VqaDataset(encode_questions(train_questions, vocabs, question_len), regions, len(answers))
    val = None
    if "val" in loaded:
        val = VqaDataset(encode_questions(loaded["val"], vocabs, question_len), regions, len(answers))
    stats = {"train_questions": len(train), "vg_questions": len(vg),
             "val_questions": len(val) if val is not None else 0,
             "answers": len(answers), "question_words": len(vocabs.questions),
             "feature_source": regions.source}
    return PreparedVqa(vocabs, train, val, embeddings, SPATIAL_DIM if cfg.spatial else 0,
                       store.feature_dim, stats)


def questions_dataset(questions: Sequence[VqaQuestion], vocabs: VqaVocabularies,
                      store: FeatureStore, question_len: int, max_boxes: int, spatial: bool,
                      questions_uri: str = "<questions>") -> VqaDataset:
    """A dataset for prediction (test-dev / test-std questions need no annotations)."""
    check_features(questions, store, questions_uri)
    regions = StoreRegions(store, [q.image_id for q in questions], max_boxes, spatial)
    encoded = encode_questions(questions, vocabs, question_len)
    return VqaDataset(encoded, regions, len(vocabs.answers))
