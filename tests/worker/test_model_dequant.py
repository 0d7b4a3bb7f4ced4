"""Our torch dequantisation of GGUF block types equals the gguf package's reference (bit-exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llmos_worker.model.dequant import FAST_TYPES, dequantize_fast


@pytest.mark.parametrize(
    "qtype", [GGMLQuantizationType(t) for t in sorted(FAST_TYPES)], ids=lambda t: t.name
)
def test_matches_gguf_reference(qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((6, 128)) * 0.5).astype(np.float32)
    packed = quantize(values, qtype)  # (rows, row_bytes) uint8, or the float array itself
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(6, -1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.shape[1] == 128 // block * type_size
    ours = dequantize_fast(torch.from_numpy(raw.copy()), int(qtype), 128)
    ref = torch.from_numpy(np.asarray(dequantize(raw, qtype), dtype=np.float32))
    assert ours.shape == (6, 128) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    if qtype != GGMLQuantizationType.F32:
        assert not torch.equal(ours, torch.from_numpy(values))  # a lossy type really was decoded


def test_unknown_type_refused() -> None:
    with pytest.raises(ValueError, match="no fast path"):
        dequantize_fast(torch.zeros(1, 18, dtype=torch.uint8), int(GGMLQuantizationType.Q5_0), 32)
