"""The gateway's client to its replicas: open a request, read status, headers and raw body chunks.

The proxy hop is the gateway's hottest path. aiohttp's client (a C HTTP parser, native asyncio,
its own keep-alive pool) spends about a quarter of the CPU per proxied request that an
`httpx.AsyncClient` does through httpcore and anyio (130 vs 475 µs per small request against an
instant upstream on the bench machine), so `AiohttpUpstream` carries the gateway's traffic;
`HttpxUpstream` wraps an `httpx.AsyncClient` for callers that hold one (the tests drive in-process
apps through httpx's ASGI transport).

Both raise the failures `proxy.send_with_failover` must tell apart as this module's exceptions:
`ConnectFailed` (refused, reset or closed before an answer: retried on another replica),
`ConnectTimedOut` (retried), `ReadTimedOut` (a slow answer: never retried) and `ReadFailed` (the
connection broke while the body was read: retried before the first byte, cut after it). Bodies
are relayed as received: no content decoding, no re-chunking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx


class UpstreamError(Exception):
    """A replica could not be reached or failed while answering."""


class ConnectFailed(UpstreamError):
    pass


class ConnectTimedOut(UpstreamError):
    pass


class ReadTimedOut(UpstreamError):
    pass


class ReadFailed(UpstreamError):
    pass


class UpstreamResponse(Protocol):
    status_code: int

    def header(self, name: str) -> str | None:
        """One header's value (case-insensitive), None when absent."""
        ...

    def header_items(self) -> list[tuple[str, str]]:
        """Every header as received, repeats included."""
        ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def open(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> UpstreamResponse:
        """Send the request; return once the status and headers arrived."""
        ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- aiohttp
class _AiohttpResponse:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status_code = response.status

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def header_items(self) -> list[tuple[str, str]]:
        return list(self._response.headers.items())

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ServerTimeoutError as exc:
            raise ReadTimedOut(str(exc) or "read timed out") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ReadFailed(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        # why: release() returns a fully read connection to the pool and closes a cut one
        self._response.release()


class AiohttpUpstream:
    """Keep-alive connections to the replicas through one `aiohttp.ClientSession`.

    `read_timeout_s` bounds each wait for bytes (headers, then every chunk); `keepalive_s`
    closes idle connections before the workers do (uvicorn's default is 5 s), so that a request
    is not written onto a connection the worker is closing."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        keepalive_s: float = 4.0,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # why: a session belongs to the loop it is made in
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, keepalive_timeout=self.keepalive_s, ttl_dns_cache=10
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.connect_timeout_s,
                    sock_read=self.read_timeout_s,
                ),
                auto_decompress=False,
                # why: the client's own headers are forwarded as they are, nothing added
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                raise_for_status=False,
            )
        return self._session

    async def open(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> _AiohttpResponse:
        try:
            response = await self._client().request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectTimedOut(str(exc) or "connect timed out") from exc
        except aiohttp.ServerTimeoutError as exc:
            raise ReadTimedOut(str(exc) or "read timed out") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        return _AiohttpResponse(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---------------------------------------------------------------- httpx
class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status_code = response.status_code

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    def header_items(self) -> list[tuple[str, str]]:
        return self._response.headers.multi_items()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise ReadTimedOut(str(exc) or "read timed out") from exc
        except httpx.HTTPError as exc:
            raise ReadFailed(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class HttpxUpstream:
    """An `httpx.AsyncClient` as the upstream (its own timeouts and pool)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def open(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes
    ) -> _HttpxResponse:
        request = self.client.build_request(method, url, headers=dict(headers), content=body)
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise ConnectTimedOut(str(exc) or "connect timed out") from exc
        except httpx.TimeoutException as exc:
            raise ReadTimedOut(str(exc) or "read timed out") from exc
        except httpx.TransportError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        return _HttpxResponse(response)

    async def aclose(self) -> None:
        await self.client.aclose()
