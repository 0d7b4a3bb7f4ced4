"""The paged decoder against Hugging Face's LlamaForCausalLM on a tiny random GQA Llama.

Several sequences share each ForwardBatch: full prefills, a prefill split in two chunks (the
second reads the first's K/V back from the cache, row by row or through the blocked prefill
kernel), and decode steps, with block tables pointing at shuffled physical blocks. Logits must
match HF's full-sequence forward to ~1e-4.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from llmos_worker.model import LoadedModel, ModelRunner, load_model
from tests.worker.tiny import PagedBatcher


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir))


def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) next-token logits of a plain full forward."""
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def prompts(n: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, n, (length,), generator=g).tolist() for length in lengths]


@pytest.fixture(params=["auto", "ops", "torch"])
def backend(request: pytest.FixtureRequest, tiny: LoadedModel) -> Iterator[str]:
    """The native kernels (which must build here) with steps of decodes run through the whole
    stack in one call (auto) or op by op (ops), or the torch path."""
    from llmos_worker.model.kernels import native_kernels

    if request.param != "torch":
        assert native_kernels() is not None, "the native kernels did not build (see the log)"
    tiny.model.set_backend(request.param)
    yield str(request.param)
    tiny.model.set_backend("auto")


@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_matches_hf(
    tiny: LoadedModel, hf_tiny: torch.nn.Module, block_size: int, backend: str
) -> None:
    a, b, c = prompts(tiny.config.vocab_size, [13, 7, 37])
    runner = ModelRunner(tiny, block_size=block_size, num_blocks=64)
    pb = PagedBatcher(block_size, 64)
    for name, toks in zip("abc", (a, b, c), strict=True):
        pb.add(name, toks)

    # step 1: a and b whole, c's first 9 tokens (every row's logits checked)
    out = runner.execute(pb.batch({"a": 13, "b": 7, "c": 9}, all_logits=True))
    assert out.shape == (13 + 7 + 9, tiny.config.vocab_size) and out.dtype == torch.float32
    torch.testing.assert_close(out[:13], hf_logits(hf_tiny, a), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[13:20], hf_logits(hf_tiny, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[20:], hf_logits(hf_tiny, c[:9]), atol=1e-4, rtol=1e-4)

    # step 2: decode a and b (greedy), c's remaining 28 tokens read the first 9 from the cache
    for name, row in (("a", 12), ("b", 19)):
        pb.append(name, int(out[row].argmax()))
    out = runner.execute(pb.batch({"a": 1, "c": 28, "b": 1}, all_logits=True))
    torch.testing.assert_close(out[1:29], hf_logits(hf_tiny, c)[9:], atol=1e-4, rtol=1e-4)

    # steps 3..6: decodes of all three, mixed context lengths
    last = {"a": out[0], "c": out[28], "b": out[29]}
    for _ in range(4):
        for name, row in last.items():
            pb.append(name, int(row.argmax()))
        out = runner.execute(pb.batch({"a": 1, "c": 1, "b": 1}))
        last = dict(zip("acb", out, strict=True))
        for name, row in last.items():
            ref = hf_logits(hf_tiny, pb.seqs[name].tokens)[-1]
            torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4)


def test_prefix_hit_single_token_chunk(tiny: LoadedModel, hf_tiny: torch.nn.Module) -> None:
    """A chunk of 1 token after a cached prefix (a prefix-cache hit) and a 1-token prompt."""
    (p,) = prompts(tiny.config.vocab_size, [9], seed=3)
    runner = ModelRunner(tiny, block_size=4, num_blocks=16)
    pb = PagedBatcher(4, 16)
    pb.add("p", p)
    pb.add("one", p[:1])
    runner.execute(pb.batch({"p": 8}))
    out = runner.execute(pb.batch({"p": 1, "one": 1}))
    torch.testing.assert_close(out[0], hf_logits(hf_tiny, p)[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], hf_logits(hf_tiny, p[:1])[-1], atol=1e-4, rtol=1e-4)


