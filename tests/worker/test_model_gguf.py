"""The bundled SmolLM2-135M GGUF through our loader against transformers' own GGUF loader.

Both dequantise the same Q4_1/Q8_0 weights; ours also undoes llama.cpp's Q/K row permutation.
Next-token logits of chat prompts must agree, and a 16-token greedy continuation driven through
hand-built paged ForwardBatches (both prompts in one batch) must be token-for-token identical
to HF's greedy choice.
Loading the HF reference takes ~30 s, so it is loaded once per module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llmos_worker.model import (
    LoadedModel,
    ModelConfig,
    ModelRunner,
    Tokenizer,
    load_model,
    resolve_source,
)
from llmos_worker.model.gguf_file import GGUFFile
from tests.worker.tiny import PagedBatcher

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write a haiku about paged memory and GPUs."},
    ],
]


@pytest.fixture(scope="module")
def ours() -> LoadedModel:
    return load_model("builtin://smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf_gguf(smollm2_gguf: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_config_from_gguf(ours: LoadedModel) -> None:
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.head_dim == 64
    assert ours.name == "smollm2-135m-instruct"
    assert 2 in ours.tokenizer.eos_token_ids and ours.tokenizer.has_chat_template


def test_logits_and_greedy_match_transformers(ours: LoadedModel, hf_gguf: torch.nn.Module) -> None:
    prompts = [ours.tokenizer.apply_chat_template(c) for c in CHATS]
    runner = ModelRunner(ours, block_size=16, num_blocks=32)
    pb = PagedBatcher(16, 32)
    for i, p in enumerate(prompts):
        pb.add(str(i), p)

    logits = runner.execute(pb.batch({str(i): len(p) for i, p in enumerate(prompts)}))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_gguf(torch.tensor([p])).logits[0, -1].float()
        torch.testing.assert_close(logits[i], ref, atol=2e-3, rtol=1e-3)

    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(16):
        for i, row in enumerate(logits):
            token = int(row.argmax())
            generated[i].append(token)
            pb.append(str(i), token)
        logits = runner.execute(pb.batch({str(i): 1 for i in range(len(prompts))}))

    # HF greedy would produce the same continuation iff, at every generated position, its
    # argmax over our sequence so far is our token (induction); one HF forward per prompt.
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf_gguf(torch.tensor([p + generated[i]])).logits[0].float()
        hf_choice = ref[len(p) - 1 : -1].argmax(-1).tolist()
        assert generated[i] == hf_choice, ours.tokenizer.decode(generated[i])


def test_loads_from_memfd_path(smollm2_gguf: Path, ours: LoadedModel) -> None:
    """Decrypted weights arrive as /proc/self/fd/N of an in-memory file: no extension, no disk.

    Checks each piece `load_model` uses on such a path (resolution by magic, header, tensors,
    tokenizer) without paying for a second full load.
    """
    fd = os.memfd_create("weights")
    try:
        with open(smollm2_gguf, "rb") as f:
            while chunk := f.read(1 << 24):
                os.write(fd, chunk)
        path = f"/proc/self/fd/{fd}"
        kind, resolved, _name = resolve_source(path)
        assert (kind, resolved) == ("gguf", path)
        with GGUFFile(path) as gf:
            config = ModelConfig.from_gguf_metadata(gf.metadata, set(gf.tensors), 0)
            embed = gf.load("token_embd.weight")
        assert config == ours.config
        torch.testing.assert_close(embed, ours.model.embed)
        tokenizer = Tokenizer.from_gguf(path)
        text = "paged attention, 12345 <|im_end|>"
        assert tokenizer.encode(text) == ours.tokenizer.encode(text)
        assert tokenizer.hf.chat_template == ours.tokenizer.hf.chat_template
    finally:
        os.close(fd)
