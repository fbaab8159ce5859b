"""`python -m cluster.config_checks [REPO_ROOT]`: print every problem; exit status 1 if any."""

import sys
from pathlib import Path

from . import REPO_ROOT, check_all


def main(argv: list[str]) -> int:
    problems, kinds = check_all(Path(argv[0]) if argv else REPO_ROOT)
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(kinds)} cluster files checked, {len(problems)} problems")
    return 1 if problems else 0


sys.exit(main(sys.argv[1:]))
