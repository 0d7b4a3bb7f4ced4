"""Model storage: fetching, digests, envelope encryption and in-memory decryption.

`fetch_model` (the `fetch-model` command) writes a model directory with `manifest.json`;
`crypto` holds the encrypted file format; `open_model_dir` / `open_decrypted` give the model
loader a path to plaintext that lives only in memory. Nothing here imports torch.
"""

from llmos_worker.storage.crypto import (
    DEFAULT_CHUNK_SIZE,
    Encryptor,
    Header,
    iter_decrypted,
    read_header,
)
from llmos_worker.storage.digest import model_digest, sha256_file
from llmos_worker.storage.envelope import encrypt_file, rewrap, verify_file
from llmos_worker.storage.errors import (
    DigestMismatchError,
    EncryptedFormatError,
    FetchError,
    IntegrityError,
    KeyFileError,
    ModelMismatchError,
    SourceError,
    StorageError,
    TruncatedError,
    WrongKeyError,
)
from llmos_worker.storage.fetch import FetchRequest, fetch_model
from llmos_worker.storage.keys import key_id, load_key, parse_key
from llmos_worker.storage.manifest import Manifest, ManifestFile, read_manifest
from llmos_worker.storage.plaintext import (
    ModelLocation,
    open_decrypted,
    open_model_dir,
    open_model_source,
    resolve_model_dir,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DigestMismatchError",
    "EncryptedFormatError",
    "Encryptor",
    "FetchError",
    "FetchRequest",
    "Header",
    "IntegrityError",
    "KeyFileError",
    "Manifest",
    "ManifestFile",
    "ModelLocation",
    "ModelMismatchError",
    "SourceError",
    "StorageError",
    "TruncatedError",
    "WrongKeyError",
    "encrypt_file",
    "fetch_model",
    "iter_decrypted",
    "key_id",
    "load_key",
    "model_digest",
    "open_decrypted",
    "open_model_dir",
    "open_model_source",
    "parse_key",
    "read_header",
    "read_manifest",
    "resolve_model_dir",
    "rewrap",
    "sha256_file",
    "verify_file",
]
