"""Server parts on their own: stream deltas, request conversion, metrics, CLI settings, logging.

These run in milliseconds; only the load test loads a model (the tiny one).
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmos_worker.cli import build_parser
from llmos_worker.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from llmos_worker.errors import InvalidRequestError
from llmos_worker.server.errors import to_http_error
from llmos_worker.server.generation import DeltaTracker, _stop_prefix_len
from llmos_worker.server.main import JsonFormatter, engine_config, load_engine
from llmos_worker.server.metrics import ServerMetrics
from llmos_worker.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.worker.server_harness import TINY_ENGINE


def out(text: str, n_tokens: int, finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(
        index=0, text=text, token_ids=list(range(n_tokens)), finish_reason=finish
    )  # type: ignore[arg-type]


def test_stop_prefix_len() -> None:
    assert _stop_prefix_len("hello wor", ["world"]) == 3
    assert _stop_prefix_len("hello", ["world"]) == 0
    assert _stop_prefix_len("ab", ["abc", "bx"]) == 2
    assert _stop_prefix_len("x", []) == 0


def test_delta_tracker_holds_back_a_possible_stop_string() -> None:
    tracker = DeltaTracker(stop=["END"])
    assert tracker.advance(out("one E", 2)) == ("one ", [])
    assert tracker.advance(out("one EN", 3)) == ("", [])
    # the engine cut the stop string and finished: nothing of it ever reached the client
    assert tracker.advance(out("one ", 4, "stop")) == ("", [])
    # a false alarm is released once it cannot be a stop string any more
    tracker = DeltaTracker(stop=["END"])
    assert tracker.advance(out("E", 1)) == ("", [])
    assert tracker.advance(out("Ex", 2)) == ("Ex", [])


def test_delta_tracker_holds_back_incomplete_characters() -> None:
    tracker = DeltaTracker(stop=[])
    assert tracker.advance(out("caf\ufffd", 2)) == ("caf", [])
    assert tracker.advance(out("café!", 3)) == ("é!", [])
    assert tracker.advance(out("café!\ufffd", 4, "length")) == ("\ufffd", [])


def test_completion_prompt_shapes() -> None:
    def prompts(p: object) -> list[object]:
        return CompletionRequest.model_validate({"model": "m", "prompt": p}).prompts()  # type: ignore[return-value]

    assert prompts("hi") == ["hi"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(InvalidRequestError):
        prompts([])
    with pytest.raises(ValidationError):
        prompts([[1], "a"])


def test_chat_request_conversion() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "developer",
                    "content": [
                        {"type": "text", "text": "Be "},
                        {"type": "text", "text": "brief."},
                    ],
                },
                {"role": "user", "content": "hi"},
            ],
            "max_tokens": 50,
            "max_completion_tokens": 7,
            "logprobs": True,
            "top_logprobs": 2,
            "stop": "\n",
            "seed": 3,
            "temperature": 0,
        }
    )
    assert req.template_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    params = req.to_sampling_params()
    assert (params.max_tokens, params.logprobs, params.stop, params.seed) == (7, 2, ["\n"], 3)
    assert params.greedy
    with pytest.raises(InvalidRequestError) as info:
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "max_completion_tokens": 0,
            }
        ).to_sampling_params()
    assert info.value.param == "max_completion_tokens"


def test_validation_errors_name_the_field_path() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "bot"}]}
        )
    err = to_http_error(info.value)
    assert err.status == 400
    assert err.param == "messages.1.role"
    assert "more error" in err.message  # the missing content is reported too


def stats(**overrides: float) -> EngineStats:
    base = dict(
        num_running=2,
        num_waiting=1,
        num_swapped=0,
        kv_cache_usage=0.25,
        num_total_blocks=100,
        num_free_blocks=75,
        prefix_cache_queries=40,
        prefix_cache_hits=16,
        num_preemptions=3,
        prompt_tokens=40,
        generation_tokens=9,
    )
    base.update(overrides)
    return EngineStats(**base)  # type: ignore[arg-type]


def test_metrics_export_engine_stats_and_request_histograms() -> None:
    metrics = ServerMetrics("m1", lambda: stats())
    metrics_b = ServerMetrics("m2", lambda: stats())  # a second registry does not collide
    m = RequestMetrics(
        arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0, last_token_time=11.0
    )
    step = RequestOutput("r1", [1, 2], [out("a", 1)], False, m)
    metrics.observe_step(step)
    m2 = RequestMetrics(
        arrival_time=10.0,
        first_scheduled_time=10.5,
        first_token_time=11.0,
        last_token_time=12.0,
        finished_time=12.0,
    )
    metrics.observe_step(RequestOutput("r1", [1, 2], [out("abc", 3, "length")], True, m2))
    metrics.observe_abort("r2")
    text = metrics.render().decode()
    assert 'llmos_kv_cache_usage_perc{model_name="m1"} 0.25' in text
    assert 'llmos_num_requests_running{model_name="m1"} 2.0' in text
    assert 'llmos_num_requests_waiting{model_name="m1"} 1.0' in text
    assert 'llmos_prefix_cache_queries_total{model_name="m1"} 40.0' in text
    assert 'llmos_prefix_cache_hits_total{model_name="m1"} 16.0' in text
    assert 'llmos_num_preemptions_total{model_name="m1"} 3.0' in text
    assert 'llmos_prompt_tokens_total{model_name="m1"} 40.0' in text
    assert 'llmos_generation_tokens_total{model_name="m1"} 9.0' in text
    assert 'llmos_request_success_total{finished_reason="length",model_name="m1"} 1.0' in text
    assert 'llmos_request_success_total{finished_reason="abort",model_name="m1"} 1.0' in text
    assert 'llmos_time_to_first_token_seconds_sum{model_name="m1"} 1.0' in text
    assert 'llmos_e2e_request_latency_seconds_sum{model_name="m1"} 2.0' in text
    assert 'llmos_request_queue_time_seconds_sum{model_name="m1"} 0.5' in text
    assert 'llmos_time_per_output_token_seconds_sum{model_name="m1"} 0.5' in text
    assert 'llmos_inter_token_latency_seconds_count{model_name="m1"} 1.0' in text
    assert 'model_name="m1"' not in metrics_b.render().decode()


def test_every_serve_flag_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "LLMOS_MODEL": "/models/x.gguf",
        "LLMOS_PORT": "9001",
        "LLMOS_BLOCK_SIZE": "32",
        "LLMOS_KV_CACHE_MEMORY_BYTES": "1000000",
        "LLMOS_MAX_NUM_SEQS": "7",
        "LLMOS_MAX_MODEL_LEN": "256",
        "LLMOS_SCHEDULING_POLICY": "priority",
        "LLMOS_ENABLE_PREFIX_CACHING": "false",
        "LLMOS_DTYPE": "bfloat16",
        "LLMOS_MAX_WAITING_REQUESTS": "5",
        "LLMOS_DRAIN_TIMEOUT": "2.5",
        "LLMOS_LOG_FORMAT": "json",
        "LLMOS_SERVED_MODEL_NAME": "chat",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser("serve").parse_args(["serve"])
    assert (args.model, args.port, args.served_model_name) == ("/models/x.gguf", 9001, "chat")
    assert (args.max_waiting_requests, args.drain_timeout, args.log_format) == (5, 2.5, "json")
    config = engine_config(args)
    assert (config.block_size, config.kv_cache_memory_bytes, config.max_num_seqs) == (
        32,
        1_000_000,
        7,
    )
    assert (config.max_model_len, config.scheduling_policy) == (256, "priority")
    assert (config.enable_prefix_caching, config.dtype) == (False, "bfloat16")
    # quantization: fp16 from the command line; the environment's bfloat16 makes it invalid
    args = build_parser("serve").parse_args(
        ["serve", "--quantization", "fp16", "--dtype", "float32"]
    )
    assert engine_config(args).quantization == "fp16"
    with pytest.raises(InvalidRequestError, match="quantization 'fp16' needs dtype float32"):
        engine_config(build_parser("serve").parse_args(["serve", "--quantization", "fp16"]))
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--quantization", "int3"])
    # kv cache dtype: auto by default, float16 from the environment or the command line
    assert engine_config(build_parser("serve").parse_args(["serve"])).kv_cache_dtype == "auto"
    monkeypatch.setenv("LLMOS_KV_CACHE_DTYPE", "float16")
    config = engine_config(build_parser("serve").parse_args(["serve"]))
    assert (config.kv_cache_dtype, config.kv_dtype()) == ("float16", "float16")
    args = build_parser("serve").parse_args(["serve", "--kv-cache-dtype", "auto"])
    assert engine_config(args).kv_dtype() == "bfloat16"  # the environment's model dtype
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--kv-cache-dtype", "fp8"])
    # the command line still wins over the environment
    assert (
        build_parser("serve")
        .parse_args(["serve", "--port", "1234", "--enable-prefix-caching"])
        .enable_prefix_caching
    )


def test_json_log_lines_are_json() -> None:
    record = logging.LogRecord("llmos", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello world" and entry["level"] == "info"


def test_null_optional_fields_mean_their_defaults() -> None:
    # as LangChain and other clients send them
    nulls = {
        "n": None,
        "temperature": None,
        "top_p": None,
        "stop": None,
        "seed": None,
        "stream": None,
        "stream_options": None,
        "presence_penalty": None,
        "frequency_penalty": None,
        "user": None,
        "logprobs": None,
    }
    comp = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "max_tokens": None, **nulls}
    )
    params = comp.to_sampling_params()
    assert (params.n, params.temperature, params.max_tokens, params.stop) == (1, 1.0, 16, [])
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x", "name": None}],
            "max_tokens": None,
            "top_logprobs": None,
            **nulls,
        }
    )
    params = chat.to_sampling_params()
    assert (params.n, params.max_tokens, params.logprobs) == (1, None, None)
    assert not chat.stream


def test_loaded_engine_is_frozen_out_of_garbage_collection(tiny_model_dir: Path) -> None:
    """The serve command's load leaves the model's objects in the collector's permanent
    generation, so decode steps' collections do not walk them again."""
    gc.unfreeze()
    try:
        engine = load_engine(str(tiny_model_dir), None, None, TINY_ENGINE)
        assert gc.get_freeze_count() > 0
        held = [o for o in gc.get_objects() if o is engine]
        assert not held  # frozen objects are no longer tracked by the generations
    finally:
        gc.unfreeze()
