"""The performance targets of issues 2 and 8, judged against one run's results.

Throughput targets are judged for the default fp32 worker and, when measured, again for the
opt-in fp16, int8, bf16 and int4 weights (issue 8 allows quantised modes that pass the
perplexity check).

Each target yields a row: what was asked, what was measured, met or not, and by how much
(measured / required for "at least" targets, required / measured for "below" targets, so a
margin above 1 always means met). A target whose inputs are missing (a baseline that could not
run) is reported as not judged, never as met.

Where the machine's roofline bounds a target, the row also carries its ceiling: the best value
the measure could take on this machine. Offline throughput is bounded by the workload's FLOPs
(prompt tokens and attention included) at the fastest fp32 matmul rate measured (torch's or the
worker's kernel's) — for fp32, fp16 and int4 weights, which all multiply in fp32; for int8 weights,
which multiply in integers, at the faster of that and the worker's measured integer product
rate, and for bf16 weights at the faster of that and the best bf16 matmul measured (no ceiling
when that rate is unknown). Single-stream throughput is bounded by reading every weight once per
token at the measured memory bandwidth (and by the compute ceiling). A ratio against a baseline
is bounded by the ceiling over the baseline's measured value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Target:
    issue: str
    name: str
    required: str
    measured: float | None
    threshold: float
    higher_is_better: bool = True
    unit: str = "×"
    ceiling: float | None = None  # the best `measured` this machine allows (None: unbounded)

    @property
    def within_reach(self) -> bool | None:
        """Whether the machine's ceiling allows the threshold at all (None: no ceiling)."""
        if self.ceiling is None:
            return None
        if self.higher_is_better:
            return self.ceiling >= self.threshold
        return self.ceiling < self.threshold

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured < self.threshold

    @property
    def margin(self) -> float | None:
        """> 1 when met: measured/threshold (or threshold/measured for upper bounds)."""
        if self.measured is None:
            return None
        if self.higher_is_better:
            return self.measured / self.threshold
        return self.threshold / self.measured if self.measured > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "met": self.met,
            "margin": self.margin,
            "within_reach": self.within_reach,
        }


def _get(d: dict[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _least(*xs: float | None) -> float | None:
    known = [x for x in xs if x is not None]
    return min(known) if known else None


def evaluate(results: dict[str, Any]) -> list[Target]:
    """Every target of issues 2 and 8 for a results dict as written by `bench.run`."""
    roof = results.get("roofline", {})
    offline_ceiling = _get(roof, "workloads", "offline_mixed", "compute_tok_s_fp32")
    offline_int8 = _get(roof, "workloads", "offline_mixed", "compute_tok_s_int8")
    offline_bf16 = _get(roof, "workloads", "offline_mixed", "compute_tok_s_bf16")
    single_compute = _get(roof, "workloads", "single_stream", "compute_tok_s_fp32")
    single_narrow_compute = {
        w: _get(roof, "workloads", "single_stream", f"compute_tok_s_{w}") for w in ("int8", "bf16")
    }

    def single_ceiling(weights: str) -> float | None:
        compute = single_narrow_compute.get(weights) or single_compute
        # bf16 weights are 2 bytes, as fp16's
        memory = roof.get(f"batch1_mem_tok_s_{'fp16' if weights == 'bf16' else weights}")
        return _least(memory, compute)

    off = results.get("offline_mixed", {})
    ours = _get(off, "llmos", "output_throughput")
    hf_best = _get(off, "hf_best", "output_throughput")
    llama = _get(off, "llamacpp", "output_throughput")
    single_ours = _get(results, "single_stream", "llmos", "output_throughput")
    single_llama = _get(results, "single_stream", "llamacpp", "output_throughput")
    ttft_on = _get(results, "shared_prefix", "caching_on", "ttft", "mean_ms")
    ttft_off = _get(results, "shared_prefix", "caching_off", "ttft", "mean_ms")
    waste = _get(off, "llmos", "kv", "kv_waste_at_peak")
    waste_pct = waste * 100 if waste is not None else None
    opt_in: list[Target] = []
    for mode, what, weights in (
        ("fp16", "fp16 weights", "fp16"),
        ("int8", "int8 weights", "int8"),
        ("int8_kvfp16", "int8 weights + fp16 KV cache", "int8"),
        ("bf16", "bf16 weights", "bf16"),
        ("int4", "int4 weights", "int4"),
    ):
        narrow = _get(off, f"llmos_{mode}", "output_throughput")
        single_narrow = _get(results, "single_stream", f"llmos_{mode}", "output_throughput")
        if narrow is None and single_narrow is None:
            continue
        label = f" — {what} (opt-in)"
        top = {"int8": offline_int8, "bf16": offline_bf16}.get(weights, offline_ceiling)
        single_top = single_ceiling(weights)
        opt_in += [
            Target("8", "offline mixed output throughput" + label, "≥ 300 tok/s", narrow, 300.0,
                   unit="tok/s", ceiling=top),
            Target("8", "offline mixed vs Hugging Face best" + label, "≥ 3×",
                   _ratio(narrow, hf_best), 3.0, ceiling=_ratio(top, hf_best)),
            Target("8", "offline mixed vs llama.cpp" + label, "≥ 4×", _ratio(narrow, llama), 4.0,
                   ceiling=_ratio(top, llama)),
            Target("8", "single stream vs llama.cpp" + label, "≥ 1.2×",
                   _ratio(single_narrow, single_llama), 1.2,
                   ceiling=_ratio(single_top, single_llama)),
        ]  # fmt: skip
    return [
        Target(
            "8",
            "offline mixed output throughput",
            "≥ 300 tok/s",
            ours,
            300.0,
            unit="tok/s",
            ceiling=offline_ceiling,
        ),
        Target(
            "8",
            "offline mixed vs Hugging Face best static batch",
            "≥ 3×",
            _ratio(ours, hf_best),
            3.0,
            ceiling=_ratio(offline_ceiling, hf_best),
        ),
        Target(
            "2",
            "offline mixed vs Hugging Face best static batch",
            "≥ 2×",
            _ratio(ours, hf_best),
            2.0,
            ceiling=_ratio(offline_ceiling, hf_best),
        ),
        Target(
            "8",
            "offline mixed vs llama.cpp",
            "≥ 4×",
            _ratio(ours, llama),
            4.0,
            ceiling=_ratio(offline_ceiling, llama),
        ),
        Target(
            "8",
            "single stream vs llama.cpp",
            "≥ 1.2×",
            _ratio(single_ours, single_llama),
            1.2,
            ceiling=_ratio(single_ceiling("fp32"), single_llama),
        ),
        Target(
            "8",
            "shared prefix: TTFT without / with prefix caching",
            "≥ 5×",
            _ratio(ttft_off, ttft_on),
            5.0,
        ),
        Target(
            "2, 8",
            "KV cache waste at peak (offline mixed)",
            "< 4 %",
            waste_pct,
            4.0,
            higher_is_better=False,
            unit="%",
        ),
        *opt_in,
    ]
