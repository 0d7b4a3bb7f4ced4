"""`llmos-worker serve`: load a model, serve it over the OpenAI API, drain on SIGTERM.

Every flag defaults from the environment (`LLMOS_<FLAG>`), because the operator configures pods
that way. The socket opens first and the model loads in the background (`/ready` is 503 until it
has). On SIGTERM (or Ctrl+C) the server drains: `/ready` turns 503 so the Service stops routing
here, new completions are refused with 503, in-flight requests run to completion for up to
`--drain-timeout` seconds (then are aborted), and the process exits 0. A second signal exits at
once. torch is imported only when the command runs, not when the CLI parser is built.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import signal
import socket
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, get_args

import uvicorn

from llmos_worker.cli import env_default
from llmos_worker.engine.config import DType, EngineConfig, KVCacheDType, Quantization
from llmos_worker.errors import WorkerError
from llmos_worker.server.logfilter import RateLimitFilter
from llmos_worker.server.lora_flags import add_lora_arguments, lora_settings
from llmos_worker.server.transport import TransportLimits, guarded_protocol

if TYPE_CHECKING:
    from llmos_worker.server.async_engine import Engine
    from llmos_worker.server.state import ServerState

log = logging.getLogger("llmos_worker.server")

DEFAULT_MODEL = "builtin://smollm2-135m-instruct"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_int(text: str) -> int | None:
    return None if text.strip().lower() in ("", "none", "auto") else int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    e = env_default
    a = parser.add_argument
    a(
        "--model",
        default=e("model", DEFAULT_MODEL),
        help="builtin://NAME, a .gguf file, or a Hugging Face model directory",
    )
    a(
        "--model-key-file",
        default=e("model_key_file"),
        help="key-encryption key of an encrypted model (decrypted in memory, never on disk)",
    )
    a(
        "--model-digest",
        default=e("model_digest"),
        help="expected model digest (sha256); refuses a model whose files do not match it",
    )
    a(
        "--served-model-name",
        default=e("served_model_name"),
        help="the name clients pass as `model` (default: the model's own name)",
    )
    a("--host", default=e("host", "127.0.0.1"))
    a("--port", type=int, default=e("port", "8000"))
    a("--block-size", type=int, default=e("block_size", "16"), help="tokens per KV block")
    a(
        "--kv-cache-memory-bytes",
        type=_optional_int,
        default=e("kv_cache_memory_bytes"),
        help="KV cache size in bytes (default: a fraction of free memory)",
    )
    a("--kv-cache-memory-fraction", type=float, default=e("kv_cache_memory_fraction", "0.2"))
    a("--max-num-seqs", type=int, default=e("max_num_seqs", "64"))
    a("--max-num-batched-tokens", type=int, default=e("max_num_batched_tokens", "2048"))
    a(
        "--max-model-len",
        type=_optional_int,
        default=e("max_model_len"),
        help="context length (default: the model's)",
    )
    a("--scheduling-policy", choices=["fcfs", "priority"], default=e("scheduling_policy", "fcfs"))
    a(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=_bool(e("enable_prefix_caching", "true") or "true"),
    )
    a("--dtype", choices=get_args(DType), default=e("dtype", "float32"))
    a(
        "--quantization",
        choices=get_args(Quantization),
        default=e("quantization", "none"),
        help="linear-layer weights in fp16 (fp32 compute), int8 with per-channel scales "
        "(fp32 compute below 12 rows; from 12 rows, activations rounded per row to 16 bits and "
        "multiplied in integers), bf16 (with AVX512_BF16, from 8 rows activations rounded "
        "to bf16 and multiplied pairwise into fp32 sums), or int4 (blocks of 32 weights with an "
        "fp16 scale and minimum, GGUF's Q4_1: a Q4_1 GGUF's layers exactly; LM head in 8-bit "
        "blocks, Q8_0) "
        "(CPU, float32 only)",
    )
    a(
        "--kv-cache-dtype",
        choices=get_args(KVCacheDType),
        default=e("kv_cache_dtype", "auto"),
        help="data type of the KV cache: auto (the model's dtype) or float16 (half the bytes of "
        "an fp32 cache; values rounded to fp16 on write, widened to the compute dtype on read)",
    )
    a("--device", default=e("device", "cpu"))
    a("--seed", type=int, default=e("seed", "0"))
    a(
        "--max-waiting-requests",
        type=int,
        default=e("max_waiting_requests", "512"),
        help="requests allowed to wait for a batch slot before 429",
    )
    a("--max-body-bytes", type=int, default=e("max_body_bytes", str(4 * 1024 * 1024)))
    a(
        "--max-connections",
        type=int,
        default=e("max_connections", "8192"),
        help="open connections allowed; beyond it the oldest idle one is closed, or the new one "
        "gets 503 + Retry-After when every connection is inside a request (kept under the "
        "process's file-descriptor limit)",
    )
    a(
        "--max-inflight-requests",
        type=int,
        default=e("max_inflight_requests", "1024"),
        help="API requests being read, queued or answered at once; beyond it 503 + Retry-After",
    )
    a(
        "--header-read-timeout",
        type=float,
        default=e("header_read_timeout", "10"),
        help="seconds a connection has to send a complete request head (also bounds idle "
        "keep-alive connections)",
    )
    a(
        "--body-read-timeout",
        type=float,
        default=e("body_read_timeout", "60"),
        help="seconds a request has to send its whole body after its head",
    )
    a(
        "--keep-alive-timeout",
        type=float,
        default=e("keep_alive_timeout", "5"),
        help="seconds an idle keep-alive connection stays open between requests",
    )
    a(
        "--metrics-port",
        type=_optional_int,
        default=e("metrics_port"),
        help="serve /metrics on this port only, without an API key (the pod's network policy "
        "decides who reaches it); unset: /metrics on the API port, behind the API key when "
        "keys are configured",
    )
    a(
        "--drain-timeout",
        type=float,
        default=e("drain_timeout", "30"),
        help="seconds in-flight requests may take to finish after SIGTERM",
    )
    a(
        "--api-keys-file",
        default=e("api_keys_file"),
        help='JSON {"keys": [{"tenant", "sha256"}]}; when set, /v1/* requires a bearer key',
    )
    a(
        "--rate-limits-file",
        default=e("rate_limits_file"),
        help="JSON rate limits per API key and namespace (re-read when it changes)",
    )
    a("--log-level", default=e("log_level", "info"), choices=["debug", "info", "warning", "error"])
    a("--log-format", default=e("log_format", "text"), choices=["text", "json"])
    a(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=_bool(e("access_log", "false") or "false"),
    )
    add_lora_arguments(parser)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """One handler on the root logger, rate-limited per message template (see logfilter)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_cache_memory_fraction=args.kv_cache_memory_fraction,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        scheduling_policy=args.scheduling_policy,
        enable_prefix_caching=args.enable_prefix_caching,
        dtype=args.dtype,
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        seed=args.seed,
        **lora_settings(args),
    )


