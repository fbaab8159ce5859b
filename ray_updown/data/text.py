"""Shared pieces of the dataset loaders: record-field checks and the word vocabulary.

Every loader validates the JSON it reads with `field`/`records`, so a bad file always fails
with one `DataError` naming the file, the record (``images[12]``, ``question_id 42``) and the
problem, never with a KeyError deep inside training.

`Vocab` is used both by the captioner (words of Karpathy captions) and by the VQA model (words
of questions). Its special tokens are fixed: PAD = 0, BOS = 1, EOS = 2, UNK = 3, so every model
can rely on `pad_index == 0`.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Iterable, Sequence

import numpy as np

from ray_updown import storage
from ray_updown.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", bool: "a boolean"}


def _type_name(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _has_type(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    # JSON true/false must not pass as an id or a size.
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def field(obj: Any, key: str, types: type | tuple[type, ...], file: str, record: str,
          optional: bool = False, default: Any = None) -> Any:
    """`obj[key]`, checked to be of `types`; a DataError naming file and record otherwise.

    JSON null counts as missing for optional fields (VG writes `"coco_id": null`).
    """
    if not isinstance(obj, dict):
        raise DataError(f"expected an object, got {type(obj).__name__}", file=file, record=record)
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return default
        raise DataError(f"missing field '{key}'", file=file, record=record)
    value = obj[key]
    if not _has_type(value, types):
        raise DataError(f"field '{key}' must be {_type_name(types)}, got "
                        f"{type(value).__name__} {value!r:.60}", file=file, record=record)
    return value


def records(obj: Any, key: str | None, file: str) -> list:
    """The list `obj[key]` (or `obj` itself when key is None) of a loaded JSON file."""
    if key is not None:
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object with '{key}', got {type(obj).__name__}",
                            file=file)
        if key not in obj:
            raise DataError(f"missing top-level field '{key}'", file=file)
        obj = obj[key]
    if not isinstance(obj, list):
        raise DataError(f"'{key or 'top level'}' must be a list, got {type(obj).__name__}",
                        file=file)
    return obj


def string_list(obj: dict, key: str, file: str, record: str, optional: bool = False) -> list[str]:
    """A list-of-strings field (`tokens`, `names`, `attributes`)."""
    values = field(obj, key, list, file, record, optional=optional, default=[])
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{key}[{i}] must be a string, got {type(v).__name__}",
                            file=file, record=record)
    return values


_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def caption_tokens(raw: str) -> list[str]:
    """Lowercase, punctuation to spaces, split on whitespace.

    The paper (3.2) lowercases and splits on white space; removing punctuation first keeps
    "dog." and "dog" one word, as the `tokens` field of Karpathy's dataset_coco.json does.
    """
    return raw.lower().translate(_PUNCTUATION).split()


class ListFile:
    """A vocabulary stored as its `itos` list: {"kind": KIND, "itos": [...]} in JSON, the one
    persistence of the word and the answer vocabularies."""

    KIND = ""   # the file's "kind"
    WHAT = ""   # what the list is, for errors
    itos: list[str]

    def to_json(self) -> dict:
        return {"kind": self.KIND, "itos": list(self.itos)}

    @classmethod
    def from_json(cls, obj: Any, file: str | None = None):
        itos = field(obj, "itos", list, file or f"<{cls.WHAT}>", cls.WHAT)
        try:
            return cls(list(itos))
        except DataError as exc:
            raise DataError(exc.problem, file=file, record="itos") from None

    def save(self, uri: str) -> None:
        storage.write_json(uri, self.to_json())

    @classmethod
    def load(cls, uri: str):
        return cls.from_json(storage.read_json(uri), file=uri)


@dataclass
class Vocab(ListFile):
    """Words <-> ids. `itos[0:4]` are always PAD, BOS, EOS, UNK."""

    KIND, WHAT = "word_vocab", "vocabulary"

    itos: list[str]
    stoi: dict[str, int] = dc_field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if tuple(self.itos[:len(SPECIALS)]) != SPECIALS:
            raise DataError(f"vocabulary must start with {list(SPECIALS)}, "
                            f"got {self.itos[:len(SPECIALS)]}")
        self.stoi = {}
        for i, word in enumerate(self.itos):
            if not isinstance(word, str) or not word:
                raise DataError(f"entry {i} is not a non-empty string: {word!r}")
            if word in self.stoi:
                raise DataError(f"word '{word}' appears twice (ids {self.stoi[word]} and {i})")
            self.stoi[word] = i

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def id(self, word: str) -> int:
        return self.stoi.get(word, UNK_ID)

    def encode(self, tokens: Sequence[str], max_len: int = 16) -> list[int]:
        """Ids of the first `max_len` tokens followed by EOS (no BOS, no padding)."""
        return [self.stoi.get(t, UNK_ID) for t in tokens[:max_len]] + [EOS_ID]

    def encode_batch(self, captions: Sequence[Sequence[str]], max_len: int = 16) -> np.ndarray:
        """[N, max_len + 1] int64: `encode` of each caption, right-padded with PAD."""
        out = np.full((len(captions), max_len + 1), PAD_ID, dtype=np.int64)
        for i, tokens in enumerate(captions):
            ids = self.encode(tokens, max_len)
            out[i, :len(ids)] = ids
        return out

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first EOS; PAD and BOS are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return words

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.decode_tokens(ids))


def vocab_from_counts(counts: Counter, min_count: int, what: str) -> Vocab:
    """Specials, then words with count >= min_count by decreasing count, ties alphabetical
    (the order of the Up-Down captioner's preprocessing)."""
    words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                   key=lambda w: (-counts[w], w))
    if not words:
        raise DataError(f"empty vocabulary: no word occurs at least {min_count} times "
                        f"in {what} ({len(counts)} distinct words)")
    return Vocab(list(SPECIALS) + words)
