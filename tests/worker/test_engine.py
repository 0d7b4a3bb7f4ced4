"""LLMEngine on a fake model that reads its context back out of the paged cache.

The fake runner stores token ids (instead of K/V) in a slot tensor of `num_blocks * block_size`
entries, writes `input_ids` at `slot_mapping`, and computes each sampled row's next token from the
context it gathers through `block_tables` — so any paging bug (a wrong prefix-cache hit, a missed
copy-on-write, a stale block after preemption) changes the output. Expected outputs follow from
the rule applied to the true token sequence. Fast (a few seconds): no real model is loaded.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmos_worker.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from llmos_worker.errors import InvalidRequestError
from llmos_worker.model.batch import ForwardBatch

ALPHABET = "\x00abcdefghijklmnopqrstuvwxyz .,!?"  # id 0 is eos
V = len(ALPHABET)


def rule(ctx: list[int]) -> int:
    """The fake model's favourite next token (never eos)."""
    return 1 + sum((i + 1) * t for i, t in enumerate(ctx)) % (V - 1)


def alt(ctx: list[int]) -> int:
    """Its second choice (logit 9 vs 10)."""
    return 1 + (rule(ctx) * 7 + len(ctx)) % (V - 1)


class FakeTokenizer:
    eos_token_ids: ClassVar[set[int]] = {0}
    vocab_size = V

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return "".join(ALPHABET[i] for i in ids if not (skip_special_tokens and i == 0))


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int):
        self.bs = block_size
        self.slots = torch.full((num_blocks * block_size,), -1, dtype=torch.long)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        for src, dst in pairs:
            bs = self.bs
            self.slots[dst * bs : (dst + 1) * bs] = self.slots[src * bs : (src + 1) * bs].clone()

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        self.slots[batch.slot_mapping] = batch.input_ids
        starts = batch.query_start_loc.tolist()
        rows = []
        for idx in batch.logits_indices.tolist():
            s = max(i for i in range(len(starts) - 1) if starts[i] <= idx)
            ctx_len = int(batch.context_lens[s])
            table = batch.block_tables[s].tolist()
            ctx = [
                int(self.slots[table[p // self.bs] * self.bs + p % self.bs]) for p in range(ctx_len)
            ]
            assert -1 not in ctx, "read a slot that was never written"
            row = torch.full((V,), -10.0)
            row[alt(ctx)] = 9.0
            row[rule(ctx)] = 10.0
            rows.append(row)
        return torch.stack(rows) if rows else torch.empty(0, V)


def make_engine(num_blocks: int = 64, **cfg: Any) -> LLMEngine:
    cfg.setdefault("block_size", 4)
    config = EngineConfig(**cfg)
    loaded = SimpleNamespace(
        name="fake",
        tokenizer=FakeTokenizer(),
        config=SimpleNamespace(vocab_size=V, hidden_size=8, max_position_embeddings=512),
    )
    runner = FakeRunner(num_blocks, config.block_size)
    return LLMEngine(loaded, config, runner=runner, num_blocks=num_blocks)  # type: ignore[arg-type]


def check_valid(prompt: list[int], out: list[int], greedy: bool) -> None:
    for k, tok in enumerate(out):
        ctx = prompt + out[:k]
        assert tok == rule(ctx) if greedy else tok in (rule(ctx), alt(ctx)), (k, prompt, out)


def check_pool(engine: LLMEngine) -> None:
    bm = engine.block_manager
    refs = [0] * bm.num_blocks
    for seq in engine.scheduler.running:
        for b in seq.block_table:
            refs[b] += 1
    assert all(not s.block_table for s in engine.scheduler.waiting)
    assert refs == bm.ref_counts
    assert bm.num_free_blocks + sum(1 for r in refs if r) == bm.num_blocks


def run_all(engine: LLMEngine, max_steps: int = 5000) -> dict[str, RequestOutput]:
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return final
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
        check_pool(engine)
    raise AssertionError("engine did not finish: deadlock or livelock")


workload = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.integers(1, 40),
        st.integers(1, 24),
        st.sampled_from([1, 1, 2, 3]),
        st.booleans(),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workload,
    st.sampled_from([12, 24, 200]),
    st.sampled_from([8, 16, 64]),
    st.sampled_from(["fcfs", "priority"]),
)
def test_random_workloads_are_exact_and_return_every_block(
    reqs: list[tuple[int, int, int, int, bool]], num_blocks: int, budget: int, policy: str
) -> None:
    engine = make_engine(
        num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=6,
        scheduling_policy=policy,
        max_model_len=48,
    )
    stems = [[(3 * s + i) % (V - 1) + 1 for i in range(12)] for s in range(4)]
    expect = {}
    for i, (stem, extra, max_tokens, n, greedy) in enumerate(reqs):
        prompt = (stems[stem] + [(i + j) % (V - 1) + 1 for j in range(extra)])[:40]
        max_tokens = min(max_tokens, 48 - len(prompt))
        params = SamplingParams(
            temperature=0.0 if greedy else 1.0, n=n, max_tokens=max_tokens, seed=i
        )
        engine.add_request(f"r{i}", prompt, params, priority=i % 3)
        expect[f"r{i}"] = (prompt, params)
    final = run_all(engine)
    assert set(final) == set(expect)
    for rid, (prompt, params) in expect.items():
        out = final[rid]
        assert len(out.outputs) == params.n
        for c in out.outputs:
            assert len(c.token_ids) == params.max_tokens and c.finish_reason == "length"
            check_valid(prompt, c.token_ids, params.greedy)
    assert engine.block_manager.num_free_blocks == num_blocks


def test_preempted_then_resumed_output_is_identical_to_uninterrupted() -> None:
    def run(num_blocks: int) -> tuple[list[list[int]], int]:
        engine = make_engine(num_blocks, max_num_batched_tokens=32)
        prompts = [[(7 * i + j) % (V - 1) + 1 for j in range(5 + 3 * i)] for i in range(8)]
        params = [
            SamplingParams(
                temperature=0.0 if i % 2 else 0.8, seed=100 + i, max_tokens=20, top_p=0.9
            )
            for i in range(8)
        ]
        outs = engine.generate(prompts, params)
        return [o.outputs[0].token_ids for o in outs], engine.stats().num_preemptions

    roomy, none = run(256)
    tight, some = run(14)
    assert none == 0 and some > 0
    assert tight == roomy


def test_prefix_cache_hits_across_requests_and_salt_isolates() -> None:
    engine = make_engine(64)
    system = [5] * 16
    engine.generate([[*system, 1, 2]], SamplingParams(temperature=0, max_tokens=2))
    before = engine.stats().prefix_cache_hits
    out = engine.generate([[*system, 3, 4]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert engine.stats().prefix_cache_hits - before == 16
    assert out.metrics.num_cached_prompt_tokens == 16
    check_valid([*system, 3, 4], out.outputs[0].token_ids, True)
    engine.add_request(
        "salted",
        [*system, 3, 4],
        SamplingParams(temperature=0, max_tokens=1),
        cache_salt="other-tenant",
    )
    before = engine.stats().prefix_cache_hits
    run_all(engine)
    assert engine.stats().prefix_cache_hits == before


def test_bad_input_is_refused_with_named_params_and_engine_keeps_working() -> None:
    engine = make_engine(8, max_model_len=64, max_num_seqs=4)  # 32 slots < max_model_len
    cases: list[tuple[Any, SamplingParams, str, list[str]]] = [
        ([], SamplingParams(), "prompt", ["empty"]),
        ([1, 2, V], SamplingParams(), "prompt", ["vocabulary", str(V)]),
        ([-1], SamplingParams(), "prompt", ["vocabulary"]),
        ([1] * 64, SamplingParams(), "prompt", ["64", "max_model_len"]),
        ([1] * 20, SamplingParams(max_tokens=50), "max_tokens", ["20", "50", "64"]),
        ([1] * 20, SamplingParams(max_tokens=30), "max_tokens", ["KV blocks", "8"]),
        ([1], SamplingParams(n=16), "n", ["max_num_seqs"]),
    ]
    for prompt, params, param, words in cases:
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("x", prompt, params)
        assert err.value.param == param
        for w in words:
            assert w in err.value.message, (w, err.value.message)
    assert not engine.has_unfinished()
    engine.add_request("ok", "hello", SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(InvalidRequestError) as dup:
        engine.add_request("ok", "again", SamplingParams())
    assert dup.value.param == "request_id"
    out = run_all(engine)["ok"]
    check_valid(FakeTokenizer().encode("hello"), out.outputs[0].token_ids, True)
    # a request filling the whole cache still runs (alone): no deadlock at the edge
    out = engine.generate([[1] * 20], SamplingParams(temperature=0, max_tokens=13))[0]
    assert len(out.outputs[0].token_ids) == 13


def test_abort_frees_every_block_and_silences_the_request() -> None:
    engine = make_engine(32, max_num_batched_tokens=8, max_num_seqs=2)
    for i in range(4):
        engine.add_request(f"r{i}", [i + 1] * (6 + 5 * i), SamplingParams(n=2, max_tokens=30))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < 32
    engine.abort("r0")
    engine.abort("r0")  # idempotent
    engine.abort("never-existed")
    for _ in range(3):
        assert all(o.request_id != "r0" for o in engine.step())
    for i in range(1, 4):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished() and engine.step() == []
    assert engine.block_manager.num_free_blocks == 32
    assert not any(engine.block_manager.ref_counts)


def test_n_completions_share_the_prompt_and_diverge() -> None:
    engine = make_engine(64)
    prompt = [3] * 10  # 2.5 blocks: the partial block is shared, then copied on write
    out = engine.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    for c in out.outputs:
        check_valid(prompt, c.token_ids, greedy=False)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.stats().prompt_tokens == 10  # prefilled once


def test_stop_strings_cut_the_text_and_never_leak_a_partial_stop() -> None:
    prompt = "hello world"
    base = make_engine().generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    text = base.outputs[0].text
    stop = text[6:9]
    cut = text.index(stop)
    for include in (False, True):
        engine = make_engine()
        engine.add_request(
            "s",
            prompt,
            SamplingParams(
                temperature=0, max_tokens=24, stop=[stop], include_stop_str_in_output=include
            ),
        )
        seen = []
        while engine.has_unfinished():
            for o in engine.step():
                seen.append(o.outputs[0].text)
                last = o
        c = last.outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == (text[: cut + len(stop)] if include else text[:cut])
        for a, b in itertools.pairwise(seen):
            assert b.startswith(a)  # streamed text only grows
        assert all(stop not in s for s in seen[:-1])


def test_stop_token_ids_min_tokens_and_eos() -> None:
    prompt = [4, 5, 6]
    toks = make_engine().generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0]
    ids = toks.outputs[0].token_ids
    stop_id = ids[3]
    first = ids.index(stop_id)
    out = (
        make_engine()
        .generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[
            0
        ]
        .outputs[0]
    )
    assert out.token_ids == ids[: first + 1] and out.stop_reason == stop_id
    assert out.finish_reason == "stop" and len(out.text) == first  # stop token not in text
    out = (
        make_engine()
        .generate(
            [prompt],
            SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id], min_tokens=10),
        )[0]
        .outputs[0]
    )
    assert len(out.token_ids) == 10 and stop_id not in out.token_ids
    engine = make_engine()
    engine.eos_token_ids = frozenset({ids[2]})
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10))[0].outputs[0]
    assert out.token_ids[-1] == ids[2] and out.finish_reason == "stop"
    assert out.stop_reason is None
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(out.token_ids) == 10


