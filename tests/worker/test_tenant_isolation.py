"""Tenants never share prefix-cache hits: one tenant cannot probe another's prompts by timing.

A real server with API keys for two tenants: tenant A sends the same long prompt twice and its
second request hits the prefix cache; tenant B then sends that very prompt and gets no hit,
because each tenant's block hashes are salted with its name.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from llmos_worker.server.auth import ApiKeyAuth, hash_key
from tests.worker.server_harness import InProcessServer, engine_factory

PROMPT = " ".join(f"word{i}" for i in range(120))  # many full blocks


def prefix_hits(url: str) -> float:
    # why: with API keys and no separate metrics port, /metrics is behind the key too
    text = httpx.get(url + "/metrics", headers={"Authorization": "Bearer key-a"}).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llmos_prefix_cache_hits_total")
    )


def test_prefix_cache_hits_stay_within_a_tenant(tiny_model_dir: Path) -> None:
    auth = ApiKeyAuth({hash_key("key-a"): "tenant-a", hash_key("key-b"): "tenant-b"})
    with InProcessServer(
        engine_factory(str(tiny_model_dir)), served_model_name="tiny", auth=auth
    ) as srv:

        def complete(key: str) -> None:
            reply = httpx.post(
                srv.url + "/v1/completions",
                json={"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert reply.status_code == 200, reply.text

        complete("key-a")
        before_repeat = prefix_hits(srv.url)
        complete("key-a")
        after_repeat = prefix_hits(srv.url)
        assert after_repeat - before_repeat >= 96, "the same tenant's repeat reuses its blocks"

        complete("key-b")
        assert prefix_hits(srv.url) == after_repeat, "another tenant must get no hit"
        complete("key-b")
        assert prefix_hits(srv.url) > after_repeat, "tenant B's own repeat does hit"
