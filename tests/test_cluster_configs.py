"""The cluster layer, checked offline: every file under cluster/ passes, and every check can fail.

No cloud, Kubernetes API or Docker daemon is reached. The `ray up` file goes through the installed
Ray autoscaler's own schema and validation; the KubeRay manifests through the ray.io/v1 fields and
KubeRay's rules; each mutation below breaks one rule and expects the checker to name it.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]


def _load_checks():
    # Loaded by path: cluster/ is not an installed package.
    init = REPO / "cluster" / "config_checks" / "__init__.py"
    spec = importlib.util.spec_from_file_location("cluster_config_checks", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


checks = _load_checks()
TARGET = checks.default_target(REPO)


def _yaml(relative: str) -> dict:
    return yaml.safe_load((REPO / relative).read_text())


def _messages(problems) -> str:
    return "\n".join(str(p) for p in problems)


# ---------------------------------------------------------------- the files as written

def test_every_cluster_file_is_recognised_and_passes():
    problems, kinds = checks.check_all(REPO, TARGET)
    assert problems == [], _messages(problems)
    assert kinds == {
        "cluster/Dockerfile": ["Dockerfile"],
        "cluster/aws.yaml": ["ray-up"],
        "cluster/examples/captioner.yaml": ["job-config"],
        "cluster/examples/vqa.yaml": ["job-config"],
        "cluster/examples/vqa_space.yaml": ["job-config"],
        "cluster/kuberay/raycluster.yaml": ["RayCluster"],
        "cluster/kuberay/rayjob-extract.yaml": ["RayJob"],
        "cluster/kuberay/rayjob-train.yaml": ["RayJob"],
        "cluster/runtime_env.yaml": ["runtime-env"],
    }


@pytest.mark.parametrize("name, text, problem", [
    ("captioner.yaml", "data: {karpathy: a.json}\nepochz: 3\n", "epochz"),
    ("vqa.yaml", "batch_size: many\n", "batch_size"),
    ("vqa_space.yaml", "model.hiden: {choice: [1, 2]}\n", "model.hiden"),
    ("other.yaml", "epochs: 1\n", "not an example config"),
])
def test_example_configs_load_as_their_jobs_would(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    found = checks.check_example_config(path, f"cluster/examples/{name}")
    assert len(found) == 1 and problem in found[0].message, found


def test_command_line_reports_status():
    ok = subprocess.run([sys.executable, "-m", "cluster.config_checks"], cwd=REPO,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "0 problems" in ok.stdout


def test_schema_is_the_one_shipped_with_installed_ray():
    import ray

    schema = checks.autoscaler_schema()
    assert Path(ray.__file__).parent.joinpath("autoscaler", "ray-schema.json").is_file()
    assert {"available_node_types", "head_node_type", "docker"} <= set(schema["properties"])
    assert TARGET.family == ".".join(ray.__version__.split(".")[:2])


def test_aws_config_has_the_groups_the_pipeline_needs():
    config = _yaml("cluster/aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0  # nothing heavy scheduled on the head
    gpu_groups = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert any(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu_groups)
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in gpu_groups)
    cpu_workers = [t for name, t in types.items()
                   if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert cpu_workers and all(t["resources"]["CPU"] > 0 for t in cpu_workers)
    assert "cache_stopped_nodes" in config["provider"] and config["provider"]["availability_zone"]


# ---------------------------------------------------------------- `ray up`: each rule can fail

def _node(name: str) -> Callable[[dict], dict]:
    return lambda c: c["available_node_types"][name]


RAY_UP_MUTATIONS = {
    "unknown top-level key": (lambda c: c.update(max_worker=3), "ray-schema.json"),
    "fractional GPU resource": (lambda c: _node("ray.worker.gpu")(c)["resources"].update(GPU=1.5),
                                "ray-schema.json"),
    "head type missing": (lambda c: c.update(head_node_type="ray.head.gone"), "head_node_type"),
    "min above max": (lambda c: _node("ray.worker.gpu")(c).update(min_workers=5, max_workers=2),
                      "min_workers 5 must lie in"),
    "sum of minimums above cluster max": (lambda c: _node("ray.worker.cpu.decode")(c).update(min_workers=8)
                                          or c.update(max_workers=4), "Ray autoscaler rejects"),
    "GPU instance without GPU resource": (lambda c: _node("ray.worker.gpu")(c)["resources"].pop("GPU"),
                                          "advertises no GPU"),
    "GPU resource on CPU instance": (lambda c: _node("ray.worker.cpu.decode")(c)["resources"].update(GPU=1),
                                     "has no GPU"),
    "no GPU group at all": (lambda c: [c["available_node_types"].pop(n)
                                       for n in ("ray.worker.gpu", "ray.worker.gpu.spot")],
                            "no worker group with GPU"),
    "market type not spot": (lambda c: _node("ray.worker.gpu.spot")(c)["node_config"]
                             ["InstanceMarketOptions"].update(MarketType="Spot"), "must be 'spot'"),
    "latest image": (lambda c: c["docker"].update(image="rayproject/ray:latest-gpu"), "not pinned"),
    "untagged image": (lambda c: c["docker"].update(head_image="rayproject/ray"), "not pinned"),
    "other Ray family": (lambda c: c["docker"].update(image="rayproject/ray:2.9.3-py311-gpu"),
                         "carries Ray 2.9.3"),
    "CPU image on GPU nodes": (lambda c: c["docker"].update(image="rayproject/ray:2.60.0-py311-cpu"),
                               "has no CUDA"),
    "node image unpinned": (lambda c: _node("ray.worker.cpu.decode")(c)["docker"].update(
        worker_image="rayproject/ray:nightly"), "not pinned"),
    "zone outside region": (lambda c: c["provider"].update(availability_zone="eu-west-1a"),
                            "not in region"),
    "no idle timeout": (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes"),
    "head start without --head": (lambda c: c.update(head_start_ray_commands=["ray start --port=6379"]),
                                  "head_start_ray_commands"),
    "worker start without address": (lambda c: c.update(worker_start_ray_commands=["ray start"]),
                                     "worker_start_ray_commands"),
    "missing local mount": (lambda c: c["file_mounts"].update({"/data": "no/such/dir"}),
                            "does not exist"),
    "project never installed": (lambda c: c.update(setup_commands=["echo hello"]), "pip-installs"),
    "no token auth on the head": (lambda c: c.update(head_start_ray_commands=[
        "ray stop", "ray start --head --autoscaling-config=~/ray_bootstrap_config.yaml"]),
        "head_start_ray_commands: ray start without RAY_AUTH_MODE=token"),
    "no token auth on the workers": (lambda c: c.update(worker_start_ray_commands=[
        "ray start --address=$RAY_HEAD_IP:6379"]),
        "worker_start_ray_commands: ray start without RAY_AUTH_MODE=token"),
    "token file not mounted": (lambda c: c["file_mounts"].pop("/home/ray/.ray-updown/auth_token"),
                               "is not a file_mounts target"),
    "workers read another token": (lambda c: c.update(worker_start_ray_commands=[
        "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/other; ray start --address=$RAY_HEAD_IP:6379"])
        or c["file_mounts"].update({"/tmp/other": "~/other"}), "one token for all"),
}


@pytest.mark.parametrize("name", sorted(RAY_UP_MUTATIONS))
def test_ray_up_check_fails_on(name):
    mutate, expected = RAY_UP_MUTATIONS[name]
    config = copy.deepcopy(_yaml("cluster/aws.yaml"))
    assert checks.check_ray_up(config, "aws.yaml", TARGET, REPO) == []
    mutate(config)
    found = _messages(checks.check_ray_up(config, "aws.yaml", TARGET, REPO))
    assert expected in found, found


def test_image_outside_pyproject_range_is_reported():
    narrow = checks.RayTarget(TARGET.version, SpecifierSet(">=99"))
    found = _messages(checks.check_ray_up(_yaml("cluster/aws.yaml"), "aws.yaml", narrow, REPO))
    assert "outside pyproject's ray>=99" in found


# ---------------------------------------------------------------- KubeRay: each rule can fail

def _gpu_group(doc: dict) -> dict:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")


def _head(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec", doc["spec"])["headGroupSpec"]


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


CLUSTER_MUTATIONS = {
    "old apiVersion": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "must be ray.io/v1"),
    "name not DNS-1035": (lambda d: d["metadata"].update(name="Ray_Updown"), "DNS-1035"),
    "unknown spec field": (lambda d: d["spec"].update(enableAutoscaling=True), "unknown field"),
    "typo in group field": (lambda d: _gpu_group(d).update(maxReplica=3), "unknown field"),
    "non-string start param": (lambda d: _head(d)["rayStartParams"].update({"num-cpus": 0}),
                               "must be a string"),
    "head image latest": (lambda d: _container(_head(d)).update(image="rayproject/ray:latest"),
                          "not pinned"),
    "rayVersion of another family": (lambda d: d["spec"].update(rayVersion="2.9.0"), "rayVersion"),
    "replicas above max": (lambda d: _gpu_group(d).update(replicas=9, maxReplicas=8),
                           "minReplicas <= replicas <= maxReplicas"),
    "min above max": (lambda d: _gpu_group(d).update(minReplicas=3, maxReplicas=2, replicas=2),
                      "minReplicas <= replicas <= maxReplicas"),
    "maxReplicas missing": (lambda d: _gpu_group(d).pop("maxReplicas"), "maxReplicas"),
    "negative minReplicas": (lambda d: _gpu_group(d).update(minReplicas=-1), "non-negative"),
    "duplicate group name": (lambda d: d["spec"]["workerGroupSpecs"][1].update(groupName="gpu"),
                             "used by another group"),
    "GPU group without GPU limit": (lambda d: [_container(_gpu_group(d))["resources"][k].pop("nvidia.com/gpu")
                                               for k in ("limits", "requests")], "nvidia.com/gpu >= 1"),
    "GPU request differs from limit": (lambda d: _container(_gpu_group(d))["resources"]["requests"]
                                       .update({"nvidia.com/gpu": 2}), "must equal its limit"),
    "GPU group on CPU image": (lambda d: _container(_gpu_group(d)).update(
        image="ray-updown:0.1.0-ray2.60.0-py311-cpu"), "has no CUDA"),
    "no limits": (lambda d: _container(_head(d))["resources"].pop("limits"), "cpu limit missing"),
    "bad quantity": (lambda d: _container(_head(d))["resources"]["limits"].update(memory="16 GB"),
                     "not a quantity"),
    "no containers": (lambda d: _head(d)["template"]["spec"].update(containers=[]), "at least one container"),
    "autoscaling flag as string": (lambda d: d["spec"].update(enableInTreeAutoscaling="true"), "true or false"),
    "unknown upscaling mode": (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
                               "upscalingMode"),
    "no GPU group": (lambda d: d["spec"].update(workerGroupSpecs=[
        g for g in d["spec"]["workerGroupSpecs"] if g["groupName"] != "gpu"]), "no GPU worker group"),
    "no token auth": (lambda d: d["spec"].pop("authOptions"), "no token authentication"),
    "auth mode not token": (lambda d: d["spec"].update(authOptions={"mode": "none"}), "mode must be token"),
    "token auth on the head only": (lambda d: (d["spec"].pop("authOptions"), _container(_head(d))
                                               .setdefault("env", []).extend(_MANUAL_AUTH)),
                                    "on some node types and not others"),
    "token from no Secret": (lambda d: (d["spec"].pop("authOptions"), [
        _container(g).update(env=[{"name": "RAY_AUTH_MODE", "value": "token"}])
        for g in [_head(d), *d["spec"]["workerGroupSpecs"]]]), "no RAY_AUTH_TOKEN from a Secret"),
}
_MANUAL_AUTH = [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth_token"}}}]


def test_the_manual_secret_variant_on_every_group_passes():
    doc = copy.deepcopy(_yaml("cluster/kuberay/raycluster.yaml"))
    doc["spec"].pop("authOptions")
    for group in [_head(doc), *doc["spec"]["workerGroupSpecs"]]:
        _container(group).setdefault("env", []).extend(copy.deepcopy(_MANUAL_AUTH))
    assert checks.check_raycluster(doc, "raycluster.yaml", TARGET) == []


@pytest.mark.parametrize("name", sorted(CLUSTER_MUTATIONS))
def test_raycluster_check_fails_on(name):
    mutate, expected = CLUSTER_MUTATIONS[name]
    doc = copy.deepcopy(_yaml("cluster/kuberay/raycluster.yaml"))
    assert checks.check_raycluster(doc, "raycluster.yaml", TARGET) == []
    mutate(doc)
    found = _messages(checks.check_raycluster(doc, "raycluster.yaml", TARGET))
    assert expected in found, found


def _runtime_env(doc: dict, **changes) -> None:
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    env.update(changes)
    doc["spec"]["runtimeEnvYAML"] = yaml.safe_dump(env)


JOB_MUTATIONS = {
    "unknown job field": (lambda d: d["spec"].update(entryPoint="python x.py"), "unknown field"),
    "name too long": (lambda d: d["metadata"].update(name="a" * 48), "at most 47"),
    "not python": (lambda d: d["spec"].update(entrypoint="bash run.sh"), "must be `python jobs/"),
    "script outside jobs": (lambda d: d["spec"].update(entrypoint="python tools/x.py"), "not an entry point"),
    "unplanned script": (lambda d: d["spec"].update(entrypoint="python jobs/nope.py"), "not a planned job"),
    "runtime env not YAML": (lambda d: d["spec"].update(runtimeEnvYAML="working_dir: [unclosed"), "not YAML"),
    "runtime env without working_dir": (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {A: b}\n"),
                                        "working_dir"),
    "working_dir not in the image": (lambda d: _runtime_env(d, working_dir="/opt/elsewhere"),
                                     "not the image's project directory"),
    "env var not a string": (lambda d: _runtime_env(d, env_vars={"WORKERS": 4}), "Ray rejects"),
    "negative ttl": (lambda d: d["spec"].update(ttlSecondsAfterFinished=-1), "non-negative"),
    "ttl without shutdown": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False),
                             "only acts with shutdownAfterJobFinishes"),
    "no cluster": (lambda d: d["spec"].pop("rayClusterSpec"), "rayClusterSpec or clusterSelector"),
    "embedded cluster broken": (lambda d: _gpu_group(d).update(minReplicas=2, replicas=1),
                                "minReplicas <= replicas <= maxReplicas"),
    "job cluster without token auth": (lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"),
                                       "no token authentication"),
}


@pytest.mark.parametrize("file", ["rayjob-extract.yaml", "rayjob-train.yaml"])
@pytest.mark.parametrize("name", sorted(JOB_MUTATIONS))
def test_rayjob_check_fails_on(name, file):
    mutate, expected = JOB_MUTATIONS[name]
    doc = copy.deepcopy(_yaml(f"cluster/kuberay/{file}"))
    assert checks.check_rayjob(doc, file, TARGET, REPO) == []
    mutate(doc)
    found = _messages(checks.check_rayjob(doc, file, TARGET, REPO))
    assert expected in found, found


def _fake_repo(tmp_path: Path, jobs: dict[str, str]) -> Path:
    (tmp_path / "jobs").mkdir()
    for name, text in jobs.items():
        (tmp_path / "jobs" / name).write_text(text)
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "Dockerfile").write_text((REPO / "cluster" / "Dockerfile").read_text())
    return tmp_path


def test_entrypoint_planned_jobs_pass_before_they_exist(tmp_path):
    root = _fake_repo(tmp_path, {})
    doc = _yaml("cluster/kuberay/rayjob-train.yaml")
    for job in checks.PLANNED_JOBS:
        doc["spec"]["entrypoint"] = f"python jobs/{job} --out s3://b/x"
        assert checks.check_rayjob(doc, "j.yaml", TARGET, root) == []


def test_entrypoint_flags_must_exist_once_the_job_does(tmp_path):
    root = _fake_repo(tmp_path, {"extract.py": 'p.add_argument("--images")\np.add_argument("--out")\n'})
    doc = _yaml("cluster/kuberay/rayjob-extract.yaml")
    doc["spec"]["entrypoint"] = "python jobs/extract.py --images s3://b/i --out=s3://b/o"
    assert checks.check_rayjob(doc, "j.yaml", TARGET, root) == []
    doc["spec"]["entrypoint"] += " --imgaes s3://b/i"
    assert "defines no flag --imgaes" in _messages(checks.check_rayjob(doc, "j.yaml", TARGET, root))


# ---------------------------------------------------------------- runtime env, Dockerfile, secrets

def test_runtime_env_check_fails_on_missing_excludes_and_bad_types():
    env = _yaml("cluster/runtime_env.yaml")
    kind, problems = checks.check_yaml_document(env, "runtime_env.yaml", TARGET, REPO)
    assert (kind, problems) == ("runtime-env", [])
    broken = dict(env, excludes=["runs"])
    found = _messages(checks.check_yaml_document(broken, "runtime_env.yaml", TARGET, REPO)[1])
    assert "must exclude '.venv'" in found and "must exclude '.git'" in found
    found = _messages(checks.check_yaml_document(dict(env, excludes=".venv"), "r.yaml", TARGET, REPO)[1])
    assert "Ray rejects the runtime env" in found
    found = _messages(checks.check_yaml_document(dict(env, working_dir="nowhere"), "r.yaml", TARGET, REPO)[1])
    assert "not a directory of the repository" in found


def test_unrecognised_yaml_is_reported():
    kind, problems = checks.check_yaml_document({"kind": "Deployment"}, "x.yaml", TARGET, REPO)
    assert kind == "unknown" and "not a recognised cluster file" in _messages(problems)


DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()


@pytest.mark.parametrize("old, new, expected", [
    ("ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu", "ARG RAY_IMAGE=rayproject/ray:latest-gpu", "not pinned"),
    ("FROM ${RAY_IMAGE}", "FROM rayproject/ray", "not pinned"),
    ("FROM ${RAY_IMAGE}", "FROM rayproject/ray:2.9.3-py311-gpu", "carries Ray 2.9.3"),
    ("FROM ${RAY_IMAGE}", "", "no base image"),
    ("openjdk-17-jre-headless", "curl", "no Java runtime"),
    ("-e .", "-r requirements.txt", "never pip-installed"),
])
def test_dockerfile_check_fails_on(old, new, expected):
    assert checks.check_dockerfile(DOCKERFILE, "Dockerfile", TARGET) == []
    assert old in DOCKERFILE
    broken = DOCKERFILE.replace(old, new)
    found = _messages(checks.check_dockerfile(broken, "Dockerfile", TARGET))
    assert expected in found, found


def test_dockerfile_ray_must_be_inside_pyproject_range():
    narrow = checks.RayTarget(TARGET.version, SpecifierSet("<2.0"))
    assert "outside pyproject's ray<2.0" in _messages(checks.check_dockerfile(DOCKERFILE, "D", narrow))


@pytest.mark.parametrize("text", [
    "auth:\n  key: AKIA" + "ABCDEFGHIJKLMNOP\n",
    "-----BEGIN RSA " + "PRIVATE KEY-----\nabc\n",
    "env_vars:\n  WANDB_API_KEY: 0123456789abcdef\n",
    "ENV AWS_SECRET_ACCESS_KEY=abc/def\n",
    "env:\n  - name: AWS_SESSION_TOKEN\n    value: xyz\n",
    "env:\n  - name: RAY_AUTH_TOKEN\n    value: 3f9a0c\n",
    "head_start_ray_commands:\n  - RAY_AUTH_TOKEN=3f9a0c ray start --head\n",
])
def test_credentials_are_reported(text):
    problems = checks.check_secrets(text, "f.yaml")
    assert problems and "keep credentials out of files" in str(problems[0])


def test_credentials_by_reference_are_fine():
    text = ("env:\n  - name: WANDB_API_KEY\n    valueFrom:\n      secretKeyRef: {name: wandb, key: key}\n"
            "# set WANDB_API_KEY in the cluster's environment, never here\n"
            "  - name: RAY_AUTH_TOKEN\n    valueFrom: {secretKeyRef: {name: r, key: auth_token}}\n"
            "  - export RAY_AUTH_TOKEN=$(cat /run/secrets/ray); RAY_AUTH_TOKEN_PATH=/t ray start\n")
    assert checks.check_secrets(text, "f.yaml") == []


def test_credentials_in_a_cluster_file_fail_the_whole_check(tmp_path):
    root = _fake_repo(tmp_path, {})
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (root / "cluster" / "extra.yaml").write_text("working_dir: .\naws_secret_access_key: abc\n")
    problems, kinds = checks.check_all(root, TARGET)
    assert kinds["cluster/extra.yaml"] == ["runtime-env"]
    assert any(p.file == "cluster/extra.yaml" and "credentials" in p.message for p in problems)
