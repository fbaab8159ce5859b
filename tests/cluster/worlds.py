"""Tiny data for the cluster tests: the VQA world of tests/tiny_vqa.py (shared with the fault
suite) and the captioner's toy world (reused
from tests/test_train_captioner.py)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/
from test_train_captioner import build_toy_world, toy_config  # noqa: E402,F401
from tiny_vqa import vqa_config, write_vqa_world  # noqa: E402,F401
