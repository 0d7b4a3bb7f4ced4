"""Asking the Kubernetes API to scale the gateway's InferencePool (from zero, and back to zero).

The gateway writes the pool's `spec.replicas` with a merge patch, the field the operator's
builtin autoscaler writes and the pool's scale subresource (`specReplicasPath`) points at, so the
pool reconcile turns it into worker Deployment replicas like any `kubectl scale`. Scale-up only
ever raises 0 to `min_replicas` (at least 1) and leaves a pool that already asks for replicas
alone; scale-down to zero is asked only by the idle watcher. Inside a pod the API address, the
service-account token and CA come from the standard mounts; tests pass a plain URL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
GROUP, VERSION, PLURAL = "llmos.dev", "v1alpha1", "inferencepools"


def in_cluster_api() -> str | None:
    host, port = (
        os.environ.get("KUBERNETES_SERVICE_HOST"),
        os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
    )
    if not host:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def in_cluster_client(timeout_s: float = 5.0) -> httpx.AsyncClient:
    """An API client with the pod's service-account token (re-read per request: it rotates)."""

    def auth(request: httpx.Request) -> httpx.Request:
        token = (SA_DIR / "token").read_text().strip()
        request.headers["Authorization"] = f"Bearer {token}"
        return request

    ca = SA_DIR / "ca.crt"
    return httpx.AsyncClient(timeout=timeout_s, verify=str(ca) if ca.exists() else True, auth=auth)


class PoolScaler:
    """Reads and patches one InferencePool's `spec.replicas`."""

    def __init__(self, client: httpx.AsyncClient, api_url: str, namespace: str, name: str) -> None:
        self.client = client
        self.url = (
            f"{api_url.rstrip('/')}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        )

    async def _get(self) -> dict[str, Any]:
        response = await self.client.get(self.url)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def _patch(self, replicas: int) -> None:
        response = await self.client.patch(
            self.url,
            json={"spec": {"replicas": replicas}},
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()

    async def scale_up(self) -> bool:
        """Ask for replicas when the pool asks for none; True when it now asks for some."""
        spec = (await self._get()).get("spec") or {}
        if int(spec.get("replicas") or 0) > 0:
            return True
        autoscaling = spec.get("autoscaling") or {}
        target = max(1, int(autoscaling.get("minReplicas") or 1))
        log.info("pool at zero with requests waiting: asking for %d replica(s)", target)
        await self._patch(target)
        return True

    async def scale_to_zero(self) -> bool:
        spec = (await self._get()).get("spec") or {}
        if int(spec.get("replicas") or 0) == 0:
            return False
        log.info("pool idle: asking for zero replicas")
        await self._patch(0)
        return True


class IdleWatcher:
    """Asks for zero replicas after `idle_s` without a request or one in flight."""

    def __init__(
        self,
        scale_to_zero: Callable[[], Any],
        busy: Callable[[], bool],
        *,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scale_to_zero = scale_to_zero
        self.busy = busy
        self.idle_s = idle_s
        self.clock = clock
        self.last_activity = clock()
        self.scaled_down = False

    def touch(self) -> None:
        self.last_activity = self.clock()
        self.scaled_down = False

    async def check(self) -> bool:
        """One look; True when it asked for zero now."""
        if self.busy():
            self.touch()
            return False
        if self.scaled_down or self.clock() - self.last_activity < self.idle_s:
            return False
        try:
            await self.scale_to_zero()
        except httpx.HTTPError as exc:  # why: retried at the next look
            log.warning("scale-to-zero request failed: %s", exc)
            return False
        self.scaled_down = True
        return True

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(min(interval_s, self.idle_s))
            await self.check()
