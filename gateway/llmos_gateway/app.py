"""The gateway's ASGI app: the worker's OpenAI routes, proxied to the pool's replicas.

Per request: read the body (bounded), parse it enough to route (model, messages/prompt),
authenticate the caller and charge its tenant's RPM/TPM (`tenants`: 401, 429 + Retry-After), hold
it while the pool has no ready replica (bounded number held, `hold_timeout_s`, then 503 +
Retry-After; the first held request asks the operator to scale the pool up), wait for a slot
while the pool is saturated (`fairqueue`: weighted fair share across tenants, priority first),
choose a version (`routing.CanarySplit`) and a replica of it (`routing.Router`), forward with
failover (`proxy`), stream the answer back, count it in the metrics and write one structured
access-log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llmos_gateway.errors import HTTPError, error_body, error_response
from llmos_gateway.fairqueue import FairQueue
from llmos_gateway.kube import IdleWatcher
from llmos_gateway.metrics import GatewayMetrics
from llmos_gateway.proxy import Attempt, RelayResponse, forward_headers, send_with_failover
from llmos_gateway.replicas import Pool, Replica
from llmos_gateway.routing import CanarySplit, Router, prefix_text
from llmos_gateway.tenants import Caller, Tenants, estimate_tokens
from llmos_gateway.upstream import HttpxUpstream, Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger(__name__)
access_log = logging.getLogger("llmos_gateway.access")

ScaleUp = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class GatewaySettings:
    max_body_bytes: int = 4 * 1024 * 1024
    max_retries: int = 2
    hold_timeout_s: float = 120.0
    max_held: int = 1024
    retry_after_s: int = 5
    max_inflight_per_replica: int = 64  # 0: no fair-share queue, the workers queue everything
    max_queued: int = 4096
    max_buffered_bytes: int = 1024 * 1024  # non-streamed answers up to this are sent whole


class Gateway:
    """Everything one request needs: the pool, the router, the upstream client, the metrics."""

    def __init__(
        self,
        pool: Pool,
        router: Router,
        client: Upstream | httpx.AsyncClient,
        *,
        settings: GatewaySettings = GatewaySettings(),
        metrics: GatewayMetrics | None = None,
        scale_up: ScaleUp | None = None,
        tenants: Tenants | None = None,
        split: CanarySplit | None = None,
    ) -> None:
        self.pool = pool
        self.router = router
        self.upstream: Upstream = (
            HttpxUpstream(client) if isinstance(client, httpx.AsyncClient) else client
        )
        self.settings = settings
        self.metrics = metrics or GatewayMetrics(pool)
        self.scale_up = scale_up
        self.tenants = tenants or Tenants()
        self.split = split or CanarySplit()
        self.fair: FairQueue | None = None
        if settings.max_inflight_per_replica > 0:
            self.fair = FairQueue(
                lambda: settings.max_inflight_per_replica * len(self.pool.available()),
                max_queued=settings.max_queued,
                timeout_s=settings.hold_timeout_s,
                retry_after_s=settings.retry_after_s,
            )
            self.metrics.watch_queue(self.fair)
        self._ready = asyncio.Event()
        self._held = 0
        self._scale_task: asyncio.Task[bool] | None = None
        self.idle: IdleWatcher | None = None  # set when the pool scales to zero when idle
        pool.on_change(self._pool_changed)
        self._pool_changed()

    def _pool_changed(self) -> None:
        if len(self.pool):
            self._ready.set()
        else:
            self._ready.clear()
        if self.fair is not None:
            self.fair.dispatch()  # why: new replicas are new slots for waiting requests

    def busy(self) -> bool:
        """Requests held or in flight (the idle watcher never scales a busy pool down)."""
        queued = self.fair is not None and self.fair.queued > 0
        return self._held > 0 or queued or any(r.inflight for r in self.pool.all())

    # ---------------------------------------------------------------- holding
    async def wait_for_replica(self) -> None:
        """Return once the pool has a ready replica; hold (bounded) while it has none."""
        if len(self.pool):
            return
        s = self.settings
        if self._held >= s.max_held:
            raise HTTPError(
                503,
                "the pool is scaling up and holds its maximum of waiting requests",
                code="pool_scaling",
                retry_after_s=s.retry_after_s,
            )
        self._held += 1
        self.metrics.held.inc()
        try:
            if self.scale_up is not None and (self._scale_task is None or self._scale_task.done()):
                self._scale_task = asyncio.create_task(self._request_scale())
            try:
                await asyncio.wait_for(self._ready.wait(), s.hold_timeout_s)
            except TimeoutError:
                self.metrics.hold_expired.inc()
                raise HTTPError(
                    503,
                    f"the pool has no ready replica after {s.hold_timeout_s:g} s; it is "
                    "scaling up, retry later",
                    code="pool_scaling",
                    retry_after_s=s.retry_after_s,
                ) from None
        finally:
            self._held -= 1
            self.metrics.held.dec()

    async def _request_scale(self) -> bool:
        assert self.scale_up is not None
        try:
            ok = await self.scale_up()
        except Exception:  # why: a failing API call must not fail held requests; they time out
            log.warning("scale-up request failed", exc_info=True)
            ok = False
        self.metrics.scale_requests.labels("sent" if ok else "failed").inc()
        return ok

    # ---------------------------------------------------------------- routing
    def pick(self, version: str | None, key: int, tried: set[str]) -> Replica | None:
        """A replica of `version` not tried yet (of any version once that one has none)."""
        candidates = [r for r in self.pool.available(version) if r.name not in tried]
        ring = [r for r in self.pool.all() if version is None or r.version == version]
        if not candidates and version is not None:
            candidates = [r for r in self.pool.available() if r.name not in tried]
            ring = self.pool.all()
        if not candidates:
            return None
        decision = self.router.choose(candidates, key, ring)
        self.metrics.decisions.labels(self.router.strategy, decision.outcome).inc()
        if self.router.strategy == "prefix" and not tried:
            self.metrics.affinity_lookups.inc()
            if decision.outcome in ("affinity", "cached"):
                self.metrics.affinity_hits.inc()
        decision.replica.inflight += 1
        self.metrics.upstream_requests.labels(decision.replica.name, decision.replica.version).inc()
        return decision.replica

    def release(self, replica: Replica) -> None:
        replica.inflight = max(0, replica.inflight - 1)

    # ---------------------------------------------------------------- handlers
    async def proxy(self, request: Request) -> Response:
        started = time.monotonic()
        route = request.url.path
        attempt = Attempt()
        status = 500
        tenant = "-"
        slot = False
        if self.idle is not None:
            self.idle.touch()
        try:
            body = await read_body(request, self.settings.max_body_bytes)
            parsed = parse_json(body)
            client = request.client.host if request.client else None
            caller = self.tenants.identify(request.headers.get("authorization"), client)
            tenant = caller.label
            slot = await self.admit(caller, parsed, route)
            key = self.router.key_of(parsed)
            version = self.split.choose(self.pool.versions())
            headers = forward_headers(
                request.headers.raw, request.client.host if request.client else None
            )

            def on_failure(replica: Replica, reason: str) -> None:
                self.release(replica)
                if reason == "read_timeout":
                    # why: a slow answer is not a broken replica (and is not retried); ejecting
                    # it would push its prefixes onto the others
                    self.metrics.upstream_timeouts.inc()
                    return
                self.pool.eject(replica)
                self.metrics.retries.labels(reason).inc()

            upstream, first, rest = await send_with_failover(
                self.upstream,
                method=request.method,
                path=route + _query(request),
                headers=headers,
                body=body,
                pick=lambda tried: self.pick(version, key, tried),
                on_failure=on_failure,
                max_retries=self.settings.max_retries,
                attempt=attempt,
            )
        except HTTPError as exc:
            self._release_slot(slot)
            status = exc.status
            self._log(request, route, status, tenant, attempt, started)
            return exc.response()
        except ClientDisconnect:
            self._release_slot(slot)
            status = 499
            self._log(request, route, status, tenant, attempt, started)
            return Response(status_code=400)
        except BaseException:
            self._release_slot(slot)
            raise
        replica = attempt.replica
        assert replica is not None
        status = upstream.status_code
        version = replica.version
        if attempt.first_byte_s is not None:
            self.metrics.upstream_ttfb.labels(version).observe(attempt.first_byte_s)

        sse = (upstream.header("content-type") or "").startswith("text/event-stream")

        async def body_iter() -> Any:
            if first:
                yield first
            try:
                async for chunk in rest:
                    yield chunk
            except UpstreamError as exc:
                # why: tokens were sent, so no retry; an SSE client gets an error event in
                # OpenAI's stream shape, any other body is cut (a clean end would look complete)
                self.metrics.upstream_cut.inc()
                log.warning("replica %s failed mid-response: %s", replica.name, type(exc).__name__)
                self.pool.eject(replica)
                if not sse:
                    raise
                yield (
                    b"data: "
                    + error_body(502, "the replica failed while streaming", "upstream_failed")
                    + b"\n\n"
                )
                return
            response.completed = True

        async def on_close(completed: bool, sent: int | None = None) -> None:
            """`sent`: the status the client got instead of the upstream's (a cut body)."""
            await upstream.aclose()
            self.release(replica)
            self._release_slot(slot)
            if not completed and sent is None:
                self.metrics.client_aborts.inc()
            self.metrics.upstream_duration.labels(version).observe(time.monotonic() - started)
            final = sent if sent is not None else status if completed else 499
            self._log(request, route, final, tenant, attempt, started)

        headers_out: dict[str, str] = {}
        for k, v in upstream.header_items():
            name = k.lower()
            # why: uvicorn writes its own date and server headers; the upstream's would repeat
            if name not in ("connection", "keep-alive", "transfer-encoding", "date", "server"):
                headers_out[name] = f"{headers_out[name]}, {v}" if name in headers_out else v
        length = upstream.header("content-length") or ""
        if not sse and length.isdigit() and int(length) <= self.settings.max_buffered_bytes:
            # why: a small whole answer (non-streamed completion, /v1/models) is read and sent
            # as one response; relaying it as a stream costs a task group per request
            return await self._buffered(replica, upstream, first, rest, headers_out, on_close)
        response = RelayResponse(
            body_iter(), status_code=status, headers=headers_out, on_close=on_close
        )
        return response

    async def _buffered(
        self,
        replica: Replica,
        upstream: UpstreamResponse,
        first: bytes,
        rest: AsyncIterator[bytes],
        headers: dict[str, str],
        on_close: Callable[..., Awaitable[None]],
    ) -> Response:
        """The upstream's whole (small) body as one response; a cut body is a 502 (nothing
        was sent yet, but the replica did the work: not retried)."""
        chunks = [first]
        try:
            async for chunk in rest:
                chunks.append(chunk)
        except UpstreamError as exc:
            self.metrics.upstream_cut.inc()
            log.warning("replica %s failed mid-response: %s", replica.name, type(exc).__name__)
            self.pool.eject(replica)
            await on_close(False, 502)
            return error_response(
                502, "the pool's replica failed while answering", code="upstream_failed"
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await on_close(False)
            raise
        await on_close(True)
        return Response(b"".join(chunks), status_code=upstream.status_code, headers=headers)

    async def admit(self, caller: Caller, body: dict[str, Any], route: str) -> bool:
        """Rate limits, then a ready replica, then a slot in the fair queue; True: a slot
        is held (give it back with `_release_slot`)."""
        policy = self.tenants.policy(caller)
        generates = route != "/v1/models"
        tokens = estimate_tokens(body, prefix_text(body)) if generates else 0
        try:
            self.tenants.limiter.admit(caller.tenant, policy, tokens)
        except HTTPError:
            self.metrics.rate_limited.labels(caller.label).inc()
            raise
        await self.wait_for_replica()
        if self.fair is None or not generates:
            return False
        queued = time.monotonic()
        await self.fair.acquire(
            caller.tenant,
            weight=policy.weight,
            priority=self.tenants.priority(caller, policy, body),
        )
        self.metrics.queue_wait.observe(time.monotonic() - queued)
        return True

    def _release_slot(self, held: bool) -> None:
        if held and self.fair is not None:
            self.fair.release()

    async def models(self, request: Request) -> Response:
        return await self.proxy(request)

    def _log(
        self,
        request: Request,
        route: str,
        status: int,
        tenant: str,
        attempt: Attempt,
        started: float,
    ) -> None:
        replica = attempt.replica
        version = replica.version if replica is not None else "-"
        self.metrics.requests.labels(route, tenant, str(status), version).inc()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                json.dumps(
                    {
                        "method": request.method,
                        "path": route,
                        "status": status,
                        "tenant": tenant,
                        "replica": replica.name if replica is not None else None,
                        "version": version,
                        "attempts": attempt.attempts,
                        "retried": attempt.retried,
                        "duration_ms": round((time.monotonic() - started) * 1000, 2),
                        "client": request.client.host if request.client else None,
                    }
                )
            )


