"""API key authentication: hashed storage, tenants, malformed headers and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos_worker.server.auth import ApiKeyAuth, ApiKeyFileError, Principal, hash_key


def write_keys(tmp_path: Path, entries: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    return path


def test_keys_map_to_tenants(tmp_path: Path) -> None:
    path = write_keys(
        tmp_path,
        {
            "keys": [
                {"tenant": "a", "sha256": hash_key("key-a")},
                {"tenant": "b", "sha256": hash_key("key-b").upper()},
            ]
        },
    )
    auth = ApiKeyAuth.from_file(path)
    assert auth.authenticate("Bearer key-a") == Principal("a")
    assert auth.authenticate("bearer key-b") == Principal("b")
    assert "key-a" not in path.read_text()


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic key-a", "key-a", "Bearer key-c", "Bearer key-a2"],
)
def test_rejected_headers(tmp_path: Path, header: str | None) -> None:
    auth = ApiKeyAuth.from_file(
        write_keys(tmp_path, {"keys": [{"tenant": "a", "sha256": hash_key("key-a")}]})
    )
    assert auth.authenticate(header) is None


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"keys": "x"},
        {"keys": [1]},
        {"keys": [{"tenant": "", "sha256": "0" * 64}]},
        {"keys": [{"tenant": "a", "sha256": "abc"}]},
        {"keys": [{"tenant": "a", "sha256": "z" * 64}]},
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, document: object) -> None:
    with pytest.raises(ApiKeyFileError):
        ApiKeyAuth.from_file(write_keys(tmp_path, document))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyFileError, match="cannot read"):
        ApiKeyAuth.from_file(tmp_path / "absent.json")
