"""The whole operator as one kopf registry: core reconcilers, quota, autoscaling.

`build_registry(config)` is what `llmos-operator` runs and what the integration tests run, so a
test exercises the same wiring as a deployment: the core handlers first (their startup handler
puts the API client into memo), then QuotaPolicy admission/reconcile, then the autoscaler timer.
Autoscaler settings (and its metrics registry and clock) are injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import kopf

from llmos_operator.config import OperatorConfig
from llmos_operator.handlers import autoscaling
from llmos_operator.handlers.quota import register_quota
from llmos_operator.handlers.registration import register
from llmos_operator.metrics import OPERATOR_METRICS, OperatorMetrics


def build_registry(
    config: OperatorConfig,
    *,
    autoscaler: autoscaling.AutoscalerSettings | None = None,
    metrics: OperatorMetrics = OPERATOR_METRICS,
    clock: Callable[[], float] = time.monotonic,
) -> kopf.OperatorRegistry:
    """Every handler of the operator in a fresh registry."""
    registry = register(kopf.OperatorRegistry(), config)
    register_quota(registry, interval_s=config.reconcile_interval_s)
    autoscaling.register(registry, config, autoscaler, metrics=metrics, clock=clock)
    return registry
