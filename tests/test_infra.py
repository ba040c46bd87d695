"""cluster/ and infra/: every file parses, validates against its real schema where one ships,
and uses the server-type resource names defined once in raytune_it/hardware.py."""

import json
import re
from pathlib import Path

import pytest
import yaml

from raytune_it.hardware import SERVER_TYPES, autoscaler_node_resources, node_resources

ROOT = Path(__file__).parents[1]
RESOURCES = {t.resource for t in SERVER_TYPES.values()}
CLUSTER_FILES = sorted((ROOT / "cluster").glob("*.yaml"))
KUBERAY = ROOT / "infra" / "kuberay"


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_cluster_yaml_validates_against_rays_autoscaler_schema(path):
    import jsonschema

    config = yaml.safe_load(path.read_text())
    jsonschema.validate(config, ray_schema())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard and job server not open to the world"
    assert "RAY_AUTH_MODE=token" in head_start
    assert any("pip install -e '.[vllm,trackers]'" in c for c in config["setup_commands"])


def test_schema_check_has_teeth():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    config["available_node_types"]["a800-80g"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_cloud_node_types_carry_the_packages_resources_and_gpu_counts():
    config = yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())
    types = config["available_node_types"]
    for name, kind in SERVER_TYPES.items():
        node = types[name]
        assert node["resources"] == autoscaler_node_resources(name, node["resources"]["CPU"])
        assert node["resources"][kind.resource] == kind.gpus_per_node == node["resources"]["GPU"]
        assert node["min_workers"] == 0 and node["max_workers"] >= 1
    used = {k for t in types.values() for k in t["resources"] if k.startswith("server_type:")}
    assert used == RESOURCES


def test_onprem_nodes_announce_their_type_from_the_gpu_model():
    config = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    assert any("raytune-it node-resources" in c for c in config["worker_start_ray_commands"])
    assert node_resources(["NVIDIA A800-SXM4-80GB"] * 8) == {SERVER_TYPES["a800-80g"].resource: 8}
    assert node_resources(["NVIDIA GeForce RTX 3090"] * 8) == {SERVER_TYPES["rtx3090-24g"].resource: 8}
    assert node_resources(["NVIDIA H100 80GB HBM3"]) == {}


def _group_resources(group: dict) -> dict:
    return json.loads(json.loads(group["rayStartParams"]["resources"]))


def _check_worker_groups(groups: list[dict]) -> None:
    for group in groups:
        kind = SERVER_TYPES[group["groupName"]]
        assert _group_resources(group) == {kind.resource: kind.gpus_per_node}
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(kind.gpus_per_node)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] or group["replicas"] == 0
        assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]


def test_raycluster_manifest():
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"] and cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    groups = cluster["spec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == set(SERVER_TYPES)
    _check_worker_groups(groups)


def test_rayjob_runs_a_tuning_job_on_the_raycluster():
    from raytune_it.config import load_config

    job = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    words = job["spec"]["entrypoint"].split()
    assert words[:4] == ["python", "-m", "raytune_it", "train"]
    config = load_config(words[4], words[5:], check_paths=False)
    assert config.scaling.server_type in SERVER_TYPES


def test_rayservice_runs_the_serve_application():
    from ray.serve.schema import ServeDeploySchema

    from raytune_it.config import load_config

    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    [app] = serve_config.applications
    assert app.import_path == "raytune_it.serving.app:app_builder"
    config = load_config(app.args["config"], app.args["overrides"], check_paths=False)
    assert config.serve.server_type in SERVER_TYPES and config.serve.autoscaling is not None
    _check_worker_groups(service["spec"]["rayClusterConfig"]["workerGroupSpecs"])


def test_monitoring_queries_name_metrics_the_endpoint_exports():
    from raytune_it.serving.metrics import FAMILIES

    dashboard = json.loads((ROOT / "infra" / "monitoring" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"ray_raytune_it_[a-z_]+", target["expr"])}
    assert queried
    for name in queried:
        assert any(name == f or name.startswith(f + "_") for f in FAMILIES), name
    prometheus = yaml.safe_load((ROOT / "infra" / "monitoring" / "prometheus.yaml").read_text())
    [ray_job] = [j for j in prometheus["scrape_configs"] if j["job_name"] == "ray"]
    assert ray_job["file_sd_configs"], "every node's Ray metrics endpoint, found through Ray's discovery file"


def test_dockerfile_has_a_cuda_base_and_the_vllm_extra():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    assert "pip install '.[vllm,trackers]'" in text and "USER ray" in text
