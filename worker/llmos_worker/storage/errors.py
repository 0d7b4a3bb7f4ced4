"""Storage's branch of the worker's exception tree.

Every class derives from `llmos_worker.errors.StorageError`, so callers that only care that
"the model could not be stored or opened" catch that one name; the subclasses let the CLI and the
server say *why* — a wrong key asks for a different Secret, a tampered or truncated file asks for a
re-fetch, a digest mismatch asks for a different source or checksum.
"""

from __future__ import annotations

from llmos_worker.errors import StorageError


class SourceError(StorageError):
    """The model source URI is malformed, unsupported here, or points at nothing."""


class FetchError(StorageError):
    """Reading the source failed: an HTTP error status, a connection error, an unreadable file."""


class DigestMismatchError(StorageError):
    """The bytes fetched do not have the sha256 the caller asked for."""


class KeyFileError(StorageError):
    """The key-encryption key file is missing or does not hold a 256-bit key."""


class EncryptedFormatError(StorageError):
    """The file is not an llmos encrypted model file, or uses an unknown format version."""


class WrongKeyError(StorageError):
    """The key-encryption key given is not the one that wrapped this file's data key."""


class IntegrityError(StorageError):
    """Authentication failed: the file was modified, its chunks reordered, or it is not the one
    expected (swapped in from another model or another file of the same model)."""


class TruncatedError(IntegrityError):
    """The encrypted file ends early: chunks are missing from its end."""


class ModelMismatchError(IntegrityError):
    """The file is intact but belongs to another model or is another file of the model."""


__all__ = [
    "DigestMismatchError",
    "EncryptedFormatError",
    "FetchError",
    "IntegrityError",
    "KeyFileError",
    "ModelMismatchError",
    "SourceError",
    "StorageError",
    "TruncatedError",
    "WrongKeyError",
]
