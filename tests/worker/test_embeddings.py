"""Embeddings in the engine: the final hidden state (after the last norm), mean-pooled over the
prompt and L2-normalized, equals Hugging Face's `last_hidden_state` pooled the same way on the
tiny random Llama; with the native kernels and the pure-torch path, prompts split into prefill
chunks, batched beside generation (whose tokens do not change), twice over the same prompt (the
prefix cache never skips a position), and a prompt too long for the model refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.errors import InvalidRequestError
from llmos_worker.model import load_model

PROMPTS = [
    [1, 500, 600, 700, 800, 900],
    [1, 42],
    [1, *range(3000, 3041)],  # 42 tokens: several blocks of 4 and, at 16 a step, three chunks
    [1, 500, 600, 700, 800, 900, 1000],  # shares a prefix with the first
]
EMBED = SamplingParams(embed=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path) -> list[torch.Tensor]:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(tiny_model_dir, dtype=torch.float32)
    hf.eval()
    out = []
    with torch.inference_mode():
        for ids in PROMPTS:
            hidden = hf(torch.tensor([ids])).last_hidden_state[0]  # (T, H), after the final norm
            out.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0))
    return out


@pytest.fixture(params=["auto", "torch"])
def backend(request: pytest.FixtureRequest, tiny: Any) -> Any:
    tiny.model.set_backend(request.param)
    yield request.param
    tiny.model.set_backend("auto")


def engine(tiny: Any, **cfg: Any) -> LLMEngine:
    cfg.setdefault("kv_cache_memory_bytes", 4 * 2**20)
    cfg.setdefault("block_size", 4)
    cfg.setdefault("max_num_batched_tokens", 16)
    return LLMEngine(tiny, EngineConfig(**cfg))


def run(eng: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, Any]:
    for i, (prompt, params) in enumerate(requests):
        eng.add_request(f"r{i}", prompt, params)
    done: dict[str, Any] = {}
    steps = 0
    while eng.has_unfinished():
        steps += 1
        assert steps < 1000
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert not eng.has_unfinished() and not eng.pooled
    return done


def test_embeddings_equal_transformers(
    tiny: Any, expected: list[torch.Tensor], backend: str
) -> None:
    eng = engine(tiny)
    done = run(eng, [(p, EMBED) for p in PROMPTS])
    for i, want in enumerate(expected):
        out = done[f"r{i}"]
        got = torch.tensor(out.embedding)
        assert out.outputs == [] and out.prompt_token_ids == PROMPTS[i]
        assert got.shape == want.shape
        assert torch.linalg.vector_norm(got).item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    # a whole prompt counts once its prefill is done; every block went back to the pool
    assert eng.stats().prompt_tokens == sum(len(p) for p in PROMPTS)
    assert eng.block_manager.num_free_blocks == eng.num_blocks


def test_embeddings_batched_with_generation(tiny: Any, expected: list[torch.Tensor]) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    alone = run(engine(tiny), [(PROMPTS[0], greedy)])["r0"].outputs[0].token_ids
    eng = engine(tiny)
    mixed = [(PROMPTS[0], greedy), (PROMPTS[2], EMBED), (PROMPTS[3], EMBED), (PROMPTS[1], greedy)]
    done = run(eng, mixed)
    assert done["r0"].outputs[0].token_ids == alone
    assert len(done["r3"].outputs[0].token_ids) == 8
    torch.testing.assert_close(torch.tensor(done["r1"].embedding), expected[2], atol=2e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(done["r2"].embedding), expected[3], atol=2e-4, rtol=0)


def test_the_same_prompt_twice_is_computed_whole(tiny: Any, expected: list[torch.Tensor]) -> None:
    eng = engine(tiny, enable_prefix_caching=True)
    first = run(eng, [(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=2))])
    assert first["r0"].finished
    again = run(eng, [(PROMPTS[2], EMBED), (PROMPTS[2], EMBED)])
    for rid in ("r0", "r1"):
        torch.testing.assert_close(
            torch.tensor(again[rid].embedding), expected[2], atol=2e-4, rtol=0
        )


def test_an_embedding_request_can_be_aborted(tiny: Any) -> None:
    eng = engine(tiny)
    eng.add_request("e", PROMPTS[2], EMBED)
    eng.step()  # the first chunk only
    eng.abort("e")
    assert not eng.has_unfinished() and not eng.pooled
    assert eng.block_manager.num_free_blocks == eng.num_blocks


def test_too_long_an_input_is_refused(tiny: Any) -> None:
    eng = engine(tiny, max_model_len=32)
    with pytest.raises(InvalidRequestError) as err:
        eng.add_request("e", PROMPTS[2], EMBED)
    assert err.value.param == "input"
    eng.add_request("ok", [1] * 32, EMBED)  # the whole context is allowed: nothing is sampled
    assert run(eng, [])["ok"].embedding is not None


@pytest.mark.slow
def test_bundled_model_embeddings_equal_transformers(smollm2_gguf: Path) -> None:
    from transformers import AutoModel

    loaded = load_model(str(smollm2_gguf), dtype="float32")
    texts = ["What is the capital of France?", "Paris is the capital of France.", "Bananas."]
    ids = [loaded.tokenizer.encode(t, add_special_tokens=True) for t in texts]
    eng = LLMEngine(loaded, EngineConfig(kv_cache_memory_bytes=32 * 2**20))
    done = run(eng, [(p, EMBED) for p in ids])
    got = torch.tensor([done[f"r{i}"].embedding for i in range(len(ids))])
    hf = AutoModel.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    with torch.inference_mode():
        want = torch.stack([hf(torch.tensor([p])).last_hidden_state[0].mean(dim=0) for p in ids])
    want = torch.nn.functional.normalize(want, dim=1)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    similarity = got @ got.T  # the related sentences are closer to each other than to the third
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[1, 2]
