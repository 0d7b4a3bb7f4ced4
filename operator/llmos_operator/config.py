"""Operator configuration: one frozen value built from the environment, injected via kopf's memo.

Everything a test wants to change (the API server, the worker image, timer intervals, retry
delays) is a field here, so tests pass their own `OperatorConfig` instead of patching modules.
Environment variables (`LLMOS_OPERATOR_<FIELD>`) configure the deployed operator.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class OperatorConfig:
    """Settings of one operator process."""

    worker_image: str = "ghcr.io/llmos-dev/llmos-worker:0.1.0"
    worker_image_pull_policy: str = "IfNotPresent"
    # image of the pools' gateway pods (it needs `llmos-gateway`); "" uses worker_image
    gateway_image: str = ""
    worker_port: int = 8000
    # why: /metrics on its own port, without an API key; the NetworkPolicy admits only the
    # operator and monitoring to it
    worker_metrics_port: int = 9090
    cluster_domain: str = "cluster.local"
    models_mount_path: str = "/models"
    # why: a pool waiting for its model retries this often (kopf.TemporaryError delay)
    model_wait_delay_s: float = 10.0
    # drift correction and status refresh interval of every pool and model
    reconcile_interval_s: float = 30.0
    # kopf's own backoffs; tests shrink them
    error_backoff_s: float = 5.0
    watch_timeout_s: float = 300.0
    # explicit API server for tests / out-of-cluster runs; in-cluster or kubeconfig otherwise
    api_server: str | None = None
    api_token: str | None = None
    finalizer: str = "llmos.dev/cleanup"
    # where the operator's pods run (NetworkPolicies let them scrape and probe workers)
    operator_namespace: str = "llmos-system"
    # namespace of Prometheus, allowed to scrape workers; "" allows none
    monitoring_namespace: str = "monitoring"
    http_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        return cls(**settings_from_env(cls, "LLMOS_OPERATOR_", env))


def settings_from_env(
    cls: type[Any], prefix: str, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Keyword arguments for the frozen dataclass `cls` from `<prefix><FIELD>` variables.

    Values are converted by the field's annotation (int, float, str; `X | None` fields read an
    empty value as None); fields without a variable keep their defaults.
    """
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = source.get(prefix + f.name.upper())
        if raw is None:
            continue
        kind = str(f.type)
        if kind.endswith("| None") and raw == "":
            values[f.name] = None
        elif kind.startswith("float"):
            values[f.name] = float(raw)
        elif kind.startswith("int"):
            values[f.name] = int(raw)
        else:
            values[f.name] = raw
    return values