def test_long_chunk_over_cache_matches_hf(
    tiny: LoadedModel, hf_tiny: torch.nn.Module, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk longer than the row-by-row limit after a cached prefix: the blocked native
    prefill kernel with positions offset by the cache (SDPA with a mask on the torch path)."""
    from llmos_worker.model import attention

    monkeypatch.setattr(attention, "NATIVE_PREFILL_ROWS", 4)
    a, b = prompts(tiny.config.vocab_size, [45, 23], seed=4)
    runner = ModelRunner(tiny, block_size=4, num_blocks=32)
    pb = PagedBatcher(4, 32)
    pb.add("a", a)
    pb.add("b", b)
    first = runner.execute(pb.batch({"a": 17, "b": 3}, all_logits=True))
    rest = runner.execute(pb.batch({"b": 20, "a": 28}, all_logits=True))
    torch.testing.assert_close(first[:17], hf_logits(hf_tiny, a[:17]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rest[:20], hf_logits(hf_tiny, b)[3:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rest[20:], hf_logits(hf_tiny, a)[17:], atol=1e-4, rtol=1e-4)


def test_plan_routes_prefills_to_the_native_kernels() -> None:
    """With the native kernels: decodes and short chunks over a cache go row by row to the
    decode kernel; whole prompts and long chunks to the blocked prefill kernel, none to SDPA."""
    import torch as t

    from llmos_worker.model.attention import NATIVE_PREFILL_ROWS, AttentionPlan
    from llmos_worker.model.batch import ForwardBatch
    from llmos_worker.model.kernels import native_kernels

    kernels = native_kernels()
    assert kernels is not None
    long = NATIVE_PREFILL_ROWS + 1
    # (tokens this step, context after it): decode, whole prompt, short cached chunk, long one
    seqs = [(1, 30), (12, 12), (5, 40), (long, long + 20)]
    qlens = t.tensor([q for q, _ in seqs])
    batch = ForwardBatch(
        input_ids=t.zeros(int(qlens.sum()), dtype=t.int64),
        positions=t.zeros(int(qlens.sum()), dtype=t.int64),
        slot_mapping=t.arange(int(qlens.sum())),
        query_start_loc=t.cat([t.zeros(1, dtype=t.int64), qlens.cumsum(0)]),
        context_lens=t.tensor([c for _, c in seqs]),
        block_tables=t.arange(4 * 6).view(4, 6),
        logits_indices=t.arange(4),
    )
    plan = AttentionPlan.from_batch(batch, 16, t.device("cpu"), t.float32, kernels)
    assert not plan.prefills and not plan.decodes
    assert plan.native is not None and plan.native_prefills is not None
    assert plan.native.rows.tolist() == [0, 13, 14, 15, 16, 17]
    assert plan.native.context_lens.tolist() == [30, 36, 37, 38, 39, 40]
    assert plan.native_prefills.starts.tolist() == [1, 18]
    assert plan.native_prefills.query_lens.tolist() == [12, long]
    assert plan.native_prefills.context_lens.tolist() == [12, long + 20]
    assert plan.native_prefills.block_tables.tolist() == [list(range(6, 12)), list(range(18, 24))]


def test_fp16_kv_cache_close_to_hf(
    tiny: LoadedModel, hf_tiny: torch.nn.Module, backend: str
) -> None:
    """An fp16 KV cache under the fp32 model: prefills, a chunk reading the cache back, and
    decode steps stay within fp16 rounding of HF's fp32 logits, with the same greedy tokens."""
    a, b = prompts(tiny.config.vocab_size, [21, 30], seed=6)
    runner = ModelRunner(tiny, block_size=4, num_blocks=32, kv_dtype="float16")
    assert runner.kv_cache.dtype == torch.float16
    pb = PagedBatcher(4, 32)
    pb.add("a", a)
    pb.add("b", b)
    first = runner.execute(pb.batch({"a": 21, "b": 10}, all_logits=True))
    rest = runner.execute(pb.batch({"b": 20}, all_logits=True))
    got = {"a": first[:21], "b": torch.cat([first[21:], rest])}
    for _ in range(3):
        for name, out in got.items():
            pb.append(name, int(out[-1].argmax()))
        step = runner.execute(pb.batch({"a": 1, "b": 1}))
        got = {"a": step[:1], "b": step[1:]}
        for name in ("a", "b"):
            ref = hf_logits(hf_tiny, pb.seqs[name].tokens)[-1]
            torch.testing.assert_close(got[name][0], ref, atol=2e-3, rtol=2e-3)
            assert int(got[name][0].argmax()) == int(ref.argmax())


def test_bfloat16_runs_and_is_close(tiny_model_dir: Path, hf_tiny: torch.nn.Module) -> None:
    bf = load_model(str(tiny_model_dir), dtype="bfloat16")
    (p,) = prompts(bf.config.vocab_size, [11], seed=5)
    runner = ModelRunner(bf, block_size=4, num_blocks=8)
    assert runner.kv_cache.dtype == torch.bfloat16
    pb = PagedBatcher(4, 8)
    pb.add("p", p)
    first = runner.execute(pb.batch({"p": 6}, all_logits=True))
    rest = runner.execute(pb.batch({"p": 5}, all_logits=True))
    out = torch.cat([first, rest])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = hf_logits(hf_tiny, p)
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_bytes_per_block(tiny: LoadedModel) -> None:
    cfg = tiny.config
    per = ModelRunner.bytes_per_block(cfg, 16, "float32")
    assert per == 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    assert ModelRunner.bytes_per_block(cfg, 16, "bfloat16") == per // 2
    runner = ModelRunner(tiny, block_size=16, num_blocks=5)
    assert runner.kv_cache.numel() * runner.kv_cache.element_size() == 5 * per


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "tie_word_embeddings": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "num_key_value_heads": 1},
    ],
    ids=["tied-llama3-rope", "linear-rope-mqa"],
)
def test_variants_match_hf(
    tmp_path: Path, smollm2_tokenizer_dir: Path, overrides: dict[str, object]
) -> None:
    """Tied embeddings, llama3 / linear RoPE scaling and MQA against HF, chunked over the cache."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.worker.tiny import write_tiny_llama

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, local_files_only=True)
    path = write_tiny_llama(tmp_path / "variant", tok, seed=7, **overrides)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(str(path))
    assert ours.config.rope_scaling is not None
    (p,) = prompts(ours.config.vocab_size, [40], seed=9)
    runner = ModelRunner(ours, block_size=8, num_blocks=8)
    pb = PagedBatcher(8, 8)
    pb.add("p", p)
    out = torch.cat(
        [
            runner.execute(pb.batch({"p": 19}, all_logits=True)),
            runner.execute(pb.batch({"p": 21}, all_logits=True)),
        ]
    )
    torch.testing.assert_close(out, hf_logits(hf, p), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_model_dir: Path, tiny: LoadedModel) -> None:
    gpu = load_model(str(tiny_model_dir), device="cuda")
    (p,) = prompts(tiny.config.vocab_size, [21], seed=11)
    outs = []
    for loaded in (tiny, gpu):
        runner = ModelRunner(loaded, block_size=4, num_blocks=16)
        assert runner.kv_cache.device.type == loaded.device.type
        pb = PagedBatcher(4, 16)
        pb.add("p", p)
        first = runner.execute(pb.batch({"p": 13}, all_logits=True))
        outs.append(torch.cat([first, runner.execute(pb.batch({"p": 8}, all_logits=True))]))
    assert outs[1].device.type == "cpu"
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3, rtol=1e-3)


def test_runner_refuses_bad_sizes_and_reports_memory(tiny: LoadedModel) -> None:
    from llmos_worker.errors import ModelLoadError
    from llmos_worker.model import available_memory_bytes

    with pytest.raises(ModelLoadError, match="num_blocks"):
        ModelRunner(tiny, block_size=16, num_blocks=0)
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        ModelRunner.bytes_per_block(tiny.config, 16, "int4")
    free = available_memory_bytes("cpu")
    assert 0 < free < 1 << 50


def test_decodes_grouped_by_length() -> None:
    """Decodes of very different lengths go to separate SDPA groups (bounded padding)."""
    import torch as t

    from llmos_worker.model.attention import AttentionPlan
    from llmos_worker.model.batch import ForwardBatch

    lens = [100, 9, 40, 12, 300]  # -> groups {9, 12}, {40}, {100}, {300}
    n = len(lens)
    batch = ForwardBatch(
        input_ids=t.zeros(n, dtype=t.int64),
        positions=t.tensor(lens) - 1,
        slot_mapping=t.arange(n),
        query_start_loc=t.arange(n + 1),
        context_lens=t.tensor(lens),
        block_tables=t.zeros(n, 19, dtype=t.int64),
        logits_indices=t.arange(n),
    )
    plan = AttentionPlan.from_batch(batch, 16, t.device("cpu"), t.float32)
    assert [g.rows.tolist() for g in plan.decodes] == [[1, 3], [2], [0], [4]]
    assert [g.mask.shape[-1] for g in plan.decodes] == [16, 48, 112, 304]
    assert not plan.decode_only and not plan.prefills
    same = AttentionPlan.from_batch(
        ForwardBatch(
            batch.input_ids,
            batch.positions,
            batch.slot_mapping,
            batch.query_start_loc,
            t.tensor([20, 30, 25, 39, 21]),
            batch.block_tables,
            batch.logits_indices,
        ),
        16,
        t.device("cpu"),
        t.float32,
    )
    assert same.decode_only and len(same.decodes) == 1
