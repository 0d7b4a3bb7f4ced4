"""EndpointSlice discovery: slices -> ready replicas (pure), and list + watch against kmock.

The emulated API is kmock's `KubernetesEmulator` plus what discovery relies on from a real API
server and the emulator lacks (the operator tests' `ApiServer` does not serve EndpointSlices):

1. `discovery.k8s.io/v1` `endpointslices` is a served, namespaced resource.
2. every create and patch stamps a fresh, increasing `metadata.resourceVersion`, and a list
   reports the latest one in `metadata.resourceVersion` (kmock answers "...").
3. failures on demand, as a real server has them: a list answered with an error status, a watch
   answered with a 410 Gone ERROR event (its resourceVersion expired), a watch the server ends
   after some events (its `timeoutSeconds` ran out). A connection dropped mid-watch is made on
   the client's side instead (`DroppingTransport`): kmock ends a failing stream cleanly.

Not added: label-selector filtering (discovery ignores other Services' slices itself; the tests
check the selector it sends) and watching from a resourceVersion (kmock replays every object as
ADDED at the start of each watch, which discovery must take as it takes any repeated event).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import kmock
import pytest

from llmos_gateway.cli import build, parser
from llmos_gateway.discovery import (
    SERVICE_LABEL,
    EndpointSliceDiscovery,
    WatchExpired,
    replicas_from_slices,
)
from llmos_gateway.errors import ConfigError
from llmos_gateway.replicas import Pool, Replica
from tests.gateway.conftest import GatewayServer, WorkerProcess

NS = "team-a"
SERVICES = {"stable": "chat", "canary": "chat-canary"}
SLICES = "/apis/discovery.k8s.io/v1/namespaces/team-a/endpointslices"


def endpoint(
    ip: str, pod: str | None = None, *, ready: bool | None = True, terminating: bool | None = None
) -> dict[str, Any]:
    conditions: dict[str, bool] = {}
    if ready is not None:
        conditions["ready"] = ready
    if terminating is not None:
        conditions["terminating"] = terminating
    body: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if pod:
        body["targetRef"] = {"kind": "Pod", "name": pod, "namespace": NS}
    return body


def slice_body(
    name: str,
    service: str,
    endpoints: list[dict[str, Any]],
    *,
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {SERVICE_LABEL: service}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


def names(replicas: list[Replica]) -> list[str]:
    return [r.name for r in replicas]


# --- slices -> replicas (no API) --------------------------------------------------------------


def test_ready_absent_not_ready_and_terminating() -> None:
    s = slice_body(
        "chat-1",
        "chat",
        [
            endpoint("10.0.0.1", "w-ready"),
            endpoint("10.0.0.2", "w-unset", ready=None),  # absent: ready, as the API documents
            endpoint("10.0.0.3", "w-not-ready", ready=False),
            endpoint("10.0.0.4", "w-terminating", ready=False, terminating=True),
            endpoint("10.0.0.5", "w-draining", ready=True, terminating=True),
        ],
    )
    replicas = replicas_from_slices([s], SERVICES)
    assert names(replicas) == ["w-ready", "w-unset"]
    ready = replicas[0]
    assert (ready.url, ready.version, ready.metrics_url) == ("http://10.0.0.1:8000", "stable", None)


def test_name_is_ip_port_without_target_ref_and_metrics_url_from_metrics_port() -> None:
    s = slice_body("chat-1", "chat", [endpoint("10.0.0.7")])
    (replica,) = replicas_from_slices([s], SERVICES, metrics_port=9090)
    assert replica.name == "10.0.0.7:8000"
    assert replica.url == "http://10.0.0.7:8000"
    assert replica.metrics_url == "http://10.0.0.7:9090/metrics"


def test_ipv6_addresses_in_brackets() -> None:
    s = slice_body(
        "chat-v6",
        "chat",
        [endpoint("fd00::5", "w0"), endpoint("fd00::6")],
        address_type="IPv6",
    )
    by_name = {r.name: r for r in replicas_from_slices([s], SERVICES, metrics_port=9090)}
    assert by_name["w0"].url == "http://[fd00::5]:8000"
    assert by_name["w0"].metrics_url == "http://[fd00::5]:9090/metrics"
    assert by_name["[fd00::6]:8000"].url == "http://[fd00::6]:8000"


def test_port_named_http_else_the_first_else_none() -> None:
    ports = [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8001}]
    named = slice_body("a", "chat", [endpoint("10.0.0.1", "w0")], ports=ports)
    assert [r.url for r in replicas_from_slices([named], SERVICES)] == ["http://10.0.0.1:8001"]
    ports = [{"name": "api", "port": 7000}, {"name": "admin", "port": 7001}]
    first = slice_body("b", "chat", [endpoint("10.0.0.2", "w1")], ports=ports)
    assert [r.url for r in replicas_from_slices([first], SERVICES)] == ["http://10.0.0.2:7000"]
    portless = slice_body("c", "chat", [endpoint("10.0.0.3", "w2")], ports=[])
    assert replicas_from_slices([portless], SERVICES) == []


def test_two_services_two_versions_and_other_services_ignored() -> None:
    slices = [
        slice_body("chat-canary-1", "chat-canary", [endpoint("10.0.1.1", "c0")]),
        slice_body("chat-1", "chat", [endpoint("10.0.0.1", "s0"), endpoint("10.0.0.2", "s1")]),
        slice_body("other-1", "other", [endpoint("10.0.9.9", "x0")]),
    ]
    replicas = replicas_from_slices(slices, SERVICES)
    assert [(r.version, r.name) for r in replicas] == [
        ("canary", "c0"),
        ("stable", "s0"),
        ("stable", "s1"),
    ]


def test_one_replica_per_address_and_a_pod_in_two_slices_once() -> None:
    two = {"addresses": ["10.0.0.1", "10.0.0.2"], "targetRef": {"name": "w0"}}
    first = slice_body("chat-a", "chat", [two])
    moved = slice_body("chat-b", "chat", [endpoint("10.0.0.9", "w1"), endpoint("10.0.0.8", "w9")])
    again = slice_body("chat-c", "chat", [endpoint("10.0.0.7", "w1")])
    replicas = replicas_from_slices([again, moved, first], SERVICES)
    assert names(replicas) == ["10.0.0.1:8000", "10.0.0.2:8000", "w1", "w9"]
    assert {r.name: r.url for r in replicas}["w1"] == "http://10.0.0.9:8000"  # chat-b < chat-c


def test_services_must_be_given_and_distinct() -> None:
    client = httpx.AsyncClient()
    with pytest.raises(ValueError, match="at least one"):
        EndpointSliceDiscovery(client, "http://api", NS, {}, Pool())
    with pytest.raises(ValueError, match="two versions"):
        EndpointSliceDiscovery(client, "http://api", NS, {"a": "chat", "b": "chat"}, Pool())


def test_events_bookmark_relabel_and_error() -> None:
    pool = Pool()
    disco = EndpointSliceDiscovery(httpx.AsyncClient(), "http://api", NS, SERVICES, pool)
    s = slice_body("chat-1", "chat", [endpoint("10.0.0.1", "w0")])
    s["metadata"]["resourceVersion"] = "5"
    disco.apply({"type": "ADDED", "object": s})
    assert names(pool.all()) == ["w0"]
    bookmark = {"kind": "EndpointSlice", "metadata": {"resourceVersion": "9"}}
    disco.apply({"type": "BOOKMARK", "object": bookmark})
    assert disco.resource_version == "9"
    assert names(pool.all()) == ["w0"]
    relabelled = slice_body("chat-1", "other", [endpoint("10.0.0.1", "w0")])
    disco.apply({"type": "MODIFIED", "object": relabelled})  # no longer the pool's Service
    assert len(pool) == 0
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
    with pytest.raises(WatchExpired, match="410"):
        disco.apply({"type": "ERROR", "object": gone})
    with pytest.raises(ValueError):
        disco.apply({"type": "ADDED"})


# --- list + watch against the emulated API ----------------------------------------------------


class SliceApi(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator + the behaviours listed in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.resources["discovery.k8s.io/v1/endpointslices"] = kmock.ResourceInfo(
            kind="EndpointSlice", namespaced=True, verbs={"get", "list", "watch", "create", "patch"}
        )
        self._versions = itertools.count(100)
        self.version = "99"
        self.seen: list[tuple[str, dict[str, str]]] = []  # (LIST | WATCH, query) of reads
        self.fail_lists: list[int] = []  # statuses for the next lists
        self.expire_watches = 0  # the next watches answer 410 Gone
        self.end_watch_after: int | None = None  # the server ends each watch after N events

    async def _handle(self, request: Any) -> Any:
        action = str(request.action.value if request.action is not None else "")
        if action in ("LIST", "WATCH"):
            self.seen.append((action, dict(request.params)))
        if action == "LIST" and self.fail_lists:
            status = self.fail_lists.pop(0)
            raise kmock.KubernetesError(status=status, reason="InternalError", message="down")
        if action in ("CREATE", "UPDATE") and isinstance(request.data, dict):
            self.version = str(next(self._versions))
            request.data.setdefault("metadata", {})["resourceVersion"] = self.version
        return await super()._handle(request)

    async def _serve_list(self, request: Any) -> Any:
        body: Any = await super()._serve_list(request)
        body["metadata"]["resourceVersion"] = self.version
        return body

    async def _serve_watch(self, request: Any) -> AsyncIterator[Any]:
        if self.expire_watches:
            self.expire_watches -= 1
            yield b""
            status = {"kind": "Status", "status": "Failure", "code": 410, "reason": "Expired"}
            yield {"type": "ERROR", "object": status | {"message": "too old resource version"}}
            return
        sent = 0
        async for event in super()._serve_watch(request):
            yield event
            sent += event != b""
            if self.end_watch_after is not None and sent >= self.end_watch_after:
                return


class Api:
    def __init__(self, server: SliceApi, url: str) -> None:
        self.server, self.url = server, url
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    async def create(self, body: dict[str, Any]) -> None:
        (await self.http.post(SLICES, json=body)).raise_for_status()

    async def patch(self, name: str, patch: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/merge-patch+json"}
        (await self.http.patch(f"{SLICES}/{name}", json=patch, headers=headers)).raise_for_status()

    async def delete(self, name: str) -> None:
        (await self.http.delete(f"{SLICES}/{name}")).raise_for_status()

    def reads(self, action: str) -> list[dict[str, str]]:
        return [query for kind, query in self.server.seen if kind == action]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    server = SliceApi()
    async with server, kmock.Server(server) as http_server:
        client = Api(server, str(http_server.url).rstrip("/"))
        yield client
        await client.http.aclose()


@contextlib.asynccontextmanager
async def running(disco: EndpointSliceDiscovery) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(disco.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def discovery(api: Api, pool: Pool, client: httpx.AsyncClient, **kw: Any) -> EndpointSliceDiscovery:
    return EndpointSliceDiscovery(client, api.url, NS, SERVICES, pool, backoff_s=0.01, **kw)


async def test_pool_fills_drops_not_ready_and_empties_on_delete(api: Api) -> None:
    await api.create(
        slice_body("chat-abc", "chat", [endpoint("10.0.0.1", "w0"), endpoint("10.0.0.2", "w1")])
    )
    pool = Pool()
    async with httpx.AsyncClient(timeout=5) as client, running(discovery(api, pool, client)):
        await until(lambda: names(pool.all()) == ["w0", "w1"], "two ready replicas")
        assert {r.url for r in pool.all()} == {"http://10.0.0.1:8000", "http://10.0.0.2:8000"}
        await api.patch(
            "chat-abc",
            {"endpoints": [endpoint("10.0.0.1", "w0"), endpoint("10.0.0.2", "w1", ready=False)]},
        )
        await until(lambda: names(pool.all()) == ["w0"], "the not-ready endpoint to drop")
        await api.delete("chat-abc")
        await until(lambda: len(pool) == 0, "the pool to empty")
    (listed,) = api.reads("LIST")
    assert listed["labelSelector"] == f"{SERVICE_LABEL} in (chat,chat-canary)"
    watched = api.reads("WATCH")[0]
    assert watched["resourceVersion"] == "100"  # the list's, not "" (a watch from now)
    assert watched["allowWatchBookmarks"] == "true"
    assert watched["labelSelector"] == listed["labelSelector"]


async def test_two_services_and_relist_after_410_gone(api: Api) -> None:
    await api.create(slice_body("chat-abc", "chat", [endpoint("10.0.0.1", "s0")]))
    await api.create(slice_body("other-xyz", "other", [endpoint("10.0.9.9", "x0")]))
    api.server.expire_watches = 1
    pool = Pool()
    async with httpx.AsyncClient(timeout=5) as client, running(discovery(api, pool, client)):
        await until(lambda: len(api.reads("LIST")) == 2, "a relist after 410 Gone")
        await until(lambda: len(api.reads("WATCH")) == 2, "the watch after the relist")
        await api.create(slice_body("chat-canary-q", "chat-canary", [endpoint("10.0.1.1", "c0")]))
        await until(lambda: len(pool) == 2, "the canary replica")
        assert sorted((r.version, r.name) for r in pool.all()) == [
            ("canary", "c0"),
            ("stable", "s0"),
        ]


async def test_watch_ended_by_the_server_resumes_from_the_last_version(api: Api) -> None:
    await api.create(slice_body("chat-abc", "chat", [endpoint("10.0.0.1", "s0")]))
    api.server.end_watch_after = 2  # the replayed ADDED, then one change
    pool = Pool()
    async with httpx.AsyncClient(timeout=5) as client, running(discovery(api, pool, client)):
        await until(lambda: len(pool) == 1, "the first replica")
        await api.patch("chat-abc", {"endpoints": [endpoint("10.0.0.2", "s1")]})
        await until(lambda: len(api.reads("WATCH")) >= 2, "a second watch")
        assert names(pool.all()) == ["s1"]
        assert api.reads("WATCH")[1]["resourceVersion"] == "101"  # the patch's version
        assert len(api.reads("LIST")) == 1  # a clean end is no reason to relist


async def test_api_errors_back_off_warn_once_and_recover(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    await api.create(slice_body("chat-abc", "chat", [endpoint("10.0.0.1", "s0")]))
    api.server.fail_lists = [500, 503, 500]
    pool = Pool()
    caplog.set_level(logging.DEBUG, logger="llmos_gateway.discovery")
    async with httpx.AsyncClient(timeout=5) as client, running(discovery(api, pool, client)):
        await until(lambda: len(pool) == 1, "the replica once the API answers")
    assert len(api.reads("LIST")) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited: the other two failures are at DEBUG
    assert "500" in warnings[0].getMessage()


async def test_unreachable_api_keeps_the_last_replicas_and_keeps_trying() -> None:
    pool = Pool()
    pool.replace([Replica("w0", "http://10.0.0.1:8000")])
    async with httpx.AsyncClient(timeout=1) as client:
        # why: port 9 on loopback: the connection is refused at once
        disco = EndpointSliceDiscovery(
            client, "http://127.0.0.1:9", NS, SERVICES, pool, backoff_s=0.01, max_backoff_s=0.05
        )
        async with running(disco) as task:
            await until(lambda: disco.failures >= 4, "several failed tries")
            assert not task.done()
        assert names(pool.all()) == ["w0"]


class _Broken(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk
            raise httpx.ReadError("connection reset by peer")

    async def aclose(self) -> None:
        await self.inner.aclose()


class DroppingTransport(httpx.AsyncBaseTransport):
    """A real transport whose next `drops` watch streams break after their first chunk."""

    def __init__(self, drops: int) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.drops = drops

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.params.get("watch") != "true" or not self.drops:
            return response
        self.drops -= 1
        assert isinstance(response.stream, httpx.AsyncByteStream)
        stream = _Broken(response.stream)
        return httpx.Response(response.status_code, headers=response.headers, stream=stream)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_dropped_watch_relists(api: Api) -> None:
    await api.create(slice_body("chat-abc", "chat", [endpoint("10.0.0.1", "s0")]))
    pool = Pool()
    transport = DroppingTransport(drops=1)
    async with (
        httpx.AsyncClient(timeout=5, transport=transport) as client,
        running(discovery(api, pool, client)),
    ):
        await until(lambda: len(api.reads("WATCH")) == 2, "a watch after the dropped one")
        assert len(api.reads("LIST")) == 2  # what happened while it was down is unknown: relist
        assert transport.drops == 0
        await api.patch("chat-abc", {"endpoints": [endpoint("10.0.0.1", "s0", ready=False)]})
        await until(lambda: len(pool) == 0, "the change seen by the new watch")


# --- the gateway command with --discover ------------------------------------------------------


async def test_gateway_routes_to_discovered_workers(api: Api, workers: list[WorkerProcess]) -> None:
    """`llmos-gateway --discover` fills its pool from the slices and serves through them; the
    canary Service's endpoints are the canary version."""
    stable, canary = workers
    for name, service, worker in (("chat-a", "chat", stable), ("canary-a", "chat-canary", canary)):
        ports = [{"name": "http", "port": worker.port, "protocol": "TCP"}]
        await api.create(slice_body(name, service, [endpoint("127.0.0.1", name)], ports=ports))
    argv = ["--discover", "stable=chat,canary=chat-canary", "--canary-weight", "50"]
    argv += ["--pool-namespace", NS, "--kube-api", api.url]
    with GatewayServer(argv) as gw:
        await until(lambda: len(gw.core.pool) == 2, "both discovered workers")
        assert {r.version: r.url for r in gw.core.pool.all()} == {
            "stable": stable.url,
            "canary": canary.url,
        }
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            for i in range(4):
                r = await client.post(
                    "/v1/completions", json={"model": model, "prompt": f"hi {i}", "max_tokens": 2}
                )
                assert r.status_code == 200, r.text
        await api.delete("canary-a")
        await until(lambda: len(gw.core.pool) == 1, "the deleted slice's worker to leave")
    with pytest.raises(ConfigError, match="exclusive"):
        build(parser().parse_args(["--discover", "chat", "--replica", stable.url]))
