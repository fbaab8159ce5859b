"""Token authentication on every node type, with one shared token that no file holds.

Ray >= 2.52 authenticates every RPC and dashboard request with one static token when
RAY_AUTH_MODE=token is set on every node; Ray 2.61 turns it on for every cluster. A node
without it, or with another token, cannot join, and on older Ray a cluster without it runs any
job anyone who reaches the dashboard submits. The rules:

- KubeRay: `authOptions: {mode: token}` (KubeRay >= 1.5.1, rayVersion >= 2.52: the operator
  makes the Secret and sets both variables on every container), or on every container of the
  head and of each worker group RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret
  (`valueFrom.secretKeyRef`), never on some groups only;
- `ray up`: RAY_AUTH_MODE=token and the token's file (RAY_AUTH_TOKEN_PATH, mounted from the
  user's machine by file_mounts) in the head's and the workers' start commands;
- nowhere a literal token (common.SECRET_PATTERNS finds those in any file).
"""

from __future__ import annotations

import re
from typing import Any

from packaging.version import Version

from .common import Report

MIN_AUTH_RAY = Version("2.52.0")
_MODE = re.compile(r"\bRAY_AUTH_MODE=token\b")
_TOKEN_PATH = re.compile(r"\bRAY_AUTH_TOKEN_PATH=([^\s;]+)")


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def _container_auth(container: dict) -> str:
    """"token" when the container has both variables (the token from a Secret), else what is
    missing."""
    env = _env(container)
    if (env.get("RAY_AUTH_MODE") or {}).get("value") != "token":
        return "no RAY_AUTH_MODE=token"
    token = env.get("RAY_AUTH_TOKEN") or {}
    if not ((token.get("valueFrom") or {}).get("secretKeyRef")):
        return "no RAY_AUTH_TOKEN from a Secret (valueFrom.secretKeyRef)"
    return "token"


def _groups(spec: dict, where: str) -> list[tuple[str, dict]]:
    groups = [(f"{where}.headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"{where}.workerGroupSpecs[{i}]", g) for i, g in
               enumerate(spec.get("workerGroupSpecs") or []) if isinstance(g, dict)]
    return groups


def check_kuberay_auth(rep: Report, where: str, spec: dict) -> None:
    """A RayCluster spec (or a RayJob's rayClusterSpec) must turn token auth on for all."""
    options = spec.get("authOptions")
    if options is not None:
        if not isinstance(options, dict) or options.get("mode") != "token":
            rep.add(f"{where}.authOptions", f"mode must be token, got {options!r}")
            return
        try:
            version = Version(str(spec.get("rayVersion", "0")))
        except ValueError:
            version = Version("0")
        if version < MIN_AUTH_RAY:
            rep.add(f"{where}.rayVersion", f"authOptions needs rayVersion >= {MIN_AUTH_RAY}, got "
                                           f"{spec.get('rayVersion')!r}")
        return
    missing, total = [], 0
    for place, group in _groups(spec, where):
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        for i, container in enumerate(c for c in containers if isinstance(c, dict)):
            total += 1
            state = _container_auth(container)
            if state != "token":
                missing.append(f"{place}.template.spec.containers[{i}] ({state})")
    if missing and len(missing) == total:
        reason = missing[0][missing[0].index("(") + 1:-1]
        rep.add(where, f"no token authentication ({reason}): add authOptions: {{mode: token}} (KubeRay >= "
                       "1.5.1), or RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a Secret on every "
                       "container")
    elif missing:
        rep.add(where, "token authentication on some node types and not others: "
                       + "; ".join(missing))


def check_ray_up_auth(rep: Report, config: dict[str, Any]) -> None:
    """Head and workers start with RAY_AUTH_MODE=token and the same mounted token file."""
    mounts = config.get("file_mounts") or {}
    paths = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = " ; ".join(str(c) for c in config.get(key) or [])
        starts = [c for c in commands.split(";") if "ray start" in c]
        if not _MODE.search(commands) or not starts:
            rep.add(key, "ray start without RAY_AUTH_MODE=token (token authentication on every "
                         "node type)")
            continue
        found = _TOKEN_PATH.search(commands)
        if not found:
            rep.add(key, "no RAY_AUTH_TOKEN_PATH: the token's file, mounted by file_mounts")
            continue
        paths[key] = found.group(1)
        if found.group(1) not in mounts:
            rep.add(key, f"RAY_AUTH_TOKEN_PATH={found.group(1)} is not a file_mounts target "
                         "(copy your ~/.ray/auth_token there)")
    if len(set(paths.values())) > 1:
        rep.add("worker_start_ray_commands", f"reads the token from {paths['worker_start_ray_commands']}"
                                             f", the head from {paths['head_start_ray_commands']}: "
                                             "one token for all")
