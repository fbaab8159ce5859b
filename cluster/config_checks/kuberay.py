"""KubeRay manifests (RayCluster, RayJob) against the ray.io/v1 API types and KubeRay's own rules.

Field names are those of KubeRay's Go types (ray-operator/apis/ray/v1/raycluster_types.go,
rayjob_types.go); the rules follow its validation (controllers/ray/utils/validation.go):
containers present, non-negative replica bounds with min <= max, name lengths, ttl >= 0.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from .auth import check_kuberay_auth
from .common import REPO_ROOT, Problem, RayTarget, Report, check_image, is_gpu_image, is_int
from .project import check_runtime_env, project_dir_in_image

# Entry points in jobs/ that the RayJob manifests may name before they exist.
PLANNED_JOBS = ("world.py", "train_detector.py", "extract.py", "train_captioner.py", "train_vqa.py",
                "ensemble_vqa.py", "tune_vqa.py", "evaluate.py", "demo.py")
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "managedBy", "upgradeStrategy", "authOptions",
    "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions"}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "ingressOptions", "resources",
                     "labels", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
                       "idleTimeoutSeconds", "priority", "resources", "labels", "rayStartParams",
                       "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                     "upscalingMode", "version", "env", "envFrom", "volumeMounts", "command", "args"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
    "shutdownAfterJobFinishes", "suspend", "schedule"}
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47  # KubeRay's limits (a job's cluster name adds 6)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
K8S_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def _unknown(rep: Report, where: str, obj: dict, known: set[str]) -> None:
    for key in sorted(set(obj) - known):
        rep.add(f"{where}.{key}", f"unknown field (KubeRay's ray.io/v1 has no {key!r} here)")


def _check_pod_group(rep: Report, where: str, group: dict, target: RayTarget, gpu: bool) -> None:
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        rep.add(f"{where}.rayStartParams", "required, a map of strings (use {} for none)")
    else:
        for key, value in params.items():
            if not isinstance(value, str):
                rep.add(f"{where}.rayStartParams.{key}", f"must be a string (quote it), got {value!r}")
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        rep.add(f"{where}.template.spec.containers", "at least one container is required")
        return
    first = containers[0]
    check_image(rep, f"{where}.template.spec.containers[0].image", first.get("image"), target)
    resources = first.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for key in ("cpu", "memory"):
        if key not in limits:
            rep.add(f"{where}.template.spec.containers[0].resources.limits", f"{key} limit missing")
    for kind, values in (("limits", limits), ("requests", requests)):
        for key, value in values.items():
            if not K8S_QUANTITY.match(str(value)):
                rep.add(f"{where}.template.spec.containers[0].resources.{kind}.{key}", f"{value!r} is not a quantity")
    gpu_limit = limits.get("nvidia.com/gpu")
    if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != gpu_limit:
        rep.add(f"{where}.template.spec.containers[0].resources", "nvidia.com/gpu request must equal its limit")
    if gpu:
        if not (is_int(gpu_limit) or str(gpu_limit).isdigit()) or int(gpu_limit) < 1:
            rep.add(f"{where}.template.spec.containers[0].resources.limits", "GPU group needs nvidia.com/gpu >= 1")
        if isinstance(first.get("image"), str) and not is_gpu_image(first["image"]):
            rep.add(f"{where}.template.spec.containers[0].image", "GPU group image has no CUDA (-gpu/-cuXX tag)")


def check_raycluster_spec(rep: Report, where: str, spec: Any, target: RayTarget) -> None:
    if not isinstance(spec, dict):
        rep.add(where, "must be a mapping")
        return
    _unknown(rep, where, spec, RAYCLUSTER_SPEC_FIELDS)
    check_kuberay_auth(rep, where, spec)
    version = spec.get("rayVersion")
    if version is not None and ".".join(str(version).split(".")[:2]) != target.family:
        rep.add(f"{where}.rayVersion", f"{version!r} is not the installed Ray's family {target.family}")
    if not isinstance(spec.get("enableInTreeAutoscaling", False), bool):
        rep.add(f"{where}.enableInTreeAutoscaling", "must be true or false")
    options = spec.get("autoscalerOptions")
    if isinstance(options, dict):
        _unknown(rep, f"{where}.autoscalerOptions", options, AUTOSCALER_FIELDS)
        if options.get("upscalingMode", "Default") not in ("Default", "Aggressive", "Conservative"):
            rep.add(f"{where}.autoscalerOptions.upscalingMode", "must be Default, Aggressive or Conservative")
        idle = options.get("idleTimeoutSeconds", 0)
        if not is_int(idle) or idle < 0:
            rep.add(f"{where}.autoscalerOptions.idleTimeoutSeconds", f"must be a non-negative integer, got {idle!r}")
        if options.get("version", "v1") not in ("v1", "v2"):
            rep.add(f"{where}.autoscalerOptions.version", "must be v1 or v2")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        rep.add(f"{where}.headGroupSpec", "required")
    else:
        _unknown(rep, f"{where}.headGroupSpec", head, HEAD_GROUP_FIELDS)
        _check_pod_group(rep, f"{where}.headGroupSpec", head, target, gpu=False)
    groups = spec.get("workerGroupSpecs") or []
    names: set[str] = set()
    autoscaling_gpu = False
    for i, group in enumerate(groups if isinstance(groups, list) else []):
        gw = f"{where}.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            rep.add(gw, "must be a mapping")
            continue
        _unknown(rep, gw, group, WORKER_GROUP_FIELDS)
        name = group.get("groupName")
        if not isinstance(name, str) or not name:
            rep.add(f"{gw}.groupName", "required")
        elif name in names:
            rep.add(f"{gw}.groupName", f"{name!r} is used by another group")
        names.add(str(name))
        counts = {k: group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
        bad = [k for k, v in counts.items() if not is_int(v) or v < 0]
        for k in bad:
            rep.add(f"{gw}.{k}", f"must be a non-negative integer, got {counts[k]!r}")
        if not bad and not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
            rep.add(gw, "needs minReplicas <= replicas <= maxReplicas, got "
                        "{minReplicas}, {replicas}, {maxReplicas}".format(**counts))
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        limits = ((containers[0] if isinstance(containers[0], dict) else {}).get("resources") or {}).get("limits") or {}
        gpu = "nvidia.com/gpu" in limits or "gpu" in str(name).lower()
        _check_pod_group(rep, gw, group, target, gpu=gpu)
        if gpu and not bad and counts["maxReplicas"] > 0:
            autoscaling_gpu = True
    if not autoscaling_gpu:
        rep.add(f"{where}.workerGroupSpecs", "no GPU worker group with maxReplicas > 0")


def _check_metadata(rep: Report, doc: dict, kind: str, max_len: int) -> None:
    if doc.get("apiVersion") != "ray.io/v1":
        rep.add("apiVersion", f"must be ray.io/v1, got {doc.get('apiVersion')!r}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not DNS1035.match(name) or len(name) > max_len:
        rep.add("metadata.name", f"{kind} name must be a DNS-1035 label of at most {max_len} characters, got {name!r}")


def check_raycluster(doc: dict, file: str, target: RayTarget) -> list[Problem]:
    rep = Report(file)
    _check_metadata(rep, doc, "RayCluster", MAX_RAYCLUSTER_NAME)
    check_raycluster_spec(rep, "spec", doc.get("spec"), target)
    return rep.problems


def _flag_sources(repo_root: Path) -> str:
    files = [*sorted((repo_root / "jobs").glob("*.py")), *sorted((repo_root / "ray_updown").rglob("*.py"))]
    return "\n".join(f.read_text(errors="replace") for f in files)


def check_entrypoint(rep: Report, entrypoint: Any, repo_root: Path) -> None:
    """`python jobs/<stage>.py --flag ...`: the script exists (or is planned), its flags are defined."""
    try:
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else []
    except ValueError as exc:
        rep.add("spec.entrypoint", f"cannot be split into arguments: {exc}")
        return
    if len(argv) < 2 or not re.fullmatch(r"python(3(\.\d+)?)?", argv[0]) or not argv[1].endswith(".py"):
        rep.add("spec.entrypoint", f"must be `python jobs/<stage>.py ...`, got {entrypoint!r}")
        return
    script = Path(argv[1])
    if script.parent != Path("jobs"):
        rep.add("spec.entrypoint", f"{argv[1]} is not an entry point in jobs/")
    elif (repo_root / script).is_file():
        sources = _flag_sources(repo_root)
        for arg in argv[2:]:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and f'"{flag}"' not in sources and f"'{flag}'" not in sources:
                rep.add("spec.entrypoint", f"{argv[1]} defines no flag {flag}")
    elif script.name not in PLANNED_JOBS:
        rep.add("spec.entrypoint", f"{argv[1]} does not exist and is not a planned job {PLANNED_JOBS}")


def check_rayjob(doc: dict, file: str, target: RayTarget, repo_root: Path = REPO_ROOT) -> list[Problem]:
    rep = Report(file)
    _check_metadata(rep, doc, "RayJob", MAX_RAYJOB_NAME)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        rep.add("spec", "required")
        return rep.problems
    _unknown(rep, "spec", spec, RAYJOB_SPEC_FIELDS)
    check_entrypoint(rep, spec.get("entrypoint"), repo_root)
    text = spec.get("runtimeEnvYAML")
    if not isinstance(text, str):
        rep.add("spec.runtimeEnvYAML", "required, a YAML document as a string")
    else:
        try:
            check_runtime_env(yaml.safe_load(text), rep, "spec.runtimeEnvYAML",
                              image_dir=project_dir_in_image(repo_root), repo_root=repo_root)
        except yaml.YAMLError as exc:
            rep.add("spec.runtimeEnvYAML", f"is not YAML: {exc}")
    if not isinstance(spec.get("shutdownAfterJobFinishes", False), bool):
        rep.add("spec.shutdownAfterJobFinishes", "must be true or false")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if not is_int(ttl) or ttl < 0:
        rep.add("spec.ttlSecondsAfterFinished", f"must be a non-negative integer, got {ttl!r}")
    elif ttl and spec.get("shutdownAfterJobFinishes") is not True:
        rep.add("spec.ttlSecondsAfterFinished", "only acts with shutdownAfterJobFinishes: true")
    if "rayClusterSpec" in spec:
        check_raycluster_spec(rep, "spec.rayClusterSpec", spec["rayClusterSpec"], target)
    elif not spec.get("clusterSelector"):
        rep.add("spec", "one of rayClusterSpec or clusterSelector must be set")
    return rep.problems


