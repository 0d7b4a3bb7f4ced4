"""The Starlette application: OpenAI routes, probes, metrics, and one error shape for all.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET
/v1/models` and `/v1/models/{id}`, `POST /tokenize` and `/detokenize` (vLLM's), `GET /health`
(the process and its engine thread are alive), `GET /ready` (model loaded, engine stepping, not
draining), `GET /metrics` (Prometheus text). Request bodies must be JSON objects (content type
`application/json`, or none) of at most `max_body_bytes`; every failure, including unknown routes
and wrong methods, is answered in OpenAI's error shape. Strings are taken as any valid JSON
string: a lone UTF-16 surrogate (`"\\ud800"`, valid JSON but no Unicode character) becomes
U+FFFD, as a UTF-8 decoder treats a broken sequence. With an API key file, `/v1/*` (the model
list included, as OpenAI does) requires a bearer key and the key's tenant salts the prefix cache;
with a rate-limit file, requests are admitted against the caller's and the namespace's token
buckets (429 + Retry-After beyond them). At most `max_inflight_requests` API requests are read,
queued or answered at once; beyond that 503 + Retry-After (probes and metrics are not counted, so
they answer under load). `/metrics`: with a metrics port, served there only and without a key (the
pod's network policy decides who reaches it); without one, on the API port and behind the API key
when keys are configured. A client that disconnects mid-request is logged at DEBUG. The engine is
loaded by `loader` in a thread after start-up, so probes answer while a large model is still
loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos_worker.server.adapters import adapter_cards, load_lora_adapter, unload_lora_adapter
from llmos_worker.server.admission import Caller
from llmos_worker.server.async_engine import AsyncEngine, Engine
from llmos_worker.server.chat import create_chat_completion
from llmos_worker.server.completions import create_completion
from llmos_worker.server.embeddings import create_embedding
from llmos_worker.server.errors import HTTPError, error_json, error_response
from llmos_worker.server.extras import detokenize, tokenize
from llmos_worker.server.metrics import CONTENT_TYPE, HttpMetrics, ServerMetrics
from llmos_worker.server.response import ModelCard, ModelList
from llmos_worker.server.state import ServerState
from llmos_worker.server.transport import TransportCollector

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
        value = json.loads(bytes(body), object_pairs_hook=_clean_object)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HTTPError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise HTTPError(400, "request body must be a JSON object", code="invalid_json")
    return value


def clean_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (no copy when there is none)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # why: json.loads already joined valid surrogate pairs; what is left cannot be encoded
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _clean(value: object) -> object:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value  # dicts were cleaned by their own hook, numbers need nothing


def _clean_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    return {clean_text(key): _clean(value) for key, value in pairs}


def identify(state: ServerState, request: Request) -> Caller:
    """The caller; with an API key file, 401 unless the bearer key is known. Without one, the
    caller is known only by its address: a bearer token nobody can check names nobody."""
    if state.auth is None:
        return Caller.anonymous(request.client.host if request.client else None)
    principal = state.auth.authenticate(request.headers.get("authorization"))
    if principal is None:
        raise HTTPError(
            401, "a valid API key is required (Authorization: Bearer)", code="invalid_api_key"
        )
    return Caller.authenticated(principal.tenant, principal.priority)


def _endpoint(state: ServerState, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            caller = identify(state, request)
            body = await read_json(request, state.max_body_bytes)
            return await handler(state, body, request, caller)
        except ClientDisconnect:
            # why: a client gone mid-body is its own business, not an error of ours; nobody
            # reads the answer, and a traceback per such client floods the log
            log.debug("client %s disconnected before its request was read", request.client)
            return Response(status_code=400)
        except Exception as exc:
            return error_response(exc)

    return endpoint


# routes that answer whatever the load: probes and the metrics page
_UNCOUNTED = frozenset({"/health", "/ready", "/metrics"})


class ListenerGuard:
    """ASGI middleware: which port serves what, and the cap on in-flight API requests.

    With a metrics port, that port serves `/metrics` only and the API port everything else. An
    API request past `max_inflight_requests` gets 503 + Retry-After before its body is read;
    the count covers a request from its head to its response's last byte (streams included).
    """

    def __init__(self, app: ASGIApp, state: ServerState, http: HttpMetrics) -> None:
        self.app = app
        self.state = state
        self.http = http

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app fails before answering

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, send_noting_status)
        finally:
            self.http.observe(scope["path"], scope["method"], status)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        state, path = self.state, scope["path"]
        if state.metrics_port is not None:
            server = scope.get("server")
            on_metrics_port = server is not None and server[1] == state.metrics_port
            if on_metrics_port != (path == "/metrics"):
                await error_json(404, "no such route")(scope, receive, send)
                return
        if path in _UNCOUNTED:
            await self.app(scope, receive, send)
            return
        if state.inflight_requests >= state.max_inflight_requests:
            response = error_json(
                503,
                f"the server is handling its maximum of {state.max_inflight_requests} requests; "
                "retry shortly",
                code="too_many_requests_in_flight",
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        state.inflight_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.inflight_requests -= 1


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

    async def models(request: Request) -> Response:
        try:
            identify(state, request)
        except HTTPError as exc:
            return error_response(exc)
        if state.front is None:
            return error_json(
                503, state.load_error or "the model is still loading", code="not_ready"
            )
        return JSONResponse(ModelList(data=model_cards(state, state.front)).model_dump())

    async def model(request: Request) -> Response:
        try:
            identify(state, request)
        except HTTPError as exc:
            return error_response(exc)
        if state.front is None:
            return error_json(
                503, state.load_error or "the model is still loading", code="not_ready"
            )
        wanted = request.path_params["model_id"]
        for card in model_cards(state, state.front):
            if card.id == wanted:
                return JSONResponse(card.model_dump())
        return error_json(
            404, f"The model `{wanted}` does not exist.", param="model", code="model_not_found"
        )

    transport_registry = CollectorRegistry(auto_describe=False)
    if state.transport is not None:
        transport_registry.register(TransportCollector(state.transport, lambda: state))
    http_metrics = HttpMetrics(transport_registry)

    async def metrics(request: Request) -> Response:
        if state.metrics_port is None:
            try:
                identify(state, request)
            except HTTPError as exc:
                return error_response(exc)
        registry_text = b""
        if state.front is not None and state.front.metrics is not None:
            registry_text = state.front.metrics.render()
        return Response(
            registry_text + generate_latest(transport_registry), media_type=CONTENT_TYPE
        )

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
        Route("/v1/embeddings", _endpoint(state, create_embedding), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/tokenize", _endpoint(state, tokenize), methods=["POST"]),
        Route("/detokenize", _endpoint(state, detokenize), methods=["POST"]),
        Route("/v1/load_lora_adapter", _endpoint(state, load_lora_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", _endpoint(state, unload_lora_adapter), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(ListenerGuard, state=state, http=http_metrics)],
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )


def model_cards(state: ServerState, front: AsyncEngine) -> list[ModelCard]:
    """What `/v1/models` lists: the served model, then its LoRA adapters."""
    return [
        ModelCard(
            id=state.model_name, created=state.created, max_model_len=front.engine.max_model_len
        ),
        *adapter_cards(state),
    ]


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
