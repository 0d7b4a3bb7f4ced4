"""Sampling parameters of one request, validated on construction.

Field names and meanings follow vLLM's `SamplingParams` (and so OpenAI's request fields).
Validation raises `InvalidRequestError` naming the field, never `AssertionError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmos_worker.errors import InvalidRequestError

if TYPE_CHECKING:
    from llmos_worker.engine.guided import Guide

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows


@dataclass
class SamplingParams:
    """How to pick tokens for one request. `temperature == 0` means greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token + top-k alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to logit
    guide: Guide | None = None  # a grammar the output must follow (llmos_worker.engine.guided)
    prompt_logprobs: int | None = None  # logprobs of the prompt's tokens (+ top-k), e.g. echo
    lora_name: str | None = None  # the LoRA adapter to run with (the request's `model`)
    # run the prompt only and return its embedding (`RequestOutput.embedding`: the last hidden
    # state, after the final norm, mean-pooled over every prompt token and L2-normalized);
    # nothing is sampled and the other fields are ignored
    embed: bool = False

    def __post_init__(self) -> None:
        def bad(param: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(message, param=param, code="invalid_value")

        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"n must be between 1 and {MAX_N}, got {self.n}")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise bad("top_k", f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "presence_penalty must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "frequency_penalty must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "repetition_penalty must be in (0, 2]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        too_many = self.max_tokens is not None and self.min_tokens > self.max_tokens
        if self.min_tokens < 0 or too_many:
            raise bad("min_tokens", "min_tokens must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_LEN:
                raise bad("stop", f"stop strings must be 1..{MAX_STOP_STRING_LEN} characters")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "stop_token_ids must be non-negative")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed", "seed is out of range")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"at most {MAX_LOGIT_BIAS} logit_bias entries are allowed")
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise bad("logit_bias", f"logit_bias keys must be token ids, got {token}")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"logit_bias values must be in [-100, 100], got {bias}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise bad("prompt_logprobs", f"prompt_logprobs must be in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
