"""`fetch-model --adapter`: a PEFT LoRA adapter directory, checked and stored like a model.

An adapter is the two files PEFT's `save_pretrained` writes, `adapter_config.json` and
`adapter_model.safetensors`; only those two are stored (a README or training state beside them
is left out, so the digest depends on the adapter alone). Its digest is the model digest of
digest.py over the two files — `sha256sum adapter_config.json adapter_model.safetensors |
sha256sum` — and `--sha256` is checked against it. Where the files come from:

- a directory (`pvc://claim/dir`, a mounted path): the two files inside it;
- `https://host/dir` (or `http://`): `<url>/adapter_config.json` and
  `<url>/adapter_model.safetensors`; `--sha256` is required, as for any download;
- `hf://org/name@revision[/subdir]` through the mirror: the two files under `resolve/<revision>`.

Before anything is committed the config must be JSON naming a LoRA adapter (`peft_type` LORA
when present, a positive rank `r`) and the weights must start with a safetensors header whose
length fits the file: a wrong directory fails the loader, not the worker pods that would mount
it. Encryption, staging and the manifest are the model's (writer.py, manifest.py); the manifest's
format is `peft-lora`, which the worker's adapter reader opens as a directory.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from llmos_worker.storage.digest import READ_BYTES, model_digest, sha256_file
from llmos_worker.storage.download import download
from llmos_worker.storage.errors import DigestMismatchError, SourceError
from llmos_worker.storage.manifest import Manifest, ManifestFile
from llmos_worker.storage.source import Source, local_path, parse_source, pvc_path
from llmos_worker.storage.writer import FileSink, ModelWriter

if TYPE_CHECKING:
    from llmos_worker.storage.fetch import FetchRequest

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ADAPTER_FORMAT = "peft-lora"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


class _Checked:
    """Collects what the checks need while a file streams through: the config's bytes."""

    def __init__(self, sink: FileSink) -> None:
        self.sink = sink
        self.config = bytearray()

    def write(self, data: bytes) -> None:
        if self.sink.name == CONFIG_FILE:
            if len(self.config) + len(data) > MAX_CONFIG_BYTES:
                raise SourceError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
            self.config += data
        self.sink.write(data)


def adapter_urls(source: Source, mirror: str | None) -> list[tuple[str, str]]:
    """(file name, URL) of the adapter's two files for an http or hf source."""
    if source.kind == "http":
        base = source.location.rstrip("/")
    else:
        if not mirror:
            raise SourceError(
                f"source {source.uri!r}: hf:// sources need a Hugging Face mirror "
                "(--hf-mirror / LLMOS_HF_MIRROR); or use an https:// directory URL with its "
                "sha256, or a pvc:// directory"
            )
        repo, _, tail = source.location.partition("@")
        revision, _, subdir = (tail or "main").partition("/")
        if repo.count("/") != 1 or not revision:
            raise SourceError(f"source {source.uri!r}: use hf://ORG/NAME@REVISION[/DIR]")
        base = f"{mirror.rstrip('/')}/{quote(repo)}/resolve/{quote(revision, safe='')}"
        if subdir.strip("/"):
            base += "/" + quote(subdir.strip("/"))
    return [(name, f"{base}/{name}") for name in ADAPTER_FILES]


def fetch_adapter(req: FetchRequest, expected: str | None) -> Manifest:
    """Fetch, check, (encrypt,) store and describe one adapter; return its manifest."""
    source = parse_source(req.source)
    if source.kind in ("http", "hf"):
        if expected is None:
            raise SourceError(f"--sha256 is required for a download ({source.uri})")
        return _fetch_urls(req, source, adapter_urls(source, req.hf_mirror), expected)
    if source.kind == "builtin":
        raise SourceError(f"source {source.uri!r}: there are no builtin adapters")
    return _fetch_dir(req, source, expected)


