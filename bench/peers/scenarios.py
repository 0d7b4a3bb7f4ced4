"""The peers benchmark's scenarios, drawn from the corpus token stream (bench.corpus).

Every repeat draws fresh prompts from its own seed (the same for every system): with prefix
caching on in all three servers, replaying one repeat's prompts would measure cache hits instead
of prefill. All requests of a scenario arrive at once.

- offline_mixed: 64 requests, prompts 32-512 tokens, outputs 32-256.
- single_stream: one request, a 128-token prompt, 256 output tokens (TTFT and decode speed).
- streams_16: 16 requests at once, prompts 128-256, 256 output tokens each.
- shared_prefix: 32 requests sharing one 400-token prefix, each with 32 own tokens, 32 outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from bench import workload
from bench.workload import BenchRequest

# the order they run in: the short ones first, so a run cut short has them
SCENARIOS = ("single_stream", "streams_16", "shared_prefix", "offline_mixed")
SHARED_PREFIX_LEN = 400


def build(name: str, pool: list[int], repeat: int) -> list[BenchRequest]:
    """The requests of scenario `name` for repeat number `repeat` (0-based)."""
    seed = 1000 * (SCENARIOS.index(name) + 1) + repeat if name in SCENARIOS else -1
    builders: dict[str, Callable[[], list[BenchRequest]]] = {
        "offline_mixed": lambda: workload.mixed(
            pool,
            seed=seed,
            num_requests=64,
            prompt_range=(32, 512),
            output_range=(32, 256),
            prefix=f"mixed{repeat}",
        ),
        "single_stream": lambda: workload.mixed(
            pool,
            seed=seed,
            num_requests=1,
            prompt_range=(128, 128),
            output_range=(256, 256),
            prefix=f"single{repeat}",
        ),
        "streams_16": lambda: workload.mixed(
            pool,
            seed=seed,
            num_requests=16,
            prompt_range=(128, 256),
            output_range=(256, 256),
            prefix=f"streams{repeat}",
        ),
        "shared_prefix": lambda: workload.shared_prefix(
            pool,
            seed=seed,
            num_requests=32,
            prefix_len=SHARED_PREFIX_LEN,
            suffix_len=32,
            max_tokens=32,
        ),
    }
    if name not in builders:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return builders[name]()


def shrink(requests: list[BenchRequest], limit: int, max_output: int) -> list[BenchRequest]:
    """At most `limit` requests with outputs capped at `max_output` (the smoke mode)."""
    return [
        BenchRequest(r.request_id, r.prompt_token_ids, min(r.max_tokens, max_output), r.arrival_s)
        for r in requests[:limit]
    ]
