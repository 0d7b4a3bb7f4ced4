"""OpenAI request bodies for `/v1/completions` and `/v1/chat/completions`, validated by pydantic.

Unknown fields are accepted and ignored, as vLLM does (client frameworks add `store`,
`metadata`, `service_tier`, `reasoning_effort`, ... as they please); each unknown name is logged
once at DEBUG. Fields this server knows but cannot honour (`audio`, `prediction`,
`web_search_options`, the legacy `functions` / `function_call`, non-text `modalities`, image
parts) are refused with a 400 that names them. Types are strict where OpenAI is strict: `n`
must be an integer, not `"2"`; `stream` a boolean, not `1`. Value ranges are checked once, by
`SamplingParams`, so the HTTP layer and the offline engine agree on what is valid. Beside OpenAI's
fields vLLM's extensions are accepted (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `priority`, `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar`, `structured_outputs`, ...), with vLLM's meanings.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llmos_worker.engine.guided import Guide
from llmos_worker.engine.params import MAX_LOGPROBS, SamplingParams
from llmos_worker.errors import InvalidRequestError

log = logging.getLogger(__name__)

# a prompt as the engine takes it: text, or token ids
EnginePrompt = str | list[int]

MAX_PROMPTS_PER_REQUEST = 64  # prompts in one /v1/completions batch
MAX_CHOICES_PER_REQUEST = 128  # prompts x n
MAX_MESSAGES = 512
MAX_OPENAI_COMPLETION_LOGPROBS = 5  # OpenAI's own limit for /v1/completions `logprobs`


MAX_LOGGED_UNKNOWN = 256
_logged_unknown: set[str] = set()

# fields of OpenAI's API this server cannot honour: a 400 naming them beats silently ignoring them
UNSUPPORTED = {
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "functions": "the legacy `functions` field is not supported; use `tools`",
    "function_call": "the legacy `function_call` field is not supported; use `tool_choice`",
}


class _Strict(BaseModel):
    """Strict types; unknown fields ignored (logged once per name at DEBUG)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _note_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {
                f.alias for f in cls.model_fields.values() if f.alias is not None
            }
            for name in data:
                if name in UNSUPPORTED:
                    raise InvalidRequestError(UNSUPPORTED[name], param=name, code="unsupported")
                if name not in known and len(_logged_unknown) < MAX_LOGGED_UNKNOWN:
                    key = f"{cls.__name__}.{name}"
                    if key not in _logged_unknown:
                        _logged_unknown.add(key)
                        log.debug("ignoring unknown request field %r of %s", name, cls.__name__)
        return data


