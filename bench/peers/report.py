"""Medians, ratios, target verdicts and the Markdown section of the peers benchmark.

Every number in a table is the median over the repeats of one run (each repeat has its own
prompts, the same for every system); every ratio divides two such medians of the same run.
The section lives between two markers in docs/benchmarks.md, so that rewriting it leaves the
rest of the file as it is.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

BEGIN = "<!-- peers:begin -->"
END = "<!-- peers:end -->"
WORKER = ("llmos_fp32", "llmos_bf16", "llmos_int4")
PEERS = ("vllm_fp32", "vllm_bf16", "llama_server")
SAME_CLASS = {"llmos_fp32": "vllm_fp32", "llmos_bf16": "vllm_bf16", "llmos_int4": "llama_server"}

# name -> how to read it from one run's stats
METRICS: dict[str, Callable[[dict[str, Any]], float]] = {
    "output_tok_s": lambda r: float(r["output_throughput"]),
    "ttft_p50_ms": lambda r: float(r["ttft"]["median_ms"]),
    "ttft_p99_ms": lambda r: float(r["ttft"]["p99_ms"]),
    "itl_p50_ms": lambda r: float(r["itl"]["median_ms"]),
    "itl_p99_ms": lambda r: float(r["itl"]["p99_ms"]),
    "tpot_p50_ms": lambda r: float(r["tpot"]["median_ms"]),
    "decode_tok_s": lambda r: float(r["decode_tok_s_mean"]),
}


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each metric's median over the repeats, plus the summed failures and length mismatches."""
    if not runs:
        raise ValueError("no runs")
    out = {name: float(statistics.median(get(r) for r in runs)) for name, get in METRICS.items()}
    out["failed"] = float(sum(int(r.get("failed", 0)) for r in runs))
    out["length_mismatches"] = float(sum(int(r.get("length_mismatches", 0)) for r in runs))
    out["repeats"] = float(len(runs))
    return out


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, None when either is missing or the divisor is 0."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, evaluated on the medians of one run."""

    what: str
    required: str
    measured: float | None  # the ratio, worker over peer (or peer over worker for "lower")
    threshold: float
    # the best ratio this machine allows: the worker at its roofline over the peer's measured
    # value (None: no roofline bounds it)
    ceiling: float | None = None

    @property
    def beyond_machine(self) -> bool:
        return self.ceiling is not None and self.ceiling < self.threshold

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        if self.measured >= self.threshold:
            return "met"
        return "not met (beyond this machine)" if self.beyond_machine else "not met"

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "required": self.required,
            "measured": self.measured,
            "threshold": self.threshold,
            "ceiling": self.ceiling,
            "verdict": self.verdict,
        }


def _get(med: dict[str, dict[str, dict[str, float]]], scen: str, system: str, key: str) -> Any:
    return med.get(scen, {}).get(system, {}).get(key)


# the roofline keys bounding each worker mode: the offline workload's compute ceiling (int4
# weights multiply in fp32) and the batch-1 memory ceiling (bf16 weights are 2 bytes, as fp16)
OFFLINE_CEILING = {
    "llmos_fp32": "compute_tok_s_fp32",
    "llmos_bf16": "compute_tok_s_bf16",
    "llmos_int4": "compute_tok_s_fp32",
}
SINGLE_MEMORY_CEILING = {
    "llmos_fp32": "batch1_mem_tok_s_fp32",
    "llmos_bf16": "batch1_mem_tok_s_fp16",
    "llmos_int4": "batch1_mem_tok_s_int4",
}


def ceilings(roof: dict[str, Any] | None) -> dict[str, dict[str, float | None]]:
    """Per worker mode, the tok/s its roofline allows: `offline_mixed` (every FLOP at the
    fastest matmul measured) and `single_stream` decode (every weight read once per token at the
    measured bandwidth, and no faster than the compute ceiling)."""
    if not roof:
        return {}
    work = roof.get("workloads", {})
    out: dict[str, dict[str, float | None]] = {}
    for mode in WORKER:
        offline = work.get("offline_mixed", {}).get(OFFLINE_CEILING[mode])
        memory = roof.get(SINGLE_MEMORY_CEILING[mode])
        compute = work.get("single_stream", {}).get(OFFLINE_CEILING[mode])
        bounds = [v for v in (memory, compute) if v]
        out[mode] = {
            "offline_mixed": offline,
            "single_stream": min(bounds) if bounds else None,
        }
    return out


