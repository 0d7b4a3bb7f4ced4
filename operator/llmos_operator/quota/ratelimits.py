"""Rate limits and priority delivered to a pool's workers as a mounted JSON document.

The operator renders, per InferencePool, a ConfigMap `<pool>-ratelimits` holding
`ratelimits.json`: the strictest per-namespace and per-API-key request/token rates of the
policies selecting the pool's namespace, and the engine priority for its requests. The pool's
Deployment mounts the ConfigMap as a directory (not subPath, so kubelet refreshes it when a
policy changes) and points the worker at the file with env LLMOS_RATE_LIMITS_FILE; the worker's
`llmos_worker.server.ratelimit` enforces it with token buckets. Document shape (version 1):

    {"version": 1, "namespace": "team-a", "pool": "chat", "policies": ["gpu-standard"],
     "perNamespace": {"requestsPerMinute": 600, "tokensPerMinute": 100000} | null,
     "perApiKey": {"requestsPerMinute": 60, "tokensPerMinute": 20000} | null,
     "priority": 0, "fairShareWeight": 1.0}

A null rate, or a missing field inside one, means unlimited.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmos_operator.builders.meta import child_name, labels, owner_reference
from llmos_operator.quota.policy import Bound, Effective

FILE_NAME = "ratelimits.json"
MOUNT_DIR = "/etc/llmos/ratelimits"
ENV_VAR = "LLMOS_RATE_LIMITS_FILE"
VOLUME_NAME = "ratelimits"
DOCUMENT_VERSION = 1


def _rate(bounds: Mapping[str, Bound]) -> dict[str, int] | None:
    return {key: bound.value for key, bound in sorted(bounds.items())} or None


def rate_limits_document(namespace: str, pool: str, effective: Effective) -> dict[str, Any]:
    """The JSON document (as a dict) the pool's workers enforce."""
    return {
        "version": DOCUMENT_VERSION,
        "namespace": namespace,
        "pool": pool,
        "policies": list(effective.policies),
        "perNamespace": _rate(effective.per_namespace),
        "perApiKey": _rate(effective.per_api_key),
        "priority": effective.priority.value if effective.priority else 0,
        "fairShareWeight": effective.fair_share_weight.value
        if effective.fair_share_weight
        else 1.0,
    }


def configmap_name(pool: str) -> str:
    return child_name(pool, "ratelimits", limit=253)


def build_rate_limits_configmap(
    pool_body: Mapping[str, Any], effective: Effective
) -> dict[str, Any]:
    """The ConfigMap `<pool>-ratelimits`, owned by the pool."""
    meta = pool_body.get("metadata") or {}
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    document = rate_limits_document(namespace, name, effective)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(name),
            "namespace": namespace,
            "labels": labels("inference", name, **{"llmos.dev/pool": name}),
            "ownerReferences": [owner_reference("InferencePool", name, str(meta.get("uid", "")))],
        },
        "data": {FILE_NAME: json.dumps(document, sort_keys=True, indent=2) + "\n"},
    }


def worker_volume(pool: str) -> dict[str, Any]:
    """The pod volume the Deployment builder adds (optional: a pool renders before its map)."""
    return {
        "name": VOLUME_NAME,
        "configMap": {"name": configmap_name(pool), "optional": True},
    }


def worker_volume_mount() -> dict[str, Any]:
    return {"name": VOLUME_NAME, "mountPath": MOUNT_DIR, "readOnly": True}


def worker_env() -> dict[str, str]:
    return {"name": ENV_VAR, "value": f"{MOUNT_DIR}/{FILE_NAME}"}
