"""Tenant rate limits: token buckets per API key and per namespace, from a mounted JSON file.

The operator renders the pool's limits (the strictest of the QuotaPolicies selecting its
namespace) into a ConfigMap mounted at the path in env `LLMOS_RATE_LIMITS_FILE`:

    {"version": 1, "namespace": "team-a", "pool": "chat", "policies": ["gpu-standard"],
     "perNamespace": {"requestsPerMinute": 600, "tokensPerMinute": 100000} | null,
     "perApiKey": {"requestsPerMinute": 60, "tokensPerMinute": 20000} | null,
     "priority": 0, "fairShareWeight": 1.0}

Each limit is a token bucket holding one minute's allowance and refilling continuously
(`per_minute / 60` per second). A request takes 1 from the request buckets and its token
estimate (prompt + max output tokens) from the token buckets of its API key and of the
namespace (every request this worker serves is in the pool's namespace); it is admitted only if
all its buckets can pay, otherwise nothing is taken and the caller gets the seconds until they
can (HTTP 429 + Retry-After, code `rate_limit_exceeded`). The key of a caller's buckets is
its authenticated tenant, or its client IP when it has no API key (see `admission`): each
distinct key costs a few buckets (full, idle ones are dropped past `MAX_TRACKED_KEYS`). A
request larger than a whole bucket is admitted when that bucket is full and leaves it in debt,
so it is slow but never impossible. Unused reserved tokens can be
given back with `refund`. Keys are held only as SHA-256 digests. The file is re-read when its
mtime changes (kubelet updates ConfigMap mounts in place); buckets keep their levels across
reloads. `priority` is the best engine priority the pool's requests may have (lower is served
first): `engine_priority` never lets a request ask for better.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos_worker.errors import RateLimitExceededError, WorkerError

ENV_VAR = "LLMOS_RATE_LIMITS_FILE"
MAX_TRACKED_KEYS = 10_000  # why: bound memory (see `RateLimiter._prune`)


class RateLimitFileError(WorkerError):
    """The rate-limit file is unreadable or malformed; the message names the field."""


def _per_minute(raw: Any, path: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise RateLimitFileError(f"{path} must be a positive integer, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Rate:
    """Requests and tokens per minute; None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @classmethod
    def from_document(cls, raw: Any, path: str) -> Rate:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise RateLimitFileError(f"{path} must be an object or null")
        return cls(
            _per_minute(raw.get("requestsPerMinute"), f"{path}.requestsPerMinute"),
            _per_minute(raw.get("tokensPerMinute"), f"{path}.tokensPerMinute"),
        )


