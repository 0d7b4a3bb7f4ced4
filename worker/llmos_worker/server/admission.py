"""Who is calling and whether they may: API-key tenant, rate-limit reservation, priority floor.

A request reserves its worst case from the tenant's token buckets before it reaches the engine
(prompt tokens + `n` x `max_tokens` per prompt, or the rest of the context when `max_tokens` is
unset) and gives back what it did not use when it ends, so a key's budget is charged for tokens
actually processed. Over the limit the caller gets 429 with the buckets' `Retry-After`. The
pool's QuotaPolicy priority is a floor: a request may ask to be served later, never sooner.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmos_worker.engine.params import SamplingParams
from llmos_worker.server.ratelimit import RateLimiter

ANONYMOUS = "anonymous"  # the rate-limit key of callers without an API key


@dataclass(frozen=True)
class Caller:
    """The caller of one request: its tenant (prefix-cache salt) and presented API key."""

    tenant: str = ""
    api_key: str = ANONYMOUS


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
            self.limiter.refund(self.caller.api_key, self.reserved - used_tokens)


def admit(
    limiter: RateLimiter | None,
    caller: Caller,
    prompt_lengths: list[int],
    params: SamplingParams,
    *,
    max_model_len: int,
    priority: int,
) -> Admission:
    """Reserve the request's tokens (EngineOverloadedError -> 429 when over the limit)."""
    if limiter is None:
        return Admission(None, caller, 0, priority)
    reserved = 0
    for length in prompt_lengths:
        out = params.max_tokens if params.max_tokens is not None else max(0, max_model_len - length)
        reserved += length + params.n * out
    limiter.enforce(caller.api_key, reserved)
    return Admission(limiter, caller, reserved, limiter.engine_priority(priority))
