"""Registered LoRAs and `DREAMOMNI2_BATCH_IMAGES` in the Helm chart (rendered with the Helm SDK) and compose.

The registry must reach the gateway (which checks requests against it) and the GPU workers (which load
its files) as the same JSON, read by the real settings classes; the LoRA files' volume is the workers'
alone, read-only. The schema's refusals are in test_deploy.py's `test_values_schema_rejects_bad_values`.
"""

from __future__ import annotations

import os
from typing import TypeVar

import pytest
import yaml
from pydantic_settings import BaseSettings

from api_schemas.jobs import JobLimits
from api_schemas.loras import RegisteredLora
from app.settings import GatewaySettings
from models.settings import EngineSettings
from tests.deploy.test_deploy import (
    CHART,
    Manifest,
    compose_config,
    container,
    helm,  # noqa: F401  (the fixture)
    pod_templates,
    render,
    shared_config,
    workload,
)

REGISTRY = {
    "relight": {"path": "/loras/relight.safetensors", "scale": 0.8, "tasks": ["edit"]},
    "ghibli": {"path": "/models/loras/ghibli", "weight_name": "ghibli.safetensors"},
    "mix.v2": {"path": "/loras/mix", "scale": -1.5, "tasks": ["feature_mixing", "generate"]},
}
VALUES = {
    "loras": {
        "registry": REGISTRY,
        "maxPerJob": 2,
        "maxRank": 64,
        "cacheBytes": 8 * 2**30,
        "volume": {"existingClaim": "team-loras", "subPath": "kontext"},
    },
    "worker": {"batchImages": 2},
}

S = TypeVar("S", bound=BaseSettings)


def pod_env(docs: list[Manifest], component: str) -> dict[str, str]:
    """The plain-valued environment a component's container starts with: the ConfigMap, then `env`."""
    c = container(workload(docs, component))
    assert [s["configMapRef"]["name"] for s in c["envFrom"]] == ["dreamomni2-config"]
    env = dict(shared_config(docs))
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, cls: type[S]) -> S:
    """`cls` read from exactly this environment (no DREAMOMNI2_* variable of the test process)."""
    with monkeypatch.context() as m:
        for name in [n for n in os.environ if n.startswith("DREAMOMNI2_")]:
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return cls()


def test_the_registry_reaches_the_gateway_and_the_workers_as_their_settings_read_it(helm, monkeypatch):  # noqa: F811
    docs = render(helm, VALUES)
    expected = {name: RegisteredLora.model_validate(entry) for name, entry in REGISTRY.items()}
    gateway_env, worker_env = pod_env(docs, "gateway"), pod_env(docs, "worker")
    assert gateway_env["DREAMOMNI2_LORAS"] == worker_env["DREAMOMNI2_LORAS"]
    gateway = settings_from(gateway_env, monkeypatch, GatewaySettings)
    engine = settings_from(worker_env, monkeypatch, EngineSettings)
    for limits in (gateway.limits, engine.limits):
        assert limits.loras == expected
        assert (limits.max_loras_per_job, limits.max_lora_rank) == (2, 64)
    assert engine.lora_cache_bytes == 8 * 2**30 and engine.batch_images == 2
    assert "DREAMOMNI2_LORA_CACHE_BYTES" not in gateway_env, "a worker setting"


def test_the_charts_defaults_are_the_settings_defaults(helm, monkeypatch):  # noqa: F811
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["loras"]["registry"] == {} and values["worker"]["batchImages"] == "auto"
    docs = render(helm, {})
    engine = settings_from(pod_env(docs, "worker"), monkeypatch, EngineSettings)
    defaults, limits = EngineSettings.model_fields, JobLimits.model_fields
    assert shared_config(docs)["DREAMOMNI2_LORAS"] == "{}" and engine.limits.loras == {}
    assert (
        engine.limits.max_loras_per_job == values["loras"]["maxPerJob"] == limits["max_loras_per_job"].default
    )
    assert engine.limits.max_lora_rank == values["loras"]["maxRank"] == limits["max_lora_rank"].default
    assert engine.lora_cache_bytes == values["loras"]["cacheBytes"] == defaults["lora_cache_bytes"].default
    assert engine.batch_images == defaults["batch_images"].default == "auto"
    volumes = workload(docs, "worker")["spec"]["template"]["spec"]["volumes"]
    assert "loras" not in {v["name"] for v in volumes}, "no LoRA volume unless one is named"


@pytest.mark.parametrize("preset", ["dreamomni2", "tiny"])
def test_the_lora_volume_is_mounted_read_only_on_the_workers_only(helm, preset):  # noqa: F811
    docs = render(helm, {**VALUES, "worker": {"preset": preset}})
    for doc, template in pod_templates(docs):
        spec = template["spec"]
        volumes = [v for v in spec.get("volumes", []) if v["name"] == "loras"]
        mounts = {
            c["name"]: [m for m in c.get("volumeMounts", []) if m["name"] == "loras"]
            for c in spec["containers"] + spec.get("initContainers", [])
        }
        if doc["metadata"]["labels"]["app.kubernetes.io/component"] != "worker":
            assert not volumes and not any(mounts.values()), doc["metadata"]["name"]
            continue
        assert volumes == [
            {"name": "loras", "persistentVolumeClaim": {"claimName": "team-loras", "readOnly": True}}
        ]
        assert mounts.pop("worker") == [
            {"name": "loras", "mountPath": "/loras", "subPath": "kontext", "readOnly": True}
        ]
        assert not any(mounts.values()), "the weights wait needs only the weights"


def plain(environment: dict[str, object]) -> dict[str, str]:
    """A compose service's environment as its process sees it (an empty value may come back as null)."""
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def test_compose_passes_the_registry_to_every_service_alike(monkeypatch):
    registry = '{"relight": {"path": "/models/loras/relight.safetensors", "tasks": ["edit"]}}'
    services = compose_config("--profile", "cpu", env={"DREAMOMNI2_LORAS": registry})["services"]
    shared = ("DREAMOMNI2_LORAS", "DREAMOMNI2_MAX_LORAS_PER_JOB", "DREAMOMNI2_MAX_LORA_RANK")
    for name in ("gateway", "webhooks", "worker", "worker-cpu"):
        env = services[name]["environment"]
        assert {k: env[k] for k in shared} == {k: services["gateway"]["environment"][k] for k in shared}, name
    worker = services["worker"]["environment"]
    limits = settings_from(plain(worker), monkeypatch, EngineSettings).limits
    assert set(limits.loras) == {"relight"} and worker["DREAMOMNI2_BATCH_IMAGES"] == "auto"
    unset = compose_config(env={"DREAMOMNI2_LORAS": ""})["services"]["gateway"]["environment"]
    gateway = settings_from(plain(unset), monkeypatch, GatewaySettings)
    assert gateway.limits.loras == {} and gateway.limits.max_loras_per_job == 3