@dataclass(frozen=True)
class RateLimits:
    """The parsed rate-limit document."""

    per_namespace: Rate = Rate()
    per_api_key: Rate = Rate()
    priority: int = 0
    namespace: str = ""

    @classmethod
    def from_document(cls, doc: Any) -> RateLimits:
        if not isinstance(doc, Mapping):
            raise RateLimitFileError("the rate-limit document must be a JSON object")
        if doc.get("version", 1) != 1:
            raise RateLimitFileError(f"version must be 1, got {doc.get('version')!r}")
        priority = doc.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise RateLimitFileError(f"priority must be an integer, got {priority!r}")
        return cls(
            per_namespace=Rate.from_document(doc.get("perNamespace"), "perNamespace"),
            per_api_key=Rate.from_document(doc.get("perApiKey"), "perApiKey"),
            priority=priority,
            namespace=str(doc.get("namespace", "")),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> RateLimits:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RateLimitFileError(f"cannot read rate-limit file {path}: {exc}") from exc
        return cls.from_document(doc)


class TokenBucket:
    """`capacity` units, refilled at `capacity / 60` per second, starting full."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.stamp = now

    def resize(self, per_minute: int) -> None:
        """A new limit; the current level is kept, clipped to the new capacity."""
        self.capacity = float(per_minute)
        self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)  # why: a clock that steps back never drains
        self.level = min(self.capacity, self.level + elapsed * self.capacity / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` can be taken (0.0 now); call `refill` first."""
        need = min(amount, self.capacity)  # why: oversized asks wait for a full bucket only
        if self.level >= need:
            return 0.0
        return (need - self.level) * 60.0 / self.capacity

    def take(self, amount: float) -> None:
        self.level -= amount  # may go negative: an oversized request's debt

    @property
    def full(self) -> bool:
        return self.level >= self.capacity


class RateLimiter:
    """Token buckets per API key and per namespace; `check` admits or says how long to wait."""

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        path: str | Path | None = None,
        reload_interval_s: float = 5.0,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        # (scope, digest, "requests"|"tokens") -> bucket; scope is "key" or "namespace"
        self._buckets: dict[tuple[str, str, str], TokenBucket] = {}
        self._path = Path(path) if path is not None else None
        self._mtime = _mtime(self._path) if self._path is not None else 0
        self._reload_interval_s = reload_interval_s
        self._next_reload = clock() + reload_interval_s

    @classmethod
    def from_file(
        cls, path: str | Path, *, clock: Callable[[], float] = time.monotonic
    ) -> RateLimiter:
        """Limits from `path`, re-read when it changes; a file not there (yet) means no limits
        until it appears (the ConfigMap mount is optional), a malformed one is an error."""
        limits = RateLimits.from_file(path) if Path(path).exists() else RateLimits()
        return cls(limits, clock=clock, path=path)

    @property
    def limits(self) -> RateLimits:
        return self._limits

    def check(self, key: str, tokens: int) -> float | None:
        """Take one request and `tokens` tokens for `key`; None if admitted, else the seconds
        to wait (nothing is taken then)."""
        if tokens < 0:
            raise ValueError("tokens must not be negative")
        self._maybe_reload()
        with self._lock:
            now = self._clock()
            digest = hashlib.sha256(key.encode()).hexdigest()
            wanted: list[tuple[TokenBucket, int]] = []
            for scope, who, rate in (
                ("key", digest, self._limits.per_api_key),
                ("namespace", "", self._limits.per_namespace),
            ):
                for unit, per_minute, amount in (
                    ("requests", rate.requests_per_minute, 1),
                    ("tokens", rate.tokens_per_minute, tokens),
                ):
                    if per_minute is not None:
                        bucket = self._bucket((scope, who, unit), per_minute, now)
                        bucket.refill(now)
                        wanted.append((bucket, amount))
            wait = max((bucket.wait_for(amount) for bucket, amount in wanted), default=0.0)
            if wait > 0.0:
                return wait
            for bucket, amount in wanted:
                bucket.take(amount)
            self._prune(now)
            return None

    def enforce(self, key: str, tokens: int) -> None:
        """`check`, raising RateLimitExceededError (HTTP 429 + Retry-After) when over the limit."""
        wait = self.check(key, tokens)
        if wait is not None:
            raise RateLimitExceededError(
                f"rate limit exceeded for this caller or namespace "
                f"{self._limits.namespace or '(unnamed)'}; retry in {math.ceil(wait)} s",
                retry_after_s=wait,
            )

    def refund(self, key: str, tokens: int) -> None:
        """Give back reserved tokens a request did not use (capped at each bucket's capacity)."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        with self._lock:
            for name in (("key", digest, "tokens"), ("namespace", "", "tokens")):
                bucket = self._buckets.get(name)
                if bucket is not None:
                    bucket.level = min(bucket.capacity, bucket.level + max(0, tokens))

    def engine_priority(self, requested: int = 0) -> int:
        """The engine priority for a request: never better (lower) than the policy's."""
        return max(requested, self._limits.priority)

    def reload(self, limits: RateLimits) -> None:
        """Apply new limits; existing buckets keep their levels, removed limits drop theirs."""
        with self._lock:
            self._limits = limits
            now = self._clock()
            for (scope, who, unit), bucket in list(self._buckets.items()):
                bucket.refill(now)  # why: time before the change refills at the old rate
                rate = limits.per_api_key if scope == "key" else limits.per_namespace
                per_minute = (
                    rate.requests_per_minute if unit == "requests" else rate.tokens_per_minute
                )
                if per_minute is None:
                    del self._buckets[(scope, who, unit)]
                else:
                    bucket.resize(per_minute)

    def _maybe_reload(self) -> None:
        if self._path is None or self._clock() < self._next_reload:
            return
        self._next_reload = self._clock() + self._reload_interval_s
        try:
            mtime = _mtime(self._path)
            if mtime != self._mtime:
                self.reload(RateLimits.from_file(self._path))
                self._mtime = mtime
        except (OSError, RateLimitFileError):
            pass  # why: a half-written update keeps the last good limits; next tick retries

    def _bucket(self, name: tuple[str, str, str], per_minute: int, now: float) -> TokenBucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = TokenBucket(per_minute, now)
        return bucket

    def _prune(self, now: float) -> None:
        """Bound the tracked buckets. Once they exceed the limit by an eighth, full ones are
        dropped (a full bucket is indistinguishable from a fresh one) and, if still over, the
        oldest created: one scan per limit/8 new buckets, so a flood of new callers costs
        amortised constant time per request, never a scan each."""
        if len(self._buckets) <= MAX_TRACKED_KEYS + MAX_TRACKED_KEYS // 8:
            return
        for name, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.full:
                del self._buckets[name]
        excess = len(self._buckets) - MAX_TRACKED_KEYS
        if excess > 0:
            # why: dicts keep insertion order, so the first keys are the oldest buckets
            for name in list(itertools.islice(self._buckets, excess)):
                del self._buckets[name]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def limiter_from_env(
    environ: Mapping[str, str] = os.environ, *, clock: Callable[[], float] = time.monotonic
) -> RateLimiter | None:
    """The limiter for `LLMOS_RATE_LIMITS_FILE`, or None when unset (no limits)."""
    path = environ.get(ENV_VAR)
    if not path:
        return None
    return RateLimiter.from_file(path, clock=clock)
