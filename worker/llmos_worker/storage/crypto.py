"""Envelope encryption of model files: AES-256-GCM in authenticated chunks, streaming.

Each model gets a random 256-bit data key; each file stores that key wrapped (AES key wrap,
RFC 3394) under the key-encryption key (KEK) from a Kubernetes Secret. Re-keying re-wraps 40
bytes in the header and leaves the weights untouched. The plaintext is cut into chunks (4 MiB by
default) sealed with AES-256-GCM; the last chunk may be shorter (or empty for an empty file).

File format, version 1 (integers big-endian):

    offset     size  field
    0          8     magic b"LLMOSENC"
    8          2     format version (1)
    10         2     header length H (bytes, this whole table)
    12         4     chunk size C (plaintext bytes per chunk)
    16         8     nonce prefix: random per file
    24         32    model digest (raw sha256, see digest.py)
    56         1     file id length n
    57         n     file id (UTF-8: the file's name inside its model)
    --- the "static header" ends here (S = 57 + n); it never changes after encryption
    S          8     plaintext size P (authenticated through the last chunk, see below)
    S + 8      8     KEK id (keys.key_id) of the key that wrapped the data key
    S + 16     40    data key wrapped with the KEK (AES-KW)
    H = S + 56       chunks: max(1, ceil(P / C)) records of ciphertext || 16-byte GCM tag

Chunk i uses nonce = nonce prefix || i (u32) and associated data
sha256(static header) || i (u64) || last (u8) || [P (u64) if last]. So a flipped bit anywhere
fails a tag (or the key unwrap); moved chunks fail (index); chunks cut off the end fail (the new
last chunk was sealed as not-last, and P is bound); chunks or files moved between files or models
fail (file id, nonce prefix, model digest and data key all differ) — and a whole file moved
between models is caught by comparing its model digest and file id with what the caller expects.
Errors say which: `WrongKeyError`, `TruncatedError`, `ModelMismatchError`, `IntegrityError`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from llmos_worker.errors import StorageError
from llmos_worker.storage.digest import normalise_sha256
from llmos_worker.storage.errors import (
    EncryptedFormatError,
    IntegrityError,
    ModelMismatchError,
    TruncatedError,
    WrongKeyError,
)
from llmos_worker.storage.keys import KEY_BYTES, key_id

MAGIC = b"LLMOSENC"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 1 << 30
TAG_BYTES = 16
MAX_CHUNKS = 1 << 32  # why: the chunk index fills the nonce's last 4 bytes
_FIXED = struct.Struct(">8sHHI8s32sB")  # magic .. file id length: 57 bytes
_MUTABLE = struct.Struct(">Q8s40s")  # plaintext size, KEK id, wrapped key: 56 bytes


@dataclass(frozen=True)
class Header:
    """The parsed header of an encrypted model file."""

    chunk_size: int
    nonce_prefix: bytes
    model_digest: str  # hex
    file_id: str
    plaintext_size: int
    key_id: bytes
    wrapped_key: bytes
    version: int = FORMAT_VERSION

    @property
    def static_bytes(self) -> bytes:
        fid = self.file_id.encode("utf-8")
        digest = bytes.fromhex(self.model_digest)
        fixed = _FIXED.pack(
            MAGIC,
            self.version,
            self.header_len,
            self.chunk_size,
            self.nonce_prefix,
            digest,
            len(fid),
        )
        return fixed + fid

    @property
    def header_len(self) -> int:
        return _FIXED.size + len(self.file_id.encode("utf-8")) + _MUTABLE.size

    @property
    def mutable_offset(self) -> int:
        return self.header_len - _MUTABLE.size

    @property
    def num_chunks(self) -> int:
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def encrypted_size(self) -> int:
        return self.header_len + self.plaintext_size + self.num_chunks * TAG_BYTES

    def pack(self) -> bytes:
        mutable = _MUTABLE.pack(self.plaintext_size, self.key_id, self.wrapped_key)
        return self.static_bytes + mutable


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _aad(static_hash: bytes, index: int, last: bool, plaintext_size: int) -> bytes:
    tail = struct.pack(">Q", plaintext_size) if last else b""
    return static_hash + struct.pack(">QB", index, int(last)) + tail


class Encryptor:
    """Streams plaintext into an encrypted file on `out` (which must be seekable).

    Call `write` any number of times, then `close` once: it seals the last chunk and records the
    plaintext size in the header. `data_key` lets all files of one model share one data key.
    """

    def __init__(
        self,
        out: BinaryIO,
        kek: bytes,
        *,
        file_id: str,
        model_digest: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        data_key: bytes | None = None,
    ) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise StorageError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}: {chunk_size}")
        if not file_id or len(file_id.encode("utf-8")) > 255:
            raise StorageError(f"file_id must be 1..255 bytes of UTF-8: {file_id!r}")
        if len(kek) != KEY_BYTES:
            raise StorageError(f"the key-encryption key must be {KEY_BYTES} bytes")
        self._data_key = data_key if data_key is not None else AESGCM.generate_key(256)
        self._aead = AESGCM(self._data_key)
        self.header = Header(
            chunk_size=chunk_size,
            nonce_prefix=os.urandom(8),
            model_digest=normalise_sha256(model_digest, field="model_digest"),
            file_id=file_id,
            plaintext_size=0,
            key_id=key_id(kek),
            wrapped_key=aes_key_wrap(kek, self._data_key),
        )
        self._static_hash = hashlib.sha256(self.header.static_bytes).digest()
        self._out = out
        self._start = out.tell()
        self._buf = bytearray()
        self._index = 0
        self._size = 0
        self._closed = False
        out.write(self.header.pack())

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise StorageError("write to a closed Encryptor")
        self._buf += data
        self._size += len(data)
        size = self.header.chunk_size
        # why: keep the tail buffered — only close() knows which chunk is the last one
        while len(self._buf) > size:
            self._seal(bytes(self._buf[:size]), last=False)
            del self._buf[:size]

    def close(self) -> Header:
        """Seal the last chunk, patch the plaintext size into the header; return the header."""
        if self._closed:
            return self.header
        self._seal(bytes(self._buf), last=True)
        self._buf.clear()
        self._closed = True
        self.header = replace(self.header, plaintext_size=self._size)
        end = self._out.tell()
        self._out.seek(self._start + self.header.mutable_offset)
        self._out.write(struct.pack(">Q", self._size))
        self._out.seek(end)
        return self.header

    def _seal(self, chunk: bytes, *, last: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise StorageError("file too large for the chunk size: more than 2**32 chunks")
        aad = _aad(self._static_hash, self._index, last, self._size)
        nonce = _nonce(self.header.nonce_prefix, self._index)
        self._out.write(self._aead.encrypt(nonce, chunk, aad))
        self._index += 1


def read_header(f: BinaryIO, *, origin: str = "file") -> Header:
    """Parse the header at the current position of `f`."""
    fixed = f.read(_FIXED.size)
    if len(fixed) < len(MAGIC) or fixed[: len(MAGIC)] != MAGIC:
        raise EncryptedFormatError(f"{origin} is not an llmos encrypted model file (bad magic)")
    if len(fixed) < _FIXED.size:
        raise TruncatedError(f"{origin} is truncated inside its header")
    _, version, header_len, chunk_size, prefix, digest, fid_len = _FIXED.unpack(fixed)
    if version != FORMAT_VERSION:
        raise EncryptedFormatError(
            f"{origin} uses encrypted format version {version}; this worker reads version "
            f"{FORMAT_VERSION}"
        )
    rest = f.read(fid_len + _MUTABLE.size)
    if len(rest) < fid_len + _MUTABLE.size:
        raise TruncatedError(f"{origin} is truncated inside its header")
    size, kid, wrapped = _MUTABLE.unpack(rest[fid_len:])
    try:
        file_id = rest[:fid_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{origin}: header is corrupt (file id is not UTF-8)") from exc
    header = Header(chunk_size, prefix, digest.hex(), file_id, size, kid, wrapped, version)
    if header_len != header.header_len or chunk_size == 0:
        raise IntegrityError(f"{origin}: header is corrupt (inconsistent lengths)")
    return header


def unwrap_data_key(header: Header, kek: bytes, *, origin: str = "file") -> bytes:
    """The file's data key; `WrongKeyError` for another KEK, `IntegrityError` if tampered."""
    try:
        return aes_key_unwrap(kek, header.wrapped_key)
    except (InvalidUnwrap, ValueError) as exc:
        if key_id(kek) != header.key_id:
            raise WrongKeyError(
                f"{origin} was encrypted under key id {header.key_id.hex()}, but the key given "
                f"has id {key_id(kek).hex()}: wrong key (check the key Secret)"
            ) from exc
        raise IntegrityError(f"{origin}: the wrapped data key fails its integrity check") from exc