class JsonSchemaFormat(_Strict):
    name: StrictStr = "response"
    description: StrictStr | None = None
    schema_: dict[str, Any] | StrictBool = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: one of a JSON schema, a regex, choices or a grammar."""

    json_: dict[str, Any] | StrictStr | StrictBool | None = Field(default=None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None


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
    logit_bias: dict[str, StrictInt | StrictFloat] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | StrictBool | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None

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

    def token_bias(self) -> dict[int, float]:
        """`logit_bias` with its keys (token ids as strings, as JSON needs) as ints."""
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                )
            bias[int(key)] = float(value)
        return bias

    def guide(self) -> Guide | None:
        """The output constraint the request asks for, if any (at most one)."""
        found: list[Guide] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(Guide.json_object("response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise InvalidRequestError(
                    "response_format.json_schema is required when type is json_schema",
                    param="response_format.json_schema",
                )
            found.append(Guide.json_schema(rf.json_schema.schema_, "response_format.json_schema"))
        so = self.structured_outputs
        candidates: list[tuple[Any, str, str]] = [
            (self.guided_json, "guided_json", "json"),
            (self.guided_regex, "guided_regex", "regex"),
            (self.guided_choice, "guided_choice", "choice"),
            (self.guided_grammar, "guided_grammar", "grammar"),
        ]
        if so is not None:
            candidates += [
                (so.json_, "structured_outputs.json", "json"),
                (so.regex, "structured_outputs.regex", "regex"),
                (so.choice, "structured_outputs.choice", "choice"),
                (so.grammar, "structured_outputs.grammar", "grammar"),
            ]
        for value, param, kind in candidates:
            if value is None:
                continue
            if kind == "json":
                found.append(
                    Guide.json_object(param) if value is True else Guide.json_schema(value, param)
                )
            elif kind == "regex":
                found.append(Guide.regex(value, param))
            elif kind == "choice":
                found.append(Guide.choice(value, param))
            else:
                found.append(Guide.lark(value, param))
        if len(found) > 1:
            raise InvalidRequestError(
                "at most one of response_format, guided_json, guided_regex, guided_choice, "
                f"guided_grammar and structured_outputs may be set; got {[g.param for g in found]}",
                param=found[1].param,
            )
        return found[0] if found else None

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
            logit_bias=self.token_bias(),
            guide=self.guide(),
        )


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

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
        n = max(self.n, self.best_of or 0)
        if len(prompts) * n > MAX_CHOICES_PER_REQUEST:
            raise InvalidRequestError(
                f"prompts x n must be at most {MAX_CHOICES_PER_REQUEST}, got {len(prompts)} x {n}",
                param="n" if n == self.n else "best_of",
            )
        return prompts

    @property
    def prompt_only(self) -> bool:
        """`echo` with `max_tokens: 0`: score the prompt, generate nothing (lm-eval-harness's
        log-likelihood requests)."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        """The engine's parameters; with `best_of`, `n` is `best_of` (the best `n` are kept)."""
        self.check_stream_options()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs"
            )
        best_of = self.best_of if self.best_of is not None else self.n
        if best_of < self.n:
            raise InvalidRequestError(
                f"best_of ({best_of}) must be at least n ({self.n})", param="best_of"
            )
        if best_of > self.n and self.stream:
            raise InvalidRequestError("best_of greater than n cannot be streamed", param="best_of")
        logprobs = self.logprobs
        if best_of > self.n and logprobs is None:
            logprobs = 0  # why: candidates are ranked by cumulative logprob
        params = self.sampling_params(
            max_tokens=1 if self.prompt_only else self.max_tokens, logprobs=logprobs
        )
        try:
            params.n = best_of
            params.__post_init__()
        except InvalidRequestError as exc:
            exc.param = "best_of"
            raise
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "text"):
            raise InvalidRequestError(
                f"content parts of type {data.get('type')!r} are not supported: this model "
                "takes text only",
                param="messages.content",
                code="unsupported",
            )
        return data


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr = "{}"  # a JSON object, as text


class ToolCall(_Strict):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # required, but null (or absent) for an assistant message that only made tool calls
    content: StrictStr | list[TextPart] | None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None  # assistant: the calls it made
    tool_call_id: StrictStr | None = None  # tool: which call this is the result of

    @model_validator(mode="before")
    @classmethod
    def _tool_calls_need_no_content(cls, data: Any) -> Any:
        # why: OpenAI lets an assistant message with tool_calls leave `content` out entirely
        if isinstance(data, dict) and data.get("tool_calls") and "content" not in data:
            return {**data, "content": None}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            if info.data.get("role") != "assistant":
                raise ValueError("content may be null only in an assistant message")
            return value
        if isinstance(value, str | list):
            return value
        raise ValueError("content must be a string or a list of text parts")

    @model_validator(mode="after")
    def _tool_calls_from_assistant(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def template_role(self) -> str:
        # why: chat templates of open models know "system", not OpenAI's newer "developer"
        return "system" if self.role == "developer" else self.role

    def template_message(self) -> dict[str, Any]:
        """The message as Hugging Face chat templates take it (tool-call arguments parsed)."""
        message: dict[str, Any] = {"role": self.template_role(), "content": self.text()}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except ValueError:
                    arguments = call.function.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
            message["tool_calls"] = calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(_Strict):
    name: StrictStr = Field(min_length=1, max_length=64)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    modalities: list[StrictStr] | None = None

    @field_validator("modalities")
    @classmethod
    def _text_out(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(m != "text" for m in value):
            raise ValueError("only the text modality is supported")
        return value

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names {choice.function.name!r}, which is not in tools"
                )
        elif choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        return self

    @field_validator("messages")
    @classmethod
    def _message_count(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if len(value) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} messages per request")
        return value

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]

    def active_tools(self) -> list[Tool]:
        """The tools the model is offered: none with tool_choice 'none'; only the named one."""
        if not self.tools or self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)

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
