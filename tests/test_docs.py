"""The README is the front door and docs/ holds one page per topic: every relative link of
them resolves (file and heading), and every command the README names exists (a job script,
a `ray-updown` subcommand, a make target)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "cluster" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    lines = page.read_text(encoding="utf-8").splitlines()
    fence, found = False, set()
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            goal = (page.parent / path).resolve() if path else page
            if not goal.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and goal.suffix == ".md" and anchor not in anchors(goal):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_every_command_the_readme_names_exists():
    from ray_updown.cli import build_parser

    text = (REPO / "README.md").read_text(encoding="utf-8")
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    jobs = re.findall(r"python (jobs/[\w]+\.py)", text)
    named = re.findall(r"ray-updown ([a-z][\w-]*)", text)
    makes = re.findall(r"make ([\w-]+)", text)
    assert jobs and named and makes
    assert [j for j in jobs if not (REPO / j).exists()] == []
    assert [n for n in named if n not in subcommands] == []
    assert [m for m in makes if m not in targets] == []


def test_the_development_page_lists_the_cli_s_subcommands_as_its_table_does():
    from ray_updown.cli_commands import COMMANDS

    text = (REPO / "docs" / "development.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([\w-]+)` \| (.+) \|$", text, re.M)
    assert listed == [(c.name, c.help) for c in COMMANDS]


def _pages_and_manifests() -> dict[Path, str]:
    files = PAGES + sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
    return {f: f.read_text(encoding="utf-8") for f in files}


def test_extract_is_given_our_checkpoint_never_a_published_weights_file():
    # `extract` refuses a published .pkl/.pth/.bin: `convert-detector` comes first.
    published = re.compile(r"--checkpoint\s+\S+\.(?:pkl|pth|bin)\b")
    found = [f"{f.relative_to(REPO)}: {m}" for f, text in _pages_and_manifests().items()
             for m in published.findall(text)]
    assert found == []


def test_no_page_says_help_lists_the_config_keys():
    # --help lists the flags; --show-config prints the config keys.
    claims = [f"{f.relative_to(REPO)}: {m}" for f, text in _pages_and_manifests().items()
              for m in re.findall(r"--help`? lists[^.]*config key", text.replace("\n", " "))]
    assert claims == []


def test_the_laptop_extraction_runs_at_the_demo_detector_s_scale():
    from ray_updown.detector.train.config import demo_model_config

    config = demo_model_config()
    text = (REPO / "docs" / "extraction.md").read_text(encoding="utf-8")
    sides = re.findall(r"--checkpoint runs/detector/ \\\n\s+min_side=(\d+) max_side=(\d+)", text)
    assert sides == [(str(config.min_size), str(config.max_size))]