def check_expected(
    header: Header,
    *,
    model_digest: str | None,
    file_id: str | None,
    origin: str = "file",
) -> None:
    """`ModelMismatchError` unless the header names the expected model and file."""
    if model_digest is not None and header.model_digest != normalise_sha256(model_digest):
        raise ModelMismatchError(
            f"{origin} belongs to model {header.model_digest}, expected model {model_digest}"
        )
    if file_id is not None and header.file_id != file_id:
        raise ModelMismatchError(
            f"{origin} is file {header.file_id!r} of its model, expected {file_id!r}"
        )


def iter_decrypted(
    f: BinaryIO,
    kek: bytes,
    *,
    expected_model_digest: str | None = None,
    expected_file_id: str | None = None,
    origin: str = "file",
) -> Iterator[bytes]:
    """Yield the authenticated plaintext chunks of the encrypted file `f` (from its start).

    Nothing is yielded from a chunk before its tag verifies; a failure raises mid-stream, so a
    consumer must discard what it received (`plaintext.open_decrypted` does).
    """
    start = f.tell()
    header = read_header(f, origin=origin)
    check_expected(
        header, model_digest=expected_model_digest, file_id=expected_file_id, origin=origin
    )
    aead = AESGCM(unwrap_data_key(header, kek, origin=origin))
    length = os.fstat(f.fileno()).st_size - start
    if length < header.encrypted_size:
        raise TruncatedError(
            f"{origin} is truncated: {length} bytes, its header promises {header.encrypted_size}"
        )
    if length > header.encrypted_size:
        raise IntegrityError(f"{origin} has {length - header.encrypted_size} unexpected bytes")
    static_hash = hashlib.sha256(header.static_bytes).digest()
    n, size, total = header.num_chunks, header.chunk_size, header.plaintext_size
    for i in range(n):
        last = i == n - 1
        record = f.read((total - i * size if last else size) + TAG_BYTES)
        nonce = _nonce(header.nonce_prefix, i)
        try:
            yield aead.decrypt(nonce, record, _aad(static_hash, i, last, total))
        except InvalidTag:
            if last and _opens_as_inner(aead, nonce, record, static_hash, i):
                raise TruncatedError(
                    f"{origin} is truncated: it ends after chunk {i}, which was not the last one"
                ) from None
            raise IntegrityError(
                f"{origin}: chunk {i} of {n} fails authentication — the file was modified, or "
                "its chunks reordered or taken from another file"
            ) from None


def _opens_as_inner(
    aead: AESGCM, nonce: bytes, record: bytes, static_hash: bytes, index: int
) -> bool:
    try:
        aead.decrypt(nonce, record, _aad(static_hash, index, False, 0))
    except InvalidTag:
        return False
    return True


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAGIC",
    "Encryptor",
    "Header",
    "check_expected",
    "iter_decrypted",
    "read_header",
    "unwrap_data_key",
]
