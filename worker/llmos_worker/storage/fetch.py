"""`llmos-worker fetch-model`: the LLMModel loader Job's command.

Resolves a source URI (source.py), streams the model's files into `--dest` through a
`ModelWriter` (hashed, encrypted when `--encrypt-key-file` is given, staged then committed), checks
the sha256 (required for http(s): the model digest of digest.py must equal it), writes
`manifest.json`, and writes the compact manifest to the termination log so the operator reads
digest and size from the pod's terminated state. On failure the termination log gets
`{"error", "reason"}`, the exit status is 1 and nothing partial is left in `--dest`.
Every flag defaults from `LLMOS_<FLAG>`; `--version` also from `LLMOS_MODEL_VERSION`.
With `--adapter` the source is a PEFT LoRA adapter directory instead (peft.py): its two files
are checked and stored the same way, and the result's format is `peft-lora`.
Local sources (builtin, pvc) are hashed in a first pass: encryption binds the model digest into
every chunk, so it must be known before the first byte is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from llmos_worker.cli import env_default
from llmos_worker.errors import StorageError
from llmos_worker.storage.crypto import DEFAULT_CHUNK_SIZE
from llmos_worker.storage.digest import READ_BYTES, model_digest, normalise_sha256, sha256_file
from llmos_worker.storage.download import DEFAULT_PROGRESS_BYTES, MIB, download
from llmos_worker.storage.errors import DigestMismatchError, SourceError
from llmos_worker.storage.keys import load_key
from llmos_worker.storage.manifest import Manifest, ManifestFile
from llmos_worker.storage.source import (
    Source,
    builtin_path,
    hf_mirror_url,
    local_path,
    parse_source,
    pvc_path,
    url_filename,
)
from llmos_worker.storage.writer import ModelWriter

log = logging.getLogger(__name__)

FORMATS = ("gguf", "safetensors")
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
DEFAULT_PVC_ROOT = "/mnt/pvc"


@dataclass(frozen=True)
class FetchRequest:
    """Everything `fetch_model` needs; the CLI builds one from flags and env."""

    source: str
    dest: Path
    sha256: str | None = None
    format: str | None = None
    version: str | None = None
    kek: bytes | None = None
    pvc_root: Path = Path(DEFAULT_PVC_ROOT)
    hf_mirror: str | None = None
    adapter: bool = False
    chunk_size: int = DEFAULT_CHUNK_SIZE
    progress_bytes: int = DEFAULT_PROGRESS_BYTES
    transport: httpx.BaseTransport | None = None
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


def fetch_model(req: FetchRequest) -> Manifest:
    """Fetch, verify, (encrypt,) store and describe a model; return its manifest."""
    source = parse_source(req.source)
    expected = normalise_sha256(req.sha256, field="--sha256") if req.sha256 else None
    if req.adapter:
        from llmos_worker.storage.peft import fetch_adapter

        if req.format is not None:
            raise SourceError("--format does not apply to --adapter (an adapter is PEFT's)")
        return fetch_adapter(req, expected)
    if req.format is not None and req.format not in FORMATS:
        raise SourceError(f"--format must be one of {', '.join(FORMATS)}, got {req.format!r}")
    if source.kind in ("http", "hf"):
        url = source.location if source.kind == "http" else hf_mirror_url(source, req.hf_mirror)
        if expected is None:
            raise SourceError(f"--sha256 is required for a download ({source.uri})")
        return _fetch_url(req, source, url, expected)
    return _fetch_local(req, source, expected)


# (manifest entry, first bytes of the plaintext) per stored file
_Staged = list[tuple[ManifestFile, bytes]]


def _fetch_url(req: FetchRequest, source: Source, url: str, expected: str) -> Manifest:
    name = url_filename(url, default=f"model.{req.format or 'gguf'}")
    with ModelWriter(req.dest, kek=req.kek, model_digest=expected, chunk_size=req.chunk_size) as w:
        sink = w.open(name)
        try:
            download(url, sink.write, transport=req.transport, progress_bytes=req.progress_bytes)
        except BaseException:
            sink.abort()
            raise
        entry = sink.finish(expected)
        return _commit(req, source, w, [(entry, sink.head)])


def _local_files(source: Source, root: Path) -> list[tuple[str, Path]]:
    """(name inside the model, path) of every file of a builtin or pvc source."""
    if source.kind == "builtin":
        path = builtin_path(source.location)
        return [(path.name, path)]
    path = local_path(source) if source.kind == "local" else pvc_path(source, root)
    if path.is_file():
        return [(path.name, path)]
    files = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise SourceError(f"source {source.uri!r}: directory {path} holds no files")
    return files


def _fetch_local(req: FetchRequest, source: Source, expected: str | None) -> Manifest:
    files = _local_files(source, req.pvc_root)
    digests = {name: sha256_file(path) for name, path in files}  # pass 1
    digest = model_digest(digests.items())
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            f"source {source.uri!r} has model digest {digest}, expected {expected}; "
            "nothing was stored"
        )
    staged: _Staged = []
    with ModelWriter(req.dest, kek=req.kek, model_digest=digest, chunk_size=req.chunk_size) as w:
        for name, path in files:
            log.info("copying %s (%.1f MiB)", path, path.stat().st_size / MIB)
            sink = w.open(name)
            with open(path, "rb") as f:
                while piece := f.read(READ_BYTES):
                    sink.write(piece)
            # why: pass 2 must read what pass 1 hashed; a source changing underneath is refused
            staged.append((sink.finish(digests[name]), sink.head))
        return _commit(req, source, w, staged)


def _commit(req: FetchRequest, source: Source, writer: ModelWriter, staged: _Staged) -> Manifest:
    fmt = _check_format(req.format, staged)
    entries = tuple(entry for entry, _ in staged)
    manifest = Manifest(
        source=source.uri,
        format=fmt,
        version=req.version,
        files=entries,
        digest=model_digest((e.name, e.sha256) for e in entries),
        size_bytes=sum(e.size_bytes for e in entries),
        encrypted=req.kek is not None,
        created_at=req.clock().isoformat(timespec="seconds").replace("+00:00", "Z"),
    )
    writer.commit(manifest)
    return manifest


def _check_format(requested: str | None, staged: _Staged) -> str:
    names = [entry.name for entry, _ in staged]
    fmt = requested
    if fmt is None:
        if any(n.endswith(".gguf") for n in names):
            fmt = "gguf"
        elif any(n.endswith(".safetensors") for n in names):
            fmt = "safetensors"
        else:
            raise SourceError(f"cannot tell the model format of {names}; pass --format")
    if fmt == "gguf":
        heads = [head for entry, head in staged if entry.name.endswith(".gguf")]
        if len(heads) != 1 or not heads[0].startswith(b"GGUF"):
            raise SourceError("format gguf needs exactly one .gguf file starting with b'GGUF'")
    elif not any(n.endswith(".safetensors") for n in names):
        raise SourceError("format safetensors needs at least one .safetensors file")
    return fmt


# ---------------------------------------------------------------------------------------------
# command line


def add_fetch_model_arguments(parser: argparse.ArgumentParser) -> None:
    src = env_default("SOURCE")
    dest = env_default("DEST")
    parser.add_argument("--source", default=src, required=src is None, help="model source URI")
    parser.add_argument("--dest", default=dest, required=dest is None, help="model directory")
    parser.add_argument("--sha256", default=env_default("SHA256"), help="expected model digest")
    parser.add_argument("--format", default=env_default("FORMAT"), choices=FORMATS)
    parser.add_argument(
        "--version",
        default=env_default("VERSION") or env_default("MODEL_VERSION"),
        help="version label (env LLMOS_VERSION or LLMOS_MODEL_VERSION)",
    )
    parser.add_argument(
        "--encrypt-key-file",
        default=env_default("ENCRYPT_KEY_FILE"),
        help="key-encryption key file: store the model encrypted under it",
    )
    parser.add_argument(
        "--termination-log",
        default=env_default("TERMINATION_LOG"),
        help=f"where to write the result JSON (default {DEFAULT_TERMINATION_LOG} if writable)",
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        default=(env_default("ADAPTER") or "").lower() in ("1", "true", "yes"),
        help="the source is a PEFT LoRA adapter directory (adapter_config.json + "
        "adapter_model.safetensors)",
    )
    parser.add_argument("--pvc-root", default=env_default("PVC_ROOT", DEFAULT_PVC_ROOT))
    parser.add_argument("--hf-mirror", default=env_default("HF_MIRROR"))
    parser.add_argument(
        "--chunk-size", type=int, default=int(env_default("CHUNK_SIZE") or DEFAULT_CHUNK_SIZE)
    )
    parser.add_argument(
        "--progress-mb",
        type=int,
        default=int(env_default("PROGRESS_MB") or DEFAULT_PROGRESS_BYTES // MIB),
    )


def run_fetch_model(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log_path = _termination_log_path(args.termination_log)
    try:
        manifest = fetch_model(
            FetchRequest(
                source=args.source,
                dest=Path(args.dest),
                sha256=args.sha256,
                format=args.format,
                version=args.version,
                kek=load_key(args.encrypt_key_file) if args.encrypt_key_file else None,
                pvc_root=Path(args.pvc_root),
                hf_mirror=args.hf_mirror,
                adapter=args.adapter,
                chunk_size=args.chunk_size,
                progress_bytes=max(1, args.progress_mb) * MIB,
            )
        )
    except (StorageError, ValueError) as exc:
        print(f"fetch-model: error: {exc}", file=sys.stderr)
        message = {"error": str(exc)[:3000], "reason": type(exc).__name__}
        _write_termination_log(log_path, json.dumps(message, separators=(",", ":")))
        return 1
    log.info("stored %s: digest %s, %d bytes", args.dest, manifest.digest, manifest.size_bytes)
    _write_termination_log(log_path, manifest.termination_message())
    return 0


def _termination_log_path(flag: str | None) -> Path | None:
    if flag:
        return Path(flag)
    default = Path(DEFAULT_TERMINATION_LOG)
    # why: only where Kubernetes mounted one; never create a file under /dev on a workstation
    return default if default.is_file() and os.access(default, os.W_OK) else None


def _write_termination_log(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination log %s: %s", path, exc)


add_arguments = add_fetch_model_arguments
run = run_fetch_model

__all__ = ["FetchRequest", "add_fetch_model_arguments", "fetch_model", "run_fetch_model"]
