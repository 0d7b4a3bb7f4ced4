"""Rate-limited logging: a flood of one message costs a few lines a minute, not megabytes.

A gateway in front of a failing pool or under a connection flood would otherwise log the same
line per request ("replica unreachable", "invalid HTTP request"). `RateLimitFilter` passes at
most `burst` records per `window_s` seconds for each (logger, level, message template), drops the
rest and, when the window turns, says how many it dropped. The templates tracked are bounded, so
unique messages cannot grow its memory. (The worker has the same defence; the gateway keeps its
own copy because it must not import the worker.) The access log is not filtered: it is the
record of every request and is switched off with `--no-access-log` instead.
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
        exempt: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self.exempt = exempt  # logger names passed through unlimited (the access log)
        self._lock = threading.Lock()
        # key -> [window start, passed in it, dropped in it]
        self._windows: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in self.exempt:
            return True
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
