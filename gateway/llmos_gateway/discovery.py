"""Finding the pool's ready workers from the Kubernetes API: EndpointSlices, listed then watched.

Each worker Service of the pool (one per model version: stable, canary) has EndpointSlices
labelled `kubernetes.io/service-name`. `EndpointSliceDiscovery.run` lists them (list + watch from
the list's resourceVersion, as client-go's reflector does), applies ADDED/MODIFIED/DELETED and
after every change hands the pool the ready endpoints of all slices. A watch the server ends
cleanly is resumed from the last resourceVersion seen (bookmarks keep it fresh); 410 Gone, an
ERROR event, a broken stream or any API error relists, after a capped exponential backoff for
errors. The pool keeps its last known replicas while the API is unreachable: an API outage must
not stop traffic. `replicas_from_slices` is the pure part the tests call directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from llmos_gateway.replicas import Pool, Replica

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone) or the server sent an ERROR event."""


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _port(slice_: dict[str, Any]) -> int | None:
    """The slice's port named "http", else its first port (None: the slice has no port)."""
    ports = [p for p in slice_.get("ports") or [] if isinstance(p, dict) and p.get("port")]
    named = [p for p in ports if p.get("name") == "http"]
    chosen = named or ports
    return int(chosen[0]["port"]) if chosen else None


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    return str(meta.get("name") or "") if isinstance(meta, dict) else ""


def _ready(endpoint: dict[str, Any]) -> bool:
    # why: the API documents an absent `ready` as true; a terminating endpoint takes no new work
    conditions = endpoint.get("conditions") or {}
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def replicas_from_slices(
    slices: Iterable[dict[str, Any]], services: dict[str, str], metrics_port: int | None = None
) -> list[Replica]:
    """The ready replicas of `slices`, one per address; `services` maps version -> Service name.

    Slices of other Services are ignored; a name seen twice (a pod in two slices, dual-stack)
    keeps the first by slice name, so the result does not depend on the order slices arrive in.
    """
    version_of = {service: version for version, service in services.items()}
    found: dict[str, Replica] = {}
    ordered = sorted(slices, key=lambda s: str((s.get("metadata") or {}).get("name", "")))
    for slice_ in ordered:
        labels = (slice_.get("metadata") or {}).get("labels") or {}
        version = version_of.get(labels.get(SERVICE_LABEL, ""))
        port = _port(slice_)
        if version is None or port is None:
            continue
        for endpoint in slice_.get("endpoints") or []:
            if not isinstance(endpoint, dict) or not _ready(endpoint):
                continue
            target = (endpoint.get("targetRef") or {}).get("name")
            addresses = [a for a in endpoint.get("addresses") or [] if isinstance(a, str)]
            for address in addresses:
                host = _host(address)
                name = target if target and len(addresses) == 1 else f"{host}:{port}"
                metrics = f"http://{host}:{metrics_port}/metrics" if metrics_port else None
                replica = Replica(name, f"http://{host}:{port}", version, metrics)
                found.setdefault(name, replica)
    return sorted(found.values(), key=lambda r: (r.version, r.name))


class EndpointSliceDiscovery:
    """Keeps `pool` equal to the ready endpoints of the pool's Services' EndpointSlices."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        api: str,
        namespace: str,
        services: dict[str, str],
        pool: Pool,
        *,
        metrics_port: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        watch_timeout_s: int = 300,
        warn_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not services:
            raise ValueError("EndpointSlice discovery needs at least one Service to watch")
        if len(set(services.values())) != len(services):
            raise ValueError(f"one Service cannot serve two versions: {services}")
        self.client = client
        self.url = (
            f"{api.rstrip('/')}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        )
        self.selector = f"{SERVICE_LABEL} in ({','.join(sorted(services.values()))})"
        self.services = services
        self.pool = pool
        self.metrics_port = metrics_port
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.watch_timeout_s = watch_timeout_s
        self.warn_every_s, self.clock = warn_every_s, clock
        self.slices: dict[str, dict[str, Any]] = {}  # slice name -> object
        self.resource_version = ""
        self.failures = 0  # consecutive, for the backoff
        self._last_warning = -float("inf")

    def _publish(self) -> None:
        self.pool.replace(
            replicas_from_slices(self.slices.values(), self.services, self.metrics_port)
        )

    def _warn(self, message: str, *args: object) -> None:
        """At WARNING once per `warn_every_s`, at DEBUG in between (an API outage is noisy)."""
        now = self.clock()
        level = logging.WARNING if now - self._last_warning >= self.warn_every_s else logging.DEBUG
        if level == logging.WARNING:
            self._last_warning = now
        log.log(level, message, *args)

    async def list(self) -> None:
        response = await self.client.get(self.url, params={"labelSelector": self.selector})
        response.raise_for_status()
        body = response.json()
        items = [i for i in body.get("items") or [] if isinstance(i, dict)]
        self.slices = {str(i["metadata"]["name"]): i for i in items if _name(i)}
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        self._publish()

    def apply(self, event: dict[str, Any]) -> None:
        """One watch event; raises WatchExpired on an ERROR event (410 Gone among them)."""
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise ValueError(f"a watch event without an object: {event!r:.200}")
        kind, name = event.get("type"), _name(obj)
        if kind == "ERROR":
            raise WatchExpired(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        meta: dict[str, Any] = obj.get("metadata") or {}
        self.resource_version = str(meta.get("resourceVersion") or self.resource_version)
        if kind not in ("ADDED", "MODIFIED", "DELETED") or not name:
            return  # BOOKMARK: only the resourceVersion moves
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        if kind == "DELETED" or service not in self.services.values():
            self.slices.pop(name, None)
        else:
            self.slices[name] = obj
        self._publish()

    async def watch(self) -> int:
        """One watch stream until the server ends it (the lines it sent); WatchExpired on 410 /
        an ERROR event."""
        params = {
            "watch": "true",
            "labelSelector": self.selector,
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self.watch_timeout_s),
        }
        # why: a quiet watch sends nothing for minutes; past the server's own end, the link is dead
        timeout = httpx.Timeout(10.0, read=self.watch_timeout_s + 30.0)
        async with self.client.stream("GET", self.url, params=params, timeout=timeout) as response:
            if response.status_code == 410:
                raise WatchExpired("410 Gone")
            if response.is_error:
                await response.aread()
                response.raise_for_status()
            self.failures = 0  # why: list and watch both answer; the next error backs off anew
            lines = 0
            async for line in response.aiter_lines():
                if line.strip():
                    event = json.loads(line)
                    if not isinstance(event, dict):
                        raise ValueError(f"a watch line that is not an event: {line:.200}")
                    self.apply(event)
                    lines += 1
        return lines

    async def run(self) -> None:
        """List, then watch for ever; never raises (but for cancellation)."""
        listed = False
        while True:
            try:
                if not listed:
                    await self.list()
                    listed = True
                if not await self.watch():  # ended cleanly: resume from resource_version
                    await asyncio.sleep(self.backoff_s)  # why: a server ending it at once
                continue
            except WatchExpired as exc:
                log.info("EndpointSlice watch expired (%s): relisting", exc)
            except (httpx.HTTPError, ValueError) as exc:
                self._warn("EndpointSlice discovery at %s failed: %s", self.url, exc)
            listed = False
            self.failures += 1
            await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (self.failures - 1)))
