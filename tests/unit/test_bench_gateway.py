"""The gateway benchmark's pure parts: the session workload, the SSE and /metrics parsing, the
statistics, the targets and the report section, the fake upstream's HTTP framing, and the local
pool's command lines. No worker or gateway process is started; no timing is asserted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bench import gateway_bench, gateway_load, localpool
from bench import gateway_report as report
from bench import gateway_workload as wl
from bench.metrics import RequestTiming
from llmos_gateway.routing import Router

TEXT = " ".join(f"word{i}" for i in range(5000))  # ~39 kB, every window distinct


# ---------------------------------------------------------------- the session workload
def sessions(n: int = 6, turns: int = 3, salt: str = "s1") -> list[wl.Session]:
    return wl.make_sessions(
        TEXT, sessions=n, turns=turns, system_chars=1200, user_chars=80, salt=salt
    )


def test_sessions_have_the_asked_shape_and_lengths() -> None:
    ss = sessions(6, 3)
    assert len(ss) == 6
    assert len({s.sid for s in ss}) == 6
    for s in ss:
        assert len(s.system) == 1200
        assert len(s.users) == 3
        assert all(u.startswith(f"Question {k + 1}: ") for k, u in enumerate(s.users))
        assert all(len(u) == len(f"Question {k + 1}: ") + 80 for k, u in enumerate(s.users))


def test_sessions_differ_from_the_first_characters_and_between_salts() -> None:
    a, b = sessions(salt="run-a"), sessions(salt="run-b")
    assert len({s.system[:24] for s in a}) == len(a)  # why: the gateway keys on leading chars
    assert all(s.system.startswith("[session run-a-") for s in a)
    assert not {s.system for s in a} & {s.system for s in b}
    assert sessions(salt="run-a") == a  # deterministic


def test_window_wraps_around_the_end_of_the_text() -> None:
    ss = wl.make_sessions("abc", sessions=1, turns=1, system_chars=200, user_chars=8, salt="x")
    assert len(ss[0].system) == 200
    assert "abc\nabc" in ss[0].system


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sessions": 0},
        {"turns": 0},
        {"system_chars": 10},
        {"user_chars": 2},
    ],
)
def test_bad_workload_sizes_are_refused(kwargs: dict[str, int]) -> None:
    base = {"sessions": 2, "turns": 2, "system_chars": 200, "user_chars": 16}
    with pytest.raises(ValueError):
        wl.make_sessions(TEXT, salt="x", **(base | kwargs))
    with pytest.raises(ValueError, match="empty"):
        wl.make_sessions("  \n", salt="x", **base)


def test_messages_carry_the_history_of_earlier_turns() -> None:
    s = sessions(1, 3)[0]
    first = wl.messages(s, [])
    assert first == [
        {"role": "system", "content": s.system},
        {"role": "user", "content": s.users[0]},
    ]
    third = wl.messages(s, ["r1", "r2"])
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert [m["content"] for m in third[2::2]] == ["r1", "r2"]
    assert third[-1]["content"] == s.users[2]
    with pytest.raises(ValueError, match="only 3 turns"):
        wl.messages(s, ["a", "b", "c"])


def test_every_turn_of_a_session_routes_by_the_same_prefix_key() -> None:
    """The workload's premise: the gateway's prefix key is one per session, whatever the turn,
    and differs between sessions (with the gateway's default key length)."""
    router = Router("prefix")
    keys = []
    for s in sessions(8, 4):
        per_turn = {
            router.key_of(wl.chat_body("m", wl.messages(s, ["reply"] * k), 8)) for k in range(4)
        }
        assert len(per_turn) == 1
        keys.append(per_turn.pop())
    assert len(set(keys)) == 8


def test_chat_body_asks_for_exactly_max_tokens_streamed_with_usage() -> None:
    body = wl.chat_body("m", [{"role": "user", "content": "hi"}], 24)
    assert body["max_tokens"] == body["min_tokens"] == 24
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_parse_chunk_reads_content_and_usage() -> None:
    role = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    assert wl.parse_chunk(role) == ("", None, None)
    piece = json.dumps({"choices": [{"index": 0, "delta": {"content": " Paris"}}]})
    assert wl.parse_chunk(piece) == (" Paris", None, None)
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 812, "completion_tokens": 24}})
    assert wl.parse_chunk(usage) == ("", 24, 812)
    with pytest.raises(json.JSONDecodeError):
        wl.parse_chunk("not json")


