"""Who is calling and whether they may: API-key tenant, rate-limit reservation, priority floor.

A request reserves its worst case from the caller's token buckets before it reaches the engine
(prompt tokens + `n` x `max_tokens` per prompt, or the rest of the context when `max_tokens` is
unset) and gives back what it did not use when it ends, so a budget is charged for tokens
actually processed. Over the limit the caller gets 429 with the buckets' `Retry-After`.

Buckets are keyed by who the caller provably is: the tenant of an authenticated API key, or,
without an API key file, the client's IP address (IPv6: its /64). A bearer token the server
cannot check names nobody, so sending a fresh random token per request does not get a fresh
bucket.

Priority (lower is served first) has a floor: the best of the pool's QuotaPolicy priority (the
rate-limit file) and the caller's grant (`priority` on its API key entry; callers without one get
the default 0). A request may ask to be served later than its floor, never sooner.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from llmos_worker.engine.params import SamplingParams
from llmos_worker.server.ratelimit import RateLimiter

ANONYMOUS = "anonymous"  # the rate-limit key of callers nothing is known about
DEFAULT_PRIORITY = 0  # what a request asks for when it says nothing, and the floor without a grant


@dataclass(frozen=True)
class Caller:
    """The caller of one request: its tenant (prefix-cache salt), the key of its rate-limit
    buckets (`tenant:<name>` or `ip:<address>`) and the best priority it was granted."""

    tenant: str = ""
    rate_key: str = ANONYMOUS
    priority_grant: int = DEFAULT_PRIORITY

    @classmethod
    def authenticated(cls, tenant: str, priority_grant: int | None = None) -> Caller:
        grant = DEFAULT_PRIORITY if priority_grant is None else priority_grant
        return cls(tenant=tenant, rate_key=f"tenant:{tenant}", priority_grant=grant)

    @classmethod
    def anonymous(cls, client_host: str | None) -> Caller:
        return cls(rate_key=f"ip:{client_network(client_host)}" if client_host else ANONYMOUS)


def client_network(host: str) -> str:
    """The bucket of an unauthenticated client: its IPv4 address, or the /64 of its IPv6 one
    (one subscriber's allocation: a host picking fresh addresses in it shares one bucket);
    an IPv4-mapped IPv6 address counts as the IPv4 address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # why: not an IP (a unix socket path, a test client name): taken as is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class Admission:
    """A request's rate-limit reservation; `settle` gives back the unused part, once."""

    limiter: RateLimiter | None
    caller: Caller
    reserved: int
    priority: int
    settled: bool = False

    def settle(self, used_tokens: int) -> None:
        if self.settled:
            return
        self.settled = True
        if self.limiter is not None and used_tokens < self.reserved:
            self.limiter.refund(self.caller.rate_key, self.reserved - used_tokens)


def admit(
    limiter: RateLimiter | None,
    caller: Caller,
    prompt_lengths: list[int],
    params: SamplingParams,
    *,
    max_model_len: int,
    priority: int,
) -> Admission:
    """Reserve the request's tokens (RateLimitExceededError -> 429 when over the limit)."""
    floor = caller.priority_grant
    if limiter is None:
        return Admission(None, caller, 0, max(priority, floor))
    reserved = 0
    for length in prompt_lengths:
        out = params.max_tokens if params.max_tokens is not None else max(0, max_model_len - length)
        reserved += length + params.n * out
    limiter.enforce(caller.rate_key, reserved)
    return Admission(limiter, caller, reserved, limiter.engine_priority(max(priority, floor)))
