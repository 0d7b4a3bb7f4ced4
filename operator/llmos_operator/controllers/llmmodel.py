"""LLMModel reconciler: PVC + loader Job, then phase Pending -> Loading -> Ready | Failed.

The loader Job for the current (source, version, format, sha256) is found by its deterministic
name; its outcome is read from the Job's conditions and, on success, from the manifest JSON the
loader wrote as its pod's termination message (digest, sizeBytes). A new spec gets a new Job and
a new directory, while the previous version keeps being served until the new one is Ready.
An encrypted model records the key its data key is wrapped with in `status.keySecretRef`; when
`spec.encryption.keySecretRef` later names another key, a rotation Job re-wraps the data key
and only its success moves `status.keySecretRef` (condition KeyRotated), which the pools follow.
Adapters (spec.adapters) load beside the model, one loader Job each, read back the same way into
`status.adapters` (condition AdaptersReady); an entry keeps the directory of its last successful
load until a new one succeeds, and a key rotation re-wraps the encrypted adapters with the model.
Nothing on the volume is deleted: a pool may still be serving an older directory.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from llmos_operator.api.common import ConditionStatus, SecretKeyRef, set_condition
from llmos_operator.api.llmmodel import HISTORY_LIMIT, KIND, LLMModelSpec
from llmos_operator.builders import meta
from llmos_operator.builders.adapters import (
    adapter_dir,
    adapter_job_name,
    adapter_load_key,
    build_adapter_job,
)
from llmos_operator.builders.model import (
    ModelRef,
    build_loader_job,
    build_network_policy,
    build_pvc,
    build_rotation_job,
    claim_name,
    encryption_key,
    job_name,
    load_dir,
    load_key,
    network_policy_name,
)
from llmos_operator.config import OperatorConfig
from llmos_operator.controllers.errors import InvalidSpec
from llmos_operator.kube import KubeClient
from llmos_operator.status import Clock, invalid_spec_message, rfc3339, status_patch


def _job_outcome(job: dict[str, Any]) -> tuple[str, str, str]:
    """("succeeded" | "failed" | "running", reason, message) from a Job's status."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded", "", ""
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "failed", str(cond.get("reason") or "JobFailed"), str(cond.get("message") or "")
    if (status.get("succeeded") or 0) >= 1:
        return "succeeded", "", ""
    return "running", "", ""


def _terminated_messages(pods: list[dict[str, Any]]) -> list[str]:
    """Termination messages of the loader containers, newest pod first."""
    pods = sorted(
        pods, key=lambda p: str(p.get("metadata", {}).get("creationTimestamp", "")), reverse=True
    )
    messages = []
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated") or {}
            if terminated.get("message"):
                messages.append(str(terminated["message"]))
    return messages


def _manifest(messages: list[str]) -> dict[str, Any] | None:
    for message in messages:
        try:
            data = json.loads(message)
        except ValueError:
            continue
        if isinstance(data, dict) and isinstance(data.get("digest"), str):
            return data
    return None