def metrics_page(hits: float, queries: float) -> str:
    """A /metrics page as the worker renders it (prometheus_client, counters with labels)."""

    class Collector:
        def collect(self) -> Any:
            for name, value in (
                ("llmos_prefix_cache_queries", queries),
                ("llmos_prefix_cache_hits", hits),
            ):
                c = CounterMetricFamily(name, "doc", labels=["model_name"])
                c.add_metric(["m"], value)
                yield c
            g = GaugeMetricFamily("llmos_num_requests_running", "doc", labels=["model_name"])
            g.add_metric(["m"], 3.0)
            yield g

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


def test_prefix_counters_parse_a_worker_metrics_page() -> None:
    page = metrics_page(900.0, 1200.0)
    assert "llmos_prefix_cache_hits_total" in page
    assert wl.prefix_counters(page) == {wl.HITS: 900.0, wl.QUERIES: 1200.0}
    assert wl.prefix_counters("other_metric 1\n") == {wl.HITS: 0.0, wl.QUERIES: 0.0}


def gateway_page(outcomes: dict[tuple[str, str], float]) -> str:
    registry = CollectorRegistry()
    c = Counter(wl.DECISIONS, "doc", ["strategy", "outcome"], registry=registry)
    for (strategy, outcome), n in outcomes.items():
        c.labels(strategy, outcome).inc(n)
    return generate_latest(registry).decode()


def test_routing_outcomes_and_their_shares_between_scrapes() -> None:
    before = wl.routing_outcomes(gateway_page({("prefix", "affinity"): 4}))
    assert before == {"affinity": 4.0}
    after = wl.routing_outcomes(
        gateway_page({("prefix", "affinity"): 10, ("prefix", "overflow"): 2})
    )
    assert after == {"affinity": 10.0, "overflow": 2.0}
    assert wl.outcome_shares(before, after) == {"affinity": 0.75, "overflow": 0.25}
    assert wl.outcome_shares(after, after) == {}
    assert wl.routing_outcomes("other 1\n") == {}


def test_hit_rate_is_the_ratio_of_the_counter_increments() -> None:
    before = {wl.HITS: 100.0, wl.QUERIES: 400.0}
    assert wl.hit_rate(before, {wl.HITS: 400.0, wl.QUERIES: 800.0}) == pytest.approx(0.75)
    assert wl.hit_rate(before, dict(before)) is None  # nothing looked up in between
    with pytest.raises(ValueError, match="backwards"):
        wl.hit_rate(before, {wl.HITS: 0.0, wl.QUERIES: 500.0})


def timing(rid: str, send: float, chunks: list[float], out: int, error: str | None = None) -> Any:
    t = RequestTiming(rid, 10, send, chunk_times=chunks, output_len=out)
    t.error = error
    return t


def test_run_stats_count_only_completed_requests() -> None:
    timings = [
        timing("s-00/0", 0.0, [0.1, 0.2], 2),
        timing("s-00/1", 0.0, [0.3, 0.5], 2),
        timing("s-01/0", 0.0, [], 0, error="HTTP 503: b'busy'"),
    ]
    s = wl.run_stats(timings, wall_s=2.0)
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["ttft_mean_ms"] == pytest.approx(200.0)
    assert s["ttft_median_ms"] == pytest.approx(200.0)
    assert s["ttft_p90_ms"] == pytest.approx(280.0)  # numpy's linear interpolation
    assert s["output_tokens"] == 4 and s["output_tok_s"] == pytest.approx(2.0)
    assert s["errors"] == ["HTTP 503: b'busy'"]
    assert s["ttft_first_turn_mean_ms"] == pytest.approx(100.0)  # the failed one left out
    assert s["ttft_later_turns_mean_ms"] == pytest.approx(300.0)
    only_first = wl.run_stats(timings[:1], wall_s=1.0)
    assert only_first["ttft_later_turns_mean_ms"] is None
    assert wl.run_stats([], 0.0)["output_tok_s"] == 0.0


