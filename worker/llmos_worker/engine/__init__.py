"""Paged-memory inference engine: sequences, block manager, scheduler, sampler, engine.

The public surface is flat: `LLMEngine` plus the contracts it speaks (`EngineConfig`,
`SamplingParams`, `RequestOutput` ...) and the parts tests and benchmarks drive directly.
"""

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
