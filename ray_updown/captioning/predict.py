"""Captioning a split with trained captioners: beam search -> COCO server results -> metrics.

    captioner = load_captioner("runs/xe/checkpoint_.../")
    out = evaluate_split([captioner], karpathy="world/annotations/dataset_coco.json",
                         features="features/", split="test", name="updown", out_dir="results/")
    out["metrics"]["CIDEr"], out["results_file"]   # .../captions_test2014_updown_results.json

Several captioners decode as an ensemble (their next-word log-probabilities averaged: the
paper's 4-model server submission); they must share one vocabulary and feature layout.
Decoding follows the paper (beam 5, no word twice in a row) unless `rules` say otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ray_updown import storage
from ray_updown.captioning.data import check_features_present, region_tensors
from ray_updown.captioning.decoding import DecodingRules, beam_search
from ray_updown.captioning.model import CaptionerConfig, UpDownCaptioner
from ray_updown.data.coco import Vocab, images_in_split, load_karpathy
from ray_updown.errors import CheckpointError, ConfigError, DataError
from ray_updown.features.reader import FeatureStore
from ray_updown.features.spatial import SPATIAL_DIM
from ray_updown.metrics.caption_eval import evaluate_captions, results_filename, write_caption_results
from ray_updown.train.run_checkpoint import load_checkpoint_dir
from ray_updown.weights import load_state_strict

EVAL_SPLITS = ("val", "test")


@dataclass
class LoadedCaptioner:
    """A captioner from a checkpoint with what it needs to be fed: its vocabulary and the
    number of regions it was trained on (its model config says whether spatial features
    are appended)."""

    model: UpDownCaptioner
    vocab: Vocab
    max_regions: int
    checkpoint: str
    config: dict


@dataclass
class CaptionPrediction:
    """One image's caption with the attention of each generated word (for the pictures)."""

    caption: str
    words: list[str]
    attention: np.ndarray  # [len(words) + 1, k]: α_t over the image's k real regions (EOS last)
    boxes: np.ndarray  # [k, 4] x1 y1 x2 y2 of those regions


def load_captioner(checkpoint_uri: str, device: torch.device | str | None = None
                   ) -> LoadedCaptioner:
    """Rebuild a captioner from a checkpoint directory written by train_captioner."""
    weights, config, _ = load_checkpoint_dir(checkpoint_uri)
    if config.get("kind") != "updown_captioner" or "model" not in config or "vocab" not in config:
        raise CheckpointError("not a captioner checkpoint (config.json lacks kind "
                              "'updown_captioner', model or vocab)", file=checkpoint_uri)
    try:
        vocab = Vocab(list(config["vocab"]))
        model_config = CaptionerConfig(**config["model"])
        model_config.validate()
    except (TypeError, DataError, ConfigError) as exc:
        raise CheckpointError(f"malformed config.json ({exc})", file=checkpoint_uri) from None
    if model_config.vocab_size != len(vocab):
        raise CheckpointError(f"model vocab_size {model_config.vocab_size} differs from its "
                              f"vocabulary of {len(vocab)} words", file=checkpoint_uri)
    model = UpDownCaptioner(model_config)
    load_state_strict(model, weights, checkpoint_uri)
    model.to(device or "cpu").eval()
    max_regions = int(config.get("data", {}).get("max_regions", 100))
    return LoadedCaptioner(model, vocab, max_regions, checkpoint_uri, config)


def _as_models(models: UpDownCaptioner | Sequence[UpDownCaptioner]) -> list[UpDownCaptioner]:
    models = [models] if isinstance(models, UpDownCaptioner) else list(models)
    if not models:
        raise ConfigError("no captioner to decode with")
    dims = {m.config.input_dim for m in models}
    if len(dims) != 1:
        raise ConfigError(f"ensemble members expect different region widths {sorted(dims)}")
    return models


def _decode(models: list[UpDownCaptioner], store: FeatureStore, image_ids: Sequence[Any],
            vocab: Vocab, beam_size: int, rules: DecodingRules | None, batch_size: int,
            max_regions: int, with_attention: bool):
    """Yield (image_id, best beam's tokens, its attention or None, feature record, region
    mask) image by image."""
    config = models[0].config
    if config.vocab_size != len(vocab):
        raise ConfigError(f"the vocabulary has {len(vocab)} words, the model {config.vocab_size}")
    spatial = config.spatial_dim == SPATIAL_DIM
    if config.spatial_dim not in (0, SPATIAL_DIM):
        raise ConfigError(f"unsupported spatial_dim {config.spatial_dim}")
    check_features_present(store, image_ids)
    device = next(models[0].parameters()).device
    for m in models:
        m.eval()
    for start in range(0, len(image_ids), batch_size):
        ids = list(image_ids[start:start + batch_size])
        records = [store.get(i) for i in ids]
        if records[0].feature_dim != config.feat_dim:
            raise DataError(f"the store's features are {records[0].feature_dim}-d, the model "
                            f"reads {config.feat_dim}-d", file=store.uri)
        feats, mask = region_tensors(records, max_regions, spatial)
        result = beam_search(models, feats.to(device), mask.to(device), beam_size=beam_size,
                             rules=rules, return_attention=with_attention)
        best = result.best()
        for b, image_id in enumerate(ids):
            attention = best.attention[b].cpu().numpy() if with_attention else None
            yield image_id, best.tokens[b].tolist(), attention, records[b], mask[b].numpy()