# ---------------------------------------------------------------- verdicts and the report
def run(ttft: float, tok_s: float, hit: float | None) -> dict[str, Any]:
    return {
        "ttft_mean_ms": ttft,
        "ttft_p90_ms": 2 * ttft,
        "ttft_first_turn_mean_ms": 3 * ttft,
        "ttft_later_turns_mean_ms": ttft / 2,
        "computed_prompt_tokens": 1000.0 * (1 - hit) if hit is not None else None,
        "routing": {"affinity": 0.75, "overflow": 0.25},
        "output_tok_s": tok_s,
        "hit_rate": hit,
        "per_replica_hit_rate": [hit, hit],
        "load_1m_before": 1.5,
    }


def test_medians_over_repeats_skip_missing_values() -> None:
    m = report.medians([run(100, 10, 0.5), run(300, 30, None), run(200, 20, 0.7)])
    assert m == {
        "ttft_mean_ms": 200,
        "ttft_p90_ms": 400,
        "ttft_first_turn_mean_ms": 600,
        "ttft_later_turns_mean_ms": 100,
        "output_tok_s": 20,
        "hit_rate": 0.6,
        "computed_prompt_tokens": 400,
    }
    assert report.medians([])["ttft_mean_ms"] is None


def test_paired_overhead_uses_per_pair_differences() -> None:
    direct = [0.010, 0.020, 0.030]
    gateway = [0.011, 0.023, 0.031]
    o = report.paired_overhead_ms(direct, gateway)
    assert o["samples"] == 3
    assert o["added_median_ms"] == pytest.approx(1.0)
    assert o["added_of_medians_ms"] == pytest.approx(3.0)
    assert o["direct_median_ms"] == pytest.approx(20.0)
    with pytest.raises(ValueError):
        report.paired_overhead_ms([0.1], [])
    with pytest.raises(ValueError):
        report.paired_overhead_ms([], [])


def test_parse_counts() -> None:
    assert report.parse_counts("1, 8,32,8") == [1, 8, 32]
    for bad in ("", "0", "4,x", "-2"):
        with pytest.raises(ValueError):
            report.parse_counts(bad)


def point(n: int, rps: float, cpu_s: float) -> dict[str, Any]:
    through = {"requests": int(rps * 2), "errors": 0, "wall_s": 2.0, "requests_per_s": rps}
    direct = {"requests": 20000, "errors": 0, "wall_s": 2.0, "requests_per_s": 10000.0}
    return report.rate_point(n, through, direct, cpu_s, 1.234)


def test_rate_sweep_points_and_the_best_one() -> None:
    p = point(8, 500.0, 1.5)
    assert p["gateway_cpu_percent"] == pytest.approx(75.0)
    assert p["gateway_cpu_us_per_request"] == pytest.approx(1500.0)
    assert p["load_1m_before"] == 1.23
    best = report.best_rate([point(1, 300.0, 1.0), p, point(32, 450.0, 2.0)])
    assert best == {
        "requests_per_s": 500.0,
        "at_connections": 8,
        "gateway_cpu_us_per_request": 1500.0,
        "direct_requests_per_s": 10000.0,
    }
    assert point(1, 0.0, 0.5)["gateway_cpu_us_per_request"] is None
    with pytest.raises(ValueError):
        report.best_rate([])