async def reconcile_model(
    kube: KubeClient, config: OperatorConfig, body: dict[str, Any], clock: Clock
) -> dict[str, Any]:
    """Bring one LLMModel's children and status up to date; returns the new status."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    generation = metadata.get("generation")
    old_status: dict[str, Any] = dict(body.get("status") or {})
    if metadata.get("deletionTimestamp"):
        return old_status  # why: being deleted; creating children now would orphan them
    status = {k: v for k, v in old_status.items() if k != "kopf"}
    now = rfc3339(clock())
    conditions: list[dict[str, Any]] = list(status.get("conditions") or [])

    def condition(type_: str, value: ConditionStatus, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, value, reason, message, now=now, generation=generation
        )

    async def write(phase: str, reason: str, message: str) -> dict[str, Any]:
        status["phase"] = phase
        condition("Ready", "True" if phase == "Ready" else "False", reason, message)
        status["conditions"] = conditions
        status["observedGeneration"] = generation
        patch = status_patch(old_status, status)
        if patch is not None:
            await kube.patch(KIND, namespace, name, {"status": patch}, sub="status")
        return status

    try:
        spec = LLMModelSpec.model_validate(body.get("spec") or {})
    except ValidationError as exc:
        message = invalid_spec_message(exc)
        await write("Failed", "InvalidSpec", message)
        raise InvalidSpec(message) from exc

    ref = ModelRef(name=name, namespace=namespace, uid=metadata["uid"])
    key = load_key(spec)
    await kube.apply(build_pvc(ref, spec))
    await kube.apply(build_network_policy(ref))
    status["claimName"] = claim_name(name)
    if spec.adapters or status.get("adapters"):
        status["adapters"] = await _load_adapters(kube, config, ref, spec, status)
        condition("AdaptersReady", *_adapters_condition(status["adapters"]))
    if status.get("loadKey") == key and status.get("phase") in ("Ready", "Failed"):
        # why: this load is settled; its Job may since have been cleaned up, never redo it
        phase = str(status["phase"])
        cond = next((c for c in conditions if c.get("type") == "Ready"), {})
        if phase == "Ready":
            rotation = await _follow_key(kube, config, ref, spec, status)
            if rotation is not None:
                condition("KeyRotated", *rotation)
        return await write(phase, str(cond.get("reason", phase)), str(cond.get("message", "")))

    status["loadKey"] = key
    status["loadJob"] = job_name(name, key)
    job, _ = await kube.apply(build_loader_job(ref, spec, config))
    outcome, reason, message = _job_outcome(job)
    if outcome == "running":
        return await write("Loading", "Loading", f"loader Job {status['loadJob']} is running")

    pods = await kube.list("Pod", namespace, {meta.LOAD_LABEL: key, meta.MODEL_LABEL: name})
    messages = _terminated_messages(pods)
    if outcome == "failed":
        detail = f"{message} {messages[0][-500:]}".strip() if messages else message
        return await write("Failed", reason, f"loader Job {status['loadJob']} failed: {detail}")

    manifest = _manifest(messages)
    if manifest is None:
        return await write(
            "Failed", "LoaderReportMissing", "the loader succeeded but left no manifest JSON"
        )
    record = {
        "version": spec.version,
        "source": spec.source,
        "digest": str(manifest["digest"]),
        "sizeBytes": int(manifest.get("sizeBytes") or 0),
        "path": load_dir(key),
        "loadedAt": now,
    }
    history = [h for h in status.get("history") or [] if h.get("path") != record["path"]]
    kek = _job_key(job)
    status.update(
        digest=record["digest"],
        sizeBytes=record["sizeBytes"],
        servedVersion=spec.version,
        path=record["path"],
        history=[record, *history][:HISTORY_LIMIT],
        keySecretRef=kek,
        rotationJob=None,
    )
    return await write("Ready", "Loaded", f"version {spec.version} loaded ({record['digest']})")


def _job_key(job: dict[str, Any]) -> dict[str, str] | None:
    """{name, key} of the Secret the loader Job encrypted with (what it really used: the spec
    may have named another key since the Job was made); None for a plaintext load."""
    for volume in ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get(
        "volumes"
    ) or []:
        secret = volume.get("secret") or {}
        if volume.get("name") == "encryption-key" and secret.get("items"):
            return {"name": str(secret["secretName"]), "key": str(secret["items"][0]["key"])}
    return None


async def _follow_key(
    kube: KubeClient,
    config: OperatorConfig,
    ref: ModelRef,
    spec: LLMModelSpec,
    status: dict[str, Any],
) -> tuple[ConditionStatus, str, str] | None:
    """Drive a key rotation of the served load; the KeyRotated condition (None: plaintext)."""
    wanted = encryption_key(spec)
    current = status.get("keySecretRef")
    if wanted is None or not isinstance(current, dict):
        return None  # why: switching encryption on or off is a new load, not a rotation
    if current == wanted.to_api():
        return "True", "KeyCurrent", f"data key wrapped with Secret {wanted.name}/{wanted.key}"
    old = SecretKeyRef.model_validate(current)
    also = [str(a["path"]) for a in status.get("adapters") or [] if a.get("encrypted")]
    body = build_rotation_job(ref, str(status["path"]), old, wanted, config, also=also)
    status["rotationJob"] = body["metadata"]["name"]
    job, _ = await kube.apply(body)
    outcome, reason, message = _job_outcome(job)
    if outcome == "running":
        return "False", "Rotating", f"rotation Job {status['rotationJob']} is re-wrapping the key"
    if outcome == "failed":
        # why: the old key still opens the data; pools keep serving with it
        detail = f"rotation Job {status['rotationJob']} failed ({reason}): {message}"
        return "False", "RotationFailed", detail
    status["keySecretRef"] = wanted.to_api()
    return "True", "Rotated", f"data key re-wrapped with Secret {wanted.name}/{wanted.key}"


_SERVED_FIELDS = ("digest", "sizeBytes", "rank", "encrypted", "path")


async def _load_adapters(
    kube: KubeClient,
    config: OperatorConfig,
    ref: ModelRef,
    spec: LLMModelSpec,
    status: dict[str, Any],
) -> list[dict[str, Any]]:
    """The new status.adapters: each declared adapter's load driven one step, in spec order.

    An adapter removed from the spec loses its entry (pools stop serving it); its directory and
    Job stay, as a model's older versions do.
    """
    old = {str(e.get("name")): e for e in status.get("adapters") or [] if isinstance(e, dict)}
    current = status.get("keySecretRef")
    kek = SecretKeyRef.model_validate(current) if isinstance(current, dict) else None
    entries = []
    for adapter in spec.adapters:
        key = adapter_load_key(spec, adapter)
        prev = old.get(adapter.name, {})
        if adapter.name == ref.name:
            # why: the worker serves the base model under the model's name and refuses an
            # adapter of that name at start-up; loading it would only break the pools
            message = f"an adapter cannot be named {ref.name!r}: the base model is served as that"
            entries.append({"name": adapter.name, "phase": "Failed", "message": message})
            continue
        if prev.get("loadKey") == key and prev.get("phase") in ("Ready", "Failed"):
            entries.append(prev)  # why: settled; its Job may since have been cleaned up
            continue
        entry = {"name": adapter.name, **{k: prev[k] for k in _SERVED_FIELDS if k in prev}}
        entry.update(loadKey=key, loadJob=adapter_job_name(ref.name, key))
        job = await kube.get("Job", ref.namespace, entry["loadJob"])
        if job is None:
            # why get first: a Job's template is immutable, and the key it was made with may
            # since have been rotated; the existing Job is this load's, whatever its key
            job, _ = await kube.apply(build_adapter_job(ref, spec, adapter, config, kek=kek))
        result = await _adapter_outcome(kube, ref, key, job)
        used = _job_key(job)
        if result["phase"] == "Ready" and kek is not None and used not in (None, kek.to_api()):
            # why: the model's key was rotated while this loader ran; re-wrap the adapter's data
            # key to the one the pools mount before it is served
            result = await _rewrap_adapter(kube, config, ref, result, used, kek)
        entries.append({**entry, **result})
    return entries


async def _adapter_outcome(
    kube: KubeClient, ref: ModelRef, key: str, job: dict[str, Any]
) -> dict[str, Any]:
    """Phase, message and (on success) the loaded adapter's fields from its loader Job."""
    name = job["metadata"]["name"]
    outcome, reason, message = _job_outcome(job)
    if outcome == "running":
        return {"phase": "Loading", "message": f"loader Job {name} is running"}
    pods = await kube.list("Pod", ref.namespace, {meta.LOAD_LABEL: key, meta.MODEL_LABEL: ref.name})
    messages = _terminated_messages(pods)
    if outcome == "failed":
        detail = f"{message} {messages[0][-500:]}".strip() if messages else message
        return {"phase": "Failed", "message": f"loader Job {name} failed ({reason}): {detail}"}
    manifest = _manifest(messages)
    if manifest is None:
        return {"phase": "Failed", "message": f"loader Job {name} succeeded but left no manifest"}
    loaded = {
        "phase": "Ready",
        "digest": str(manifest["digest"]),
        "sizeBytes": int(manifest.get("sizeBytes") or 0),
        "encrypted": bool(manifest.get("encrypted")),
        "path": adapter_dir(key),
        "message": f"loaded ({manifest['digest']})",
    }
    rank = manifest.get("rank")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0:
        loaded["rank"] = rank
    return loaded


