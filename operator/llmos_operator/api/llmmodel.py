"""The LLMModel kind: a model artifact the operator downloads, verifies and stores on a volume.

`spec.source` says where the weights come from (one of four URI schemes; `https://` needs the
expected sha256 because nothing else vouches for the bytes), `spec.version` names the artifact
version. The operator runs a loader Job writing into a PVC and reports the outcome in `status`:
phase, digest and size as the loader measured them, the version now served, and a short history.
`spec.adapters` declares PEFT LoRA adapters of the model, each loaded into the same volume by its
own loader Job (encrypted when the model is) and reported in `status.adapters`; a pool serving
the model serves each Ready adapter under its name (the `model` clients send).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmos_operator.api.common import ApiModel, Condition, Quantity, SecretKeyRef

KIND = "LLMModel"
PLURAL = "llmmodels"
SINGULAR = "llmmodel"
SHORT_NAMES = ["llm"]
HISTORY_LIMIT = 10
MAX_ADAPTERS = 64
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

SOURCE_PATTERN = (
    r"^(builtin://[a-z0-9][a-z0-9.-]*"
    r"|https://[^\s]+"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\s]*"
    r"|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?)$"
)
_SOURCE_RE = re.compile(SOURCE_PATTERN)
Phase = Literal["Pending", "Loading", "Ready", "Failed"]
AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]


def _default_access_modes() -> list[AccessMode]:
    return ["ReadWriteOnce"]


class ModelStorage(ApiModel):
    """The PersistentVolumeClaim the weights are written to."""

    size: Quantity = Field(
        default="2Gi", description="Capacity requested for the model volume, e.g. 20Gi."
    )
    storage_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="StorageClass of the volume; the cluster default when unset.",
    )
    access_modes: list[AccessMode] = Field(
        default_factory=_default_access_modes,
        min_length=1,
        max_length=4,
        description="Access modes of the volume; ReadWriteMany or ReadOnlyMany lets worker pods "
        "on several nodes mount it.",
    )  # fmt: skip


class ModelEncryption(ApiModel):
    """Encryption at rest of the stored weights (envelope encryption, AES-256-GCM)."""

    enabled: bool = Field(default=False, description="Encrypt the weights as they are written.")
    key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the key-encryption key (32 bytes, base64 in the data).",
    )

    @model_validator(mode="after")
    def _key_when_enabled(self) -> ModelEncryption:
        if self.enabled and self.key_secret_ref is None:
            raise ValueError("keySecretRef is required when encryption is enabled")
        return self


class ModelAdapter(ApiModel):
    """A PEFT LoRA adapter of the model (adapter_config.json + adapter_model.safetensors)."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=ADAPTER_NAME_PATTERN,
        description="Name the adapter is served under: the `model` value clients send. A "
        "lowercase DNS label, unique among the model's adapters.",
    )
    source: str = Field(
        max_length=2048,
        pattern=SOURCE_PATTERN,
        description="Where the adapter directory comes from: pvc://claim/dir, "
        "https://host/dir (the two files under it; sha256 required) or hf://org/name@revision"
        "[/dir] (through the configured mirror; sha256 required).",
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected digest (lowercase hex): sha256 of the `sha256sum adapter_config.json "
        "adapter_model.safetensors` listing; required for https and hf.",
    )
    version: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Version label of the adapter; changing it loads the adapter again.",
    )

    @model_validator(mode="after")
    def _download_needs_digest(self) -> ModelAdapter:
        if self.source.startswith("builtin://"):
            raise ValueError("there are no builtin adapters: use pvc://, https:// or hf://")
        if self.source.startswith(("https://", "hf://")) and self.sha256 is None:
            raise ValueError(f"sha256 is required for the downloaded adapter {self.name!r}")
        return self


