"""Deployment checks with no cluster, no Docker engine and no network.

The Helm chart is linted and rendered with the Helm SDK (helm-python-sdk, no helm binary) for its
default values and each `helm/dreamomni2/ci/*-values.yaml` (the chart-testing convention); every
rendered manifest goes through `kubernetes-validate --strict`. That tool has schemas for built-in kinds
only and merely warns about others, so the custom resources (KEDA's ScaledObject and
TriggerAuthentication, the Prometheus Operator's ServiceMonitor) are checked here instead, against
strict schemas of the fields the chart uses. Then the Dockerfiles go through hadolint and the compose
file through `docker-compose config`. The tools are CI dependencies: a missing one fails, never skips.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.config import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "dreamomni2"
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = [DOCKER / "gateway.Dockerfile", DOCKER / "worker.Dockerfile"]
RELEASE = NAMESPACE = "dreamomni2"
# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
VALUE_FILES: dict[str, Path | None] = {
    "default": None,
    **{p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))},
}
GPU_CASES = [case for case in VALUE_FILES if case != "tiny-cpu"]
HEALTH_COMMAND = ["python", "-m", "workers.health"]
WEBHOOKS_COMMAND = ["python", "-m", "workers.webhooks"]
WEBHOOK_SECRET_VARS = ("DREAMOMNI2_WEBHOOK_SECRET", "DREAMOMNI2_WEBHOOK_SECRETS")

Manifest = dict[str, Any]


# --- tools -------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A command-line tool from this environment's scripts folder (pip installs) or PATH."""
    local = Path(sysconfig.get_path("scripts")) / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is missing: install the dev tools (pip install -e '.[dev]'; .ci/run does)")
    return found


def compose_command() -> list[str]:
    """Debian's docker-compose (v1), else the docker CLI's compose plugin."""
    if found := shutil.which("docker-compose"):
        return [found]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.fail("docker-compose is missing: apt-get install docker-compose (.ci/run does)")


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except ImportError:
        pytest.fail("helm-python-sdk is missing: pip install -e '.[dev]' (.ci/run does)")
    return helm_python


# --- rendering ---------------------------------------------------------------------------------------


def case_values(case: str) -> dict[str, Any]:
    path = VALUE_FILES[case]
    return yaml.safe_load(path.read_text()) if path else {}


def render_files(helm, values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(helm, values: dict[str, Any]) -> list[Manifest]:
    files = render_files(helm, values)
    return [
        doc
        for name, text in sorted(files.items())
        if not name.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[Manifest]]:
    return {case: render(helm, case_values(case)) for case in VALUE_FILES}


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def workload(docs: list[Manifest], component: str) -> Manifest:
    matches = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(matches) == 1, f"expected one {component} workload"
    return matches[0]


def container(doc: Manifest, name: str | None = None) -> Manifest:
    containers = doc["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env_of(c: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def pod_templates(docs: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc, doc["spec"]["template"]


def shared_config(docs: list[Manifest]) -> dict[str, str]:
    return one(docs, "ConfigMap", f"{RELEASE}-config")["data"]


# --- Helm lint, render, kubernetes-validate -----------------------------------------------------------


def test_ci_values_cover_keda_external_redis_and_tiny_cpu():
    assert {"keda", "external-redis", "tiny-cpu"} <= set(VALUE_FILES)


@pytest.mark.parametrize("case", VALUE_FILES)
def test_helm_lint_strict(helm, case):
    report = helm.lint(CHART, case_values(case), strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_rendered_manifests_pass_kubernetes_validate_strict(rendered, tmp_path):
    files: dict[Path, Manifest] = {}
    for case, docs in rendered.items():
        for index, doc in enumerate(docs):
            path = tmp_path / case / f"{index:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml.safe_dump(doc))
            files[path] = doc
    for version in KUBE_VERSIONS:
        result = run([tool("kubernetes-validate"), "--strict", "-k", version, *map(str, files)])
        assert result.returncode == 0, result.stdout + result.stderr
        for path, doc in files.items():
            lines = [line for line in result.stdout.splitlines() if f" {path} " in line]
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                # No schema for custom resources: a warning, not a check (test_custom_resources_* does it).
                assert any(line.startswith("WARN") and "Couldn't find schema" in line for line in lines), (
                    lines
                )
            else:
                assert any(line.startswith("INFO") and "passed" in line for line in lines), (path, lines)


def test_kubernetes_validate_strict_rejects_unknown_fields(tmp_path):
    """The guard above is only as good as --strict: an unknown field in a probe must fail."""
    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "bad"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "livenessProbe": {"periodSecond": 3}}]},
            },
        },
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = run([tool("kubernetes-validate"), "--strict", str(path)])
    assert result.returncode != 0 and "periodSecond" in result.stdout


