"""The Kubernetes manifests under deploy/: parse, schema-validate, and check what matters.

Core kinds (Deployment, Service, HorizontalPodAutoscaler, ConfigMap, NetworkPolicy) are validated against
the Kubernetes OpenAPI schemas bundled in the `kubernetes-validate` package (offline, strict:
unknown fields are errors). The KServe InferenceService is a CRD that package has no schema
for, so its fields are checked here by hand. Then the facts the deployment depends on: GPU
limits, ports that line up between containers, Service and probes, the HPA's target, replica
bounds, the NetworkPolicy's ports and its denied egress, a memory /dev/shm for the decoded
pixels, no secret values in any file, and the KServe storage layout's config.properties.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import kubernetes_validate
import numpy as np
import pytest
import yaml

from handler.pixel_slots import block_bytes
from model.config import PRESETS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_VERSION = "1.30.0"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in _docs(p)]


def _one(kind: str, folder: str = "k8s") -> dict:
    found = [d for p, d in _all_docs() if d["kind"] == kind and p.parent.name == folder]
    assert len(found) == 1, f"expected one {kind} in deploy/{folder}, found {len(found)}"
    return found[0]


def _container(name: str) -> dict:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def test_every_manifest_parses_and_has_a_comment_header():
    assert {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES} >= {
        "k8s/deployment.yaml", "k8s/service.yaml", "k8s/hpa.yaml", "k8s/auth-proxy-configmap.yaml",
        "k8s/kustomization.yaml", "k8s/networkpolicy.yaml", "kserve/inferenceservice.yaml",
    }
    for path in YAML_FILES:
        assert path.read_text().startswith("#"), f"{path} lacks its header comment"
        for doc in _docs(path):
            assert {"apiVersion", "kind"} <= doc.keys(), path


def test_yamllint_is_clean():
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig("{extends: default, rules: {line-length: {max: 120}, document-start: disable}}")
    problems = [f"{p.name}:{e.line}: {e.message}" for p in YAML_FILES for e in linter.run(p.read_text(), config)]
    assert problems == []


@pytest.mark.parametrize(
    "path,doc",
    [(p, d) for p, d in _all_docs()
     if d["kind"] in {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "NetworkPolicy"}],
    ids=lambda v: v.name if isinstance(v, Path) else v.get("kind", ""),
)
def test_core_kinds_match_the_kubernetes_schema(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_validation_would_catch_a_typo():
    from kubernetes_validate.utils import ValidationError

    broken = _one("Deployment")
    broken = {**broken, "spec": {**broken["spec"], "replica": 2}}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_api_versions():
    versions = {d["kind"]: d["apiVersion"] for _, d in _all_docs()}
    assert versions == {
        "Deployment": "apps/v1", "Service": "v1", "HorizontalPodAutoscaler": "autoscaling/v2",
        "ConfigMap": "v1", "NetworkPolicy": "networking.k8s.io/v1",
        "Kustomization": "kustomize.config.k8s.io/v1beta1", "InferenceService": "serving.kserve.io/v1beta1",
    }


def test_kustomization_lists_every_k8s_manifest():
    listed = set(_one("Kustomization")["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_has_one_gpu_per_pod_and_probes():
    torchserve = _container("torchserve")
    for section in ("requests", "limits"):
        assert str(torchserve["resources"][section]["nvidia.com/gpu"]) == "1"
    assert "memory" in torchserve["resources"]["limits"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in torchserve, probe
    readiness = torchserve["readinessProbe"]["exec"]["command"]
    assert readiness[-1] == "/opt/caption/src/docker/healthcheck.py"
    assert (REPO / "docker" / "healthcheck.py").is_file()
    assert torchserve["livenessProbe"]["httpGet"]["port"] == "metrics"
    startup = torchserve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load needs minutes"


def test_deployment_rolls_out_without_downtime_and_runs_as_non_root():
    deployment = _one("Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert ":" in container["image"] and not container["image"].endswith(":latest"), container["image"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_pods_drain_before_they_are_stopped(monkeypatch):
    """Kubernetes runs the preStop hooks before SIGTERM, all within the grace period."""
    monkeypatch.syspath_prepend(str(REPO / "docker"))
    drain = importlib.import_module("drain")
    torchserve, proxy = _container("torchserve"), _container("auth-proxy")
    assert torchserve["lifecycle"]["preStop"]["exec"]["command"] == ["python", "/opt/caption/src/docker/drain.py"]
    assert "CAPTION_DRAIN_TIMEOUT_S" not in _env(torchserve) and "CAPTION_DRAIN_SETTLE_S" not in _env(torchserve)
    # the proxy takes requests as long as the Service may still route them here
    assert proxy["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(drain.SETTLE_S)]
    assert _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain.TIMEOUT_S > drain.SETTLE_S


def test_ports_line_up_between_proxy_torchserve_service_and_probes():
    torchserve, proxy = _container("torchserve"), _container("auth-proxy")
    env = _env(torchserve)
    assert env["CAPTION_DISABLE_TOKEN_AUTH"]["value"] == "true"
    # TorchServe's APIs are loopback-only: the proxy is the only way in.
    assert env["CAPTION_INFERENCE_BIND"]["value"] == "127.0.0.1"
    assert env["CAPTION_MANAGEMENT_BIND"]["value"] == "127.0.0.1"
    template = _one("ConfigMap")["data"]["default.conf.template"]
    upstreams = set(re.findall(r"proxy_pass http://([\d.]+):(\d+);", template))
    assert upstreams == {("127.0.0.1", env["CAPTION_INFERENCE_PORT"]["value"])}
    listen = re.search(r"listen (\d+);", template).group(1)
    proxy_ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert proxy_ports == {"http": int(listen)}
    ts_ports = {p["name"]: p["containerPort"] for p in torchserve["ports"]}
    assert ts_ports == {"metrics": 8082}

    service = _one("Service")
    assert service["spec"]["selector"].items() <= _one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets == {"http": "http", "metrics": "metrics"}
    assert all(p["protocol"] == "TCP" for p in service["spec"]["ports"])


def test_network_policy_lets_in_only_the_service_ports_and_nothing_out():
    policy, deployment = _one("NetworkPolicy")["spec"], _one("Deployment")
    assert policy["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []  # nothing downloaded
    container_ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    service_ports = {p["targetPort"] for p in _one("Service")["spec"]["ports"]}
    rules = {port["port"]: rule.get("from") for rule in policy["ingress"] for port in rule["ports"]}
    assert set(rules) == service_ports <= container_ports  # named ports that exist, no others
    assert rules["http"] is None  # the proxy checks the key: from anywhere the cluster routes it
    # metrics carry no token: this namespace and labelled scrapers only
    assert rules["metrics"] == [{"podSelector": {}},
                                {"namespaceSelector": {"matchLabels": {"caption-serve/metrics-scraper": "true"}}}]


def test_proxy_waits_longer_than_the_archive_response_timeout():
    template = _one("ConfigMap")["data"]["default.conf.template"]
    archive = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = int(re.search(rf"{name} (\d+)s;", template).group(1))
        assert seconds > archive["responseTimeout"], (name, seconds)


def test_inference_key_comes_from_a_secret_and_both_keys_are_accepted():
    env = _env(_container("auth-proxy"))
    for name in ("CAPTION_INFERENCE_KEY", "CAPTION_INFERENCE_KEY_NEXT"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "captioner-inference-key"
        assert "value" not in env[name]
    template = _one("ConfigMap")["data"]["default.conf.template"]
    assert '"Bearer ${CAPTION_INFERENCE_KEY}" 1;' in template
    assert '"Bearer ${CAPTION_INFERENCE_KEY_NEXT}" 1;' in template
    assert "default 0;" in template and "return 401" in template
    assert not any(d["kind"] == "Secret" for _, d in _all_docs()), "never commit a Secret"


def test_no_secret_values_anywhere_in_deploy():
    suspicious = re.compile(r"(?i)(password|passwd|secret|token|api[_-]?key)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{12,}")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            assert not suspicious.search(path.read_text()), path


def test_hpa_targets_the_deployment_with_sane_bounds():
    hpa, deployment = _one("HorizontalPodAutoscaler"), _one("Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["maxReplicas"] > 1
    assert hpa["spec"]["metrics"], "the HPA needs a metric"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_kserve_inference_service():
    isvc = _one("InferenceService", folder="kserve")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] in {"v1", "v2"}
    assert re.fullmatch(r"(gs|s3|pvc|https?)://.+", model["storageUri"])
    for section in ("requests", "limits"):
        assert str(model["resources"][section]["nvidia.com/gpu"]) == "1"
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in {"cpu", "memory", "concurrency", "rps"}
    assert predictor["scaleTarget"] > 0
    allowed = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "timeout", "volumes", "model"}
    assert set(predictor) <= allowed, set(predictor) - allowed


def _quantity_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


@pytest.mark.parametrize("where", ["k8s", "kserve"])
def test_torchserve_gets_a_dev_shm_for_a_batch_of_decoded_images(where):
    """A GPU worker's decode processes hand the pixels back through shared memory
    (handler/pixel_slots.py), one slot per image of a batch; a pod's own /dev/shm is 64 MB."""
    if where == "k8s":
        pod, container = _one("Deployment")["spec"]["template"]["spec"], _container("torchserve")
    else:
        pod = _one("InferenceService", "kserve")["spec"]["predictor"]  # PodSpec fields inline
        container = pod["model"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    archive = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    size = PRESETS["seed-full"].image_size
    images = archive["batchSize"] * archive["handler"]["max_instances"]  # KServe v1: several per request
    batch_bytes = block_bytes(images, (3, size, size), np.uint8)  # uint8 pixels, as a GPU worker keeps them
    shm_bytes = _quantity_bytes(volume["emptyDir"]["sizeLimit"])
    assert shm_bytes >= 4 * batch_bytes  # and for 4x the batchSize
    assert shm_bytes < _quantity_bytes(container["resources"]["limits"]["memory"])


def test_kserve_config_properties_fits_the_runtime_layout():
    props = _properties(DEPLOY / "kserve" / "config" / "config.properties")
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["inference_address"] == "http://127.0.0.1:8085"
    # v1 is read by the handler itself: TorchServe's kserve envelope reads only the first
    # request of a batch (tests/e2e/test_kserve.py runs this file with the real TorchServe).
    assert _one("InferenceService", "kserve")["spec"]["predictor"]["model"]["protocolVersion"] == "v1"
    assert "service_envelope" not in props
    assert props["enable_envvars_config"] == "false"  # KServe's runtime sets TS_SERVICE_ENVELOPE=kserve
    assert props["install_py_dep_per_model"] == "false"  # nothing is downloaded at load time
    assert props["metrics_mode"] == "prometheus"
    assert props["metrics_address"].endswith(":8082")
    assert props["metrics_config"].startswith("/mnt/models/config/")
    assert props["disable_token_authorization"] == "true"  # the KServe model server sends no token
    snapshot = yaml.safe_load(props["model_snapshot"])  # JSON is YAML
    assert snapshot["modelCount"] == len(snapshot["models"]) == 1
    (version,) = snapshot["models"]["captioner"].values()
    assert version["marName"] == "captioner.mar" and version["defaultVersion"] is True
    archive = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    assert version["batchSize"] == archive["batchSize"] and version["responseTimeout"] == archive["responseTimeout"]
    assert int(props["default_response_timeout"]) == archive["responseTimeout"]
    # KServe's request timeout outlasts TorchServe's, so TorchServe answers a batch out of time
    assert _one("InferenceService", "kserve")["spec"]["predictor"]["timeout"] > archive["responseTimeout"]


def test_kserve_model_server_waits_for_the_worker_as_long_as_torchserve_does():
    """The runtime's model server polls TorchServe MODEL_LOAD_MAX_TRY times, MODEL_LOAD_DELAY s
    apart, and then gives up on the model for good: that must cover the worker's startupTimeout."""
    env = {item["name"]: item["value"] for item in _one("InferenceService", "kserve")["spec"]["predictor"]["model"]["env"]}
    archive = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    assert int(env["MODEL_LOAD_MAX_TRY"]) * int(env["MODEL_LOAD_DELAY"]) > archive["startupTimeout"]