async def _rewrap_adapter(
    kube: KubeClient,
    config: OperatorConfig,
    ref: ModelRef,
    loaded: dict[str, Any],
    used: dict[str, str] | None,
    kek: SecretKeyRef,
) -> dict[str, Any]:
    """`loaded` once a rotation Job has moved its data key from `used` to `kek`."""
    old = SecretKeyRef.model_validate(used)
    job, _ = await kube.apply(build_rotation_job(ref, str(loaded["path"]), old, kek, config))
    name = job["metadata"]["name"]
    outcome, reason, message = _job_outcome(job)
    if outcome == "running":
        return {"phase": "Loading", "message": f"rotation Job {name} re-wraps the adapter's key"}
    if outcome == "failed":
        return {"phase": "Failed", "message": f"rotation Job {name} failed ({reason}): {message}"}
    return loaded


def _adapters_condition(entries: list[dict[str, Any]]) -> tuple[ConditionStatus, str, str]:
    failed = [e["name"] for e in entries if e.get("phase") == "Failed"]
    waiting = [e["name"] for e in entries if e.get("phase") not in ("Ready", "Failed")]
    if failed:
        return "False", "AdapterFailed", f"adapters failed to load: {', '.join(failed)}"
    if waiting:
        return "False", "AdaptersLoading", f"adapters loading: {', '.join(waiting)}"
    return "True", "AdaptersLoaded", f"{len(entries)} adapters loaded"


async def cleanup_model(kube: KubeClient, body: dict[str, Any]) -> None:
    """Delete the loader Jobs and the PVC (what garbage collection would do, done eagerly)."""
    metadata = body["metadata"]
    name, namespace = metadata["name"], metadata["namespace"]
    for job in await kube.list("Job", namespace, {meta.MODEL_LABEL: name}):
        await kube.delete("Job", namespace, job["metadata"]["name"])
    await kube.delete("NetworkPolicy", namespace, network_policy_name(name))
    await kube.delete("PersistentVolumeClaim", namespace, claim_name(name))