def results(
    prefix_ttft: float, rr_ttft: float, prefix_tok: float, rr_tok: float, added: float
) -> dict[str, Any]:
    runs = {
        "prefix": [run(prefix_ttft, prefix_tok, 0.9)],
        "round-robin": [run(rr_ttft, rr_tok, 0.2)],
    }
    out: dict[str, Any] = {
        "meta": {
            "command": "python -m bench.gateway_bench --out docs",
            "date": "2026-01-01 00:00 UTC",
            "commit": "abc1234",
            "machine": "test machine",
            "load_before": [1.25, 1.0, 1.0],
            "load_after": [2.5, 1.0, 1.0],
        },
        "workload": {
            "model": "builtin://m",
            "workers": 2,
            "threads": 1,
            "kv_mib": 64,
            "kv_tokens": 1400,
            "sessions": 12,
            "turns": 5,
            "system_tokens": 800,
            "user_chars": 160,
            "max_tokens": 24,
            "concurrency": 6,
            "repeats": 1,
        },
        "runs": runs,
        "medians": {n: report.medians(rs) for n, rs in runs.items()},
        "per_replica_hit_rate": {"prefix": [0.9, 0.88], "round-robin": [0.2, None]},
        "overhead": {
            "completion": {
                "samples": 100,
                "direct_median_ms": 50.0,
                "gateway_median_ms": 50.0 + added,
                "added_median_ms": added,
                "added_of_medians_ms": added,
            }
        },
        "max_rps": {"seconds": 5.0, "sweep": [point(8, 500.0, 1.5)]},
    }
    out["max_rps"] |= report.best_rate(out["max_rps"]["sweep"])
    out["targets"] = report.targets(out)
    return out


def verdicts(res: dict[str, Any]) -> list[bool]:
    return [t["met"] for t in res["targets"]]


def test_targets_compare_the_medians_against_the_thresholds() -> None:
    res = results(prefix_ttft=100, rr_ttft=400, prefix_tok=20, rr_tok=20, added=1.0)
    assert [t["measured"] for t in res["targets"]] == [4.0, 1.0, 1.0]
    assert verdicts(res) == [True, True, True]
    # just under each threshold
    assert verdicts(results(100, 299, 19.9, 20, 2.0)) == [False, False, False]
    assert verdicts(results(100, 300, 20, 20, 1.99)) == [True, True, True]


def test_targets_without_a_measurement_are_not_met() -> None:
    res = results(100, 400, 20, 20, 1.0)
    res["medians"]["prefix"]["ttft_mean_ms"] = None
    res["medians"]["round-robin"]["output_tok_s"] = 0.0
    del res["overhead"]
    t = report.targets(res)
    assert len(t) == 2
    assert [x["measured"] for x in t] == [None, None]
    assert [x["met"] for x in t] == [False, False]


def test_render_shows_the_numbers_side_by_side_and_the_verdicts() -> None:
    text = report.render(results(100, 250, 25, 20, 3.5))
    assert text.startswith(report.BEGIN) and text.rstrip().endswith(report.END)
    assert "| prefix | 100.0 | 200.0 | 300.0 | 50.0 | 25.00 | 90 % | 90 %, 88 % | 100 |" in text
    assert "| round-robin | 250.0 | 500.0 | 750.0 | 125.0 | 20.00 | 20 % | 20 %, – | 800 |" in text
    assert "- prefix: 100.0 / 25.00 / 90 % / 1.50 / affinity 75 %, overflow 25 %" in text
    assert (
        "| mean TTFT, round-robin ÷ prefix (saturated: 6 requests in flight) | >= 3x | 2.50 | "
        "**not met** |"
    ) in text
    assert "| output tok/s, prefix ÷ round-robin (saturated) | >= 1x | 1.25 | **met** |" in text
    assert "### Paced" not in text  # no paced runs in these results
    assert "to a worker) | < 2 ms | 3.50 | **not met** |" in text
    assert "fake upstream" not in text.split("### Gateway overhead")[1].split("Max rate")[0]
    assert "1.25 / 2.50" in text  # load average before / after
    assert "**500 requests/s**" in text
    assert "| 8 | 500 | 75 | 1,500 | 10,000 | 1.23 |" in text


def test_the_fake_upstream_overhead_is_shown_and_judged_too() -> None:
    res = results(100, 400, 20, 20, 3.0)
    res["overhead_fake_upstream"] = {"completion": dict(res["overhead"]["completion"])}
    res["overhead_fake_upstream"]["completion"]["added_median_ms"] = 0.9
    res["targets"] = report.targets(res)
    assert verdicts(res) == [True, True, False, True]
    text = report.render(res)
    assert "completion, max_tokens 1, not streamed, to the fake upstream (answers at once)" in text
    assert "to the fake upstream) | < 2 ms | 0.90 | **met** |" in text


