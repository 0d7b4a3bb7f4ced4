"""One HTTP request's generation: its engine requests, its sink, and stream deltas.

A `Generation` submits every prompt of one HTTP request to the `AsyncEngine` under ids
`<response id>-<prompt index>`, with the caller's admission (priority, prefix-cache salt, and the
rate-limit reservation it settles when it ends), then yields coalesced updates: the newest
cumulative output of each engine request that moved. Closing it aborts whatever has not
finished, which is how a client disconnect frees KV blocks. `DeltaTracker` turns cumulative text
into stream deltas and holds back the tail that could still become a stop string or is an
incomplete UTF-8 character (`U+FFFD`), so a stream never shows text that the final response
would not contain.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmos_worker.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from llmos_worker.engine.params import SamplingParams
from llmos_worker.errors import WorkerError
from llmos_worker.server.admission import Admission
from llmos_worker.server.async_engine import AsyncEngine, Sink
from llmos_worker.server.errors import to_http_error
from llmos_worker.server.protocol import EnginePrompt
from llmos_worker.server.response import Usage

# token id -> its text, for logprobs
TokenText = Callable[[int], str]


class Generation:
    """The engine requests of one HTTP request (one per prompt, each with `n` completions)."""

    def __init__(
        self,
        front: AsyncEngine,
        response_id: str,
        prompts: list[EnginePrompt],
        params: SamplingParams,
        admission: Admission,
    ) -> None:
        self.front = front
        self.admission = admission
        self.params = params
        self.prompts = prompts
        self.request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        self.sink: Sink = asyncio.Queue()
        self.latest: dict[str, RequestOutput] = {}
        self._unfinished = set(self.request_ids)

    async def start(self) -> None:
        try:
            await self._add()
        except BaseException:
            self.admission.settle(0)  # nothing was processed
            raise

    async def _add(self) -> None:
        await self.front.add(
            self.request_ids,
            self.prompts,
            self.params,
            self.sink,
            priority=self.admission.priority,
            cache_salt=self.admission.caller.tenant,
        )

    async def updates(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Yield `[(prompt index, newest output)]` for the engine requests that moved."""
        index = {rid: i for i, rid in enumerate(self.request_ids)}
        while self._unfinished:
            items = [await self.sink.get()]
            while not self.sink.empty():
                items.append(self.sink.get_nowait())
            changed: dict[str, RequestOutput] = {}
            for rid, item in items:
                if isinstance(item, BaseException):
                    raise item
                changed[rid] = item
                self.latest[rid] = item
                if item.finished:
                    self._unfinished.discard(rid)
            yield [(index[rid], out) for rid, out in changed.items()]

    async def collect(self) -> list[RequestOutput]:
        """Wait for every engine request to finish; outputs in prompt order."""
        async for _ in self.updates():
            pass
        return [self.latest[rid] for rid in self.request_ids]

    def close(self) -> None:
        """Abort what has not finished (client gone or error); forget the rest."""
        self.front.abort(sorted(self._unfinished))
        self.front.release(self.request_ids)
        self._unfinished.clear()
        self.admission.settle(self.usage().total_tokens)

    def usage(self) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in self.latest.values())
        completion = sum(len(c.token_ids) for o in self.latest.values() for c in o.outputs)
        return Usage.of(prompt, completion)


async def check_guide(front: AsyncEngine, params: SamplingParams) -> None:
    """Refuse an unusable grammar with a 400 before anything is queued (compiled off the event
    loop; the engine's cache then holds it)."""
    if params.guide is not None:
        await asyncio.to_thread(front.engine.guides.check, params.guide)


