"""Decrypted model bytes that never touch disk: anonymous in-memory files for the model loader.

The loader takes a filesystem path (it memory-maps a .gguf, or reads an HF directory).
`open_decrypted` decrypts into a `memfd_create` file — RAM-backed, nameless, gone when closed —
sealed read-only once complete, and hands out `/proc/<pid>/fd/<n>`, which `open` and `mmap`
follow like a file. Because loaders pick a reader by file suffix, callers may ask for a symlink
with a proper name (`model.gguf`) in a private temporary directory; the link holds no data.
`resolve_model_dir` reads a directory written by `fetch-model`; `open_model_dir` turns one into a
path the loader accepts, decrypting when the manifest says the model is encrypted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmos_worker.storage.crypto import iter_decrypted
from llmos_worker.storage.digest import normalise_sha256, sha256_file
from llmos_worker.storage.errors import DigestMismatchError, ModelMismatchError, StorageError
from llmos_worker.storage.keys import load_key
from llmos_worker.storage.manifest import MANIFEST_NAME, Manifest, read_manifest

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def _fd_path(fd: int) -> Path:
    # why: /proc/<pid> rather than /proc/self so the path stays valid from any thread or helper
    return Path(f"/proc/{os.getpid()}/fd/{fd}")


@contextlib.contextmanager
def _memfd_decrypted(
    path: Path, kek: bytes, *, expected_model_digest: str | None, expected_file_id: str | None
) -> Iterator[int]:
    fd = os.memfd_create(path.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(path, "rb") as f:
            for chunk in iter_decrypted(
                f,
                kek,
                expected_model_digest=expected_model_digest,
                expected_file_id=expected_file_id,
                origin=str(path),
            ):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_decrypted(
    path: str | Path,
    kek: bytes,
    *,
    expected_model_digest: str | None = None,
    expected_file_id: str | None = None,
    link_name: str | None = None,
) -> Iterator[Path]:
    """Decrypt `path` into memory; yield a path to the plaintext, valid inside the block.

    The whole file is authenticated before the block is entered: a wrong key, a tampered or a
    truncated file raises (`WrongKeyError`, `IntegrityError`, `TruncatedError`) and the partial
    plaintext is dropped. With `link_name` the path yielded is a symlink of that name (e.g.
    `model.gguf`) in a fresh private temporary directory.
    """
    with _memfd_decrypted(
        Path(path),
        kek,
        expected_model_digest=expected_model_digest,
        expected_file_id=expected_file_id,
    ) as fd:
        if link_name is None:
            yield _fd_path(fd)
            return
        with _link_dir({link_name: _fd_path(fd)}) as directory:
            yield directory / link_name


@contextlib.contextmanager
def _link_dir(links: dict[str, Path]) -> Iterator[Path]:
    """A private temp directory holding symlinks `name -> target` (names may contain '/')."""
    directory = Path(tempfile.mkdtemp(prefix="llmos-model-"))
    try:
        for name, target in links.items():
            link = directory / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class ModelLocation:
    """A model directory written by `fetch-model`, as the server needs it."""

    directory: Path
    manifest: Manifest
    model_path: Path  # the .gguf file (single-file GGUF) or the directory (safetensors)

    @property
    def encrypted(self) -> bool:
        return self.manifest.encrypted


def resolve_model_dir(
    model_dir: str | Path, *, expected_digest: str | None = None
) -> ModelLocation:
    """Read `model_dir/manifest.json`; check `expected_digest` (e.g. from LLMModel status)."""
    directory = Path(model_dir)
    manifest = read_manifest(directory)
    if expected_digest is not None and manifest.digest != normalise_sha256(expected_digest):
        raise ModelMismatchError(
            f"{directory} holds model {manifest.digest}, expected {expected_digest}"
        )
    for f in manifest.files:
        if Path(f.disk_name).is_absolute() or ".." in Path(f.disk_name).parts:
            raise StorageError(f"{directory}/manifest.json names a file outside the directory")
        if not (directory / f.disk_name).is_file():
            raise StorageError(f"{directory} lacks {f.disk_name}, listed in its manifest")
    model_path = directory
    if manifest.format == "gguf":
        ggufs = [f for f in manifest.files if f.name.endswith(".gguf")]
        if len(ggufs) != 1:
            raise StorageError(f"{directory}: a gguf model has one .gguf file, found {len(ggufs)}")
        model_path = directory / ggufs[0].disk_name
    return ModelLocation(directory, manifest, model_path)


@contextlib.contextmanager
def open_model_dir(
    model_dir: str | Path,
    kek: bytes | None = None,
    *,
    expected_digest: str | None = None,
    verify_plaintext: bool = True,
) -> Iterator[Path]:
    """Yield the path to pass to the model loader for a `fetch-model` directory.

    Plain models: the files themselves (re-hashed against the manifest unless
    `verify_plaintext=False`). Encrypted models: every file decrypted into memory, each bound to
    the manifest's model digest and its own name, exposed through a temporary directory of links.
    """
    location = resolve_model_dir(model_dir, expected_digest=expected_digest)
    manifest = location.manifest
    if not manifest.encrypted:
        if verify_plaintext:
            for f in manifest.files:
                actual = sha256_file(location.directory / f.disk_name)
                if actual != f.sha256:
                    raise DigestMismatchError(
                        f"{location.directory / f.disk_name} has sha256 {actual}, its manifest "
                        f"says {f.sha256}"
                    )
        yield location.model_path
        return
    if kek is None:
        raise StorageError(f"{location.directory} holds an encrypted model: a key file is needed")
    with contextlib.ExitStack() as stack:
        links = {
            f.name: _fd_path(
                stack.enter_context(
                    _memfd_decrypted(
                        location.directory / f.disk_name,
                        kek,
                        expected_model_digest=manifest.digest,
                        expected_file_id=f.name,
                    )
                )
            )
            for f in manifest.files
        }
        directory = stack.enter_context(_link_dir(links))
        if manifest.format == "gguf":
            yield directory / next(f.name for f in manifest.files if f.name.endswith(".gguf"))
        else:
            yield directory


@contextlib.contextmanager
def open_model_source(
    source: str,
    *,
    key_file: str | None = None,
    expected_digest: str | None = None,
) -> Iterator[str]:
    """Yield the source string to give `load_model` for what a user passed as `--model`.

    A `fetch-model` directory (it holds manifest.json) goes through `open_model_dir` — verified,
    decrypted into memory when encrypted; a single `*.enc` file is decrypted into memory; anything
    else (builtin://, a .gguf, an HF directory) is passed through unchanged. The plaintext lives
    until the block exits: load the model inside it (the loader copies the weights out).
    """
    kek = load_key(key_file) if key_file else None
    path = Path(source)
    if "://" not in source and (path / MANIFEST_NAME).is_file():
        with open_model_dir(path, kek, expected_digest=expected_digest) as model_path:
            yield str(model_path)
    elif "://" not in source and path.is_file() and path.name.endswith(".enc"):
        if kek is None:
            raise StorageError(f"{source} is an encrypted model file: a key file is needed")
        with open_decrypted(
            path, kek, expected_model_digest=expected_digest, link_name=path.name[:-4]
        ) as model_path:
            yield str(model_path)
    else:
        yield source


__all__ = [
    "ModelLocation",
    "open_decrypted",
    "open_model_dir",
    "open_model_source",
    "resolve_model_dir",
]
