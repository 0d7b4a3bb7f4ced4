"""Opt-in fp16, int8, bf16 and int4 weights: quality against fp32 by perplexity, and the settings
that refuse them.

The quality check scores a fixed English passage (tests/worker/data/perplexity.txt, written for
this test) with the bundled SmolLM2-135M-Instruct, fp32 against fp16 or int8 linear layers. The
stated bounds: fp16 perplexity within 0.5 % of fp32 (measured: 0.01 %), int8 (per-channel
weight scales, 16-bit activation rows) within 2 % (measured: -0.5 % on this text, +0.2 % on
CPython's reference docs), bf16 (with AVX512_BF16: bf16-rounded activations from 8 rows) within
1 % (measured: +0.03 %), int4 (GGUF's Q4_1 blocks, which the bundled file's decoder layers are
stored in, and its Q8_0 LM head: both kept exactly) within 0.01 % (measured: 0.0 %, the same
weights summed in another order). The perplexity helper itself is checked against Hugging
Face's causal-LM loss on the tiny model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llmos_worker.engine.config import EngineConfig
from llmos_worker.errors import InvalidRequestError, ModelLoadError
from llmos_worker.model import LoadedModel, load_model
from llmos_worker.model.quality import perplexity

TEXT = Path(__file__).parent / "data" / "perplexity.txt"
BOUNDS = {"fp16": 0.005, "int8": 0.02, "bf16": 0.01, "int4": 1e-4}  # relative change allowed
# per weight; 4-bit blocks: 20 bytes per 32 weights, 8-bit blocks (int4's head): 34 per 32
WEIGHT_BYTES = {"fp16": 2, "int8": 1, "bf16": 2, "int4": 0.625, "q8_0": 1.0625}


def test_perplexity_matches_hf_loss(tiny_model_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    tiny = load_model(str(tiny_model_dir))
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(
        3, tiny.config.vocab_size, (70,), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        loss = float(hf(ids[None], labels=ids[None]).loss)
    assert perplexity(tiny, ids.tolist(), window=70) == pytest.approx(math.exp(loss), rel=1e-4)
    # windows: each scored on its own, so two halves differ from one window but stay finite
    halves = perplexity(tiny, ids.tolist(), window=35)
    assert math.isfinite(halves) and halves != pytest.approx(math.exp(loss), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(tiny, [5])


@pytest.fixture(scope="module")
def fp32_model(smollm2_gguf: Path) -> LoadedModel:
    return load_model(str(smollm2_gguf))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp16", "int8", "bf16", "int4"])
def test_perplexity_within_bound(smollm2_gguf: Path, fp32_model: LoadedModel, mode: str) -> None:
    narrow = load_model(str(smollm2_gguf), quantization=mode)
    assert narrow.quantization == mode
    ids = fp32_model.tokenizer.encode(TEXT.read_text())
    assert len(ids) > 400
    base, got = perplexity(fp32_model, ids), perplexity(narrow, ids)
    assert 1.0 < base < 100.0  # the real model on real English, not noise
    assert abs(got - base) / base <= BOUNDS[mode], (base, got)
    # every decoder projection in the narrower type (int8: plus a 4-byte scale per row); the
    # fp32 embedding lookup is kept and the tied LM head gets its own copy in the mode (fp32 on
    # the native path: a packed copy, counted)
    # int4: the decoder projections at 5 bits per weight, the LM head in 8-bit blocks
    embed = fp32_model.model.embed.numel() * 4
    projections_fp32 = fp32_model.model.weight_bytes() - embed
    if fp32_model.model.head_mm.weight is fp32_model.model.embed:  # dense: head is the lookup
        projections_fp32 += embed
    head_bytes = WEIGHT_BYTES["q8_0" if mode == "int4" else mode]
    expected = embed + (projections_fp32 - embed) * WEIGHT_BYTES[mode] / 4 + embed * head_bytes / 4
    assert narrow.model.weight_bytes() == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
def test_int4_keeps_q4_1_layers_exactly(smollm2_gguf: Path, fp32_model: LoadedModel) -> None:
    """The bundled GGUF stores its decoder projections as Q4_1 and its (tied) LM head as Q8_0:
    int4 finds every block of both again, so it holds bit for bit the weights fp32 dequantised
    from the file."""
    narrow = load_model(str(smollm2_gguf), quantization="int4")
    pairs = zip(fp32_model.model.decoder_layers, narrow.model.decoder_layers, strict=True)
    for i, (full, q4) in enumerate(pairs):
        for (name, a), b in zip(full.linears().items(), q4.linears().values(), strict=True):
            assert b.mode == "int4" and torch.equal(a.dense(), b.dense()), (i, name)
    head = narrow.model.head_mm
    assert head.mode == "q8_0" and torch.equal(head.dense(), fp32_model.model.embed.detach())


@pytest.mark.slow
def test_narrow_engines_generate(smollm2_gguf: Path) -> None:
    """fp16, int8, bf16 and int4 models serve through the engine; their greedy text starts like
    fp32's."""
    from llmos_worker.engine import LLMEngine
    from llmos_worker.engine.params import SamplingParams

    outs = {}
    for mode in ("none", "fp16", "int8", "bf16", "int4"):
        config = EngineConfig(kv_cache_memory_bytes=64 * 2**20, quantization=mode)  # type: ignore[arg-type]
        engine = LLMEngine.from_source(str(smollm2_gguf), config)
        prompt = engine.tokenizer.encode("The capital of France is")
        engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=8))
        while engine.has_unfinished():
            for out in engine.step():
                outs[mode] = out.outputs[0].token_ids
    for mode in ("fp16", "int8", "bf16", "int4"):
        assert len(outs[mode]) == 8 and outs[mode][:4] == outs["none"][:4], mode