@pytest.mark.parametrize(
    "values",
    [
        {"worker": {"preset": "large"}},
        {"worker": {"gpus": 1}},
        {"redis": {"enabled": False}},
        {"auth": {"apiKeys": ["alice:not-a-hash"]}},
        {"config": {"jobTimeoutS": 0}},
        {"weights": {"source": "s3"}},
        {"webhooks": {"secret": "not-a-whsec-secret"}},
        {"webhooks": {"perKeySecrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}},
        {"webhooks": {"concurrency": 0}},
        {"webhooks": {"allowlist": ["10.0.0.0/8,192.168.0.0/16"]}},
        {"gateway": {"ingress": {"streaming": {"readTimeoutSeconds": 30}}}},
        {"worker": {"memory": "model"}},
        {"worker": {"speed": "turbo"}},
        {"redis": {"enabled": False}, "externalRedis": {"sentinel": {"hosts": ["s-0:26379"]}}},
        {"redis": {"enabled": False}, "externalRedis": {"sentinel": {"hosts": ["s-0"], "masterName": "m"}}},
        {
            "redis": {"enabled": False},
            "externalRedis": {"tls": True, "sentinel": {"hosts": ["s-0:26379"], "masterName": "m"}},
        },
        {"config": {"redisMinReplicas": 1}},  # the in-chart Redis has no replica: every job refused
        {"worker": {"batchImages": 0}},
        {"worker": {"batchImages": "all"}},
        {"loras": {"registry": {"-dash": {"path": "/loras/a.safetensors"}}}},
        {"loras": {"registry": {"a": {"scale": 1}}}},
        {"loras": {"registry": {"a": {"path": "someone/kontext-lora"}}}},  # a Hub id: the workers are offline
        {"loras": {"registry": {"a": {"path": "/loras/a.safetensors", "scale": 4.5}}}},
        {"loras": {"registry": {"a": {"path": "/loras/a.safetensors", "tasks": ["judge"]}}}},
        {"loras": {"registry": {"a": {"path": "/loras/a.safetensors", "tasks": []}}}},
        {"loras": {"registry": {"a": {"path": "/loras/a.safetensors", "rank": 4}}}},
        {"loras": {"maxPerJob": -1}},
        {"loras": {"maxRank": 0}},
        {"loras": {"volume": {"existingClaim": "l", "mountPath": "/models/loras"}}},
        {"loras": {"volume": {"existingClaim": "l", "subPath": "../weights"}}},
    ],
    ids=[
        "preset", "unknown-key", "external-redis-without-host", "api-key", "job-timeout", "weights-source",
        "webhook-secret", "webhook-per-key-secret", "webhook-concurrency", "webhook-allowlist-entry",
        "ingress-read-timeout", "memory-mode", "speed-profile", "sentinels-without-master",
        "sentinel-without-port", "sentinels-with-tls", "min-replicas-without-replicas",
        "batch-images-zero", "batch-images-word", "lora-name", "lora-without-path", "lora-hub-id",
        "lora-scale", "lora-text-task", "lora-no-task", "lora-unknown-key", "loras-per-job", "lora-rank",
        "lora-volume-over-weights", "lora-volume-subpath-escape",
    ],
)  # fmt: skip
def test_values_schema_rejects_bad_values(helm, values):
    with pytest.raises(helm.HelmValuesError):
        render(helm, values)


# --- custom resources: strict schemas of the fields the chart uses ------------------------------------


def strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": required or [],
    }


STRING = {"type": "string"}
NAME = {"type": "string", "minLength": 1}
COUNT = {"type": "integer", "minimum": 0}
DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
METADATA = {"type": "object", "required": ["name"], "properties": {"name": NAME}}


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return strict(
        {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
        ["apiVersion", "kind", "metadata", "spec"],
    )


# KEDA 2.x (keda.sh/v1alpha1): the ScaledObject fields, and the Redis list scalers' parameters (plain
# and through Sentinel).
REDIS_TRIGGER_METADATA = strict(
    {
        key: STRING
        for key in (
            "address", "addresses", "host", "hosts", "port", "ports", "username", "listName", "listLength",
            "activationListLength", "databaseIndex", "enableTLS", "unsafeSsl", "sentinelMaster",
        )
    },
    ["listName"],
)  # fmt: skip
AUTHENTICATION_REF = strict(
    {"name": NAME, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}, ["name"]
)
TRIGGER = strict(
    {
        "type": {"enum": ["redis", "redis-sentinel"]},
        "name": STRING,
        "metadata": REDIS_TRIGGER_METADATA,
        "authenticationRef": AUTHENTICATION_REF,
        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
        "useCachedMetrics": {"type": "boolean"},
    },
    ["type", "metadata"],
)
SCALE_TARGET = strict(
    {"apiVersion": STRING, "kind": STRING, "name": NAME, "envSourceContainerName": STRING}, ["name"]
)
HPA_CONFIG = strict({"name": STRING, "behavior": {"type": "object"}})  # behavior: checked as an HPA's
SCALED_OBJECT_SPEC = strict(
    {
        "scaleTargetRef": SCALE_TARGET,
        "minReplicaCount": COUNT,
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": COUNT,
        "initialCooldownPeriod": COUNT,
        "idleReplicaCount": COUNT,
        "advanced": strict(
            {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": HPA_CONFIG,
            }
        ),
        "triggers": {"type": "array", "minItems": 1, "items": TRIGGER},
    },
    ["scaleTargetRef", "triggers"],
)
SECRET_TARGET_REF = strict(
    {
        "parameter": {"enum": ["password", "username", "sentinelPassword", "tls", "ca", "cert", "key"]},
        "name": NAME,
        "key": NAME,
    },
    ["parameter", "name", "key"],
)
TRIGGER_AUTHENTICATION_SPEC = strict(
    {"secretTargetRef": {"type": "array", "minItems": 1, "items": SECRET_TARGET_REF}}, ["secretTargetRef"]
)
# Prometheus Operator (monitoring.coreos.com/v1).
ENDPOINT = strict(
    {
        "port": NAME,
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "authorization": strict(
            {
                "type": {"enum": ["Bearer"]},
                "credentials": strict({"name": NAME, "key": NAME}, ["name", "key"]),
            },
            ["credentials"],
        ),
    },
    ["port"],
)
NAMESPACE_SELECTOR = strict({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": NAME}})
SERVICE_MONITOR_SPEC = strict(
    {
        "selector": {"type": "object"},  # a LabelSelector: checked as a PodDisruptionBudget's
        "namespaceSelector": NAMESPACE_SELECTOR,
        "jobLabel": STRING,
        "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT},
    },
    ["selector", "endpoints"],
)
CRD_SCHEMAS = {
    "ScaledObject": resource("keda.sh/v1alpha1", "ScaledObject", SCALED_OBJECT_SPEC),
    "TriggerAuthentication": resource(
        "keda.sh/v1alpha1", "TriggerAuthentication", TRIGGER_AUTHENTICATION_SPEC
    ),
    "ServiceMonitor": resource("monitoring.coreos.com/v1", "ServiceMonitor", SERVICE_MONITOR_SPEC),
}


def kube_validate(doc: Manifest) -> None:
    from kubernetes_validate import utils

    utils.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_custom_resources_match_their_schemas(rendered):
    import jsonschema

    seen = set()
    for case, docs in rendered.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
                continue
            seen.add(doc["kind"])
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            # The Kubernetes types inside them, through kubernetes-validate's strict schemas.
            if doc["kind"] == "ScaledObject":
                behavior = (
                    doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
                )
                kube_validate(
                    {
                        "apiVersion": "autoscaling/v2",
                        "kind": "HorizontalPodAutoscaler",
                        "metadata": {"name": "behavior-of-" + case},
                        "spec": {
                            "scaleTargetRef": doc["spec"]["scaleTargetRef"],
                            "minReplicas": 1,
                            "maxReplicas": doc["spec"]["maxReplicaCount"],
                            "behavior": behavior or {},
                        },
                    }
                )
            if doc["kind"] == "ServiceMonitor":
                kube_validate(
                    {
                        "apiVersion": "policy/v1",
                        "kind": "PodDisruptionBudget",
                        "metadata": {"name": "selector-of-" + case},
                        "spec": {"maxUnavailable": 1, "selector": doc["spec"]["selector"]},
                    }
                )
    assert seen == {kind for _, kind in CRD_KINDS}, "a CI values file should turn on every custom resource"


def test_custom_resource_schemas_reject_typos():
    import jsonschema

    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "w"},
        "spec": {
            "scaleTargetRef": {"name": "w"},
            "triggers": [{"type": "redis", "metadata": {"listname": "q"}}],
        },
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CRD_SCHEMAS["ScaledObject"])


# --- cross-references inside a render -----------------------------------------------------------------


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("case", VALUE_FILES)
def test_selectors_and_targets_find_their_pods(rendered, case):
    docs = rendered[case]
    pods = [template["metadata"]["labels"] for _, template in pod_templates(docs)]
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind == "Service":
            assert any(selects(spec["selector"], p) for p in pods), doc["metadata"]["name"]
        if kind in ("PodDisruptionBudget", "Deployment", "StatefulSet"):
            assert any(selects(spec["selector"]["matchLabels"], p) for p in pods), doc["metadata"]["name"]
        if kind == "NetworkPolicy":
            assert any(selects(spec["podSelector"]["matchLabels"], p) for p in pods)
        if kind == "HorizontalPodAutoscaler" or kind == "ScaledObject":
            target = spec["scaleTargetRef"]
            assert one(docs, target["kind"], target["name"])
        if kind == "ServiceMonitor":
            services = [
                s
                for s in find(docs, "Service")
                if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])
            ]
            assert services, doc["metadata"]["name"]
            ports = {p["name"] for s in services for p in s["spec"]["ports"]}
            assert {e["port"] for e in spec["endpoints"]} <= ports
        if kind == "Ingress":
            for rule in spec["rules"]:
                for path in rule["http"]["paths"]:
                    service = one(docs, "Service", path["backend"]["service"]["name"])
                    assert path["backend"]["service"]["port"]["name"] in {
                        p["name"] for p in service["spec"]["ports"]
                    }


