"""`POST /v1/chat/completions`: messages through the model's chat template, then generation.

The prompt is the tokenizer's chat template applied to the messages with the assistant's
generation prompt appended (token ids, so the engine never re-tokenises rendered special tokens).
A stream sends, per choice, a first chunk with `role`, content deltas, and a chunk carrying
`finish_reason`; with `stream_options.include_usage` every chunk has `"usage": null` and a final
chunk with no choices carries the usage, as OpenAI does.
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
from llmos_worker.server.admission import Caller, admit
from llmos_worker.server.errors import HTTPError
from llmos_worker.server.generation import (
    ChoiceDelta,
    Generation,
    GenerationStream,
    TokenText,
    collect_or_abort,
    finish_reason,
    sse,
    stream_events,
    usage_event,
)
from llmos_worker.server.protocol import ChatCompletionRequest
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


def chat_prompt(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    tokenizer = state.tokenizer
    if not tokenizer.has_chat_template:
        raise InvalidRequestError(
            "this model has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    try:
        ids: list[int] = tokenizer.apply_chat_template(
            req.template_messages(), add_generation_prompt=req.add_generation_prompt
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
    if req.model != state.model_name:
        raise HTTPError(
            404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found"
        )
    params = req.to_sampling_params()
    prompt = chat_prompt(state, req)
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
        return GenerationStream(
            _stream(state, generation, response_id, created, include_usage), generation
        )
    outputs = await collect_or_abort(request, generation)
    if outputs is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=(
                chat_logprobs(c.logprobs or [], state.token_text)
                if params.logprobs is not None
                else None
            ),
            finish_reason=finish_reason(c),
            stop_reason=c.stop_reason,
        )
        for c in outputs[0].outputs
    ]
    body_out = ChatCompletionResponse(
        id=response_id,
        created=created,
        model=state.model_name,
        choices=choices,
        usage=generation.usage(),
    )
    return JSONResponse(body_out.model_dump())


def _stream(
    state: ServerState, generation: Generation, response_id: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    want_logprobs = generation.params.logprobs is not None

    def chunk(choices: list[ChatChunkChoice]) -> str:
        data = ChatCompletionChunk(
            id=response_id, created=created, model=state.model_name, choices=choices
        ).model_dump()
        if not include_usage:
            del data["usage"]
        for choice in data["choices"]:  # why: OpenAI's deltas carry only the keys that changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return sse(data)

    def render(deltas: list[ChoiceDelta]) -> str:
        return chunk(
            [
                ChatChunkChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text) if d.text else DeltaMessage(),
                    logprobs=(
                        chat_logprobs(d.logprobs, state.token_text) if want_logprobs else None
                    ),
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                )
                for d in deltas
            ]
        )

    opening = chunk(
        [
            ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            for i in range(generation.params.n)
        ]
    )
    return stream_events(
        generation,
        index_of=lambda _prompt, completion: completion,  # one prompt per chat request
        render=render,
        opening=opening,
        closing=(
            partial(
                usage_event, ChatCompletionChunk, generation, response_id, created, state.model_name
            )
            if include_usage
            else None
        ),
    )
