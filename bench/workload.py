"""Seeded benchmark workloads: requests with exact prompt token ids and fixed output lengths.

A workload is a list of `BenchRequest`s; every request carries its prompt as token ids cut from
the corpus token stream, `max_tokens` (always generated in full: the runners set `ignore_eos`)
and an arrival offset in seconds from the start of the run. Workloads are written to
`bench/workloads/*.jsonl` so that any later run, or another tool, replays exactly the same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

WORKLOAD_DIR = Path(__file__).resolve().parent / "workloads"
ONLINE_RATES = (0.5, 1.0, 2.0)  # requests per second of the three online (Poisson) runs


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `arrival_s` is seconds after the run starts (0: at once)."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def _window(pool: list[int], length: int, rng: random.Random) -> list[int]:
    # why: a window of the real token stream keeps the text natural at exactly `length` tokens
    if length > len(pool):
        raise ValueError(f"corpus has {len(pool)} tokens, a prompt of {length} was asked for")
    start = rng.randrange(0, len(pool) - length + 1)
    return pool[start : start + length]


def mixed(
    pool: list[int],
    *,
    seed: int,
    num_requests: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    prefix: str,
) -> list[BenchRequest]:
    """Requests with prompt and output lengths drawn uniformly (inclusive) from the ranges."""
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for i in range(num_requests):
        plen = rng.randint(*prompt_range)
        olen = rng.randint(*output_range)
        out.append(BenchRequest(f"{prefix}-{i:03d}", _window(pool, plen, rng), olen))
    return out


def offline_mixed(pool: list[int], seed: int = 0) -> list[BenchRequest]:
    """Workload (1): 64 requests, prompts 32–512 tokens, outputs 32–256, all arriving at once."""
    return mixed(
        pool,
        seed=seed,
        num_requests=64,
        prompt_range=(32, 512),
        output_range=(32, 256),
        prefix="mixed",
    )


def poisson_arrivals(requests: list[BenchRequest], rate: float, seed: int) -> list[BenchRequest]:
    """The same requests with Poisson arrivals at `rate` req/s (exponential gaps; first at 0)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(seed)
    t = 0.0
    out: list[BenchRequest] = []
    for i, req in enumerate(requests):
        if i > 0:
            t += rng.expovariate(rate)
        out.append(BenchRequest(req.request_id, req.prompt_token_ids, req.max_tokens, round(t, 6)))
    return out


def online(pool: list[int], rate: float, seed: int = 1) -> list[BenchRequest]:
    """Workload (2): 32 requests (prompts 32–256, outputs 32–128) arriving as a Poisson process.

    The requests are the same at every rate (drawn from `seed`); only the arrival times differ.
    """
    base = mixed(
        pool,
        seed=seed,
        num_requests=32,
        prompt_range=(32, 256),
        output_range=(32, 128),
        prefix="online",
    )
    return poisson_arrivals(base, rate, seed=seed * 1000 + int(rate * 100))


def shared_prefix(
    pool: list[int],
    seed: int = 2,
    *,
    num_requests: int = 32,
    prefix_len: int = 512,
    suffix_len: int = 32,
    max_tokens: int = 8,
) -> list[BenchRequest]:
    """Workload (3): requests sharing one `prefix_len`-token system prompt, each with its own
    `suffix_len`-token question; short outputs, because the measured quantity is TTFT."""
    rng = random.Random(seed)
    prefix = _window(pool, prefix_len, rng)
    return [
        BenchRequest(f"prefix-{i:03d}", prefix + _window(pool, suffix_len, rng), max_tokens)
        for i in range(num_requests)
    ]


def single_stream(pool: list[int], seed: int = 3) -> list[BenchRequest]:
    """Workload (4): one request, 128 prompt tokens, 256 output tokens (decode speed, batch 1)."""
    return mixed(
        pool,
        seed=seed,
        num_requests=1,
        prompt_range=(128, 128),
        output_range=(256, 256),
        prefix="single",
    )


def build_all(pool: list[int]) -> dict[str, list[BenchRequest]]:
    """Every workload by file stem: offline_mixed, online_r<rate>, shared_prefix, single_stream."""
    workloads = {"offline_mixed": offline_mixed(pool)}
    for rate in ONLINE_RATES:
        workloads[online_name(rate)] = online(pool, rate)
    workloads["shared_prefix"] = shared_prefix(pool)
    workloads["single_stream"] = single_stream(pool)
    return workloads


def online_name(rate: float) -> str:
    return f"online_r{rate:g}".replace(".", "p")


def save(requests: list[BenchRequest], path: Path) -> None:
    """One JSON object per line, in request order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for req in requests:
            fh.write(json.dumps(asdict(req), separators=(",", ":")) + "\n")


def load(path: Path) -> list[BenchRequest]:
    out: list[BenchRequest] = []
    with path.open() as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                out.append(
                    BenchRequest(
                        d["request_id"],
                        list(d["prompt_token_ids"]),
                        int(d["max_tokens"]),
                        float(d.get("arrival_s", 0.0)),
                    )
                )
    return out
