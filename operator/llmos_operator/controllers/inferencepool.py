"""InferencePool reconciler: wait for the model, then the workers', the gateway's, the canary's.

Nothing is created before the spec validates and the referenced LLMModel is Ready, so an invalid
or premature pool never leaves half its children behind. The workers' children are the
ServiceAccount, Deployment, Service, PDB and NetworkPolicy; with `routing.gateway.enabled` the
gateway's (`builders.gateway`) and the `<pool>-workers` Service are applied too, and removed when
it is turned off (the GatewayReady condition follows its Deployment); the pool's Service selects
the gateway once one of its pods is ready, the workers before. A `spec.canary` adds the
`<pool>-canary` Deployment once its LLMModel is Ready (the CanaryReady condition says how far it
is) and its `<pool>-canary-workers` Service; both go when the canary is removed from the spec.
Every pass re-applies the desired children (drift is undone) and derives the status from the
Deployment's real status. The Deployment's replicas pass through an injected quota gate first
(the QuotaPolicy handlers' `replicas_within_quota`), so the operator never grows a pool past
its quota.

Status has several writers (this reconcile, the quota reconcile's QuotaExceeded condition and
`status.quota`, the autoscaler's `status.autoscaling`): each re-reads the pool and patches only
the keys and condition types it owns, so none drops another's (conditions are merged by type).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from llmos_operator.api import llmmodel
from llmos_operator.api.common import ConditionStatus, SecretKeyRef, set_condition
from llmos_operator.api.inferencepool import KIND, InferencePoolSpec
from llmos_operator.api.llmmodel import LLMModelSpec
from llmos_operator.builders import meta
from llmos_operator.builders.adapters import worker_lora_args
from llmos_operator.builders.gateway import GATEWAY_KINDS, build_gateway_children, gateway_name
from llmos_operator.builders.pool import (
    MODEL_KEY_DIR,
    PoolRef,
    ServedModel,
    build_deployment,
    build_network_policy,
    build_pdb,
    build_service,
    build_service_account,
    build_workers_service,
    canary_deployment_name,
    deployment_name,
    endpoint,
    network_policy_name,
    pdb_name,
    selector_labels,
    service_account_name,
    service_name,
    workers_service_name,
)
from llmos_operator.config import OperatorConfig
from llmos_operator.controllers.errors import InvalidSpec, WaitingForDependency
from llmos_operator.kube import KubeClient, OwnershipConflict, controller_uid
from llmos_operator.quota.ratelimits import configmap_name
from llmos_operator.status import Clock, invalid_spec_message, rfc3339

Conditions = list[dict[str, Any]]
# (replicas the pool may run now, why fewer than spec.replicas or None) for a pool body
ReplicaGate = Callable[[dict[str, Any]], Awaitable[tuple[int, str | None]]]
# the status keys this reconcile writes; other writers own the rest
OWNED_KEYS = (
    "replicas",
    "readyReplicas",
    "selector",
    "endpoint",
    "modelVersion",
    "observedGeneration",
)


def merge_conditions(current: Conditions, ours: Conditions, types: set[str]) -> Conditions:
    """`current` with the condition types in `types` taken from `ours` (merge by type)."""
    kept = [c for c in current if c.get("type") not in types]
    mine = [c for c in ours if c.get("type") in types]
    return sorted(kept + mine, key=lambda c: str(c.get("type")))


def deployment_conditions(
    deployment: dict[str, Any], desired: int
) -> list[tuple[str, ConditionStatus, str, str]]:
    """(type, status, reason, message) for Ready, Progressing, Degraded from a Deployment."""
    status = deployment.get("status") or {}
    generation = (deployment.get("metadata") or {}).get("generation") or 0
    ready = int(status.get("readyReplicas") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    observed = int(status.get("observedGeneration") or 0)
    dep_conds = {c.get("type"): c for c in status.get("conditions") or []}

    ready_c: tuple[str, ConditionStatus, str, str]
    degraded_c: tuple[str, ConditionStatus, str, str]
    progressing_c: tuple[str, ConditionStatus, str, str]
    if desired == 0:
        ready_c = ("Ready", "False", "ScaledToZero", "the pool has 0 replicas")
    elif ready >= desired:
        ready_c = ("Ready", "True", "ReplicasReady", f"{ready}/{desired} replicas ready")
    else:
        ready_c = ("Ready", "False", "ReplicasNotReady", f"{ready}/{desired} replicas ready")

    rolling = observed < generation or updated < desired or total > desired or ready < desired
    progressing = dep_conds.get("Progressing", {})
    stuck = (
        progressing.get("status") == "False"
        or progressing.get("reason") == "ProgressDeadlineExceeded"
    )
    failure = dep_conds.get("ReplicaFailure", {})
    if stuck:
        degraded_c = (
            "Degraded",
            "True",
            str(progressing.get("reason") or "ProgressDeadlineExceeded"),
            str(progressing.get("message") or "the rollout made no progress"),
        )
    elif failure.get("status") == "True":
        degraded_c = (
            "Degraded",
            "True",
            str(failure.get("reason") or "ReplicaFailure"),
            str(failure.get("message") or "pods could not be created"),
        )
    else:
        degraded_c = ("Degraded", "False", "AsExpected", "")
    progressing_c = (
        ("Progressing", "True", "RollingOut", f"{updated}/{desired} replicas updated")
        if rolling and not stuck
        else ("Progressing", "False", "Stable" if not stuck else "Stuck", "")
    )
    return [ready_c, progressing_c, degraded_c]


async def reconcile_pool(
    kube: KubeClient,
    config: OperatorConfig,
    body: dict[str, Any],
    clock: Clock,
    gate: ReplicaGate | None = None,
) -> dict[str, Any]:
    """Bring one InferencePool's children and status up to date; returns the new status."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    generation = metadata.get("generation")
    old_status: dict[str, Any] = dict(body.get("status") or {})
    if metadata.get("deletionTimestamp"):
        return old_status  # why: being deleted; creating children now would orphan them
    status = {k: v for k, v in old_status.items() if k != "kopf"}
    now = rfc3339(clock())
    conditions: Conditions = list(status.get("conditions") or [])
    owned_types: set[str] = set()

    def drop_condition(type_: str) -> None:
        """This reconcile owns `type_` and the pool no longer has it (e.g. no canary)."""
        nonlocal conditions
        owned_types.add(type_)
        conditions = [c for c in conditions if c.get("type") != type_]

    def condition(type_: str, value: ConditionStatus, reason: str, message: str) -> None:
        nonlocal conditions
        owned_types.add(type_)
        conditions = set_condition(
            conditions,
            type_,
            value,
            reason,
            message,
            now=now,
            generation=generation,
        )

    async def write() -> dict[str, Any]:
        status["observedGeneration"] = generation
        # why: the event's body may predate another writer's status change; merge onto now
        fresh = await kube.get(KIND, namespace, name)
        if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
            return status
        current: dict[str, Any] = fresh.get("status") or {}
        status["conditions"] = merge_conditions(
            list(current.get("conditions") or []), conditions, owned_types
        )
        patch = {
            key: status.get(key)
            for key in (*OWNED_KEYS, "conditions")
            if current.get(key) != status.get(key)
        }
        if patch:
            await kube.patch(KIND, namespace, name, {"status": patch}, sub="status")
        return status

    try:
        spec = InferencePoolSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        message = invalid_spec_message(exc)
        condition("Ready", "False", "InvalidSpec", message)
        condition("Degraded", "True", "InvalidSpec", message)
        await write()
        raise InvalidSpec(message) from exc

    model = await kube.get(llmmodel.KIND, namespace, spec.model_ref)
    model_status = (model or {}).get("status") or {}
    if model is None:
        message = f"spec.modelRef: LLMModel {spec.model_ref!r} not found in {namespace}"
        condition("Ready", "False", "ModelNotFound", message)
        await write()
        raise WaitingForDependency(message)
    if model_status.get("phase") != "Ready" or not model_status.get("path"):
        phase = model_status.get("phase") or "Pending"
        message = f"waiting for LLMModel {spec.model_ref!r} to be Ready (phase {phase})"
        condition("Ready", "False", "ModelNotReady", message)
        await write()
        raise WaitingForDependency(message)

    ref = PoolRef(name=name, namespace=namespace, uid=metadata["uid"])
    served = _served(spec.model_ref, model, config)
    replicas, over_quota = spec.replicas, None
    if gate is not None:
        replicas, over_quota = await gate(body)
    running = spec.model_copy(update={"replicas": replicas})
    gateway = spec.routing.gateway.enabled
    # why: the pool's Service moves to the gateway only once a gateway pod is ready (a pool
    # gaining its gateway, e.g. after an operator upgrade, keeps serving meanwhile)
    live = gateway and await _gateway_live(kube, ref)
    try:
        await kube.apply(build_service_account(ref))
        await kube.apply(build_network_policy(ref, spec, config, gateway_live=live))
        deployment, _ = await kube.apply(build_deployment(ref, running, served, config))
        await kube.apply(build_service(ref, config, gateway=live))
        await kube.apply(build_pdb(ref))
        if gateway:
            await kube.apply(build_workers_service(ref, config))
            front: dict[str, Any] = {}
            for child in build_gateway_children(ref, spec, config):
                applied, _ = await kube.apply(child)
                front = applied if child["kind"] == "Deployment" else front
            condition("GatewayReady", *_readiness(front, spec.routing.gateway.replicas, "gateway"))
        else:
            await _delete_gateway(kube, ref)
            drop_condition("GatewayReady")
        if spec.canary is None:
            await _delete_canary(kube, ref)
            drop_condition("CanaryReady")
        else:
            condition("CanaryReady", *await _apply_canary(kube, config, ref, running))
    except OwnershipConflict as exc:
        message = f"{exc}: rename the pool (its children's names clash)"
        condition("Ready", "False", "NameConflict", message)
        condition("Degraded", "True", "NameConflict", message)
        await write()
        raise WaitingForDependency(message) from exc

    for type_, value, reason, message in deployment_conditions(deployment, replicas):
        if over_quota and type_ == "Ready":
            message = f"{message}; {spec.replicas} asked: {over_quota}"
        condition(type_, value, reason, message)
    dep_status = deployment.get("status") or {}
    status.update(
        replicas=int(dep_status.get("replicas") or 0),
        readyReplicas=int(dep_status.get("readyReplicas") or 0),
        selector=meta.selector_string(selector_labels(name)),
        endpoint=endpoint(ref, config),
        modelVersion=served.version,
    )
    return await write()


