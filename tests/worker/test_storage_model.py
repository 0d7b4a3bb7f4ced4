"""Encrypted models really load: fetch encrypted, decrypt into memory, `load_model` the result.

The tiny random Llama (HF directory, loads in well under a second) is fetched through `pvc://`
encrypted, loaded from memfds and compared tensor by tensor with the plain load; after key
rotation it loads with the new key only. The slow test does the same with the bundled GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llmos_worker.model import load_model
from llmos_worker.storage import (
    FetchRequest,
    IntegrityError,
    WrongKeyError,
    fetch_model,
    open_model_dir,
    rewrap,
)

CHUNK = 256 * 1024


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_encrypted_tiny_model_loads_and_rotates(tiny_model_dir: Path, tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    dest = tmp_path / "volume"
    manifest = fetch_model(
        FetchRequest(
            f"pvc://{tiny_model_dir.name}",
            dest,
            kek=old,
            pvc_root=tiny_model_dir.parent,
            chunk_size=CHUNK,
        )
    )
    assert manifest.format == "safetensors" and manifest.encrypted
    assert not list(dest.glob("*.safetensors")) and list(dest.glob("*.safetensors.enc"))
    plain = load_model(str(tiny_model_dir))
    with open_model_dir(dest, old, expected_digest=manifest.digest) as path:
        loaded = load_model(str(path))
    assert loaded.config == plain.config and same_weights(loaded.model, plain.model)
    assert loaded.tokenizer.encode("hello world") == plain.tokenizer.encode("hello world")

    for f in manifest.files:
        rewrap(dest / f.disk_name, old, new)
    with open_model_dir(dest, new) as path:
        assert same_weights(load_model(str(path)).model, plain.model)
    with pytest.raises(WrongKeyError), open_model_dir(dest, old):
        pass

    weights = next(dest.glob("*.safetensors.enc"))
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x80
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError), open_model_dir(dest, new):
        pass


@pytest.mark.slow
def test_encrypted_bundled_gguf_loads_from_memory(tmp_path: Path) -> None:
    kek = os.urandom(32)
    dest = tmp_path / "volume"
    manifest = fetch_model(FetchRequest("builtin://smollm2-135m-instruct", dest, kek=kek))
    (entry,) = manifest.files
    assert (dest / entry.disk_name).stat().st_size > entry.size_bytes
    with open_model_dir(dest, kek, expected_digest=manifest.digest) as path:
        assert path.name == entry.name and os.readlink(path).startswith("/proc/")
        loaded = load_model(str(path))
    assert loaded.config.num_layers == 30 and loaded.config.vocab_size == 49152
    ids = loaded.tokenizer.encode("The capital of France is")
    assert loaded.tokenizer.decode(ids) == "The capital of France is"
