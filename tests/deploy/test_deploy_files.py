"""The deployment files load, name real settings, and keep Ray's unauthenticated ports private."""
import re
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((DEPLOY_DIR / "serve_config.yaml").read_text())


@pytest.fixture(scope="module")
def rayservice_docs() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY_DIR / "rayservice.yaml").read_text()))


@pytest.fixture(scope="module")
def rayservice(rayservice_docs) -> dict:
    [service] = [d for d in rayservice_docs if d["kind"] == "RayService"]
    return service


def _deployments(config: dict) -> dict[str, dict]:
    [app] = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def test_serve_config_validates_against_ray_serve_schema(serve_config):
    schema = ServeDeploySchema.model_validate(serve_config)
    [app] = schema.applications
    assert app.import_path == "masklet.deploy.serve_deployment:app"
    assert schema.http_options.host == "127.0.0.1"


def test_serve_config_sets_replicas_resources_gpu_fractions_and_batching(serve_config):
    from masklet.pipeline.config import KNOWN_MODEL_NAMES

    [app] = serve_config["applications"]
    api = _deployments(serve_config)["MaskletAPI"]
    # one LiveSession holds every stream's state: a second replica would split streams from their prompts
    assert api["num_replicas"] == 1 and api["max_ongoing_requests"] > 0
    assert 0 < api["ray_actor_options"]["num_gpus"] <= 1  # the model runs in the API replica
    assert api["max_queued_requests"] > 0  # a bounded queue: overload answers 503, never hangs
    assert set(api["user_config"]) == {"max_streams", "max_request_bytes"}  # what reconfigure() reads
    args = app["args"]
    assert args["model"] in KNOWN_MODEL_NAMES
    assert args["max_batch_size"] in (1, 2, 4, 8, 16, 32)  # within the batch-size histogram buckets
    assert 0 < args["max_wait_ms"] < 33  # under one frame interval at 30 fps


def test_serve_config_args_build_the_serve_app(serve_config):
    from ray.serve.deployment import Application

    from masklet.deploy.serve_deployment import app

    [config] = serve_config["applications"]
    assert isinstance(app(config["args"]), Application)


def test_rayservice_embeds_the_serve_config(serve_config, rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"] == serve_config["applications"]
    assert embedded["proxy_location"] == serve_config["proxy_location"]
    assert embedded["http_options"]["port"] == serve_config["http_options"]["port"]


def test_rayservice_has_gpu_encoder_and_cpu_worker_groups(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}

    def resources(group):
        [container] = group["template"]["spec"]["containers"]
        return container["resources"]

    gpu = resources(groups["gpu-encoder"])
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in resources(groups["cpu-workers"])["limits"]
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # the model's GPU share in the serve config fits on the GPU workers
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    api = _deployments(embedded)["MaskletAPI"]
    gpus_needed = api["num_replicas"] * api["ray_actor_options"]["num_gpus"]
    assert gpus_needed <= groups["gpu-encoder"]["maxReplicas"] * int(gpu["limits"]["nvidia.com/gpu"])


def test_ray_dashboard_is_never_bound_to_all_interfaces_or_published(rayservice, rayservice_docs):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    dashboard_host = head["rayStartParams"]["dashboard-host"]
    assert dashboard_host not in ("0.0.0.0", "::", "")
    [container] = head["template"]["spec"]["containers"]
    if dashboard_host.startswith("$("):  # Kubernetes expands it from the container env
        env = {e["name"]: e for e in container["env"]}
        assert env[dashboard_host[2:-1]]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert head["serviceType"] == "ClusterIP"
    assert not any(d["kind"] == "Ingress" for d in rayservice_docs)
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert "dashboard-host" not in group["rayStartParams"]

    [policy] = [d for d in rayservice_docs if d["kind"] == "NetworkPolicy"]
    open_rules = [rule for rule in policy["spec"]["ingress"] if "ports" not in rule]
    # the only rule without a port list admits Masklet's own pods, nobody else
    assert [rule["from"] for rule in open_rules] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "masklet"}}}]]
    namespace_wide_ports = {p["port"] for rule in policy["spec"]["ingress"]
                            for src in rule["from"] if src == {"podSelector": {}} for p in rule["ports"]}
    assert namespace_wide_ports == {8000}


def test_pods_run_as_non_root(rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfile_uses_cuda_runtime_volume_and_non_root_user():
    text = (DEPLOY_DIR / "Dockerfile").read_text()
    instructions = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    [base] = [line for line in instructions if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM nvidia/cuda:12\.[\d.]+-(cudnn-)?runtime-\S+", base), base
    assert 'VOLUME ["/cache"]' in instructions
    assert any(re.fullmatch(r"ENV .*MASKLET_CACHE_DIR=/cache.*", line) or line == "MASKLET_CACHE_DIR=/cache"
               for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index(f"USER {users[-1]}") > instructions.index('VOLUME ["/cache"]')
    assert 'ENTRYPOINT ["masklet"]' in instructions


def test_scaling_guide_names_actors_and_partitioning():
    guide = (DEPLOY_DIR / "SCALING.md").read_text()
    for word in ("Decoder", "Encoder", "Tracker", "Publisher", "stream_id", "partition", "max_batch_size"):
        assert word in guide, word
