"""How the project reaches the cluster: the runtime env that ships it and the image that holds it."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, Problem, RayTarget, Report, check_image

# The runtime env that ships the repository must leave these behind (size, secrets, outputs).
REQUIRED_EXCLUDES = (".venv", ".git", "runs", "world")
REMOTE_URI = re.compile(r"^(s3|gs|https?|file|gcs)://")


def project_dir_in_image(repo_root: Path = REPO_ROOT) -> str | None:
    """The last WORKDIR of cluster/Dockerfile: where the image holds the project."""
    dockerfile = repo_root / "cluster" / "Dockerfile"
    if not dockerfile.is_file():
        return None
    dirs = re.findall(r"(?m)^\s*WORKDIR\s+(\S+)", dockerfile.read_text())
    return dirs[-1] if dirs else None


def check_runtime_env(env: Any, rep: Report, where: str, *, required_excludes: tuple[str, ...] = (),
                      image_dir: str | None = None, repo_root: Path = REPO_ROOT) -> None:
    """Ray's own RuntimeEnv parser, plus a working_dir that exists where the job is submitted from.

    A working_dir that is an absolute path lives in the image (KubeRay's submitter pod runs the
    head image and uploads it), so it must be the project directory of cluster/Dockerfile.
    """
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        rep.add(where, f"a runtime env must be a mapping, got {type(env).__name__}")
        return
    working_dir = env.get("working_dir")
    parsed = copy.deepcopy(env)
    if not isinstance(working_dir, str) or not working_dir:
        rep.add(f"{where}.working_dir", "required: the jobs run from the project's directory")
    elif working_dir.startswith("/"):
        if working_dir != image_dir:
            rep.add(f"{where}.working_dir", f"{working_dir} is not the image's project directory {image_dir}")
        parsed["working_dir"] = str(repo_root)  # Ray checks local paths here; this one is in the image
    elif not REMOTE_URI.match(working_dir) and not (repo_root / working_dir).is_dir():
        rep.add(f"{where}.working_dir", f"{working_dir!r} is not a directory of the repository")
    if isinstance(parsed.get("working_dir"), str) and not REMOTE_URI.match(parsed["working_dir"]):
        parsed["working_dir"] = str(repo_root / parsed["working_dir"])
    try:
        RuntimeEnv(**parsed)
    except (TypeError, ValueError) as exc:
        rep.add(where, f"Ray rejects the runtime env: {exc}")
    excludes = env.get("excludes") if isinstance(env.get("excludes"), list) else []
    for pattern in required_excludes:
        if pattern not in excludes:
            rep.add(f"{where}.excludes", f"must exclude {pattern!r}")


def check_dockerfile(text: str, file: str, target: RayTarget) -> list[Problem]:
    """Every FROM pinned to the target Ray release (ARG defaults resolved); project and Java installed."""
    rep = Report(file)
    args: dict[str, str] = {}
    froms = 0
    for number, line in enumerate(re.sub(r"\\\n", " ", text).splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        instruction = words[0].upper()
        if instruction == "ARG" and len(words) > 1 and "=" in words[1]:
            key, value = words[1].split("=", 1)
            args[key] = value.strip("\"'")
        elif instruction == "FROM":
            froms += 1
            image = next((w for w in words[1:] if not w.startswith("--")), "")
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
            check_image(rep, f"FROM (instruction {number})", image, target)
    if froms == 0:
        rep.add("FROM", "no base image")
    if not re.search(r"pip install[^\n]*\s(-e\s+)?\.(\s|$)", text):
        rep.add("RUN", "the project is never pip-installed")
    if not re.search(r"openjdk|default-jre", text):
        rep.add("RUN", "no Java runtime (pycocoevalcap's tokenizer and METEOR need it)")
    return rep.problems


# cluster/examples/: the configs the README's steps pass to the jobs, and what each loads into.
EXAMPLE_CONFIGS = {
    "captioner.yaml": ("config", "ray_updown.captioning.config", "CaptionTrainConfig"),
    "vqa.yaml": ("config", "ray_updown.vqa.config", "VqaTrainConfig"),
    "vqa_space.yaml": ("search space", "ray_updown.vqa.config", "VqaTrainConfig"),
}


def check_example_config(path: Path, file: str) -> list[Problem]:
    """Load an example config as its job would: unknown keys, wrong types and bad values fail."""
    import importlib

    from ray_updown.config import load_config
    from ray_updown.errors import ConfigError
    from ray_updown.train.search import load_search_space, tune_param_space

    if path.name not in EXAMPLE_CONFIGS:
        return [Problem(file, "(top)", f"not an example config of this folder ({sorted(EXAMPLE_CONFIGS)})")]
    what, module, name = EXAMPLE_CONFIGS[path.name]
    cls = getattr(importlib.import_module(module), name)
    try:
        if what == "config":
            load_config(cls, str(path))
        else:
            tune_param_space(cls(), load_search_space(str(path)))
    except ConfigError as exc:
        return [Problem(file, "(top)", f"does not load as a {name} {what}: {exc}")]
    return []
