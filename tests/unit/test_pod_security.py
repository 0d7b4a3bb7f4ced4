"""Every pod the operator can create meets the Pod Security Standard "restricted".

Rendered here, from tables that cover every branch of the builders: worker Deployments (CPU and
GPU, placement, API keys, an encrypted model, the rate-limit mount), loader Jobs for every source
kind (plain and encrypted), the key rotation Job, and the operator's own Deployment from
manifests/base. Each pod spec goes through `tests.unit.pss.violations` and the Kubernetes schema;
the namespaces in manifests/ must enforce "restricted" too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from llmos_operator.api import InferencePoolSpec, LLMModelSpec
from llmos_operator.api.common import SecretKeyRef
from llmos_operator.builders import ModelRef, PoolRef, ServedModel, build_deployment
from llmos_operator.builders.model import build_loader_job, build_rotation_job
from llmos_operator.config import OperatorConfig
from tests.unit.k8s_schema import validate
from tests.unit.pss import violations

ROOT = Path(__file__).resolve().parents[2]
CONFIG = OperatorConfig()
MODEL = ModelRef(name="smollm2", namespace="team-a", uid="uid-model")
POOL = PoolRef(name="chat", namespace="team-a", uid="uid-pool")
KEY = SecretKeyRef(name="model-kek", key="kek")
NEW_KEY = SecretKeyRef(name="model-kek-2025", key="kek")
PLAIN = ServedModel("smollm2", "smollm2-weights", "v-0123456789", "1", "sha256:" + "0" * 64)
ENCRYPTED = ServedModel(
    "smollm2", "smollm2-weights", "v-0123456789", "1", "sha256:" + "0" * 64, key_ref=KEY
)
ENCRYPTION = {"enabled": True, "keySecretRef": {"name": "model-kek", "key": "kek"}}

POOL_SPECS: list[dict[str, Any]] = [
    {"modelRef": "smollm2"},
    {"modelRef": "smollm2", "replicas": 3, "resources": {"gpus": 2, "cpu": "8", "memory": "32Gi",
     "nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
     "priorityClassName": "inference"}},
    {"modelRef": "smollm2", "access": {"apiKeySecretRef": {"name": "chat-keys", "key": "keys"},
     "namespaceSelectors": [{"matchLabels": {"team": "a"}}]}},
    {"modelRef": "smollm2", "engine": {"maxModelLen": 4096, "schedulingPolicy": "priority"},
     "autoscaling": {"enabled": True, "maxReplicas": 8}},
]  # fmt: skip
MODEL_SOURCES: list[dict[str, Any]] = [
    {"source": "builtin://smollm2-135m-instruct"},
    {"source": "https://x.example/m.gguf", "sha256": "a" * 64},
    {"source": "pvc://shared-models/llama/model.gguf"},
    {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main", "format": "safetensors"},
]


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    validate(workload)
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def volume_names(pod: dict[str, Any]) -> set[str]:
    return {v["name"] for v in pod["volumes"]}


@pytest.mark.parametrize("served", [PLAIN, ENCRYPTED], ids=["plain", "encrypted"])
@pytest.mark.parametrize("raw", POOL_SPECS)
def test_worker_pods_are_restricted(raw: dict[str, Any], served: ServedModel) -> None:
    pod = pod_of(build_deployment(POOL, InferencePoolSpec.model_validate(raw), served, CONFIG))
    assert violations(pod) == []
    assert {"ratelimits", "tmp", "model"} <= volume_names(pod)
    [container] = pod["containers"]
    assert ("--model-key-file" in container["args"]) == (served.key_ref is not None)
    assert ("--api-keys-file" in container["args"]) == ("access" in raw)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("raw", MODEL_SOURCES)
def test_loader_pods_are_restricted(raw: dict[str, Any], encrypted: bool) -> None:
    spec = LLMModelSpec.model_validate({**raw, **({"encryption": ENCRYPTION} if encrypted else {})})
    pod = pod_of(build_loader_job(MODEL, spec, CONFIG))
    assert violations(pod) == []
    assert ("--encrypt-key-file" in pod["containers"][0]["args"]) == encrypted


def test_rotation_job_pod_is_restricted() -> None:
    pod = pod_of(build_rotation_job(MODEL, "v-0123456789", KEY, NEW_KEY, CONFIG))
    assert violations(pod) == []


def manifests(*parts: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(ROOT.joinpath("manifests", *parts).rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return docs


def test_operator_deployment_is_restricted() -> None:
    [deployment] = [d for d in manifests("base") if d.get("kind") == "Deployment"]
    assert violations(pod_of(deployment)) == []


def test_every_namespace_in_manifests_enforces_restricted() -> None:
    namespaces = [d for d in manifests() if d.get("kind") == "Namespace"]
    assert namespaces, "manifests/ define the operator's namespace"
    for ns in namespaces:
        labels = ns["metadata"].get("labels") or {}
        assert labels.get("pod-security.kubernetes.io/enforce") == "restricted", ns["metadata"]


def test_the_checker_sees_a_privileged_worker() -> None:
    # why: proves the table above would catch a regression in the shared security context
    pod = pod_of(build_deployment(POOL, InferencePoolSpec(model_ref="smollm2"), PLAIN, CONFIG))
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    assert len(violations(pod)) >= 2
