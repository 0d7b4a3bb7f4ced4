"""Status bookkeeping shared by the reconcilers: invalid-spec messages and minimal status patches.

A status is written only when it changes: `status_patch` gives the merge patch from the stored
status to the new one (None when nothing changed; removed keys become null, as RFC 7396 wants).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

Clock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(tz=datetime.UTC)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def invalid_spec_message(exc: ValidationError, root: str = "spec") -> str:
    """One line per error, each naming the field: "spec.engine.blockSize: Input should be ..."."""
    lines = []
    for error in exc.errors(include_url=False):
        path = ".".join([root, *(str(part) for part in error["loc"])])
        lines.append(f"{path}: {error['msg']}")
    return "; ".join(lines)[:4000]


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch turning `old` into `new` at the top level, or None when equal."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        if key == "kopf":  # why: kopf keeps its own progress there; not ours to touch
            continue
        if old.get(key) != new.get(key):
            patch[key] = new.get(key)
    return patch or None