def existing_names(values: object, key: str) -> set[str]:
    """Every non-empty value of `key` anywhere in the values: objects the chart expects to exist."""
    if isinstance(values, dict):
        found = {v for k, v in values.items() if k == key and isinstance(v, str) and v}
        return found.union(*(existing_names(v, key) for v in values.values()))
    return set()


@pytest.mark.parametrize("case", VALUE_FILES)
def test_config_maps_secrets_and_claims_exist(rendered, case):
    docs, values = rendered[case], case_values(case)
    secrets = {d["metadata"]["name"]: d for d in find(docs, "Secret")}
    config_maps = {d["metadata"]["name"] for d in find(docs, "ConfigMap")}
    claims = {d["metadata"]["name"] for d in find(docs, "PersistentVolumeClaim")}
    external_secrets = existing_names(values, "existingSecret")
    for _, template in pod_templates(docs):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in external_secrets:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims | existing_names(
                    values, "existingClaim"
                )
    for doc in find(docs, "TriggerAuthentication"):
        for ref in doc["spec"]["secretTargetRef"]:
            assert ref["name"] in external_secrets or ref["key"] in secrets[ref["name"]]["stringData"]


@pytest.mark.parametrize("case", VALUE_FILES)
def test_every_dreamomni2_variable_is_a_real_setting(rendered, case):
    from app.settings import GatewaySettings
    from models.settings import EngineSettings
    from workers.config import WorkerSettings

    known = {
        f"DREAMOMNI2_{name.upper()}"
        for cls in (GatewaySettings, WorkerSettings, EngineSettings)
        for name in cls.model_fields
    } | {
        f"DREAMOMNI2_{name.upper()}" for name in WorkerSettings.model_fields["limits"].annotation.model_fields
    }
    used = set(shared_config(rendered[case]))
    for _, template in pod_templates(rendered[case]):
        for c in template["spec"]["containers"]:
            used |= set(env_of(c))
    unknown = sorted(name for name in used if name.startswith("DREAMOMNI2_") and name not in known)
    assert not unknown, unknown


# --- the service's own requirements --------------------------------------------------------------------


@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_workers_ask_for_a_gpu_and_tolerate_gpu_nodes(rendered, case):
    worker = workload(rendered[case], "worker")
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container(worker))["DREAMOMNI2_PRESET"] == "dreamomni2"
    assert any(t["key"] == "nvidia.com/gpu" for t in worker["spec"]["template"]["spec"]["tolerations"])


def test_the_memory_mode_reaches_the_workers(rendered):
    default = env_of(container(workload(rendered["default"], "worker")))
    assert default["DREAMOMNI2_MEMORY"] == "resident"
    assert (
        env_of(container(workload(rendered["external-redis"], "worker")))["DREAMOMNI2_MEMORY"] == "balanced"
    )
    # The setting it replaced must not come back: a worker refuses to start with it.
    assert "DREAMOMNI2_OFFLOAD" not in json.dumps(rendered)


def test_tiny_cpu_values_use_no_gpu(rendered):
    docs = rendered["tiny-cpu"]
    assert "nvidia.com/gpu" not in json.dumps(docs)
    worker = container(workload(docs, "worker"))
    assert env_of(worker)["DREAMOMNI2_PRESET"] == "tiny" and env_of(worker)["DREAMOMNI2_DEVICE"] == "cpu"
    assert not find(docs, "PersistentVolumeClaim") and not find(docs, "Job")


@pytest.mark.parametrize("case", VALUE_FILES)
def test_workers_outlive_the_longest_job_and_probe_health(rendered, case):
    docs = rendered[case]
    worker = workload(docs, "worker")
    timeout = int(shared_config(docs)["DREAMOMNI2_JOB_TIMEOUT_S"])
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout
    c = container(worker)
    assert c["command"] == ["python", "-m", "workers"]  # SIGTERM reaches Celery: warm shutdown
    startup, liveness = c["startupProbe"], c["livenessProbe"]
    assert startup["exec"]["command"] == liveness["exec"]["command"] == HEALTH_COMMAND
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (1800 if case != "tiny-cpu" else 120), "model loading needs time"
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 300, (
        "a hung worker is caught in minutes"
    )


