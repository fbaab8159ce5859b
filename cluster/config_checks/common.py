"""What every check shares: problems with their place, the target Ray release, images, secrets."""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[2]

SECRET_PATTERNS = (
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)\b(aws_secret_access_key|aws_session_token|wandb_api_key|hf_token|github_token)"
                r"\b\s*[:=]\s*['\"]?[^\s'\"]"), "a secret assigned in the file"),
    (re.compile(r"(?i)name:\s*['\"]?(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|WANDB_API_KEY|HF_TOKEN)"
                r"['\"]?\s*\n\s*value:"), "a secret as a literal env value (use valueFrom)"),
    (re.compile(r"name:\s*['\"]?RAY_AUTH_TOKEN['\"]?\s*\n\s*value:"),
     "a literal Ray auth token (use valueFrom.secretKeyRef, or authOptions)"),
    (re.compile(r"\bRAY_AUTH_TOKEN\s*[:=]\s*['\"]?(?![$'\"\s])\S"),
     "a literal Ray auth token (mount its file: RAY_AUTH_TOKEN_PATH)"),
)


@dataclass(frozen=True)
class Problem:
    file: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}"


class Report:
    """Problems found in one file, each at the dotted path of the offending field."""

    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(self.file, where or "(top)", message))


@dataclass(frozen=True)
class RayTarget:
    """The Ray release images must carry: the installed release's family, inside pyproject's range."""

    version: str
    requirement: SpecifierSet

    @property
    def family(self) -> str:
        return ".".join(self.version.split(".")[:2])


def default_target(repo_root: Path = REPO_ROOT) -> RayTarget:
    pyproject = tomllib.loads((repo_root / "pyproject.toml").read_text())
    requirement = SpecifierSet()
    for dependency in pyproject["project"]["dependencies"]:
        parsed = Requirement(dependency)
        if parsed.name == "ray":
            requirement = parsed.specifier
    return RayTarget(importlib.metadata.version("ray"), requirement)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1].split("@")[0] if ":" in last else ""


def ray_version_of_image(image: str) -> str | None:
    """rayproject/ray:2.60.0-py311-gpu -> 2.60.0; ray-updown:0.1.0-ray2.60.0-py311-gpu -> 2.60.0."""
    tag = image_tag(image)
    name = image.split(":")[0] if ":" in image.rsplit("/", 1)[-1] else image
    if name.startswith("rayproject/"):
        match = re.match(r"(\d+\.\d+\.\d+)", tag)
    else:  # our images name the Ray release they are built on after "ray"
        match = re.search(r"ray-?(\d+\.\d+\.\d+)", tag)
    return match.group(1) if match else None


def is_gpu_image(image: str) -> bool:
    return bool(re.search(r"-(gpu|cu\d+)\b", image_tag(image)))


def check_image(rep: Report, where: str, image: Any, target: RayTarget) -> None:
    """Pinned (no latest/nightly/untagged), on the installed Ray's family, inside pyproject's range."""
    if not isinstance(image, str) or not image:
        rep.add(where, f"image must be a non-empty string, got {image!r}")
        return
    tag = image_tag(image)
    if not tag or tag.startswith(("latest", "nightly")):
        rep.add(where, f"image {image!r} is not pinned to a release (no tag, latest or nightly)")
        return
    version = ray_version_of_image(image)
    if version is None:
        rep.add(where, f"cannot tell which Ray release image {image!r} carries")
    elif ".".join(version.split(".")[:2]) != target.family:
        rep.add(where, f"image {image!r} carries Ray {version}, the installed Ray is {target.version}")
    elif Version(version) not in target.requirement:
        rep.add(where, f"image {image!r} carries Ray {version}, outside pyproject's ray{target.requirement}")


def check_secrets(text: str, file: str) -> list[Problem]:
    """Credentials never belong in these files: instance profiles, IRSA and env at run time do."""
    rep = Report(file)
    for pattern, what in SECRET_PATTERNS:
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            rep.add(f"line {line}", f"looks like {what}; keep credentials out of files")
    return rep.problems
