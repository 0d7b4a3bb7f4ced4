"""Who is calling, what they may send, and their share: API keys, tenant policies, RPM/TPM.

API keys use the worker's file format (`--api-keys-file`, the pool's mounted Secret):

    {"keys": [{"tenant": "team-a", "sha256": "<hex digest of the key>", "priority": -1}, ...]}

A presented bearer token is hashed and compared with every digest in constant time. With a key
file, a request without a known key is a 401; without one, callers are anonymous and each client
address is its own tenant (an IPv6 /64 counts as one address) for rate limits and fair share.

Tenant policies (`--tenants-file`) read the pool's rate-limit document that the operator renders
from the QuotaPolicies selecting the pool's namespace (the workers' `ratelimits.json`:
`perApiKey` rates, `priority`, `fairShareWeight`) as every tenant's default, and an optional
`tenants` map of per-tenant overrides:

    {"version": 1, "perApiKey": {"requestsPerMinute": 60, "tokensPerMinute": 20000},
     "priority": 0, "fairShareWeight": 1.0,
     "tenants": {"team-a": {"fairShareWeight": 3, "requestsPerMinute": 600}}}

Rates are token buckets holding a minute's worth. Tokens are charged at admission as an estimate
(a quarter of the prompt's UTF-8 bytes plus the request's max_tokens, 256 when unset); the
workers count exact tokens against their own limits. Both files are re-read when they change
(kubelet updates mounted Secrets and ConfigMaps in place), at most once per `reload_s`. A missing
tenants file means no policies until it appears (its ConfigMap is created after the pool); a
missing or unreadable key file is an error at start, so keys are never silently off.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmos_gateway.errors import ConfigError, HTTPError

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the metrics label of every unauthenticated caller
DEFAULT_MAX_TOKENS = 256
MAX_BUCKETS = 65536


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant may do: its fair-share weight, rates (None: unlimited), priority floor."""

    weight: float = 1.0
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    priority: int = 0


@dataclass(frozen=True)
class Caller:
    """The tenant a request is served for; `label` is what metrics and the access log show."""

    tenant: str
    label: str
    authenticated: bool
    priority_grant: int | None = None


def _positive_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be a positive integer or null")
    return value


