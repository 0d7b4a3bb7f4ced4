"""A PEFT adapter stored by `fetch-model --adapter` (plain and encrypted) serves exactly as the
PEFT directory it came from: the engine's greedy output through the stored copy equals PEFT's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos_worker.cli import main
from llmos_worker.engine import EngineConfig, LLMEngine, SamplingParams
from llmos_worker.model import load_model
from tests.worker.lora_util import hf_greedy, make_adapter

NEW_TOKENS = 8
PROMPTS = [[1, 500, 600, 700, 800, 900], [1, 4242, 17, 9000, 31, 77]]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.eval()  # type: ignore[no-untyped-call]
    peft_model = make_adapter(base, root / "sql", seed=7, r=4, alpha=8)
    return {"path": root / "sql", "expect": hf_greedy(peft_model, PROMPTS, NEW_TOKENS)}


def greedy(engine: LLMEngine, lora: str) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params, lora_name=lora)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_fetched_adapter_serves_like_the_peft_directory(
    tiny_model_dir: Path, adapter: dict[str, Any], tmp_path: Path, encrypted: bool
) -> None:
    dest, log = tmp_path / "lora-1", tmp_path / "termination-log"
    argv = ["fetch-model", "--adapter", "--source", str(adapter["path"]), "--dest", str(dest)]
    key_file = None
    if encrypted:
        key_file = str(tmp_path / "kek")
        Path(key_file).write_bytes(os.urandom(32).hex().encode())
        argv += ["--encrypt-key-file", key_file]
    assert main([*argv, "--termination-log", str(log)]) == 0
    result = json.loads(log.read_text())
    assert result["rank"] == 4 and result["encrypted"] is encrypted
    engine = LLMEngine(
        load_model(str(tiny_model_dir)),
        EngineConfig(
            kv_cache_memory_bytes=4 * 2**20,
            block_size=4,
            lora_modules={"sql": str(dest)},
            max_lora_rank=4,
            max_loras=1,
            lora_key_file=key_file,
        ),
    )
    assert greedy(engine, "sql") == adapter["expect"]