def _served(
    model_ref: str,
    model: dict[str, Any],
    config: OperatorConfig,
    *,
    served_name: str | None = None,
) -> ServedModel:
    """What the Ready LLMModel `model_ref` offers a pool's workers: its volume, version, key
    and loaded LoRA adapters (`served_name`: the name the workers answer to, if not the
    model's)."""
    model_status = model.get("status") or {}
    try:
        model_spec = LLMModelSpec.model_validate(model.get("spec") or {})
    except ValidationError:  # why: the model's own reconcile reports it; serve no adapters
        lora: list[str] = []
    else:
        lora = worker_lora_args(
            model_spec,
            model_status,
            mount_path=config.models_mount_path,
            key_file=f"{MODEL_KEY_DIR}/kek",
            served_name=served_name,
        )
    return ServedModel(
        name=model_ref,
        claim_name=str(model_status.get("claimName") or f"{model_ref}-weights"),
        path=str(model_status["path"]),
        version=str(model_status.get("servedVersion") or ""),
        digest=str(model_status.get("digest") or ""),
        key_ref=_key_ref(model_status.get("keySecretRef")),
        lora_args=tuple(lora),
    )


async def _apply_canary(
    kube: KubeClient, config: OperatorConfig, ref: PoolRef, spec: InferencePoolSpec
) -> tuple[ConditionStatus, str, str]:
    """Apply the canary's Service, and its Deployment once its model is Ready: the condition.

    While the canary's model is not Ready an existing canary Deployment is left as it is (its
    model may be re-loading); the gateway sends the canary's share to the stable workers while
    the canary Service has no ready endpoints.
    """
    assert spec.canary is not None
    await kube.apply(build_workers_service(ref, config, canary=True))
    await kube.apply(build_pdb(ref, canary=True))
    model_ref = spec.canary.model_ref
    model = await kube.get(llmmodel.KIND, ref.namespace, model_ref)
    if model is None:
        return "False", "ModelNotFound", f"spec.canary.modelRef: LLMModel {model_ref!r} not found"
    model_status = model.get("status") or {}
    if model_status.get("phase") != "Ready" or not model_status.get("path"):
        phase = model_status.get("phase") or "Pending"
        return "False", "ModelNotReady", f"waiting for LLMModel {model_ref!r} (phase {phase})"
    served = _served(model_ref, model, config, served_name=spec.model_ref)
    deployment, _ = await kube.apply(build_deployment(ref, spec, served, config, canary=True))
    desired = deployment["spec"]["replicas"]
    what = f"canary ({model_ref}, {spec.canary.weight}%)"
    return _readiness(deployment, desired, what)


