"""The async front of the engine: a step loop in its own thread, one queue per HTTP request.

The engine is not thread-safe, so exactly one thread (the engine thread) ever touches it. The
event loop talks to that thread through a thread-safe inbox (`queue.Queue` of add / abort / stop
commands); the engine thread answers through `loop.call_soon_threadsafe`: the acceptance or
refusal of each `add` (an `asyncio.Future`, so a prompt that is too long becomes a 400 before any
byte of a stream is sent) and, after every step, one callback that puts each request's newest
cumulative `RequestOutput` into the `asyncio.Queue` (the sink) of the HTTP request that owns it.
Sinks are unbounded but consumers only ever need the latest output per request (outputs are
cumulative), so a slow client never blocks the step loop and never falls behind by more than one
drain. A request whose client went away is aborted (its blocks freed). If the engine thread
dies, every open request gets `EngineDeadError` and the front reports not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmos_worker.engine.outputs import EngineStats, RequestOutput
from llmos_worker.engine.params import SamplingParams
from llmos_worker.errors import EngineDeadError, EngineOverloadedError
from llmos_worker.server.metrics import ServerMetrics
from llmos_worker.server.protocol import EnginePrompt

log = logging.getLogger(__name__)

# what a sink receives: (engine request id, its newest output) or (request id, the error ending it)
SinkItem = tuple[str, RequestOutput | BaseException]
Sink = asyncio.Queue[SinkItem]


class Engine(Protocol):
    """The part of `LLMEngine` the front uses (engine/engine.py)."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # model/tokenizer.py Tokenizer
    guides: Any  # engine/guided.py GuideCache: compiled grammars

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str = "",
    ) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def has_unfinished(self) -> bool: ...
    def stats(self) -> EngineStats: ...


@dataclass
class _Add:
    request_id: str
    prompt: EnginePrompt
    params: SamplingParams
    priority: int
    cache_salt: str
    accepted: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


@dataclass
class _Live:
    """Loop-side record of one engine request."""

    sink: Sink
    started: bool = False  # produced its first output (no longer counted as waiting)