def test_render_lists_notes() -> None:
    res = results(100, 400, 20, 20, 1.0)
    res["notes"] = ["2 requests failed"]
    assert "- 2 requests failed" in report.render(res)


def test_missed_targets_are_explained_from_the_run_and_met_ones_not() -> None:
    met = results(100, 400, 20, 20, 1.0)
    assert report.explain(met) == []
    missed = results(100, 250, 19, 20, 3.5)
    notes = report.explain(missed)
    assert len(notes) == 3
    assert notes[0].startswith(
        "mean TTFT, round-robin ÷ prefix (saturated: 6 requests in flight): prompt tokens the "
        "workers"
    )
    assert "100 with prefix routing vs 800 with round-robin (8.00x)" in notes[0]
    assert "12 of the 60 requests" in notes[0]
    assert "hit rate prefix 90 % vs round-robin 20 %" in notes[0]
    assert "first turns 300 ms (prefix) vs 750 ms (round-robin)" in notes[0]
    assert "later turns 50 vs 125 ms (ratio 2.50)" in notes[0]
    assert "load average 1.25" in notes[0]
    assert notes[1].startswith("output tok/s")
    assert "1,500 µs of CPU per proxied request" in notes[2]
    assert "waits rather than computes" not in notes[2]  # 3.5 ms added vs 1.5 ms of CPU
    stalled = results(100, 400, 20, 20, 44.0)
    (note,) = report.explain(stalled)
    assert "The 44.0 ms added is over 5x that CPU time" in note
    assert "TCP_NODELAY" in note


def test_paced_runs_get_their_own_table_and_ttft_target() -> None:
    res = results(100, 250, 25, 20, 1.0)
    paced = {"prefix": [run(200, 10, 0.8)], "round-robin": [run(900, 9, 0.4)]}
    res["paced_runs"] = paced
    res["paced_medians"] = {n: report.medians(rs) for n, rs in paced.items()}
    res["paced_per_replica"] = {"prefix": [0.8, 0.8], "round-robin": [0.4, 0.4]}
    res["workload"]["paced"] = {
        "sessions": 12,
        "turns": 8,
        "think_s": 8.0,
        "stagger_s": 2.0,
        "repeats": 1,
    }
    res["targets"] = report.targets(res)
    by_name = {t["target"]: t for t in res["targets"]}
    paced_t = by_name["mean TTFT, round-robin ÷ prefix (paced sessions: think time between turns)"]
    assert (paced_t["measured"], paced_t["met"]) == (4.5, True)
    saturated = by_name["mean TTFT, round-robin ÷ prefix (saturated: 6 requests in flight)"]
    assert (saturated["measured"], saturated["met"]) == (2.5, False)
    text = report.render(res)
    section = text.split("### Paced")[1].split("### Gateway overhead")[0]
    assert "12 chat sessions x 8 turns, a session starting every 2.0 s, 8.0 s between" in section
    assert "| prefix | 200.0 | 400.0 | 600.0 | 100.0 | 10.00 | 80 % | 80 %, 80 % |" in section
    assert "- round-robin: 900.0 / 9.00 / 40 % /" in section
    res["paced_medians"]["prefix"]["ttft_mean_ms"] = 400.0
    res["targets"] = report.targets(res)
    (note,) = [n for n in report.explain(res) if "(paced" in n]
    assert "hit rate prefix 80 % vs round-robin 40 %" in note


def test_render_names_a_changed_tree() -> None:
    res = results(100, 400, 20, 20, 1.0)
    assert "tracked files changed" not in report.render(res)
    res["meta"]["tracked_files_changed"] = ["worker/a.py", "worker/b.c"]
    assert "abc1234 (tracked files changed in the tree: 2" in report.render(res)


