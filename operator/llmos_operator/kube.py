"""A small async Kubernetes REST client (httpx) for the objects the operator owns.

kopf watches; this client reads and writes children: get, list, create, merge-patch, delete, and
`apply` = create-or-patch-when-drifted (three-way: a field the last apply wrote and the desired
object no longer has is deleted). "Already exists" on create is success (a retried reconcile),
"not found" on get/delete is a value, every other error status raises `KubeError`.
The API server address and credentials come from kopf's `ConnectionInfo`, and the HTTP transport
can be injected, so tests point it at an emulator without patching anything.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

MERGE_PATCH = "application/merge-patch+json"
# what `apply` last wrote, so a field dropped from the desired object is removed (as kubectl's
# last-applied-configuration does for client-side apply)
LAST_APPLIED = "llmos.dev/last-applied"
USER_AGENT = "llmos-operator/0.1.0"


class KubeError(Exception):
    """The API server refused a request (status other than the ones a caller expects)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


class OwnershipConflict(KubeError):
    """The object to apply exists and another controller owns it (a name two parents derive)."""


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controller owner reference (None: no controller)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("uid"))
    return None


@dataclass(frozen=True)
class Resource:
    """One REST resource: where it lives in the API."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


# kind -> resource, for every kind the operator reads or writes
RESOURCES: dict[str, Resource] = {
    "PersistentVolumeClaim": Resource("", "v1", "persistentvolumeclaims"),
    "ServiceAccount": Resource("", "v1", "serviceaccounts"),
    "Service": Resource("", "v1", "services"),
    "Pod": Resource("", "v1", "pods"),
    "Job": Resource("batch", "v1", "jobs"),
    "Deployment": Resource("apps", "v1", "deployments"),
    "PodDisruptionBudget": Resource("policy", "v1", "poddisruptionbudgets"),
    "NetworkPolicy": Resource("networking.k8s.io", "v1", "networkpolicies"),
    "HorizontalPodAutoscaler": Resource("autoscaling", "v2", "horizontalpodautoscalers"),
    "Role": Resource("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": Resource("rbac.authorization.k8s.io", "v1", "rolebindings"),
    "Namespace": Resource("", "v1", "namespaces", namespaced=False),
    "ResourceQuota": Resource("", "v1", "resourcequotas"),
    "ConfigMap": Resource("", "v1", "configmaps"),
    "LLMModel": Resource("llmos.dev", "v1alpha1", "llmmodels"),
    "InferencePool": Resource("llmos.dev", "v1alpha1", "inferencepools"),
    "QuotaPolicy": Resource("llmos.dev", "v1alpha1", "quotapolicies", namespaced=False),
}


def contains(actual: Any, desired: Any) -> bool:
    """Whether `actual` already holds everything `desired` says (server defaults may add more)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            key in actual and contains(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    if isinstance(desired, int | str) and isinstance(actual, int | str):
        # why: quantities round-trip as int or string ("2" == 2)
        return str(desired) == str(actual)
    return bool(actual == desired)


def removals(last: Any, desired: Any) -> dict[str, Any]:
    """The merge patch (keys set to None) that removes what `last` had and `desired` drops.

    Only mapping keys are compared: a merge patch replaces lists whole, so a list that shrank is
    already written as it is desired.
    """
    if not isinstance(last, dict) or not isinstance(desired, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in last.items():
        if key not in desired:
            out[key] = None
        elif sub := removals(value, desired[key]):
            out[key] = sub
    return out


def holds_any(actual: Any, removal: dict[str, Any]) -> bool:
    """Whether `actual` still has any key that `removal` deletes."""
    if not isinstance(actual, dict):
        return False
    for key, value in removal.items():
        if key not in actual:
            continue
        if value is None or holds_any(actual[key], value):
            return True
    return False


def _merge_removals(patch: dict[str, Any], removal: dict[str, Any]) -> dict[str, Any]:
    out = dict(patch)
    for key, value in removal.items():
        out[key] = None if value is None else _merge_removals(out.get(key) or {}, value)
    return out


def _last_applied(existing: dict[str, Any]) -> dict[str, Any]:
    raw = (existing.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        last = json.loads(raw) if raw else {}
    except ValueError:  # edited by hand into something else: nothing is known to be ours
        return {}
    return last if isinstance(last, dict) else {}


def _client_kwargs(info: kopf.ConnectionInfo) -> dict[str, Any]:
    headers: dict[str, str] = {"User-Agent": USER_AGENT}
    if info.token:
        headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
    verify: ssl.SSLContext | bool = True
    if info.insecure:
        verify = False
    elif info.ca_path or info.ca_data:
        ctx = ssl.create_default_context(
            cafile=str(info.ca_path) if info.ca_path else None,
            cadata=info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data,
        )
        if info.certificate_path and info.private_key_path:
            ctx.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
        verify = ctx
    auth = httpx.BasicAuth(info.username, info.password or "") if info.username else None
    return {"base_url": info.server, "headers": headers, "verify": verify, "auth": auth}


class KubeClient:
    """Async CRUD on Kubernetes objects by kind."""

    def __init__(
        self,
        info: kopf.ConnectionInfo,
        *,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            **_client_kwargs(info), timeout=timeout_s, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self, method: str, url: str, *, ok_missing: bool = False, **kwargs: Any
    ) -> dict[str, Any] | None:
        response = await self._http.request(method, url, **kwargs)
        if response.status_code == 404 and ok_missing:
            return None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise KubeError(
                response.status_code,
                str(body.get("reason", response.reason_phrase)),
                str(body.get("message", response.text[:500])),
            )
        result: dict[str, Any] = response.json()
        return result

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return await self._request("GET", RESOURCES[kind].path(namespace, name), ok_missing=True)

    async def list(
        self, kind: str, namespace: str | None, labels: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in (labels or {}).items())}
        body = await self._request("GET", RESOURCES[kind].path(namespace), params=params)
        items: list[dict[str, Any]] = (body or {}).get("items", [])
        wanted = labels or {}
        # why: filtering again is cheap and keeps a lax server from handing us others' objects
        return [
            item for item in items if contains(item.get("metadata", {}).get("labels", {}), wanted)
        ]

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        url = RESOURCES[body["kind"]].path(meta.get("namespace"))
        result = await self._request("POST", url, json=body)
        assert result is not None
        return result

    async def patch(
        self, kind: str, namespace: str | None, name: str, patch: dict[str, Any], sub: str = ""
    ) -> dict[str, Any] | None:
        """JSON merge patch (RFC 7396); None when the object is gone."""
        return await self._request(
            "PATCH",
            RESOURCES[kind].path(namespace, name, sub),
            ok_missing=True,
            json=patch,
            headers={"Content-Type": MERGE_PATCH},
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        """Delete (foreground for children); False when it was already gone."""
        url = RESOURCES[kind].path(namespace, name)
        result = await self._request(
            "DELETE", url, ok_missing=True, params={"propagationPolicy": "Background"}
        )
        return result is not None

    async def apply(self, desired: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Create `desired` or patch the existing object back to it: (object, what was done).

        The object carries what was applied in an annotation (`LAST_APPLIED`); a field that the
        last apply wrote and this one drops is deleted, fields others added (server defaults,
        other controllers) are left alone.
        """
        owned = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
        record = json.dumps(owned, sort_keys=True, separators=(",", ":"))
        meta = dict(desired["metadata"])
        meta["annotations"] = {**(meta.get("annotations") or {}), LAST_APPLIED: record}
        desired = {**desired, "metadata": meta}
        kind, namespace, name = desired["kind"], meta.get("namespace"), meta["name"]
        existing = await self.get(kind, namespace, name)
        if existing is None:
            try:
                return await self.create(desired), "created"
            except KubeError as exc:
                if exc.status != 409:
                    raise
                existing = await self.get(kind, namespace, name)
                if existing is None:
                    raise
        mine, theirs = controller_uid(desired), controller_uid(existing)
        if mine is not None and theirs is not None and mine != theirs:
            # why: e.g. pool "chat"'s gateway and pool "chat-gateway" both name a Deployment
            # chat-gateway; patching would hand one parent's object to the other
            raise OwnershipConflict(
                409, "OwnedByAnother", f"{kind} {name} exists and belongs to another owner"
            )
        owned = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
        dropped = removals(_last_applied(existing), owned)
        if contains(existing, owned) and not holds_any(existing, dropped):
            return existing, "unchanged"
        patched = await self.patch(kind, namespace, name, _merge_removals(owned, dropped))
        if patched is None:  # deleted between our get and patch: the next reconcile creates it
            return existing, "gone"
        return patched, "patched"