async def until_disconnected(request: Request) -> None:
    """Return when the client of a non-streaming request goes away (its body already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_or_abort(request: Request, generation: Generation) -> list[RequestOutput] | None:
    """Collect a non-streaming generation; None (and the request aborted) if the client left."""
    collect = asyncio.ensure_future(generation.collect())
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()
        generation.close()
    if collect.done() and not collect.cancelled():
        return collect.result()  # re-raises an engine error
    return None


@dataclass
class DeltaTracker:
    """What of one completion's cumulative output the client has already been sent."""

    stop: list[str]
    sent_chars: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    finish_sent: bool = False

    def advance(self, out: CompletionOutput) -> tuple[str, list[TokenLogprob]]:
        """The new text and the logprobs of the new tokens since the last call."""
        text = out.text
        safe = len(text)
        if not out.finished:
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1  # why: an incomplete multi-byte character decodes to U+FFFD for now
            safe -= _stop_prefix_len(text[:safe], self.stop)
        safe = max(safe, self.sent_chars)
        delta = text[self.sent_chars : safe]
        self.sent_chars = safe
        new_logprobs = list(out.logprobs[self.sent_tokens :]) if out.logprobs else []
        self.sent_tokens = len(out.token_ids)
        return delta, new_logprobs


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class TrackerSet:
    """Delta trackers of every choice of one HTTP request, keyed by choice index."""

    stop: list[str]
    trackers: dict[int, DeltaTracker] = field(default_factory=dict)

    def get(self, choice: int) -> DeltaTracker:
        if choice not in self.trackers:
            self.trackers[choice] = DeltaTracker(self.stop)
        return self.trackers[choice]


def token_text_fn(decode: Callable[..., str]) -> TokenText:
    """A memoised `token id -> text` for logprobs (special tokens kept visible)."""
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = decode([token_id], skip_special_tokens=False)
        return cache[token_id]

    return text


def finish_reason(out: CompletionOutput) -> str | None:
    # why: OpenAI has no "abort"; an aborted choice ended early like a length cut
    return "length" if out.finish_reason == "abort" else out.finish_reason


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage_event(
    chunk: Callable[..., BaseModel],
    generation: Generation,
    response_id: str,
    created: int,
    model: str,
) -> str:
    """The closing event of a stream that asked for usage (`stream_options.include_usage`): a
    chunk of the endpoint's schema with no choices and the whole request's token counts."""
    return sse(
        chunk(id=response_id, created=created, model=model, choices=[], usage=generation.usage())
    )


def sse_error(exc: WorkerError) -> str:
    """An error met after the stream began, as one SSE event in OpenAI's error shape."""
    err = to_http_error(exc)
    return sse(
        {
            "error": {
                "message": err.message,
                "type": "server_error",
                "param": err.param,
                "code": err.code,
            }
        }
    )


@dataclass
class ChoiceDelta:
    """What one choice has new for the client in one stream chunk."""

    index: int  # the choice index the response shows
    tracker: DeltaTracker
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    stop_reason: int | str | None


async def stream_events(
    generation: Generation,
    *,
    index_of: Callable[[int, int], int],
    render: Callable[[list[ChoiceDelta]], str],
    opening: str | None = None,
    closing: Callable[[], str] | None = None,
) -> AsyncIterator[str]:
    """The SSE events of a streamed generation, for either endpoint's chunk schema.

    `opening` goes first; then, per coalesced update, `render` gets each choice with something
    to send (one chunk per choice, as OpenAI streams `n > 1`): new text, new logprobs or the
    finish, which is sent once, with the choice's index `index_of(prompt index, completion
    index)`; `closing()` (the usage chunk) comes after the
    last. An engine error after the stream began becomes one in-stream error event; the
    generation is closed however the stream ends, and `[DONE]` ends it.
    """
    trackers = TrackerSet(generation.params.stop)
    try:
        if opening is not None:
            yield opening
        async for updates in generation.updates():
            deltas = []
            for p, out in updates:
                for c in out.outputs:
                    index = index_of(p, c.index)
                    tracker = trackers.get(index)
                    if tracker.finish_sent:
                        continue
                    text, new_logprobs = tracker.advance(c)
                    reason = finish_reason(c)
                    if not text and reason is None and not new_logprobs:
                        continue
                    tracker.finish_sent = reason is not None
                    deltas.append(
                        ChoiceDelta(index, tracker, text, new_logprobs, reason, c.stop_reason)
                    )
            for delta in deltas:  # why: one choice per chunk, as OpenAI streams n > 1
                event = render([delta])
                if event:  # a renderer may hold everything back (a tool call in progress)
                    yield event
        if closing is not None:
            yield closing()
    except WorkerError as exc:
        yield sse_error(exc)
    finally:
        generation.close()
    yield SSE_DONE


class GenerationStream(StreamingResponse):
    """An SSE response that aborts its generation however the response ends.

    why: if the client leaves before the body iterator starts, the iterator's own `finally`
    never runs; this one always does.
    """

    def __init__(self, content: AsyncIterator[str], generation: Generation) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close()
