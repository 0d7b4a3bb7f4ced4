"""The benchmark harness's pure parts: seeded workloads, vLLM-style metrics, targets, report.

No timing is asserted here; these tests check that the numbers the harness reports are computed
as documented, and that workload files replay exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import metrics, report, targets, workload
from bench.metrics import RequestTiming

POOL = list(range(10_000))  # a fake token stream: each window is recognisable by its start


# ---------------------------------------------------------------- workloads
def test_offline_mixed_is_seeded_and_reproducible() -> None:
    a = workload.offline_mixed(POOL, seed=0)
    b = workload.offline_mixed(POOL, seed=0)
    c = workload.offline_mixed(POOL, seed=1)
    assert a == b
    assert a != c
    assert len(a) == 64
    assert len({r.request_id for r in a}) == 64


def test_offline_mixed_lengths_are_exact_and_in_range() -> None:
    reqs = workload.offline_mixed(POOL, seed=5)
    for r in reqs:
        assert 32 <= r.prompt_len <= 512
        assert 32 <= r.max_tokens <= 256
        assert r.arrival_s == 0.0
        first = r.prompt_token_ids[0]  # a contiguous window of the corpus stream
        assert r.prompt_token_ids == list(range(first, first + r.prompt_len))
    # why: 64 uniform draws over 32..512 must not collapse to one value
    assert len({r.prompt_len for r in reqs}) > 30


def test_poisson_arrivals_keep_requests_and_have_the_asked_rate() -> None:
    base = workload.mixed(
        POOL, seed=3, num_requests=2000, prompt_range=(4, 8), output_range=(1, 2), prefix="p"
    )
    arrived = workload.poisson_arrivals(base, rate=4.0, seed=9)
    assert [r.prompt_token_ids for r in arrived] == [r.prompt_token_ids for r in base]
    times = [r.arrival_s for r in arrived]
    assert times[0] == 0.0
    assert times == sorted(times)
    mean_gap = times[-1] / (len(times) - 1)
    assert mean_gap == pytest.approx(0.25, rel=0.1)
    assert workload.poisson_arrivals(base, 4.0, seed=9) == arrived
    with pytest.raises(ValueError):
        workload.poisson_arrivals(base, 0.0, seed=1)


def test_online_rates_share_requests_but_not_arrivals() -> None:
    slow, fast = workload.online(POOL, 0.5), workload.online(POOL, 2.0)
    assert [r.prompt_token_ids for r in slow] == [r.prompt_token_ids for r in fast]
    assert slow[-1].arrival_s > fast[-1].arrival_s
    assert all(32 <= r.prompt_len <= 256 and 32 <= r.max_tokens <= 128 for r in slow)


def test_shared_prefix_requests_share_exactly_the_prefix() -> None:
    reqs = workload.shared_prefix(POOL, num_requests=32, prefix_len=512, suffix_len=32)
    assert len(reqs) == 32
    prefix = reqs[0].prompt_token_ids[:512]
    assert all(r.prompt_token_ids[:512] == prefix and r.prompt_len == 544 for r in reqs)
    assert len({tuple(r.prompt_token_ids[512:]) for r in reqs}) == 32


def test_window_longer_than_corpus_is_refused() -> None:
    with pytest.raises(ValueError, match="corpus has 10 tokens"):
        workload.offline_mixed(list(range(10)))


def test_save_load_round_trip(tmp_path: Path) -> None:
    reqs = workload.online(POOL, 1.0)
    path = tmp_path / "w.jsonl"
    workload.save(reqs, path)
    assert workload.load(path) == reqs


def test_committed_workload_files_match_manifest_and_spec() -> None:
    manifest = json.loads((workload.WORKLOAD_DIR / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        path = workload.WORKLOAD_DIR / f"{name}.jsonl"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
    mixed = workload.load(workload.WORKLOAD_DIR / "offline_mixed.jsonl")
    assert len(mixed) == 64
    assert all(32 <= r.prompt_len <= 512 and 32 <= r.max_tokens <= 256 for r in mixed)
    shared = workload.load(workload.WORKLOAD_DIR / "shared_prefix.jsonl")
    assert len(shared) == 32
    assert len({tuple(r.prompt_token_ids[:512]) for r in shared}) == 1
    for rate in workload.ONLINE_RATES:
        online = workload.load(workload.WORKLOAD_DIR / f"{workload.online_name(rate)}.jsonl")
        assert len(online) == 32 and online[-1].arrival_s > 0


# ---------------------------------------------------------------- metrics
def timing(send: float, chunks: list[float], n: int | None = None) -> RequestTiming:
    return RequestTiming("r", 10, send, chunks, len(chunks) if n is None else n)


def test_request_metrics_follow_vllm_definitions() -> None:
    t = timing(1.0, [1.5, 1.6, 1.8, 2.1])
    assert t.ttft == pytest.approx(0.5)
    assert t.e2el == pytest.approx(1.1)
    assert t.tpot == pytest.approx((1.1 - 0.5) / 3)
    assert t.itls == pytest.approx([0.1, 0.2, 0.3])
    # one chunk carrying several tokens: TPOT divides by tokens, ITL counts chunks
    multi = timing(0.0, [1.0, 2.0], n=5)
    assert multi.tpot == pytest.approx(1.0 / 4)
    assert multi.itls == pytest.approx([1.0])
    assert timing(0.0, [0.3]).tpot is None


def test_summarize_matches_numpy_linear_percentiles_in_ms() -> None:
    s = metrics.summarize([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["mean_ms"] == pytest.approx(4.0)
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["p50_ms"] == pytest.approx(3.0)
    assert s["p99_ms"] == pytest.approx(4.0 + 0.96 * 6.0)  # linear between the top two
    assert s["std_ms"] == pytest.approx(math.sqrt((9 + 4 + 1 + 0 + 36) / 5))
    assert metrics.summarize([])["mean_ms"] == 0.0


def test_serving_metrics_aggregate() -> None:
    ts = [
        timing(0.0, [1.0, 2.0, 3.0]),
        timing(1.0, [2.0, 4.0]),
        RequestTiming("bad", 7, 0.5, [], 0, error="HTTP 500"),
    ]
    m = metrics.serving_metrics(ts)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["duration_s"] == pytest.approx(4.0)
    assert m["total_output_tokens"] == 5
    assert m["output_throughput"] == pytest.approx(5 / 4)
    assert m["ttft"]["mean_ms"] == pytest.approx(1000.0)
    # TPOT = (E2EL - TTFT) / (n - 1): (3 - 1) / 2 and (3 - 1) / 1
    assert m["tpot"]["mean_ms"] == pytest.approx((1.0 + 2.0) / 2 * 1000)
    assert m["itl"]["mean_ms"] == pytest.approx((1 + 1 + 2) / 3 * 1000)
    assert metrics.serving_metrics(ts, duration_s=10.0)["output_throughput"] == 0.5


def test_median_run_keeps_the_middle_run_and_every_rate() -> None:
    runs = [{"output_throughput": r, "id": i} for i, r in enumerate([90.0, 120.0, 75.0])]
    mid = metrics.median_run(runs)
    assert (mid["id"], mid["output_throughput"]) == (0, 90.0)
    assert mid["repeats"] == [90.0, 120.0, 75.0]  # in run order
    assert metrics.median_run(runs[:2])["output_throughput"] == 90.0  # even: the lower middle
    with pytest.raises(ValueError):
        metrics.median_run([])
    res = results()
    res["single_stream"]["llmos"] = metrics.median_run(
        [{"output_throughput": r, "ttft": metrics.summarize([0.1])} for r in (30.0, 28.0, 35.0)]
    )
    text = report.render(res)
    assert "runs: 30.0 / 28.0 / 35.0 tok/s, the median shown" in text


def test_kv_waste() -> None:
    assert metrics.kv_waste(100, 97) == pytest.approx(0.03)
    assert metrics.kv_waste(0, 0) == 0.0
    with pytest.raises(ValueError):
        metrics.kv_waste(10, 11)


# ---------------------------------------------------------------- targets and report
def results(
    ours: float = 600.0, hf: float | None = 100.0, llama: float | None = 120.0, waste: float = 0.02
) -> dict[str, Any]:
    lat = metrics.summarize([0.01, 0.02])
    block: dict[str, Any] = {
        "output_throughput": ours,
        "ttft": lat,
        "tpot": lat,
        "kv": {
            "kv_waste_at_peak": waste,
            "peak_allocated_slots": 100,
            "peak_used_slots": 98,
            "kv_waste_mean": 0.01,
            "steps": 9,
        },
    }
    off: dict[str, Any] = {"llmos": block}
    if hf is not None:
        off["hf_best"] = {"output_throughput": hf, "batch_size": 8}
        off["hf"] = [
            {
                "batch_size": 8,
                "requests_done": 64,
                "requests_total": 64,
                "output_throughput": hf,
                "duration_s": 3.0,
            }
        ]
    if llama is not None:
        off["llamacpp"] = {"output_throughput": llama, "ttft": lat, "tpot": lat}
    return {
        "meta": {"command": "python -m bench.run --out docs", "date": "today"},
        "roofline": {
            "compute_tok_s_fp32": 2000.0,
            "matmul_gflops_fp32": 100.0,
            "workloads": {"offline_mixed": {"compute_tok_s_fp32": 1000.0}},
        },
        "offline_mixed": off,
        "single_stream": {
            "llmos": {"output_throughput": 30.0},
            "llamacpp": {"output_throughput": 50.0},
        },
        "shared_prefix": {
            "caching_on": {"ttft": metrics.summarize([0.01])},
            "caching_off": {"ttft": metrics.summarize([0.06])},
        },
        "online": {"1": metrics.serving_metrics([timing(0.0, [1.0, 2.0])])},
    }


def by_name(ts: list[targets.Target]) -> dict[tuple[str, str], targets.Target]:
    return {(t.issue, t.name): t for t in ts}


def test_targets_judge_each_requirement() -> None:
    ts = by_name(targets.evaluate(results()))
    assert ts[("8", "offline mixed output throughput")].met is True
    assert ts[("8", "offline mixed vs Hugging Face best static batch")].measured == 6.0
    assert ts[("8", "offline mixed vs llama.cpp")].met is True  # 5×
    single = ts[("8", "single stream vs llama.cpp")]
    assert single.met is False and single.margin == pytest.approx(0.6 / 1.2)
    prefix = ts[("8", "shared prefix: TTFT without / with prefix caching")]
    assert prefix.measured == pytest.approx(6.0) and prefix.met is True
    waste = ts[("2, 8", "KV cache waste at peak (offline mixed)")]
    assert waste.measured == pytest.approx(2.0) and waste.met is True
    assert (
        by_name(targets.evaluate(results(waste=0.05)))[
            ("2, 8", "KV cache waste at peak (offline mixed)")
        ].met
        is False
    )


def test_missing_baseline_is_not_judged_never_met() -> None:
    ts = by_name(targets.evaluate(results(hf=None, llama=None)))
    t = ts[("8", "offline mixed vs llama.cpp")]
    assert t.met is None and t.margin is None
    assert ts[("2", "offline mixed vs Hugging Face best static batch")].met is None


def test_cpu_steal_share_is_reported() -> None:
    from bench.run import steal_percent

    # user nice system idle iowait irq softirq steal: 20 of 100 ticks stolen
    assert steal_percent([0] * 8, [50, 0, 10, 20, 0, 0, 0, 20]) == 20.0
    assert steal_percent(None, [1] * 8) is None
    assert steal_percent([1] * 8, [1] * 8) is None  # no time passed
    res = results()
    res["meta"]["steal_percent"] = 20.0
    assert "stolen by the hypervisor during the run: 20.0 %" in report.render(res)
    assert "stolen" not in report.render(results())  # not measured: no line


def test_report_has_a_line_per_target_and_each_table() -> None:
    text = report.render(results(llama=None))
    assert "`python -m bench.run --out docs`" in text
    target_rows = [ln for ln in text.splitlines() if "met**" in ln or "not judged" in ln]
    assert len(target_rows) == len(targets.evaluate(results()))
    assert "not judged (input missing)" in text
    assert "**not met**" in text and "**met**" in text
    for heading in (
        "(1) Offline mixed",
        "(2) Online",
        "(3) Shared prefix",
        "(4) Single stream",
        "Machine roofline",
    ):
        assert heading in text
    assert "| llmos worker (LLMEngine) | 600.0 |" in text
    assert "60.0 %" in text  # 600 tok/s of a 1000 tok/s roofline


def test_chart_is_written(tmp_path: Path) -> None:
    from bench import chart

    path = tmp_path / "chart.png"
    chart.draw(results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_opt_in_modes_are_judged_separately_and_quality_reported() -> None:
    res = results()
    assert not [t for t in targets.evaluate(res) if "fp16" in t.name]  # not measured: no rows
    res["offline_mixed"]["llmos_fp16"] = {"output_throughput": 660.0}
    res["single_stream"]["llmos_fp16"] = {"output_throughput": 66.0}
    res["quality"] = {
        "text": "first 10 tokens of a corpus",
        "window": 256,
        "perplexity": {"float32": 20.0, "fp16": 20.01},
    }
    ts = by_name(targets.evaluate(res))
    single = ts[("8", "single stream vs llama.cpp — fp16 weights (opt-in)")]
    assert single.measured == pytest.approx(66.0 / 50.0) and single.met is True
    assert ts[("8", "single stream vs llama.cpp")].met is False  # the fp32 row is unchanged
    hf = ts[("8", "offline mixed vs Hugging Face best — fp16 weights (opt-in)")]
    assert hf.measured == pytest.approx(6.6)
    assert not [t for t in ts if "int8" in t[1]]  # int8 not measured here
    res["single_stream"]["llmos_int8"] = {"output_throughput": 55.0}
    res["single_stream"]["llmos_int8_ops"] = {"output_throughput": 41.0}
    res["quality"]["perplexity"]["int8"] = 20.1
    ts = by_name(targets.evaluate(res))
    single8 = ts[("8", "single stream vs llama.cpp — int8 weights (opt-in)")]
    assert single8.measured == pytest.approx(55.0 / 50.0) and single8.met is False
    assert ts[("8", "offline mixed output throughput — int8 weights (opt-in)")].measured is None
    text = report.render(res)
    assert "| llmos worker, fp16 weights (opt-in) | 660.0 |" in text
    assert "| llmos worker, int8 weights (opt-in) | 55.0 |" in text
    assert "| llmos worker, int8 weights, kernels op by op | 41.0 |" in text
    assert not [t for t in ts if "op by op" in t[1]]  # a side-by-side row, not a target
    res["offline_mixed"]["llmos_int8_kvfp16"] = {"output_throughput": 140.0}
    res["single_stream"]["llmos_int8_kvfp16"] = {"output_throughput": 70.0}
    ts = by_name(targets.evaluate(res))
    kv = ts[("8", "single stream vs llama.cpp — int8 weights + fp16 KV cache (opt-in)")]
    assert kv.measured == pytest.approx(70.0 / 50.0) and kv.met is True
    text = report.render(res)
    assert "| llmos worker, int8 weights + fp16 KV cache (opt-in) | 140.0 |" in text
    assert "| llmos worker, int8 weights + fp16 KV cache (opt-in) | 70.0 |" in text
    assert "| fp16 | 20.0100 | +0.050 % |" in text
    assert "| int8 | 20.1000 | +0.500 % |" in text


# ---------------------------------------------------------------- roofline
def tiny_model() -> Any:
    from bench.roofline import ModelSize

    # 2 layers, 3 heads of 4 dims; 100 layer weights, a tied 40-weight embedding / LM head
    return ModelSize(
        params=140,
        file_weight_bytes=70,
        layers=2,
        heads=3,
        head_dim=4,
        head_params=40,
        embedding_params=40,
    )


def test_request_flops_count_prompt_layers_head_and_attention_by_hand() -> None:
    m = tiny_model()
    assert m.layer_params == 100
    # prompt 3, 2 generated: the layers run on 3 + 1 tokens (the last generated token is never
    # fed back), the head on 2; queries at positions 0..3 attend to 1 + 2 + 3 + 4 = 10 keys
    linear, attention = m.request_flops(3, 2)
    assert linear == 2 * 100 * 4 + 2 * 40 * 2
    assert attention == 10 * 4 * 2 * 3 * 4
    assert m.workload_flops([(3, 2), (3, 2)]) == (2 * linear, 2 * attention)
    untied = tiny_model()
    untied.params, untied.tied = 180, False  # a separate output matrix of the same shape
    assert untied.layer_params == 100
    assert untied.request_flops(3, 2) == (linear, attention)


def test_workload_ceiling_is_output_tokens_at_the_matmul_rate() -> None:
    from bench.roofline import workload_ceiling

    m = tiny_model()
    flops = sum(m.request_flops(3, 2))
    ceiling = workload_ceiling(m, [(3, 2)], gflops=1e-6)  # 1000 FLOP/s
    assert ceiling["output_tokens"] == 2
    assert ceiling["compute_tok_s_fp32"] == pytest.approx(2 / (flops / 1000))
    assert workload_ceiling(m, [(3, 2)], gflops=None)["compute_tok_s_fp32"] is None
    assert ceiling["compute_tok_s_int8"] is None  # no integer rate measured
    # int8 weights: every FLOP at the faster of the fp32 and the integer rate
    both = workload_ceiling(m, [(3, 2)], gflops=1e-6, int8_gops=3e-6)
    assert both["compute_tok_s_int8"] == pytest.approx(3 * both["compute_tok_s_fp32"])
    slower = workload_ceiling(m, [(3, 2)], gflops=1e-6, int8_gops=5e-7)
    assert slower["compute_tok_s_int8"] == pytest.approx(slower["compute_tok_s_fp32"])


def test_bundled_model_shape_is_read_from_the_gguf_header() -> None:
    from bench.roofline import gguf_model_size
    from bench.run import gguf_path

    m = gguf_model_size(gguf_path())
    assert (m.layers, m.heads, m.head_dim) == (30, 9, 64)  # SmolLM2-135M
    assert m.head_params == m.embedding_params == 49152 * 576  # tied
    assert m.layer_params + m.embedding_params == m.params


def test_targets_carry_the_machine_ceiling_and_say_when_it_is_out_of_reach() -> None:
    res = results()
    res["roofline"]["workloads"]["offline_mixed"]["compute_tok_s_fp32"] = 250.0
    res["roofline"]["batch1_mem_tok_s_fp32"] = 40.0
    res["roofline"]["batch1_mem_tok_s_int8"] = 160.0
    res["single_stream"]["llmos_int8"] = {"output_throughput": 55.0}
    res["roofline"]["batch1_mem_tok_s_int4"] = 300.0
    res["single_stream"]["llmos_int4"] = {"output_throughput": 90.0}
    res["offline_mixed"]["llmos_int4"] = {"output_throughput": 200.0}
    ts = by_name(targets.evaluate(res))
    tput = ts[("8", "offline mixed output throughput")]
    assert tput.ceiling == 250.0 and tput.within_reach is False
    llama = ts[("8", "offline mixed vs llama.cpp")]
    assert llama.ceiling == pytest.approx(250.0 / 120.0) and llama.within_reach is False
    single = ts[("8", "single stream vs llama.cpp")]
    assert single.ceiling == pytest.approx(40.0 / 50.0) and single.within_reach is False
    single8 = ts[("8", "single stream vs llama.cpp — int8 weights (opt-in)")]
    assert single8.ceiling == pytest.approx(160.0 / 50.0) and single8.within_reach is True
    # int4 reads its own bytes per token; offline it multiplies in fp32, as fp32 does
    single4 = ts[("8", "single stream vs llama.cpp — int4 weights (opt-in)")]
    assert single4.measured == pytest.approx(90.0 / 50.0) and single4.met is True
    assert single4.ceiling == pytest.approx(300.0 / 50.0)
    assert ts[("8", "offline mixed output throughput — int4 weights (opt-in)")].ceiling == 250.0
    # int8 multiplies in integers: without a measured integer rate nothing bounds it offline
    assert ts[("8", "offline mixed vs llama.cpp — int8 weights (opt-in)")].ceiling is None
    res["roofline"]["workloads"]["offline_mixed"]["compute_tok_s_int8"] = 900.0
    res["offline_mixed"]["llmos_int8"] = {"output_throughput": 500.0}
    ts = by_name(targets.evaluate(res))
    int8 = ts[("8", "offline mixed output throughput — int8 weights (opt-in)")]
    assert int8.ceiling == 900.0 and int8.within_reach is True
    assert ts[("2, 8", "KV cache waste at peak (offline mixed)")].within_reach is None
    text = report.render(res)
    assert "| 250.00 tok/s (target beyond this machine) |" in text
    assert "| 3.20× |" in text


def test_a_second_roofline_measurement_keeps_the_better_rates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import roofline

    rates = iter([(100.0, 20.0), (150.0, 15.0)])  # (fp32 GFLOP/s, GB/s) at start, at end
    now: dict[str, float] = {}

    def matmul(dtype: Any, seconds: float = 1.0) -> float | None:
        import torch

        if dtype is torch.float32:
            now["fp32"], now["bw"] = next(rates)
            return now["fp32"]
        return None  # bf16 unsupported

    # the worker's own kernel: faster than torch at the start, slower than torch's second rate
    native = iter([(120.0, 400.0), (110.0, 380.0)])  # (fp32 GFLOP/s, int8 GOP/s)
    own: dict[str, float] = {}

    def native_matmul(mode: str, seconds: float = 1.0) -> float | None:
        if mode == "none":
            own["fp32"], own["int8"] = next(native)
            return own["fp32"]
        return own["int8"] if mode == "int8" else None  # bf16: say, no kernel for it

    monkeypatch.setattr(roofline, "matmul_gflops", matmul)
    monkeypatch.setattr(roofline, "native_matmul_gflops", native_matmul)
    monkeypatch.setattr(roofline, "memory_bandwidth_gbs", lambda: now["bw"])
    monkeypatch.setattr(roofline, "native_read_gbs", lambda: 18.0)  # the worker's 1-row read
    m = tiny_model()
    first = roofline.measure(m)
    # the ceiling takes the faster fp32 matmul: here the worker's kernel
    assert (first["matmul_gflops_fp32"], first["memory_read_gbs"]) == (120.0, 20.0)
    assert first["matmul_gflops_fp32_torch"] == 100.0
    second = roofline.measure(m, previous=first)
    assert (second["matmul_gflops_fp32"], second["memory_read_gbs"]) == (150.0, 20.0)
    assert second["memory_read_gbs_native"] == 18.0
    assert (second["matmul_gflops_fp32_native"], second["matmul_gops_int8_native"]) == (
        120.0,
        400.0,
    )
    assert second["matmul_gflops_bf16"] is None and second["measurements"] == 2
    assert second["compute_tok_s_fp32"] == pytest.approx(150e9 / m.flops_per_token)
    assert second["batch1_mem_tok_s_fp32"] == pytest.approx(20e9 / (4 * m.read_per_token))
    text = report.render(results() | {"roofline": second})
    assert "Measured at the start and at the end of the run" in text
