"""The operator's shared state, kept in kopf's memo (never in module globals)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from llmos_operator.config import OperatorConfig
from llmos_operator.kube import KubeClient
from llmos_operator.status import Clock, utc_now


@dataclass
class OperatorState:
    """What every handler shares: config, API client, clock and per-object locks."""

    config: OperatorConfig
    kube: KubeClient
    clock: Clock = utc_now
    # why: a pool is reconciled from its own events, timers and its children's events; one at once
    locks: defaultdict[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        return self.locks[(kind, namespace, name)]
