"""Children of an InferencePool: ServiceAccount, worker Deployments, Services, PDB, NetworkPolicy.

The worker container runs `llmos-worker serve --model <dir> --host 0.0.0.0 --port <port>` with
its engine settings as the `LLMOS_*` environment variables the worker's CLI reads as flag
defaults. The model volume is mounted read-only at the path the LLMModel's loader wrote to; an
encrypted model adds its key file (`--model-key-file`) and digest (`--model-digest`), an
`access.apiKeySecretRef` adds the API key digests (`--api-keys-file`), and the pool's rate-limit
ConfigMap is mounted as a directory (env LLMOS_RATE_LIMITS_FILE). A change to any engine
setting, to the served model version or to its key changes the pod template, which makes the
Deployment roll.

With the gateway enabled (the default; its own children are in `builders.gateway`) the pool's
Service `<pool>` selects the gateway pods (once one is ready: until then, as when a pool gains
its gateway, the workers keep serving directly) and the workers get the Service `<pool>-workers`,
whose EndpointSlices the gateway watches. A canary is a second worker Deployment
`<pool>-canary` from the same builder, serving `spec.canary.modelRef` under the stable model's
name, with its own selector (the stable Deployment's selector is immutable, so canary pods carry
another `app.kubernetes.io/instance` rather than the stable selector plus a version label) and
its own Service `<pool>-canary-workers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos_operator.api.common import SecretKeyRef
from llmos_operator.api.inferencepool import KIND, InferencePoolSpec
from llmos_operator.builders import meta, security
from llmos_operator.builders.networkpolicy import ClusterPeers, build_worker_network_policy
from llmos_operator.config import OperatorConfig
from llmos_operator.quota import ratelimits

MODEL_KEY_DIR = "/etc/llmos/model-key"
API_KEYS_DIR = "/etc/llmos/api-keys"


@dataclass(frozen=True)
class PoolRef:
    """The identity of the InferencePool being rendered."""

    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class ServedModel:
    """What a Ready LLMModel offers a pool: its volume and the directory of the served version."""

    name: str
    claim_name: str
    path: str
    version: str
    digest: str
    # the key the model's data key is wrapped with (LLMModel status.keySecretRef); None: plain
    key_ref: SecretKeyRef | None = None
    # `serve` flags for the model's loaded LoRA adapters (builders.adapters.worker_lora_args)
    lora_args: tuple[str, ...] = ()


STABLE = "stable"
CANARY = "canary"


def service_account_name(pool: str) -> str:
    return meta.child_name(pool, "worker")


def deployment_name(pool: str) -> str:
    return meta.child_name(pool)


def service_name(pool: str) -> str:
    return meta.child_name(pool)


def canary_deployment_name(pool: str) -> str:
    return meta.child_name(pool, "canary")


def workers_service_name(pool: str, canary: bool = False) -> str:
    """The Service of the stable (or canary) worker pods that the gateway discovers."""
    return meta.child_name(pool, "canary-workers" if canary else "workers")


def pdb_name(pool: str, canary: bool = False) -> str:
    return canary_deployment_name(pool) if canary else meta.child_name(pool)


def network_policy_name(pool: str) -> str:
    return meta.child_name(pool, "worker")


def selector_labels(pool: str) -> dict[str, str]:
    """The stable worker pods (the Deployment's selector, the scale subresource's selector)."""
    return {"app.kubernetes.io/name": "llmos-worker", "app.kubernetes.io/instance": pool}


def canary_selector_labels(pool: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llmos-worker",
        "app.kubernetes.io/instance": canary_deployment_name(pool),
    }


def worker_pod_labels(pool: str) -> dict[str, str]:
    """Every worker pod of the pool, stable and canary (what the NetworkPolicy guards)."""
    return {"app.kubernetes.io/name": "llmos-worker", meta.POOL_LABEL: pool}


def gateway_selector_labels(pool: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "llmos-gateway", "app.kubernetes.io/instance": pool}


def endpoint(ref: PoolRef, config: OperatorConfig) -> str:
    """The in-cluster OpenAI base URL of the pool's Service."""
    host = f"{service_name(ref.name)}.{ref.namespace}.svc.{config.cluster_domain}"
    return f"http://{host}:{config.worker_port}/v1"


