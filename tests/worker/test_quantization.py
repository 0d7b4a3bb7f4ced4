"""Opt-in fp16 weights: quality against fp32 by perplexity, and the settings that refuse it.

The quality check scores a fixed English passage (tests/worker/data/perplexity.txt, written for
this test) with the bundled SmolLM2-135M-Instruct, fp32 against fp16-packed linear layers. The
stated bound: fp16 perplexity within 0.5 % of fp32 (measured: 0.01 %). The perplexity helper
itself is checked against Hugging Face's causal-LM loss on the tiny model.
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
FP16_BOUND = 0.005  # relative perplexity increase allowed for fp16 weights


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
def test_fp16_perplexity_within_bound(smollm2_gguf: Path, fp32_model: LoadedModel) -> None:
    fp16 = load_model(str(smollm2_gguf), quantization="fp16")
    assert fp16.quantization == "fp16"
    ids = fp32_model.tokenizer.encode(TEXT.read_text())
    assert len(ids) > 400
    base, packed = perplexity(fp32_model, ids), perplexity(fp16, ids)
    assert 1.0 < base < 100.0  # the real model on real English, not noise
    assert abs(packed - base) / base <= FP16_BOUND, (base, packed)
    # half the bytes for every decoder projection; the fp32 embedding lookup is kept and the
    # tied LM head gets its own fp16 copy
    embed = fp32_model.model.embed.numel() * 4
    decoder_fp32 = fp32_model.model.weight_bytes() - embed
    expected = embed + decoder_fp32 / 2 + embed / 2
    assert fp16.model.weight_bytes() == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
def test_fp16_engine_generates(smollm2_gguf: Path) -> None:
    """The packed model serves through the engine; its greedy text starts like fp32's."""
    from llmos_worker.engine import LLMEngine
    from llmos_worker.engine.params import SamplingParams

    outs = {}
    for mode in ("none", "fp16"):
        config = EngineConfig(kv_cache_memory_bytes=64 * 2**20, quantization=mode)  # type: ignore[arg-type]
        engine = LLMEngine.from_source(str(smollm2_gguf), config)
        prompt = engine.tokenizer.encode("The capital of France is")
        engine.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=8))
        while engine.has_unfinished():
            for out in engine.step():
                outs[mode] = out.outputs[0].token_ids
    assert len(outs["fp16"]) == 8
    assert outs["fp16"][:4] == outs["none"][:4]


def test_refused_settings(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs dtype float32"):
        load_model(str(tiny_model_dir), dtype="bfloat16", quantization="fp16")
    with pytest.raises(ModelLoadError, match="unknown quantization 'int4'"):
        load_model(str(tiny_model_dir), quantization="int4")
    with pytest.raises(ModelLoadError, match="CPU only"):
        load_model(str(tiny_model_dir), device="meta", quantization="fp16")
    with pytest.raises(InvalidRequestError) as info:
        EngineConfig(quantization="int8")  # type: ignore[arg-type]
    assert info.value.param == "quantization"
    with pytest.raises(InvalidRequestError, match="float32 on the cpu"):
        EngineConfig(quantization="fp16", dtype="bfloat16")


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
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        packed.model.quantize("int8")
