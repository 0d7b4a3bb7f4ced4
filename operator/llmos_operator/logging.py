"""Structured logs for the operator: one JSON object per line, with pool/model/request ids.

`configure_logging("json")` installs a `JsonFormatter` on the root logger (`"text"` keeps a
plain human format). Each record carries `time`, `level`, `logger`, `message` and, where known,
`namespace`, `pool`, `model`, `request_id`: taken from the record's `extra=` fields, from kopf's
per-object logger (its `k8s_ref` extra names the InferencePool or LLMModel being handled), or from
the ambient `log_context(...)` (a contextvar, so concurrent handlers on one event loop never see
each other's ids). Exceptions are rendered into `exc_info` as text. Standard library only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TextIO

CONTEXT_FIELDS = ("namespace", "pool", "model", "request_id")
_KIND_FIELD = {"InferencePool": "pool", "LLMModel": "model"}

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "llmos_log_context", default=MappingProxyType({})
)


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Attach ids (namespace=, pool=, model=, request_id=) to every record logged inside."""
    unknown = set(ids) - set(CONTEXT_FIELDS)
    if unknown:
        raise TypeError(f"log_context got unknown fields {sorted(unknown)}; use {CONTEXT_FIELDS}")
    merged = {**_context.get(), **{k: v for k, v in ids.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def record_ids(record: logging.LogRecord) -> dict[str, str]:
    """The context ids of one record: ambient context < kopf's object ref < explicit extras."""
    ids: dict[str, str] = dict(_context.get())
    ref = getattr(record, "k8s_ref", None)
    if isinstance(ref, Mapping):
        if isinstance(ref.get("namespace"), str):
            ids["namespace"] = ref["namespace"]
        field = _KIND_FIELD.get(str(ref.get("kind")))
        if field is not None and isinstance(ref.get("name"), str):
            ids[field] = ref["name"]
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            ids[name] = str(value)
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per record; keys in a stable order, ids only when known."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(record_ids(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger [ns/pool] message` for humans."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = record_ids(record)
        if not ids:
            return text
        tags = " ".join(f"{k}={v}" for k, v in ids.items())
        return f"{text} [{tags}]"


def configure_logging(
    fmt: Literal["json", "text"] = "text",
    level: int | str = logging.INFO,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one stream handler in `fmt`; returns it."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
