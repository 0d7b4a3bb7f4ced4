"""Whole-file envelope operations: encrypt a file, verify one, re-wrap its data key.

Built on the chunk format of crypto.py. `encrypt_file` writes atomically; `verify_file` makes a
full authenticated pass and discards the plaintext; `rewrap` is key rotation — the data key is
unwrapped with the old KEK and wrapped with the new one, 48 header bytes rewritten in place, the
weights untouched.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from llmos_worker.storage.atomic import atomic_writer
from llmos_worker.storage.crypto import (
    DEFAULT_CHUNK_SIZE,
    Encryptor,
    Header,
    iter_decrypted,
    read_header,
    unwrap_data_key,
)
from llmos_worker.storage.digest import sha256_file
from llmos_worker.storage.keys import key_id


def encrypt_stream(
    src: BinaryIO,
    out: BinaryIO,
    kek: bytes,
    *,
    file_id: str,
    model_digest: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    data_key: bytes | None = None,
) -> Header:
    """Encrypt all of `src` into `out`; return the header written."""
    enc = Encryptor(
        out,
        kek,
        file_id=file_id,
        model_digest=model_digest,
        chunk_size=chunk_size,
        data_key=data_key,
    )
    while piece := src.read(max(chunk_size, 1 << 20)):
        enc.write(piece)
    return enc.close()


def encrypt_file(
    src: str | Path,
    dst: str | Path,
    kek: bytes,
    *,
    file_id: str | None = None,
    model_digest: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Header:
    """Encrypt `src` into `dst` atomically. Defaults: file id = src's name, digest = its sha256."""
    digest = model_digest if model_digest is not None else sha256_file(src)
    with open(src, "rb") as fin, atomic_writer(dst) as fout:
        return encrypt_stream(
            fin,
            fout,
            kek,
            file_id=file_id or Path(src).name,
            model_digest=digest,
            chunk_size=chunk_size,
        )


def verify_file(
    path: str | Path,
    kek: bytes,
    *,
    expected_model_digest: str | None = None,
    expected_file_id: str | None = None,
) -> Header:
    """A full authenticated pass over `path`, discarding plaintext; return its header."""
    with open(path, "rb") as f:
        for _ in iter_decrypted(
            f,
            kek,
            expected_model_digest=expected_model_digest,
            expected_file_id=expected_file_id,
            origin=str(path),
        ):
            pass
        f.seek(0)
        return read_header(f, origin=str(path))


def rewrap(path: str | Path, old_kek: bytes, new_kek: bytes) -> Header:
    """Re-wrap the data key of `path` under `new_kek`, rewriting only 48 header bytes in place.

    Idempotent: a file already wrapped under `new_kek` is left as is (a retried rotation Job
    finds some files done). The write is one small pwrite inside the first disk sector.
    """
    origin = str(path)
    with open(path, "r+b") as f:
        header = read_header(f, origin=origin)
        if header.key_id == key_id(new_kek):
            unwrap_data_key(header, new_kek, origin=origin)
            return header
        data_key = unwrap_data_key(header, old_kek, origin=origin)
        new = replace(header, key_id=key_id(new_kek), wrapped_key=aes_key_wrap(new_kek, data_key))
        os.pwrite(f.fileno(), new.key_id + new.wrapped_key, new.mutable_offset + 8)
        os.fsync(f.fileno())
    return new


__all__ = ["encrypt_file", "encrypt_stream", "rewrap", "verify_file"]
