"""Model sources: resolution (builtin, GGUF by magic, HF and fetch-model directories) and errors.

Every bad source must raise ModelLoadError with a message naming the problem, never a bare
KeyError / struct.error from deep inside a reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmos_worker.errors import ModelLoadError
from llmos_worker.model import ModelConfig, load_model, resolve_source
from llmos_worker.model.gguf_file import GGUFFile


def write_gguf(path: Path, arch: str = "llama", *, truncate: bool = False) -> Path:
    """A small GGUF with one F32 tensor (enough for header/arch checks)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 64])
    return path


def test_resolve_builtin(smollm2_gguf: Path) -> None:
    kind, path, name = resolve_source("builtin://smollm2-135m-instruct")
    assert (kind, Path(path), name) == ("gguf", smollm2_gguf, "smollm2-135m-instruct")


def test_resolve_gguf_by_magic_not_extension(tmp_path: Path) -> None:
    plain = write_gguf(tmp_path / "weights.bin")
    assert resolve_source(str(plain))[:2] == ("gguf", str(plain))
    named = write_gguf(tmp_path / "m.gguf")
    assert resolve_source(str(named)) == ("gguf", str(named), "m")


def test_resolve_fetch_model_dirs(tmp_path: Path, tiny_model_dir: Path) -> None:
    gguf_dir = tmp_path / "fetched-gguf"
    gguf_dir.mkdir()
    (gguf_dir / "manifest.json").write_text("{}")
    write_gguf(gguf_dir / "model.gguf")
    assert resolve_source(str(gguf_dir)) == ("gguf", str(gguf_dir / "model.gguf"), "fetched-gguf")
    hf_dir = shutil.copytree(tiny_model_dir, tmp_path / "fetched-hf")
    (hf_dir / "manifest.json").write_text("{}")
    assert resolve_source(str(hf_dir))[:2] == ("hf", str(hf_dir))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("builtin://no-such-model", "unknown builtin model"),
        ("s3://bucket/model.gguf", "unsupported model source"),
        ("/nonexistent/model.gguf", "does not exist"),
    ],
)
def test_bad_sources(source: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(bogus))


def test_directory_problems(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="neither a"):
        load_model(str(tmp_path))
    write_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        load_model(str(tmp_path))


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        load_model(str(write_gguf(tmp_path / "gpt2.gguf", "gpt2")))


def test_truncated_gguf(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "cut.gguf", truncate=True)
    with GGUFFile(str(path)) as gf, pytest.raises(ModelLoadError, match="truncated"):
        gf.load("token_embd.weight")


def test_unsupported_hf_architecture(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = shutil.copytree(tiny_model_dir, tmp_path / "gpt2")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported model architecture 'gpt2'"):
        load_model(str(bad))


def test_missing_weights_and_bad_dtype(tmp_path: Path, tiny_model_dir: Path) -> None:
    bare = shutil.copytree(tiny_model_dir, tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(str(bare))
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        load_model(str(tiny_model_dir), dtype="int3")


def test_incomplete_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    part = shutil.copytree(tiny_model_dir, tmp_path / "part")
    tensors = load_file(part / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, part / "model.safetensors")
    with pytest.raises(ModelLoadError, match="covers"):
        load_model(str(part))


def test_hf_directory_load(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    assert loaded.name == tiny_model_dir.name
    assert loaded.config.num_kv_heads == 2 and not loaded.config.tie_word_embeddings
    assert loaded.tokenizer.eos_token_ids == {2}
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert loaded.tokenizer.decode(ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )
    assert loaded.model.embed.dtype == torch.float32


def test_rope_scaling_parsed() -> None:
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    cfg = ModelConfig.from_hf_config(
        {
            **base,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn'"):
        ModelConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(ModelLoadError, match="attention_bias"):
        ModelConfig.from_hf_config({**base, "attention_bias": True})
    with pytest.raises(ModelLoadError, match="sliding_window"):
        ModelConfig.from_hf_config({**base, "model_type": "mistral", "sliding_window": 64})
    with pytest.raises(ModelLoadError, match="num_kv_heads"):
        ModelConfig.from_hf_config({**base, "num_key_value_heads": 3})
