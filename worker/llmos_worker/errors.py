"""The worker's exception tree.

Every error a caller can act on derives from `WorkerError`. Input errors carry the offending
parameter name so the HTTP layer can answer in OpenAI's error shape without guessing.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base class of every error raised on purpose by `llmos_worker`."""


class ModelLoadError(WorkerError):
    """The model source cannot be resolved, read, verified or decoded."""


class InvalidRequestError(WorkerError):
    """A request the engine refuses: bad sampling parameters, prompt too long, unfittable.

    `param` names the offending field (OpenAI's `param`), `code` is a short machine-readable tag.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineOverloadedError(WorkerError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimitExceededError(EngineOverloadedError):
    """The caller's rate limit (requests or tokens per minute) is spent for now (HTTP 429,
    OpenAI's code `rate_limit_exceeded`)."""


class EngineDeadError(WorkerError):
    """The engine loop stopped on an internal failure; no request can be served."""


class StorageError(WorkerError):
    """Model storage failures: download, digest mismatch, decryption or integrity failures."""