def child_metadata(ref: PoolRef, name: str, component: str = "inference") -> dict[str, Any]:
    """Name, namespace, labels and the controller owner reference of one child of the pool."""
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": meta.labels(component, ref.name, **{meta.POOL_LABEL: ref.name}),
        "ownerReferences": [meta.owner_reference(KIND, ref.name, ref.uid)],
    }


def build_service_account(ref: PoolRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": child_metadata(ref, service_account_name(ref.name)),
        "automountServiceAccountToken": False,  # why: workers never call the Kubernetes API
    }


def worker_env(
    spec: InferencePoolSpec, model: ServedModel, served_name: str | None = None
) -> list[dict[str, str]]:
    """The LLMOS_* variables `llmos-worker serve` reads as defaults of its flags.

    `served_name` is the model name the worker answers to (the LLMModel's name by default).
    """
    engine = spec.engine
    values: dict[str, str] = {
        "LLMOS_BLOCK_SIZE": str(engine.block_size),
        "LLMOS_KV_CACHE_MEMORY_FRACTION": repr(engine.kv_cache_memory_fraction),
        "LLMOS_MAX_NUM_SEQS": str(engine.max_num_seqs),
        "LLMOS_SCHEDULING_POLICY": engine.scheduling_policy,
        "LLMOS_ENABLE_PREFIX_CACHING": "true" if engine.enable_prefix_caching else "false",
        "LLMOS_DTYPE": engine.dtype,
        "LLMOS_QUANTIZATION": engine.quantization,
        "LLMOS_KV_CACHE_DTYPE": engine.kv_cache_dtype,
        "LLMOS_DEVICE": "cuda" if spec.resources.gpus > 0 else "cpu",
        "LLMOS_SERVED_MODEL_NAME": served_name or model.name,
    }
    if engine.max_model_len is not None:
        values["LLMOS_MAX_MODEL_LEN"] = str(engine.max_model_len)
    env = [{"name": k, "value": v} for k, v in values.items()]
    env.append(ratelimits.worker_env())
    env += [
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},  # why: workers never download at run time
    ]
    return env


def _resources(spec: InferencePoolSpec) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits = dict(amounts)
    if spec.resources.gpus > 0:
        limits["nvidia.com/gpu"] = spec.resources.gpus
    return {"requests": amounts, "limits": limits}


