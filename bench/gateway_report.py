"""The gateway benchmark's verdicts and its section of docs/benchmarks.md (pure functions).

The section lives between two markers, so that rewriting it leaves the rest of the file alone.
Figures per strategy are medians over the interleaved repeats; each target compares the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BEGIN = "<!-- gateway:begin -->"
END = "<!-- gateway:end -->"
TTFT_TARGET = 3.0  # round-robin mean TTFT / prefix mean TTFT
THROUGHPUT_TARGET = 1.0  # prefix output tok/s / round-robin output tok/s
OVERHEAD_TARGET_MS = 2.0
WAITING_FACTOR = 5  # added latency over this multiple of the gateway's CPU per request: waiting
FIELDS = (
    "ttft_mean_ms",
    "ttft_p90_ms",
    "ttft_first_turn_mean_ms",
    "ttft_later_turns_mean_ms",
    "output_tok_s",
    "hit_rate",
    "computed_prompt_tokens",
)


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Each field's median over the repeats of one strategy (None where no run has it)."""
    out: dict[str, float | None] = {}
    for f in FIELDS:
        values = [r[f] for r in runs if r.get(f) is not None]
        out[f] = round(float(statistics.median(values)), 3) if values else None
    return out


def paired_overhead_ms(direct_s: Sequence[float], gateway_s: Sequence[float]) -> dict[str, float]:
    """Added latency of the gateway from interleaved pairs (seconds in, milliseconds out):
    the median of the per-pair differences, and the difference of the two medians."""
    if not direct_s or len(direct_s) != len(gateway_s):
        raise ValueError("need the same, non-zero number of direct and gateway samples")
    diffs = [g - d for d, g in zip(direct_s, gateway_s, strict=True)]
    return {
        "samples": len(diffs),
        "direct_median_ms": round(1000 * statistics.median(direct_s), 3),
        "gateway_median_ms": round(1000 * statistics.median(gateway_s), 3),
        "added_median_ms": round(1000 * statistics.median(diffs), 3),
        "added_of_medians_ms": round(
            1000 * (statistics.median(gateway_s) - statistics.median(direct_s)), 3
        ),
    }


def parse_counts(text: str) -> list[int]:
    """`"1,8,32"` -> [1, 8, 32]: positive integers, in the order given, no repeats."""
    counts: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"{part!r} is not a positive integer")
        if int(part) not in counts:
            counts.append(int(part))
    if not counts:
        raise ValueError("no connection count given")
    return counts


def rate_point(
    connections: int,
    through: dict[str, Any],
    direct: dict[str, Any],
    gateway_cpu_s: float,
    load_1m: float,
) -> dict[str, Any]:
    """One step of the max-rate sweep: the load client's results through the gateway and
    direct, with the gateway process's CPU over the run through it."""
    wall, done = float(through["wall_s"]), int(through["requests"])
    return {
        "connections": connections,
        "load_1m_before": round(load_1m, 2),
        "gateway": through,
        "direct": direct,
        "gateway_cpu_percent": round(100 * gateway_cpu_s / wall, 1) if wall > 0 else None,
        "gateway_cpu_us_per_request": round(1e6 * gateway_cpu_s / done, 1) if done else None,
    }