@pytest.mark.slow
def test_fp16_kv_cache_generates_like_fp32(smollm2_gguf: Path) -> None:
    """The real model with an fp16 KV cache: twice the blocks for the same budget, and the same
    greedy tokens as the fp32 cache for three prompts served together (whole-prompt prefills,
    then decode steps through the whole-stack call)."""
    from llmos_worker.engine import LLMEngine
    from llmos_worker.engine.params import SamplingParams
    from llmos_worker.model.runner import ModelRunner

    loaded = load_model(str(smollm2_gguf))
    texts = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process"]
    outs: dict[str, dict[str, list[int]]] = {}
    blocks = {}
    for kv in ("auto", "float16"):
        config = EngineConfig(kv_cache_memory_bytes=32 * 2**20, kv_cache_dtype=kv)  # type: ignore[arg-type]
        engine = LLMEngine(loaded, config)
        assert isinstance(engine.runner, ModelRunner)
        assert engine.runner.kv_cache.dtype == (torch.float16 if kv == "float16" else torch.float32)
        blocks[kv] = engine.num_blocks
        for i, text in enumerate(texts):
            prompt = engine.tokenizer.encode(text)
            engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=24))
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(kv, {})[out.request_id] = out.outputs[0].token_ids
    assert blocks["float16"] // 2 == blocks["auto"]  # the same budget over half the bytes
    assert all(len(toks) == 24 for toks in outs["float16"].values())
    assert outs["float16"] == outs["auto"]