def _policy(raw: Any, base: TenantPolicy, where: str) -> TenantPolicy:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be an object")
    policy = base
    if "fairShareWeight" in raw:
        weight = raw["fairShareWeight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ConfigError(f"{where}.fairShareWeight must be a number > 0")
        policy = replace(policy, weight=float(weight))
    if "requestsPerMinute" in raw:
        rpm = _positive_int(raw["requestsPerMinute"], f"{where}.requestsPerMinute")
        policy = replace(policy, requests_per_minute=rpm)
    if "tokensPerMinute" in raw:
        tpm = _positive_int(raw["tokensPerMinute"], f"{where}.tokensPerMinute")
        policy = replace(policy, tokens_per_minute=tpm)
    if "priority" in raw:
        priority = raw["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"{where}.priority must be an integer")
        policy = replace(policy, priority=priority)
    return policy


def parse_policies(document: Any, where: str) -> tuple[TenantPolicy, dict[str, TenantPolicy]]:
    """(the default policy, per-tenant policies) from a tenants/rate-limit document."""
    if not isinstance(document, Mapping):
        raise ConfigError(f"{where}: expected a JSON object")
    default = TenantPolicy()
    per_key = document.get("perApiKey")
    if per_key is not None:
        default = _policy(per_key, default, f"{where}: perApiKey")
    default = _policy(
        {k: document[k] for k in ("fairShareWeight", "priority") if k in document},
        default,
        where,
    )
    tenants = document.get("tenants") or {}
    if not isinstance(tenants, Mapping):
        raise ConfigError(f"{where}: tenants must be an object of tenant -> policy")
    per_tenant = {
        str(name): _policy(raw, default, f"{where}: tenants.{name}")
        for name, raw in tenants.items()
    }
    return default, per_tenant


def parse_keys(document: Any, where: str) -> list[tuple[bytes, str, int | None]]:
    """(digest, tenant, priority grant) per entry of an API key document."""
    keys = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(keys, list):
        raise ConfigError(f'{where}: expected {{"keys": [...]}}')
    out: list[tuple[bytes, str, int | None]] = []
    for i, entry in enumerate(keys):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: keys[{i}] must be an object")
        tenant, digest, grant = entry.get("tenant"), entry.get("sha256"), entry.get("priority")
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(f"{where}: keys[{i}].tenant must be a non-empty string")
        try:
            raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"{where}: keys[{i}].sha256 must be 64 hex digits")
        if grant is not None and (isinstance(grant, bool) or not isinstance(grant, int)):
            raise ConfigError(f"{where}: keys[{i}].priority must be an integer")
        out.append((raw, tenant, grant))
    return out


class _WatchedFile:
    """A JSON file re-parsed when its modification time or size changes."""

    def __init__(
        self,
        path: str,
        parse: Callable[[Any, str], Any],
        reload_s: float,
        *,
        missing: Any = None,
    ) -> None:
        """`missing`: the document to use while the file does not exist (None: an error)."""
        self.path = path
        self.parse = parse
        self.reload_s = reload_s
        self.missing = missing
        self._stamp = self._stat()
        self.value = parse(self._document(), path)  # why: a bad file at start is a config error
        self._checked = time.monotonic()

    def _document(self) -> Any:
        if self._stamp is None and self.missing is not None:
            return self.missing
        return self._read()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _read(self) -> Any:
        try:
            return json.loads(Path(self.path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc

    def current(self) -> Any:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return self.value
        self._checked = now
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.value = self.parse(self._document(), self.path)
                log.info("reloaded %s", self.path)
            except ConfigError as exc:  # why: a bad update keeps the last good settings
                log.warning("keeping the previous settings: %s", exc)
        return self.value


class _Bucket:
    __slots__ = ("level", "stamp")

    def __init__(self, level: float, stamp: float) -> None:
        self.level = level
        self.stamp = stamp


class RateLimiter:
    """Token buckets per (tenant, kind) holding a minute's worth, refilled continuously."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def _level(self, key: tuple[str, str], per_minute: int, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(float(per_minute), now)
        else:
            bucket.level = min(per_minute, bucket.level + (now - bucket.stamp) * per_minute / 60)
            bucket.stamp = now
        return bucket

    def _prune(self, now: float) -> None:
        # why: a flood of new callers must not grow the table; the oldest buckets go first
        oldest = sorted(self._buckets.items(), key=lambda kv: kv[1].stamp)
        for key, _ in oldest[: len(oldest) // 2]:
            del self._buckets[key]

    def admit(self, tenant: str, policy: TenantPolicy, tokens: int) -> None:
        """Charge one request and `tokens`, or raise a 429 saying when to retry."""
        now = self.clock()
        checks: list[tuple[_Bucket, float, int, str]] = []
        for kind, per_minute, cost in (
            ("requests", policy.requests_per_minute, 1),
            ("tokens", policy.tokens_per_minute, tokens),
        ):
            if per_minute is None:
                continue
            bucket = self._level((tenant, kind), per_minute, now)
            # why: a request larger than a whole minute's budget can pass once the bucket is full
            need = min(float(cost), float(per_minute))
            if bucket.level < need:
                wait = (need - bucket.level) * 60 / per_minute
                raise HTTPError(
                    429,
                    f"rate limit of {per_minute} {kind} per minute reached for this tenant",
                    code="rate_limit_exceeded",
                    retry_after_s=math.ceil(wait),
                )
            checks.append((bucket, need, per_minute, kind))
        for bucket, need, _, _ in checks:
            bucket.level -= need


def anonymous_tenant(client: str | None) -> str:
    """One tenant per client address; IPv6 callers per /64 (IPv4-mapped ones as IPv4)."""
    if not client:
        return "ip:unknown"
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return f"ip:{client[:64]}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"ip:{address}"


def estimate_tokens(body: Mapping[str, Any], prompt_text: str) -> int:
    """The tokens a request will use, as charged at admission (prompt bytes / 4 + max_tokens)."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        limit = DEFAULT_MAX_TOKENS
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 128 else 1
    prompt = math.ceil(len(prompt_text.encode("utf-8", "surrogatepass")) / 4)
    return prompt + limit * choices


class Tenants:
    """Authentication, tenant policies and rate limits, from the optional mounted files."""

    def __init__(
        self,
        *,
        api_keys_file: str | None = None,
        tenants_file: str | None = None,
        reload_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = _WatchedFile(api_keys_file, parse_keys, reload_s) if api_keys_file else None
        self._policies = (
            _WatchedFile(tenants_file, parse_policies, reload_s, missing={})
            if tenants_file
            else None
        )
        self.limiter = RateLimiter(clock)

    @property
    def requires_key(self) -> bool:
        return self._keys is not None

    def identify(self, authorization: str | None, client: str | None) -> Caller:
        """The caller; a 401 when keys are configured and none of them was presented."""
        if self._keys is None:
            return Caller(anonymous_tenant(client), ANONYMOUS, authenticated=False)
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        found: tuple[str, int | None] | None = None
        if scheme.lower() == "bearer" and token:
            presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
            for digest, tenant, grant in self._keys.current():  # why: no early exit
                if hmac.compare_digest(presented, digest):
                    found = (tenant, grant)
        if found is None:
            raise HTTPError(
                401,
                "a valid API key is required (Authorization: Bearer <key>)",
                code="invalid_api_key",
            )
        return Caller(found[0], found[0], authenticated=True, priority_grant=found[1])

    def policy(self, caller: Caller) -> TenantPolicy:
        if self._policies is None:
            return TenantPolicy()
        default: TenantPolicy
        per_tenant: dict[str, TenantPolicy]
        default, per_tenant = self._policies.current()
        if caller.authenticated:
            return per_tenant.get(caller.tenant, default)
        return default

    def priority(self, caller: Caller, policy: TenantPolicy, body: Mapping[str, Any]) -> int:
        """The request's priority (lower first): what it asks, never better than its floor
        (the key's grant, else the tenant policy's priority)."""
        asked = body.get("priority", 0)
        if isinstance(asked, bool) or not isinstance(asked, int):
            asked = 0
        floor = caller.priority_grant if caller.priority_grant is not None else policy.priority
        return max(asked, floor)
