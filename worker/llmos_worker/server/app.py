"""The Starlette application: OpenAI routes, probes, metrics, and one error shape for all.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`
(the process and its engine thread are alive), `GET /ready` (model loaded, engine stepping, not
draining), `GET /metrics` (Prometheus text). Request bodies must be JSON objects (content type
`application/json`, or none) of at most `max_body_bytes`; every failure, including unknown routes
and wrong methods, is answered in OpenAI's error shape. With an API key file, `/v1/*` requires a
bearer key and the key's tenant salts the prefix cache; with a rate-limit file, requests are
admitted against the key's and the namespace's token buckets (429 + Retry-After beyond them).
The engine is loaded by `loader` in a
thread after start-up, so probes answer while a large model is still loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmos_worker.server.admission import ANONYMOUS, Caller
from llmos_worker.server.async_engine import AsyncEngine, Engine
from llmos_worker.server.chat import create_chat_completion
from llmos_worker.server.completions import create_completion
from llmos_worker.server.errors import HTTPError, error_json, error_response
from llmos_worker.server.metrics import CONTENT_TYPE, ServerMetrics
from llmos_worker.server.response import ModelCard, ModelList
from llmos_worker.server.state import ServerState

log = logging.getLogger(__name__)

Handler = Callable[[ServerState, object, Request, Caller], Awaitable[Response]]


async def read_json(request: Request, limit: int) -> object:
    """The request body as a JSON object, or an `HTTPError` (400, 413, 415)."""
    ctype = request.headers.get("content-type")
    if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
        raise HTTPError(
            415,
            f"Content-Type must be application/json, got {ctype!r}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(
            413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    if not body.strip():
        raise HTTPError(400, "request body is empty; expected a JSON object", code="invalid_json")
    try:
        value = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HTTPError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise HTTPError(400, "request body must be a JSON object", code="invalid_json")
    return value


def identify(state: ServerState, authorization: str | None) -> Caller:
    """The caller; with an API key file, 401 unless the bearer key is known."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if state.auth is None:
        return Caller(api_key=token or ANONYMOUS)
    principal = state.auth.authenticate(authorization)
    if principal is None:
        raise HTTPError(
            401, "a valid API key is required (Authorization: Bearer)", code="invalid_api_key"
        )
    return Caller(tenant=principal.tenant, api_key=token)


def _endpoint(state: ServerState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            caller = identify(state, request.headers.get("authorization"))
            body = await read_json(request, state.max_body_bytes)
            return await handler(state, body, request, caller)
        except Exception as exc:
            return error_response(exc)

    return endpoint


def build_app(
    state: ServerState,
    *,
    loader: Callable[[], Engine] | None = None,
    max_waiting_requests: int = 512,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The app; `loader` (run in a thread at start-up) builds the engine to serve."""

    async def load() -> None:
        assert loader is not None
        try:
            engine = await asyncio.to_thread(loader)
            attach_engine(state, engine, max_waiting_requests=max_waiting_requests)
            log.info("model %s loaded; serving", state.model_name)
        except Exception as exc:
            state.load_error = f"the model failed to load: {exc}"
            log.exception("the model failed to load")
            if on_load_error is not None:
                on_load_error(exc)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(load()) if loader is not None else None
        yield
        if task is not None and not task.done():
            task.cancel()
        if state.front is not None:
            await state.front.shutdown()

    async def health(_: Request) -> Response:
        if state.front is not None and not state.front.running and not state.draining:
            return error_json(503, "the engine thread has stopped", code="engine_dead")
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> Response:
        if state.ready:
            return JSONResponse({"status": "ready", "model": state.model_name})
        reason = (
            "draining"
            if state.draining
            else state.load_error or ("loading" if state.front is None else "engine stopped")
        )
        return error_json(503, f"not ready: {reason}", code="not_ready")

    async def models(_: Request) -> Response:
        if state.front is None:
            return error_json(
                503, state.load_error or "the model is still loading", code="not_ready"
            )
        card = ModelCard(
            id=state.model_name,
            created=state.created,
            max_model_len=state.front.engine.max_model_len,
        )
        return JSONResponse(ModelList(data=[card]).model_dump())

    async def metrics(_: Request) -> Response:
        registry_text = b""
        if state.front is not None and state.front.metrics is not None:
            registry_text = state.front.metrics.render()
        return Response(registry_text, media_type=CONTENT_TYPE)

    async def http_exception(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "no such route", 405: "method not allowed"}.get(
            exc.status_code, str(exc.detail)
        )
        return error_json(exc.status_code, message, headers=dict(exc.headers or {}))

    async def server_error(_: Request, exc: Exception) -> Response:
        return error_response(exc)

    routes = [
        Route("/v1/completions", _endpoint(state, create_completion), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(state, create_chat_completion), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )


def attach_engine(state: ServerState, engine: Engine, *, max_waiting_requests: int = 512) -> None:
    """Serve an already-built engine (tests, embedding); call from the serving event loop."""
    name = state.served_model_name or engine.model_name
    front = AsyncEngine(
        engine,
        max_waiting_requests=max_waiting_requests,
        metrics_factory=lambda snap: ServerMetrics(name, snap),
    )
    front.start()
    state.attach(front)