def fd_budget(requested: int, reserve: int = 64) -> int:
    """Connections the process can hold: raise the soft file-descriptor limit to the hard one
    and keep `reserve` descriptors for the model, logs and the listeners themselves."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    except ImportError:  # pragma: no cover - not POSIX
        return requested
    allowed = max(1, soft - reserve)
    if requested > allowed:
        log.warning(
            "--max-connections %d is over what the file-descriptor limit (%d) allows; using %d",
            requested,
            soft,
            allowed,
        )
    return min(requested, allowed)


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


def load_engine(
    model: str, key_file: str | None, digest: str | None, config: EngineConfig
) -> Engine:
    """The engine for `model`, its objects then frozen out of the garbage collector's walks."""
    from llmos_worker.engine.engine import LLMEngine
    from llmos_worker.storage.plaintext import open_model_source

    # why: an encrypted model is decrypted into memory for the load and released after it
    with open_model_source(model, key_file=key_file, expected_digest=digest) as source:
        engine = LLMEngine.from_source(source, config)
    # why: the loaded model, tokenizer and vocabulary are hundreds of thousands of objects that
    # live as long as the process; frozen, the collections that decode steps trigger stop
    # walking them (they were ~1 % of a decode step's samples)
    gc.collect()
    gc.freeze()
    return engine


