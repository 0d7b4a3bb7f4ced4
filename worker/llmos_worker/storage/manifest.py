"""`manifest.json`: what `fetch-model` stored in a model directory, and how to read it back.

Shape (camelCase, as the operator copies fields into `LLMModel.status`):
`{source, format, version, files: [{name, sha256, sizeBytes, storedAs?}], digest, sizeBytes,
encrypted, createdAt}`. `name`/`sha256`/`sizeBytes` describe the plaintext file (so digests do not
depend on encryption); `storedAs` is the file's name on disk when it differs (`<name>.enc` when
encrypted). `digest` is the model digest of digest.py; `sizeBytes` the plaintext total.
The same JSON, compacted, is the pod's termination message, which Kubernetes caps at 4 KiB: when
the file list does not fit it is replaced by `fileCount`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos_worker.storage.atomic import write_bytes_atomic
from llmos_worker.storage.errors import StorageError

MANIFEST_NAME = "manifest.json"
TERMINATION_MESSAGE_LIMIT = 4096


@dataclass(frozen=True)
class ManifestFile:
    """One file of a stored model: plaintext name, sha256 and size; on-disk name."""

    name: str
    sha256: str
    size_bytes: int
    stored_as: str | None = None

    @property
    def disk_name(self) -> str:
        return self.stored_as or self.name

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "sha256": self.sha256,
            "sizeBytes": self.size_bytes,
        }
        if self.stored_as is not None:
            out["storedAs"] = self.stored_as
        return out


@dataclass(frozen=True)
class Manifest:
    """What a model directory holds (see the module docstring for the JSON shape)."""

    source: str
    format: str
    version: str | None
    files: tuple[ManifestFile, ...]
    digest: str
    size_bytes: int
    encrypted: bool
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "version": self.version,
            "files": [f.to_json() for f in self.files],
            "digest": self.digest,
            "sizeBytes": self.size_bytes,
            "encrypted": self.encrypted,
            "createdAt": self.created_at,
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, origin: str = MANIFEST_NAME) -> Manifest:
        try:
            files = tuple(
                ManifestFile(
                    name=str(f["name"]),
                    sha256=str(f["sha256"]),
                    size_bytes=int(f["sizeBytes"]),
                    stored_as=None if f.get("storedAs") is None else str(f["storedAs"]),
                )
                for f in data["files"]
            )
            known = {"source", "format", "version", "files", "digest", "sizeBytes", "encrypted"}
            return cls(
                source=str(data["source"]),
                format=str(data["format"]),
                version=None if data.get("version") is None else str(data["version"]),
                files=files,
                digest=str(data["digest"]),
                size_bytes=int(data["sizeBytes"]),
                encrypted=bool(data["encrypted"]),
                created_at=str(data.get("createdAt", "")),
                extra={k: v for k, v in data.items() if k not in known | {"createdAt"}},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"{origin} is not a valid model manifest: {exc!r}") from exc

    def termination_message(self) -> str:
        """Compact JSON under Kubernetes' 4 KiB termination-message cap."""
        data = self.to_json()
        text = json.dumps(data, separators=(",", ":"))
        if len(text.encode("utf-8")) >= TERMINATION_MESSAGE_LIMIT:
            data["files"] = None
            data["fileCount"] = len(self.files)
            data["source"] = self.source[:1024]
            text = json.dumps(data, separators=(",", ":"))
        if len(text.encode("utf-8")) >= TERMINATION_MESSAGE_LIMIT:  # a huge version or extra
            keep = ("format", "digest", "sizeBytes", "encrypted", "createdAt")
            text = json.dumps(
                {**{k: data[k] for k in keep}, "fileCount": len(self.files)}, separators=(",", ":")
            )
        return text


def read_manifest(model_dir: str | Path) -> Manifest:
    """The manifest of a directory written by `fetch-model`."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StorageError(
            f"{model_dir} holds no {MANIFEST_NAME}: not a model directory written by fetch-model"
        ) from exc
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise StorageError(f"{path} is not a JSON object")
    return Manifest.from_json(data, origin=str(path))


def write_manifest(model_dir: str | Path, manifest: Manifest) -> Path:
    """Write `manifest.json` atomically; return its path."""
    path = Path(model_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestFile",
    "read_manifest",
    "write_manifest",
]
