"""LLMEngine on the tiny random Llama (real paged attention, real SmolLM2 tokenizer).

Checks what needs real K/V in the cache: preempted-then-resumed greedy output equals the
uninterrupted run (hypothesis over workloads); n > 1 completions that share the prompt's blocks
(copy-on-write of the partial block) equal independent runs with the same per-completion seeds;
seeded sampling does not depend on what else is in the batch; chat prompts and stop strings go
through the real tokenizer. The model loads in well under a second; the file takes ~20 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.engine.engine import completion_seed
from llmos_worker.model import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir))


def engine_for(tiny: Any, **cfg: Any) -> LLMEngine:
    cfg.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    cfg.setdefault("block_size", 4)
    return LLMEngine(tiny, EngineConfig(**cfg))


HEAVY = [(30, 24)] * 6  # six 54-token sequences against 68 slots: preemption is certain


def prompt_ids(i: int, length: int) -> list[int]:
    return [(977 * i + 31 * j) % 40000 + 100 for j in range(length)]


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@example(reqs=HEAVY, budget=32)
@given(
    st.lists(st.tuples(st.integers(2, 40), st.integers(1, 24)), min_size=2, max_size=8),
    st.sampled_from([8, 32]),
)
def test_preempted_then_resumed_greedy_equals_uninterrupted(
    tiny: Any, reqs: list[tuple[int, int]], budget: int
) -> None:
    prompts = [prompt_ids(i, n) for i, (n, _) in enumerate(reqs)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in reqs]
    roomy = engine_for(tiny)
    expect = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    assert roomy.stats().num_preemptions == 0
    # 17 blocks of 4 slots: each request alone fits (<= 64 tokens), all of them together do not
    per_block = roomy.runner.bytes_per_block(tiny.config, 4, "float32")  # type: ignore[attr-defined]
    tight = engine_for(
        tiny, kv_cache_memory_bytes=17 * per_block, max_num_batched_tokens=budget, max_model_len=68
    )
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert got == expect
    if reqs == HEAVY:
        assert tight.stats().num_preemptions > 0
    assert tight.stats().num_free_blocks == tight.stats().num_total_blocks


def test_n_completions_share_blocks_and_equal_independent_seeded_runs(tiny: Any) -> None:
    prompt = prompt_ids(3, 10)  # 2.5 blocks: the partial block is shared, then copied on write
    engine = engine_for(tiny)
    forked = engine.generate(
        [prompt], SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=12, ignore_eos=True)
    )[0]
    assert engine.stats().prompt_tokens == 10  # prefilled once
    single = engine_for(tiny, enable_prefix_caching=False).generate(
        [prompt] * 3,
        [
            SamplingParams(
                temperature=1.0, seed=completion_seed(42, i), max_tokens=12, ignore_eos=True
            )
            for i in range(3)
        ],
    )
    assert [c.token_ids for c in forked.outputs] == [o.outputs[0].token_ids for o in single]
    assert len({tuple(c.token_ids) for c in forked.outputs}) == 3


def test_seeded_sampling_is_independent_of_batch_composition(tiny: Any) -> None:
    mine = SamplingParams(temperature=0.9, top_k=50, seed=7, max_tokens=16, ignore_eos=True)
    alone = engine_for(tiny).generate([prompt_ids(1, 12)], mine)[0].outputs[0].token_ids
    engine = engine_for(tiny, max_num_batched_tokens=16)
    others = [prompt_ids(i, 5 + 7 * i) for i in range(2, 6)]
    outs = engine.generate(
        [*others, prompt_ids(1, 12)],
        [*[SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True) for _ in others], mine],
    )
    assert outs[-1].outputs[0].token_ids == alone


def test_chat_prompt_text_and_stop_string_with_real_tokenizer(tiny: Any) -> None:
    engine = engine_for(tiny)
    chat = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}])
    base = engine.generate([chat], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[
        0
    ].outputs[0]
    assert base.text == tiny.tokenizer.decode(base.token_ids)
    stop = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    out = engine.generate(
        [chat], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True)
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[: base.text.index(stop)]
    assert engine.stats().prefix_cache_hits > 0  # the second run reused the chat prompt