def _query(request: Request) -> str:
    q = request.url.query
    return f"?{q}" if q else ""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body over {limit} bytes", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body over {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object ({} for an empty GET body); bad JSON is a 400."""
    if not body:
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "the body must be a JSON object", code="invalid_json")
    return value


def build_app(gateway: Gateway, *, metrics_port: int | None = None) -> Starlette:
    """The routes; with `metrics_port`, /metrics is served only on that port and nothing else
    is; without it, /metrics is on the API port, behind the API key when keys are configured
    (its series name tenants)."""

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        # why: a pool at zero is still served (requests are held), so the gateway stays ready
        return JSONResponse({"status": "ready", "replicas": len(gateway.pool)})

    async def metrics(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if metrics_port is None and gateway.tenants.requires_key:
            try:
                gateway.tenants.identify(request.headers.get("authorization"), None)
            except HTTPError as exc:
                return exc.response()

        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, _: Exception) -> Response:
        return error_response(404, f"no route {request.url.path}", code="not_found")

    async def method_not_allowed(request: Request, _: Exception) -> Response:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    routes = [
        Route("/v1/chat/completions", gateway.proxy, methods=["POST"]),
        Route("/v1/completions", gateway.proxy, methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed})
    if metrics_port is not None:
        app.add_middleware(_MetricsPortOnly, metrics_port=metrics_port)
    return app


class _MetricsPortOnly:
    """/metrics only on the metrics port, and only /metrics there (scope["server"]'s port)."""

    def __init__(self, app: ASGIApp, metrics_port: int) -> None:
        self.app = app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            server = scope.get("server")
            on_metrics_port = server is not None and server[1] == self.metrics_port
            if on_metrics_port != (scope["path"] == "/metrics"):
                response = error_response(404, f"no route {scope['path']}", code="not_found")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
