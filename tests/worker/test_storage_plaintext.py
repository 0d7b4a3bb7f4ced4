"""Plaintext stays in memory: encrypted fetch, in-memory decryption, key rotation, crypto CLI.

The no-plaintext test points every temporary directory at the test's own folder, runs an
encrypted fetch and a decryption for the loader, then scans every file written there for
windows of the (random, hence unmistakable) plaintext.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from llmos_worker.cli import main
from llmos_worker.storage import (
    FetchRequest,
    IntegrityError,
    ModelMismatchError,
    StorageError,
    TruncatedError,
    WrongKeyError,
    fetch_model,
    open_decrypted,
    open_model_dir,
    open_model_source,
    read_manifest,
    resolve_model_dir,
)

CHUNK = 64 * 1024


def plaintext_windows(data: bytes, step: int = 4096, width: int = 32) -> list[bytes]:
    return [data[i : i + width] for i in range(0, len(data) - width, step)]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.fixture
def model_src(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "pvc" / "claim" / "llama"
    src.mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama", "secret": "'
        + os.urandom(8).hex().encode()
        + b'"}',
        "model.safetensors": os.urandom(2 * 1024 * 1024 + 7),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    return src, files


def write_key(path: Path) -> bytes:
    key = os.urandom(32)
    path.write_bytes(key.hex().encode() + b"\n")
    return key


def test_plaintext_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_src: tuple[Path, dict[str, bytes]]
) -> None:
    _, files = model_src
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    kek = write_key(tmp_path / "kek")
    dest = tmp_path / "volume"
    manifest = fetch_model(
        FetchRequest(
            "pvc://claim/llama", dest, kek=kek, pvc_root=tmp_path / "pvc", chunk_size=CHUNK
        )
    )
    assert manifest.encrypted and all(f.stored_as == f.name + ".enc" for f in manifest.files)
    with open_model_dir(dest, kek, expected_digest=manifest.digest) as path:
        assert path.parent == scratch  # safetensors: a link directory under the scratch root
        for name, data in files.items():
            assert (path / name).read_bytes() == data
            assert os.readlink(path / name).startswith(f"/proc/{os.getpid()}/fd/")
        written = files_under(dest) + files_under(scratch)
    assert written and not list(scratch.iterdir())  # the link directory is gone afterwards
    windows = plaintext_windows(files["model.safetensors"])
    for path in written:
        blob = path.read_bytes()
        assert not any(w in blob for w in windows), path
        assert files["config.json"] not in blob, path


def test_open_decrypted_is_a_sealed_memfd(tmp_path: Path) -> None:
    kek = os.urandom(32)
    data = b"GGUF" + os.urandom(300_000)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_bytes(data)
    fetch_model(
        FetchRequest(
            "pvc://src/m.gguf", tmp_path / "d", kek=kek, pvc_root=tmp_path, chunk_size=CHUNK
        )
    )
    enc = tmp_path / "d" / "m.gguf.enc"
    with open_decrypted(enc, kek, expected_file_id="m.gguf") as path:
        assert os.readlink(path).startswith("/memfd:")
        assert path.read_bytes() == data
        fd = os.open(path, os.O_RDWR)
        try:  # sealed: neither written nor resized by anyone
            with pytest.raises(PermissionError):
                os.write(fd, b"x")
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 10)
        finally:
            os.close(fd)
    with open_decrypted(enc, kek, link_name="model.gguf") as path:
        assert path.name == "model.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert not path.exists()


def test_refusals_before_the_loader_sees_anything(tmp_path: Path) -> None:
    kek = os.urandom(32)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_bytes(b"GGUF" + os.urandom(500_000))
    dest = tmp_path / "d"
    manifest = fetch_model(
        FetchRequest("pvc://src/m.gguf", dest, kek=kek, pvc_root=tmp_path, chunk_size=CHUNK)
    )
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(WrongKeyError), open_model_dir(dest, os.urandom(32)):
        pass
    with pytest.raises(ModelMismatchError), open_model_dir(dest, kek, expected_digest="5" * 64):
        pass
    with pytest.raises(StorageError, match="key file is needed"), open_model_dir(dest):
        pass
    enc = dest / "m.gguf.enc"
    blob = enc.read_bytes()
    enc.write_bytes(blob[: len(blob) - 10])
    with pytest.raises(TruncatedError), open_model_dir(dest, kek):
        pass
    enc.write_bytes(blob[:200] + bytes([blob[200] ^ 4]) + blob[201:])
    with pytest.raises(IntegrityError), open_model_dir(dest, kek):
        pass
    assert len(os.listdir("/proc/self/fd")) == fds_before  # no memfd left open
    assert resolve_model_dir(dest).manifest == manifest


def test_plain_model_dir_is_rehashed(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_bytes(b"GGUF" + bytes(1000))
    fetch_model(FetchRequest("pvc://src/m.gguf", tmp_path / "d", pvc_root=tmp_path))
    (tmp_path / "d" / "m.gguf").write_bytes(b"GGUF" + bytes(999) + b"!")
    with pytest.raises(StorageError, match="manifest says"), open_model_dir(tmp_path / "d"):
        pass


def test_crypto_cli_round_trip_and_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_src: tuple[Path, dict[str, bytes]]
) -> None:
    src, files = model_src
    old, new = write_key(tmp_path / "old"), write_key(tmp_path / "new")
    plain = src / "model.safetensors"
    enc = tmp_path / "model.safetensors.enc"
    key_old, key_new = f"--key-file={tmp_path / 'old'}", f"--key-file={tmp_path / 'new'}"
    assert (
        main(["encrypt-model", f"--in={plain}", f"--out={enc}", key_old, "--chunk-size=65536"]) == 0
    )
    assert main(["verify-model", str(enc), key_old]) == 0
    assert "chunks authenticated" in capsys.readouterr().out
    assert main(["verify-model", str(enc), key_new]) == 1
    assert "wrong key" in capsys.readouterr().err
    assert main(["verify-model", str(enc), key_old, "--model-digest=" + "6" * 64]) == 1
    rotate = [f"--old-key-file={tmp_path / 'old'}", f"--new-key-file={tmp_path / 'new'}"]
    assert main(["rewrap-key", str(enc), *rotate]) == 0
    assert main(["rewrap-key", str(enc), *rotate]) == 0  # retried: already done
    assert main(["verify-model", str(enc), key_new]) == 0
    assert main(["verify-model", str(enc), key_old]) == 1
    assert main(["verify-model", str(plain), key_new]) == 1
    assert "bad magic" in capsys.readouterr().err
    assert main(["verify-model", str(enc), f"--key-file={tmp_path / 'absent'}"]) == 1
    with open_decrypted(enc, new) as path:
        assert path.read_bytes() == files["model.safetensors"]
    del old


def test_directory_rotation_keeps_the_model_loadable_with_the_new_key_only(
    tmp_path: Path, model_src: tuple[Path, dict[str, bytes]]
) -> None:
    _, files = model_src
    old, new = write_key(tmp_path / "old"), write_key(tmp_path / "new")
    dest = tmp_path / "volume"
    fetch_model(FetchRequest("pvc://claim/llama", dest, kek=old, pvc_root=tmp_path / "pvc"))
    rotate = [f"--old-key-file={tmp_path / 'old'}", f"--new-key-file={tmp_path / 'new'}"]
    assert main(["rewrap-key", str(dest), *rotate]) == 0
    assert main(["verify-model", str(dest), f"--key-file={tmp_path / 'new'}"]) == 0
    with open_model_dir(dest, new) as path:
        assert {n: (path / n).read_bytes() for n in files} == files
    with pytest.raises(WrongKeyError), open_model_dir(dest, old):
        pass
    assert read_manifest(dest).encrypted


def test_open_model_source_for_the_serve_command(tmp_path: Path) -> None:
    kek = write_key(tmp_path / "kek")
    data = b"GGUF" + os.urandom(100_000)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_bytes(data)
    plain = tmp_path / "plain"
    sealed = tmp_path / "sealed"
    fetch_model(FetchRequest(str(tmp_path / "src" / "m.gguf"), plain))
    digest = fetch_model(FetchRequest(str(tmp_path / "src" / "m.gguf"), sealed, kek=kek)).digest
    key = str(tmp_path / "kek")
    with open_model_source("builtin://smollm2-135m-instruct") as source:
        assert source == "builtin://smollm2-135m-instruct"
    with open_model_source(str(plain)) as source:
        assert source == str(plain / "m.gguf")
    with open_model_source(str(sealed), key_file=key, expected_digest=digest) as source:
        assert Path(source).name == "m.gguf" and Path(source).read_bytes() == data
    with open_model_source(str(sealed / "m.gguf.enc"), key_file=key) as source:
        assert Path(source).name == "m.gguf" and Path(source).read_bytes() == data
    with pytest.raises(StorageError, match="key file is needed"), open_model_source(str(sealed)):
        pass
    with (
        pytest.raises(ModelMismatchError),
        open_model_source(str(sealed), key_file=key, expected_digest="7" * 64),
    ):
        pass
