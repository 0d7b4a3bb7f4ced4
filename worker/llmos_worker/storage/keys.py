"""Key-encryption keys (KEKs): reading them from a mounted Secret file and naming them.

A Secret's file may hold the 32 key bytes raw, or as text — 64 hex digits or standard base64 —
because `kubectl create secret --from-literal` makes text easy and raw bytes awkward. The key id is
a short HMAC of a fixed label under the key: it tells "encrypted under another key" apart from
"tampered" without revealing anything usable about the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

from llmos_worker.storage.errors import KeyFileError

KEY_BYTES = 32  # AES-256
_KEY_ID_LABEL = b"llmos-kek-id-v1"
KEY_ID_BYTES = 8


def parse_key(data: bytes, *, origin: str = "key") -> bytes:
    """The 32-byte key in `data` (raw, hex text or base64 text); `origin` names it in errors."""
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    raise KeyFileError(
        f"{origin} must hold a 256-bit key: 32 raw bytes, 64 hex digits or base64 of 32 bytes "
        f"(it holds {len(data)} bytes that are none of these)"
    )


def load_key(path: str | Path) -> bytes:
    """Read a KEK from a file (a mounted Secret key); `KeyFileError` if absent or malformed."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {str(path)!r}: {exc.strerror or exc}") from exc
    return parse_key(data, origin=f"key file {str(path)!r}")


def key_id(kek: bytes) -> bytes:
    """8 bytes identifying `kek`: HMAC-SHA256(kek, label), truncated."""
    return hmac.new(kek, _KEY_ID_LABEL, hashlib.sha256).digest()[:KEY_ID_BYTES]


__all__ = ["KEY_BYTES", "KEY_ID_BYTES", "key_id", "load_key", "parse_key"]