def test_grace_period_follows_the_job_timeout(helm):
    docs = render(helm, {"config": {"jobTimeoutS": 3600}})
    assert workload(docs, "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 3600
    assert shared_config(docs)["DREAMOMNI2_JOB_TIMEOUT_S"] == "3600"


def test_logs_are_json_and_traces_off_until_a_collector_is_named(helm, rendered):
    config = shared_config(rendered["default"])
    assert config["DREAMOMNI2_LOG_FORMAT"] == "json"
    assert not [name for name in config if name.startswith("OTEL_")]
    traced = {
        "otlpEndpoint": "http://otel-collector.observability:4318",
        "env": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": 0.1},
    }
    config = shared_config(render(helm, {"tracing": traced, "config": {"logFormat": "text"}}))
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == traced["otlpEndpoint"]
    assert config["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert config["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert config["DREAMOMNI2_LOG_FORMAT"] == "text"
    for refused in (
        {"config": {"logFormat": "yaml"}},
        {"tracing": {"otlpEndpoint": "otel-collector:4318"}},
        {"tracing": {"env": {"DREAMOMNI2_LOG_FORMAT": "text"}}},
    ):
        with pytest.raises(helm.HelmValuesError):
            render(helm, refused)


@pytest.mark.parametrize("case", VALUE_FILES)
def test_gateway_probes_and_no_torch_image(rendered, case):
    gateway = container(workload(rendered[case], "gateway"))
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert env_of(gateway)["DREAMOMNI2_HOST"] == "0.0.0.0"
    assert "gateway" in gateway["image"]


def max_wait_s() -> int:
    from app.settings import GatewaySettings

    return GatewaySettings.model_fields["max_wait_s"].default


@pytest.mark.parametrize("case", VALUE_FILES)
def test_gateway_stops_after_its_held_requests(rendered, case):
    """preStop (endpoint removal), then held `Prefer: wait` requests finish; event streams are closed
    by the server on shutdown (clients resume elsewhere with Last-Event-ID), so they hold nothing."""
    gateway = workload(rendered[case], "gateway")
    pod = gateway["spec"]["template"]["spec"]
    [sleep, seconds] = container(gateway)["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and pod["terminationGracePeriodSeconds"] > int(seconds) + max_wait_s()


def test_ingress_streams_server_sent_events(rendered, helm):
    """ingress-nginx must not buffer /v1/jobs/{id}/events, and its idle timeout must outlast both the
    15 s keep-alive pings and the longest held request; annotations set by hand win."""
    annotations = one(rendered["keda"], "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "90"  # the values file's
    assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == "3600"
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "110m"
    values = {"gateway": {"ingress": {"enabled": True}}}
    defaults = one(render(helm, values), "Ingress")["metadata"]["annotations"]
    assert defaults["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(defaults["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > max(15, max_wait_s())
    values["gateway"]["ingress"]["streaming"] = {"nginxAnnotations": False}
    assert "annotations" not in one(render(helm, values), "Ingress")["metadata"]


# --- webhook delivery workers -------------------------------------------------------------------------


def webhook_secret_env(c: Manifest) -> dict[str, Any]:
    return {name: ref for name, ref in env_of(c).items() if name in WEBHOOK_SECRET_VARS}


@pytest.mark.parametrize("case", VALUE_FILES)
def test_webhook_workers_run_from_the_gateway_image_with_the_shared_settings(rendered, case):
    docs = rendered[case]
    webhooks = workload(docs, "webhooks")
    assert webhooks["kind"] == "Deployment"
    c = container(webhooks)
    gateway, worker = container(workload(docs, "gateway")), container(workload(docs, "worker"))
    assert c["command"] == WEBHOOKS_COMMAND  # SIGTERM reaches Celery: warm shutdown
    assert c["image"] == gateway["image"], "no torch: the gateway image"
    # No port: the liveness probe reads the file the worker touches while its consumer consumes.
    assert "ports" not in c and not {"readinessProbe", "startupProbe"} & set(c)
    assert c["livenessProbe"]["exec"]["command"] == ["python", "-m", "workers.health"]
    assert env_of(c)["DREAMOMNI2_LIVENESS_FILE"].startswith("/tmp/")  # the writable emptyDir
    assert c["envFrom"] == gateway["envFrom"] == worker["envFrom"], "one ConfigMap for all three"
    env = env_of(c)
    assert env["DREAMOMNI2_REDIS_URL"] == env_of(gateway)["DREAMOMNI2_REDIS_URL"]
    if "REDIS_PASSWORD" in env_of(gateway):
        assert env["REDIS_PASSWORD"] == env_of(gateway)["REDIS_PASSWORD"]
    expected_concurrency = case_values(case).get("webhooks", {}).get("concurrency", 16)
    assert env["DREAMOMNI2_WEBHOOK_CONCURRENCY"] == str(expected_concurrency)
    # The signing secrets: from a Secret, identical in the gateway, the GPU workers and the webhook workers.
    secrets = webhook_secret_env(c)
    assert secrets == webhook_secret_env(gateway) == webhook_secret_env(worker)
    assert all(set(ref) == {"secretKeyRef"} for ref in secrets.values())
    if case == "default":
        assert not secrets, "no secret configured: none referenced"
    else:
        assert "DREAMOMNI2_WEBHOOK_SECRET" in secrets
    config = shared_config(docs)
    for name in (
        "DREAMOMNI2_WEBHOOK_QUEUE", "DREAMOMNI2_WEBHOOK_ALLOWLIST", "DREAMOMNI2_WEBHOOK_BACKOFF_S",
        "DREAMOMNI2_WEBHOOK_MAX_ATTEMPTS", "DREAMOMNI2_WEBHOOK_TIMEOUT_S",
        "DREAMOMNI2_WEBHOOK_PROGRESS_INTERVAL_S",
    ):  # fmt: skip
        assert name in config
        assert all(name not in env_of(x) for x in (c, gateway, worker)), f"{name} would shadow the ConfigMap"
    assert config["DREAMOMNI2_WEBHOOK_QUEUE"] == "dreamomni2.webhooks"
    pod = webhooks["spec"]["template"]["spec"]
    gateway_pod = workload(docs, "gateway")["spec"]["template"]["spec"]
    assert pod["securityContext"] == gateway_pod["securityContext"]
    assert c["securityContext"] == gateway["securityContext"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] > float(config["DREAMOMNI2_WEBHOOK_TIMEOUT_S"])
    assert webhooks["spec"]["replicas"] == case_values(case).get("webhooks", {}).get("replicas", 2)


def test_webhook_secrets_come_from_the_charts_secret_or_yours(rendered):
    from workers.config import parse_webhook_secrets as parse_secrets

    values = case_values("keda")["webhooks"]
    env = webhook_secret_env(container(workload(rendered["keda"], "webhooks")))
    secret = one(rendered["keda"], "Secret", f"{RELEASE}-webhooks")["stringData"]
    assert {name: secret[ref["secretKeyRef"]["key"]] for name, ref in env.items()} == {
        "DREAMOMNI2_WEBHOOK_SECRET": values["secret"],
        "DREAMOMNI2_WEBHOOK_SECRETS": ",".join(values["perKeySecrets"]),
    }
    assert set(parse_secrets(secret["webhook-secrets"])) == {"ops"}, "the service reads the entries"
    # Only the deployment's secret: only its key, and no optional references to a Secret the chart writes.
    env = webhook_secret_env(container(workload(rendered["tiny-cpu"], "webhooks")))
    assert env == {
        "DREAMOMNI2_WEBHOOK_SECRET": {
            "secretKeyRef": {"name": f"{RELEASE}-webhooks", "key": "webhook-secret"}
        }
    }
    # A Secret of your own may hold either key, or both.
    assert not find(rendered["external-redis"], "Secret")
    env = webhook_secret_env(container(workload(rendered["external-redis"], "webhooks")))
    assert {name: ref["secretKeyRef"] for name, ref in env.items()} == {
        "DREAMOMNI2_WEBHOOK_SECRET": {
            "name": "dreamomni2-webhook-secrets", "key": "webhook-secret", "optional": True,
        },
        "DREAMOMNI2_WEBHOOK_SECRETS": {
            "name": "dreamomni2-webhook-secrets", "key": "webhook-secrets", "optional": True,
        },
    }  # fmt: skip


def test_the_result_links_key_reaches_the_gateway_and_workers_from_one_secret(helm, rendered):
    from workers.config import ServiceSettings as Settings

    docs = rendered["default"]
    refs = {c: env_of(container(workload(docs, c))).get("DREAMOMNI2_RESULT_URL_SECRET") for c in
            ("gateway", "worker", "webhooks")}  # fmt: skip
    assert refs["gateway"] == refs["worker"] and refs["webhooks"] is None  # deliveries send stored bodies
    ref = refs["gateway"]["secretKeyRef"]
    generated = one(docs, "Secret", ref["name"])["stringData"][ref["key"]]
    assert Settings(result_url_secret=generated).result_url_secret.get_secret_value() == generated
    assert shared_config(docs)["DREAMOMNI2_PUBLIC_URL"] == ""  # no ingress: each request's own base
    # The ingress's host is the links' base (https where it has tls); publicUrl names another.
    ingress = {"enabled": True, "tls": [{"hosts": ["dreamomni2.example.com"], "secretName": "tls"}]}
    config = shared_config(render(helm, {"gateway": {"ingress": ingress}}))
    assert Settings(public_url=config["DREAMOMNI2_PUBLIC_URL"]).public_url == "https://dreamomni2.example.com"
    named = {"resultUrls": {"publicUrl": "https://cdn.example.com/api/", "ttlS": 600}}
    config = shared_config(render(helm, named))
    assert (config["DREAMOMNI2_PUBLIC_URL"], config["DREAMOMNI2_RESULT_URL_TTL_S"]) == (
        "https://cdn.example.com/api", "600",
    )  # fmt: skip
    for bad in ({"secret": "too-short"}, {"publicUrl": "dreamomni2.example.com"}, {"ttlS": 0}):
        with pytest.raises(helm.HelmValuesError):
            render(helm, {"resultUrls": bad})


def test_webhook_secret_changes_restart_the_pods_that_read_them(helm):
    def checksums(values: dict[str, Any]) -> dict[str, str]:
        docs = render(helm, values)
        return {
            component: workload(docs, component)["spec"]["template"]["metadata"]["annotations"].get(
                "checksum/webhook-secrets"
            )
            for component in ("webhooks", "worker")
        }

    before = checksums({"webhooks": {"secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}})
    after = checksums({"webhooks": {"secret": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"}})
    assert all(before.values()) and all(before[c] != after[c] for c in before)
    # API keys alone do not restart the GPU workers (a restart reloads the models).
    keyed = checksums({"auth": {"apiKeys": ["ops:" + "0" * 64]}})
    assert keyed["worker"] == checksums({})["worker"]


def test_notes_warn_when_no_webhook_secret_is_configured(helm):
    def notes(values: dict[str, Any]) -> str:
        return next(text for name, text in render_files(helm, values).items() if name.endswith("NOTES.txt"))

    assert "no webhook signing secret" in notes({})
    configured = notes(case_values("keda"))
    assert "no webhook signing secret" not in configured and "dreamomni2-webhooks" in configured
    # Retries wait in Redis, not in a worker: a wait past the broker's visibility timeout is fine.
    assert "visibility timeout" not in configured
    assert "visibility timeout" not in notes({"webhooks": {"backoffS": 600}})  # 600 x 2^6 = 38400 s


def egress_allows(
    docs: list[Manifest], policy: Manifest, port: int, protocol: str = "TCP", *, ip: str = "", pod: str = ""
) -> bool:
    """Whether an egress policy admits a connection to an address, or to the pods of a component."""
    for rule in policy["spec"]["egress"]:
        ports = rule.get("ports")
        if ports and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
            continue
        if "to" not in rule:
            return True
        for peer in rule["to"]:
            if ip and "ipBlock" in peer:
                address, block = ipaddress.ip_address(ip), peer["ipBlock"]
                network = ipaddress.ip_network(block["cidr"])
                if address.version == network.version and address in network:
                    if not any(address in ipaddress.ip_network(e) for e in block.get("except", [])):
                        return True
            if pod and "podSelector" in peer and "namespaceSelector" not in peer:
                labels = workload(docs, pod)["spec"]["template"]["metadata"]["labels"]
                if selects(peer["podSelector"]["matchLabels"], labels):
                    return True
    return False


@pytest.mark.parametrize("case", VALUE_FILES)
def test_webhook_egress_reaches_dns_redis_and_public_addresses_only(rendered, case):
    docs = rendered[case]
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-webhooks-egress")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    selected = {
        component
        for component in ("gateway", "worker", "webhooks", "redis")
        if find(docs, "StatefulSet") or component != "redis"
        if selects(
            policy["spec"]["podSelector"]["matchLabels"],
            workload(docs, component)["spec"]["template"]["metadata"]["labels"],
        )
    }
    assert selected == {"webhooks"}
    # No other pod's egress is restricted.
    egress_policies = [p for p in find(docs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]
    assert egress_policies == [policy]

    def allows(port: int, protocol: str = "TCP", **peer: str) -> bool:
        return egress_allows(docs, policy, port, protocol, **peer)

    for public in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111"):
        assert allows(443, ip=public) and allows(8443, ip=public), public
    for private in (
        "169.254.169.254", "10.0.0.1", "172.20.0.1", "192.168.1.10", "100.64.0.1", "127.0.0.1",
        "fd00:ec2::254", "fe80::1", "::1", "::ffff:10.0.0.1",
    ):  # fmt: skip
        assert not allows(80, ip=private) and not allows(443, ip=private), private
    for dns in ("10.96.0.10", "169.254.20.10"):  # cluster DNS, a node-local cache
        assert allows(53, "UDP", ip=dns) and allows(53, "TCP", ip=dns)
    if find(docs, "StatefulSet"):
        assert allows(6379, pod="redis") and not allows(6379, pod="gateway")
    else:
        port = case_values(case)["externalRedis"]["port"]
        assert allows(port, ip="10.0.0.5"), "an external Redis, wherever it is"
    if case == "keda":  # its allowlist: a CIDR (opened) and a host name (not expressible)
        assert allows(443, ip="10.20.3.4") and not allows(443, ip="10.21.0.1")


def test_webhook_egress_policy_can_be_turned_off(helm):
    docs = render(helm, {"networkPolicy": {"webhookEgress": {"enabled": False}}})
    assert [p["metadata"]["name"] for p in find(docs, "NetworkPolicy")] == [f"{RELEASE}-redis"]
    assert not find(render(helm, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


def test_in_chart_redis_persists_and_never_evicts(rendered):
    docs = rendered["default"]
    redis = workload(docs, "redis")
    assert redis["kind"] == "StatefulSet" and redis["spec"]["volumeClaimTemplates"]
    conf = one(docs, "ConfigMap", f"{RELEASE}-redis-config")["data"]["redis.conf"].splitlines()
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    assert any(m["mountPath"] == "/data" for m in container(redis)["volumeMounts"])
    url = env_of(container(workload(docs, "gateway")))["DREAMOMNI2_REDIS_URL"]
    assert url == f"redis://:$(REDIS_PASSWORD)@{RELEASE}-redis.{NAMESPACE}.svc:6379/0"


@pytest.mark.parametrize("case", ["default", "keda", "tiny-cpu"])
def test_network_policy_lets_only_gateway_workers_and_webhooks_reach_redis(rendered, case):
    docs = rendered[case]
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-redis")
    redis_pods = workload(docs, "redis")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], redis_pods)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    peers = [p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p]
    components = ["gateway", "worker", "webhooks", "redis"] + (["weights"] if find(docs, "Job") else [])
    admitted = {
        component
        for component in components
        if any(
            selects(peer, workload(docs, component)["spec"]["template"]["metadata"]["labels"])
            for peer in peers
        )
    }
    assert admitted == {"gateway", "worker", "webhooks"}
    namespaces = [p["namespaceSelector"]["matchLabels"] for p in rule["from"] if "namespaceSelector" in p]
    assert namespaces == ([{"kubernetes.io/metadata.name": "keda"}] if case == "keda" else [])


def test_keda_scales_workers_on_the_celery_list(rendered):
    docs = rendered["keda"]
    scaled = one(docs, "ScaledObject")
    worker = workload(docs, "worker")
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0
    # New jobs, and the front list of jobs requeued after their worker died (`ServiceSettings`).
    triggers = scaled["spec"]["triggers"]
    queue = shared_config(docs)["DREAMOMNI2_QUEUE"]
    assert queue == "dreamomni2.jobs" and ServiceSettings(queue=queue).front_queue == f"{queue}.front"
    assert [t["metadata"]["listName"] for t in triggers] == [queue, f"{queue}.front"]
    trigger, front = triggers
    assert trigger["type"] == front["type"] == "redis"
    assert {**front["metadata"], "listName": queue} == trigger["metadata"]
    assert front["authenticationRef"] == trigger["authenticationRef"]
    meta = trigger["metadata"]
    assert meta["address"] == f"{RELEASE}-redis.{NAMESPACE}.svc:6379" and meta["databaseIndex"] == "0"
    auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    redis_password = container(workload(docs, "redis"))["env"][0]["valueFrom"]["secretKeyRef"]
    assert {"name": ref["name"], "key": ref["key"]} == redis_password


def test_external_redis_over_tls_with_its_own_secret(rendered):
    docs = rendered["external-redis"]
    assert not find(docs, "StatefulSet")
    assert [p["metadata"]["name"] for p in find(docs, "NetworkPolicy")] == [f"{RELEASE}-webhooks-egress"]
    for component in ("gateway", "worker", "webhooks"):
        env = env_of(container(workload(docs, component)))
        assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "managed-redis", "key": "password"}}
        assert env["DREAMOMNI2_REDIS_URL"] == (
            "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2?ssl_cert_reqs=required"
        )
    meta = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    assert meta["address"] == "redis.example.internal:6380"
    assert (meta["databaseIndex"], meta["enableTLS"]) == ("2", "true")
    assert one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"][0]["name"] == "managed-redis"


def test_external_sentinels_reach_every_component_keda_and_the_webhook_egress(rendered):
    docs = rendered["external-sentinel"]
    values = case_values("external-sentinel")["externalRedis"]
    assert not find(docs, "StatefulSet")
    for component in ("gateway", "worker", "webhooks"):
        env = env_of(container(workload(docs, component)))
        assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "redis", "key": "redis-password"}}
        # What the service reads: the database and the password of the URL, the primary from the sentinels.
        password = "pw"
        settings = ServiceSettings(
            **{
                name.removeprefix("DREAMOMNI2_").lower(): value.replace("$(REDIS_PASSWORD)", password)
                for name, value in env.items()
                if name.startswith("DREAMOMNI2_REDIS_")
            }
        )
        target = settings.redis_target
        assert target.sentinels == tuple((h.split(":")[0], 26379) for h in values["sentinel"]["hosts"])
        assert (target.master, target.sentinel_password) == ("mymaster", password)
        assert target.credentials() == {"db": 1, "password": password}
    assert shared_config(docs)["DREAMOMNI2_REDIS_MIN_REPLICAS"] == "1"
    triggers = one(docs, "ScaledObject")["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"redis-sentinel"}
    meta = triggers[0]["metadata"]
    assert meta["addresses"] == ",".join(values["sentinel"]["hosts"]) and meta["sentinelMaster"] == "mymaster"
    assert meta["databaseIndex"] == "1"
    refs = one(docs, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in refs} == {"password", "sentinelPassword"}
    policy = one(docs, "NetworkPolicy", f"{RELEASE}-webhooks-egress")
    for port in (6379, 26379):  # the data nodes', the sentinels'
        assert egress_allows(docs, policy, port, ip="10.0.0.5"), port


def test_weights_are_downloaded_once_onto_a_shared_volume(rendered):
    docs = rendered["default"]
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = workload(docs, "weights")
    download = container(job)
    target = download["command"][download["command"].index("--target") + 1]
    worker = workload(docs, "worker")
    pod = worker["spec"]["template"]["spec"]
    [wait] = pod["initContainers"]
    assert env_of(wait)["MARKER"] == f"{target}/.complete"
    env = env_of(container(worker))
    assert (
        env["DREAMOMNI2_BASE_MODEL"] == f"{target}/base"
        and env["DREAMOMNI2_ADAPTERS"] == f"{target}/adapters"
    )
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env
    assert all(m["readOnly"] for m in container(worker)["volumeMounts"] if m["name"] == "weights")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {claim["metadata"]["name"]}
    scripts = one(docs, "ConfigMap", f"{RELEASE}-weights-download")["data"]
    assert (
        scripts["download_weights.py"].strip()
        == (CHART / "files" / "download_weights.py").read_text().strip()
    )
    assert json.loads(scripts["spec.json"])["base"]["repo"] == "black-forest-labs/FLUX.1-Kontext-dev"
    # With a token Secret the Job (only the Job) gets HF_TOKEN.
    assert "HF_TOKEN" in env_of(container(workload(rendered["keda"], "weights")))


def test_new_weights_get_a_new_job_and_folder_and_new_images_only_a_new_job(helm):
    def job_and_target(values: dict[str, Any]) -> tuple[str, str]:
        job = workload(render(helm, values), "weights")
        command = container(job)["command"]
        return job["metadata"]["name"], command[command.index("--target") + 1]

    base = job_and_target({})
    assert job_and_target({}) == base
    new_revision = job_and_target({"weights": {"baseModel": {"revision": "0123abc"}}})
    assert new_revision[0] != base[0] and new_revision[1] != base[1]
    new_image = job_and_target({"worker": {"image": {"tag": "0.2.0"}}})
    assert new_image[0] != base[0] and new_image[1] == base[1]


def test_compiled_workers_keep_their_compile_cache_on_the_weights_volume(helm):
    docs = render(helm, {"worker": {"speed": "compiled"}})
    worker = workload(docs, "worker")
    pod = worker["spec"]["template"]["spec"]
    env = env_of(container(worker))
    assert env["DREAMOMNI2_SPEED"] == "compiled" and env["DREAMOMNI2_COMPILE_CACHE_DIR"] == "/compile-cache"
    mount = next(m for m in container(worker)["volumeMounts"] if m["mountPath"] == "/compile-cache")
    assert mount["subPath"] == "torch-compile" and not mount.get("readOnly")
    claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert {"claimName": claims[0]["claimName"]} in claims  # the same PVC, once read-write
    emptied = render(helm, {"worker": {"speed": "compiled", "compileCache": {"persistence": "emptyDir"}}})
    volumes = workload(emptied, "worker")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "compile-cache", "emptyDir": {}} in volumes


def test_prefilled_weights_are_mounted_read_only_without_a_download(rendered):
    docs = rendered["external-redis"]
    assert not find(docs, "Job") and not find(docs, "PersistentVolumeClaim")
    worker = workload(docs, "worker")
    pod = worker["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    [claim] = [v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim == {"claimName": "dreamomni2-weights-prefilled", "readOnly": True}
    assert env_of(container(worker))["DREAMOMNI2_BASE_MODEL"] == "/models/FLUX.1-Kontext-dev"


@pytest.mark.parametrize("case", VALUE_FILES)
def test_pods_run_as_non_root_with_pdbs(rendered, case):
    docs = rendered[case]
    for _, template in pod_templates(docs):
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    budgets = {
        d["metadata"]["labels"]["app.kubernetes.io/component"] for d in find(docs, "PodDisruptionBudget")
    }
    webhooks_budget = case_values(case).get("webhooks", {}).get("pdb", {}).get("enabled", True)
    assert budgets == {"gateway", "worker"} | ({"webhooks"} if webhooks_budget else set())


# --- the weights download script ----------------------------------------------------------------------


def test_download_script_fills_the_folder_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ inside the chart
    spec_module = importlib.util.spec_from_file_location(
        "download_weights", CHART / "files" / "download_weights.py"
    )
    script = importlib.util.module_from_spec(spec_module)
    spec_module.loader.exec_module(script)
    calls: list[dict[str, Any]] = []
    fake_hub = type(sys)("huggingface_hub")
    fake_hub.snapshot_download = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    spec = {
        "base": {
            "repo": "org/base",
            "revision": "abc",
            "allowPatterns": [],
            "ignorePatterns": ["big.safetensors"],
        },
        "adapters": {"repo": "org/adapters", "revision": "def", "allowPatterns": ["edit_lora/*"]},
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    target = tmp_path / "sets" / "x"
    assert script.main(["--spec", str(spec_file), "--target", str(target)]) == 0
    assert [(c["repo_id"], c["revision"], c["local_dir"]) for c in calls] == [
        ("org/base", "abc", target / "base"),
        ("org/adapters", "def", target / "adapters"),
    ]
    assert calls[0]["allow_patterns"] is None and calls[0]["ignore_patterns"] == ["big.safetensors"]
    assert calls[1]["allow_patterns"] == ["edit_lora/*"] and calls[0]["token"] == "hf_test"
    assert json.loads((target / ".complete").read_text()) == spec
    assert script.main(["--spec", str(spec_file), "--target", str(target)]) == 0
    assert len(calls) == 2, "a complete folder is not downloaded again"


# --- dashboard ----------------------------------------------------------------------------------------


def exported_metrics() -> set[str]:
    sources = (ROOT / "app" / "metrics.py").read_text() + (ROOT / "workers" / "metrics.py").read_text()
    return set(re.findall(r'"(dreamomni2_[a-z_]+)"', sources))


def test_dashboard_shows_every_exported_metric_and_nothing_else(rendered):
    text = (CHART / "dashboards" / "dreamomni2.json").read_text()
    dashboard = json.loads(text)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    used = {
        re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"dreamomni2_[a-z_]+", e)
    }
    exported = exported_metrics()
    assert len(exported) >= 12, exported
    assert used <= exported, f"not exported by the service: {sorted(used - exported)}"
    assert exported <= used, f"not on the dashboard: {sorted(exported - used)}"
    shipped = one(rendered["keda"], "ConfigMap", f"{RELEASE}-dashboard")
    assert shipped["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(shipped["data"]["dreamomni2.json"]) == dashboard


# --- Dockerfiles and compose --------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint():
    result = run([tool("hadolint"), "--config", str(DOCKER / ".hadolint.yaml"), *map(str, DOCKERFILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_pin_bases_and_install_the_tested_dependency_sets():
    gateway, worker = (path.read_text() for path in DOCKERFILES)
    for text in (gateway, worker):
        [base] = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
        assert re.search(r":\d+\.\d+\.\d+-", base), f"{base}: pin an exact version"
        assert re.search(r"^USER 10001", text, re.MULTILINE) and "HEALTHCHECK" in text
    assert worker.startswith("# syntax") and "FROM nvidia/cuda:" in worker
    assert "x['worker'] + x['gpu']" in worker and "torch.version.cuda" in worker
    instructions = "\n".join(line for line in gateway.splitlines() if not line.startswith("#"))
    assert "['project']['dependencies']" in instructions
    assert "optional-dependencies" not in instructions and "torch" not in instructions
    assert 'CMD ["python", "-m", "workers.health"]' in worker


def apt_installs(dockerfile: str) -> dict[str, list[str]]:
    """Each `apt-get install` of a Dockerfile's RUN instructions: its packages and its options."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    installs: dict[str, list[str]] = {}
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():  # one line per instruction
        if not line.startswith("RUN "):
            continue
        for command in re.split(r"&&|;", line.removeprefix("RUN ")):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                for word in words[2:]:
                    installs.setdefault("options" if word.startswith("-") else "packages", []).append(word)
    return installs


def test_the_worker_image_can_compile_where_it_runs():
    # The compiled speed profiles compile on the worker: Triton (behind Inductor's GPU kernels) builds a
    # small launcher with the host C compiler against the Python headers, which a CUDA runtime base lacks.
    worker = DOCKERFILES[1].read_text()
    installs = apt_installs(worker)
    packages = set(installs["packages"])
    assert {"gcc", "libc6-dev"} <= packages or "build-essential" in packages, packages
    assert "python3-dev" in packages and "python3" in packages, packages  # the headers of the venv's Python
    assert "--no-install-recommends" in installs.get("options", [])
    # And the build checks it found both (a renamed package would otherwise pass unnoticed until run time).
    assert "shutil.which('gcc')" in worker and "Python.h" in worker


def test_the_worker_image_gets_the_torchvision_of_its_torch():
    # torchvision 0.N+15 is the build for torch 2.N; the CPU/dev sets (`worker`, `dev`) never pull it.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    [torch_pin] = [d for d in extras["worker"] if d.startswith("torch==")]
    [vision_pin] = [d for d in extras["gpu"] if d.startswith("torchvision==")]
    torch_minor = int(torch_pin.split("==")[1].split(".")[1])
    assert vision_pin == f"torchvision==0.{torch_minor + 15}.0"
    cpu_sets = project["dependencies"] + extras["worker"] + extras["dev"]
    assert not any(d.startswith(("torchvision", "torchao")) for d in cpu_sets)
    assert any(d.startswith("torchao==") for d in extras["gpu"])


def compose_config(*flags: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [*compose_command(), "-f", str(COMPOSE), *flags, "config"]
    result = subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def seconds(duration: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", duration))


def volume_sources(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> volume, from compose v1's short syntax (`models:/models:rw`) or v2's long one."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume["target"]] = volume["source"]
        else:
            source, target = volume.split(":")[:2]
            mounts[target] = source
    return mounts


def test_compose_file_is_valid():
    result = run([*compose_command(), "-f", str(COMPOSE), "config", "-q"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack_keeps_jobs_and_reserves_a_gpu():
    services = compose_config("--profile", "cpu")["services"]
    assert {"redis", "gateway", "worker", "worker-cpu"} <= set(services)
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    [device] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in services["worker"] and services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["worker-cpu"]["environment"]["DREAMOMNI2_PRESET"] == "tiny"
    assert "deploy" not in services["worker-cpu"]
    timeout = int(services["worker"]["environment"]["DREAMOMNI2_JOB_TIMEOUT_S"])
    for name in ("worker", "worker-cpu"):
        assert seconds(services[name]["stop_grace_period"]) > timeout
        assert volume_sources(services[name])["/models"] == "models"
    assert services["gateway"]["environment"]["DREAMOMNI2_HOST"] == "0.0.0.0"
    chart_redis = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["image"]
    assert services["redis"]["image"] == f"redis:{chart_redis['tag']}", "one Redis version everywhere"


def test_compose_webhook_worker_shares_the_gateway_image_and_the_secret():
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    services = compose_config("--profile", "cpu", env={"DREAMOMNI2_WEBHOOK_SECRET": secret})["services"]
    webhooks = services["webhooks"]
    assert webhooks["image"] == services["gateway"]["image"]
    assert webhooks["build"]["dockerfile"] == services["gateway"]["build"]["dockerfile"]
    assert webhooks["command"] == WEBHOOKS_COMMAND
    assert webhooks["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "ports" not in webhooks
    # Not the image's HEALTHCHECK (the gateway's /healthz, which this process does not serve): the
    # consumer's liveness file.
    assert webhooks["healthcheck"]["test"] == ["CMD", "python", "-m", "workers.health"]
    env = webhooks["environment"]
    assert seconds(webhooks["stop_grace_period"]) > float(env["DREAMOMNI2_WEBHOOK_TIMEOUT_S"])
    assert int(env["DREAMOMNI2_WEBHOOK_CONCURRENCY"]) >= 1
    shared = [name for name in env if name.startswith("DREAMOMNI2_WEBHOOK_") and "CONCURRENCY" not in name]
    assert set(WEBHOOK_SECRET_VARS) | {"DREAMOMNI2_WEBHOOK_QUEUE"} <= set(shared)
    for name in ("gateway", "worker", "worker-cpu"):
        assert {k: services[name]["environment"].get(k) for k in shared} == {k: env[k] for k in shared}, name
    assert env["DREAMOMNI2_WEBHOOK_SECRET"] == secret, "passed through from the shell"
    unset = compose_config(env={"DREAMOMNI2_WEBHOOK_SECRET": ""})["services"]["webhooks"]["environment"]
    assert unset["DREAMOMNI2_WEBHOOK_SECRET"] in ("", None)


def test_with_keys_on_the_gateway_is_scraped_with_a_key(helm):
    keyed = {"auth": {"apiKeys": ["ops:" + "0" * 64]}, "metrics": {"serviceMonitor": {"enabled": True}}}

    def gateway_monitor(values: dict[str, Any]) -> Manifest:
        return next(
            d
            for d in render(helm, values)
            if d["kind"] == "ServiceMonitor" and d["metadata"]["name"].endswith("gateway")
        )

    def gateway_annotations(values: dict[str, Any]) -> dict[str, str]:
        deployment = next(
            d for d in render(helm, values)
            if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("gateway")
        )  # fmt: skip
        return deployment["spec"]["template"]["metadata"]["annotations"]

    def notes(values: dict[str, Any]) -> str:
        return next(text for name, text in render_files(helm, values).items() if name.endswith("NOTES.txt"))

    # Keys on, no scrape key: the notes say Prometheus cannot scrape; annotations would only get 401s.
    assert "Prometheus cannot scrape the gateway" in notes(keyed)
    assert "prometheus.io/scrape" not in gateway_annotations(keyed)
    assert "authorization" not in gateway_monitor(keyed)["spec"]["endpoints"][0]
    scraped = {**keyed, "metrics": {**keyed["metrics"], "scrapeKeySecret": "prom-key"}}
    assert gateway_monitor(scraped)["spec"]["endpoints"][0]["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "prom-key", "key": "api-key"},
    }
    assert "Prometheus cannot scrape" not in notes(scraped)
    # Keys off: annotation scraping as before.
    assert gateway_annotations({})["prometheus.io/scrape"] == "true"
