"""The gateway of an InferencePool: ServiceAccount, Role, RoleBinding, Deployment, PDB, policy.

The gateway (`llmos-gateway`, configured by its `LLMOS_GATEWAY_*` environment variables) is the
pool's front door: the pool's Service selects its pods, and it routes each request to a worker
it discovers from the EndpointSlices of the `<pool>-workers` Service (and `<pool>-canary-workers`
with a canary, which takes `spec.canary.weight` percent of the requests). It holds requests
while the pool scales up from zero, merge-patching the pool's `spec.replicas` itself, hence its
Role: read EndpointSlices, get and patch this one InferencePool. It mounts the API key digests
and the rate-limit ConfigMap the workers mount, to tell tenants apart and queue them fairly.
A change to the routing
settings changes the pod template, which rolls the gateway.
"""

from __future__ import annotations

from typing import Any

from llmos_operator.api.common import GROUP
from llmos_operator.api.inferencepool import PLURAL, InferencePoolSpec
from llmos_operator.builders import meta, networkpolicy, security
from llmos_operator.builders.pool import (
    API_KEYS_DIR,
    CANARY,
    STABLE,
    PoolRef,
    child_metadata,
    cluster_peers,
    gateway_selector_labels,
    worker_pod_labels,
    workers_service_name,
)
from llmos_operator.config import OperatorConfig
from llmos_operator.quota import ratelimits

COMPONENT = "gateway"


def gateway_name(pool: str) -> str:
    """The name of every gateway child: ServiceAccount, Role, RoleBinding, Deployment, policy."""
    return meta.child_name(pool, "gateway")


def _metadata(ref: PoolRef) -> dict[str, Any]:
    return child_metadata(ref, gateway_name(ref.name), COMPONENT)


def build_gateway_service_account(ref: PoolRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(ref),
        # why: the gateway watches EndpointSlices and patches the pool's spec.replicas
        "automountServiceAccountToken": True,
    }


def build_gateway_role(ref: PoolRef) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(ref),
        "rules": [
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": [GROUP],
                "resources": [PLURAL],
                "resourceNames": [ref.name],  # why: its own pool only
                "verbs": ["get", "patch"],
            },
        ],
    }


def build_gateway_role_binding(ref: PoolRef) -> dict[str, Any]:
    name = gateway_name(ref.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(ref),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ref.namespace}],
    }


def discover(pool: str, spec: InferencePoolSpec) -> str:
    """`stable=<workers Service>[,canary=<canary workers Service>]` for LLMOS_GATEWAY_DISCOVER."""
    services = [f"{STABLE}={workers_service_name(pool)}"]
    if spec.canary is not None:
        services.append(f"{CANARY}={workers_service_name(pool, canary=True)}")
    return ",".join(services)


