"""`ray job submit --working-dir . -- python jobs/tune_captioner.py …` (or plain `python jobs/tune_captioner.py …`).

A thin entry: the flags are those of `ray-updown tune-captioner` (see `--help`). Under ray job submit
it runs on the cluster (RAY_ADDRESS); as a plain script it starts an embedded local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, under ray job submit

from ray_updown.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune-captioner", *sys.argv[1:]]))
