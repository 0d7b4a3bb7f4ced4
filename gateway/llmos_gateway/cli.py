"""`llmos-gateway`: serve one pool's front door.

    llmos-gateway --replica http://127.0.0.1:8001 --replica http://127.0.0.1:8002 \
        --strategy prefix --port 8000

A replica may carry its version, `canary=http://...`, and its metrics URL after a `|`. In a
cluster, `--discover stable=<pool>-workers,canary=<pool>-canary-workers` finds the ready workers
of each version through the Services' EndpointSlices instead. Every setting also reads env
`LLMOS_GATEWAY_<FLAG>` (dashes as underscores), as a pod sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from llmos_gateway.app import Gateway, GatewaySettings, build_app
from llmos_gateway.discovery import EndpointSliceDiscovery
from llmos_gateway.errors import ConfigError
from llmos_gateway.kube import IdleWatcher, PoolScaler, in_cluster_api, in_cluster_client
from llmos_gateway.logfilter import RateLimitFilter
from llmos_gateway.metrics import GatewayMetrics
from llmos_gateway.replicas import LoadScraper, Pool, Replica
from llmos_gateway.routing import STRATEGIES, CanarySplit, Router
from llmos_gateway.tenants import Tenants
from llmos_gateway.transport import TransportLimits, guarded_protocol
from llmos_gateway.upstream import AiohttpUpstream

log = logging.getLogger(__name__)


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("LLMOS_GATEWAY_" + name.upper(), default)


def parse_replica(spec: str) -> Replica:
    """`[version=]URL[|METRICS_URL]` -> a Replica named by its URL."""
    version = "stable"
    head, _, metrics = spec.partition("|")
    if "=" in head.split("://", 1)[0]:
        version, _, head = head.partition("=")
    url = head.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--replica {spec!r}: expected [version=]http://host:port")
    return Replica(
        name=url, url=url, version=version or "stable", metrics_url=metrics.strip() or None
    )


def parse_discover(spec: str) -> dict[str, str]:
    """`stable=svc-a,canary=svc-b` (a bare `svc` is the stable version) -> version -> Service."""
    services: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        version, _, name = part.rpartition("=")
        version, name = (version.strip() or "stable"), name.strip()
        if not name or version in services:
            raise ConfigError(f"--discover {spec!r}: expected version=Service, once per version")
        services[version] = name
    if not services:
        raise ConfigError("--discover names no Service")
    return services


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmos-gateway", description=__doc__.split("\n")[0])
    a = p.add_argument
    replicas = env("replicas")
    a(
        "--replica",
        action="append",
        default=replicas.split(",") if replicas else [],
        help="a worker's base URL ([version=]URL[|metrics URL]); repeat for each",
    )
    a(
        "--discover",
        default=env("discover"),
        help="version=Service[,version=Service]: the workers are the ready endpoints of these "
        "Services in --pool-namespace, from the Kubernetes API (instead of --replica)",
    )
    a(
        "--worker-metrics-port",
        type=int,
        default=int(env("worker_metrics_port", "0") or 0),
        help="discovered workers serve /metrics on this port (0: on their API port)",
    )
    a(
        "--metrics-port",
        type=int,
        default=int(env("metrics_port", "0") or 0),
        help="serve the gateway's own /metrics on this port only (0: on --port, behind the API "
        "key when keys are configured)",
    )
    a("--host", default=env("host", "127.0.0.1"))
    a("--port", type=int, default=int(env("port", "8000") or 8000))
    a("--strategy", choices=STRATEGIES, default=env("strategy", "prefix"))
    a(
        "--load-factor",
        type=float,
        default=float(env("load_factor", "1.25") or 1.25),
        help="prefix routing: a replica takes a request while its load <= factor * mean",
    )
    a(
        "--min-load-bound",
        type=int,
        default=int(env("min_load_bound", "4") or 4),
        help="prefix routing: the load bound is never below this many requests in flight",
    )
    a("--prefix-block-chars", type=int, default=int(env("prefix_block_chars", "256") or 256))
    a("--prefix-max-blocks", type=int, default=int(env("prefix_max_blocks", "4") or 4))
    a(
        "--canary-weight",
        type=float,
        default=float(env("canary_weight", "0") or 0),
        help="percent of requests for the canary version's replicas while both are ready",
    )
    a(
        "--api-keys-file",
        default=env("api_keys_file"),
        help="the workers' API key file (tenant + sha256 per key); without it callers are "
        "anonymous, one tenant per client address",
    )
    a(
        "--tenants-file",
        default=env("tenants_file"),
        help="the pool's rate-limit document (perApiKey RPM/TPM, priority, fairShareWeight) "
        "with optional per-tenant overrides",
    )
    a(
        "--max-inflight-per-replica",
        type=int,
        default=int(env("max_inflight_per_replica", "64") or 64),
        help="requests each replica takes from this gateway at once; beyond, requests queue "
        "fairly by tenant weight (0: no queue)",
    )
    a("--max-queued", type=int, default=int(env("max_queued", "4096") or 4096))
    a("--max-retries", type=int, default=int(env("max_retries", "2") or 2))
    a("--hold-timeout", type=float, default=float(env("hold_timeout", "120") or 120))
    a("--max-held", type=int, default=int(env("max_held", "1024") or 1024))
    a("--scrape-interval", type=float, default=float(env("scrape_interval", "1") or 1))
    a("--connect-timeout", type=float, default=float(env("connect_timeout", "2") or 2))
    a(
        "--upstream-read-timeout",
        type=float,
        default=float(env("upstream_read_timeout", "300") or 300),
    )
    a("--max-body-bytes", type=int, default=int(env("max_body_bytes", str(4 << 20)) or 4 << 20))
    a("--max-connections", type=int, default=int(env("max_connections", "8192") or 8192))
    a("--header-read-timeout", type=float, default=float(env("header_read_timeout", "10") or 10))
    a("--body-read-timeout", type=float, default=float(env("body_read_timeout", "60") or 60))
    a("--keep-alive-timeout", type=float, default=float(env("keep_alive_timeout", "5") or 5))
    a(
        "--pool-name",
        default=env("pool_name"),
        help="the InferencePool to scale from zero (and to zero when idle) via the Kubernetes API",
    )
    a("--pool-namespace", default=env("pool_namespace", os.environ.get("POD_NAMESPACE")))
    a("--kube-api", default=env("kube_api"), help="API server URL (in a pod: the service env)")
    a(
        "--idle-scale-to-zero",
        type=float,
        default=float(env("idle_scale_to_zero", "0") or 0),
        help="seconds without requests before asking for zero replicas (0: never)",
    )
    a(
        "--log-level",
        default=env("log_level", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    a(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=(env("access_log", "true") or "true").lower() in ("1", "true", "yes", "on"),
    )
    return p


def configure_logging(level: str, access: bool) -> None:
    """One stderr handler, rate-limited per template except for the access log."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimitFilter(exempt=("llmos_gateway.access",)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("llmos_gateway.access").setLevel(logging.INFO if access else logging.WARNING)


