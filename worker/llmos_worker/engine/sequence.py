"""Sequences and requests: the scheduler's unit of work and the user's unit of work.

A `Request` is what `add_request` receives; it owns `n` `Sequence`s (one until its prompt has been
prefilled, then forked into `n` that share the prompt's KV blocks). A `Sequence` is what the
scheduler and block manager see: its token ids (prompt then output), how many of them already have
KV in the cache (`num_computed_tokens`), its block table, and its priority/arrival for ordering.
Output-side state (detokenizer offsets, logprobs, finish reason) also lives here so that a
preempted sequence resumes exactly where it was.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmos_worker.engine.outputs import FinishReason, RequestMetrics, TokenLogprob
from llmos_worker.engine.params import SamplingParams

if TYPE_CHECKING:
    from llmos_worker.model.lora import LoRAAdapter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One completion stream. Hashable by identity (sequences are keys in scheduler maps)."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int = 16  # resolved: params.max_tokens or what max_model_len leaves
    priority: int = 0
    arrival_time: float = 0.0
    cache_salt: str = ""
    lora: LoRAAdapter | None = None  # the LoRA adapter it runs with; None: the base model
    lora_slot: int = -1  # the adapter's slot in the model while the sequence runs (pinned)
    # why: an un-forked request with n > 1 occupies n seats once it forks; admission counts them
    num_seats: int = 1
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache at admission
    block_hashes: list[bytes] = field(default_factory=list)  # hash chain of the full blocks
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # per-request seeded sampling
    matcher: Any = None  # llguidance matcher following the output, when the request has a guide
    # output side
    text: str = ""  # detokenized output, including a held-back partial stop string
    prefix_offset: int = 0  # detokenizer window, in output-token indices
    read_offset: int = 0
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def prefix_salt(self) -> str:
        """What salts its prefix-cache hashes: the tenant's salt and, with an adapter, the
        adapter's digest (the same tokens under another adapter have other K/V)."""
        if self.lora is None:
            return self.cache_salt
        return f"{self.cache_salt}\x00lora:{self.lora.digest}"

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token still needs computing (prompt or recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then earlier arrival, then creation."""
        return (self.priority, self.arrival_time, self.seq_id)

    def fork(self, index: int) -> Sequence:
        """A sibling sharing everything computed so far; the caller shares the KV blocks."""
        child = Sequence(
            request_id=self.request_id,
            index=index,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            params=self.params,
            max_tokens=self.max_tokens,
            priority=self.priority,
            arrival_time=self.arrival_time,
            cache_salt=self.cache_salt,
            lora=self.lora,
            lora_slot=self.lora_slot,  # why: a fork shares its parent's slot (pinned again)
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            block_hashes=list(self.block_hashes),
        )
        child.text = self.text
        child.prefix_offset = self.prefix_offset
        child.read_offset = self.read_offset
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        child.cumulative_logprob = self.cumulative_logprob
        child.matcher = None if self.matcher is None else self.matcher.deep_copy()
        return child


@dataclass(eq=False)
class Request:
    """A user request: the prompt, its parameters and its `n` sequences (one before forking)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False

    @property
    def finished(self) -> bool:
        return (self.forked or self.params.n == 1) and all(s.is_finished for s in self.seqs)
