"""The PNG summary of one run (matplotlib, Agg backend, no display): offline and single-stream
throughput per system against the roofline, shared-prefix TTFT with caching on/off, and online
TTFT / TPOT against the arrival rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _tput(m: dict[str, Any] | None) -> float:
    return float((m or {}).get("output_throughput") or 0.0)


def draw(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    roof = results.get("roofline", {})
    systems = (
        "llmos",
        "llmos fp16",
        "llmos int8",
        "llmos bf16",
        "llmos int4",
        "HF generate",
        "llama.cpp",
    )

    offline_roof = ((roof.get("workloads") or {}).get("offline_mixed") or {}).get(
        "compute_tok_s_fp32"
    )
    for ax, key, title, ceiling, label in (
        (
            axes[0][0],
            "offline_mixed",
            "(1) offline mixed, output tok/s",
            offline_roof,
            "fp32 compute ceiling of the workload",
        ),
        (
            axes[0][1],
            "single_stream",
            "(4) single stream, output tok/s",
            roof.get("batch1_mem_tok_s_fp32"),
            "batch-1 memory ceiling, fp32 weights",
        ),
    ):
        block = results.get(key, {})
        hf = block.get("hf_best") if key == "offline_mixed" else block.get("hf")
        vals = [
            _tput(block.get("llmos")),
            _tput(block.get("llmos_fp16")),
            _tput(block.get("llmos_int8")),
            _tput(block.get("llmos_bf16")),
            _tput(block.get("llmos_int4")),
            _tput(hf),
            _tput(block.get("llamacpp")),
        ]
        bars = ax.bar(
            systems,
            vals,
            color=[
                "tab:blue",
                "tab:cyan",
                "tab:purple",
                "tab:olive",
                "tab:brown",
                "tab:orange",
                "tab:green",
            ],
        )
        ax.bar_label(bars, fmt="%.0f")
        if ceiling:
            ax.axhline(ceiling, color="red", linestyle="--", label=label)
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("tok/s")
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)

    sp = results.get("shared_prefix", {})
    ttft = [
        ((sp.get(k) or {}).get("ttft") or {}).get("mean_ms", 0.0)
        for k in ("caching_on", "caching_off")
    ]
    bars = axes[1][0].bar(
        ["prefix cache on", "prefix cache off"], ttft, color=["tab:blue", "tab:gray"]
    )
    axes[1][0].bar_label(bars, fmt="%.0f")
    axes[1][0].set_title("(3) shared 512-token prefix, mean TTFT (ms)")
    axes[1][0].set_ylabel("ms")

    ax = axes[1][1]
    online = {r: m for r, m in results.get("online", {}).items() if "ttft" in m}
    if online:
        rates = [float(r) for r in online]
        for metric, style in (("ttft", "o-"), ("tpot", "s-")):
            ax.plot(
                rates,
                [m[metric]["median_ms"] for m in online.values()],
                style,
                label=f"{metric.upper()} p50",
            )
            ax.plot(
                rates,
                [m[metric]["p99_ms"] for m in online.values()],
                style,
                alpha=0.4,
                label=f"{metric.upper()} p99",
            )
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    ax.set_title("(2) online, streaming over HTTP")

    fig.suptitle(f"LLM OS worker benchmarks — {results.get('meta', {}).get('date', '')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
