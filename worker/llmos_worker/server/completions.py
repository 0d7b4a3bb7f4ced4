"""`POST /v1/completions`: text in, text out; streaming or not; one choice per prompt x n.

Choice `index` is `prompt_index * n + completion_index`, as in OpenAI's and vLLM's batches.
Logprobs use the legacy completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), with offsets counted in characters of the generated text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos_worker.engine.outputs import TokenLogprob
from llmos_worker.server.admission import Caller, admit
from llmos_worker.server.errors import HTTPError
from llmos_worker.server.generation import (
    ChoiceDelta,
    DeltaTracker,
    Generation,
    GenerationStream,
    TokenText,
    collect_or_abort,
    finish_reason,
    sse,
    stream_events,
    usage_event,
)
from llmos_worker.server.protocol import CompletionRequest
from llmos_worker.server.response import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
)
from llmos_worker.server.state import ServerState


def completion_logprobs(
    entries: list[TokenLogprob], token_text: TokenText, tracker: DeltaTracker | None = None
) -> CompletionLogprobs:
    """Legacy logprobs of `entries`; offsets continue from `tracker` when streaming."""
    result = CompletionLogprobs()
    offset = tracker.text_offset if tracker is not None else 0
    for entry in entries:
        text = token_text(entry.token_id)
        result.tokens.append(text)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({token_text(t): lp for t, lp in entry.top.items()})
        result.text_offset.append(offset)
        offset += len(text)
    if tracker is not None:
        tracker.text_offset = offset
    return result


async def create_completion(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = CompletionRequest.model_validate(body)
    front = state.serving_front()
    if req.model != state.model_name:
        raise HTTPError(
            404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found"
        )
    params = req.to_sampling_params()
    prompts = req.prompts()
    lengths = []
    if state.limiter is not None:  # why: token counts only matter for the token buckets
        encode = state.tokenizer.encode
        lengths = [len(p) if isinstance(p, list) else len(encode(p, True)) for p in prompts]
    admission = admit(
        state.limiter,
        caller,
        lengths,
        params,
        max_model_len=front.engine.max_model_len,
        priority=req.priority,
    )
    response_id = f"cmpl-{uuid.uuid4().hex}"
    generation = Generation(front, response_id, prompts, params, admission)
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
    choices = []
    for p, out in enumerate(outputs):
        for c in out.outputs:
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(c.logprobs or [], state.token_text)
            choices.append(
                CompletionChoice(
                    index=p * params.n + c.index,
                    text=c.text,
                    logprobs=logprobs,
                    finish_reason=finish_reason(c),
                    stop_reason=c.stop_reason,
                )
            )
    body_out = CompletionResponse(
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
    n = generation.params.n
    want_logprobs = generation.params.logprobs is not None

    def render(deltas: list[ChoiceDelta]) -> str:
        choices = [
            CompletionChoice(
                index=d.index,
                text=d.text,
                logprobs=(
                    completion_logprobs(d.logprobs, state.token_text, d.tracker)
                    if want_logprobs
                    else None
                ),
                finish_reason=d.finish_reason,
                stop_reason=d.stop_reason,
            )
            for d in deltas
        ]
        data = CompletionResponse(
            id=response_id, created=created, model=state.model_name, choices=choices
        ).model_dump()
        if not include_usage:  # why: as OpenAI, `usage` appears only when asked for
            del data["usage"]
        return sse(data)

    return stream_events(
        generation,
        index_of=lambda prompt, completion: prompt * n + completion,
        render=render,
        closing=(
            partial(
                usage_event, CompletionResponse, generation, response_id, created, state.model_name
            )
            if include_usage
            else None
        ),
    )
