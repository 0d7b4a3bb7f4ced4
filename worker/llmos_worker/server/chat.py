"""`POST /v1/chat/completions`: messages through the model's chat template, then generation.

The prompt is the tokenizer's chat template applied to the messages with the assistant's
generation prompt appended (token ids, so the engine never re-tokenises rendered special tokens).
A stream sends, per choice, a first chunk with `role`, content deltas, and a chunk carrying
`finish_reason`; with `stream_options.include_usage` every chunk has `"usage": null` and a final
chunk with no choices carries the usage, as OpenAI does. Tools are rendered and tool calls parsed
as `llmos_worker.server.tools` describes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

import jinja2
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos_worker.engine.outputs import TokenLogprob
from llmos_worker.errors import InvalidRequestError
from llmos_worker.server.adapters import resolve_model
from llmos_worker.server.admission import Caller, admit
from llmos_worker.server.generation import (
    ChoiceDelta,
    Generation,
    GenerationStream,
    TokenText,
    check_guide,
    collect_or_abort,
    finish_reason,
    sse,
    stream_events,
    usage_event,
)
from llmos_worker.server.protocol import ChatCompletionRequest, Tool
from llmos_worker.server.response import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    TokenLogprobEntry,
    TopLogprob,
)
from llmos_worker.server.state import ServerState
from llmos_worker.server.tools import (
    ToolStreamParser,
    fallback_messages,
    forced_call_guide,
    parse_tool_calls,
    template_knows_tools,
    tool_dicts,
)


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> ChatLogprobs:
    content = []
    for entry in entries:
        text = token_text(entry.token_id)
        top = [
            TopLogprob(token=token_text(t), logprob=lp, bytes=list(token_text(t).encode()))
            for t, lp in entry.top.items()
        ]
        content.append(
            TokenLogprobEntry(
                token=text, logprob=entry.logprob, bytes=list(text.encode()), top_logprobs=top
            )
        )
    return ChatLogprobs(content=content)


def chat_prompt(state: ServerState, req: ChatCompletionRequest, tools: list[Tool]) -> list[int]:
    """The prompt's token ids: the template's own tools support, else the fallback format."""
    tokenizer = state.tokenizer
    if not tokenizer.has_chat_template:
        raise InvalidRequestError(
            "this model has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    own = template_knows_tools(getattr(tokenizer.hf, "chat_template", None))
    messages = req.template_messages() if own else fallback_messages(req, tools)
    try:
        ids: list[int] = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=req.add_generation_prompt,
            tools=tool_dicts(tools) if own and tools else None,
        )
    except jinja2.TemplateError as exc:  # why: templates reject e.g. non-alternating roles
        raise InvalidRequestError(
            f"the chat template rejected the messages: {exc}",
            param="messages",
            code="invalid_messages",
        ) from exc
    return list(ids)


async def create_chat_completion(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = ChatCompletionRequest.model_validate(body)
    front = state.serving_front()
    lora_name = resolve_model(state, req.model)  # 404 unless the base model or an adapter
    params = req.to_sampling_params()
    params.lora_name = lora_name
    tools = req.active_tools()
    forced = forced_call_guide(req, tools)
    if forced is not None:
        if params.guide is not None:
            raise InvalidRequestError(
                f"{params.guide.param} cannot be combined with tool_choice "
                f"{req.tool_choice if isinstance(req.tool_choice, str) else 'naming a function'}",
                param="tool_choice",
            )
        params.guide = forced
    await check_guide(front, params)
    prompt = chat_prompt(state, req, tools)
    admission = admit(
        state.limiter,
        caller,
        [len(prompt)],
        params,
        max_model_len=front.engine.max_model_len,
        priority=req.priority,
    )
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = Generation(front, response_id, [prompt], params, admission)
    await generation.start()
    created = int(time.time())
    if req.stream:
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        continuous = req.stream_options is not None and req.stream_options.continuous_usage_stats
        return GenerationStream(
            _stream(state, generation, response_id, created, include_usage, req, tools, continuous),
            generation,
        )
    outputs = await collect_or_abort(request, generation)
    if outputs is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    choices = []
    for c in outputs[0].outputs:
        content: str | None = c.text
        calls: list[dict[str, object]] | None = None
        reason = finish_reason(c)
        if tools:
            content, parsed = parse_tool_calls(c.text, tools, parallel=req.parallel_tool_calls)
            if parsed:
                calls, reason = [p.as_dict() for p in parsed], "tool_calls"
        choices.append(
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=content, tool_calls=calls),
                logprobs=(
                    chat_logprobs(c.logprobs or [], state.token_text)
                    if params.logprobs is not None
                    else None
                ),
                finish_reason=reason,
                stop_reason=c.stop_reason,
            )
        )
    body_out = ChatCompletionResponse(
        id=response_id,
        created=created,
        model=req.model,  # the base model or the adapter asked for
        choices=choices,
        usage=generation.usage(),
    )
    return JSONResponse(body_out.model_dump())


def _stream(
    state: ServerState,
    generation: Generation,
    response_id: str,
    created: int,
    include_usage: bool,
    req: ChatCompletionRequest,
    tools: list[Tool],
    continuous: bool = False,
) -> AsyncIterator[str]:
    want_logprobs = generation.params.logprobs is not None
    names = {t.function.name for t in tools}
    parsers: dict[int, ToolStreamParser] = {}

    def chunk(choices: list[ChatChunkChoice]) -> str:
        data = ChatCompletionChunk(
            id=response_id, created=created, model=req.model, choices=choices
        ).model_dump()
        if continuous and include_usage and choices:  # vLLM's continuous_usage_stats
            data["usage"] = generation.usage().model_dump()
        elif not include_usage:
            del data["usage"]
        for choice in data["choices"]:  # why: OpenAI's deltas carry only the keys that changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(data)

    def render(deltas: list[ChoiceDelta]) -> str:
        choices = []
        for d in deltas:
            text, calls, reason = d.text, None, d.finish_reason
            if tools:
                parser = parsers.setdefault(
                    d.index, ToolStreamParser(names, parallel=req.parallel_tool_calls)
                )
                text, calls = parser.feed(d.text, final=reason is not None)
                if reason is not None and parser.calls:
                    reason = "tool_calls"
            if not text and not calls and reason is None and not d.logprobs:
                continue  # why: held back (a tool-call block is being generated)
            choices.append(
                ChatChunkChoice(
                    index=d.index,
                    delta=DeltaMessage(content=text or None, tool_calls=calls or None),
                    logprobs=(
                        chat_logprobs(d.logprobs, state.token_text) if want_logprobs else None
                    ),
                    finish_reason=reason,
                    stop_reason=d.stop_reason,
                )
            )
        return chunk(choices) if choices else ""

    opening = "".join(
        chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        for i in range(generation.params.n)
    )
    return stream_events(
        generation,
        index_of=lambda _prompt, completion: completion,  # one prompt per chat request
        render=render,
        opening=opening,
        closing=(
            partial(usage_event, ChatCompletionChunk, generation, response_id, created, req.model)
            if include_usage
            else None
        ),
    )