def build_deployment(
    ref: PoolRef,
    spec: InferencePoolSpec,
    model: ServedModel,
    config: OperatorConfig,
    *,
    canary: bool = False,
) -> dict[str, Any]:
    """The stable worker Deployment, or with `canary` the canary's (`spec.canary` must be set).

    The canary runs `model` (spec.canary.modelRef's) with spec.canary.replicas (none while
    spec.replicas is 0), answering to the stable model's name so that clients of the pool see
    one model whichever set serves them.
    """
    if canary and spec.canary is None:
        raise ValueError("a canary Deployment needs spec.canary")
    port = config.worker_port
    model_dir = f"{config.models_mount_path}/{model.path}"
    tmp_volume, tmp_mount = security.scratch_volume("2Gi")
    metrics_port = config.worker_metrics_port
    args = ["--model", model_dir, "--host", "0.0.0.0", "--port", str(port)]
    args += ["--metrics-port", str(metrics_port)]
    volumes: list[dict[str, Any]] = [ratelimits.worker_volume(ref.name)]
    mounts: list[dict[str, Any]] = [ratelimits.worker_volume_mount()]
    if model.key_ref is not None:
        # why: an encrypted model is decrypted in memory with this key, bound to this digest
        volume, mount, path = security.secret_file(
            "model-key", model.key_ref.name, model.key_ref.key, MODEL_KEY_DIR, "kek"
        )
        volumes.append(volume)
        mounts.append(mount)
        args += ["--model-key-file", path, "--model-digest", model.digest]
    args += model.lora_args  # why no mount: adapters live on the model volume, under its key
    api_keys = spec.access.api_key_secret_ref if spec.access else None
    if api_keys is not None:
        volume, mount, path = security.secret_file(
            "api-keys", api_keys.name, api_keys.key, API_KEYS_DIR, "keys.json"
        )
        volumes.append(volume)
        mounts.append(mount)
        args += ["--api-keys-file", path]
    http_get = {"port": "http"}
    container: dict[str, Any] = {
        "name": "worker",
        "image": config.worker_image,
        "imagePullPolicy": config.worker_image_pull_policy,
        "command": ["llmos-worker", "serve"],
        "args": args,
        "env": worker_env(spec, model, served_name=spec.model_ref if canary else None),
        "ports": [
            {"name": "http", "containerPort": port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"},
        ],
        "startupProbe": {
            "httpGet": {"path": "/health", **http_get},
            "periodSeconds": 5,
            "failureThreshold": 120,  # why: loading a large model takes minutes
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", **http_get},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", **http_get},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "resources": _resources(spec),
        "volumeMounts": [
            {"name": "model", "mountPath": config.models_mount_path, "readOnly": True},
            tmp_mount,
            {"name": "dshm", "mountPath": "/dev/shm"},
            *mounts,
        ],
        "securityContext": security.container_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(ref.name),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": security.pod_security_context(),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": model.claim_name, "readOnly": True},
            },
            tmp_volume,
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
            *volumes,
        ],
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.to_api() for t in spec.resources.tolerations]
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    selector = canary_selector_labels(ref.name) if canary else selector_labels(ref.name)
    template_labels = {
        **meta.labels("inference", ref.name, **{meta.POOL_LABEL: ref.name}),
        **selector,
        meta.MODEL_LABEL: model.name,
        meta.VERSION_LABEL: CANARY if canary else STABLE,
    }
    name = canary_deployment_name(ref.name) if canary else deployment_name(ref.name)
    replicas = spec.replicas
    if canary and spec.canary:
        # why: a pool scaled to zero (idle, or held back by quota) runs no canary either
        replicas = spec.canary.replicas if spec.replicas > 0 else 0
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(ref, name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": template_labels,
                    "annotations": {
                        "llmos.dev/model-version": model.version,
                        "llmos.dev/model-digest": model.digest,
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(config.worker_metrics_port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def build_service(ref: PoolRef, config: OperatorConfig, *, gateway: bool = False) -> dict[str, Any]:
    """The pool's client-facing Service (status.endpoint): the gateway pods, or the workers."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ref, service_name(ref.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": gateway_selector_labels(ref.name) if gateway else selector_labels(ref.name),
            "ports": [
                {
                    "name": "http",
                    "port": config.worker_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_workers_service(
    ref: PoolRef, config: OperatorConfig, *, canary: bool = False
) -> dict[str, Any]:
    """The stable (or canary) workers' Service; the gateway reads its EndpointSlices."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(ref, workers_service_name(ref.name, canary)),
        "spec": {
            "type": "ClusterIP",
            "selector": canary_selector_labels(ref.name) if canary else selector_labels(ref.name),
            "ports": [
                {
                    "name": "http",
                    "port": config.worker_port,
                    "targetPort": "http",
                    "protocol": "TCP",
                },
                {
                    "name": "metrics",
                    "port": config.worker_metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
            ],
        },
    }


def build_pdb(ref: PoolRef, *, canary: bool = False) -> dict[str, Any]:
    """At most one stable (or canary) worker pod evicted at a time by a node drain."""
    selector = canary_selector_labels(ref.name) if canary else selector_labels(ref.name)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(ref, pdb_name(ref.name, canary)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def cluster_peers(config: OperatorConfig) -> ClusterPeers:
    """Where the operator and Prometheus run, as the NetworkPolicies name them."""
    return ClusterPeers(
        operator_namespace=config.operator_namespace,
        monitoring_namespace=config.monitoring_namespace or None,
    )


def build_network_policy(
    ref: PoolRef, spec: InferencePoolSpec, config: OperatorConfig, *, gateway_live: bool = True
) -> dict[str, Any]:
    """Ingress to the workers (stable and canary) from the gateway (or, without one, from
    `spec.access`), the operator and monitoring; egress DNS only.

    `gateway_live` False: the gateway is enabled but the pool's Service still selects the
    workers (no gateway pod is ready yet), so the `access` peers keep reaching them meanwhile.
    """
    gateway = spec.routing.gateway.enabled
    return build_worker_network_policy(
        name=network_policy_name(ref.name),
        namespace=ref.namespace,
        metadata=child_metadata(ref, network_policy_name(ref.name)),
        pod_selector=worker_pod_labels(ref.name),
        gateway_pods=gateway_selector_labels(ref.name) if gateway else None,
        direct_access=not gateway_live,
        port=config.worker_port,
        metrics_port=config.worker_metrics_port,
        access=spec.access,
        peers=cluster_peers(config),
    )
