"""Engine settings: one dataclass, validated, shared by the CLI, the server and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from llmos_worker.errors import InvalidRequestError

SchedulingPolicy = Literal["fcfs", "priority"]
DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "fp16", "int8", "bf16", "int4"]  # see llmos_worker.model.quant
KVCacheDType = Literal["auto", "float16"]  # auto: the model's dtype
MAX_LORA_SLOTS = 64
MAX_LORA_RANK = 512


@dataclass
class EngineConfig:
    """Settings of one engine instance.

    The KV cache is sized from `kv_cache_memory_bytes` when given, otherwise from
    `kv_cache_memory_fraction` of the device's free memory (host RAM on CPU, no more than
    the headroom under the process's cgroup memory limit: a container's limit).
    """

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    kv_cache_memory_fraction: float = 0.2
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    scheduling_policy: SchedulingPolicy = "fcfs"
    enable_prefix_caching: bool = True
    dtype: DType = "float32"
    quantization: Quantization = "none"  # opt-in narrower weights for the CPU
    kv_cache_dtype: KVCacheDType = "auto"  # opt-in fp16 cache, widened on read
    device: str = "cpu"
    seed: int = 0
    # LoRA adapters (vLLM's names): `max_loras` in the model's stacked slots at once (a batch
    # mixes them), `max_cpu_loras` parsed in host memory (LRU; more registered ones are re-read
    # from their path), ranks up to `max_lora_rank`; `lora_modules` name -> path at start-up,
    # which also enables LoRA. `lora_key_file` decrypts adapters stored encrypted.
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max(max_loras, 32)
    lora_modules: dict[str, str] = field(default_factory=dict)
    lora_key_file: str | None = None
    allow_runtime_lora_updating: bool = False  # the HTTP load/unload routes (paths on disk)
    lora_runtime_dirs: tuple[str, ...] = ()  # run-time loads must lie under one (empty: any)

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise InvalidRequestError(
                "block_size must be a power of two up to 128", param="block_size"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise InvalidRequestError(
                "kv_cache_memory_bytes must be positive", param="kv_cache_memory_bytes"
            )
        if not 0.0 < self.kv_cache_memory_fraction <= 0.95:
            raise InvalidRequestError(
                "kv_cache_memory_fraction must be in (0, 0.95]", param="kv_cache_memory_fraction"
            )
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs must be at least 1", param="max_num_seqs")
        if self.max_num_batched_tokens < self.block_size:
            raise InvalidRequestError(
                "max_num_batched_tokens must be at least block_size", param="max_num_batched_tokens"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError("max_model_len must be positive", param="max_model_len")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise InvalidRequestError(
                "scheduling_policy must be 'fcfs' or 'priority'", param="scheduling_policy"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError("dtype must be float32, bfloat16 or float16", param="dtype")
        if self.quantization not in get_args(Quantization):
            raise InvalidRequestError(
                f"quantization must be one of {list(get_args(Quantization))}",
                param="quantization",
            )
        if self.quantization != "none" and (self.dtype != "float32" or self.device != "cpu"):
            raise InvalidRequestError(
                f"quantization {self.quantization!r} needs dtype float32 on the cpu device",
                param="quantization",
            )
        if self.kv_cache_dtype not in get_args(KVCacheDType):
            raise InvalidRequestError(
                f"kv_cache_dtype must be one of {list(get_args(KVCacheDType))}",
                param="kv_cache_dtype",
            )
        if self.lora_modules or self.allow_runtime_lora_updating:
            self.enable_lora = True
        if not 1 <= self.max_loras <= MAX_LORA_SLOTS:
            raise InvalidRequestError(
                f"max_loras must be in [1, {MAX_LORA_SLOTS}]", param="max_loras"
            )
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise InvalidRequestError(
                f"max_lora_rank must be in [1, {MAX_LORA_RANK}]", param="max_lora_rank"
            )
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise InvalidRequestError(
                "max_cpu_loras must be at least max_loras", param="max_cpu_loras"
            )

    @property
    def cpu_lora_capacity(self) -> int:
        """Adapters kept parsed in host memory."""
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(self.max_loras, 32)

    def kv_dtype(self) -> str:
        """The dtype name the KV cache is stored in."""
        return self.dtype if self.kv_cache_dtype == "auto" else "float16"
