"""GloVe word vectors (text layout) -> an embedding matrix for a vocabulary (paper 3.3).

File layout: one word a line, ``word v_1 ... v_dim`` separated by single spaces (glove.6B,
glove.840B; a ``.gz`` file is decompressed on the fly). The file is streamed, so the 5 GB
840B file never sits in memory. Words of the 840B file that contain spaces (". . .") are read
correctly: the last `dim` fields are the vector.

Rows of words that are not in the file (and of PAD/BOS/EOS/UNK) are ZERO, as in the public
re-implementation's GloVe initialisation; the embedding is trained from there.
"""

from __future__ import annotations

import gzip
import io
from typing import Sequence

import numpy as np

from ray_updown import storage
from ray_updown.errors import DataError

__all__ = ["load_glove"]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_glove(uri: str, words: Sequence[str], dim: int = 300,
               max_lines: int | None = None) -> tuple[np.ndarray, int]:
    """(float32 [len(words), dim] matrix, number of words not found in the file).

    `max_lines` stops after that many lines (a quick check of the file's layout).

    Row i holds the vector of words[i]; missing words keep a zero row, and `n_missing` counts
    distinct missing words. A line with the wrong number of values (any line), or a value that
    is not a number (checked on the lines of requested words, which are the ones parsed), is a
    DataError naming `line N`. A word2vec-style header line ("400000 300") is skipped.
    """
    if dim <= 0:
        raise DataError(f"dim must be positive, got {dim}", file=uri)
    wanted: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        wanted.setdefault(w, []).append(i)
    matrix = np.zeros((len(words), dim), dtype=np.float32)
    found: set[str] = set()
    with storage.open_uri(uri, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="\n")
        try:
            for lineno, line in enumerate(text, start=1):
                if max_lines is not None and lineno > max_lines:
                    break
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                parts = line.rstrip(" ").split(" ")
                if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    continue
                n_values = len(parts) - 1
                # More fields than dim + 1 is a word with spaces, unless the extra fields are
                # numbers too (then the vector itself is too long).
                if n_values < dim or (n_values > dim and all(map(_is_number, parts[1:n_values - dim + 1]))):
                    raise DataError(f"has {n_values} values, expected dim = {dim}", file=uri,
                                    record=f"line {lineno}")
                word = " ".join(parts[:len(parts) - dim])
                if word not in wanted or word in found:
                    continue
                try:
                    vector = np.asarray(parts[len(parts) - dim:], dtype=np.float32)
                except ValueError:
                    raise DataError(f"a value of word '{word[:40]}' is not a number", file=uri,
                                    record=f"line {lineno}") from None
                matrix[wanted[word]] = vector
                found.add(word)
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text ({exc.reason})", file=uri) from None
        except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
            raise DataError(f"cannot read ({type(exc).__name__}: {exc})", file=uri) from None
    return matrix, sum(1 for w in wanted if w not in found)
