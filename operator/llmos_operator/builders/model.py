"""Children of an LLMModel: the PersistentVolumeClaim holding weights and the loader Job.

The loader runs the worker image's `llmos-worker fetch-model`, which downloads and verifies the
weights into `<mount>/<load dir>` and writes its manifest JSON ({digest, sizeBytes, files,
version, ...}) to the container's termination message, where the operator reads it back.
Each distinct (source, version, format, encrypted or not) gets its own load key, Job name and
directory, so a new version loads beside the old one and retries of the same load find the same
Job. Adapters (builders/adapters.py) are fetched by Jobs of the same shape (`build_fetch_job`).
An encrypted model's loader gets the key Secret as a file (`--encrypt-key-file`); a key
rotation Job (`llmos-worker rewrap-key`) gets the old and the new key and re-wraps the data key
in place. A NetworkPolicy per model lets its loader and rotation pods reach DNS and 443 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmos_operator.api.common import SecretKeyRef
from llmos_operator.api.llmmodel import KIND, LLMModelSpec
from llmos_operator.builders import meta, security
from llmos_operator.builders.networkpolicy import build_loader_network_policy
from llmos_operator.config import OperatorConfig

TERMINATION_LOG = "/dev/termination-log"
SOURCES_MOUNT = "/sources"
ENCRYPTION_KEY_DIR = "/etc/llmos/encryption-key"
OLD_KEY_DIR = "/etc/llmos/old-key"
NEW_KEY_DIR = "/etc/llmos/new-key"


@dataclass(frozen=True)
class ModelRef:
    """The identity of the LLMModel being rendered."""

    name: str
    namespace: str
    uid: str


def load_key(spec: LLMModelSpec) -> str:
    """Hash of what a load produces: a change of source, version, format or digest is a new load."""
    parts = [spec.source, spec.version, spec.format, spec.sha256 or ""]
    if encryption_key(spec) is not None:
        parts.append("encrypted")  # why: plain and encrypted copies never share a directory
    return meta.short_hash(*parts)


def encryption_key(spec: LLMModelSpec) -> SecretKeyRef | None:
    """The key-encryption key the spec asks for; None when the model is stored in plaintext."""
    if spec.encryption is None or not spec.encryption.enabled:
        return None
    return spec.encryption.key_secret_ref


def network_policy_name(model: str) -> str:
    return meta.child_name(model, "loader")


def rotation_key(path: str, old: SecretKeyRef, new: SecretKeyRef, also: Sequence[str] = ()) -> str:
    """Hash naming one re-wrap of one load directory (and the `also` ones) from `old` to `new`."""
    return meta.short_hash(path, old.name, old.key, new.name, new.key, *also)


def rotation_job_name(model: str, key: str) -> str:
    return meta.child_name(model, f"rekey-{key}")


def claim_name(model: str) -> str:
    return meta.child_name(model, "weights")


def job_name(model: str, key: str) -> str:
    return meta.child_name(model, f"load-{key}")


def load_dir(key: str) -> str:
    """Directory of one load inside the model volume."""
    return f"v-{key}"


def _metadata(ref: ModelRef, name: str, **extra: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": meta.labels("loader", ref.name, **{meta.MODEL_LABEL: ref.name}, **extra),
        "ownerReferences": [meta.owner_reference(KIND, ref.name, ref.uid)],
    }


def build_pvc(ref: ModelRef, spec: LLMModelSpec) -> dict[str, Any]:
    pvc_spec: dict[str, Any] = {
        "accessModes": list(spec.storage.access_modes),
        "resources": {"requests": {"storage": spec.storage.size}},
    }
    if spec.storage.storage_class_name:
        pvc_spec["storageClassName"] = spec.storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(ref, claim_name(ref.name)),
        "spec": pvc_spec,
    }


def _source_arg(source: str) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(--source value, extra volumes, extra mounts); pvc:// sources become a mounted path."""
    if not source.startswith("pvc://"):
        return source, [], []
    claim, _, path = source.removeprefix("pvc://").partition("/")
    volume = {"name": "source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    mount = {"name": "source", "mountPath": f"{SOURCES_MOUNT}/{claim}", "readOnly": True}
    return f"{SOURCES_MOUNT}/{claim}/{path}", [volume], [mount]


@dataclass(frozen=True)
class FetchJob:
    """One `fetch-model` run: what to fetch and where; the Job is named `name`."""

    name: str
    key: str
    source: str
    dest_dir: str  # inside the model volume
    version: str | None
    sha256: str | None = None
    args: tuple[str, ...] = ()  # extra fetch-model flags (--format, --adapter)
    labels: tuple[tuple[str, str], ...] = ()  # extra labels of the Job and its pod


def build_loader_job(ref: ModelRef, spec: LLMModelSpec, config: OperatorConfig) -> dict[str, Any]:
    key = load_key(spec)
    fetch = FetchJob(
        name=job_name(ref.name, key),
        key=key,
        source=spec.source,
        dest_dir=load_dir(key),
        version=spec.version,
        sha256=spec.sha256,
        args=("--format", spec.format),
    )
    return build_fetch_job(ref, fetch, encryption_key(spec), config)


def build_fetch_job(
    ref: ModelRef, fetch: FetchJob, kek: SecretKeyRef | None, config: OperatorConfig
) -> dict[str, Any]:
    """The loader Job running `llmos-worker fetch-model` into the model volume; `kek` encrypts."""
    source, extra_volumes, extra_mounts = _source_arg(fetch.source)
    args = ["--source", source, "--dest", f"{config.models_mount_path}/{fetch.dest_dir}"]
    if fetch.sha256:
        args += ["--sha256", fetch.sha256]
    args += list(fetch.args)
    if kek is not None:
        volume, mount, path = security.secret_file(
            "encryption-key", kek.name, kek.key, ENCRYPTION_KEY_DIR, "kek"
        )
        extra_volumes.append(volume)
        extra_mounts.append(mount)
        args += ["--encrypt-key-file", path]
    tmp_volume, tmp_mount = security.scratch_volume("4Gi")
    extra = {meta.LOAD_LABEL: fetch.key, **dict(fetch.labels)}
    pod_labels = meta.labels("loader", ref.name, **{meta.MODEL_LABEL: ref.name}, **extra)
    container = {
        "name": "fetch",
        "image": config.worker_image,
        "imagePullPolicy": config.worker_image_pull_policy,
        "command": ["llmos-worker", "fetch-model"],
        "args": args,
        "env": [
            {"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/tmp/hf"},
            *([{"name": "LLMOS_MODEL_VERSION", "value": fetch.version}] if fetch.version else []),
        ],
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        },
        "volumeMounts": [
            {"name": "models", "mountPath": config.models_mount_path},
            tmp_mount,
            *extra_mounts,
        ],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "securityContext": security.container_security_context(),
    }
    return _job(
        _metadata(ref, fetch.name, **extra),
        pod_labels,
        container,
        [_models_volume(ref), tmp_volume, *extra_volumes],
        deadline_s=6 * 3600,
    )


