"""API keys: bearer tokens mapped to tenants, stored only as SHA-256 digests.

The pool's Secret is mounted as a JSON file (`--api-keys-file`, env `LLMOS_API_KEYS_FILE`):

    {"keys": [{"tenant": "team-a", "sha256": "<hex digest of the key>", "priority": -1}, ...]}

so neither the Secret nor the worker's memory holds a usable key. A presented token is hashed and
compared with every stored digest using `hmac.compare_digest` (no early exit), so response time does
not reveal how much of a digest matched. The tenant of the matching key scopes rate limits and salts
the prefix cache, so one tenant cannot probe another's cached prompts through timing. The optional
`priority` is the best (lowest) engine priority the key's requests may ask for; without it they
may ask for the default 0 or later, never sooner.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from llmos_worker.errors import WorkerError


class ApiKeyFileError(WorkerError):
    """The API key file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant their key belongs to, and the priority it was granted."""

    tenant: str
    priority: int | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyAuth:
    """Authenticates `Authorization: Bearer <key>` headers against stored digests."""

    def __init__(self, digests: dict[str, str], priorities: dict[str, int] | None = None) -> None:
        # hex digest -> tenant; digests are normalised to bytes once for constant-time comparison
        grants = priorities or {}
        self._entries = [
            (bytes.fromhex(d), Principal(t, grants.get(d))) for d, t in digests.items()
        ]

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeyAuth:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ApiKeyFileError(f"cannot read API key file {path}: {exc}") from exc
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise ApiKeyFileError(f'API key file {path}: expected {{"keys": [...]}}')
        digests: dict[str, str] = {}
        priorities: dict[str, int] = {}
        for i, entry in enumerate(keys):
            if not isinstance(entry, dict):
                raise ApiKeyFileError(f"API key file {path}: keys[{i}] must be an object")
            tenant, digest = entry.get("tenant"), entry.get("sha256")
            if not isinstance(tenant, str) or not tenant:
                raise ApiKeyFileError(f"API key file {path}: keys[{i}].tenant must be a string")
            if not isinstance(digest, str) or len(digest) != 64:
                raise ApiKeyFileError(
                    f"API key file {path}: keys[{i}].sha256 must be 64 hex digits"
                )
            try:
                bytes.fromhex(digest)
            except ValueError as exc:
                raise ApiKeyFileError(f"API key file {path}: keys[{i}].sha256 is not hex") from exc
            digests[digest.lower()] = tenant
            grant = entry.get("priority")
            if grant is not None:
                if isinstance(grant, bool) or not isinstance(grant, int):
                    raise ApiKeyFileError(
                        f"API key file {path}: keys[{i}].priority must be an integer"
                    )
                priorities[digest.lower()] = grant
        return cls(digests, priorities)

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller's principal, or None when the header is absent, malformed or unknown."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        presented = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for digest, principal in self._entries:  # why: compare every entry, no early exit
            if hmac.compare_digest(presented, digest):
                found = principal
        return found
