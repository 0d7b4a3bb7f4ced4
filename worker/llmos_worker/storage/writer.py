"""Writing a model into a directory: hashed, optionally encrypted, all or nothing.

`ModelWriter` stages every file in a private `.fetch-*` directory inside the destination (same
filesystem), each file hashed as its plaintext streams through and, when a key is given,
encrypted on the way (plaintext never reaches the disk). `commit` then renames the files into
place, writes `manifest.json` last, and removes files only the previous manifest listed. Any
failure before `commit` removes the staging directory: no partial file is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from llmos_worker.storage.atomic import atomic_writer, fsync_dir
from llmos_worker.storage.crypto import DEFAULT_CHUNK_SIZE, Encryptor
from llmos_worker.storage.errors import DigestMismatchError, StorageError
from llmos_worker.storage.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    read_manifest,
    write_manifest,
)

ENCRYPTED_SUFFIX = ".enc"


class FileSink:
    """One staged file: `write` plaintext pieces, then `finish(expected_sha256)`."""

    def __init__(self, writer: ModelWriter, name: str) -> None:
        self.name = name
        self.stored_as = name + ENCRYPTED_SUFFIX if writer.kek is not None else name
        path = writer.staging / self.stored_as
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self._out: BinaryIO = self._stack.enter_context(atomic_writer(path))
        self._enc: Encryptor | None = None
        if writer.kek is not None:
            if writer.model_digest is None:
                raise StorageError("encrypting needs the model digest before the first byte")
            self._enc = Encryptor(
                self._out,
                writer.kek,
                file_id=name,
                model_digest=writer.model_digest,
                chunk_size=writer.chunk_size,
                data_key=writer.data_key,
            )
        self._sha = hashlib.sha256()
        self.size = 0
        self.head = b""  # first bytes, for format checks (GGUF magic)

    def write(self, data: bytes) -> None:
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self._sha.update(data)
        self.size += len(data)
        if self._enc is not None:
            self._enc.write(data)
        else:
            self._out.write(data)

    def finish(self, expected_sha256: str | None = None) -> ManifestFile:
        """Seal and fsync the file; `DigestMismatchError` (file removed) if the hash differs."""
        digest = self._sha.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            self.abort()
            raise DigestMismatchError(
                f"{self.name}: sha256 is {digest}, expected {expected_sha256}; nothing was stored"
            )
        if self._enc is not None:
            self._enc.close()
        self._stack.close()
        stored = self.stored_as if self.stored_as != self.name else None
        return ManifestFile(self.name, digest, self.size, stored)

    def abort(self) -> None:
        with contextlib.suppress(_Abort):
            self._stack.__exit__(_Abort, _Abort(), None)


class _Abort(Exception):
    """Raised into the atomic writer to make it discard its temporary file."""


class ModelWriter:
    """Stages a model's files in `dest`, then commits them with their manifest.

    Use as a context manager: leaving the block without `commit` (an exception, a digest
    mismatch) deletes everything staged.
    """

    def __init__(
        self,
        dest: str | Path,
        *,
        kek: bytes | None = None,
        model_digest: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.dest = Path(dest)
        self.kek = kek
        self.model_digest = model_digest
        self.chunk_size = chunk_size
        # why: one data key per model, shared by its files (each file still binds its own id)
        self.data_key = AESGCM.generate_key(256) if kek is not None else None
        self.staging = Path("")
        self.files: list[ManifestFile] = []

    def __enter__(self) -> ModelWriter:
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=self.dest))
        except OSError as exc:
            raise StorageError(f"cannot write to {self.dest}: {exc.strerror or exc}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def open(self, name: str) -> FileSink:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or name == MANIFEST_NAME or not name:
            raise StorageError(f"refusing to store a file named {name!r}")
        return FileSink(self, name)

    def add(self, entry: ManifestFile) -> None:
        self.files.append(entry)

    def commit(self, manifest: Manifest) -> Path:
        """Move staged files into place, write the manifest, drop files the old one listed."""
        try:
            old = read_manifest(self.dest)
        except StorageError:
            old = None
        for f in manifest.files:
            target = self.dest / f.disk_name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / f.disk_name, target)
        fsync_dir(self.dest)
        path = write_manifest(self.dest, manifest)
        if old is not None:
            keep = {f.disk_name for f in manifest.files}
            for f in old.files:
                if f.disk_name not in keep:
                    with contextlib.suppress(OSError):
                        (self.dest / f.disk_name).unlink()
        return path


__all__ = ["ENCRYPTED_SUFFIX", "FileSink", "ModelWriter"]
