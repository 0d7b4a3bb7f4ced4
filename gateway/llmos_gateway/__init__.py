"""LLM OS gateway: one OpenAI front door per InferencePool.

Routes each request to a worker replica (round-robin, least-load, or prefix affinity with bounded
load), holds requests while the pool has no ready replica, retries on another replica before the
first byte, and streams responses through unbuffered. Imports neither torch, nor the worker, nor
kopf.
"""

from llmos_gateway.app import Gateway, GatewaySettings, build_app
from llmos_gateway.replicas import Load, LoadScraper, Pool, Replica, parse_load
from llmos_gateway.routing import HashRing, Router, prefix_key, prefix_text

__all__ = [
    "Gateway",
    "GatewaySettings",
    "HashRing",
    "Load",
    "LoadScraper",
    "Pool",
    "Replica",
    "Router",
    "build_app",
    "parse_load",
    "prefix_key",
    "prefix_text",
]
