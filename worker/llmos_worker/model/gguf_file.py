"""A small, fast reader of GGUF files: metadata key/values and tensors, dequantised to float32.

The `gguf` package's `GGUFReader` builds a numpy view per array element, which takes seconds
for a 49k-token vocabulary; this reader walks the header once with `struct` and keeps tensors
as views into one read-only mmap until they are dequantised (with `gguf.quants.dequantize`).
It works on any readable file path, including `/proc/self/fd/N` of an in-memory file.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmos_worker.errors import ModelLoadError
from llmos_worker.model.dequant import FAST_TYPES, dequantize_fast

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF value type -> struct format of one scalar (8 = string, 9 = array are handled apart).
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_TYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


def is_gguf(path: str) -> bool:
    """True when the file starts with the GGUF magic (extension is not trusted)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry; `shape` is numpy order (slowest dim first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file


class GGUFFile:
    """An open GGUF file: `metadata` (dict), `tensors` (name -> info), `load(name)` -> float32."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
        self.path = path
        self._pos = 0
        try:
            self.metadata, self.tensors = self._parse_header()
        except (struct.error, UnicodeDecodeError, IndexError) as exc:
            raise ModelLoadError(f"corrupt GGUF header in {path}: {exc}") from exc

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- header -------------------------------------------------------------------------------

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        raw = self._map[self._pos : self._pos + n]
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._unpack("<I"), self._unpack("<Q")
            if etype in _NUMPY_TYPES:  # why: numeric arrays in one go (token types, scores)
                arr: np.ndarray[Any, Any] = np.frombuffer(
                    self._map, dtype=_NUMPY_TYPES[etype], count=count, offset=self._pos
                ).copy()
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ModelLoadError(f"unknown GGUF value type {vtype} in {self.path}")
        return self._unpack(_SCALAR_FORMATS[vtype])

    def _parse_header(self) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
        if self._map[:4] != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"unsupported GGUF version {version} in {self.path}")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            meta[key] = self._value(self._unpack("<I"))
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            dims = tuple(self._unpack("<Q") for _ in range(n_dims))  # ne0 (fastest) first
            raw.append((name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q")))
        align = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (self._pos + align - 1) // align * align
        tensors = {n: GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in raw}
        return meta, tensors

    # -- tensors ------------------------------------------------------------------------------

    def load(self, name: str) -> torch.Tensor:
        """Dequantise one tensor to a float32 torch tensor of its numpy-order shape."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
        except ValueError as exc:
            raise ModelLoadError(f"tensor {name}: unknown ggml type {info.ggml_type}") from exc
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(info.shape))
        nbytes = n_elems // block * type_size
        if info.offset + nbytes > len(self._map):
            raise ModelLoadError(f"tensor {name} runs past the end of {self.path} (truncated?)")
        row_bytes = info.shape[-1] // block * type_size
        data = np.frombuffer(self._map, dtype=np.uint8, count=nbytes, offset=info.offset)
        data = data.reshape(*info.shape[:-1], row_bytes)
        if info.ggml_type in FAST_TYPES:
            # why a copy: the tensor must not keep the mmap alive (it cannot close while viewed)
            raw = torch.from_numpy(data.reshape(-1, row_bytes).copy())
            return dequantize_fast(raw, info.ggml_type, info.shape[-1]).reshape(info.shape)
        try:
            values = dequantize(data, qtype)
        except NotImplementedError as exc:
            raise ModelLoadError(f"tensor {name}: cannot dequantise {qtype.name}") from exc
        out = torch.from_numpy(np.array(values, dtype=np.float32, copy=True))
        return out.reshape(info.shape)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.load(name)