@pytest.mark.parametrize("policy,first", [("fcfs", "late-low"), ("priority", "high")])
def test_scheduling_policy_order(policy: str, first: str) -> None:
    engine = make_engine(64, max_num_seqs=1, scheduling_policy=policy)
    engine.add_request(
        "late-low", [1, 2], SamplingParams(max_tokens=5), priority=5, arrival_time=1.0
    )
    engine.add_request("high", [1, 3], SamplingParams(max_tokens=5), priority=0, arrival_time=2.0)
    order: list[str] = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order[0] == first


def test_logprobs_are_consistent() -> None:
    engine = make_engine()
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[
        0
    ].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    total = 0.0
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0
        assert next(iter(lp.top)) == tok and len(lp.top) == 3
        assert sum(torch.tensor(list(lp.top.values())).exp().tolist()) <= 1.0 + 1e-5
        assert lp.top[tok] == pytest.approx(lp.logprob)
        total += lp.logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_random_fcfs_waiting_head_is_never_overtaken() -> None:
    rng = random.Random(0)
    engine = make_engine(20, max_num_batched_tokens=16, max_num_seqs=3)
    for i in range(12):
        engine.add_request(
            f"r{i:02d}",
            [rng.randrange(1, V) for _ in range(rng.randrange(1, 30))],
            SamplingParams(max_tokens=rng.randrange(1, 15)),
            arrival_time=float(i),
        )
    started: list[str] = []
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.request_id not in started:
                started.append(seq.request_id)
    assert started == sorted(started)