def test_refused_settings(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs dtype float32"):
        load_model(str(tiny_model_dir), dtype="bfloat16", quantization="fp16")
    with pytest.raises(ModelLoadError, match="unknown quantization 'int3'"):
        load_model(str(tiny_model_dir), quantization="int3")
    with pytest.raises(ModelLoadError, match="CPU only"):
        load_model(str(tiny_model_dir), device="meta", quantization="fp16")
    with pytest.raises(ModelLoadError, match="needs dtype float32"):
        load_model(str(tiny_model_dir), dtype="float16", quantization="int8")
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig(quantization="int3")  # type: ignore[arg-type]
    assert info.value.param == "quantization"
    with pytest.raises(InvalidRequestError, match="float32 on the cpu"):
        EngineConfig(quantization="fp16", dtype="bfloat16")


def test_kv_cache_dtype_setting() -> None:
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of") as info:
        EngineConfig(kv_cache_dtype="int8")  # type: ignore[arg-type]
    assert info.value.param == "kv_cache_dtype"
    assert EngineConfig().kv_dtype() == "float32"
    assert EngineConfig(dtype="bfloat16").kv_dtype() == "bfloat16"
    assert EngineConfig(dtype="bfloat16", kv_cache_dtype="float16").kv_dtype() == "float16"
    # any model dtype, any device: unlike quantization it is not tied to fp32 on the CPU
    assert EngineConfig(device="cuda", kv_cache_dtype="float16").kv_dtype() == "float16"


def test_tiny_fp16_close_and_not_requantized(tiny_model_dir: Path) -> None:
    from llmos_worker.model import ModelRunner
    from tests.worker.tiny import PagedBatcher

    base, packed = (
        load_model(str(tiny_model_dir)),
        load_model(str(tiny_model_dir), quantization="fp16"),
    )
    ids = torch.randint(
        3, base.config.vocab_size, (20,), generator=torch.Generator().manual_seed(2)
    )
    logits = []
    for lm in (base, packed):
        pb = PagedBatcher(4, 8)
        pb.add("p", ids.tolist())
        logits.append(
            ModelRunner(lm, block_size=4, num_blocks=8).execute(
                pb.batch({"p": 20}, all_logits=True)
            )
        )
    torch.testing.assert_close(logits[1], logits[0], atol=5e-3, rtol=5e-3)
    assert not torch.equal(logits[1], logits[0])  # really a different weight path
    packed.model.quantize("fp16")  # same mode again: a no-op
    with pytest.raises(ModelLoadError, match="already quantized as 'fp16'"):
        packed.model.quantize("int8")


@pytest.mark.parametrize("mode", ["none", "fp16", "int8", "bf16", "int4"])
def test_native_and_torch_paths_agree(tiny_model_dir: Path, mode: str) -> None:
    """Packed weights in the native kernel and the torch path (weights unpacked, fp16/int8/bf16/
    int4 dequantised per call) compute the same logits (int8: up to the native path's 16-bit
    activations; bf16: its bf16-rounded activations where the CPU has AVX512_BF16); int8 and
    bf16 stay near fp32."""
    from llmos_worker.model import ModelRunner
    from llmos_worker.model.kernels import native_kernels
    from tests.worker.tiny import PagedBatcher

    def logits(lm: LoadedModel) -> torch.Tensor:
        pb = PagedBatcher(4, 8)
        pb.add("p", ids.tolist())
        return ModelRunner(lm, block_size=4, num_blocks=8).execute(
            pb.batch({"p": 20}, all_logits=True)
        )

    lm = load_model(str(tiny_model_dir), quantization=mode)
    ids = torch.randint(3, lm.config.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    assert all(mm.packed for mm in lm.model.linears())  # the native path packs every layer
    native = logits(lm)
    lm.model.set_backend("torch")
    assert not any(mm.packed for mm in lm.model.linears())
    # int8: the native kernel multiplies this 20-row step's activations as 16-bit integers
    # (each within 1/65534 of its row's largest value), the torch path keeps them fp32
    # bf16: with AVX512_BF16, each activation within 2^-9 of itself (relative)
    kernels = native_kernels()
    bf16_rounded = mode == "bf16" and kernels is not None and kernels.bf16_dot_rows > 0
    tol = 2e-3 if mode == "int8" else 3e-2 if bf16_rounded else 1e-4
    torch.testing.assert_close(logits(lm), native, atol=tol, rtol=tol)
    lm.model.set_backend("auto")
    torch.testing.assert_close(logits(lm), native, atol=1e-5, rtol=1e-5)
    if mode in ("int8", "bf16"):  # weights off by <= half a step (of 1/127 of each row's range;
        # of bf16's 8-bit significand)
        base = logits(load_model(str(tiny_model_dir)))
        assert (native - base).abs().max() <= 0.05 * base.abs().max(), (native - base).abs().max()


def test_fp16_without_the_native_kernel_runs_on_fbgemm() -> None:
    """Where the native kernels cannot be built, fp16 weights are packed for fbgemm instead."""
    from llmos_worker.model.quant import Fp16PackedLinear, make_linear

    g = torch.Generator().manual_seed(7)
    weight, x = torch.randn(40, 24, generator=g), torch.randn(3, 24, generator=g)
    mm = make_linear(weight, "fp16", native=False)
    assert isinstance(mm, Fp16PackedLinear) and mm.nbytes == 40 * 24 * 2
    mm.pack()  # already packed its own way: a no-op
    expected = x @ weight.half().float().T
    torch.testing.assert_close(mm(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mm.dense(), weight.half().float())
