"""What the engine hands back each step: cumulative outputs per request (vLLM's shape).

Outputs are cumulative (the whole text so far); the server derives stream deltas from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class TokenLogprob:
    """Log-probability of the chosen token and of the `k` most likely alternatives."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)  # token id -> logprob, most likely first


@dataclass
class CompletionOutput:
    """One of the `n` completions of a request, cumulative."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic() seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0


@dataclass
class RequestOutput:
    """State of one request after a step. `finished` once every completion has finished."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # with `prompt_logprobs`: one per prompt token scored so far (the first has none)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # with `SamplingParams.embed`, once finished: the prompt's normalized mean-pooled embedding
    embedding: list[float] | None = None


@dataclass
class EngineStats:
    """Point-in-time counters and gauges, read by the server's Prometheus collector."""

    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float  # fraction of KV blocks held by live sequences, 0..1
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # cumulative, in tokens
    prefix_cache_hits: int  # cumulative, in tokens
    num_preemptions: int  # cumulative
    prompt_tokens: int  # cumulative: whole prompts of requests whose prefill finished
    generation_tokens: int  # cumulative generated tokens
    cached_prompt_tokens: int = 0  # cumulative: of `prompt_tokens`, found in the prefix cache
    computed_prompt_tokens: int = 0  # cumulative: prompt tokens the model ran (recompute too)