class AsyncEngine:
    """Runs `engine.step()` in a dedicated thread and streams outputs to per-request sinks."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_waiting_requests: int = 512,
        metrics_factory: Callable[[Callable[[], EngineStats | None]], ServerMetrics] | None = None,
        idle_wait_s: float = 0.5,
    ) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self._idle_wait_s = idle_wait_s
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # loop side only
        self._pending: set[asyncio.Future[None]] = set()  # adds not yet answered
        self._num_waiting = 0  # loop side: live requests without any output yet
        self._stats: EngineStats | None = None  # written by the engine thread, read anywhere
        self._dead: BaseException | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.metrics = metrics_factory(self.snapshot) if metrics_factory else None

    # ---- loop side -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="llmos-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_inflight(self) -> int:
        return len(self._live)

    def snapshot(self) -> EngineStats | None:
        return self._stats

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")
        if self._stopping or not self.running:
            raise EngineDeadError("the engine is shutting down")

    async def add(
        self,
        request_ids: list[str],
        prompts: list[EnginePrompt],
        params: SamplingParams,
        sink: Sink,
        *,
        priority: int = 0,
        cache_salt: str = "",
    ) -> None:
        """Submit one HTTP request's prompts; returns once the engine accepted all of them.

        Raises `EngineOverloadedError` when the waiting queue is full, the engine's
        `InvalidRequestError` for a prompt it refuses (then none of the prompts stays queued).
        """
        self._check_usable()
        if self._num_waiting + len(prompts) > self.max_waiting_requests:
            raise EngineOverloadedError(
                f"{self._num_waiting} requests are waiting (limit {self.max_waiting_requests})",
                retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        for rid, prompt in zip(request_ids, prompts, strict=True):
            self._live[rid] = _Live(sink)
            self._num_waiting += 1
            fut: asyncio.Future[None] = loop.create_future()
            futures.append(fut)
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            self._inbox.put(_Add(rid, prompt, params, priority, cache_salt, fut))
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except BaseException:  # why: a caller cancelled while waiting must not leave orphans
            self.abort(request_ids)
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.abort(request_ids)
            raise errors[0]

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (idempotent): the engine frees their blocks, no more output arrives."""
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is None:
                continue
            if not live.started:
                self._num_waiting -= 1
            self._inbox.put(_Abort(rid))

    def release(self, request_ids: list[str]) -> None:
        """Forget finished requests (the engine already dropped them)."""
        for rid in request_ids:
            self._live.pop(rid, None)

    def _dispatch(self, batch: list[tuple[str, RequestOutput]]) -> None:
        for rid, out in batch:
            live = self._live.get(rid)
            if live is None:
                continue  # aborted meanwhile
            if not live.started:
                live.started = True
                self._num_waiting -= 1
            live.sink.put_nowait((rid, out))

    def _resolve(self, fut: asyncio.Future[None], error: BaseException | None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    def _fail_all(self, error: BaseException) -> None:
        for fut in list(self._pending):
            self._resolve(fut, error)
        for rid, live in list(self._live.items()):
            live.sink.put_nowait((rid, error))
        self._live.clear()
        self._num_waiting = 0

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; open requests end with `EngineDeadError`."""
        self._stopping = True
        self._inbox.put(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
        self._fail_all(EngineDeadError("the server is shutting down"))

    # ---- engine thread ---------------------------------------------------------------------

    def _call_loop(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # why: the loop may already be closed at exit
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        live: set[str] = set()  # engine-thread view of unfinished request ids
        try:
            while True:
                commands = self._next_commands(block=not self.engine.has_unfinished())
                for cmd in commands:
                    if isinstance(cmd, _Stop):
                        for rid in live:
                            self.engine.abort(rid)
                        return
                    if isinstance(cmd, _Add):
                        self._handle_add(cmd, live)
                    elif cmd.request_id in live:
                        live.discard(cmd.request_id)
                        self.engine.abort(cmd.request_id)
                        if self.metrics is not None:
                            self.metrics.observe_abort(cmd.request_id)
                if self.engine.has_unfinished():
                    batch = [(o.request_id, _copy(o)) for o in self.engine.step()]
                    for rid, out in batch:
                        if self.metrics is not None:
                            self.metrics.observe_step(out)
                        if out.finished:
                            live.discard(rid)
                    if batch:
                        self._call_loop(self._dispatch, batch)
                self._stats = self.engine.stats()
        except BaseException as exc:
            log.exception("the engine thread failed; no further requests can be served")
            self._dead = exc
            self._call_loop(self._fail_all, EngineDeadError(f"the engine stopped: {exc!r}"))

    def _handle_add(self, cmd: _Add, live: set[str]) -> None:
        try:
            self.engine.add_request(
                cmd.request_id,
                cmd.prompt,
                cmd.params,
                priority=cmd.priority,
                cache_salt=cmd.cache_salt,
            )
        except Exception as exc:  # why: refusals travel back to the HTTP handler as they are
            self._call_loop(self._resolve, cmd.accepted, exc)
            return
        live.add(cmd.request_id)
        self._call_loop(self._resolve, cmd.accepted, None)

    def _next_commands(self, *, block: bool) -> list[_Add | _Abort | _Stop]:
        commands: list[_Add | _Abort | _Stop] = []
        if block:
            try:
                commands.append(self._inbox.get(timeout=self._idle_wait_s))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands


def _copy(out: RequestOutput) -> RequestOutput:
    """A snapshot the event loop may read while the engine keeps mutating its own objects."""
    outputs = []
    for c in out.outputs:
        d = copy.copy(c)
        d.token_ids = list(c.token_ids)
        if c.logprobs is not None:
            d.logprobs = list(c.logprobs)
        outputs.append(d)
    return RequestOutput(
        request_id=out.request_id,
        prompt_token_ids=out.prompt_token_ids,
        outputs=outputs,
        finished=out.finished,
        metrics=copy.copy(out.metrics),
        prompt_logprobs=None if out.prompt_logprobs is None else list(out.prompt_logprobs),
        embedding=out.embedding,
    )
