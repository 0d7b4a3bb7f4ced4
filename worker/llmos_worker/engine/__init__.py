"""Paged-memory inference engine: sequences, block manager, scheduler, sampler, engine.

The public surface is flat: `LLMEngine` plus the contracts it speaks (`EngineConfig`,
`SamplingParams`, `RequestOutput` ...) and the parts tests and benchmarks drive directly.
Names are imported on first use (PEP 562), so importing `engine.config` or `engine.params` —
as the CLI parser does — does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmos_worker.engine.block_manager import BlockManager, hash_block
    from llmos_worker.engine.config import EngineConfig
    from llmos_worker.engine.detokenizer import Detokenizer
    from llmos_worker.engine.engine import LLMEngine
    from llmos_worker.engine.outputs import (
        CompletionOutput,
        EngineStats,
        FinishReason,
        RequestMetrics,
        RequestOutput,
        TokenLogprob,
    )
    from llmos_worker.engine.params import SamplingParams
    from llmos_worker.engine.sampler import Sampler, SamplingRow
    from llmos_worker.engine.scheduler import Scheduler, SchedulerOutput
    from llmos_worker.engine.sequence import Request, Sequence, SequenceStatus

# name -> the module that defines it
_HOMES = {
    "BlockManager": "llmos_worker.engine.block_manager",
    "CompletionOutput": "llmos_worker.engine.outputs",
    "Detokenizer": "llmos_worker.engine.detokenizer",
    "EngineConfig": "llmos_worker.engine.config",
    "EngineStats": "llmos_worker.engine.outputs",
    "FinishReason": "llmos_worker.engine.outputs",
    "LLMEngine": "llmos_worker.engine.engine",
    "Request": "llmos_worker.engine.sequence",
    "RequestMetrics": "llmos_worker.engine.outputs",
    "RequestOutput": "llmos_worker.engine.outputs",
    "Sampler": "llmos_worker.engine.sampler",
    "SamplingParams": "llmos_worker.engine.params",
    "SamplingRow": "llmos_worker.engine.sampler",
    "Scheduler": "llmos_worker.engine.scheduler",
    "SchedulerOutput": "llmos_worker.engine.scheduler",
    "Sequence": "llmos_worker.engine.sequence",
    "SequenceStatus": "llmos_worker.engine.sequence",
    "TokenLogprob": "llmos_worker.engine.outputs",
    "hash_block": "llmos_worker.engine.block_manager",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # why: later lookups skip this function
    return value


__all__ = [
    "BlockManager",
    "CompletionOutput",
    "Detokenizer",
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "LLMEngine",
    "Request",
    "RequestMetrics",
    "RequestOutput",
    "Sampler",
    "SamplingParams",
    "SamplingRow",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "TokenLogprob",
    "hash_block",
]
