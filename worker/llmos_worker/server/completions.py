"""`POST /v1/completions`: text in, text out; streaming or not; one choice per prompt x n.

Choice `index` is `prompt_index * n + completion_index`, as in OpenAI's and vLLM's batches.
Logprobs use the legacy completions shape (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), with offsets counted in characters of the choice's text. `echo` puts the prompt
in front of each choice's text and, with `logprobs`, the prompt tokens' logprobs in front of the
generated ones (the first prompt token has none: `null`), which is what log-likelihood scoring
reads; `echo` with `max_tokens: 0` scores the prompt and generates nothing. `best_of` runs that
many candidates and returns the `n` with the highest cumulative logprob (not streamable, as in
OpenAI). `suffix` needs the model's fill-in-the-middle tokens (`<fim_prefix>`, `<fim_suffix>`,
`<fim_middle>`); a model without them answers 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmos_worker.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from llmos_worker.errors import InvalidRequestError
from llmos_worker.server.adapters import resolve_model
from llmos_worker.server.admission import Caller, admit
from llmos_worker.server.generation import (
    ChoiceDelta,
    DeltaTracker,
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
from llmos_worker.server.protocol import CompletionRequest, EnginePrompt
from llmos_worker.server.response import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
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


def prompt_logprobs(
    prompt_ids: list[int],
    scores: list[TokenLogprob | None] | None,
    token_text: TokenText,
) -> CompletionLogprobs:
    """Legacy logprobs of the prompt's tokens (`null` for the first, which nothing predicts)."""
    result = CompletionLogprobs()
    offset = 0
    for i, token in enumerate(prompt_ids):
        entry = scores[i] if scores is not None and i < len(scores) else None
        text = token_text(token)
        result.tokens.append(text)
        result.token_logprobs.append(None if entry is None else entry.logprob)
        result.top_logprobs.append(
            None if entry is None else {token_text(t): lp for t, lp in entry.top.items()}
        )
        result.text_offset.append(offset)
        offset += len(text)
    return result


def joined(first: CompletionLogprobs, second: CompletionLogprobs, shift: int) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + [o + shift for o in second.text_offset],
    )


FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def fill_in_the_middle(state: ServerState, prompts: list[EnginePrompt], suffix: str) -> list[int]:
    """The FIM prompt `<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>` as token ids."""
    vocab = state.tokenizer.hf.get_vocab()
    if not all(t in vocab for t in FIM):
        raise InvalidRequestError(
            "suffix needs fill-in-the-middle tokens, which this model does not have",
            param="suffix",
            code="unsupported",
        )
    if len(prompts) != 1 or not isinstance(prompts[0], str):
        raise InvalidRequestError("suffix takes one text prompt", param="suffix")
    encode = state.tokenizer.encode
    pre, suf, mid = (vocab[t] for t in FIM)
    return [pre, *encode(prompts[0]), suf, *encode(suffix), mid]


def best_of(candidates: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The `n` candidates with the highest cumulative logprob, in that order."""
    if len(candidates) == n:
        return candidates
    ranked = sorted(candidates, key=lambda c: c.cumulative_logprob or float("-inf"), reverse=True)
    return ranked[:n]


async def create_completion(
    state: ServerState, body: object, request: Request, caller: Caller
) -> Response:
    req = CompletionRequest.model_validate(body)
    front = state.serving_front()
    lora_name = resolve_model(state, req.model)  # 404 unless the base model or an adapter
    params = req.to_sampling_params()
    params.lora_name = lora_name
    await check_guide(front, params)
    prompts = req.prompts()
    if req.suffix:
        prompts = [fill_in_the_middle(state, prompts, req.suffix)]
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
        stream_opts = req.stream_options
        return GenerationStream(
            _stream(
                state,
                generation,
                response_id,
                created,
                req,
                include_usage=stream_opts is not None and stream_opts.include_usage,
                continuous=stream_opts is not None and stream_opts.continuous_usage_stats,
            ),
            generation,
        )
    outputs = await collect_or_abort(request, generation)
    if outputs is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    choices = []
    for p, out in enumerate(outputs):
        for i, c in enumerate(best_of(out.outputs, req.n)):
            choices.append(_choice(state, req, p * req.n + i, out, c))
    usage = generation.usage()
    if req.prompt_only:
        usage = Usage.of(usage.prompt_tokens, 0)
    body_out = CompletionResponse(
        id=response_id,
        created=created,
        model=req.model,  # the base model or the adapter asked for
        choices=choices,
        usage=usage,
    )
    return JSONResponse(body_out.model_dump())


def _echo_text(state: ServerState, req: CompletionRequest, out: RequestOutput) -> str:
    """The prompt as the client sent it (token-id prompts decoded)."""
    original = req.prompts()[int(out.request_id.rsplit("-", 1)[1])]
    if isinstance(original, str):
        return original
    return str(state.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False))


def _choice(
    state: ServerState, req: CompletionRequest, index: int, out: RequestOutput, c: CompletionOutput
) -> CompletionChoice:
    text = "" if req.prompt_only else c.text
    logprobs = None
    if req.logprobs is not None:
        gen = [] if req.prompt_only else (c.logprobs or [])
        logprobs = completion_logprobs(gen, state.token_text)
    if req.echo:
        prompt = _echo_text(state, req, out)
        if logprobs is not None:
            scored = prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs, state.token_text)
            logprobs = joined(scored, logprobs, len(prompt))
        text = prompt + text
    return CompletionChoice(
        index=index,
        text=text,
        logprobs=logprobs,
        finish_reason="length" if req.prompt_only else finish_reason(c),
        stop_reason=c.stop_reason,
    )


def _stream(
    state: ServerState,
    generation: Generation,
    response_id: str,
    created: int,
    req: CompletionRequest,
    *,
    include_usage: bool,
    continuous: bool,
) -> AsyncIterator[str]:
    n = generation.params.n
    want_logprobs = req.logprobs is not None
    echoed: set[int] = set()

    def render(deltas: list[ChoiceDelta]) -> str:
        choices = []
        for d in deltas:
            text = "" if req.prompt_only else d.text
            logprobs = None
            if want_logprobs:
                gen = [] if req.prompt_only else d.logprobs
                logprobs = completion_logprobs(gen, state.token_text, d.tracker)
            if req.echo and d.index not in echoed:  # why: the prompt goes first, once
                echoed.add(d.index)
                out = generation.latest[generation.request_ids[d.index // n]]
                prompt = _echo_text(state, req, out)
                if logprobs is not None:
                    scored = prompt_logprobs(
                        out.prompt_token_ids, out.prompt_logprobs, state.token_text
                    )
                    logprobs = joined(scored, logprobs, len(prompt))
                text = prompt + text
            choices.append(
                CompletionChoice(
                    index=d.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason="length"
                    if req.prompt_only and d.finish_reason
                    else d.finish_reason,
                    stop_reason=d.stop_reason,
                )
            )
        data = CompletionResponse(
            id=response_id, created=created, model=req.model, choices=choices
        ).model_dump()
        if continuous and include_usage:  # vLLM's continuous_usage_stats
            data["usage"] = generation.usage().model_dump()
        elif not include_usage:  # why: as OpenAI, `usage` appears only when asked for
            del data["usage"]
        return sse(data)

    return stream_events(
        generation,
        index_of=lambda prompt, completion: prompt * n + completion,
        render=render,
        closing=(
            partial(usage_event, CompletionResponse, generation, response_id, created, req.model)
            if include_usage
            else None
        ),
    )
