"""Llama-family model for paged attention, weight loading and the model runner."""

from llmos_worker.model.batch import ForwardBatch
from llmos_worker.model.config import ModelConfig, RopeScaling
from llmos_worker.model.llama import LlamaModel
from llmos_worker.model.loader import LoadedModel, load_model, resolve_source
from llmos_worker.model.memory import available_memory_bytes
from llmos_worker.model.runner import ModelRunner
from llmos_worker.model.tokenizer import Tokenizer

__all__ = [
    "ForwardBatch",
    "LlamaModel",
    "LoadedModel",
    "ModelConfig",
    "ModelRunner",
    "RopeScaling",
    "Tokenizer",
    "available_memory_bytes",
    "load_model",
    "resolve_source",
]
