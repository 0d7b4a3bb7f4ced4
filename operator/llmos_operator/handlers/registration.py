"""All kopf handlers of the operator and the `register` function that wires them.

- startup: kopf settings from the `OperatorConfig` in memo, API client into memo;
- login: the same connection for kopf's own watches;
- LLMModel / InferencePool: resume + create + spec update -> reconcile (TemporaryError while
  waiting, PermanentError for invalid specs), a timer re-checks reality (drift, status),
  delete -> cleanup of children (kopf's finalizer path);
- children (Jobs, Deployments, Services, ServiceAccounts, PDBs) -> reconcile their owner, so
  hand edits and deletions are undone at once and pool status follows the Deployment
  (NetworkPolicies and ConfigMaps are put back by the timer's reconcile);
- every reconcile is timed and counted in the operator's metrics, model phases too; pools pass
  through the QuotaPolicy replica gate when the quota handlers are registered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import kopf

from llmos_operator.api.common import GROUP, VERSION
from llmos_operator.api.inferencepool import PLURAL as POOLS
from llmos_operator.api.llmmodel import PLURAL as MODELS
from llmos_operator.builders import meta
from llmos_operator.config import OperatorConfig
from llmos_operator.controllers import (
    InvalidSpec,
    WaitingForDependency,
    cleanup_model,
    cleanup_pool,
    reconcile_model,
    reconcile_pool,
)
from llmos_operator.controllers.inferencepool import ReplicaGate
from llmos_operator.handlers.quota import QUOTA, replicas_within_quota
from llmos_operator.handlers.state import OperatorState
from llmos_operator.kube import KubeClient
from llmos_operator.metrics import OPERATOR_METRICS

STATE = "llmos"  # memo key of the OperatorState
CONFIG = "config"  # memo key of an injected OperatorConfig


def connection(config: OperatorConfig, settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """The API server to talk to: explicit config, else in-cluster, else kubeconfig."""
    if config.api_server:
        return kopf.ConnectionInfo(
            server=config.api_server, token=config.api_token, scheme="Bearer"
        )
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.PermanentError("no Kubernetes credentials: not in a cluster, no kubeconfig")
    return info


def _config(memo: kopf.Memo) -> OperatorConfig:
    config = memo.get(CONFIG)
    return config if isinstance(config, OperatorConfig) else OperatorConfig.from_env()


def _ns(namespace: str | None) -> str:
    assert namespace, "LLMModel and InferencePool are namespaced"  # why: the CRD scope says so
    return namespace


def _state(memo: kopf.Memo) -> OperatorState:
    state = memo[STATE]
    assert isinstance(state, OperatorState)
    return state


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = _config(memo)
    settings.persistence.finalizer = config.finalizer
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = int(config.watch_timeout_s)
    settings.watching.client_timeout = int(config.watch_timeout_s) + 10
    settings.watching.reconnect_backoff = min(1.0, config.error_backoff_s)
    settings.batching.error_delays = [config.error_backoff_s] * 3 + [config.error_backoff_s * 4]
    settings.networking.request_timeout = config.http_timeout_s
    # why: a deleted object keeps its finalizer until its timers have exited; kopf polls for
    # that every 60 s by default, which delays every deletion that races a running timer
    settings.background.cancellation_polling = min(2.0, config.error_backoff_s)
    kube = KubeClient(connection(config, settings), timeout_s=config.http_timeout_s)
    memo[STATE] = OperatorState(config=config, kube=kube)


async def close(memo: kopf.Memo, **_: Any) -> None:
    if STATE in memo:
        await _state(memo).kube.aclose()


def login(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    return connection(_config(memo), settings)


def _gate(memo: kopf.Memo) -> ReplicaGate | None:
    """The QuotaPolicy replica gate when the quota handlers are registered (they are in
    `llmos_operator.app`); None runs pools at spec.replicas."""
    return functools.partial(replicas_within_quota, memo) if QUOTA in memo else None


def _model_phase(namespace: str, name: str, status: dict[str, Any]) -> None:
    if status.get("phase"):
        OPERATOR_METRICS.record_model_phase(namespace, name, str(status["phase"]))


async def model_changed(
    body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    state = _state(memo)
    async with state.lock("LLMModel", _ns(namespace), name):
        with OPERATOR_METRICS.reconcile("LLMModel"):
            try:
                status = await reconcile_model(state.kube, state.config, dict(body), state.clock)
            except InvalidSpec as exc:
                _model_phase(_ns(namespace), name, {"phase": "Failed"})
                raise kopf.PermanentError(str(exc)) from exc
        _model_phase(_ns(namespace), name, status)


async def _recheck_model(state: OperatorState, namespace: str, name: str) -> None:
    async with state.lock("LLMModel", _ns(namespace), name):
        # why: re-read under the lock; a timer's or child event's body may be stale or deleting
        body = await state.kube.get("LLMModel", namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        # why: an invalid spec is in the status already; the handler path reported it once
        with contextlib.suppress(InvalidSpec), OPERATOR_METRICS.reconcile("LLMModel"):
            _model_phase(
                namespace, name, await reconcile_model(state.kube, state.config, body, state.clock)
            )


async def model_check(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _recheck_model(_state(memo), _ns(namespace), name)


async def model_deleted(
    body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    state = _state(memo)
    # why the lock: a recheck from a child event may be mid-reconcile with a body read before
    # the deletion; cleaning up under it would let that reconcile re-create the loader Job
    async with state.lock("LLMModel", _ns(namespace), name):
        await cleanup_model(state.kube, dict(body))
    OPERATOR_METRICS.forget_model(_ns(namespace), name)


async def pool_changed(
    body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    state = _state(memo)
    async with state.lock("InferencePool", _ns(namespace), name):
        with OPERATOR_METRICS.reconcile("InferencePool"):
            try:
                await reconcile_pool(state.kube, state.config, dict(body), state.clock, _gate(memo))
            except InvalidSpec as exc:
                raise kopf.PermanentError(str(exc)) from exc
            except WaitingForDependency as exc:
                delay = state.config.model_wait_delay_s
                raise kopf.TemporaryError(str(exc), delay=delay) from exc


async def _recheck_pool(
    state: OperatorState, namespace: str, name: str, gate: ReplicaGate | None
) -> None:
    async with state.lock("InferencePool", _ns(namespace), name):
        # why: re-read under the lock; the event or timer body may be stale or the pool gone
        body = await state.kube.get("InferencePool", namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        # why: the status says why it stopped; the create/update handler owns the retries
        with (
            contextlib.suppress(InvalidSpec, WaitingForDependency),
            OPERATOR_METRICS.reconcile("InferencePool"),
        ):
            await reconcile_pool(state.kube, state.config, body, state.clock, gate)


async def pool_check(namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _recheck_pool(_state(memo), _ns(namespace), name, _gate(memo))


async def pool_deleted(
    body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    state = _state(memo)
    async with state.lock("InferencePool", _ns(namespace), name):  # why: as model_deleted
        await cleanup_pool(state.kube, dict(body))


async def pool_child_event(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any
) -> None:
    pool = labels.get(meta.POOL_LABEL)
    if pool:
        await _recheck_pool(_state(memo), _ns(namespace), pool, _gate(memo))


async def loader_job_event(
    namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **_: Any
) -> None:
    model = labels.get(meta.MODEL_LABEL)
    if model:
        await _recheck_model(_state(memo), _ns(namespace), model)


def _pool_component(value: str | None, **_: Any) -> bool:
    return value in ("inference", "gateway")


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> kopf.OperatorRegistry:
    """Wire every handler into `registry`; timer intervals come from `config`."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(close)
    kopf.on.login(registry=registry)(login)

    model = (GROUP, VERSION, MODELS)
    pool = (GROUP, VERSION, POOLS)
    interval = config.reconcile_interval_s
    for decorate in (kopf.on.resume, kopf.on.create):
        decorate(*model, registry=registry, id="reconcile")(model_changed)
        decorate(*pool, registry=registry, id="reconcile")(pool_changed)
    kopf.on.update(*model, field="spec", registry=registry, id="reconcile")(model_changed)
    kopf.on.update(*pool, field="spec", registry=registry, id="reconcile")(pool_changed)
    kopf.timer(*model, interval=interval, idle=interval, registry=registry)(model_check)
    kopf.timer(*pool, interval=interval, idle=interval, registry=registry)(pool_check)
    kopf.on.delete(*model, registry=registry, id="cleanup")(model_deleted)
    kopf.on.delete(*pool, registry=registry, id="cleanup")(pool_deleted)

    managed = {"app.kubernetes.io/managed-by": meta.MANAGED_BY}
    # why: a pool's children are its workers' and its gateway's
    inference: dict[str, Any] = {**managed, "app.kubernetes.io/component": _pool_component}
    for group, version, plural in (
        ("apps", "v1", "deployments"),
        ("", "v1", "services"),
        ("", "v1", "serviceaccounts"),
        ("policy", "v1", "poddisruptionbudgets"),
    ):
        kopf.on.event(group, version, plural, labels=inference, registry=registry)(pool_child_event)
    loader = {**managed, "app.kubernetes.io/component": "loader"}
    kopf.on.event("batch", "v1", "jobs", labels=loader, registry=registry)(loader_job_event)
    return registry