def _readiness(
    deployment: dict[str, Any], desired: int, what: str
) -> tuple[ConditionStatus, str, str]:
    """(status, reason, message) of a gateway or canary condition from its Deployment."""
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    message = f"{ready}/{desired} {what} replicas ready"
    if desired == 0:
        return "False", "ScaledToZero", f"{what}: 0 replicas"
    if ready >= desired:
        return "True", "ReplicasReady", message
    return "False", "ReplicasNotReady", message


async def _gateway_live(kube: KubeClient, ref: PoolRef) -> bool:
    """Whether the pool's own gateway Deployment has a ready replica."""
    front = await kube.get("Deployment", ref.namespace, gateway_name(ref.name))
    if front is None or controller_uid(front) != ref.uid:
        return False
    return int((front.get("status") or {}).get("readyReplicas") or 0) > 0


async def _delete_owned(kube: KubeClient, ref: PoolRef, kind: str, name: str) -> None:
    """Delete the pool's child `kind`/`name` if it exists and the pool is its controller.

    why: these names can be another pool's children (pool "chat"'s gateway Deployment is
    chat-gateway, as is the stable Deployment of a pool named "chat-gateway").
    """
    existing = await kube.get(kind, ref.namespace, name)
    if existing is not None and controller_uid(existing) == ref.uid:
        await kube.delete(kind, ref.namespace, name)