def predict_captions(models: UpDownCaptioner | Sequence[UpDownCaptioner],
                     store: FeatureStore | str, image_ids: Sequence[Any], vocab: Vocab,
                     beam_size: int = 5, rules: DecodingRules | None = None,
                     batch_size: int = 50, max_regions: int = 100) -> dict[Any, str]:
    """{image_id: caption} by beam search (an ensemble when several models are given).

    `store` is a FeatureStore or its URI; `max_regions` should be the training run's
    (LoadedCaptioner.max_regions)."""
    models = _as_models(models)
    store = FeatureStore(store) if isinstance(store, str) else store
    return {image_id: vocab.decode(tokens) for image_id, tokens, _, _, _ in
            _decode(models, store, image_ids, vocab, beam_size, rules, batch_size, max_regions,
                    with_attention=False)}


def predict_with_attention(models: UpDownCaptioner | Sequence[UpDownCaptioner],
                           store: FeatureStore | str, image_ids: Sequence[Any], vocab: Vocab,
                           beam_size: int = 5, rules: DecodingRules | None = None,
                           batch_size: int = 50, max_regions: int = 100
                           ) -> dict[Any, CaptionPrediction]:
    """Like predict_captions, with each word's attention over the image's regions (figs 5-7)."""
    models = _as_models(models)
    store = FeatureStore(store) if isinstance(store, str) else store
    out = {}
    for image_id, tokens, attention, record, mask in _decode(
            models, store, image_ids, vocab, beam_size, rules, batch_size, max_regions, True):
        words = vocab.decode_tokens(tokens)
        k = int(mask.sum())
        out[image_id] = CaptionPrediction(" ".join(words), words,
                                          attention[:len(words) + 1, :k], record.boxes[:k])
    return out


def evaluate_split(captioners: str | LoadedCaptioner | Sequence[str | LoadedCaptioner],
                   karpathy: str, features: str, split: str = "test", name: str = "updown",
                   out_dir: str | None = None, beam_size: int = 5,
                   rules: DecodingRules | None = None, max_images: int = 0,
                   batch_size: int = 50, spice: bool | None = None,
                   device: torch.device | str | None = None) -> dict:
    """Caption a Karpathy split (val or test), write the server results file, score it.

    `captioners`: checkpoint URIs or loaded captioners (several = an ensemble). Returns
    {"split", "name", "num_images", "results_file" (None without out_dir), "metrics":
    {Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (+ SPICE), num_images}, "captions"}.
    """
    if split not in EVAL_SPLITS:
        raise ConfigError(f"unknown split {split!r}: captions are evaluated on the Karpathy "
                          f"{' or '.join(EVAL_SPLITS)} split", record="split")
    filename = results_filename(split, name)  # checks the name before any decoding
    items = [captioners] if isinstance(captioners, (str, LoadedCaptioner)) else list(captioners)
    loaded = [c if isinstance(c, LoadedCaptioner) else load_captioner(c, device) for c in items]
    if not loaded:
        raise ConfigError("no captioner to evaluate")
    for other in loaded[1:]:
        if other.vocab.itos != loaded[0].vocab.itos:
            raise CheckpointError(f"ensemble members have different vocabularies "
                                  f"({loaded[0].checkpoint} vs this one)", file=other.checkpoint)
    images = images_in_split(load_karpathy(karpathy), split)
    if max_images:
        images = images[:max_images]
    if not images:
        raise DataError(f"split {split!r} has no images", file=karpathy)
    for image in images:
        if not image.raw:
            raise DataError("has no reference captions to evaluate against", file=karpathy,
                            record=f"image {image.image_id}")
    store = FeatureStore(features)
    captions = predict_captions([c.model for c in loaded], store,
                                [im.image_id for im in images], loaded[0].vocab, beam_size,
                                rules, batch_size, loaded[0].max_regions)
    results_file = None
    if out_dir is not None:
        results_file = storage.join(out_dir, filename)
        write_caption_results(results_file, captions)
    metrics = evaluate_captions({im.image_id: list(im.raw) for im in images}, captions,
                                spice=spice)
    return {"split": split, "name": name, "num_images": len(images),
            "results_file": results_file, "metrics": metrics, "captions": captions}