def build_rotation_job(
    ref: ModelRef,
    path: str,
    old: SecretKeyRef,
    new: SecretKeyRef,
    config: OperatorConfig,
    *,
    also: Sequence[str] = (),
) -> dict[str, Any]:
    """The Job re-wrapping the data key of the load directory `path` from `old` to `new`, and
    those of the `also` directories (the model's adapters, encrypted under the same key).

    Only the small wrapped-key headers change; the weights are not re-encrypted.
    """
    key = rotation_key(path, old, new, also)
    old_volume, old_mount, old_file = security.secret_file(
        "old-key", old.name, old.key, OLD_KEY_DIR, "kek"
    )
    new_volume, new_mount, new_file = security.secret_file(
        "new-key", new.name, new.key, NEW_KEY_DIR, "kek"
    )
    tmp_volume, tmp_mount = security.scratch_volume("64Mi")
    container = {
        "name": "rewrap",
        "image": config.worker_image,
        "imagePullPolicy": config.worker_image_pull_policy,
        "command": ["llmos-worker", "rewrap-key"],
        "args": [
            f"{config.models_mount_path}/{path}",
            *(f"{config.models_mount_path}/{p}" for p in also),
            "--old-key-file",
            old_file,
            "--new-key-file",
            new_file,
        ],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
        "volumeMounts": [
            {"name": "models", "mountPath": config.models_mount_path},
            tmp_mount,
            old_mount,
            new_mount,
        ],
        "securityContext": security.container_security_context(),
    }
    labels = meta.labels("loader", ref.name, **{meta.MODEL_LABEL: ref.name})
    return _job(
        _metadata(ref, rotation_job_name(ref.name, key)),
        labels,
        container,
        [_models_volume(ref), tmp_volume, old_volume, new_volume],
        deadline_s=3600,
    )


def _models_volume(ref: ModelRef) -> dict[str, Any]:
    return {"name": "models", "persistentVolumeClaim": {"claimName": claim_name(ref.name)}}


def _job(
    metadata: dict[str, Any],
    pod_labels: dict[str, str],
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    *,
    deadline_s: int,
) -> dict[str, Any]:
    """A run-once Job of one restricted container with no API access."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": deadline_s,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": security.pod_security_context(),
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def build_network_policy(ref: ModelRef) -> dict[str, Any]:
    """Loader and rotation pods of this model: no ingress; egress to DNS and 443 only."""
    return build_loader_network_policy(
        name=network_policy_name(ref.name),
        namespace=ref.namespace,
        metadata=_metadata(ref, network_policy_name(ref.name)),
        pod_selector={
            "app.kubernetes.io/component": "loader",
            meta.MODEL_LABEL: ref.name,
        },
    )
