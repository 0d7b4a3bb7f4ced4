"""Streaming HTTP downloads with progress in the logs.

The body is streamed piece by piece into a sink (`FileSink.write`), never held whole in memory.
Progress is logged every `progress_bytes` (and at the end) with size, percentage when the server
sent a Content-Length, and throughput. The HTTP transport and the clock are parameters so tests
can inject them (a mock transport, a fake clock) without monkey-patching.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from llmos_worker.storage.errors import FetchError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DEFAULT_PROGRESS_BYTES = 64 * MIB


def download(
    url: str,
    sink: Callable[[bytes], None],
    *,
    transport: httpx.BaseTransport | None = None,
    timeout_s: float = 60.0,
    progress_bytes: int = DEFAULT_PROGRESS_BYTES,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """GET `url`, feed its body to `sink`; return the byte count. `FetchError` on failure."""
    shown = _redact(url)
    started = clock()
    received = 0
    total: int | None = None
    next_report = progress_bytes
    try:
        with (
            httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=True) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise FetchError(
                    f"GET {shown} answered HTTP {response.status_code} {response.reason_phrase}"
                )
            total = _content_length(response)
            log.info("downloading %s (%s)", shown, _size(total) if total else "size unknown")
            for piece in response.iter_bytes():
                sink(piece)
                received += len(piece)
                if received >= next_report:
                    _report(shown, received, total, clock() - started)
                    next_report = (received // progress_bytes + 1) * progress_bytes
    except httpx.HTTPError as exc:
        raise FetchError(f"GET {shown} failed: {type(exc).__name__}: {exc}") from exc
    if total is not None and received != total:
        raise FetchError(f"GET {shown}: got {received} bytes of the {total} announced")
    _report(shown, received, total, clock() - started)
    return received


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None or "content-encoding" in response.headers:
        return None  # why: with compression the header counts encoded bytes, not the body's
    try:
        return int(value)
    except ValueError:
        return None


def _report(url: str, received: int, total: int | None, elapsed_s: float) -> None:
    rate = received / MIB / elapsed_s if elapsed_s > 0 else 0.0
    if total:
        log.info(
            "%s: %s of %s (%.0f%%) at %.1f MiB/s",
            url,
            _size(received),
            _size(total),
            100.0 * received / total,
            rate,
        )
    else:
        log.info("%s: %s at %.1f MiB/s", url, _size(received), rate)


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _redact(url: str) -> str:
    """The URL without credentials or query string (pre-signed URLs carry secrets there)."""
    parts = httpx.URL(url)
    return str(parts.copy_with(username=None, password=None, query=None, fragment=None))


__all__ = ["DEFAULT_PROGRESS_BYTES", "download"]
