"""Encrypted model files: round trips and every attack the format must detect, each by its error."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from llmos_worker.storage import (
    EncryptedFormatError,
    IntegrityError,
    KeyFileError,
    ModelMismatchError,
    TruncatedError,
    WrongKeyError,
    encrypt_file,
    iter_decrypted,
    load_key,
    parse_key,
    read_header,
    rewrap,
    verify_file,
)
from llmos_worker.storage.crypto import TAG_BYTES, Header

CHUNK = 64 * 1024


@pytest.fixture
def kek() -> bytes:
    return os.urandom(32)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def decrypt(path: Path, kek: bytes, **expect: str) -> bytes:
    with open(path, "rb") as f:
        return b"".join(iter_decrypted(f, kek, **expect))  # type: ignore[arg-type]


def encrypted(tmp_path: Path, kek: bytes, data: bytes, name: str = "model.gguf", **kw: str) -> Path:
    src = write(tmp_path / name, data)
    dst = tmp_path / f"{name}.enc"
    encrypt_file(src, dst, kek, chunk_size=CHUNK, **kw)  # type: ignore[arg-type]
    return dst


def header_of(path: Path) -> Header:
    with open(path, "rb") as f:
        return read_header(f)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 17, 2_000_003])
def test_round_trip(tmp_path: Path, kek: bytes, size: int) -> None:
    data = os.urandom(size)
    dst = encrypted(tmp_path, kek, data)
    header = header_of(dst)
    assert header.plaintext_size == size
    assert header.model_digest == hashlib.sha256(data).hexdigest()
    assert header.file_id == "model.gguf"
    assert dst.stat().st_size == header.encrypted_size
    assert decrypt(dst, kek) == data
    assert verify_file(dst, kek, expected_model_digest=header.model_digest).num_chunks == max(
        1, -(-size // CHUNK)
    )


def test_ciphertext_hides_plaintext_and_nonces_differ(tmp_path: Path, kek: bytes) -> None:
    data = bytes(4 * CHUNK)  # zeros: identical chunks must still encrypt differently
    dst = encrypted(tmp_path, kek, data)
    blob = dst.read_bytes()
    h = header_of(dst).header_len
    records = [
        blob[h + i * (CHUNK + TAG_BYTES) : h + (i + 1) * (CHUNK + TAG_BYTES)] for i in range(4)
    ]
    assert len(set(records)) == 4
    assert bytes(64) not in blob[h:]
    again = encrypted(tmp_path, kek, data, name="again.gguf")
    assert again.read_bytes()[-100:] != blob[-100:]  # fresh data key and nonce prefix per file


@pytest.mark.parametrize(
    "where",
    ["static header", "first chunk", "middle chunk", "last tag", "wrapped key", "plaintext size"],
)
def test_flipped_bit_detected(tmp_path: Path, kek: bytes, where: str) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(5 * CHUNK + 100))
    header = header_of(dst)
    offsets = {
        "static header": 30,  # inside the model digest
        "first chunk": header.header_len + 5,
        "middle chunk": header.header_len + 2 * (CHUNK + TAG_BYTES) + 999,
        "last tag": dst.stat().st_size - 1,
        "wrapped key": header.mutable_offset + 20,
        "plaintext size": header.mutable_offset + 7,
    }
    blob = bytearray(dst.read_bytes())
    blob[offsets[where]] ^= 0x01
    dst.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        decrypt(dst, kek)


def test_truncated_mid_chunk(tmp_path: Path, kek: bytes) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(4 * CHUNK))
    blob = dst.read_bytes()
    dst.write_bytes(blob[: len(blob) - CHUNK // 2])
    with pytest.raises(TruncatedError, match="truncated"):
        verify_file(dst, kek)


def test_truncated_at_chunk_boundary_even_with_header_patched(tmp_path: Path, kek: bytes) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(4 * CHUNK))
    header = header_of(dst)
    blob = bytearray(dst.read_bytes())
    cut = header.header_len + 2 * (CHUNK + TAG_BYTES)  # keep chunks 0 and 1
    del blob[cut:]
    # the attacker also rewrites the (unauthenticated-looking) plaintext size to match
    blob[header.mutable_offset : header.mutable_offset + 8] = struct.pack(">Q", 2 * CHUNK)
    dst.write_bytes(bytes(blob))
    with pytest.raises(TruncatedError, match="not the last"):
        verify_file(dst, kek)


def test_truncated_inside_header(tmp_path: Path, kek: bytes) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(100))
    dst.write_bytes(dst.read_bytes()[:60])
    with pytest.raises(TruncatedError):
        verify_file(dst, kek)


def test_reordered_chunks(tmp_path: Path, kek: bytes) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(4 * CHUNK))
    header = header_of(dst)
    blob = dst.read_bytes()
    h, r = header.header_len, CHUNK + TAG_BYTES
    records = [blob[h + i * r : h + (i + 1) * r] for i in range(4)]
    records[1], records[2] = records[2], records[1]
    dst.write_bytes(blob[:h] + b"".join(records))
    with pytest.raises(IntegrityError, match="chunk 1 of 4") as info:
        verify_file(dst, kek)
    assert type(info.value) is IntegrityError


def test_appended_bytes(tmp_path: Path, kek: bytes) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(CHUNK))
    dst.write_bytes(dst.read_bytes() + b"extra")
    with pytest.raises(IntegrityError, match="unexpected bytes"):
        verify_file(dst, kek)


def test_swapped_files_between_models(tmp_path: Path, kek: bytes) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    enc_a = encrypted(tmp_path / "a", kek, os.urandom(2 * CHUNK))
    enc_b = encrypted(tmp_path / "b", kek, os.urandom(2 * CHUNK))
    digest_a = header_of(enc_a).model_digest
    # model B's file put where model A's is expected: intact, but not model A's
    with pytest.raises(ModelMismatchError, match="belongs to model"):
        verify_file(enc_b, kek, expected_model_digest=digest_a, expected_file_id="model.gguf")
    # and a file header of A spliced onto B's chunks fails authentication
    ha = header_of(enc_a).header_len
    enc_b.write_bytes(enc_a.read_bytes()[:ha] + enc_b.read_bytes()[ha:])
    with pytest.raises(IntegrityError):
        verify_file(enc_b, kek)


def test_swapped_files_within_a_model(tmp_path: Path, kek: bytes) -> None:
    digest = "ab" * 32  # both shards of one model bind the same model digest
    one = encrypted(
        tmp_path, kek, os.urandom(CHUNK), name="shard-1.safetensors", model_digest=digest
    )
    two = encrypted(
        tmp_path, kek, os.urandom(CHUNK), name="shard-2.safetensors", model_digest=digest
    )
    with pytest.raises(ModelMismatchError, match="is file 'shard-2"):
        verify_file(two, kek, expected_model_digest=digest, expected_file_id="shard-1.safetensors")
    # a chunk moved from one shard into the other fails even without expectations
    h1, h2 = header_of(one).header_len, header_of(two).header_len
    one.write_bytes(one.read_bytes()[:h1] + two.read_bytes()[h2:])
    with pytest.raises(IntegrityError):
        verify_file(one, kek)


def test_wrong_key(tmp_path: Path, kek: bytes) -> None:
    dst = encrypted(tmp_path, kek, os.urandom(1000))
    with pytest.raises(WrongKeyError, match="wrong key"):
        verify_file(dst, os.urandom(32))


def test_not_an_encrypted_file(tmp_path: Path, kek: bytes) -> None:
    plain = write(tmp_path / "model.gguf", b"GGUF" + os.urandom(500))
    with pytest.raises(EncryptedFormatError, match="bad magic"):
        verify_file(plain, kek)
    dst = encrypted(tmp_path, kek, b"x")
    blob = bytearray(dst.read_bytes())
    blob[9] = 9  # format version 9
    dst.write_bytes(bytes(blob))
    with pytest.raises(EncryptedFormatError, match="version 9"):
        verify_file(dst, kek)


def test_rewrap_changes_only_the_key_header(tmp_path: Path, kek: bytes) -> None:
    data = os.urandom(3 * CHUNK + 5)
    dst = encrypted(tmp_path, kek, data)
    before = dst.read_bytes()
    new = os.urandom(32)
    header = rewrap(dst, kek, new)
    after = dst.read_bytes()
    assert len(after) == len(before)
    changed = [i for i in range(len(before)) if before[i] != after[i]]
    assert changed and header.mutable_offset + 8 <= min(changed) <= max(changed) < header.header_len
    assert decrypt(dst, new) == data
    with pytest.raises(WrongKeyError):
        verify_file(dst, kek)
    assert rewrap(dst, kek, new).key_id == header.key_id  # retried rotation: a no-op
    assert dst.read_bytes() == after
    with pytest.raises(WrongKeyError):
        rewrap(dst, os.urandom(32), os.urandom(32))
    assert dst.read_bytes() == after


@pytest.mark.parametrize("form", ["raw", "hex", "base64", "hex+newline"])
def test_key_file_forms(tmp_path: Path, form: str) -> None:
    import base64

    key = os.urandom(32)
    text = {
        "raw": key,
        "hex": key.hex().encode(),
        "base64": base64.b64encode(key),
        "hex+newline": key.hex().encode() + b"\n",
    }[form]
    assert load_key(write(tmp_path / "k", text)) == key


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_key(tmp_path / "missing")
    with pytest.raises(KeyFileError, match="256-bit"):
        parse_key(b"too short")
    with pytest.raises(KeyFileError, match="256-bit"):
        parse_key(os.urandom(31))