def _fetch_urls(
    req: FetchRequest, source: Source, urls: list[tuple[str, str]], expected: str
) -> Manifest:
    # why the expected digest binds the chunks: the real one is known only after the download,
    # and a mismatch below leaves the block without commit, removing everything staged
    with ModelWriter(req.dest, kek=req.kek, model_digest=expected, chunk_size=req.chunk_size) as w:
        checked = []
        for name, url in urls:
            item = _Checked(w.open(name))
            try:
                download(
                    url, item.write, transport=req.transport, progress_bytes=req.progress_bytes
                )
            except BaseException:
                item.sink.abort()
                raise
            checked.append((item, item.sink.finish()))
        digest = model_digest((entry.name, entry.sha256) for _, entry in checked)
        if digest != expected:
            raise DigestMismatchError(
                f"adapter {source.uri!r} has digest {digest}, expected {expected}; "
                "nothing was stored"
            )
        return _commit(req, source, w, checked)


def _fetch_dir(req: FetchRequest, source: Source, expected: str | None) -> Manifest:
    directory = local_path(source) if source.kind == "local" else pvc_path(source, req.pvc_root)
    missing = [n for n in ADAPTER_FILES if not (directory / n).is_file()]
    if missing:
        raise SourceError(
            f"source {source.uri!r}: {directory} is not a PEFT adapter directory "
            f"(no {', '.join(missing)})"
        )
    digests = {name: sha256_file(directory / name) for name in ADAPTER_FILES}  # pass 1
    digest = model_digest(digests.items())
    if expected is not None and digest != expected:
        raise DigestMismatchError(
            f"adapter {source.uri!r} has digest {digest}, expected {expected}; nothing was stored"
        )
    with ModelWriter(req.dest, kek=req.kek, model_digest=digest, chunk_size=req.chunk_size) as w:
        checked = []
        for name in ADAPTER_FILES:
            item = _Checked(w.open(name))
            with open(directory / name, "rb") as f:
                while piece := f.read(READ_BYTES):
                    item.write(piece)
            # why: pass 2 must read what pass 1 hashed; a source changing underneath is refused
            checked.append((item, item.sink.finish(digests[name])))
        return _commit(req, source, w, checked)


def _commit(
    req: FetchRequest,
    source: Source,
    writer: ModelWriter,
    checked: list[tuple[_Checked, ManifestFile]],
) -> Manifest:
    by_name = {entry.name: (item, entry) for item, entry in checked}
    config = check_config(bytes(by_name[CONFIG_FILE][0].config))
    item, weights = by_name[WEIGHTS_FILE]
    check_weights_head(item.sink.head, weights.size_bytes)
    entries = tuple(entry for _, entry in checked)
    manifest = Manifest(
        source=source.uri,
        format=ADAPTER_FORMAT,
        version=req.version,
        files=entries,
        digest=model_digest((e.name, e.sha256) for e in entries),
        size_bytes=sum(e.size_bytes for e in entries),
        encrypted=req.kek is not None,
        created_at=req.clock().isoformat(timespec="seconds").replace("+00:00", "Z"),
        extra={"rank": config["r"]},
    )
    writer.commit(manifest)
    log.info("adapter of rank %s stored in %s", config["r"], req.dest)
    return manifest


def check_config(raw: bytes) -> dict[str, Any]:
    """The parsed `adapter_config.json`, or a `SourceError` saying why it is no LoRA config."""
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"{CONFIG_FILE} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{CONFIG_FILE} is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise SourceError(f"{CONFIG_FILE}: peft_type is {peft_type!r}, only LORA is served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise SourceError(f"{CONFIG_FILE}: r (the rank) must be a positive integer, got {rank!r}")
    return config


def check_weights_head(head: bytes, size: int) -> None:
    """A safetensors file starts with its header's length (u64 LE), which must fit the file."""
    if len(head) < 8:
        raise SourceError(f"{WEIGHTS_FILE} is too short to be safetensors ({size} bytes)")
    (header,) = struct.unpack("<Q", head[:8])
    if header < 2 or header > MAX_HEADER_BYTES or 8 + header > size:
        raise SourceError(
            f"{WEIGHTS_FILE} is not safetensors: header length {header} for {size} bytes"
        )


__all__ = [
    "ADAPTER_FILES",
    "ADAPTER_FORMAT",
    "adapter_urls",
    "check_config",
    "check_weights_head",
    "fetch_adapter",
]