def run(args: argparse.Namespace) -> int:
    from llmos_worker.server.app import build_app
    from llmos_worker.server.auth import ApiKeyAuth
    from llmos_worker.server.ratelimit import RateLimiter
    from llmos_worker.server.state import ServerState

    configure_logging(args.log_level, args.log_format)
    try:
        config = engine_config(args)
        auth = ApiKeyAuth.from_file(args.api_keys_file) if args.api_keys_file else None
        limiter = RateLimiter.from_file(args.rate_limits_file) if args.rate_limits_file else None
        limits = TransportLimits(
            header_timeout_s=args.header_read_timeout,
            body_timeout_s=args.body_read_timeout,
            max_connections=fd_budget(args.max_connections),
        )
        if args.max_inflight_requests < 1:
            raise WorkerError("--max-inflight-requests must be at least 1")
        if args.keep_alive_timeout <= 0:
            raise WorkerError("--keep-alive-timeout must be positive")
    except (WorkerError, ValueError) as exc:
        log.error("invalid settings: %s", exc)
        return 2
    protocol, transport_stats = guarded_protocol(limits)
    state = ServerState(
        served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes,
        auth=auth,
        limiter=limiter,
        max_inflight_requests=args.max_inflight_requests,
        metrics_port=args.metrics_port,
        transport=transport_stats,
    )

    def loader() -> Engine:
        return load_engine(args.model, args.model_key_file, args.model_digest, config)

    failures: list[BaseException] = []

    def on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = build_app(
        state,
        loader=loader,
        max_waiting_requests=args.max_waiting_requests,
        on_load_error=on_load_error,
    )
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        http=protocol,
        log_config=None,
        access_log=args.access_log,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=args.keep_alive_timeout,
        backlog=min(4096, limits.max_connections),
    )
    try:
        sockets = [bind(args.host, args.port)]
        if args.metrics_port is not None:
            sockets.append(bind(args.host, args.metrics_port))
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.host, exc)
        return 1
    server = DrainingServer(uv_config, state, drain_timeout_s=args.drain_timeout)
    log.info(
        "serving %s on http://%s:%d%s (model loads in the background); at most %d connections, "
        "%d in-flight requests, request heads within %.0f s, bodies within %.0f s",
        args.model,
        args.host,
        args.port,
        f", /metrics on port {args.metrics_port}" if args.metrics_port is not None else "",
        limits.max_connections,
        args.max_inflight_requests,
        limits.header_timeout_s,
        limits.body_timeout_s,
    )
    server.run(sockets=sockets)
    if failures:
        return 1
    if not server.started:
        return 1  # e.g. the port is taken; uvicorn logged why
    log.info("drained; exiting")
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase between the first signal and the exit."""

    def __init__(
        self, config: uvicorn.Config, state: ServerState, *, drain_timeout_s: float
    ) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # why: not calling super() for the first signal, which would exit without draining and
        # re-raise the signal after serving (exit status -15 instead of 0)
        if self.drain_deadline is not None or not self.started:
            self.should_exit = True
            self.force_exit = self.drain_deadline is not None
            return
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        inflight = self.state.front.num_inflight if self.state.front is not None else 0
        log.info(
            "%s: draining %d in-flight request(s), up to %.0f s",
            signal.Signals(sig).name,
            inflight,
            self.drain_timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            front = self.state.front
            inflight = front.num_inflight if front is not None else 0
            if inflight and time.monotonic() >= self.drain_deadline:
                log.warning("drain deadline passed; aborting %d request(s)", inflight)
                if front is not None:
                    await front.shutdown()
                inflight = 0
            if inflight == 0:
                self.should_exit = True
        result: bool = await super().on_tick(counter)
        return result
