"""Choosing a replica: round-robin, least-load, or prefix affinity with bounded load (CHWBL).

Prefix routing hashes a chain over the prompt's leading blocks of `block_chars` characters (the
chat messages' roles and contents in order, or the completion prompt), at most `max_blocks` deep,
so requests that share a long leading prefix share a key while a short prompt is keyed by all of
it. The key is placed on a consistent-hash ring with `vnodes` virtual nodes per replica (blake2b,
so every gateway replica routes a prefix to the same worker). Walking the ring clockwise from the
key, the first replica whose queue score plus this request stays within `load_factor` times the
mean (ceil((total + 1) * factor / n)), but never below `min_bound`, and whose KV cache is not full
with requests waiting takes it: the home replica while it has room, its ring successor when it is
overloaded (consistent hashing with bounded loads). Replicas ejected after failures and ones
already tried are left out.

The floor is what makes the bound worth obeying on a lightly loaded pool: with 2 requests in
flight over 3 replicas the plain bound is ceil(3 * 1.25 / 3) = 2, so a home replica busy with one
request would send the next one away, to a replica that must recompute the whole prefix (about
as long as the prompt's prefill) instead of batching it (a worker runs many sequences per step).
Below `min_bound` requests in flight a replica keeps its prefixes.

A prefix that overflowed is cached where it went, not at home: the router remembers the last
replicas that served each key (a bounded LRU) and offers them before its home, so a
session that spilled to another replica stays there while it has room instead of missing the
cache on every overflow (outcome `cached`).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llmos_gateway.replicas import Replica

Strategy = Literal["round-robin", "least-load", "prefix"]
STRATEGIES: tuple[Strategy, ...] = ("round-robin", "least-load", "prefix")
STABLE, CANARY = "stable", "canary"


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_text(body: dict[str, Any]) -> str:
    """The text whose leading part keys prefix routing (chat messages or the prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}\x1f{content if content is not None else ''}\x1e")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and not isinstance(prompt[0], int) else prompt
        if isinstance(prompt, list):
            return ",".join(str(t) for t in prompt)
    return str(prompt) if prompt is not None else ""


