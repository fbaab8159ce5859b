"""Offline checks of everything under cluster/: no cloud, no Kubernetes API, no Docker daemon.

    python -m cluster.config_checks          # from the repository root; exit status 1 on problems

- `ray up` files: the installed Ray autoscaler's own JSON schema (ray/autoscaler/ray-schema.json)
  and its prepare_config/validate_config, then what a launch would only reveal on a live cloud.
- KubeRay RayCluster/RayJob manifests: the fields of the ray.io/v1 types and KubeRay's rules.
- The runtime env (Ray's own RuntimeEnv parser), the Dockerfile, and credentials in any file.
- The example job configs (examples/), loaded into the config classes their jobs use.
- Every image is pinned to the installed Ray's release family, inside pyproject.toml's range.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .common import REPO_ROOT, Problem, RayTarget, Report, check_image, check_secrets, default_target
from .kuberay import PLANNED_JOBS, check_raycluster, check_raycluster_spec, check_rayjob
from .project import REQUIRED_EXCLUDES, check_dockerfile, check_example_config, check_runtime_env
from .ray_up import autoscaler_schema, check_ray_up

__all__ = ["PLANNED_JOBS", "REPO_ROOT", "Problem", "RayTarget", "Report", "autoscaler_schema",
           "check_example_config",
           "check_all", "check_dockerfile", "check_image", "check_ray_up", "check_raycluster",
           "check_raycluster_spec", "check_rayjob", "check_runtime_env", "check_secrets",
           "check_yaml_document", "default_target"]


def check_yaml_document(doc: object, file: str, target: RayTarget,
                        repo_root: Path = REPO_ROOT) -> tuple[str, list[Problem]]:
    """Recognise one YAML document by its content and check it; returns (kind, problems)."""
    if isinstance(doc, dict) and doc.get("kind") == "RayCluster":
        return "RayCluster", check_raycluster(doc, file, target)
    if isinstance(doc, dict) and doc.get("kind") == "RayJob":
        return "RayJob", check_rayjob(doc, file, target, repo_root)
    if isinstance(doc, dict) and "provider" in doc and "cluster_name" in doc:
        return "ray-up", check_ray_up(doc, file, target, repo_root)
    if isinstance(doc, dict) and "working_dir" in doc:
        rep = Report(file)
        check_runtime_env(doc, rep, "(top)", required_excludes=REQUIRED_EXCLUDES, repo_root=repo_root)
        return "runtime-env", rep.problems
    kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
    return "unknown", [Problem(file, "(top)", f"not a recognised cluster file (kind {kind!r})")]


def check_all(repo_root: Path = REPO_ROOT,
              target: RayTarget | None = None) -> tuple[list[Problem], dict[str, list[str]]]:
    """Check every YAML file and Dockerfile under cluster/; returns the problems and each file's kinds."""
    target = target or default_target(repo_root)
    problems: list[Problem] = []
    kinds: dict[str, list[str]] = {}
    cluster = repo_root / "cluster"
    paths = {*cluster.rglob("*.yaml"), *cluster.rglob("*.yml"), *cluster.rglob("Dockerfile*")}
    for path in sorted(paths):
        file = str(path.relative_to(repo_root))
        text = path.read_text()
        problems += check_secrets(text, file)
        if path.name.startswith("Dockerfile"):
            kinds[file] = ["Dockerfile"]
            problems += check_dockerfile(text, file, target)
            continue
        if path.parent == cluster / "examples":
            kinds[file] = ["job-config"]
            problems += check_example_config(path, file)
            continue
        try:
            docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as exc:
            kinds[file] = ["invalid"]
            problems.append(Problem(file, "(top)", f"is not YAML: {exc}"))
            continue
        kinds[file] = []
        for doc in docs:
            kind, found = check_yaml_document(doc, file, target, repo_root)
            kinds[file].append(kind)
            problems += found
    return problems, kinds
