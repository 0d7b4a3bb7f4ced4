"""OpenAI request bodies for `/v1/completions` and `/v1/chat/completions`, validated by pydantic.

Unknown fields are refused (`extra="forbid"`) and types are strict where OpenAI is strict: `n`
must be an integer, not `"2"`; `stream` a boolean, not `1`. Value ranges are checked once, by
`SamplingParams`, so the HTTP layer and the offline engine agree on what is valid. Beside OpenAI's
fields a few vLLM extensions are accepted (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `priority`, ...), with vLLM's meanings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from llmos_worker.engine.params import MAX_LOGPROBS, SamplingParams
from llmos_worker.errors import InvalidRequestError

# a prompt as the engine takes it: text, or token ids
EnginePrompt = str | list[int]

MAX_PROMPTS_PER_REQUEST = 64  # prompts in one /v1/completions batch
MAX_CHOICES_PER_REQUEST = 128  # prompts x n
MAX_MESSAGES = 512
MAX_OPENAI_COMPLETION_LOGPROBS = 5  # OpenAI's own limit for /v1/completions `logprobs`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage in every chunk


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: StrictStr
    n: StrictInt = 1
    temperature: float | None = None  # None: OpenAI's default 1.0
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: StrictInt = 0  # vLLM: lower is served first
    user: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # why: OpenAI's optional fields are nullable and many clients send `null` for "not set"
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("stop must be a string or a list of strings")

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's view of this request; value errors name the request's field."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # why: a plain union would report one error per member; one clear message is better
        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(type(t) is int for t in v)

        if isinstance(value, str) or ids(value):
            return value
        if isinstance(value, list) and (
            all(isinstance(p, str) for p in value) or all(ids(p) for p in value)
        ):
            return value
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists"
        )

    def prompts(self) -> list[EnginePrompt]:
        p = self.prompt
        if isinstance(p, str):
            prompts: list[EnginePrompt] = [p]
        elif p and all(isinstance(t, int) for t in p):
            prompts = [[t for t in p if isinstance(t, int)]]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if not prompts:
            raise InvalidRequestError("prompt must not be an empty list", param="prompt")
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            raise InvalidRequestError(
                f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}",
                param="prompt",
            )
        if len(prompts) * self.n > MAX_CHOICES_PER_REQUEST:
            raise InvalidRequestError(
                f"prompts x n must be at most {MAX_CHOICES_PER_REQUEST}, "
                f"got {len(prompts)} x {self.n}",
                param="n",
            )
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        self.check_stream_options()
        if self.echo:
            raise InvalidRequestError("echo is not supported", param="echo", code="unsupported")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix", code="unsupported")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs"
            )
        return self.sampling_params(max_tokens=self.max_tokens, logprobs=self.logprobs)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if isinstance(value, str | list):
            return value
        raise ValueError("content must be a string or a list of text parts")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        # why: chat templates of open models know "system", not OpenAI's newer "developer"
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True

    @field_validator("messages")
    @classmethod
    def _message_count(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages per request")
        return value

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.template_role(), "content": m.text()} for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        self.check_stream_options()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise InvalidRequestError(
                    "top_logprobs requires logprobs to be true", param="top_logprobs"
                )
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                    param="top_logprobs",
                )
        max_tokens = self.max_completion_tokens
        param = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, param = self.max_tokens, "max_tokens"
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self.sampling_params(max_tokens=max_tokens, logprobs=logprobs)
        except InvalidRequestError as exc:
            if exc.param == "max_tokens":
                exc.param = param
            if exc.param == "logprobs":
                exc.param = "top_logprobs"
            raise