async def _delete_gateway(kube: KubeClient, ref: PoolRef) -> None:
    for kind in GATEWAY_KINDS:
        await _delete_owned(kube, ref, kind, gateway_name(ref.name))
    await _delete_owned(kube, ref, "Service", workers_service_name(ref.name))


async def _delete_canary(kube: KubeClient, ref: PoolRef) -> None:
    await _delete_owned(kube, ref, "Deployment", canary_deployment_name(ref.name))
    await _delete_owned(kube, ref, "Service", workers_service_name(ref.name, canary=True))
    await _delete_owned(kube, ref, "PodDisruptionBudget", pdb_name(ref.name, canary=True))


def _key_ref(value: Any) -> SecretKeyRef | None:
    """The model's status.keySecretRef as a SecretKeyRef (None: a plaintext model)."""
    return SecretKeyRef.model_validate(value) if isinstance(value, dict) else None


async def cleanup_pool(kube: KubeClient, body: dict[str, Any]) -> None:
    """Delete the pool's children (what garbage collection would do, done eagerly)."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    ref = PoolRef(name=name, namespace=namespace, uid=str(metadata.get("uid") or ""))
    await _delete_gateway(kube, ref)
    await _delete_canary(kube, ref)
    # why owner-checked: another pool's gateway or canary children may carry these names
    await _delete_owned(kube, ref, "Deployment", deployment_name(name))
    await _delete_owned(kube, ref, "PodDisruptionBudget", pdb_name(name))
    await _delete_owned(kube, ref, "Service", service_name(name))
    await kube.delete("ServiceAccount", namespace, service_account_name(name))
    await kube.delete("NetworkPolicy", namespace, network_policy_name(name))
    await kube.delete("ConfigMap", namespace, configmap_name(name))
