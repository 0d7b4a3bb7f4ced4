"""Names, labels and owner references shared by every child object the operator renders.

Names are deterministic functions of the parent's name (and, for loader Jobs, of a hash of what
they load) so that a retried or restarted reconcile finds the child it made before instead of
making a second one. Names are clipped to 63 characters with a short hash suffix to stay unique.
"""

from __future__ import annotations

import hashlib
from typing import Any

from llmos_operator.api.common import API_VERSION

MANAGED_BY = "llmos-operator"
POOL_LABEL = "llmos.dev/pool"
MODEL_LABEL = "llmos.dev/model"
LOAD_LABEL = "llmos.dev/load"
# stable or canary: which of a pool's worker sets a pod belongs to
VERSION_LABEL = "llmos.dev/version"
APP_NAMES = {"inference": "llmos-worker", "gateway": "llmos-gateway"}


def short_hash(*parts: str, length: int = 10) -> str:
    """A stable lowercase hex digest of `parts` (separated so ("a","bc") != ("ab","c"))."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:length]


def child_name(parent: str, suffix: str = "", limit: int = 63) -> str:
    """`<parent>-<suffix>`, shortened with a hash when longer than `limit` (DNS-1123 label)."""
    name = f"{parent}-{suffix}" if suffix else parent
    if len(name) <= limit:
        return name
    digest = short_hash(name, length=8)
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    """A controller owner reference to an llmos.dev object (children are garbage-collected)."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(component: str, instance: str, **extra: str) -> dict[str, str]:
    """The app.kubernetes.io/* labels plus any llmos.dev/* ones."""
    return {
        "app.kubernetes.io/name": APP_NAMES.get(component, "llmos-loader"),
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "llmos",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **extra,
    }


def selector_string(match_labels: dict[str, str]) -> str:
    """A label selector in the string form the scale subresource reports."""
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
