"""COCO / Karpathy loaders, the caption vocabulary and the bad-input catalogue."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_updown import storage
from ray_updown.data.coco import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TRAIN_SPLITS,
    UNK_ID,
    Vocab,
    build_vocab,
    caption_tokens,
    coco_split_map,
    encode_captions,
    image_files,
    load_coco_captions,
    load_karpathy,
    references,
)
from ray_updown.errors import DataError, StorageError


def _image(cocoid, split, captions, folder="train2014"):
    return {"cocoid": cocoid, "filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
            "split": split, "imgid": cocoid, "sentids": list(range(len(captions))),
            "sentences": [{"raw": c, "tokens": caption_tokens(c), "imgid": cocoid, "sentid": k}
                          for k, c in enumerate(captions)]}


def _karpathy():
    return {"dataset": "coco", "images": [
        _image(1, "train", ["A dog runs.", "A dog on grass", "the Dog plays"]),
        _image(2, "restval", ["A cat sleeps", "a cat on a bed"]),
        _image(3, "val", ["A zebra stands"], folder="val2014"),
        _image(4, "test", ["Two zebras graze", "zebras eat grass"], folder="val2014"),
    ]}


@pytest.fixture()
def karpathy_uri(tmp_path):
    uri = str(tmp_path / "dataset_coco.json")
    storage.write_json(uri, _karpathy())
    return uri


def test_load_karpathy_fields_and_paths(karpathy_uri):
    images = load_karpathy(karpathy_uri)
    assert [im.image_id for im in images] == [1, 2, 3, 4]
    assert [im.split for im in images] == ["train", "restval", "val", "test"]
    assert images[2].path == "val2014/COCO_val2014_000000000003.jpg"
    assert images[0].raw[0] == "A dog runs."
    assert images[0].tokens[0] == ("a", "dog", "runs")
    assert images[0].tokens[2] == ("the", "dog", "plays")


def test_sentence_without_tokens_is_tokenised_from_raw(tmp_path):
    data = _karpathy()
    del data["images"][0]["sentences"][0]["tokens"]
    data["images"][0]["sentences"][0]["raw"] = "A Dog, RUNS!"
    uri = str(tmp_path / "d.json")
    storage.write_json(uri, data)
    assert load_karpathy(uri)[0].tokens[0] == ("a", "dog", "runs")


def test_caption_tokens():
    assert caption_tokens("A man  riding a\tHorse.") == ["a", "man", "riding", "a", "horse"]
    assert caption_tokens("") == []


def test_build_vocab_counts_train_and_restval_only(karpathy_uri):
    images = load_karpathy(karpathy_uri)
    vocab = build_vocab(images, min_count=2)
    assert vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    # train+restval counts: a 5, dog 3, cat 2, on 2; zebra(s) only in val/test.
    assert vocab.itos[4:] == ["a", "dog", "cat", "on"]
    assert "zebras" not in vocab
    assert len(build_vocab(images, min_count=1, splits=("test",))) == 4 + 5


def test_vocab_encode_decode_and_clipping(karpathy_uri):
    vocab = build_vocab(load_karpathy(karpathy_uri), min_count=1)
    ids = vocab.encode(["a", "dog", "flies"], max_len=16)
    assert ids == [vocab.stoi["a"], vocab.stoi["dog"], UNK_ID, EOS_ID]
    assert vocab.encode(["a"] * 20, max_len=16) == [vocab.stoi["a"]] * 16 + [EOS_ID]
    assert vocab.decode([BOS_ID, vocab.stoi["a"], vocab.stoi["dog"], EOS_ID, vocab.stoi["cat"]]) == "a dog"
    assert vocab.decode_tokens([vocab.stoi["cat"], PAD_ID]) == ["cat"]
    batch = vocab.encode_batch([["a"], ["dog"] * 5], max_len=3)
    assert batch.dtype == np.int64 and batch.shape == (2, 4)
    assert batch[0].tolist() == [vocab.stoi["a"], EOS_ID, PAD_ID, PAD_ID]
    assert batch[1].tolist() == [vocab.stoi["dog"]] * 3 + [EOS_ID]


def test_encode_captions_clips_to_configured_length(karpathy_uri):
    images = load_karpathy(karpathy_uri)
    vocab = build_vocab(images, min_count=1)
    encoded = encode_captions(images, vocab, max_len=2)
    assert encoded[1][0] == [vocab.stoi["a"], vocab.stoi["dog"], EOS_ID]
    assert len(encoded[2]) == 2


def test_vocab_json_round_trip(karpathy_uri, tmp_path):
    vocab = build_vocab(load_karpathy(karpathy_uri), min_count=1)
    uri = str(tmp_path / "vocab.json")
    vocab.save(uri)
    again = Vocab.load(uri)
    assert again.itos == vocab.itos and again.stoi == vocab.stoi
    assert Vocab.from_json(vocab.to_json()).itos == vocab.itos


def test_vocab_file_with_duplicate_word_is_rejected(tmp_path):
    uri = str(tmp_path / "vocab.json")
    storage.write_json(uri, {"itos": ["<pad>", "<bos>", "<eos>", "<unk>", "dog", "dog"]})
    with pytest.raises(DataError) as err:
        Vocab.load(uri)
    assert uri in str(err.value) and "itos" in str(err.value) and "dog" in str(err.value)


def test_references_image_files_and_split_map(karpathy_uri):
    images = load_karpathy(karpathy_uri)
    assert references(images, "test") == {4: ["Two zebras graze", "zebras eat grass"]}
    assert [i for i, _ in image_files(images, TRAIN_SPLITS)] == [1, 2]
    assert image_files(images, "val") == [(3, "val2014/COCO_val2014_000000000003.jpg")]
    assert coco_split_map(images) == {1: "train", 2: "restval", 3: "val", 4: "test"}
    with pytest.raises(DataError, match="unknown split"):
        references(images, "dev")


def test_load_coco_captions(tmp_path):
    uri = str(tmp_path / "captions_val2014.json")
    storage.write_json(uri, {
        "images": [{"id": 3, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [{"id": 1, "image_id": 3, "caption": "A zebra."},
                        {"id": 2, "image_id": 3, "caption": "Zebra in a field"}]})
    assert load_coco_captions(uri) == {3: ["A zebra.", "Zebra in a field"], 9: []}


def test_coco_caption_of_unlisted_image_names_annotation(tmp_path):
    uri = str(tmp_path / "captions_val2014.json")
    storage.write_json(uri, {"images": [{"id": 3}],
                             "annotations": [{"id": 1, "image_id": 3, "caption": "x"},
                                             {"id": 2, "image_id": 7, "caption": "y"}]})
    with pytest.raises(DataError) as err:
        load_coco_captions(uri)
    assert uri in str(err.value) and "annotations[1]" in str(err.value) and "7" in str(err.value)


def test_s3_round_trip(s3_bucket):
    uri = f"{s3_bucket}/annotations/dataset_coco.json"
    storage.write_json(uri, _karpathy())
    images = load_karpathy(uri)
    assert [im.image_id for im in images] == [1, 2, 3, 4]
    assert images[3].raw == ("Two zebras graze", "zebras eat grass")


# ---- bad-input catalogue -------------------------------------------------------------------

def _write_text(tmp_path, text):
    uri = str(tmp_path / "dataset_coco.json")
    storage.write_text(uri, text)
    return uri


def _bad(tmp_path, mutate):
    data = _karpathy()
    mutate(data)
    uri = str(tmp_path / "dataset_coco.json")
    storage.write_json(uri, data)
    with pytest.raises(DataError) as err:
        load_karpathy(uri)
    assert uri in str(err.value)
    return str(err.value)


def test_malformed_json(tmp_path):
    uri = _write_text(tmp_path, '{"images": [}')
    with pytest.raises(DataError) as err:
        load_karpathy(uri)
    assert uri in str(err.value) and "malformed JSON" in str(err.value) and "line 1" in str(err.value)


def test_truncated_json(tmp_path):
    uri = _write_text(tmp_path, json.dumps(_karpathy())[:-40])
    with pytest.raises(DataError) as err:
        load_karpathy(uri)
    assert uri in str(err.value) and "truncated JSON" in str(err.value)


def test_missing_top_level_field(tmp_path):
    msg = _bad(tmp_path, lambda d: d.pop("images"))
    assert "missing top-level field 'images'" in msg


def test_missing_field_names_the_record(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][2].pop("filename"))
    assert "images[2] (cocoid 3)" in msg and "missing field 'filename'" in msg


def test_missing_raw_names_the_sentence(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][1]["sentences"][1].pop("raw"))
    assert "images[1] (cocoid 2) sentences[1]" in msg and "'raw'" in msg


def test_wrongly_typed_field(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][3].__setitem__("cocoid", "4"))
    assert "images[3]" in msg and "'cocoid' must be an integer" in msg


def test_boolean_is_not_an_id(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][0].__setitem__("cocoid", True))
    assert "images[0]" in msg and "cocoid" in msg


def test_wrongly_typed_tokens(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][0]["sentences"][0].__setitem__("tokens", ["a", 3]))
    assert "images[0] (cocoid 1) sentences[0]" in msg and "tokens[1] must be a string" in msg


def test_unknown_split(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][1].__setitem__("split", "dev"))
    assert "images[1] (cocoid 2)" in msg and "unknown split 'dev'" in msg


def test_duplicate_cocoid(tmp_path):
    msg = _bad(tmp_path, lambda d: d["images"][3].__setitem__("cocoid", 1))
    assert "images[3] (cocoid 1)" in msg and "images[0]" in msg


def test_empty_vocabulary(karpathy_uri):
    images = load_karpathy(karpathy_uri)
    with pytest.raises(DataError, match="empty vocabulary"):
        build_vocab(images, min_count=100)
    with pytest.raises(DataError, match="empty vocabulary"):
        build_vocab([], min_count=1)


def test_nonexistent_uri(tmp_path):
    uri = str(tmp_path / "nope" / "dataset_coco.json")
    with pytest.raises(StorageError) as err:
        load_karpathy(uri)
    assert uri in str(err.value) and "no such file" in str(err.value)