def build(args: argparse.Namespace, transport_stats: Any = None) -> tuple[Gateway, Starlette]:
    """The gateway and its app from parsed flags (the static replica list)."""
    if args.max_retries < 0 or args.hold_timeout <= 0 or args.max_held < 0:
        raise ConfigError("--max-retries, --max-held must be >= 0 and --hold-timeout > 0")
    if args.max_inflight_per_replica < 0 or args.max_queued < 0:
        raise ConfigError("--max-inflight-per-replica and --max-queued must be >= 0")
    if not 0 <= args.canary_weight <= 100:
        raise ConfigError("--canary-weight must be a percentage from 0 to 100")
    if args.min_load_bound < 1:
        raise ConfigError("--min-load-bound must be at least 1")
    pool = Pool()
    static = [s for s in args.replica if s.strip()]
    if static and args.discover:
        raise ConfigError("--replica and --discover are exclusive: a static list or discovery")
    pool.replace(parse_replica(s) for s in static)
    services = parse_discover(args.discover) if args.discover else {}
    router = Router(
        args.strategy,
        load_factor=args.load_factor,
        min_bound=args.min_load_bound,
        block_chars=args.prefix_block_chars,
        max_blocks=args.prefix_max_blocks,
    )
    upstream = AiohttpUpstream(
        connect_timeout_s=args.connect_timeout, read_timeout_s=args.upstream_read_timeout
    )
    # why: the load scraper's GETs are one per replica a second; httpx is fine for those
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(args.connect_timeout),
        transport=httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        ),
    )
    settings = GatewaySettings(
        max_body_bytes=args.max_body_bytes,
        max_retries=args.max_retries,
        hold_timeout_s=args.hold_timeout,
        max_held=args.max_held,
        max_inflight_per_replica=args.max_inflight_per_replica,
        max_queued=args.max_queued,
    )
    tenants = Tenants(api_keys_file=args.api_keys_file, tenants_file=args.tenants_file)
    scaler: PoolScaler | None = None
    kube_client: httpx.AsyncClient | None = None
    discovery: EndpointSliceDiscovery | None = None
    if args.pool_name or services:
        api = args.kube_api or in_cluster_api()
        if not api or not args.pool_namespace:
            raise ConfigError(
                "--pool-name and --discover need --kube-api (or a pod's env) and --pool-namespace"
            )
        kube_client = httpx.AsyncClient(timeout=5.0) if args.kube_api else in_cluster_client()
        if args.pool_name:
            scaler = PoolScaler(kube_client, api, args.pool_namespace, args.pool_name)
        if services:
            discovery = EndpointSliceDiscovery(
                kube_client,
                api,
                args.pool_namespace,
                services,
                pool,
                metrics_port=args.worker_metrics_port or None,
            )
    gateway = Gateway(
        pool,
        router,
        upstream,
        settings=settings,
        metrics=GatewayMetrics(pool, transport_stats),
        scale_up=scaler.scale_up if scaler is not None else None,
        tenants=tenants,
        split=CanarySplit(args.canary_weight),
    )
    if scaler is not None and args.idle_scale_to_zero > 0:
        gateway.idle = IdleWatcher(
            scaler.scale_to_zero, gateway.busy, idle_s=args.idle_scale_to_zero
        )
    scraper = LoadScraper(pool, client, interval_s=args.scrape_interval)
    app = build_app(gateway, metrics_port=args.metrics_port or None)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(scraper.run())]
        if discovery is not None:
            tasks.append(asyncio.create_task(discovery.run()))
        if gateway.idle is not None:
            tasks.append(asyncio.create_task(gateway.idle.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await upstream.aclose()
            await client.aclose()
            if kube_client is not None:
                await kube_client.aclose()

    app.router.lifespan_context = lifespan
    return gateway, app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket as uvicorn binds one (SO_REUSEADDR, IPv6 when the host is).

    Its protocol is IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only
    when their socket says TCP, and with Nagle's algorithm on, a response written in parts (head,
    then body) waited for the client's delayed ACK, ~40 ms a request. TCP_NODELAY is set on the
    listener too (accepted sockets inherit it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.log_level, args.access_log)
    try:
        limits = TransportLimits(
            header_timeout_s=args.header_read_timeout,
            body_timeout_s=args.body_read_timeout,
            max_connections=args.max_connections,
        )
        protocol, stats = guarded_protocol(limits)
        _, app = build(args, stats)
    except (ConfigError, ValueError) as exc:
        log.error("invalid settings: %s", exc)
        return 2
    log.info(
        "gateway on http://%s:%d, %s routing over %s",
        args.host,
        args.port,
        args.strategy,
        f"the endpoints of {args.discover}" if args.discover else f"{len(args.replica)} replica(s)",
    )
    if args.metrics_port:
        log.info("gateway /metrics on port %d only", args.metrics_port)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=protocol,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=args.keep_alive_timeout,
        timeout_graceful_shutdown=5,
        backlog=min(4096, args.max_connections),
    )
    try:
        sockets = [bind(args.host, args.port)]
        if args.metrics_port:
            sockets.append(bind(args.host, args.metrics_port))
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.host, exc)
        return 1
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
