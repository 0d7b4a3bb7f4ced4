"""`fetch-model --adapter`: PEFT adapter directories from a volume, https and an hf mirror;
digests, checks, encryption, and that what is stored opens as the worker's adapter reader opens it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import httpx
import pytest

from llmos_worker.cli import main
from llmos_worker.storage import (
    DigestMismatchError,
    FetchRequest,
    SourceError,
    fetch_model,
    read_manifest,
)
from llmos_worker.storage.plaintext import open_model_source

CONFIG = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}).encode()


def safetensors(payload: int = 4096) -> bytes:
    header = json.dumps(
        {"x.lora_A.weight": {"dtype": "F32", "shape": [payload // 4], "data_offsets": [0, payload]}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + os.urandom(payload)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_of(files: dict[str, bytes]) -> str:
    # what `sha256sum adapter_config.json adapter_model.safetensors | sha256sum` prints
    listing = "".join(f"{sha(files[n])}  {n}\n" for n in sorted(files))
    return sha(listing.encode())


def adapter_dir(root: Path, weights: bytes | None = None) -> dict[str, bytes]:
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": weights or safetensors()}
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "README.md").write_bytes(b"# trained on things\n")  # not part of the adapter
    return files


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_pvc_adapter_directory_stored_with_its_digest(tmp_path: Path) -> None:
    files = adapter_dir(tmp_path / "pvc" / "adapters" / "sql")
    dest = tmp_path / "dest"
    manifest = fetch_model(
        FetchRequest("pvc://adapters/sql", dest, pvc_root=tmp_path / "pvc", adapter=True)
    )
    assert manifest.format == "peft-lora" and not manifest.encrypted
    assert [f.name for f in manifest.files] == sorted(files)  # the README is left out
    assert manifest.digest == digest_of(files)
    assert manifest.size_bytes == sum(len(v) for v in files.values())
    assert manifest.extra["rank"] == 8
    assert read_manifest(dest).digest == manifest.digest
    with open_model_source(str(dest)) as plain:
        assert {n: (Path(plain) / n).read_bytes() for n in files} == files
    with pytest.raises(DigestMismatchError):
        fetch_model(
            FetchRequest(
                "pvc://adapters/sql",
                tmp_path / "d2",
                pvc_root=tmp_path / "pvc",
                sha256="3" * 64,
                adapter=True,
            )
        )
    assert leftovers(tmp_path / "d2") == []


def test_encrypted_adapter_opens_with_the_key_only(tmp_path: Path) -> None:
    files = adapter_dir(tmp_path / "src")
    key = os.urandom(32)
    (tmp_path / "kek").write_bytes(key.hex().encode())
    dest = tmp_path / "dest"
    manifest = fetch_model(
        FetchRequest(str(tmp_path / "src"), dest, kek=key, adapter=True, sha256=digest_of(files))
    )
    assert manifest.encrypted
    stored = {p.name: p.read_bytes() for p in dest.iterdir() if p.name != "manifest.json"}
    assert sorted(stored) == ["adapter_config.json.enc", "adapter_model.safetensors.enc"]
    assert all(files[n.removesuffix(".enc")] not in data for n, data in stored.items())
    with open_model_source(str(dest), key_file=str(tmp_path / "kek")) as plain:
        assert {n: (Path(plain) / n).read_bytes() for n in files} == files
    other = tmp_path / "other"
    other.write_bytes(os.urandom(32).hex().encode())
    with pytest.raises(Exception, match="key"), open_model_source(str(dest), key_file=str(other)):
        pass


def _transport(files: dict[str, bytes], prefix: str) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith(prefix) and path.removeprefix(prefix) in files:
            return httpx.Response(200, content=files[path.removeprefix(prefix)])
        return httpx.Response(404)

    return httpx.MockTransport(handler)


def test_https_directory_url(tmp_path: Path) -> None:
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": safetensors()}
    transport = _transport(files, "/adapters/sql/")
    req = FetchRequest(
        "https://files.example/adapters/sql/",
        tmp_path / "dest",
        sha256=digest_of(files),
        adapter=True,
        transport=transport,
    )
    assert fetch_model(req).digest == digest_of(files)
    with pytest.raises(SourceError, match="sha256 is required"):
        fetch_model(
            FetchRequest("https://files.example/adapters/sql", tmp_path / "x", adapter=True)
        )
    bad = FetchRequest(
        "https://files.example/adapters/sql",
        tmp_path / "d2",
        sha256="4" * 64,
        adapter=True,
        transport=transport,
    )
    with pytest.raises(DigestMismatchError):
        fetch_model(bad)
    assert leftovers(tmp_path / "d2") == []


def test_hf_mirror_revision_and_subdirectory(tmp_path: Path) -> None:
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": safetensors()}
    req = FetchRequest(
        "hf://org/loras@rev1/sql",
        tmp_path / "dest",
        sha256=digest_of(files),
        adapter=True,
        hf_mirror="https://mirror.example/hf",
        transport=_transport(files, "/hf/org/loras/resolve/rev1/sql/"),
    )
    assert fetch_model(req).source == "hf://org/loras@rev1/sql"
    with pytest.raises(SourceError, match="mirror"):
        fetch_model(
            FetchRequest("hf://org/loras@rev1", tmp_path / "x", sha256="1" * 64, adapter=True)
        )


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        (b"{not json", safetensors(), "not JSON"),
        (json.dumps({"peft_type": "PREFIX_TUNING", "r": 8}).encode(), safetensors(), "only LORA"),
        (json.dumps({"peft_type": "LORA", "r": 0}).encode(), safetensors(), "positive integer"),
        (CONFIG, b"<html>404</html>", "not safetensors"),
        (CONFIG, b"tiny", "too short"),
    ],
)
def test_bad_adapters_are_refused_and_leave_nothing(
    tmp_path: Path, config: bytes, weights: bytes, message: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_bytes(config)
    (src / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(SourceError, match=message):
        fetch_model(FetchRequest(str(src), tmp_path / "dest", adapter=True))
    assert leftovers(tmp_path / "dest") == []


def test_not_an_adapter_directory(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.safetensors").write_bytes(safetensors())
    with pytest.raises(SourceError, match="not a PEFT adapter directory"):
        fetch_model(FetchRequest(str(tmp_path / "src"), tmp_path / "dest", adapter=True))
    with pytest.raises(SourceError, match="no builtin adapters"):
        fetch_model(FetchRequest("builtin://smollm2-135m-instruct", tmp_path / "d", adapter=True))
    with pytest.raises(SourceError, match="--format"):
        fetch_model(
            FetchRequest(str(tmp_path / "src"), tmp_path / "d", adapter=True, format="gguf")
        )


def test_cli_adapter_writes_the_termination_log(tmp_path: Path) -> None:
    files = adapter_dir(tmp_path / "pvc" / "c" / "lora")
    log = tmp_path / "termination-log"
    rc = main(
        [
            "fetch-model",
            "--adapter",
            "--source",
            "pvc://c/lora",
            "--pvc-root",
            str(tmp_path / "pvc"),
            "--dest",
            str(tmp_path / "dest"),
            "--version",
            "3",
            "--termination-log",
            str(log),
        ]
    )
    assert rc == 0
    result = json.loads(log.read_text())
    assert result["digest"] == digest_of(files) and result["format"] == "peft-lora"
    assert result["version"] == "3" and result["sizeBytes"] == sum(map(len, files.values()))


def test_rewrap_key_rotates_the_model_and_its_adapters_in_one_run(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    (tmp_path / "old").write_bytes(old.hex().encode())
    (tmp_path / "new").write_bytes(new.hex().encode())
    files = adapter_dir(tmp_path / "src")
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + os.urandom(1000))
    fetch_model(FetchRequest(str(tmp_path / "model.gguf"), tmp_path / "v-1", kek=old))
    fetch_model(FetchRequest(str(tmp_path / "src"), tmp_path / "lora-1", kek=old, adapter=True))
    rotate = ["--old-key-file", str(tmp_path / "old"), "--new-key-file", str(tmp_path / "new")]
    paths = [str(tmp_path / "v-1"), str(tmp_path / "lora-1")]
    assert main(["rewrap-key", *paths, *rotate]) == 0
    assert main(["rewrap-key", *paths, *rotate]) == 0  # a retried Job finds it done
    with open_model_source(str(tmp_path / "lora-1"), key_file=str(tmp_path / "new")) as plain:
        assert (Path(plain) / "adapter_model.safetensors").read_bytes() == files[
            "adapter_model.safetensors"
        ]
    with open_model_source(str(tmp_path / "v-1"), key_file=str(tmp_path / "new")) as plain:
        assert Path(plain).read_bytes().startswith(b"GGUF")
    # a path that is no encrypted model fails the run before anything changes
    assert main(["rewrap-key", paths[0], str(tmp_path / "src"), *rotate]) == 1
