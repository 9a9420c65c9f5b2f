"""The cluster configs in cluster/: they parse, follow their tools' schemas where one is at hand, pin the Ray of
constraints.txt, name entrypoints that exist, ask for GPUs where the work is, and hold no secrets."""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest
import yaml

from rolo_batch.submit import pinned_dependencies
from tests.conftest import REPO_ROOT
from tests.test_packaging import pinned

CLUSTER = REPO_ROOT / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
CLUSTER_FILES = sorted(p for p in CLUSTER.iterdir() if p.is_file())
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5)\.")
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN"}


def ray_pin() -> str:
    version = pinned((REPO_ROOT / "constraints.txt").read_text().splitlines(), "ray")
    assert version, "constraints.txt does not pin ray"
    return version


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def walk(node: Any) -> Iterator[Any]:
    """Every dict, list and scalar inside a parsed YAML document."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from walk(child)


def containers(document: dict) -> Iterator[dict]:
    """Every container of every pod template in a KubeRay manifest."""
    for node in walk(document):
        if isinstance(node, dict) and isinstance(node.get("containers"), list):
            yield from node["containers"]


def test_the_expected_configs_exist():
    assert [p.name for p in CONFIGS] == ["aws-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 1 and isinstance(documents[0], dict)


def test_aws_config_follows_the_ray_cluster_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load("aws-cluster.yaml")))  # Ray's own ray-schema.json


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_ray_version_named_is_the_pin(path):
    text = path.read_text()
    versions = re.findall(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", text)
    versions += re.findall(r"\bray(?:\[[^\]]*\])?==([0-9][^\s\"',]*)", text)
    versions += re.findall(r"rayVersion:\s*[\"']?([0-9][^\s\"']*)", text)
    versions += re.findall(r"\bRay (\d+\.\d+\.\d+)", text)
    if path.suffix == ".yaml":
        assert versions, f"{path.name} names no Ray version"
    assert set(versions) <= {ray_pin()}, f"{path.name}: {sorted(set(versions))} != {ray_pin()}"
    assert "rayproject/ray-ml" not in text  # no longer published


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_images_are_stock_ray_images_of_the_pin(name):
    images = {c["image"] for c in containers(load(name))}
    assert images and images <= {f"rayproject/ray:{ray_pin()}-py311", f"rayproject/ray:{ray_pin()}-py311-gpu"}


def test_pip_pins_in_configs_match_constraints():
    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    for path in CLUSTER_FILES:
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\d[^\s\"',]*)", path.read_text()):
            assert pinned(constraints, name) == version, f"{path.name}: {name}=={version}"


def test_rayjob_installs_exactly_the_pinned_runtime_dependencies():
    runtime_env = yaml.safe_load(load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert sorted(runtime_env["pip"]["packages"]) == sorted(pinned_dependencies(REPO_ROOT / "constraints.txt"))
    assert runtime_env["working_dir"].endswith(".zip")


def test_aws_setup_installs_this_package_with_the_constraints():
    config = load("aws-cluster.yaml")
    install = next(command.split() for command in config["setup_commands"] if command.startswith("pip install"))
    assert "~/rolo-batch/constraints.txt" == install[install.index("-c") + 1] and install[-1] == "~/rolo-batch"
    assert config["file_mounts"]["~/rolo-batch"] == "."


def test_every_named_jobs_entrypoint_exists():
    named = {m for path in CLUSTER_FILES for m in re.findall(r"\bjobs/([A-Za-z0-9_]+\.py)", path.read_text())}
    assert "pipeline.py" in named  # the RayJob's entrypoint
    for script in named:
        assert (REPO_ROOT / "jobs" / script).is_file(), f"jobs/{script} is named in cluster/ but does not exist"


def test_rayjob_entrypoint_runs_a_jobs_script():
    entrypoint = load("kuberay-rayjob.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[0] == "python" and re.fullmatch(r"jobs/\w+\.py", entrypoint[1])


def test_kuberay_gpu_worker_groups_request_gpus():
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        spec = load(name)["spec"]
        cluster = spec.get("rayClusterSpec", spec)
        groups = cluster["workerGroupSpecs"]
        assert groups and cluster["enableInTreeAutoscaling"] is True
        for group in groups:
            assert group["minReplicas"] < group["maxReplicas"]
            for container in group["template"]["spec"]["containers"]:
                for kind in ("requests", "limits"):
                    assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1, f"{name}:{group['groupName']}"
                assert container["image"].endswith("-gpu")
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in head)


def test_aws_workers_are_autoscaling_gpu_nodes_behind_a_cpu_head():
    config = load("aws-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers
    for worker in workers:
        assert GPU_INSTANCE.match(worker["node_config"]["InstanceType"])
        assert worker["min_workers"] < worker["max_workers"]
    assert config["docker"]["worker_image"].endswith("-gpu")


def test_aws_nodes_reach_s3_through_instance_profiles():
    for node_type in load("aws-cluster.yaml")["available_node_types"].values():
        assert node_type["node_config"]["IamInstanceProfile"]


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_secrets_come_from_secret_refs(name):
    document = load(name)
    env_lists = [c.get("env", []) for c in containers(document)]
    env_lists += [n["env"] for n in walk(document) if isinstance(n, dict) and "upscalingMode" in n]
    seen = set()
    for env in env_lists:
        for var in env:
            if var["name"] in SECRET_ENV_NAMES:
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], f"{name}: {var['name']}"
                seen.add(var["name"])
        names = {var["name"] for var in env}
        if "RAY_AUTH_TOKEN" in names:
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in env
    assert "RAY_AUTH_TOKEN" in seen


def test_token_auth_is_on_for_every_aws_node():
    config = load("aws-cluster.yaml")
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in command:
            assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=" in command


_SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "40-character secret": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    "64-hex token": re.compile(r"\b[0-9a-f]{64}\b"),
    "literal secret assignment": re.compile(
        r"(aws_secret_access_key|aws_session_token|RAY_AUTH_TOKEN)\s*[=:]\s*[\"']?(?![\"'$]|\s|<)[^\s\"']{8,}",
        re.IGNORECASE),
}


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_no_secret_looking_values_in_cluster_files(path):
    text = path.read_text()
    for label, pattern in _SECRET_PATTERNS.items():
        match = pattern.search(text)
        assert match is None, f"{path.name}: {label}: {match.group(0)[:12]}..."


@pytest.mark.parametrize("text", [
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "key: AKIAIOSFODNN7EXAMPLE",
    "RAY_AUTH_TOKEN=3f1c0a9e4b7d2c8f6a5e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a",
], ids=["secret-key", "key-id", "ray-token"])
def test_the_secret_scan_catches_secrets(text):
    assert any(pattern.search(text) for pattern in _SECRET_PATTERNS.values())
