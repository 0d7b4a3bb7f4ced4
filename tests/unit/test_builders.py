"""Builders: every rendered child validates against Kubernetes 1.33, meets "restricted", and
carries deterministic names, owner references and the settings the worker really reads."""

from __future__ import annotations

from typing import Any

import pytest

from llmos_operator.api import InferencePoolSpec, LLMModelSpec
from llmos_operator.builders import (
    ModelRef,
    PoolRef,
    ServedModel,
    build_deployment,
    build_loader_job,
    build_pdb,
    build_pvc,
    build_service,
    build_service_account,
)
from llmos_operator.builders.meta import child_name
from llmos_operator.builders.model import job_name, load_key
from llmos_operator.config import OperatorConfig
from tests.unit.k8s_schema import validate
from tests.unit.pss import violations

CONFIG = OperatorConfig()
MODEL_REF = ModelRef(name="smollm2", namespace="team-a", uid="uid-model")
POOL_REF = PoolRef(name="chat", namespace="team-a", uid="uid-pool")
SERVED = ServedModel("smollm2", "smollm2-weights", "v-0123456789", "1", "sha256:" + "0" * 64)

MODEL_SPECS = [
    {"source": "builtin://smollm2-135m-instruct"},
    {"source": "https://x.example/m.gguf", "sha256": "a" * 64, "storage": {"size": "20Gi",
     "storageClassName": "fast", "accessModes": ["ReadWriteMany"]}},
    {"source": "pvc://shared-models/llama/model.gguf", "format": "gguf", "version": "2"},
    {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main", "format": "safetensors"},
]  # fmt: skip
POOL_SPECS = [
    {"modelRef": "smollm2"},
    {
        "modelRef": "smollm2",
        "replicas": 3,
        "resources": {
            "gpus": 2,
            "cpu": "8",
            "memory": "64Gi",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "priorityClassName": "llm-high",
        },
        "engine": {"maxModelLen": 8192, "schedulingPolicy": "priority", "dtype": "float16",
                   "enablePrefixCaching": False},
    },
]  # fmt: skip


def _children() -> list[dict[str, Any]]:
    out = []
    for raw in MODEL_SPECS:
        spec = LLMModelSpec.model_validate(raw)
        out += [build_pvc(MODEL_REF, spec), build_loader_job(MODEL_REF, spec, CONFIG)]
    for raw in POOL_SPECS:
        pool = InferencePoolSpec.model_validate(raw)
        out += [
            build_service_account(POOL_REF),
            build_deployment(POOL_REF, pool, SERVED, CONFIG),
            build_service(POOL_REF, CONFIG),
            build_pdb(POOL_REF),
            build_pdb(POOL_REF, canary=True),
        ]
    return out


@pytest.mark.parametrize("child", _children(), ids=lambda c: f"{c['kind']}-{c['metadata']['name']}")
def test_child_validates_and_is_owned(child: dict[str, Any]) -> None:
    validate(child)
    meta = child["metadata"]
    assert meta["namespace"] == "team-a"
    [owner] = meta["ownerReferences"]
    assert owner["apiVersion"] == "llmos.dev/v1alpha1" and owner["controller"] is True
    assert owner["uid"] in ("uid-model", "uid-pool")
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "llmos-operator"
    assert meta["labels"]["app.kubernetes.io/part-of"] == "llmos"
    template = child.get("spec", {}).get("template")
    if template:
        assert violations(template["spec"]) == []


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_deployment_runs_the_worker_with_its_settings() -> None:
    pool = InferencePoolSpec.model_validate(POOL_SPECS[1])
    dep = build_deployment(POOL_REF, pool, SERVED, CONFIG)
    pod = dep["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["command"] == ["llmos-worker", "serve"]
    assert worker["args"] == [
        "--model", "/models/v-0123456789", "--host", "0.0.0.0", "--port", "8000",
        "--metrics-port", "9090",
    ]  # fmt: skip
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"http": 8000, "metrics": 9090}
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090"
    env = _env(worker)
    assert env["LLMOS_BLOCK_SIZE"] == "16"
    assert env["LLMOS_MAX_MODEL_LEN"] == "8192"
    assert env["LLMOS_SCHEDULING_POLICY"] == "priority"
    assert env["LLMOS_ENABLE_PREFIX_CACHING"] == "false"
    assert env["LLMOS_DTYPE"] == "float16"
    assert env["LLMOS_QUANTIZATION"] == "none"
    assert env["LLMOS_KV_CACHE_DTYPE"] == "auto"
    assert env["LLMOS_DEVICE"] == "cuda"
    assert env["LLMOS_SERVED_MODEL_NAME"] == "smollm2"
    assert float(env["LLMOS_KV_CACHE_MEMORY_FRACTION"]) == 0.9
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/ready"
    [model_mount] = [m for m in worker["volumeMounts"] if m["name"] == "model"]
    assert model_mount["readOnly"] is True
    [model_volume] = [v for v in pod["volumes"] if v["name"] == "model"]
    assert model_volume["persistentVolumeClaim"] == {
        "claimName": "smollm2-weights",
        "readOnly": True,
    }
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["priorityClassName"] == "llm-high"
    assert dep["spec"]["selector"]["matchLabels"].items() <= (
        dep["spec"]["template"]["metadata"]["labels"].items()
    )


def test_cpu_pool_has_no_gpu_limit_and_engine_change_changes_template() -> None:
    base = InferencePoolSpec.model_validate(POOL_SPECS[0])
    dep = build_deployment(POOL_REF, base, SERVED, CONFIG)
    worker = dep["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in worker["resources"]["limits"]
    assert _env(worker)["LLMOS_DEVICE"] == "cpu"
    assert "LLMOS_MAX_MODEL_LEN" not in _env(worker)
    changed = base.model_copy(update={"engine": base.engine.model_copy(update={"max_num_seqs": 8})})
    dep2 = build_deployment(POOL_REF, changed, SERVED, CONFIG)
    assert dep2["spec"]["template"] != dep["spec"]["template"]
    assert build_deployment(POOL_REF, base, SERVED, CONFIG) == dep  # deterministic
    fp16 = InferencePoolSpec.model_validate(
        {**POOL_SPECS[0], "engine": {"dtype": "float32", "quantization": "fp16"}}
    )
    worker = build_deployment(POOL_REF, fp16, SERVED, CONFIG)["spec"]["template"]["spec"]
    env = _env(worker["containers"][0])
    assert (env["LLMOS_QUANTIZATION"], env["LLMOS_DTYPE"]) == ("fp16", "float32")
    fp16_kv = InferencePoolSpec.model_validate(
        {**POOL_SPECS[1], "engine": {"dtype": "bfloat16", "kvCacheDtype": "float16"}}
    )
    worker = build_deployment(POOL_REF, fp16_kv, SERVED, CONFIG)["spec"]["template"]["spec"]
    env = _env(worker["containers"][0])
    assert (env["LLMOS_KV_CACHE_DTYPE"], env["LLMOS_DEVICE"]) == ("float16", "cuda")


def test_loader_job_command_and_names() -> None:
    spec = LLMModelSpec.model_validate(MODEL_SPECS[1])
    job = build_loader_job(MODEL_REF, spec, CONFIG)
    [fetch] = job["spec"]["template"]["spec"]["containers"]
    assert fetch["command"] == ["llmos-worker", "fetch-model"]
    args = fetch["args"]
    assert args[args.index("--source") + 1] == "https://x.example/m.gguf"
    assert args[args.index("--sha256") + 1] == "a" * 64
    assert args[args.index("--format") + 1] == "gguf"
    assert args[args.index("--dest") + 1] == f"/models/v-{load_key(spec)}"
    assert fetch["terminationMessagePath"] == "/dev/termination-log"
    assert job["metadata"]["name"] == job_name("smollm2", load_key(spec))
    other = spec.model_copy(update={"version": "2"})
    assert load_key(other) != load_key(spec)
    pvc_src = build_loader_job(MODEL_REF, LLMModelSpec.model_validate(MODEL_SPECS[2]), CONFIG)
    fetch = pvc_src["spec"]["template"]["spec"]["containers"][0]
    assert fetch["args"][1] == "/sources/shared-models/llama/model.gguf"
    assert {"name": "source", "mountPath": "/sources/shared-models", "readOnly": True} in (
        fetch["volumeMounts"]
    )


def test_long_names_are_clipped_deterministically() -> None:
    long = "m" * 60
    name = child_name(long, "load-0123456789")
    assert len(name) <= 63 and name == child_name(long, "load-0123456789")
    assert name != child_name(long, "load-9876543210")
    assert child_name("chat") == "chat"
