"""`fetch-model`: sources, sha256 checks, atomicity, manifest and termination log, exit codes.

HTTP sources are served by a real `http.server` on 127.0.0.1 (port 0) in a thread.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from llmos_worker.cli import main
from llmos_worker.storage import (
    DigestMismatchError,
    FetchError,
    FetchRequest,
    SourceError,
    fetch_model,
    open_model_dir,
    read_manifest,
    resolve_model_dir,
)

CHUNK = 64 * 1024
GGUF = b"GGUF" + os.urandom(3 * 1024 * 1024)  # a fake .gguf: only the magic is checked here


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        if self.path == "/short.gguf":  # announces more than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(GGUF)))
            self.end_headers()
            self.wfile.write(GGUF[: len(GGUF) // 2])
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    _Handler.files = {"/models/tiny.gguf": GGUF}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_http_good_sha256(server: str, tmp_path: Path) -> None:
    manifest = fetch_model(
        FetchRequest(
            f"{server}/models/tiny.gguf", tmp_path, sha256=sha(GGUF), version="v1", chunk_size=CHUNK
        )
    )
    assert (tmp_path / "tiny.gguf").read_bytes() == GGUF
    assert manifest.digest == sha(GGUF) and manifest.size_bytes == len(GGUF)
    assert manifest.format == "gguf" and manifest.version == "v1" and not manifest.encrypted
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["files"] == [{"name": "tiny.gguf", "sha256": sha(GGUF), "sizeBytes": len(GGUF)}]
    assert on_disk["digest"] == sha(GGUF) and on_disk["createdAt"].endswith("Z")
    assert leftovers(tmp_path) == ["manifest.json", "tiny.gguf"]
    with open_model_dir(tmp_path) as path:
        assert path == tmp_path / "tiny.gguf"


def test_http_bad_sha256_leaves_nothing(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "m"
    with pytest.raises(DigestMismatchError, match="expected " + "0" * 64):
        fetch_model(FetchRequest(f"{server}/models/tiny.gguf", dest, sha256="0" * 64))
    assert leftovers(dest) == []


def test_http_errors_leave_nothing(server: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_model(FetchRequest(f"{server}/missing.gguf", tmp_path, sha256=sha(GGUF)))
    with pytest.raises(FetchError, match=r"failed|announced"):
        fetch_model(FetchRequest(f"{server}/short.gguf", tmp_path, sha256=sha(GGUF)))
    assert leftovers(tmp_path) == []


def test_http_requires_sha256(server: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="--sha256 is required"):
        fetch_model(FetchRequest(f"{server}/models/tiny.gguf", tmp_path))


def test_failed_new_version_keeps_the_old_one(server: str, tmp_path: Path) -> None:
    fetch_model(FetchRequest(f"{server}/models/tiny.gguf", tmp_path, sha256=sha(GGUF), version="1"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DigestMismatchError):
        fetch_model(
            FetchRequest(f"{server}/models/tiny.gguf", tmp_path, sha256="1" * 64, version="2")
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_hf_refused_without_mirror(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not have"):
        fetch_model(FetchRequest("hf://org/name@main", tmp_path))


def test_hf_through_mirror(server: str, tmp_path: Path) -> None:
    _Handler.files["/mirror/org/name/resolve/abc123/tiny.gguf"] = GGUF
    manifest = fetch_model(
        FetchRequest(
            "hf://org/name@abc123/tiny.gguf",
            tmp_path,
            sha256=sha(GGUF),
            hf_mirror=f"{server}/mirror",
        )
    )
    assert manifest.source == "hf://org/name@abc123/tiny.gguf" and manifest.digest == sha(GGUF)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("nonsense", "not a URI"),
        ("ftp://x/y", "not supported"),
        ("builtin://gpt-17", "unknown builtin"),
        ("pvc://claim/../../etc/passwd", "not allowed"),
        ("pvc://claim/absent.gguf", "does not exist"),
    ],
)
def test_bad_sources(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        fetch_model(FetchRequest(uri, tmp_path / "dest", pvc_root=tmp_path))


def test_pvc_directory_of_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "pvc" / "weights" / "llama"
    (src / "sub").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model-1.safetensors": os.urandom(200_000),
        "sub/model-2.safetensors": os.urandom(100_000),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / ".cache").write_bytes(b"ignored")
    dest = tmp_path / "dest"
    manifest = fetch_model(FetchRequest("pvc://weights/llama", dest, pvc_root=tmp_path / "pvc"))
    assert manifest.format == "safetensors"
    assert [f.name for f in manifest.files] == sorted(files)
    listing = "".join(f"{sha(files[n])}  {n}\n" for n in sorted(files))
    assert manifest.digest == sha(listing.encode())
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert resolve_model_dir(dest, expected_digest=manifest.digest).model_path == dest
    # the same digest given up front is accepted; another is refused before anything is written
    fetch_model(
        FetchRequest("pvc://weights/llama", dest, pvc_root=tmp_path / "pvc", sha256=manifest.digest)
    )
    with pytest.raises(DigestMismatchError):
        fetch_model(
            FetchRequest(
                "pvc://weights/llama", tmp_path / "d2", pvc_root=tmp_path / "pvc", sha256="2" * 64
            )
        )
    assert leftovers(tmp_path / "d2") == []


def test_format_checked(tmp_path: Path) -> None:
    (tmp_path / "pvc" / "c").mkdir(parents=True)
    (tmp_path / "pvc" / "c" / "fake.gguf").write_bytes(b"<html>not found</html>")
    with pytest.raises(SourceError, match="GGUF"):
        fetch_model(FetchRequest("pvc://c/fake.gguf", tmp_path / "d", pvc_root=tmp_path / "pvc"))
    assert leftovers(tmp_path / "d") == []


def test_new_version_replaces_old_files(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc" / "c"
    pvc.mkdir(parents=True)
    (pvc / "a.gguf").write_bytes(b"GGUF" + b"a" * 1000)
    (pvc / "b.gguf").write_bytes(b"GGUF" + b"b" * 1000)
    dest = tmp_path / "d"
    fetch_model(FetchRequest("pvc://c/a.gguf", dest, pvc_root=tmp_path / "pvc", version="1"))
    fetch_model(FetchRequest("pvc://c/b.gguf", dest, pvc_root=tmp_path / "pvc", version="2"))
    assert leftovers(dest) == ["b.gguf", "manifest.json"]
    assert read_manifest(dest).version == "2"


def test_builtin_via_cli_with_termination_log(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    dest = tmp_path / "model"
    rc = main(
        [
            "fetch-model",
            "--source=builtin://smollm2-135m-instruct",
            f"--dest={dest}",
            f"--termination-log={log}",
            "--version=2024-11",
        ]
    )
    assert rc == 0
    manifest = read_manifest(dest)
    message = log.read_text()
    assert len(message.encode()) < 4096 and "\n" not in message
    assert json.loads(message) == manifest.to_json()
    (entry,) = manifest.files
    assert entry.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and entry.size_bytes > 90_000_000
    assert manifest.digest == entry.sha256 and manifest.version == "2024-11"
    with open_model_dir(dest) as path:
        assert path.read_bytes()[:4] == b"GGUF"


def test_cli_failure_exit_code_and_termination_log(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "termination-log"
    argv = ["fetch-model", f"--source={server}/models/tiny.gguf", f"--dest={tmp_path / 'd'}"]
    assert main([*argv, "--sha256=" + "3" * 64, f"--termination-log={log}"]) == 1
    assert "expected 333" in capsys.readouterr().err
    assert json.loads(log.read_text())["reason"] == "DigestMismatchError"
    assert leftovers(tmp_path / "d") == []
    with pytest.raises(SystemExit) as info:  # argparse: unknown format
        main([*argv, "--format=onnx"])
    assert info.value.code == 2


def test_storage_never_imports_torch() -> None:
    # why: the loader Job's path (fetch-model, crypto commands) must stay light
    import subprocess
    import sys

    code = (
        "import sys, llmos_worker.storage, llmos_worker.storage.cli, llmos_worker.storage.fetch; "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mounted_path_source_as_the_operator_renders_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the operator mounts a pvc:// source's claim at /sources/<claim> and passes that path
    src = tmp_path / "sources" / "claim" / "m.gguf"
    src.parent.mkdir(parents=True)
    src.write_bytes(GGUF)
    monkeypatch.setenv("LLMOS_MODEL_VERSION", "7")
    dest = tmp_path / "models" / "v-abc"
    assert main(["fetch-model", "--source", str(src), "--dest", str(dest), "--format", "gguf"]) == 0
    manifest = read_manifest(dest)
    assert manifest.source == str(src) and manifest.version == "7"
    assert manifest.digest == sha(GGUF)
    uri = fetch_model(FetchRequest(f"file://{src}", tmp_path / "d2")).source
    assert uri == f"file://{src}"
    with pytest.raises(SourceError, match="does not exist"):
        fetch_model(FetchRequest(str(tmp_path / "absent"), tmp_path / "d3"))


def test_termination_message_stays_under_4_kib() -> None:
    from llmos_worker.storage import Manifest, ManifestFile

    files = tuple(ManifestFile(f"model-{i:05d}.safetensors", "a" * 64, i) for i in range(300))
    big = Manifest("pvc://c/p", "safetensors", "v" * 5000, files, "b" * 64, 1, False, "t")
    for manifest in (
        big,
        Manifest("pvc://c/p", "safetensors", "1", files, "b" * 64, 1, False, "t"),
    ):
        message = json.loads(manifest.termination_message())
        assert len(manifest.termination_message().encode()) < 4096
        assert message["digest"] == "b" * 64 and message["fileCount"] == 300
