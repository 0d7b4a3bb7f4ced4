"""What the HTTP handlers share: the engine front (once loaded), names, limits, drain state.

The model loads in the background after the socket is open, so `/health` answers at once while
`/ready` (and every completion endpoint) says 503 until `front` is set. `draining` is raised by
SIGTERM: from then on `/ready` is 503 and new completions are refused, while in-flight ones run to
completion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llmos_worker.errors import EngineDeadError
from llmos_worker.server.async_engine import AsyncEngine
from llmos_worker.server.auth import ApiKeyAuth
from llmos_worker.server.generation import TokenText, token_text_fn
from llmos_worker.server.ratelimit import RateLimiter
from llmos_worker.server.transport import TransportStats

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServerState:
    served_model_name: str | None = None  # None: the engine's model name
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    auth: ApiKeyAuth | None = None
    limiter: RateLimiter | None = None
    max_inflight_requests: int = 1024  # API requests at once; beyond it 503 + Retry-After
    metrics_port: int | None = None  # set: /metrics only on this port, without a key
    transport: TransportStats | None = None  # the guarded transport's counters, when it runs
    front: AsyncEngine | None = None
    inflight_requests: int = 0
    draining: bool = False
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _token_text: TokenText | None = None

    def attach(self, front: AsyncEngine) -> None:
        """The engine is loaded and its thread started: start serving."""
        self.front = front
        if self.served_model_name is None:
            self.served_model_name = front.engine.model_name
        self._token_text = token_text_fn(self.tokenizer.decode)

    @property
    def ready(self) -> bool:
        return self.front is not None and self.front.running and not self.draining

    @property
    def model_name(self) -> str:
        return self.served_model_name or "unknown"

    @property
    def tokenizer(self) -> Any:
        if self.front is None:
            raise EngineDeadError(self.load_error or "the model is still loading")
        return self.front.engine.tokenizer

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            raise EngineDeadError("the model is not loaded yet")
        return self._token_text

    def serving_front(self) -> AsyncEngine:
        """The front, if requests may be accepted now; else `EngineDeadError` (HTTP 503)."""
        if self.front is None:
            raise EngineDeadError(self.load_error or "the model is still loading")
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        return self.front
