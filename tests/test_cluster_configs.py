"""The cluster files: launcher YAMLs pass Ray's own validation, KubeRay manifests are read by Ray's KubeRay
autoscaler code, no credentials anywhere, and the per-stage resources of cluster_config.yaml fit the
node types they are meant for."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from slidestream.cluster.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
SECRET_NAMES = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"}
# Literal credentials: AWS access key ids, a secret key assigned a value, PEM keys, GCP key files.
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{20,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r'"private_key_id"'),
]


def _launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _prepared(name: str) -> dict:
    config = prepare_config(copy.deepcopy(_launcher(name)))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validation(name):
    config = _prepared(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "no tasks on the head"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu), "GPU workers from 0"
    assert cpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in cpu)
    assert config["idle_timeout_minutes"] > 0
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "-c ~/slidestream/constraints.txt" in setup
    assert "-e ~/slidestream" in setup
    assert config["file_mounts"]["/home/ubuntu/slidestream"] == "."
    assert ".venv" in config["rsync_exclude"]
    assert any("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"])
    assert any("--autoscaling-config=" in c for c in config["head_start_ray_commands"])


def test_aws_workers_are_spot_and_gcp_workers_are_spot_vms():
    aws = _launcher("aws.yaml")["available_node_types"]
    for name in ("cpu_ingest", "gpu"):
        assert aws[name]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in aws["head"]["node_config"], "the head stays on-demand"
    assert len({t["node_config"]["ImageId"] for t in aws.values()}) == 1
    gcp = _launcher("gcp.yaml")["available_node_types"]
    for name in ("cpu_ingest", "gpu"):
        assert gcp[name]["node_config"]["scheduling"]["provisioningModel"] == "SPOT"
    assert gcp["gpu"]["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert "scheduling" not in gcp["head"]["node_config"]


def test_validation_rejects_a_broken_config():
    """The check above has teeth: a misspelt node-type key is refused by Ray's schema."""
    config = _launcher("aws.yaml")
    config["available_node_types"]["gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def _manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def _check_cluster_spec(spec: dict, name: str) -> dict:
    """Structure the RayCluster CRD requires, then Ray's KubeRay autoscaler reading of it (validated)."""
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are strings"
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-ingest", "gpu"}
    for group in [head, *groups.values()]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] and c["name"] for c in containers)
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    assert groups["gpu"]["minReplicas"] == 0
    limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1

    derived = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": name, "namespace": "default"}, "spec": spec}
    )  # Ray's own code path in the KubeRay autoscaler sidecar; it calls validate_config
    types = derived["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["min_workers"] == 0
    assert types["cpu-ingest"]["min_workers"] == 0 and types["cpu-ingest"]["max_workers"] >= 1
    return types


def test_raycluster_manifest():
    manifest = _manifest("raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    _check_cluster_spec(manifest["spec"], manifest["metadata"]["name"])


def test_rayjob_manifest():
    manifest = _manifest("rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    entry = spec["entrypoint"]
    assert "slidestream run" in entry and "slidestream train mhim" in entry
    assert "--gpus" in entry and "slidestream.job_entry" in entry
    uris = re.findall(r"--(?:slides|out|labels) (\S+)", entry)
    assert uris and all(u.startswith("s3://") for u in uris)
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert not SECRET_NAMES & set(runtime_env.get("env_vars", {}))
    _check_cluster_spec(spec["rayClusterSpec"], manifest["metadata"]["name"])


def _containers(spec: dict):
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        yield from group["template"]["spec"]["containers"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_credentials_come_from_a_secret(name):
    manifest = _manifest(name)
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    for container in _containers(spec):
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert refs == ["slidestream-s3"], container["name"]
        for var in container.get("env", []):
            assert var["name"] not in SECRET_NAMES or "value" not in var, f"{var['name']} inline"


@pytest.mark.parametrize(
    "path",
    [
        "aws.yaml",
        "gcp.yaml",
        "cluster_config.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/Dockerfile",
    ],
)
def test_no_credentials_in_cluster_files(path):
    text = (CLUSTER / path).read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not pattern.search(text), f"{path}: {pattern.pattern}"


def test_cluster_config_fits_the_node_types():
    """A stage asking for more than a node has is never scheduled (the autoscaler calls it infeasible)."""
    config = load_config(CLUSTER / "cluster_config.yaml")
    gpu_nodes = [
        _launcher("aws.yaml")["available_node_types"]["gpu"]["resources"],
        _launcher("gcp.yaml")["available_node_types"]["gpu"]["resources"],
        _check_cluster_spec(_manifest("raycluster.yaml")["spec"], "slidestream")["gpu"]["resources"],
    ]
    for node in gpu_nodes:
        assert config.embed.actor_cpus <= node["CPU"] and config.embed.actor_gpus <= node["GPU"]
        assert config.train.cpus_per_worker <= node["CPU"] and config.train.gpus_per_worker <= node["GPU"]
    max_gpus = _launcher("aws.yaml")["available_node_types"]["gpu"]["max_workers"]
    assert config.embed.actors <= max_gpus, "a fixed actor pool larger than the GPUs would wait forever"
    cpu_nodes = [_launcher(n)["available_node_types"]["cpu_ingest"]["resources"]["CPU"] for n in LAUNCHERS]
    assert all(config.ingest.read_cpus <= cpus for cpus in cpu_nodes)
