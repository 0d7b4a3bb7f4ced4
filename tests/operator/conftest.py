"""The Kubernetes API the operator tests run against: kmock's emulator plus a real server's habits.

`ApiServer` is kmock's `KubernetesEmulator` (stateful objects, watch streams, finalizers,
deletionTimestamp) with what a real kube-apiserver also does and the emulator does not. Each
behaviour added here, as a real API server has it:

1. create: `metadata.uid` (a UUID), `metadata.creationTimestamp`, `metadata.generation = 1`;
   `metadata.namespace` filled from the URL when the body leaves it out.
2. every write (create, patch): a fresh, increasing `metadata.resourceVersion`; a JSON patch
   whose `test` op fails (kopf tests resourceVersion) is refused with 422, not applied.
3. a patch that changes `.spec` bumps `metadata.generation` (metadata/status changes do not).
4. the status subresource: on kinds that have one, `status` is dropped from creates and from
   patches to the main endpoint, and a patch to `/status` changes only `status`.
5. `GET /api/v1/namespaces` lists and watches the stored namespaces, and
   `GET /api/v1/namespaces/<name>` reads one (kmock cannot route either URL).
6. create with `metadata.generateName` and no name: the name is the prefix + 5 random characters
   (kopf names the Events it posts that way).
7. the served resources are declared (with kinds, namespacing, subresources, verbs) as an API
   server's discovery reports them, including apiextensions' CustomResourceDefinitions, which
   are loaded from the generated crds/ directory.

It also records every request the operator makes (kopf's and the operator's own client, told
apart from the tests' requests by User-Agent) as (group, resource[/subresource], verb) - the
evidence the RBAC test compares with the ClusterRole. Not added (the operator must not need
them): garbage collection by owner references, label-selector filtering, admission, defaulting.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import httpx
import jsonpointer
import kmock
import kopf
import pytest
import yaml

from llmos_operator.app import build_registry
from llmos_operator.config import OperatorConfig
from llmos_operator.handlers.autoscaling import AutoscalerSettings
from llmos_operator.handlers.quota import WEBHOOK
from llmos_operator.handlers.registration import CONFIG
from llmos_operator.metrics import OperatorMetrics
from llmos_operator.quota.webhook import WebhookConfig

ROOT = Path(__file__).resolve().parents[2]
NS = "team-a"

# plural -> (group, version, kind, namespaced, subresources)
RESOURCES: dict[str, tuple[str, str, str, bool, set[str]]] = {
    "customresourcedefinitions": (
        "apiextensions.k8s.io", "v1", "CustomResourceDefinition", False, {"status"}
    ),
    "llmmodels": ("llmos.dev", "v1alpha1", "LLMModel", True, {"status"}),
    "inferencepools": ("llmos.dev", "v1alpha1", "InferencePool", True, {"status", "scale"}),
    "quotapolicies": ("llmos.dev", "v1alpha1", "QuotaPolicy", False, {"status"}),
    "namespaces": ("", "v1", "Namespace", False, {"status"}),  # discovery only (kopf waits)
    "pods": ("", "v1", "Pod", True, {"status"}),
    "persistentvolumeclaims": ("", "v1", "PersistentVolumeClaim", True, {"status"}),
    "services": ("", "v1", "Service", True, {"status"}),
    "serviceaccounts": ("", "v1", "ServiceAccount", True, set()),
    "events": ("", "v1", "Event", True, set()),
    "jobs": ("batch", "v1", "Job", True, {"status"}),
    "deployments": ("apps", "v1", "Deployment", True, {"status", "scale"}),
    "poddisruptionbudgets": ("policy", "v1", "PodDisruptionBudget", True, {"status"}),
    # kinds the quota, autoscaling and security features read or write
    "resourcequotas": ("", "v1", "ResourceQuota", True, {"status"}),
    "configmaps": ("", "v1", "ConfigMap", True, set()),
    "secrets": ("", "v1", "Secret", True, set()),
    "networkpolicies": ("networking.k8s.io", "v1", "NetworkPolicy", True, set()),
    # each pool's gateway RBAC
    "roles": ("rbac.authorization.k8s.io", "v1", "Role", True, set()),
    "rolebindings": ("rbac.authorization.k8s.io", "v1", "RoleBinding", True, set()),
    "horizontalpodautoscalers": (
        "autoscaling", "v2", "HorizontalPodAutoscaler", True, {"status"}
    ),
}  # fmt: skip
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def verb_of(method: str, name: str | None, params: dict[str, str]) -> str:
    if method == "GET":
        return "watch" if params.get("watch") == "true" else "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]


class ApiServer(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator + the real API server behaviours listed in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.evidence: list[tuple[str, str, str]] = []
        self._versions = itertools.count(1000)
        for plural, (group, version, kind, namespaced, subs) in RESOURCES.items():
            key = f"{group}/{version}/{plural}" if group else f"v1/{plural}"
            self.resources[key] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, subresources=subs, verbs=VERBS
            )
        # why: a real cluster has the namespace the tests work in (with the label it sets)
        namespace = {"name": NS, "labels": {"kubernetes.io/metadata.name": NS}}
        self.objects["v1/namespaces", None, NS] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": namespace,
        }
        for path in sorted((ROOT / "crds").glob("*.llmos.dev.yaml")):
            crd = yaml.safe_load(path.read_text())
            self.objects[
                "apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]
            ] = crd

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # why: kmock cannot parse the cluster-scoped /api/v1/namespaces URL (it takes
        # "namespaces" for the namespace prefix); a real server lists namespaces there
        parts = raw_request.path.strip("/").split("/")
        if (
            parts[:3] == ["api", "v1", "namespaces"]
            and len(parts) == 4
            and raw_request.method == "GET"
        ):
            return self._namespace(raw_request, parts[3])
        if raw_request.path.rstrip("/") == "/api/v1/namespaces" and raw_request.method == "GET":
            watch = raw_request.query.get("watch") == "true"
            agent = raw_request.headers.get("User-Agent", "")
            if agent.startswith(("kopf/", "llmos-operator/")):
                self.evidence.append(("", "namespaces", "watch" if watch else "list"))
            items = [
                dict(obj.raw)
                for (res, _, _), obj in self.objects.items()
                if res.plural == "namespaces" and res.group == "" and not obj.deleted
            ]
            if not watch:
                meta = {"resourceVersion": str(next(self._versions))}
                body = {
                    "apiVersion": "v1",
                    "kind": "NamespaceList",
                    "metadata": meta,
                    "items": items,
                }
                return aiohttp.web.json_response(body)
            stream = aiohttp.web.StreamResponse()
            await stream.prepare(raw_request)
            for item in items:
                await stream.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
            async for event in self._buses[
                kmock.resource(group="", version="v1", plural="namespaces")
            ]:
                await stream.write(json.dumps(event).encode() + b"\n")
            return stream
        response: aiohttp.web.StreamResponse = await super().__call__(raw_request)
        return response

    def _namespace(self, raw_request: aiohttp.web.BaseRequest, name: str) -> aiohttp.web.Response:
        agent = raw_request.headers.get("User-Agent", "")
        if agent.startswith(("kopf/", "llmos-operator/")):
            self.evidence.append(("", "namespaces", "get"))
        for (res, _, obj_name), obj in self.objects.items():
            found = res.plural == "namespaces" and res.group == "" and obj_name == name
            if found and not obj.deleted:
                return aiohttp.web.json_response(dict(obj.raw))
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
        status |= {"reason": "NotFound", "message": f'namespaces "{name}" not found'}
        return aiohttp.web.json_response(status, status=404)

    def _now(self) -> str:
        return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _current(self, request: Any) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return dict(self.objects[key].raw)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is not None and res.plural in RESOURCES:
            plural = res.plural + (f"/{request.subresource}" if request.subresource else "")
            method = str(
                request.method.value if hasattr(request.method, "value") else request.method
            )
            agent = str(request.headers.get("User-Agent", ""))
            if agent.startswith(("kopf/", "llmos-operator/")):
                verb = verb_of(method, request.name, request.params)
                self.evidence.append((res.group, plural, verb))
            has_status = "status" in RESOURCES[res.plural][4]
            data = request.data if isinstance(request.data, dict) else None
            if data is not None and method == "POST":
                meta = data.setdefault("metadata", {})
                if meta.get("generateName") and not meta.get("name"):
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("namespace", request.namespace) if request.namespace else None
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = self._now()
                meta["generation"] = 1
                meta["resourceVersion"] = str(next(self._versions))
                if has_status:
                    data.pop("status", None)
            elif data is not None and method == "PATCH":
                current = self._current(request) or {}
                if request.subresource == "status":
                    for key in list(data):
                        if key != "status":
                            del data[key]
                else:
                    if has_status:
                        data.pop("status", None)
                    merged = _merge(current.get("spec"), data.get("spec"))
                    if "spec" in data and merged != current.get("spec"):
                        generation = int(current.get("metadata", {}).get("generation") or 0) + 1
                        data.setdefault("metadata", {})["generation"] = generation
                data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
            elif isinstance(request.data, list) and method == "PATCH":
                self._json_patch(request, request.data)
        return await super()._handle(request)

    def _json_patch(self, request: Any, ops: list[dict[str, Any]]) -> None:
        """RFC 6902 patches: a failed `test` op is 422 Invalid (optimistic concurrency)."""
        current = self._current(request) or {}
        for op in ops:
            if op.get("op") == "test":
                actual = jsonpointer.resolve_pointer(current, op["path"], None)
                if actual != op.get("value"):
                    raise kmock.KubernetesError(
                        status=422,
                        reason="Invalid",
                        message=f"the test of {op['path']} failed: {actual!r} != {op['value']!r}",
                    )
        if request.subresource == "status":
            ops[:] = [op for op in ops if op["path"].startswith("/status") or op["op"] == "test"]
        if any(op["path"].startswith("/spec") for op in ops if op.get("op") != "test"):
            generation = int(current.get("metadata", {}).get("generation") or 0) + 1
            ops.append({"op": "add", "path": "/metadata/generation", "value": generation})
        version = str(next(self._versions))
        ops.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch (to tell whether a patch changes .spec)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


class Cluster:
    """Test-side client of the emulated API server (talks HTTP, as kubectl would)."""

    def __init__(self, server: ApiServer, url: str) -> None:
        self.server = server
        self.url = url
        self.http = httpx.AsyncClient(
            base_url=url, timeout=10, headers={"User-Agent": "llmos-tests"}
        )

    @staticmethod
    def path(plural: str, namespace: str | None = NS, name: str = "", sub: str = "") -> str:
        group, version, _, namespaced, _ = RESOURCES[plural]
        base = f"/apis/{group}/{version}" if group else "/api/v1"
        if namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")
        return base

    async def create(self, plural: str, body: dict[str, Any], namespace: str = NS) -> Any:
        response = await self.http.post(self.path(plural, namespace), json=body)
        response.raise_for_status()
        return response.json()

    async def get(self, plural: str, name: str, namespace: str = NS) -> dict[str, Any] | None:
        response = await self.http.get(self.path(plural, namespace, name))
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def patch(
        self, plural: str, name: str, patch: dict[str, Any], sub: str = "", namespace: str = NS
    ) -> Any:
        response = await self.http.patch(
            self.path(plural, namespace, name, sub),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        response.raise_for_status()
        return response.json()

    async def delete(self, plural: str, name: str, namespace: str = NS) -> int:
        response = await self.http.delete(self.path(plural, namespace, name))
        return response.status_code

    def names(self, plural: str, namespace: str = NS) -> list[str]:
        """Names of the live objects of a kind (read from the emulator's store)."""
        out = []
        for (res, ns, name), obj in self.server.objects.items():
            if res.plural == plural and ns == namespace and not obj.deleted:
                out.append(name)
        return sorted(out)

    async def wait_for(
        self, check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = ""
    ) -> Any:
        """Poll `check` until it returns something truthy."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = await check()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what or check}")
            await asyncio.sleep(0.05)


@pytest.fixture(scope="session")
def operator_evidence() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every operator request in every operator test of the session."""
    return set()


@pytest.fixture
async def cluster(operator_evidence: set[tuple[str, str, str]]) -> AsyncIterator[Cluster]:
    server = ApiServer()
    async with server, kmock.Server(server) as http_server:
        client = Cluster(server, str(http_server.url).rstrip("/"))
        yield client
        await client.http.aclose()
    operator_evidence.update(server.evidence)


def test_config(cluster: Cluster) -> OperatorConfig:
    return OperatorConfig(
        api_server=cluster.url,
        worker_image="registry.example/llmos-worker:test",
        model_wait_delay_s=0.3,
        reconcile_interval_s=0.5,
        error_backoff_s=0.2,
        watch_timeout_s=30,
        http_timeout_s=5,
    )


# the autoscaler of the tests: quick ticks, no metrics port of its own
AUTOSCALER = AutoscalerSettings(interval_s=0.2, scrape_timeout_s=1.0, metrics_port=None)


class OperatorProcess:
    """The real kopf operator (the whole `build_registry`) in a thread of its own; stop() +
    start() is a restart. The webhook listens on loopback (a free port unless given).

    why a thread: kopf cancels every asyncio task created after it started when it stops, which
    would include pytest's own fixture tasks if it shared their event loop.
    """

    def __init__(
        self,
        config: OperatorConfig,
        *,
        webhook: WebhookConfig | None = None,
        autoscaler: AutoscalerSettings = AUTOSCALER,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.webhook = webhook or WebhookConfig()
        self.autoscaler = autoscaler
        self.metrics = metrics or OperatorMetrics()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _main(self, ready: threading.Event) -> None:
        registry = build_registry(self.config, autoscaler=self.autoscaler, metrics=self.metrics)

        async def operate() -> None:
            self._loop = asyncio.get_running_loop()
            await kopf.operator(
                registry=registry,
                clusterwide=True,
                standalone=True,
                memo=kopf.Memo({CONFIG: self.config, WEBHOOK: self.webhook}),
                stop_flag=self._stop,
                ready_flag=ready,
            )

        try:
            asyncio.run(operate())
        except BaseException as exc:  # why: surfaced by stop(), not lost in the thread
            self.errors.append(exc)

    def _pending(self) -> str:
        """The operator's unfinished tasks with their stacks (why it did not stop)."""
        loop, out = self._loop, io.StringIO()
        for task in asyncio.all_tasks(loop) if loop is not None else ():
            out.write(f"--- {task.get_name()}\n")
            task.print_stack(limit=6, file=out)
        return out.getvalue()[-6000:]

    async def start(self) -> None:
        self._stop = threading.Event()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), daemon=True)
        self._thread.start()
        started = await asyncio.to_thread(ready.wait, 10)
        assert started, f"the operator did not start: {self.errors}"

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 15)
        assert not self._thread.is_alive(), f"the operator did not stop:\n{self._pending()}"
        self._thread = None
        assert not self.errors, f"the operator crashed: {self.errors}"


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[OperatorProcess]:
    process = OperatorProcess(test_config(cluster))
    await process.start()
    yield process
    await process.stop()