def test_rerender_from_the_saved_results_with_a_note(tmp_path: Path) -> None:
    saved, doc = tmp_path / "gateway.json", tmp_path / "benchmarks.md"
    res = results(100, 250, 20, 20, 1.0)
    res["notes"] = [
        "mean TTFT, round-robin ÷ prefix (saturated: 6 requests in flight): an older wording",
        "3 requests failed",
    ]
    saved.write_text(json.dumps(res))
    doc.write_text(f"# Benchmarks\n\n{report.BEGIN}\nold\n{report.END}\n\n## Later\n")
    assert report.main([str(saved), "--doc", str(doc), "--note", "measured after a fix"]) == 0
    text = doc.read_text()
    assert "\nold\n" not in text and text.endswith("## Later\n")
    assert "Analysis after the run:\n\n- measured after a fix" in text
    again = json.loads(saved.read_text())
    assert again["analysis"] == ["measured after a fix"]
    assert again["notes"][0] == "3 requests failed"  # kept; the automatic one made afresh
    assert again["notes"][1:] == report.explain(res)
    assert "an older wording" not in text


def test_update_doc_replaces_only_the_section() -> None:
    section = f"{report.BEGIN}\nnew\n{report.END}\n"
    doc = f"# Benchmarks\n\nintro\n\n{report.BEGIN}\nold\n{report.END}\n\n## Later\n\ntail\n"
    out = report.update_doc(doc, section)
    assert (
        out == f"# Benchmarks\n\nintro\n\n{report.BEGIN}\nnew\n{report.END}\n\n## Later\n\ntail\n"
    )
    assert report.update_doc(out, section) == out  # idempotent


def test_update_doc_appends_when_the_markers_are_absent() -> None:
    section = f"{report.BEGIN}\nx\n{report.END}\n"
    assert report.update_doc("# B\n", section) == f"# B\n\n{section}"
    assert report.update_doc("# B\n\n", section) == f"# B\n\n{section}"
    assert report.update_doc("", section) == section


# ---------------------------------------------------------------- the fake upstream's framing
def test_parse_head_lowercases_header_names() -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12"
    assert gateway_load.parse_head(head) == (
        "POST",
        "/v1/completions",
        {"host": "x", "content-length": "12"},
    )
    with pytest.raises(ValueError):
        gateway_load.parse_head(b"garbage")


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("POST", "/v1/completions", 200, b'"text_completion"'),
        ("POST", "/v1/chat/completions?x=1", 200, b'"text_completion"'),
        ("GET", "/v1/models", 200, b'"fake"'),
        ("GET", "/metrics", 200, b"llmos_num_requests_waiting 0"),
        ("GET", "/ready", 200, b"ready"),
        ("GET", "/nope", 404, b"not_found"),
    ],
)
def test_the_fake_upstream_answers(method: str, path: str, status: int, needle: bytes) -> None:
    raw = gateway_load.answer(method, path)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    _, _, headers = gateway_load.parse_head(head)
    assert int(headers["content-length"]) == len(body)
    assert needle in body


