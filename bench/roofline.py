"""This machine's limits, measured in the same run: matmul GFLOP/s (torch's and the worker's own
kernel's, the faster bounds both), memory bandwidth, and the tokens/s they allow for the model.

Per token, the model costs about 2 × params FLOPs (one multiply-add per weight). A workload
costs more per *output* token than that: every prompt token runs through the decoder layers
too, and attention grows with the context. `workload_flops` counts both exactly for a list of
requests, so a workload's compute ceiling (output tok/s if every FLOP ran at the measured matmul
rate) is the honest upper bound for its throughput. At batch 1 every weight is read once per
token, so the memory-bound ceiling is bandwidth / weight bytes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class ModelSize:
    """Parameter count, stored size and attention shape of a GGUF model (tied embeddings
    counted once)."""

    params: int
    file_weight_bytes: int  # bytes of the tensor data as stored (quantised) in the GGUF
    layers: int = 0
    heads: int = 0  # query heads
    head_dim: int = 0
    head_params: int = 0  # the LM head (the embedding table when tied)
    embedding_params: int = 0
    tied: bool = True  # the LM head is the embedding table (counted once in params)

    @property
    def flops_per_token(self) -> int:
        return 2 * self.params

    @property
    def layer_params(self) -> int:
        """Weights every token runs through: the decoder layers and the final norm."""
        return self.params - self.embedding_params - (0 if self.tied else self.head_params)

    @property
    def read_per_token(self) -> int:
        """Weights one decoded token reads: the layers and the LM head (of the embedding table,
        one row)."""
        return self.layer_params + self.head_params

    def request_flops(self, prompt_len: int, output_len: int) -> tuple[int, int]:
        """(linear, attention) FLOPs of one request, generated to `output_len` tokens.

        The layers run on every prompt token and every generated token but the last (it is
        never fed back); the LM head runs once per generated token. The query at position i
        attends to i + 1 keys, and each query-key pair costs a multiply-add for the score and
        one for the weighted value, per head dimension, per head, per layer.
        """
        if output_len <= 0:
            return 2 * self.layer_params * prompt_len, 0
        rows = prompt_len + output_len - 1
        linear = 2 * self.layer_params * rows + 2 * self.head_params * output_len
        pairs = rows * (rows + 1) // 2
        attention = 4 * self.layers * self.heads * self.head_dim * pairs
        return linear, attention

    def workload_flops(self, requests: list[tuple[int, int]]) -> tuple[int, int]:
        """(linear, attention) FLOPs of (prompt_len, output_len) requests run to the end."""
        linear = attention = 0
        for prompt_len, output_len in requests:
            lin, att = self.request_flops(prompt_len, output_len)
            linear += lin
            attention += att
        return linear, attention


def gguf_model_size(path: Path) -> ModelSize:
    """Read tensor shapes and the attention geometry from the GGUF header; no weights are
    dequantised."""
    from gguf import GGUFReader  # why: the worker's dependency, imported only here

    reader = GGUFReader(str(path))
    elements = {t.name: int(t.n_elements) for t in reader.tensors}
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)

    def field(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    heads = field(f"{arch}.attention.head_count")
    key = f"{arch}.attention.key_length"
    head_dim = field(key) if key in reader.fields else field(f"{arch}.embedding_length") // heads
    embedding = elements.get("token_embd.weight", 0)
    return ModelSize(
        params=sum(elements.values()),
        file_weight_bytes=nbytes,
        layers=field(f"{arch}.block_count"),
        heads=heads,
        head_dim=head_dim,
        head_params=elements.get("output.weight", embedding),
        embedding_params=embedding,
        tied="output.weight" not in elements,
    )


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float | None:
    """Best sustained GFLOP/s of an n×n @ n×n matmul in `dtype`; None if unsupported."""
    import torch  # why: imported late so that the OpenMP settings of `bench.run` apply

    try:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        c = torch.empty(n, n, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)  # warm-up (packing, thread pool start)
        first = time.perf_counter() - t0
    except (RuntimeError, TypeError):
        return None
    if first > seconds:  # why: a dtype without hardware support (bf16 on AVX2) is very slow
        return 2.0 * n**3 / first / 1e9
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * n**3 / dt / 1e9)
    return best


def native_matmul_gflops(mode: str, n: int = 1024, seconds: float = 1.0) -> float | None:
    """Best sustained rate of the worker's own linear kernel, (n, n) rows against an (n, n)
    packed weight, in GFLOP/s (one multiply-add = 2): mode "none" multiplies in fp32, "int8"
    multiplies int8 weights by 16-bit quantised rows in integers, "bf16" bf16 weights by rows
    rounded to bf16 where the CPU has AVX512_BF16 (else fp32 rows). None without the kernel.

    Why beside torch's matmul: the roofline must bound the worker, and on a CPU with AVX-512
    the worker's kernel runs 512-bit FMAs that torch's CPU build here does not use (about 2.2x
    torch's 1024^3 rate on the machine this was written on), so torch's rate alone is no
    ceiling."""
    import torch

    from llmos_worker.model.kernels import native_kernels
    from llmos_worker.model.quant import make_linear

    kernels = native_kernels()
    if kernels is None or not kernels.has_linear:
        return None
    layer = make_linear(torch.randn(n, n), mode)
    layer.pack()
    x = torch.randn(n, n)
    layer(x, kernels)  # warm-up (thread pool start, first touch)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        layer(x, kernels)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def linear_kernel_facts() -> dict[str, Any]:
    """What the worker's linear kernel does on this machine (all None without the kernel):
    `linear_vector_bits` its vector width (512 with AVX-512, 256 with AVX2), `bf16_dot_rows`
    from how many rows it rounds rows to bf16 for bf16 weights (0: never, no AVX512_BF16), and
    `bf16_amx` whether those products run on AMX tiles."""
    from llmos_worker.model.kernels import native_kernels

    kernels = native_kernels()
    have = kernels is not None and kernels.has_linear
    return {
        "linear_vector_bits": kernels.vector_bits if have else None,
        "bf16_dot_rows": kernels.bf16_dot_rows if have else None,
        "bf16_amx": kernels.bf16_amx if have else None,
    }


def native_read_gbs(nbytes: int = 256 * 2**20, repeats: int = 10) -> float | None:
    """Best read bandwidth in GB/s as the worker's decode reads weights: its linear kernel on one
    row against an fp32 weight of `nbytes` (far larger than the caches). None without the kernel.

    Why beside torch's sum: the kernel's loads stream its packed panels on both cores and read
    faster than torch's reduction (the fp32 single stream ran at 107 % of the torch-measured
    ceiling), so torch's rate alone is no ceiling for it."""
    import torch

    from llmos_worker.model.kernels import native_kernels
    from llmos_worker.model.quant import make_linear

    kernels = native_kernels()
    if kernels is None or not kernels.has_linear:
        return None
    k = 4096
    layer = make_linear(torch.randn(nbytes // 4 // k, k), "none")
    layer.pack()
    x = torch.randn(1, k)
    layer(x, kernels)  # warm-up: pages touched
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer(x, kernels)
        best = max(best, layer.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def memory_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 10) -> float:
    """Best read bandwidth in GB/s: a sum over a buffer far larger than the caches."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    float(x.sum())  # warm-up: pages touched
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(x.sum())
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def _best(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def measure(
    model: ModelSize, *, seconds: float = 1.0, previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Machine numbers plus the model's tokens/s ceilings derived from them.

    With `previous` (an earlier `measure` of the same run), each rate is the better of the two:
    the speed of a shared host drifts during a run, and a ceiling must bound every result.
    """
    import torch

    prev = previous or {}
    fp32_torch = _best(
        prev.get("matmul_gflops_fp32_torch"), matmul_gflops(torch.float32, seconds=seconds)
    )
    fp32_native = _best(
        prev.get("matmul_gflops_fp32_native"), native_matmul_gflops("none", seconds=seconds)
    )
    int8 = _best(prev.get("matmul_gops_int8_native"), native_matmul_gflops("int8", seconds=seconds))
    bf16 = _best(prev.get("matmul_gflops_bf16"), matmul_gflops(torch.bfloat16, seconds=seconds))
    bf16_native = _best(
        prev.get("matmul_gflops_bf16_native"), native_matmul_gflops("bf16", seconds=seconds)
    )
    bw_torch = _best(prev.get("memory_read_gbs_torch"), memory_bandwidth_gbs())
    bw_native = _best(prev.get("memory_read_gbs_native"), native_read_gbs())
    bw = _best(bw_torch, bw_native) or 0.0
    return derive(model, _best(fp32_torch, fp32_native), bf16, bw, int8) | {
        "matmul_gflops_fp32_torch": fp32_torch,
        "matmul_gflops_fp32_native": fp32_native,
        "memory_read_gbs_torch": bw_torch,
        "memory_read_gbs_native": bw_native,
        "matmul_gflops_bf16_native": bf16_native,
        # the worker's bf16 weights multiply at the better of the two where they can
        "matmul_gflops_bf16_best": _best(bf16, bf16_native),
        **linear_kernel_facts(),
        "threads": torch.get_num_threads(),
        "measurements": prev.get("measurements", 0) + 1,
    }


def derive(
    model: ModelSize,
    fp32: float | None,
    bf16: float | None,
    bw: float,
    int8: float | None = None,
) -> dict[str, Any]:
    """The model's tokens/s ceilings from measured matmul rates (GFLOP/s; fp32 the fastest
    fp32 matmul measured, int8 the worker's integer product) and bandwidth (GB/s)."""
    from llmos_worker.model.quant import BLOCK, PANEL, Q4_BYTES, Q8_BYTES

    fp32_bytes = 4 * model.read_per_token
    # int4: the layers in 4-bit blocks, the LM head in 8-bit blocks (bytes per weight)
    int4_bytes = (Q4_BYTES * model.layer_params + Q8_BYTES * model.head_params) / (PANEL * BLOCK)
    return {
        "matmul_gflops_fp32": fp32,
        "matmul_gflops_bf16": bf16,
        "matmul_gops_int8_native": int8,
        "memory_read_gbs": bw,
        "model": asdict(model) | {"flops_per_token": model.flops_per_token},
        # compute ceiling: every token costs 2 × params FLOPs
        "compute_tok_s_fp32": (fp32 or 0.0) * 1e9 / model.flops_per_token,
        "compute_tok_s_bf16": (bf16 or 0.0) * 1e9 / model.flops_per_token,
        # batch-1 decode ceiling: all weights read once per token
        "batch1_mem_tok_s_fp32": bw * 1e9 / fp32_bytes,
        "batch1_mem_tok_s_gguf": bw * 1e9 / model.file_weight_bytes,
        # the worker's opt-in weights: 2 bytes per weight (fp16), 1 byte (int8; its per-row
        # scales are a few KiB), int4: 20 bytes per 32 layer weights, 34 per 32 of the LM head
        "batch1_mem_tok_s_fp16": bw * 1e9 / (2 * model.read_per_token),
        "batch1_mem_tok_s_int8": bw * 1e9 / model.read_per_token,
        "batch1_mem_tok_s_int4": bw * 1e9 / int4_bytes,
    }


def workload_ceiling(
    model: ModelSize,
    requests: list[tuple[int, int]],
    gflops: float | None,
    int8_gops: float | None = None,
    bf16_gflops: float | None = None,
) -> dict[str, Any]:
    """The FLOPs of a workload and the output tok/s it allows at `gflops` (every FLOP at the
    fastest measured fp32 matmul rate: nothing real goes faster) and, for int8 and bf16
    weights, at the faster of that and their own product's rate (int8 multiplies in integers,
    bf16 in bf16 pairs, from a few rows; in fp32 below that)."""
    linear, attention = model.workload_flops(requests)
    output = sum(max(0, o) for _, o in requests)

    def at(rate: float | None) -> float | None:
        return output * rate * 1e9 / (linear + attention) if rate and linear + attention else None

    return {
        "linear_gflop": linear / 1e9,
        "attention_gflop": attention / 1e9,
        "output_tokens": output,
        "compute_tok_s_fp32": at(gflops),
        "compute_tok_s_int8": at(_best(gflops, int8_gops)) if int8_gops else None,
        "compute_tok_s_bf16": at(_best(gflops, bf16_gflops)) if bf16_gflops else None,
    }


def fraction(tok_s: float | None, ceiling: float | None) -> float | None:
    """A throughput as a fraction of a ceiling (None when either is unknown)."""
    if tok_s is None or not ceiling:
        return None
    return tok_s / ceiling