class LLMModelSpec(ApiModel):
    """Desired state of an LLMModel."""

    source: str = Field(
        max_length=2048,
        pattern=SOURCE_PATTERN,
        description="Where the weights come from: builtin://smollm2-135m-instruct, "
        "https://host/path/file.gguf (sha256 required), pvc://claim/path/in/claim, or "
        "hf://org/name@revision.",
    )
    sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected sha256 (lowercase hex) of the downloaded file; required for https.",
    )
    format: Literal["gguf", "safetensors"] = Field(
        default="gguf", description="File format of the weights."
    )
    version: str = Field(
        default="1",
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Version label of the artifact; changing it starts a new load.",
    )
    storage: ModelStorage = Field(
        default_factory=ModelStorage, description="Volume the weights are stored on."
    )
    encryption: ModelEncryption | None = Field(
        default=None, description="Encryption at rest of the stored weights."
    )
    adapters: list[ModelAdapter] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description=f"LoRA adapters of this model (at most {MAX_ADAPTERS}), loaded into the model "
        "volume beside the weights and encrypted when the weights are; pools of the model serve "
        "the Ready ones under their names.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    @field_validator("adapters")
    @classmethod
    def _unique_adapter_names(cls, adapters: list[ModelAdapter]) -> list[ModelAdapter]:
        seen: dict[str, int] = {}
        for i, adapter in enumerate(adapters):
            if adapter.name in seen:
                raise ValueError(
                    f"adapters[{i}].name {adapter.name!r} repeats adapters[{seen[adapter.name]}]"
                    ".name: adapter names must be unique"
                )
            seen[adapter.name] = i
        return adapters

    @model_validator(mode="after")
    def _https_needs_digest(self) -> LLMModelSpec:
        if self.source.startswith("https://") and self.sha256 is None:
            raise ValueError("sha256 is required for an https:// source")
        return self


class ModelVersionRecord(ApiModel):
    """One successfully loaded version, newest first in status.history."""

    version: str = Field(max_length=63, description="spec.version that was loaded.")
    source: str = Field(max_length=2048, description="spec.source that was loaded.")
    digest: str = Field(default="", max_length=128, description="sha256:<hex> of the artifact.")
    size_bytes: int = Field(default=0, ge=0, description="Bytes written to the volume.")
    path: str = Field(default="", max_length=253, description="Directory inside the volume.")
    loaded_at: str = Field(default="", description="When the load finished (RFC 3339).")


class AdapterStatus(ApiModel):
    """Observed state of one adapter of spec.adapters."""

    name: str = Field(max_length=63, description="spec.adapters[].name this entry describes.")
    phase: Phase = Field(default="Pending", description="Pending, Loading, Ready or Failed.")
    digest: str | None = Field(
        default=None, max_length=128, description="sha256:<hex> of the loaded adapter."
    )
    size_bytes: int | None = Field(default=None, ge=0, description="Bytes of the adapter files.")
    rank: int | None = Field(default=None, ge=1, description="LoRA rank (r) of the loaded adapter.")
    path: str | None = Field(
        default=None,
        max_length=253,
        description="Directory of the loaded adapter inside the model volume; it stays that of "
        "the last successful load while a new version loads or after it failed, and pools serve "
        "the adapter from it.",
    )
    encrypted: bool | None = Field(
        default=None, description="Whether the loaded adapter is stored encrypted."
    )
    load_key: str | None = Field(
        default=None, max_length=63, description="Hash of what this load of the adapter produces."
    )
    load_job: str | None = Field(
        default=None, max_length=63, description="Name of the adapter's loader Job."
    )
    message: str = Field(default="", max_length=4096, description="Why the phase is what it is.")


class LLMModelStatus(ApiModel):
    """Observed state of an LLMModel, written by the operator."""

    phase: Phase = Field(default="Pending", description="Pending, Loading, Ready or Failed.")
    digest: str | None = Field(default=None, description="sha256:<hex> of the served artifact.")
    size_bytes: int | None = Field(default=None, ge=0, description="Size of the served artifact.")
    served_version: str | None = Field(default=None, description="Version now on the volume.")
    path: str | None = Field(
        default=None, description="Directory of the served version inside the model volume."
    )
    claim_name: str | None = Field(default=None, description="PVC holding the weights.")
    load_job: str | None = Field(default=None, description="Name of the current loader Job.")
    load_key: str | None = Field(
        default=None, description="Hash of source+version+format of the current load."
    )
    key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Key the stored data key is wrapped with now (encrypted models); it follows "
        "spec.encryption.keySecretRef once a rotation Job has re-wrapped the data key.",
    )
    rotation_job: str | None = Field(
        default=None, description="Name of the key rotation Job in progress or last run."
    )
    history: list[ModelVersionRecord] = Field(
        default_factory=list,
        max_length=HISTORY_LIMIT,
        description=f"Loaded versions, newest first, at most {HISTORY_LIMIT}.",
    )
    adapters: list[AdapterStatus] = Field(
        default_factory=list,
        max_length=MAX_ADAPTERS,
        description="Load state of each adapter of spec.adapters, in spec order.",
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready and Failed conditions."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this status describes."
    )


def source_scheme(source: str) -> str:
    """The scheme of a source URI ("builtin", "https", "pvc", "hf"); "" when malformed."""
    return source.split("://", 1)[0] if _SOURCE_RE.match(source) else ""
