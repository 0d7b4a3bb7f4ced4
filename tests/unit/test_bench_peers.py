"""The peers benchmark's pure parts: request construction per system, the SSE driver (against a
mock transport), per-run statistics, medians over repeats, target verdicts and the report.

No timing is asserted: these tests check that the numbers are computed as documented.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.metrics import RequestTiming
from bench.peers import driver, report, scenarios, systems
from bench.peers.run import rotated
from bench.workload import BenchRequest

POOL = list(range(20_000))  # a fake token stream: each window is recognisable by its start


# ---------------------------------------------------------------- request construction
@pytest.mark.parametrize("kind", ["llmos", "vllm", "llama_server"])
def test_request_body_is_the_same_request_for_every_system(kind: systems.Kind) -> None:
    prompt = [5, 6, 7]
    body = systems.request_body(kind, "m", prompt, 40)
    assert body["prompt"] == [5, 6, 7] and body["prompt"] is not prompt
    assert body["max_tokens"] == 40
    assert body["temperature"] == 0.0
    assert body["ignore_eos"] is True
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    if kind == "llama_server":
        assert body["n_predict"] == 40 and "min_tokens" not in body
    else:
        assert body["min_tokens"] == 40 and "n_predict" not in body


def test_request_body_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown system kind"):
        systems.request_body("tgi", "m", [1], 4)  # type: ignore[arg-type]


def _paths(tmp_path: Path) -> systems.Paths:
    return systems.Paths(
        gguf=tmp_path / "m.gguf",
        hf_dir=tmp_path / "hf",
        vllm_python=tmp_path / "venv" / "bin" / "python",
        llama_server=tmp_path / "llama-server",
        worker_cli=tmp_path / "llmos-worker",
    )


def test_systems_cover_the_issue_modes_with_the_port_filled_in(tmp_path: Path) -> None:
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_bytes(b"")
    got = {s.name: s for s in systems.all_systems(_paths(tmp_path), worker_src=tmp_path / "w")}
    assert list(got) == [
        "llmos_fp32",
        "llmos_bf16",
        "llmos_int4",
        "vllm_fp32",
        "vllm_bf16",
        "llama_server",
    ]
    for s in got.values():
        cmd = s.command(8123)
        assert "8123" in cmd and "{port}" not in " ".join(cmd)
    # the 16-bit and 4-bit modes cache K/V in 16 bits, as vLLM bf16 and llama-server do
    half = ["--kv-cache-dtype", "float16"]
    assert got["llmos_bf16"].command(1)[-4:] == ["--quantization", "bf16", *half]
    assert got["llmos_int4"].command(1)[-4:] == ["--quantization", "int4", *half]
    assert "--kv-cache-dtype" not in got["llmos_fp32"].command(1)
    assert got["llmos_fp32"].env["PYTHONPATH"] == str(tmp_path / "w")
    assert got["vllm_bf16"].command(1)[-2:] == ["--dtype", "bfloat16"]
    assert got["vllm_fp32"].env["VLLM_CPU_KVCACHE_SPACE"] == str(systems.KV_CACHE_GIB)
    assert got["vllm_fp32"].env["LD_PRELOAD"].endswith("libiomp5.so")
    llama = got["llama_server"].command(1)
    for flag, value in (("-np", "16"), ("-t", "2"), ("-c", str(systems.LLAMA_CONTEXT))):
        assert llama[llama.index(flag) + 1] == value
    assert "--cont-batching" in llama
    assert str(tmp_path / "m.gguf") in llama
    assert got["llmos_fp32"].ready_path == "/ready"
    assert got["llama_server"].ready_path == "/health"


def test_tree_memory_and_cpu_of_this_process() -> None:
    rss, pss = systems.tree_memory(os.getpid())
    assert rss > 0 and pss >= 0
    assert systems.tree_cpu_seconds(os.getpid()) > 0
    assert systems.tree_memory(2**22 + 12345) == (0, 0)  # no such process


# ---------------------------------------------------------------- the driver
def _sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_parse_event_reads_text_usage_and_llama_timings() -> None:
    assert driver.parse_event(json.dumps({"choices": [{"text": "ab"}]})) == ("ab", None)
    usage = {"choices": [], "usage": {"completion_tokens": 7}}
    assert driver.parse_event(json.dumps(usage)) == ("", 7)
    llama = {"choices": [{"text": ""}], "timings": {"predicted_n": 9}}
    assert driver.parse_event(json.dumps(llama)) == ("", 9)


async def test_stream_one_counts_text_chunks_and_takes_the_usage_count() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        events = [
            {"choices": [{"text": "a"}]},
            {"choices": [{"text": ""}]},  # no text: not a token arrival
            {"choices": [{"text": "b"}]},
            {"choices": [{"text": "c"}]},
            {"choices": [], "usage": {"completion_tokens": 3}},
        ]
        return httpx.Response(200, content=_sse(events))

    req = BenchRequest("r0", [1, 2, 3, 4], 3)
    async with _client(handler) as client:
        t = await driver.stream_one(client, "http://x", "vllm", "m", req)
    assert t.ok and t.error is None
    assert len(t.chunk_times) == 3
    assert t.output_len == 3
    assert t.prompt_len == 4
    assert seen[0]["min_tokens"] == 3 and seen[0]["prompt"] == [1, 2, 3, 4]


async def test_stream_one_without_usage_counts_chunks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse([{"choices": [{"text": "x"}]}] * 5))

    async with _client(handler) as client:
        t = await driver.stream_one(client, "http://x", "llmos", "m", BenchRequest("r", [1], 5))
    assert t.output_len == 5


async def test_stream_one_records_an_http_error_without_raising() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "bad"}})

    async with _client(handler) as client:
        t = await driver.stream_one(client, "http://x", "llmos", "m", BenchRequest("r", [1], 2))
    assert not t.ok
    assert t.error is not None and t.error.startswith("HTTP 400")


async def test_run_requests_sends_every_request_once() -> None:
    ids: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        ids.append(body["prompt"][0])
        return httpx.Response(200, content=_sse([{"choices": [{"text": "t"}]}] * body["n_predict"]))

    reqs = [BenchRequest(f"r{i}", [i], 2) for i in range(5)]
    async with _client(handler) as client:
        timings, wall = await driver.run_requests(client, "http://x", "llama_server", "m", reqs)
    assert sorted(ids) == [0, 1, 2, 3, 4]
    assert [t.request_id for t in timings] == [r.request_id for r in reqs]
    assert all(t.output_len == 2 for t in timings)
    assert wall >= 0


# ---------------------------------------------------------------- statistics
def _timing(rid: str, send: float, chunks: list[float], n: int) -> RequestTiming:
    return RequestTiming(rid, 10, send, chunks, n)


def test_decode_rate_is_tokens_after_the_first_over_the_time_after_it() -> None:
    assert driver.decode_rate(_timing("a", 0.0, [1.0, 1.5, 2.0, 3.0], 5)) == pytest.approx(2.0)
    assert driver.decode_rate(_timing("b", 0.0, [1.0], 1)) == 0.0
    assert driver.decode_rate(RequestTiming("c", 1, 0.0)) == 0.0


def test_run_stats_counts_length_mismatches_and_failures() -> None:
    reqs = [BenchRequest("a", [1], 4), BenchRequest("b", [1], 4), BenchRequest("c", [1], 4)]
    timings = [
        _timing("a", 0.0, [0.1, 0.2, 0.3, 0.4], 4),
        _timing("b", 0.0, [0.1, 0.2], 2),  # stopped early: a mismatch
        RequestTiming("c", 1, 0.0, error="HTTP 500: boom"),
    ]
    stats = driver.run_stats(timings, reqs, wall_s=1.0)
    assert stats["completed"] == 2
    assert stats["failed"] == 1
    assert stats["length_mismatches"] == 1
    assert stats["total_output_tokens"] == 6
    assert stats["errors"] == ["HTTP 500: boom"]
    assert stats["wall_s"] == 1.0


def _run(tok_s: float, itl_p99: float, decode: float = 0.0, failed: int = 0) -> dict[str, Any]:
    block = {"median_ms": itl_p99 / 2, "p99_ms": itl_p99}
    return {
        "output_throughput": tok_s,
        "ttft": block,
        "itl": block,
        "tpot": block,
        "decode_tok_s_mean": decode,
        "failed": failed,
        "length_mismatches": 0,
    }


def test_medians_take_each_metric_median_over_repeats() -> None:
    m = report.medians([_run(100, 30, failed=1), _run(300, 10), _run(200, 20)])
    assert m["output_tok_s"] == 200
    assert m["itl_p99_ms"] == 20
    assert m["failed"] == 1
    assert m["repeats"] == 3
    with pytest.raises(ValueError):
        report.medians([])


def test_ratio_handles_missing_values() -> None:
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None
    assert report.ratio(1.0, 0.0) is None


def _results() -> dict[str, Any]:
    def sys_entry(label: str, kind: str, pss: int) -> dict[str, Any]:
        return {
            "label": label,
            "kind": kind,
            "notes": "",
            "startup_s": 1.0,
            "idle_rss": pss,
            "idle_pss": pss,
            "peak_rss": pss,
            "peak_pss": pss,
            "idle_cpu_percent": 0.0,
        }

    names = {
        "llmos_fp32": ("llmos worker, fp32", "llmos", 900 * 2**20),
        "llmos_bf16": ("llmos worker, bf16 weights", "llmos", 800 * 2**20),
        "llmos_int4": ("llmos worker, int4 weights", "llmos", 600 * 2**20),
        "vllm_fp32": ("vLLM CPU, fp32", "vllm", 4000 * 2**20),
        "vllm_bf16": ("vLLM CPU, bf16", "vllm", 700 * 2**20),
        "llama_server": ("llama-server, Q4_1", "llama_server", 800 * 2**20),
    }
    tok = {
        "llmos_fp32": 400,
        "llmos_bf16": 500,
        "llmos_int4": 420,
        "vllm_fp32": 200,
        "vllm_bf16": 400,
        "llama_server": 100,
    }
    itl = {
        "llmos_fp32": 50,
        "llmos_bf16": 40,
        "llmos_int4": 30,
        "vllm_fp32": 60,
        "vllm_bf16": 45,
        "llama_server": 35,
    }
    dec = {
        "llmos_fp32": 100,
        "llmos_bf16": 150,
        "llmos_int4": 260,
        "vllm_fp32": 80,
        "vllm_bf16": 60,
        "llama_server": 200,
    }
    scen = {s: {n: [_run(tok[n], itl[n], dec[n])] * 3 for n in names} for s in scenarios.SCENARIOS}
    results: dict[str, Any] = {
        "meta": {
            "date": "2026-12-06 10:00 UTC",
            "commit": "abc1234",
            "machine": "test box",
            "uptime_before": "load average: 0.10, 0.20, 0.30",
            "uptime_after": "load average: 1.10, 1.20, 1.30",
            "repeats": 3,
            "worker_source": "git HEAD (abc1234)",
            "setup": "KV 2 GiB",
        },
        "systems": {n: sys_entry(*v) for n, v in names.items()},
        "scenarios": scen,
        "scenarios_run": list(scenarios.SCENARIOS),
        "notes": [],
    }
    results["medians"] = {
        s: {n: report.medians(runs) for n, runs in per.items()} for s, per in scen.items()
    }
    return results


def test_targets_compare_each_mode_with_its_class_peer() -> None:
    verdicts = {t.what: (t.measured, t.verdict) for t in report.evaluate(_results())}
    assert verdicts["offline mixed output tok/s, llmos_fp32 ÷ vllm_fp32"] == (2.0, "met")
    assert verdicts["offline mixed output tok/s, llmos_bf16 ÷ vllm_bf16"] == (1.25, "not met")
    assert verdicts["offline mixed output tok/s, llmos_int4 ÷ llama_server"] == (4.2, "met")
    assert verdicts["single-stream decode tok/s, llmos_int4 ÷ llama_server"] == (1.3, "met")
    assert verdicts["single-stream decode tok/s, llmos_fp32 ÷ llama_server"][1] == "not met"
    itl = "16 streams p99 ITL, vllm_bf16 ÷ llmos_bf16 (≥ 1: no worse)"
    assert verdicts[itl] == (pytest.approx(45 / 40), "met")
    itl = "16 streams p99 ITL, llama_server ÷ llmos_fp32 (≥ 1: no worse)"
    assert verdicts[itl][1] == "not met"
    mem = "idle memory (PSS), vllm_bf16 ÷ llmos_bf16 (≥ 1: no more than vLLM)"
    assert verdicts[mem][1] == "not met"


def test_roofline_ceilings_mark_targets_beyond_the_machine() -> None:
    results = _results()
    results["roofline"] = {
        "matmul_gflops_fp32": 500.0,
        "matmul_gflops_bf16_best": 900.0,
        "memory_read_gbs": 50.0,
        "batch1_mem_tok_s_fp32": 90.0,
        "batch1_mem_tok_s_fp16": 180.0,
        "batch1_mem_tok_s_int4": 500.0,
        "workloads": {
            "offline_mixed": {"compute_tok_s_fp32": 700.0, "compute_tok_s_bf16": 60.0},
            "single_stream": {"compute_tok_s_fp32": 1000.0, "compute_tok_s_bf16": 2000.0},
        },
    }
    targets = {t.what: t for t in report.evaluate(results)}
    single = "single-stream decode tok/s, llmos_fp32 ÷ llama_server"
    # fp32 weights: 90 tok/s at the bandwidth, llama-server decodes at the value in _results
    llama = results["medians"]["single_stream"]["llama_server"]["decode_tok_s"]
    assert targets[single].ceiling == pytest.approx(90.0 / llama)
    assert targets[single].beyond_machine == (90.0 / llama < 1.2)
    bf16 = targets["offline mixed output tok/s, llmos_bf16 ÷ vllm_bf16"]
    vllm = results["medians"]["offline_mixed"]["vllm_bf16"]["output_tok_s"]
    assert bf16.ceiling == pytest.approx(60.0 / vllm) and bf16.ceiling < 1.5
    assert bf16.verdict == "not met (beyond this machine)"
    fp32 = targets["offline mixed output tok/s, llmos_fp32 ÷ vllm_fp32"]
    vllm = results["medians"]["offline_mixed"]["vllm_fp32"]["output_tok_s"]
    assert fp32.verdict == "met" and fp32.ceiling == pytest.approx(700.0 / vllm)
    assert all(t.ceiling is None for w, t in targets.items() if "ITL" in w or "memory" in w)
    text = report.render(results)
    assert "| best possible here |" in text and "not met (beyond this machine)" in text
    assert "| memory read bandwidth (GB/s) | 50.0 |" in text


def test_a_missing_system_gives_not_measured() -> None:
    results = _results()
    for per in results["medians"].values():
        per.pop("vllm_fp32")
    results["systems"]["vllm_fp32"] = {
        "label": "vLLM CPU, fp32",
        "kind": "vllm",
        "error": "RuntimeError: exited with 1",
    }
    verdicts = {t.what: t.verdict for t in report.evaluate(results)}
    assert verdicts["offline mixed output tok/s, llmos_fp32 ÷ vllm_fp32"] == "not measured"
    text = report.render(results)
    assert "not measured: RuntimeError: exited with 1" in text


def test_render_names_commit_load_systems_and_ratios() -> None:
    text = report.render(_results())
    assert text.startswith(report.BEGIN) and text.rstrip().endswith(report.END)
    assert "abc1234" in text
    assert "load average: 0.10, 0.20, 0.30" in text and "load average: 1.10" in text
    for label in ("llmos worker, fp32", "vLLM CPU, bf16", "llama-server, Q4_1"):
        assert label in text
    assert "| 2.00× |" in text  # fp32 worker over fp32 vLLM, offline mixed
    assert "**not met**" in text and "**met**" in text


def test_update_doc_replaces_only_its_section() -> None:
    section = report.render(_results())
    doc = "# Benchmarks\n\n## Other\n\ntext\n"
    once = report.update_doc(doc, section)
    assert once.startswith(doc) and section.strip() in once
    other = once + "\n## Later section\n\nmore\n"
    again = report.update_doc(other, section.replace("abc1234", "def5678"))
    assert again.count(report.BEGIN) == 1
    assert "def5678" in again and "abc1234" not in again
    assert again.startswith(doc) and again.endswith("## Later section\n\nmore\n")
    assert report.update_doc(again, section.replace("abc1234", "def5678")) == again


# ---------------------------------------------------------------- scenarios
def test_scenarios_have_the_issue_shapes() -> None:
    mixed = scenarios.build("offline_mixed", POOL, 0)
    assert len(mixed) == 64
    assert all(32 <= r.prompt_len <= 512 and 32 <= r.max_tokens <= 256 for r in mixed)
    single = scenarios.build("single_stream", POOL, 0)
    assert [(r.prompt_len, r.max_tokens) for r in single] == [(128, 256)]
    streams = scenarios.build("streams_16", POOL, 0)
    assert len(streams) == 16 and all(r.max_tokens == 256 for r in streams)
    shared = scenarios.build("shared_prefix", POOL, 0)
    assert len(shared) == 32
    prefix = shared[0].prompt_token_ids[: scenarios.SHARED_PREFIX_LEN]
    assert all(r.prompt_token_ids[: scenarios.SHARED_PREFIX_LEN] == prefix for r in shared)
    assert len({tuple(r.prompt_token_ids) for r in shared}) == 32


def test_each_repeat_has_its_own_prompts_and_replays_exactly() -> None:
    for name in scenarios.SCENARIOS:
        a, b = scenarios.build(name, POOL, 0), scenarios.build(name, POOL, 1)
        assert a == scenarios.build(name, POOL, 0)
        assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in b]
    with pytest.raises(ValueError, match="unknown scenario"):
        scenarios.build("nope", POOL, 0)


def test_shrink_caps_count_and_outputs() -> None:
    small = scenarios.shrink(scenarios.build("offline_mixed", POOL, 0), limit=4, max_output=16)
    assert len(small) == 4 and all(r.max_tokens <= 16 for r in small)


def test_rotation_starts_each_repeat_with_another_system() -> None:
    assert rotated(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotated(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert rotated([], 3) == []


def test_cpu_has_reads_the_flags_lines(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_tile\nmodel name\t: amx_int8 cpu\n")
    assert systems.cpu_has("amx_tile", info)
    assert not systems.cpu_has("amx", info)  # whole flags only
    assert not systems.cpu_has("amx_int8", info)  # another line's text is no flag
    assert not systems.cpu_has("avx2", tmp_path / "missing")