def evaluate(results: dict[str, Any]) -> list[Target]:
    """The issue's targets, each worker mode against the peer of its precision class (and the
    single-stream and ITL ones against every peer the issue names); throughput targets carry
    the ratio the machine's roofline allows."""
    med: dict[str, dict[str, dict[str, float]]] = results.get("medians", {})
    systems: dict[str, dict[str, Any]] = results.get("systems", {})
    top = ceilings(results.get("roofline"))
    out: list[Target] = []
    for ours, theirs, need in (
        ("llmos_fp32", "vllm_fp32", 1.5),
        ("llmos_bf16", "vllm_bf16", 1.5),
        ("llmos_int4", "llama_server", 2.0),
    ):
        out.append(
            Target(
                f"offline mixed output tok/s, {ours} ÷ {theirs}",
                f"≥ {need:g}×",
                ratio(
                    _get(med, "offline_mixed", ours, "output_tok_s"),
                    _get(med, "offline_mixed", theirs, "output_tok_s"),
                ),
                need,
                ratio(
                    top.get(ours, {}).get("offline_mixed"),
                    _get(med, "offline_mixed", theirs, "output_tok_s"),
                ),
            )
        )
    for ours in WORKER:
        out.append(
            Target(
                f"single-stream decode tok/s, {ours} ÷ llama_server",
                "≥ 1.2×",
                ratio(
                    _get(med, "single_stream", ours, "decode_tok_s"),
                    _get(med, "single_stream", "llama_server", "decode_tok_s"),
                ),
                1.2,
                ratio(
                    top.get(ours, {}).get("single_stream"),
                    _get(med, "single_stream", "llama_server", "decode_tok_s"),
                ),
            )
        )
    for ours in WORKER:
        # "no worse than either peer": the same-class peer, and llama-server for every mode
        others = [SAME_CLASS[ours]] + (["llama_server"] if ours != "llmos_int4" else [])
        for theirs in others:
            out.append(
                Target(
                    f"16 streams p99 ITL, {theirs} ÷ {ours} (≥ 1: no worse)",
                    "≥ 1×",
                    ratio(
                        _get(med, "streams_16", theirs, "itl_p99_ms"),
                        _get(med, "streams_16", ours, "itl_p99_ms"),
                    ),
                    1.0,
                )
            )
    for ours, theirs in (("llmos_fp32", "vllm_fp32"), ("llmos_bf16", "vllm_bf16")):
        out.append(
            Target(
                f"idle memory (PSS), {theirs} ÷ {ours} (≥ 1: no more than vLLM)",
                "≥ 1×",
                ratio(
                    systems.get(theirs, {}).get("idle_pss"), systems.get(ours, {}).get("idle_pss")
                ),
                1.0,
            )
        )
    return out


# ---------------------------------------------------------------- rendering
def _num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    return f"{float(v):,.{digits}f}"


def _mib(v: Any) -> str:
    return "—" if not v else f"{float(v) / 2**20:,.0f}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


SCENARIO_TITLES = {
    "offline_mixed": "Offline mixed: 64 requests at once, prompts 32–512, outputs 32–256",
    "single_stream": "Single stream: 128-token prompt, 256 output tokens",
    "streams_16": "16 concurrent streams: prompts 128–256, 256 output tokens each",
    "shared_prefix": "Shared prefix: 32 requests at once, one 400-token prefix + 32 own tokens, "
    "32 outputs",
}


