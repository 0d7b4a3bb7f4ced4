"""The gateway's exception tree and its HTTP errors in OpenAI's shape.

Everything the gateway answers on its own (bad input, no replica, a held request that timed out,
an upstream that failed) is `{"error": {"message", "type", "param", "code"}}` with the status
OpenAI uses, so clients handle it like a worker's own error.
"""

from __future__ import annotations

import json

from starlette.responses import Response


class GatewayError(Exception):
    """Base of the gateway's errors."""


class ConfigError(GatewayError):
    """A setting, flag or mounted file that can never work; the message names it."""


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class HTTPError(GatewayError):
    """An error the gateway answers with `status` itself."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def response(self) -> Response:
        return error_response(
            self.status,
            self.message,
            code=self.code,
            param=self.param,
            retry_after_s=self.retry_after_s,
        )


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> bytes:
    error = {
        "message": message,
        "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error"),
        "param": param,
        "code": code,
    }
    return json.dumps({"error": error}).encode()


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    retry_after_s: float | None = None,
) -> Response:
    headers = {}
    if retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(retry_after_s + 0.499)))  # ceil, at least 1
    return Response(
        error_body(status, message, code, param),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