def gateway_env(
    ref: PoolRef, spec: InferencePoolSpec, config: OperatorConfig, api_keys_file: str | None
) -> list[dict[str, Any]]:
    """The LLMOS_GATEWAY_* variables `llmos-gateway` reads as defaults of its flags."""
    routing = spec.routing
    values: dict[str, str] = {
        "LLMOS_GATEWAY_HOST": "0.0.0.0",
        "LLMOS_GATEWAY_PORT": str(config.worker_port),
        "LLMOS_GATEWAY_STRATEGY": routing.strategy,
        "LLMOS_GATEWAY_LOAD_FACTOR": repr(routing.load_factor),
        "LLMOS_GATEWAY_MIN_LOAD_BOUND": str(routing.min_load_bound),
        "LLMOS_GATEWAY_HOLD_TIMEOUT": str(routing.hold_timeout_seconds),
        "LLMOS_GATEWAY_IDLE_SCALE_TO_ZERO": str(routing.idle_scale_to_zero_seconds),
        "LLMOS_GATEWAY_POOL_NAME": ref.name,
        # why: a worker runs maxNumSeqs at once; beyond that the gateway queues by tenant share
        "LLMOS_GATEWAY_MAX_INFLIGHT_PER_REPLICA": str(spec.engine.max_num_seqs),
    }
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    env.append(
        {
            "name": "LLMOS_GATEWAY_POOL_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        }
    )
    more = {
        "LLMOS_GATEWAY_DISCOVER": discover(ref.name, spec),
        "LLMOS_GATEWAY_WORKER_METRICS_PORT": str(config.worker_metrics_port),
        # why its own port: the series name tenants; only the operator and monitoring reach it
        "LLMOS_GATEWAY_METRICS_PORT": str(config.worker_metrics_port),
        # why: the pool's rate limits (the ConfigMap the workers mount) set tenant fair shares
        "LLMOS_GATEWAY_TENANTS_FILE": ratelimits.worker_env()["value"],
    }
    if spec.canary is not None:
        more["LLMOS_GATEWAY_CANARY_WEIGHT"] = str(spec.canary.weight)
    if api_keys_file is not None:
        more["LLMOS_GATEWAY_API_KEYS_FILE"] = api_keys_file
    more["HOME"] = "/tmp"
    env += [{"name": k, "value": v} for k, v in more.items()]
    return env


def build_gateway_deployment(
    ref: PoolRef, spec: InferencePoolSpec, config: OperatorConfig
) -> dict[str, Any]:
    settings = spec.routing.gateway
    tmp_volume, tmp_mount = security.scratch_volume("256Mi")
    volumes: list[dict[str, Any]] = [tmp_volume, ratelimits.worker_volume(ref.name)]
    mounts: list[dict[str, Any]] = [tmp_mount, ratelimits.worker_volume_mount()]
    api_keys = spec.access.api_key_secret_ref if spec.access else None
    api_keys_file: str | None = None
    if api_keys is not None:
        # why: the same Secret key the workers mount; the gateway names the tenant of a key
        volume, mount, api_keys_file = security.secret_file(
            "api-keys", api_keys.name, api_keys.key, API_KEYS_DIR, "keys.json"
        )
        volumes.append(volume)
        mounts.append(mount)
    amounts = {"cpu": settings.resources.cpu, "memory": settings.resources.memory}
    http_get = {"port": "http"}
    container: dict[str, Any] = {
        "name": "gateway",
        "image": config.gateway_image or config.worker_image,
        "imagePullPolicy": config.worker_image_pull_policy,
        "command": ["llmos-gateway"],
        "env": gateway_env(ref, spec, config, api_keys_file),
        "ports": [
            {"name": "http", "containerPort": config.worker_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": config.worker_metrics_port, "protocol": "TCP"},
        ],
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
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "volumeMounts": mounts,
        "securityContext": security.container_security_context(),
    }
    selector = gateway_selector_labels(ref.name)
    template_labels = {
        **meta.labels(COMPONENT, ref.name, **{meta.POOL_LABEL: ref.name}),
        **selector,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ref),
        "spec": {
            "replicas": settings.replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": template_labels},
                "spec": {
                    "serviceAccountName": gateway_name(ref.name),
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": security.pod_security_context(),
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def build_gateway_pdb(ref: PoolRef) -> dict[str, Any]:
    """At most one gateway pod evicted at a time (drains roll the gateway like a rollout)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": gateway_selector_labels(ref.name)},
        },
    }


def build_gateway_network_policy(
    ref: PoolRef, spec: InferencePoolSpec, config: OperatorConfig
) -> dict[str, Any]:
    return networkpolicy.build_gateway_network_policy(
        name=gateway_name(ref.name),
        namespace=ref.namespace,
        metadata=_metadata(ref),
        pod_selector=gateway_selector_labels(ref.name),
        worker_pods=worker_pod_labels(ref.name),
        port=config.worker_port,
        metrics_port=config.worker_metrics_port,
        worker_port=config.worker_port,
        worker_metrics_port=config.worker_metrics_port,
        access=spec.access,
        peers=cluster_peers(config),
    )


def build_gateway_children(
    ref: PoolRef, spec: InferencePoolSpec, config: OperatorConfig
) -> list[dict[str, Any]]:
    """Every gateway child, in the order they are applied (identity, RBAC, policy before pods)."""
    return [
        build_gateway_service_account(ref),
        build_gateway_role(ref),
        build_gateway_role_binding(ref),
        build_gateway_network_policy(ref, spec, config),
        build_gateway_pdb(ref),
        build_gateway_deployment(ref, spec, config),
    ]


GATEWAY_KINDS = (
    "PodDisruptionBudget",
    "Deployment",
    "NetworkPolicy",
    "RoleBinding",
    "Role",
    "ServiceAccount",
)
"""The kinds of the gateway children (all named `gateway_name(pool)`), in deletion order."""
