"""GloVe text files -> embedding matrices."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from ray_updown import storage
from ray_updown.data.glove import load_glove
from ray_updown.errors import DataError, StorageError

GLOVE = """the 0.1 0.2 0.3
dog -1 0.5 2e-1
. . . 7 8 9
cat 1 1 1
"""


def _write(tmp_path, text, name="glove.synthetic.3d.txt"):
    uri = str(tmp_path / name)
    storage.write_text(uri, text)
    return uri


def test_load_glove_rows_and_missing_words(tmp_path):
    uri = _write(tmp_path, GLOVE)
    words = ["<pad>", "dog", "the", "zebra", ". . .", "dog"]
    matrix, n_missing = load_glove(uri, words, dim=3)
    assert matrix.dtype == np.float32 and matrix.shape == (6, 3)
    np.testing.assert_allclose(matrix[1], [-1, 0.5, 0.2])
    np.testing.assert_allclose(matrix[2], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(matrix[4], [7, 8, 9])       # a word containing spaces
    np.testing.assert_array_equal(matrix[5], matrix[1])    # repeated word, same row
    assert not matrix[0].any() and not matrix[3].any()     # missing words: zero rows
    assert n_missing == 2


def test_word2vec_header_and_gzip(tmp_path):
    uri = str(tmp_path / "g.txt.gz")
    storage.write_bytes(uri, gzip.compress(("4 3\n" + GLOVE).encode()))
    matrix, n_missing = load_glove(uri, ["cat"], dim=3)
    assert n_missing == 0 and matrix[0].tolist() == [1, 1, 1]


@pytest.mark.parametrize("bad_line, lineno", [
    ("short 0.1 0.2", 3),             # too few values
    ("long 1 2 3 4", 3),              # one value too many
    ("nan-ish 1 x 3", 3),             # not a number
])
def test_wrong_dimension_names_the_line(tmp_path, bad_line, lineno):
    lines = GLOVE.splitlines()
    lines.insert(lineno - 1, bad_line)
    uri = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_glove(uri, ["short", "long", "nan-ish", "dog"], dim=3)
    assert uri in str(err.value) and f"line {lineno}" in str(err.value)


def test_file_of_another_dimension(tmp_path):
    uri = _write(tmp_path, GLOVE)
    with pytest.raises(DataError, match="line 1: has 3 values, expected dim = 300"):
        load_glove(uri, ["dog"], dim=300)


def test_missing_file(tmp_path):
    with pytest.raises(StorageError):
        load_glove(str(tmp_path / "none.txt"), ["dog"], dim=3)
