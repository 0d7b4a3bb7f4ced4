"""Quota: QuotaPolicy evaluation, ResourceQuota and rate-limit builders (all pure).

The kopf handlers that use these live in `llmos_operator.handlers.quota`; everything here is a
plain function of dicts, so admission, the pool reconcile and the tests share one truth.
"""

from llmos_operator.quota.evaluation import (
    Verdict,
    allowed_replicas,
    check_model,
    check_pool,
    usage_violations,
)
from llmos_operator.quota.policy import Effective, Policy, PolicyError, effective_for
from llmos_operator.quota.ratelimits import build_rate_limits_configmap, rate_limits_document
from llmos_operator.quota.resourcequota import build_resource_quota
from llmos_operator.quota.usage import PoolDemand, Usage, namespace_usage, usage_by_namespace

__all__ = [
    "Effective",
    "Policy",
    "PolicyError",
    "PoolDemand",
    "Usage",
    "Verdict",
    "allowed_replicas",
    "build_rate_limits_configmap",
    "build_resource_quota",
    "check_model",
    "check_pool",
    "effective_for",
    "namespace_usage",
    "rate_limits_document",
    "usage_by_namespace",
    "usage_violations",
]