def test_read_response_handles_content_length_and_chunked_bodies() -> None:
    async def read(data: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        status = await gateway_load._read_response(reader)
        return status, await reader.read()

    fixed = gateway_load.response(200, b"hello") + b"NEXT"
    assert asyncio.run(read(fixed)) == (200, b"NEXT")
    chunked = (
        b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\nNEXT"
    )
    assert asyncio.run(read(chunked)) == (503, b"NEXT")


def test_drive_counts_requests_against_the_fake_upstream_in_process() -> None:
    async def go() -> dict[str, float]:
        server = await asyncio.start_server(gateway_load._serve_conn, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await gateway_load.drive(f"http://127.0.0.1:{port}", 2, 0.2)

    out = asyncio.run(go())
    assert out["errors"] == 0
    assert out["requests"] > 0
    assert out["requests_per_s"] == pytest.approx(out["requests"] / out["wall_s"], rel=0.01)


# ---------------------------------------------------------------- the bench's own parsing
def test_kv_tokens_from_the_worker_log(tmp_path: Path) -> None:
    log = tmp_path / "w0.log"
    log.write_text(
        "INFO llmos_worker.engine.engine: KV cache: 426 blocks of 16 tokens "
        "(300.0 MiB, float32): capped by ...\n"
    )
    assert gateway_bench.kv_tokens(log) == 426 * 16
    log.write_text("nothing here\n")
    assert gateway_bench.kv_tokens(log) is None
    assert gateway_bench.kv_tokens(tmp_path / "missing.log") is None
    assert gateway_bench.kv_tokens(None) is None


def test_bench_arguments() -> None:
    args = gateway_bench.parse_args(["--rate-connections", "1,16"])
    assert args.strategy_names == ["prefix", "round-robin"]
    assert gateway_bench.parse_args(
        ["--strategies", "least-load, prefix,round-robin"]
    ).strategy_names == [
        "least-load",
        "prefix",
        "round-robin",
    ]
    assert args.rate_connection_counts == [1, 16]
    saturated, paced = gateway_bench.modes(args)
    assert (saturated.name, saturated.concurrency, saturated.think_s) == ("saturated", 6, 0.0)
    assert (paced.name, paced.sessions, paced.turns) == ("paced", 12, 8)
    assert paced.concurrency == paced.sessions and paced.think_s > 0
    assert [
        m.name for m in gateway_bench.modes(gateway_bench.parse_args(["--paced-repeats", "0"]))
    ] == ["saturated"]
    for bad in (
        ["--strategies", "prefix,least-load"],
        ["--workers", "1"],
        ["--repeats", "0"],
        ["--rate-connections", "0"],
        ["--paced-repeats", "-1"],
        ["--think-s", "-1"],
        ["--paced-turns", "0"],
    ):
        with pytest.raises(SystemExit):
            gateway_bench.parse_args(bad)


# ---------------------------------------------------------------- the local pool
def test_worker_command() -> None:
    cmd = localpool.worker_command("builtin://m", 8123, kv_mib=64, max_num_seqs=8)
    assert Path(cmd[0]).name == "llmos-worker" and cmd[1] == "serve"
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert flags["--model"] == "builtin://m"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "8123"
    assert flags["--kv-cache-memory-bytes"] == str(64 * 2**20)
    assert flags["--max-num-seqs"] == "8"
    assert "--enable-prefix-caching" in cmd
    with pytest.raises(ValueError):
        localpool.worker_command("builtin://m", 1, kv_mib=0, max_num_seqs=8)


def test_gateway_command() -> None:
    cmd = localpool.gateway_command(["http://a:1", "http://b:2"], 9000, "round-robin")
    assert Path(cmd[0]).name == "llmos-gateway"
    assert cmd[cmd.index("--port") + 1] == "9000"
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "--replica"] == [
        "http://a:1",
        "http://b:2",
    ]
    assert cmd[cmd.index("--strategy") + 1] == "round-robin"
    with pytest.raises(ValueError):
        localpool.gateway_command([], 9000, "prefix")


def test_pool_arguments_and_ports() -> None:
    args = localpool.parse_args(["--port", "9000", "--workers", "3"])
    assert args.worker_port == 9001 and args.strategy == "prefix" and args.threads == 1
    assert localpool.parse_args(["--worker-port", "7000"]).worker_port == 7000
    for bad in (
        ["--workers", "0"],
        ["--port", "9001", "--worker-port", "9000", "--workers", "2"],  # overlap
        ["--port", "65535"],  # the worker port would be 65536
        ["--strategy", "random"],
    ):
        with pytest.raises(SystemExit):
            localpool.parse_args(bad)


def test_ready_message_prints_the_urls_and_a_request_that_parses() -> None:
    text = localpool.ready_message(
        "http://127.0.0.1:8000", "prefix", ["http://127.0.0.1:8001"], "builtin://smollm2"
    )
    assert "gateway http://127.0.0.1:8000 (prefix routing) over http://127.0.0.1:8001" in text
    curl = next(line for line in text.splitlines() if line.startswith("try: curl"))
    payload = json.loads(curl.split("-d '", 1)[1].rstrip("'"))
    assert payload["model"] == "smollm2"
    assert payload["messages"][0]["role"] == "user"