def best_rate(sweep: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's highest gateway rate: its requests/s, connections and CPU per request."""
    if not sweep:
        raise ValueError("an empty sweep has no best rate")
    best = max(sweep, key=lambda p: float(p["gateway"]["requests_per_s"]))
    return {
        "requests_per_s": best["gateway"]["requests_per_s"],
        "at_connections": best["connections"],
        "gateway_cpu_us_per_request": best["gateway_cpu_us_per_request"],
        "direct_requests_per_s": best["direct"]["requests_per_s"],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, measured: name, required, measured, met."""
    med = results.get("medians", {})
    prefix, rr = med.get("prefix", {}), med.get("round-robin", {})
    w = results.get("workload", {})
    out: list[dict[str, Any]] = [
        {
            "target": f"mean TTFT, round-robin ÷ prefix (saturated: {w.get('concurrency')} "
            "requests in flight)",
            "required": f">= {TTFT_TARGET:g}x",
            "measured": _ratio(rr.get("ttft_mean_ms"), prefix.get("ttft_mean_ms")),
            "threshold": TTFT_TARGET,
        },
    ]
    paced = results.get("paced_medians") or {}
    if paced:
        pp, prr = paced.get("prefix", {}), paced.get("round-robin", {})
        out.append(
            {
                "target": "mean TTFT, round-robin ÷ prefix (paced sessions: think time "
                "between turns)",
                "required": f">= {TTFT_TARGET:g}x",
                "measured": _ratio(prr.get("ttft_mean_ms"), pp.get("ttft_mean_ms")),
                "threshold": TTFT_TARGET,
            }
        )
    out += [
        {
            "target": "output tok/s, prefix ÷ round-robin (saturated)",
            "required": f">= {THROUGHPUT_TARGET:g}x",
            "measured": _ratio(prefix.get("output_tok_s"), rr.get("output_tok_s")),
            "threshold": THROUGHPUT_TARGET,
        },
    ]
    for t in out:
        measured, threshold = t["measured"], float(t["threshold"])
        t["met"] = measured is not None and float(measured) >= threshold
    for key, where in (("overhead", "a worker"), ("overhead_fake_upstream", "the fake upstream")):
        over = results.get(key, {}).get("completion")
        if over:
            added = over["added_median_ms"]
            out.append(
                {
                    "target": "gateway added latency per request (median, completion "
                    f"max_tokens 1, to {where})",
                    "required": f"< {OVERHEAD_TARGET_MS:g} ms",
                    "measured": added,
                    "threshold": OVERHEAD_TARGET_MS,
                    "met": added < OVERHEAD_TARGET_MS,
                }
            )
    return out


def explain(results: dict[str, Any]) -> list[str]:
    """One note per missed target, from the run's own figures (what bounds it here)."""
    notes: list[str] = []
    w, med = results["workload"], results.get("medians", {})
    prefix, rr = med.get("prefix", {}), med.get("round-robin", {})
    load = results["meta"].get("load_before", [None])[0]
    for t in results.get("targets", []):
        if t["met"]:
            continue
        if "(paced" in t["target"]:
            paced = results.get("paced_medians") or {}
            pp, prr = paced.get("prefix", {}), paced.get("round-robin", {})
            notes.append(
                f"{t['target']}: prefix-cache hit rate prefix {_pct(pp.get('hit_rate'))} vs "
                f"round-robin {_pct(prr.get('hit_rate'))}; mean TTFT of first turns "
                f"{_n(pp.get('ttft_first_turn_mean_ms'), 0)} ms (prefix) vs "
                f"{_n(prr.get('ttft_first_turn_mean_ms'), 0)} ms (round-robin), of later turns "
                f"{_n(pp.get('ttft_later_turns_mean_ms'), 0)} vs "
                f"{_n(prr.get('ttft_later_turns_mean_ms'), 0)} ms; load average "
                f"{_n(load, 2)} at the start."
            )
        elif t["target"].startswith("mean TTFT") or t["target"].startswith("output tok/s"):
            key = "ttft_later_turns_mean_ms"
            later = _ratio(rr.get(key), prefix.get(key))
            work = _ratio(rr.get("computed_prompt_tokens"), prefix.get("computed_prompt_tokens"))
            notes.append(
                f"{t['target']}: prompt tokens the workers had to compute (not found cached) per "
                f"run: {_n(prefix.get('computed_prompt_tokens'), 0)} with prefix routing vs "
                f"{_n(rr.get('computed_prompt_tokens'), 0)} with round-robin ({_n(work, 2)}x): "
                "with a fixed number of requests in flight, TTFT and throughput follow that "
                f"work. {w['sessions']} of the {w['sessions'] * w['turns']} requests of "
                "a run are first turns, whose system prompt no worker has cached under any "
                f"strategy; prefix-cache hit rate prefix {_pct(prefix.get('hit_rate'))} vs "
                f"round-robin {_pct(rr.get('hit_rate'))}; mean TTFT of first turns "
                f"{_n(prefix.get('ttft_first_turn_mean_ms'), 0)} ms (prefix) vs "
                f"{_n(rr.get('ttft_first_turn_mean_ms'), 0)} ms (round-robin), of later turns "
                f"{_n(prefix.get('ttft_later_turns_mean_ms'), 0)} vs "
                f"{_n(rr.get('ttft_later_turns_mean_ms'), 0)} ms (ratio "
                f"{_n(later, 2)}); {w['workers']} workers share the machine's cores with "
                f"other work (load average {_n(load, 2)} at the start)."
            )
        elif t["target"].startswith("gateway added latency"):
            rps = results.get("max_rps") or {}
            cpu = rps.get("gateway_cpu_us_per_request")
            note = (
                f"{t['target']}: the gateway process spends {_n(cpu, 0)} µs of CPU per proxied "
                "request at its best rate against the fake upstream (body parsing, tenant and "
                "rate-limit checks, routing, and the upstream call through aiohttp); with other "
                f"work on the 2 cores (load average {_n(load, 2)} at the start) a request may "
                "also wait for a core."
            )
            if cpu and float(t["measured"]) * 1000 > WAITING_FACTOR * float(cpu):
                note += (
                    f" The {_n(t['measured'], 1)} ms added is over {WAITING_FACTOR}x that CPU "
                    "time, so the request mostly waits rather than computes; a near-constant "
                    "~40 ms per request on a reused connection is the signature of Nagle's "
                    "algorithm meeting delayed ACKs (a response written in two pieces on a "
                    "socket without TCP_NODELAY)."
                )
            notes.append(note)
    return notes


def _n(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return f"{v:,.{digits}f}"
    return str(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def render(results: dict[str, Any]) -> str:
    """The markdown section, markers included."""
    m, w = results["meta"], results["workload"]
    lines = [
        BEGIN,
        "## Gateway: prefix routing vs round-robin, and the gateway's own cost",
        "",
        f"- Command: `{m['command']}`; date {m['date']}; code at commit {m['commit']}"
        + (
            f" (tracked files changed in the tree: {len(m['tracked_files_changed'])}, listed in "
            "gateway.json)"
            if m.get("tracked_files_changed")
            else ""
        ),
        f"- Machine: {m['machine']}",
        f"- Load average (1 min) before / after: {_n(m['load_before'][0], 2)} / "
        f"{_n(m['load_after'][0], 2)} (other work on the machine slows every number here)",
        f"- Pool: {w['workers']} `llmos-worker serve` processes of {w['model']}, "
        f"{w['threads']} thread each, KV cache {w['kv_mib']} MiB each "
        f"({_n(w.get('kv_tokens'), 0)} tokens), prefix caching on; one `llmos-gateway` per "
        "strategy over the same workers",
        f"- Workload per run: {w['sessions']} chat sessions x {w['turns']} turns, each with its "
        f"own system prompt of ~{_n(w.get('system_tokens'), 0)} tokens, user turns of "
        f"{w['user_chars']} characters, {w['max_tokens']} output tokens per turn, at most "
        f"{w['concurrency']} requests in flight; a fresh salt per run (nothing cached from "
        f"earlier runs); {w['repeats']} interleaved repeats, strategy order rotated",
        "",
        "### Saturated: every session at once, a fixed number of requests in flight",
        "",
        *_strategy_table(results["medians"], results["runs"], results["per_replica_hit_rate"]),
    ]
    paced = w.get("paced")
    if paced and results.get("paced_medians"):
        lines += [
            "",
            "### Paced: sessions start one by one, users think between turns",
            "",
            f"- Workload per run: {paced['sessions']} chat sessions x {paced['turns']} turns, "
            f"a session starting every {_n(paced['stagger_s'], 1)} s, {_n(paced['think_s'], 1)} "
            "s between a reply and the next turn, no cap on requests in flight (the same "
            f"system prompts, user turns and output length as above); {paced['repeats']} "
            "interleaved repeats",
            "",
            *_strategy_table(
                results["paced_medians"],
                results["paced_runs"],
                results.get("paced_per_replica", {}),
            ),
        ]
    lines += ["", "### Gateway overhead", ""]
    for over, where in (
        (results.get("overhead", {}), "to a worker"),
        (results.get("overhead_fake_upstream", {}), "to the fake upstream (answers at once)"),
    ):
        for what, label in (
            ("completion", "completion, max_tokens 1, not streamed"),
            ("models", "GET /v1/models"),
        ):
            o = over.get(what)
            if not o:
                continue
            lines.append(
                f"- {label}, {where}, {o['samples']} interleaved pairs: direct "
                f"{_n(o['direct_median_ms'], 2)} ms, through the gateway "
                f"{_n(o['gateway_median_ms'], 2)} ms (medians); added "
                f"{_n(o['added_median_ms'], 2)} ms (median of per-pair differences)"
            )
    rps = results.get("max_rps")
    if rps:
        lines.append(
            f"- Max rate against a fake upstream that answers at once (separate processes for "
            f"the upstream, the gateway and a raw-socket client of keep-alive connections, "
            f"{_n(rps['seconds'], 0)} s per step): **{_n(rps['requests_per_s'], 0)} requests/s** "
            f"through the gateway (at {rps['at_connections']} connections, "
            f"{_n(rps['gateway_cpu_us_per_request'], 0)} µs of gateway CPU per request); the "
            f"same client direct to the upstream: {_n(rps['direct_requests_per_s'], 0)} "
            "requests/s"
        )
        lines += [
            "",
            "| connections | through the gateway, requests/s | gateway CPU % of a core | "
            "gateway CPU µs / request | direct, requests/s | load (1 min) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for pt in rps["sweep"]:
            lines.append(
                f"| {pt['connections']} | {_n(pt['gateway']['requests_per_s'], 0)} | "
                f"{_n(pt['gateway_cpu_percent'], 0)} | "
                f"{_n(pt['gateway_cpu_us_per_request'], 0)} | "
                f"{_n(pt['direct']['requests_per_s'], 0)} | {_n(pt['load_1m_before'], 2)} |"
            )
    lines += ["", "| target | required | measured | verdict |", "|---|---|---:|---|"]
    for t in results["targets"]:
        verdict = "**met**" if t["met"] else "**not met**"
        lines.append(f"| {t['target']} | {t['required']} | {_n(t['measured'], 2)} | {verdict} |")
    notes = results.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    analysis = results.get("analysis") or []
    if analysis:
        lines += ["", "Analysis after the run:", ""] + [f"- {n}" for n in analysis]
    lines += [END, ""]
    return "\n".join(lines)


def _strategy_table(
    medians_by: dict[str, Any], runs_by: dict[str, Any], per_replica: dict[str, Any]
) -> list[str]:
    """The medians per strategy, then each repeat's figures."""
    lines = [
        "| strategy | mean TTFT ms | p90 TTFT ms | mean TTFT ms, first turns | mean TTFT ms, "
        "later turns | output tok/s | prefix-cache hit rate (all replicas) | per replica | "
        "prompt tokens computed |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, med in medians_by.items():
        per = per_replica.get(name, [])
        lines.append(
            f"| {name} | {_n(med['ttft_mean_ms'])} | {_n(med['ttft_p90_ms'])} | "
            f"{_n(med.get('ttft_first_turn_mean_ms'))} | "
            f"{_n(med.get('ttft_later_turns_mean_ms'))} | "
            f"{_n(med['output_tok_s'], 2)} | {_pct(med['hit_rate'])} | "
            + ", ".join(_pct(v) for v in per)
            + f" | {_n(med.get('computed_prompt_tokens'), 0)} |"
        )
    lines += [
        "",
        "Each repeat (mean TTFT ms / output tok/s / hit rate / load average at its start / the "
        "gateway's replica choices):",
        "",
    ]
    for name, runs in runs_by.items():
        cells = "; ".join(
            f"{_n(r['ttft_mean_ms'])} / {_n(r['output_tok_s'], 2)} / {_pct(r['hit_rate'])} / "
            f"{_n(r.get('load_1m_before'), 2)} / "
            + (", ".join(f"{k} {_pct(v)}" for k, v in (r.get("routing") or {}).items()) or "–")
            for r in runs
        )
        lines.append(f"- {name}: {cells}")
    return lines


def update_doc(doc: str, section: str) -> str:
    """`doc` with the text between the markers replaced by `section` (appended when absent)."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start != -1 and end != -1 and end > start:
        tail = doc[end + len(END) :].lstrip("\n")
        return doc[:start] + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    sep = "" if doc.endswith("\n\n") or not doc else ("\n" if doc.endswith("\n") else "\n\n")
    return doc + sep + section.rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the section of a benchmarks.md from a saved gateway.json, with the notes on
    missed targets made afresh and an analysis made after the run added (`--note TEXT`,
    repeatable, kept in the JSON under `analysis`)."""
    p = argparse.ArgumentParser(prog="python -m bench.gateway_report", description=main.__doc__)
    p.add_argument("results", type=Path, help="a gateway.json written by bench.gateway_bench")
    p.add_argument("--doc", type=Path, required=True, help="the benchmarks.md to update")
    p.add_argument("--note", action="append", default=[], help="a note to add (repeatable)")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    automatic = tuple(f"{t['target']}:" for t in results.get("targets", []))
    kept = [n for n in results.get("notes", []) if not n.startswith(automatic)]
    results["notes"] = kept + explain(results)
    results["analysis"] = [*results.get("analysis", []), *(n for n in args.note if n.strip())]
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    doc = args.doc.read_text() if args.doc.exists() else "# Benchmarks\n"
    args.doc.write_text(update_doc(doc, render(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
