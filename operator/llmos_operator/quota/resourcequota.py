"""ResourceQuota objects that back a QuotaPolicy's GPU limit with Kubernetes' own enforcement.

Defence in depth: even if both the admission webhook and the operator were bypassed, the
kube-apiserver refuses pods whose `requests.nvidia.com/gpu` would exceed the quota. One
ResourceQuota per (policy, selected namespace), named after the policy, owned by the
cluster-scoped QuotaPolicy (garbage-collected with it) and labelled with the policy's name so a
reconcile can find and delete the ones of namespaces the policy no longer selects. Where several
policies select a namespace there are several ResourceQuotas; Kubernetes enforces all of them,
so the strictest wins there too. A policy without a GPU limit renders none.
"""

from __future__ import annotations

from typing import Any

from llmos_operator.api.common import API_VERSION
from llmos_operator.builders.meta import MANAGED_BY, short_hash
from llmos_operator.quota.policy import Policy

GPU_RESOURCE = "requests.nvidia.com/gpu"
POLICY_LABEL = "llmos.dev/quota-policy"
NAME_PREFIX = "llmos-quota-"


def resource_quota_name(policy: str) -> str:
    """`llmos-quota-<policy>`, clipped with a hash to a DNS-1123 subdomain's 253 characters."""
    name = NAME_PREFIX + policy
    if len(name) <= 253:
        return name
    return f"{name[:243].rstrip('-.')}-{short_hash(policy, length=8)}"


def policy_label_value(policy: str) -> str:
    """A label value (<= 63 chars) identifying the policy; long names are clipped + hashed."""
    if len(policy) <= 63:
        return policy
    return f"{policy[:53].rstrip('-.')}-{short_hash(policy, length=8)}"


def build_resource_quota(policy: Policy, namespace: str, policy_uid: str) -> dict[str, Any] | None:
    """The ResourceQuota for `policy` in `namespace`, or None when the policy limits no GPUs."""
    gpus = policy.limits.get("gpus")
    if gpus is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {
            "name": resource_quota_name(policy.name),
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": MANAGED_BY,
                "app.kubernetes.io/part-of": "llmos",
                POLICY_LABEL: policy_label_value(policy.name),
            },
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "QuotaPolicy",
                    "name": policy.name,
                    "uid": policy_uid,
                    # why: not a controller ref -- several policies may own quotas in a namespace
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "spec": {"hard": {GPU_RESOURCE: str(gpus)}},
    }
