"""Every HTTP error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`HTTPError` is what handlers raise for protocol problems (bad JSON, wrong content type, body too
large, unknown model); `error_response` turns it, a pydantic `ValidationError` or one of the
worker's own errors into a JSON response with the matching status: 400 invalid input (param =
dotted field path), 404 unknown model or route, 405, 413, 415, 429 with `Retry-After`, 503 not
ready or draining. Anything else is a bug: it is logged with its traceback and answered 500 in the
same shape, never with a stack trace.
"""

from __future__ import annotations

import logging
import math

from pydantic import ValidationError
from starlette.responses import JSONResponse

from llmos_worker.errors import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RateLimitExceededError,
)
from llmos_worker.server.response import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

# OpenAI's `type` for each status it uses
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class HTTPError(Exception):
    """An error the server answers with `status` (protocol level, not engine level)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_json(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorBody(
            message=message,
            type=_TYPES.get(status, "invalid_request_error"),
            param=param,
            code=code,
        )
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def validation_param(loc: tuple[int | str, ...]) -> str:
    """`("messages", 0, "role")` -> `"messages.0.role"` (OpenAI's dotted param path)."""
    return ".".join(str(part) for part in loc)


def to_http_error(exc: Exception) -> HTTPError:
    """Map a known exception to its HTTP error; re-raise anything unknown."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, ValidationError):
        first = exc.errors(include_url=False)[0]
        param = validation_param(first["loc"])
        message = f"{param}: {first['msg']}" if param else first["msg"]
        if len(exc.errors()) > 1:
            message += f" (and {len(exc.errors()) - 1} more errors)"
        return HTTPError(400, message, param=param or None, code=first["type"])
    if isinstance(exc, InvalidRequestError):
        # why: an adapter unloaded between routing and queueing is OpenAI's unknown model
        status = 404 if exc.code == "model_not_found" else 400
        return HTTPError(status, exc.message, param=exc.param, code=exc.code or "invalid_value")
    if isinstance(exc, EngineOverloadedError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        limited = isinstance(exc, RateLimitExceededError)
        code = "rate_limit_exceeded" if limited else "engine_overloaded"
        return HTTPError(429, str(exc), code=code, headers={"Retry-After": retry})
    if isinstance(exc, EngineDeadError):
        return HTTPError(503, str(exc), code="engine_unavailable")
    raise exc


def error_response(exc: Exception) -> JSONResponse:
    try:
        err = to_http_error(exc)
    except Exception:
        log.exception("unexpected error while serving a request")
        return error_json(500, "internal server error", code="internal_error")
    return error_json(err.status, err.message, param=err.param, code=err.code, headers=err.headers)
