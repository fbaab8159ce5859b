"""`ray up` configurations: the installed autoscaler's schema and validation, then the rules a
launch would otherwise only reveal on a live cloud."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

from .auth import check_ray_up_auth
from .common import REPO_ROOT, Problem, RayTarget, Report, check_image, is_gpu_image, is_int

# EC2 families with NVIDIA GPUs (the accelerated-computing G and P families).
GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p3dn", "p4d", "p4de", "p5", "p5e", "p5en")


def autoscaler_schema() -> dict:
    """The JSON schema shipped inside the installed ray package, as `ray up` uses it."""
    spec = importlib.util.find_spec("ray")
    path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def check_ray_up(config: Any, file: str, target: RayTarget, repo_root: Path = REPO_ROOT) -> list[Problem]:
    """Schema, Ray's prepare_config/validate_config, node types, images, commands, mounts."""
    rep = Report(file)
    if not isinstance(config, dict):
        rep.add("", "a `ray up` config must be a mapping")
        return rep.problems
    _check_with_ray(rep, config)
    docker = config.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            check_image(rep, f"docker.{key}", docker[key], target)
    if "idle_timeout_minutes" not in config:
        rep.add("idle_timeout_minutes", "missing: idle workers would keep running")
    _check_node_types(rep, config, target)
    provider = config.get("provider") or {}
    if provider.get("type") == "aws":
        region = provider.get("region")
        if not region:
            rep.add("provider.region", "missing")
        for zone in str(provider.get("availability_zone", "")).split(","):
            if zone.strip() and region and not zone.strip().startswith(region):
                rep.add("provider.availability_zone", f"{zone.strip()} is not in region {region}")
    _check_commands(rep, config, repo_root)
    check_ray_up_auth(rep, config)
    return rep.problems


def _check_with_ray(rep: Report, config: dict) -> None:
    """What `ray up` itself checks before it talks to the cloud."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_errors = list(jsonschema.Draft7Validator(autoscaler_schema()).iter_errors(config))
    for err in schema_errors:
        rep.add(".".join(str(p) for p in err.absolute_path), f"ray-schema.json: {err.message}")
    if schema_errors:  # Ray's own preparation assumes a schema-valid config
        return
    chatty = logging.getLogger("ray.autoscaler")  # prepare_config logs each filled-in default
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, AssertionError, RuntimeError, KeyError, jsonschema.ValidationError) as exc:
        rep.add("", f"the Ray autoscaler rejects it: {exc}")
    finally:
        chatty.setLevel(level)


def _check_node_types(rep: Report, config: dict, target: RayTarget) -> None:
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        rep.add("available_node_types", "no node types: the head and worker groups must be declared")
        return
    head = config.get("head_node_type")
    if head not in types:
        rep.add("head_node_type", f"{head!r} is not one of available_node_types {sorted(types)}")
    docker = config.get("docker") or {}
    autoscaling_gpu = False
    for name, node in types.items():
        if not isinstance(node, dict):
            continue
        where = f"available_node_types.{name}"
        lo, hi = node.get("min_workers", 0), node.get("max_workers")
        if name != head:
            if not is_int(hi):
                rep.add(f"{where}.max_workers", f"must be an integer, got {hi!r}")
            elif is_int(lo) and not 0 <= lo <= hi:
                rep.add(where, f"min_workers {lo} must lie in [0, max_workers {hi}]")
        node_config = node.get("node_config") or {}
        gpus = (node.get("resources") or {}).get("GPU", 0)
        itype = str(node_config.get("InstanceType", ""))
        gpu_instance = itype.split(".")[0] in GPU_INSTANCE_FAMILIES
        if gpu_instance and not gpus:
            rep.add(f"{where}.resources", f"{itype} has GPUs but the group advertises no GPU resource")
        if gpus and itype and not gpu_instance:
            rep.add(f"{where}.resources", f"advertises GPU {gpus} but {itype} has no GPU")
        market = (node_config.get("InstanceMarketOptions") or {}).get("MarketType")
        if market is not None and market != "spot":
            rep.add(f"{where}.node_config.InstanceMarketOptions.MarketType", f"must be 'spot', got {market!r}")
        node_image = (node.get("docker") or {}).get("worker_image")
        if node_image is not None:
            check_image(rep, f"{where}.docker.worker_image", node_image, target)
        image = node_image or docker.get("head_image" if name == head else "worker_image", docker.get("image"))
        if gpus and isinstance(image, str) and not is_gpu_image(image):
            rep.add(where, f"GPU group runs image {image!r}, which has no CUDA (use a -gpu/-cuXX tag)")
        if gpus and name != head and is_int(hi) and hi > 0:
            autoscaling_gpu = True
    if not autoscaling_gpu:
        rep.add("available_node_types", "no worker group with GPU resources and max_workers > 0")


def _check_commands(rep: Report, config: dict, repo_root: Path) -> None:
    head_cmds = " ; ".join(config.get("head_start_ray_commands") or [])
    if not re.search(r"ray start\b.*--head\b", head_cmds) \
            or "--autoscaling-config=~/ray_bootstrap_config.yaml" not in head_cmds:
        rep.add("head_start_ray_commands",
                "must run `ray start --head ... --autoscaling-config=~/ray_bootstrap_config.yaml`")
    worker_cmds = " ; ".join(config.get("worker_start_ray_commands") or [])
    if not re.search(r"ray start\b.*--address=\$RAY_HEAD_IP:\d+", worker_cmds):
        rep.add("worker_start_ray_commands", "must run `ray start --address=$RAY_HEAD_IP:<port>`")
    mounts = config.get("file_mounts") or {}
    for remote, local in mounts.items():
        if str(local).startswith("~"):
            continue  # a file on the user's machine (the auth token), checked by `ray up`
        if not (repo_root / str(local)).exists():
            rep.add(f"file_mounts.{remote}", f"local path {local!r} does not exist under {repo_root}")
    project = [remote for remote, local in mounts.items()
               if (repo_root / str(local)).resolve() == repo_root.resolve()]
    setup = [*(config.get("setup_commands") or []), *(config.get("head_setup_commands") or [])]
    if not any("pip install" in cmd and any(r in cmd for r in project) for cmd in setup):
        rep.add("setup_commands", "no command pip-installs the project mounted from the repository root")
