"""LoRA adapters of an LLMModel: their loader Jobs, and the worker flags that serve them.

Each entry of `spec.adapters` is fetched by its own loader Job (`fetch-model --adapter`, the
same Job shape as the model's) into `lora-<key>` on the model volume, where the key hashes what
the load produces (name, source, version, sha256, encrypted or not): retries find the same Job,
a changed adapter gets a new Job and directory beside the old one, which is served until the
new one is Ready. The Jobs carry the model's loader labels (the model's NetworkPolicy covers
them and their events re-check the model) plus `llmos.dev/adapter`. An encrypted model's
adapters are encrypted under the same key Secret.

`worker_lora_args` turns `status.adapters` into `llmos-worker serve` flags for a pool's pods,
which already mount the model volume (read-only, at the models mount path) and, for an
encrypted model, its key file at `MODEL_KEY_FILE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmos_operator.api.common import SecretKeyRef
from llmos_operator.api.llmmodel import LLMModelSpec, ModelAdapter
from llmos_operator.builders import meta
from llmos_operator.builders.model import (
    FetchJob,
    ModelRef,
    build_fetch_job,
    encryption_key,
)
from llmos_operator.config import OperatorConfig

ADAPTER_LABEL = "llmos.dev/adapter"
DEFAULT_MODELS_MOUNT = "/models"
# where the pool's worker pods mount an encrypted model's key (builders/pool.py MODEL_KEY_DIR)
MODEL_KEY_FILE = "/etc/llmos/model-key/kek"
# the worker's defaults: 4 GPU slots, ranks up to 16, 32 adapters parsed in host memory
WORKER_MAX_LORAS = 4
WORKER_MAX_LORA_RANK = 16
WORKER_MAX_CPU_LORAS = 32


def adapter_load_key(spec: LLMModelSpec, adapter: ModelAdapter) -> str:
    """Hash of what one adapter load produces; a change is a new load in a new directory."""
    parts = ["adapter", adapter.name, adapter.source, adapter.version or "", adapter.sha256 or ""]
    if encryption_key(spec) is not None:
        parts.append("encrypted")  # why: plain and encrypted copies never share a directory
    return meta.short_hash(*parts)


def adapter_job_name(model: str, key: str) -> str:
    return meta.child_name(model, f"lora-{key}")


def adapter_dir(key: str) -> str:
    """Directory of one adapter load inside the model volume."""
    return f"lora-{key}"


def build_adapter_job(
    ref: ModelRef,
    spec: LLMModelSpec,
    adapter: ModelAdapter,
    config: OperatorConfig,
    *,
    kek: SecretKeyRef | None = None,
) -> dict[str, Any]:
    """The loader Job of one adapter of `spec`, encrypted when the model is: under `kek` when
    given (the key the model's data key is wrapped with now), else the spec's key."""
    key = adapter_load_key(spec, adapter)
    fetch = FetchJob(
        name=adapter_job_name(ref.name, key),
        key=key,
        source=adapter.source,
        dest_dir=adapter_dir(key),
        version=adapter.version,
        sha256=adapter.sha256,
        args=("--adapter",),
        labels=((ADAPTER_LABEL, adapter.name),),
    )
    wanted = encryption_key(spec)
    return build_fetch_job(ref, fetch, (kek or wanted) if wanted is not None else None, config)


def served_adapters(
    model_spec: LLMModelSpec, model_status: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The `status.adapters` entries a pool serves, in spec order: adapters still declared
    whose load has succeeded (an entry's `path` is that of its last successful load). An
    encrypted adapter needs the model's key in the pod, which is mounted only while the served
    model is encrypted (status.keySecretRef): without it the adapter is left out (only while
    encryption is being switched on), as a pod that cannot open it would not start."""
    keyed = bool(model_status.get("keySecretRef"))
    by_name = {
        str(entry.get("name")): entry
        for entry in model_status.get("adapters") or []
        if isinstance(entry, Mapping)
        and entry.get("path")
        and (keyed or not entry.get("encrypted"))
    }
    return [dict(by_name[a.name]) for a in model_spec.adapters if a.name in by_name]


def worker_lora_args(
    model_spec: LLMModelSpec,
    model_status: Mapping[str, Any],
    *,
    mount_path: str = DEFAULT_MODELS_MOUNT,
    key_file: str = MODEL_KEY_FILE,
    served_name: str | None = None,
) -> list[str]:
    """`llmos-worker serve` flags serving the model's loaded adapters; [] when there are none.

    `--lora NAME=<mount_path>/<path>` per adapter; `--max-loras` is the adapter count up to the
    worker's 4 slots (fewer adapters need fewer GPU slots); `--max-lora-rank` the largest rank the
    loaders reported (at least 1; the worker's 16 when a rank is unknown); `--max-cpu-loras` the
    count when it exceeds the worker's 32, so that no declared adapter is ever evicted from host
    memory; `--lora-key-file key_file` when the model is stored encrypted (status.keySecretRef:
    the key the pod mounts for the model, which also wraps the adapters' data keys).
    `mount_path` is where the pod mounts the model volume (OperatorConfig.models_mount_path);
    `served_name` the name the pod serves the base model under, if not the LLMModel's (a canary
    answers to the stable model's name): an adapter of that name is left out, since the worker
    would refuse to start with it.
    """
    served = [
        entry
        for entry in served_adapters(model_spec, model_status)
        if served_name is None or entry["name"] != served_name
    ]
    if not served:
        return []
    args: list[str] = []
    for entry in served:
        args += ["--lora", f"{entry['name']}={mount_path.rstrip('/')}/{entry['path']}"]
    ranks = [entry.get("rank") for entry in served]
    if all(isinstance(r, int) and r > 0 for r in ranks):
        max_rank = max(int(r) for r in ranks if r is not None)
    else:
        max_rank = max(
            [WORKER_MAX_LORA_RANK, *(int(r) for r in ranks if isinstance(r, int) and r > 0)]
        )
    args += ["--max-loras", str(min(len(served), WORKER_MAX_LORAS))]
    args += ["--max-lora-rank", str(max_rank)]
    if len(served) > WORKER_MAX_CPU_LORAS:
        args += ["--max-cpu-loras", str(len(served))]
    if model_status.get("keySecretRef"):
        args += ["--lora-key-file", key_file]
    return args


__all__ = [
    "ADAPTER_LABEL",
    "MODEL_KEY_FILE",
    "adapter_dir",
    "adapter_job_name",
    "adapter_load_key",
    "build_adapter_job",
    "served_adapters",
    "worker_lora_args",
]
