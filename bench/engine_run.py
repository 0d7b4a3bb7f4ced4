"""Runs workloads on this worker's `LLMEngine` in-process, timing every token as a client would.

The offline and single-stream workloads submit all requests at once and step the engine until
done; the shared-prefix workload submits requests one after another (each alone on the engine),
so its TTFT is pure prefill cost — with the prefix cache on, only the 32-token suffix is computed.
KV waste is sampled after every step from the block manager: allocated-but-empty slots over
allocated slots, at the step where the most blocks are held (the peak).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.metrics import RequestTiming, kv_waste
from bench.workload import BenchRequest

Clock = Callable[[], float]
KV_BYTES = 2 * 2**30  # KV cache budget: all 64 offline requests at full length fit (~1.3 GB)


@dataclass
class KVSample:
    allocated_slots: int
    used_slots: int


def kv_sample(engine: Any) -> KVSample | None:
    """Allocated vs filled KV slots of the running sequences right now (None if not exposed).

    A block shared by several sequences (prefix cache, forks) counts once, filled as far as its
    fullest user has written it.
    """
    sched = getattr(engine, "scheduler", None)
    bm = getattr(sched, "bm", None) or getattr(engine, "block_manager", None)
    if sched is None or bm is None:
        return None
    bs = int(bm.block_size)
    filled: dict[int, int] = {}
    for seq in sched.running:
        computed = int(seq.num_computed_tokens)
        for i, block in enumerate(seq.block_table):
            n = max(0, min(bs, computed - i * bs))
            filled[block] = max(filled.get(block, 0), n)
    # why: every block not on the free list is held by someone (live sequences only, since the
    # free list keeps cached-but-unreferenced blocks)
    allocated = int(bm.num_used_blocks) * bs
    return KVSample(allocated, min(allocated, sum(filled.values())))


def _params(req: BenchRequest) -> Any:
    from llmos_worker.engine.params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)


def run_batch(
    engine: Any, requests: list[BenchRequest], clock: Clock = time.perf_counter
) -> tuple[list[RequestTiming], dict[str, Any]]:
    """Submit every request at once, step until all finish; timings plus KV-waste figures."""
    timings = {r.request_id: RequestTiming(r.request_id, r.prompt_len, 0.0) for r in requests}
    t0 = clock()
    for req in requests:
        timings[req.request_id].send_time = t0
        engine.add_request(req.request_id, list(req.prompt_token_ids), _params(req))
    peak: KVSample | None = None
    waste_sum, waste_n, steps = 0.0, 0, 0
    while engine.has_unfinished():
        outputs = engine.step()
        now = clock()
        steps += 1
        for out in outputs:
            t = timings[out.request_id]
            n = len(out.outputs[0].token_ids)
            if n > t.output_len:
                t.chunk_times.append(now)
                t.output_len = n
        sample = kv_sample(engine)
        if sample is not None and sample.allocated_slots:
            waste_sum += kv_waste(sample.allocated_slots, sample.used_slots)
            waste_n += 1
            if peak is None or sample.allocated_slots > peak.allocated_slots:
                peak = sample
    kv: dict[str, Any] = {"steps": steps}
    if peak is not None:
        kv |= {
            "peak_allocated_slots": peak.allocated_slots,
            "peak_used_slots": peak.used_slots,
            "kv_waste_at_peak": kv_waste(peak.allocated_slots, peak.used_slots),
            "kv_waste_mean": waste_sum / waste_n,
        }
    return list(timings.values()), kv


def run_sequential(
    engine: Any, requests: list[BenchRequest], clock: Clock = time.perf_counter
) -> list[RequestTiming]:
    """Each request alone: submit, step until it finishes, then the next."""
    done: list[RequestTiming] = []
    for req in requests:
        timing, _ = run_batch(engine, [req], clock)
        done.extend(timing)
    return done


def warm_up(engine: Any, pool: list[int]) -> None:
    """One short request so thread pools and first allocations are not timed."""
    run_batch(engine, [BenchRequest("warmup", pool[:24], 4)])


def load(source: str, dtype: str = "float32", quantization: str = "none") -> Any:
    from llmos_worker.model import load_model

    return load_model(source, dtype=dtype, device="cpu", quantization=quantization)


def make_engine(
    loaded: Any,
    *,
    prefix_caching: bool = True,
    kv_bytes: int = KV_BYTES,
    dtype: str = "float32",
    **overrides: Any,
) -> Any:
    from llmos_worker.engine import LLMEngine
    from llmos_worker.engine.config import EngineConfig

    config = EngineConfig(
        kv_cache_memory_bytes=kv_bytes,
        enable_prefix_caching=prefix_caching,
        dtype=dtype,
        **overrides,
    )  # type: ignore[arg-type]
    return LLMEngine(loaded, config)