def render(results: dict[str, Any]) -> str:
    """The section's Markdown, markers included."""
    meta = results["meta"]
    systems: dict[str, dict[str, Any]] = results["systems"]
    med: dict[str, dict[str, dict[str, float]]] = results.get("medians", {})
    order = [s for s in (*WORKER, *PEERS) if s in systems]
    lines = [
        BEGIN,
        "## Peers: vLLM's CPU build and llama-server with parallel slots (one run)",
        "",
        "Generated by `make bench-peers` (`python -m bench.peers.run --out docs`); raw numbers in "
        "`docs/bench/peers.json`.",
        "",
        f"- Date: {meta['date']}; code at commit {meta['commit']}",
        "- Run complete: yes"
        if meta.get("complete")
        else "- **Partial run**: the numbers below are those measured before the run stopped",
        f"- Worker served from: {meta.get('worker_source', 'the working tree')}",
        f"- Machine: {meta['machine']}",
        f"- Load (`uptime`) before: `{meta['uptime_before']}`",
        f"- Load (`uptime`) after: `{meta['uptime_after']}`",
        "- The machine's 2 cores are shared with other work: the 1-minute load average before "
        "each scenario run is in the JSON (`load`); every system is hit by it alike, since the "
        "systems take turns run by run.",
        f"- Repeats: {meta['repeats']} per scenario and system, systems interleaved (the order "
        "rotates by repeat); each repeat draws its own prompts, the same for every system; "
        "numbers are medians over the repeats, ratios divide medians of this run.",
        "- One httpx client drives every system with the same streaming `/v1/completions` "
        "requests: prompts as token ids, greedy, `ignore_eos` and `min_tokens = max_tokens` "
        "(llama-server: `n_predict`), so each system produces the same number of tokens "
        "(length mismatches are counted below).",
        f"- {meta.get('setup', '')}",
        "",
        "| system | kind | command notes | startup to ready (s) | RSS idle / peak (MiB) | "
        "PSS idle (MiB) | idle CPU (%) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name in order:
        s = systems[name]
        if s.get("error"):
            lines.append(f"| {s['label']} | {s['kind']} | not measured: {s['error']} | | | | |")
            continue
        lines.append(
            f"| {s['label']} | {s['kind']} | {s.get('notes', '')} | {_num(s.get('startup_s'))} | "
            f"{_mib(s.get('idle_rss'))} / {_mib(s.get('peak_rss'))} | "
            f"{_mib(s.get('idle_pss'))} | "
            f"{_num(s.get('idle_cpu_percent'))} |"
        )
    lines += [
        "",
        "RSS sums every process of a server's tree (vLLM runs three), counting shared pages once "
        "per process; PSS divides shared pages among them, the tree's real footprint (read once, "
        "at idle: reading it walks every page table). Peak RSS: the highest sample (every 0.5 s) "
        "while the system was being driven. Idle: 3 s after the first ready answer, before any "
        "request; idle CPU over the next 5 s.",
    ]
    for scen in results.get("scenarios_run", []):
        rows = med.get(scen, {})
        if not rows:
            continue
        lines += [
            "",
            f"### {SCENARIO_TITLES.get(scen, scen)}",
            "",
            "| system | output tok/s | decode tok/s per stream | TTFT p50 / p99 (ms) | "
            "ITL p50 / p99 (ms) | failed | length mismatches |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in order:
            m = rows.get(name)
            if m is None:
                continue
            lines.append(
                f"| {systems[name]['label']} | {_num(m['output_tok_s'])} | "
                f"{_num(m['decode_tok_s'])} | {_num(m['ttft_p50_ms'], 0)} / "
                f"{_num(m['ttft_p99_ms'], 0)} | {_num(m['itl_p50_ms'])} / "
                f"{_num(m['itl_p99_ms'])} | {m['failed']:.0f} | {m['length_mismatches']:.0f} |"
            )
        peers = [p for p in PEERS if p in rows]
        workers = [w for w in WORKER if w in rows]
        if peers and workers:
            metric = "decode_tok_s" if scen == "single_stream" else "output_tok_s"
            lines += [
                "",
                f"Ratios of {metric.replace('_', ' ')} (worker ÷ peer; > 1: the worker is faster):",
                "",
                "| worker mode | " + " | ".join(systems[p]["label"] for p in peers) + " |",
                "|---|" + "---:|" * len(peers),
            ]
            for w in workers:
                cells = [_x(ratio(rows[w][metric], rows[p][metric])) for p in peers]
                lines.append(f"| {systems[w]['label']} | " + " | ".join(cells) + " |")
    targets = evaluate(results)
    lines += [
        "",
        "### The issue's targets (ratios of this run's medians)",
        "",
        "| target | required | measured | best possible here | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for t in targets:
        best = "—" if t.ceiling is None else _x(t.ceiling)
        lines.append(f"| {t.what} | {t.required} | {_x(t.measured)} | {best} | **{t.verdict}** |")
    lines += roofline_lines(results.get("roofline"))
    notes = results.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    lines += [END, ""]
    return "\n".join(lines)


def roofline_lines(roof: dict[str, Any] | None) -> list[str]:
    """The explanation of "best possible here" and the machine's measured rates."""
    if not roof:
        return []
    work = roof.get("workloads", {})
    offline = work.get("offline_mixed", {})
    rows = [
        ("fp32 matmul, the fastest measured (GFLOP/s)", roof.get("matmul_gflops_fp32")),
        ("bf16 matmul, the fastest measured (GFLOP/s)", roof.get("matmul_gflops_bf16_best")),
        ("memory read bandwidth (GB/s)", roof.get("memory_read_gbs")),
        ("batch-1 decode ceiling, fp32 weights (tok/s)", roof.get("batch1_mem_tok_s_fp32")),
        ("batch-1 decode ceiling, bf16 weights (tok/s)", roof.get("batch1_mem_tok_s_fp16")),
        ("batch-1 decode ceiling, int4 weights (tok/s)", roof.get("batch1_mem_tok_s_int4")),
        (
            "offline mixed (repeat 0's requests) ceiling, fp32 compute (tok/s)",
            offline.get("compute_tok_s_fp32"),
        ),
        ("offline mixed ceiling, bf16 compute (tok/s)", offline.get("compute_tok_s_bf16")),
    ]
    lines = [
        "",
        "Best possible here: the ratio if the worker ran at this machine's roofline, measured in "
        "the same run before the servers start and after they stop (each rate the better of the "
        "two), over the peer's measured value. Offline: every FLOP of the workload (prompts and "
        "attention included) at the fastest matmul measured for the mode (int4 weights multiply "
        "in fp32); single stream: every weight read once per token at the measured bandwidth. A "
        "target whose best possible ratio is below the requirement is beyond this machine.",
        "",
        "| machine roofline | value |",
        "|---|---:|",
    ]
    lines += [f"| {what} | {_num(v)} |" for what, v in rows if v is not None]
    return lines


def update_doc(doc: str, section: str) -> str:
    """`doc` with the text between the markers replaced by `section` (appended when absent)."""
    start = doc.find(BEGIN)
    end = doc.find(END)
    if start != -1 and end != -1 and end > start:
        tail = doc[end + len(END) :].lstrip("\n")
        return doc[:start] + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    sep = "" if doc.endswith("\n\n") or not doc else ("\n" if doc.endswith("\n") else "\n\n")
    return doc + sep + section.rstrip("\n") + "\n"