def prefix_key(text: str, *, block_chars: int = 256, max_blocks: int = 4, salt: str = "") -> int:
    """The chain hash of the leading full blocks (all of a text shorter than one block), seeded
    by `salt` (the request's model: a LoRA adapter's cached prefixes are its own)."""
    data = text.encode("utf-8", "surrogatepass")
    seed = _h64(salt.encode("utf-8", "surrogatepass")) if salt else 0
    step = block_chars  # bytes ~ characters for ASCII; a stable cut is all that matters
    if len(data) < step:
        return _h64(seed.to_bytes(8, "big") + data) if salt else _h64(data)
    h = seed
    for i in range(min(len(data) // step, max_blocks)):
        h = _h64(h.to_bytes(8, "big") + data[i * step : (i + 1) * step])
    return h


class HashRing:
    """Replica names on a ring, `vnodes` points each."""

    def __init__(self, names: Sequence[str], vnodes: int = 100) -> None:
        points = sorted(
            (_h64(f"{name}#{i}".encode()), name) for name in names for i in range(vnodes)
        )
        self._hashes = [p[0] for p in points]
        self._names = [p[1] for p in points]
        self.names = frozenset(names)

    def walk(self, key: int) -> list[str]:
        """Distinct replica names clockwise from `key` (the home replica first)."""
        if not self._hashes:
            return []
        start = bisect.bisect_left(self._hashes, key) % len(self._hashes)
        seen: dict[str, None] = {}
        for i in range(len(self._names)):
            seen.setdefault(self._names[(start + i) % len(self._names)])
            if len(seen) == len(self.names):
                break
        return list(seen)


class CanarySplit:
    """Which version serves the next request: `weight` percent go to "canary" while the pool has
    both versions ready. Smooth weighted round-robin (a credit of weight/100 per request), so any
    run of N requests sends round(N * weight / 100) of them, give or take one, to the canary. The
    split is per request: a session's turns may see both versions."""

    def __init__(self, weight: float = 0.0) -> None:
        if not 0.0 <= weight <= 100.0:
            raise ValueError("the canary weight is a percentage from 0 to 100")
        self.weight = weight
        self._credit = 0.0

    def choose(self, versions: set[str]) -> str | None:
        """The version for the next request; None: no split (route over all replicas)."""
        if CANARY not in versions or STABLE not in versions or self.weight <= 0:
            return None
        self._credit += self.weight / 100.0
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return CANARY
        return STABLE


@dataclass
class Decision:
    replica: Replica
    outcome: str  # round_robin | least_load | affinity | cached | overflow


class Router:
    """Picks a replica for a request by the pool's strategy."""

    def __init__(
        self,
        strategy: Strategy = "prefix",
        *,
        load_factor: float = 1.25,
        vnodes: int = 100,
        block_chars: int = 256,
        max_blocks: int = 4,
        kv_full: float = 0.95,
        max_remembered: int = 65536,
        min_bound: int = 4,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; one of {STRATEGIES}")
        if load_factor < 1.0:
            raise ValueError("load_factor must be at least 1.0")
        if min_bound < 1:
            raise ValueError("min_bound must be at least 1")
        self.min_bound = min_bound
        self.strategy = strategy
        self.load_factor = load_factor
        self.vnodes = vnodes
        self.block_chars = block_chars
        self.max_blocks = max_blocks
        self.kv_full = kv_full
        self._counter = itertools.count()
        self._ring: HashRing | None = None
        # prefix key -> names of the replicas that served it last (most recent first)
        self._served: OrderedDict[int, tuple[str, ...]] = OrderedDict()
        self.max_remembered = max_remembered

    def key_of(self, body: dict[str, Any]) -> int:
        model = body.get("model")
        return prefix_key(
            prefix_text(body),
            block_chars=self.block_chars,
            max_blocks=self.max_blocks,
            salt=model if isinstance(model, str) else "",
        )

    def ring(self, names: Sequence[str]) -> HashRing:
        if self._ring is None or self._ring.names != frozenset(names):
            self._ring = HashRing(names, self.vnodes)
        return self._ring

    def choose(
        self, candidates: Sequence[Replica], key: int, all_replicas: Sequence[Replica]
    ) -> Decision:
        """One of `candidates` (non-empty); `all_replicas` define the ring and the mean load."""
        if self.strategy == "round-robin":
            return Decision(candidates[next(self._counter) % len(candidates)], "round_robin")
        if self.strategy == "least-load":
            offset = next(self._counter)
            n = len(candidates)
            best = min(
                range(n),
                key=lambda i: (
                    candidates[i].score() + candidates[i].load.kv_usage,
                    (i - offset) % n,
                ),
            )
            return Decision(candidates[best], "least_load")
        ring = self.ring([r.name for r in all_replicas])
        by_name = {r.name: r for r in candidates}
        total = sum(r.score() for r in all_replicas)
        bound = max(
            self.min_bound, math.ceil((total + 1) * self.load_factor / max(1, len(all_replicas)))
        )
        walk = ring.walk(key)
        home = walk[0] if walk else None
        served = self._served.get(key, ())
        # where the prefix was served last is where it is cached: there first, then home
        names = [n for n in (*served, home, *walk[1:]) if n is not None]
        order = [by_name[n] for n in dict.fromkeys(names) if n in by_name]

        def outcome(replica: Replica) -> str:
            if replica.name == home:
                return "affinity"
            return "cached" if replica.name in served else "overflow"

        chosen: Replica | None = None
        for replica in order:
            full = replica.load.kv_usage >= self.kv_full and replica.load.waiting > 0
            if replica.score() + 1 <= bound and not full:
                chosen = replica
                break
        if chosen is None:
            # why: every replica is over the bound; the least loaded one still serves
            chosen = min(order or list(candidates), key=lambda r: r.score())
        self._remember(key, chosen.name)
        return Decision(chosen, outcome(chosen))

    def _remember(self, key: int, name: str) -> None:
        """`name` served `key`: first of its recent servers (two kept), the key most recent."""
        previous = self._served.pop(key, ())
        self._served[key] = (name, *(n for n in previous if n != name))[:2]
        while len(self._served) > self.max_remembered:
            self._served.popitem(last=False)
