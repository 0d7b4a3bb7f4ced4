"""Rate-limited logging: a flood of one message costs a few lines a minute, not megabytes.

Under a connection flood the same record repeats on every loop turn (asyncio's `accept()` out of
file descriptors, uvicorn's "Invalid HTTP request received", a warning per refused client), and
a log written that fast fills the node's disk and hides everything else. `RateLimitFilter` lets
through at most `burst` records per `window_s` seconds for each (logger, level, message
template), drops the rest, and when the window turns says how many it dropped. Tracebacks of
records that pass are kept; records of distinct templates never limit each other. The number
of templates tracked is bounded, so unique messages cannot grow its memory either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_TEMPLATES = 1024


class RateLimitFilter(logging.Filter):
    """At most `burst` records per (logger, level, template) every `window_s` seconds."""

    def __init__(
        self,
        *,
        burst: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        # key -> [window start, records passed in it, records dropped in it]
        self._windows: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                dropped = int(window[2]) if window is not None else 0
                self._windows[key] = [now, 1.0, 0.0]
                self._windows.move_to_end(key)
                while len(self._windows) > MAX_TEMPLATES:
                    self._windows.popitem(last=False)
                if dropped:
                    record.msg = f"{record.msg} [{dropped} similar messages suppressed]"
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            return False
