"""Forwarding one request: pick, send, retry before the first byte, then stream through.

The request body is forwarded byte for byte. The response is committed to the client only when
the upstream's status and first body bytes arrived, so a replica that refuses the connection,
answers 502/503/504, or dies before its first byte costs the client nothing: the request goes to
another replica (at most `max_retries` more, never one already tried), the failed one is ejected
for a while. From the first byte on, chunks are relayed as they arrive (`aiter_raw`: no
re-chunking, no buffering), so SSE streams pass through token by token. When the client goes away
mid-stream, starlette cancels the relay and the upstream response is closed, which the worker
sees as a disconnect and aborts the generation. Upstream failures the gateway cannot hide become
OpenAI-shaped 502 (unreachable) or 504 (timeout) errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmos_gateway.errors import HTTPError
from llmos_gateway.replicas import Replica
from llmos_gateway.upstream import (
    ConnectTimedOut,
    ReadTimedOut,
    Upstream,
    UpstreamError,
    UpstreamResponse,
)

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass
class Attempt:
    """What happened to one request on its way through (for metrics and the access log)."""

    replica: Replica | None = None
    attempts: int = 0
    first_byte_s: float | None = None
    retried: list[str] = field(default_factory=list)


class RelayResponse(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (done, cut or never started)."""

    def __init__(
        self, *args: object, on_close: Callable[[bool], Awaitable[None]], **kw: object
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.on_close = on_close
        self.completed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close(self.completed)


def forward_headers(headers: list[tuple[bytes, bytes]], client: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        name = k.decode("latin-1").lower()
        if name not in HOP_BY_HOP:
            out[name] = v.decode("latin-1")
    if client:
        prior = out.get("x-forwarded-for")
        out["x-forwarded-for"] = f"{prior}, {client}" if prior else client
    return out


async def send_with_failover(
    upstream: Upstream,
    *,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    pick: Callable[[set[str]], Replica | None],
    on_failure: Callable[[Replica, str], None],
    max_retries: int,
    attempt: Attempt,
) -> tuple[UpstreamResponse, bytes, AsyncIterator[bytes]]:
    """The upstream response, its first chunk and the rest, from the first replica that answers.

    `pick(excluded_names)` chooses a replica (and counts it in flight); `on_failure` is told
    about each failed try (and releases it). Raises `HTTPError` when every try failed."""
    tried: set[str] = set()
    last_error: HTTPError | None = None
    last_response: tuple[UpstreamResponse, bytes] | None = None
    while attempt.attempts <= max_retries:
        replica = pick(tried)
        if replica is None:
            break
        tried.add(replica.name)
        attempt.attempts += 1
        attempt.replica = replica
        started = time.monotonic()
        reason: str
        try:
            response = await upstream.open(method, replica.url + path, headers, body)
        except ConnectTimedOut:
            reason = "connect_timeout"
            last_error = HTTPError(
                504,
                "the pool's replica did not accept the connection in time",
                code="upstream_timeout",
            )
        except ReadTimedOut as exc:  # why: a slow generation is not retried: double the work
            on_failure(replica, "read_timeout")
            raise HTTPError(
                504, "the pool's replica did not answer in time", code="upstream_timeout"
            ) from exc
        except UpstreamError as exc:
            reason = "connect_error"
            log.warning("replica %s unreachable: %s", replica.name, type(exc).__name__)
            last_error = HTTPError(
                502, "no replica of the pool could be reached", code="upstream_unavailable"
            )
        else:
            stream = response.aiter_raw()
            try:
                first = await anext(stream, b"")
            except ReadTimedOut as exc:
                await response.aclose()
                on_failure(replica, "read_timeout")
                raise HTTPError(
                    504, "the pool's replica did not answer in time", code="upstream_timeout"
                ) from exc
            except UpstreamError:
                await response.aclose()
                reason = "died_before_first_byte"
                log.warning("replica %s failed before its first byte", replica.name)
                last_error = HTTPError(
                    502, "the pool's replica failed before answering", code="upstream_failed"
                )
            else:
                attempt.first_byte_s = time.monotonic() - started
                if response.status_code not in RETRY_STATUSES or attempt.attempts > max_retries:
                    return response, first, stream
                rest = b"".join([chunk async for chunk in _drain(stream)])
                await response.aclose()
                reason = f"status_{response.status_code}"
                last_response = (response, first + rest)
        attempt.retried.append(reason)
        on_failure(replica, reason)
    if last_response is not None:
        response, content = last_response

        async def replay() -> AsyncIterator[bytes]:
            return
            yield b""  # pragma: no cover

        return response, content, replay()
    raise last_error or HTTPError(
        503, "the pool has no ready replica", code="no_replica", retry_after_s=1
    )


async def _drain(stream: AsyncIterator[bytes], limit: int = 64 * 1024) -> AsyncIterator[bytes]:
    """The rest of a (small) error body, at most `limit` bytes."""
    size = 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                return
            yield chunk
    except UpstreamError:
        return
