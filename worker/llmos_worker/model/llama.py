"""The Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) for paged attention.

Weights are stored fused for fewer, larger matmuls: one `qkv` projection and one `gate_up`
projection per layer. Parameters are allocated uninitialised on the target device and dtype and
filled by `load_weights` from `(hf_name, tensor)` pairs, so no random init is ever paid for.
`forward` consumes one `ForwardBatch` (all scheduled tokens of all sequences, flat) and the
per-layer KV caches, and returns hidden states only for `logits_indices` projected to the vocab.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmos_worker.errors import ModelLoadError
from llmos_worker.model.attention import AttentionPlan, paged_attention
from llmos_worker.model.batch import ForwardBatch
from llmos_worker.model.config import ModelConfig
from llmos_worker.model.kernels import (
    DecoderStack,
    NativeKernels,
    StackLayer,
    StackSpec,
    native_kernels,
)
from llmos_worker.model.lora import LoRARows, LoRAStack
from llmos_worker.model.quant import HEAD_MODES, Linear, check_supported, make_linear
from llmos_worker.model.rope import apply_rope, cos_sin_table, inverse_frequencies


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _adopt(mm: Linear) -> nn.Parameter:
    """mm's stored tensor as a (frozen) parameter, shared with mm."""
    if not isinstance(mm.weight, nn.Parameter):
        mm.weight = nn.Parameter(mm.weight, requires_grad=False)
    return mm.weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm: statistics in float32, result cast back before the weight multiply."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # fused kernel, fp32 statistics
    return weight * normed.to(x.dtype)


class DecoderLayer(nn.Module):
    """One pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x))."""

    qkv_mm: Linear
    o_mm: Linear
    gate_up_mm: Linear
    down_mm: Linear

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, index: int = 0
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = index  # why: the layer's slice of a LoRA stack
        qkv_rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.k_end = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim  # end of K in qkv rows
        self.input_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.qkv = _param(qkv_rows, cfg.hidden_size, dtype=dtype, device=device)
        self.o_proj = _param(
            cfg.hidden_size, cfg.num_heads * cfg.head_dim, dtype=dtype, device=device
        )
        self.post_norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.gate_up = _param(
            2 * cfg.intermediate_size, cfg.hidden_size, dtype=dtype, device=device
        )
        self.down = _param(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)
        # the matmuls read these; `quantize` swaps them for packed weights
        self.qkv_mm, self.o_mm = Linear(self.qkv), Linear(self.o_proj)
        self.gate_up_mm, self.down_mm = Linear(self.gate_up), Linear(self.down)

    def linears(self) -> dict[str, Linear]:
        """The projections by the name of the parameter each one stores."""
        return {
            "qkv": self.qkv_mm,
            "o_proj": self.o_mm,
            "gate_up": self.gate_up_mm,
            "down": self.down_mm,
        }

    def quantize(self, mode: str, *, native: bool) -> None:
        """Store the four projections in `mode` (their fp32 tensors are dropped)."""
        self.qkv_mm = make_linear(self.qkv, mode, native=native)
        self.o_mm = make_linear(self.o_proj, mode, native=native)
        self.gate_up_mm = make_linear(self.gate_up, mode, native=native)
        self.down_mm = make_linear(self.down, mode, native=native)
        self.sync_parameters()

    def sync_parameters(self) -> None:
        """Point each projection's parameter at what its `Linear` stores now (packed, fp16,
        int8, or empty for fbgemm's opaque packing), so parameters and state_dict show the
        weights as held and no stale fp32 copy stays alive."""
        for name, mm in self.linears().items():
            setattr(self, name, _adopt(mm))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor,
        plan: AttentionPlan,
        lora: LoRARows | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        t, i = x.shape[0], self.index
        h = rms_norm(x, self.input_norm, cfg.rms_norm_eps)
        qkv = self.qkv_mm(h)  # (T, (H + 2 Hkv) D)
        if lora is not None:
            lora.add(i, "qkv", h, qkv)
        # q and k are adjacent in the fused output: rotate both in one go, (T, H + Hkv, D)
        qk = apply_rope(qkv[:, : self.k_end].view(t, -1, cfg.head_dim), cos, sin)
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
        v = qkv[:, self.k_end :].reshape(t, cfg.num_kv_heads, cfg.head_dim)
        attn = paged_attention(q, k, v, cache, plan, cfg.head_dim**-0.5)
        o = self.o_mm(attn)
        x = x + (o if lora is None else lora.add(i, "o", attn, o))
        h = rms_norm(x, self.post_norm, cfg.rms_norm_eps)
        gate_up = self.gate_up_mm(h)
        if lora is not None:
            lora.add(i, "gate_up", h, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        down = self.down_mm(act)
        return x + (down if lora is None else lora.add(i, "down", act, down))

    def forward_native(
        self,
        x: torch.Tensor,
        delta: torch.Tensor | None,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: torch.Tensor,
        plan: AttentionPlan,
        kernels: NativeKernels,
        lora: LoRARows | None = None,
    ) -> torch.Tensor:
        """The same block with the native per-layer ops (CPU fp32), fewer dispatches per step.

        x (T, hidden) is the residual stream, updated in place: `delta` (the previous block's MLP
        output, not yet added) is folded into this block's first norm. Returns this block's MLP
        output, for the next block (or the final norm) to add.
        """
        cfg = self.cfg
        t, hd, i = x.shape[0], cfg.head_dim, self.index
        h = kernels.add_rms_norm(x, delta, self.input_norm, cfg.rms_norm_eps)
        qkv = self.qkv_mm(h, kernels)  # (T, (H + 2 Hkv) D), fresh and contiguous
        if lora is not None:
            lora.add(i, "qkv", h, qkv)  # why: before RoPE, as PEFT adds to q_proj's output
        kernels.rope_(qkv, cfg.num_heads + cfg.num_kv_heads, hd, positions, *rope)
        heads = qkv.view(t, -1, hd)
        q, k = heads[:, : cfg.num_heads], heads[:, cfg.num_heads : cfg.num_heads + cfg.num_kv_heads]
        v = heads[:, cfg.num_heads + cfg.num_kv_heads :]
        attn = paged_attention(q, k, v, cache, plan, hd**-0.5)
        o = self.o_mm(attn, kernels)
        if lora is not None:
            lora.add(i, "o", attn, o)
        h = kernels.add_rms_norm(x, o, self.post_norm, cfg.rms_norm_eps)
        gate_up = self.gate_up_mm(h, kernels)
        if lora is not None:
            lora.add(i, "gate_up", h, gate_up)
        act = kernels.silu_mul(gate_up)
        down = self.down_mm(act, kernels)
        return down if lora is None else lora.add(i, "down", act, down)


def _stack_layer(layer: DecoderLayer) -> StackLayer:
    def held(mm: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return mm.weight.detach(), mm.scale

    return StackLayer(
        input_norm=layer.input_norm.detach(),
        post_norm=layer.post_norm.detach(),
        qkv=held(layer.qkv_mm),
        o=held(layer.o_mm),
        gate_up=held(layer.gate_up_mm),
        down=held(layer.down_mm),
    )


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied to the embedding if configured)."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    head_mm: Linear
    layers: nn.ModuleList

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.cfg = cfg
        self.dtype = dtype
        self.embed = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, dtype, device, i) for i in range(cfg.num_layers)
        )
        self.norm = _param(cfg.hidden_size, dtype=dtype, device=device)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        )
        self.head_mm = Linear(self.embed if self.lm_head is None else self.lm_head)
        self.quantization = "none"
        # "auto": the native CPU kernels (linear layers on packed weights, decode attention,
        # the per-layer ops) where they apply (CPU, fp32) and build, with steps of decodes and
        # short cached-prefix chunks run through all layers in one native call; "ops": the
        # same kernels called op by op; "torch": the pure-torch path everywhere. Change it with
        # `set_backend`.
        self.backend = "auto"
        # the whole-stack call: bound on first use, dropped when the weights move; it needs
        # every projection packed (known once they are: see `_pack`)
        self._stack: DecoderStack | None = None
        self._stackable = False
        # LoRA adapters' slots (`enable_lora`); None: the base model only
        self.lora: LoRAStack | None = None
        cos, sin = cos_sin_table(
            inverse_frequencies(cfg, rope_factors), cfg.max_position_embeddings
        )
        # (P, 1, D) in the compute dtype, as HF casts cos/sin to the activations' dtype
        self.register_buffer(
            "rope_cos", cos.to(device=device, dtype=dtype)[:, None, :], persistent=False
        )
        self.register_buffer(
            "rope_sin", sin.to(device=device, dtype=dtype)[:, None, :], persistent=False
        )

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def forward(
        self, batch: ForwardBatch, caches: list[torch.Tensor], block_size: int
    ) -> torch.Tensor:
        """Logits (L, vocab) in the model dtype for `batch.logits_indices`."""
        return self.forward_hidden(batch, caches, block_size)[0]

    def forward_hidden(
        self, batch: ForwardBatch, caches: list[torch.Tensor], block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (L, vocab) for `batch.logits_indices` and, when `batch.pool_indices` is set,
        the final hidden states (P, hidden) of those rows (after the last norm, as Hugging
        Face's `last_hidden_state`), both in the model dtype."""
        device = self.device
        rows = batch.logits_indices.to(device)
        num_logits = rows.shape[0]
        if batch.pool_indices is not None:
            rows = torch.cat([rows, batch.pool_indices.to(device)])
        kernels = self._kernels()
        kv = caches[0].dtype if caches else torch.float32
        if kernels is not None and not kernels.reads_kv(kv):
            kernels = None  # why: a cache type the attention kernels do not read (no F16C)
        plan = AttentionPlan.from_batch(batch, block_size, device, self.dtype, kernels)
        positions = batch.positions.to(device)
        x = F.embedding(batch.input_ids.to(device), self.embed)  # (T, hidden)
        lora = LoRARows.of(self.lora, batch.lora_slots)
        if kernels is not None:
            delta: torch.Tensor | None = None
            stack = self._decoder_stack(kernels)
            nd = plan.native
            # adapters' products run inside the whole-stack call when their stack is fp32 on
            # the CPU; otherwise such steps take the per-layer ops, which add them in torch
            stack_lora = None if lora is None else lora.native()
            whole = nd is not None and nd.rows.shape[0] == x.shape[0]
            if stack is not None and nd is not None and whole and (lora is None or stack_lora):
                # every row is a native decode-kernel row (no blocked prefill): one call for all
                stack(
                    x,
                    caches,
                    positions,
                    plan.slot_mapping,
                    nd.rows,
                    nd.block_tables,
                    nd.context_lens,
                    stack_lora,
                )
            else:
                rope = (self.rope_cos[:, 0], self.rope_sin[:, 0])  # (P, D) each
                for layer, cache in zip(self.decoder_layers, caches, strict=True):
                    delta = layer.forward_native(
                        x, delta, positions, rope, cache, plan, kernels, lora
                    )
            x, delta = x[rows], None if delta is None else delta[rows]
            h = kernels.add_rms_norm(x, delta, self.norm, self.cfg.rms_norm_eps)
            return self._split(h, num_logits, kernels)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, 1, D)
        for layer, cache in zip(self.decoder_layers, caches, strict=True):
            x = layer(x, cos, sin, cache, plan, lora)
        x = x[rows]  # why: norm + head only where logits (or hidden states) are wanted
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return self._split(x, num_logits, None)

    def _split(
        self, h: torch.Tensor, num_logits: int, kernels: NativeKernels | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head over the first `num_logits` rows; the rest are pooled hidden states."""
        if h.shape[0] == num_logits:
            return self.head_mm(h, kernels), None
        return self.head_mm(h[:num_logits], kernels), h[num_logits:]

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def _kernels(self) -> NativeKernels | None:
        """The native kernels when this model uses them: backend "auto" and `_native()`."""
        return None if self.backend == "torch" else self._native()

    def _decoder_stack(self, kernels: NativeKernels) -> DecoderStack | None:
        """The whole-stack native call, when backend "auto" and every projection is packed."""
        if self.backend != "auto" or not self._stackable:
            return None
        if self._stack is None:
            cfg = self.cfg
            spec = StackSpec(
                hidden=cfg.hidden_size,
                heads=cfg.num_heads,
                kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                intermediate=cfg.intermediate_size,
                eps=cfg.rms_norm_eps,
                attn_scale=cfg.head_dim**-0.5,
                cos=self.rope_cos[:, 0].contiguous(),
                sin=self.rope_sin[:, 0].contiguous(),
            )
            self._stack = kernels.bind_stack(
                spec, [_stack_layer(layer) for layer in self.decoder_layers]
            )
        return self._stack

    def _native(self) -> NativeKernels | None:
        """The native kernels when this model can use them: CPU, fp32, a supported GQA ratio."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        kernels = native_kernels()
        if kernels is None or self.cfg.num_heads // self.cfg.num_kv_heads > kernels.max_group:
            return None
        return kernels

    def quantize(self, mode: str) -> None:
        """Store every decoder projection and the LM head in `mode` (see `quant.py`).

        Call after `load_weights` (the loader does, with "none" too: it also packs the weights
        for the native kernels). The embedding table stays in the model dtype (it is a lookup);
        a tied LM head gets its own copy of it in `mode` (int4: in 8-bit blocks, GGUF's Q8_0,
        as such files keep the head).
        """
        kernels = self._native()
        native = kernels is not None and kernels.has_linear
        check_supported(mode, self.dtype, self.device, native=native)
        if mode != self.quantization:
            if self.quantization != "none":
                raise ModelLoadError(f"model is already quantized as {self.quantization!r}")
            self._pack(False)
            for layer in self.decoder_layers:
                layer.quantize(mode, native=native)
            head = self.embed if self.lm_head is None else self.lm_head
            self.head_mm = make_linear(head, HEAD_MODES.get(mode, mode), native=native)
            if self.lm_head is not None:
                self.lm_head = _adopt(self.head_mm)
            self.quantization = mode
        self.set_backend(self.backend)  # packs the weights for the native kernels where they apply

    def set_backend(self, backend: str) -> None:
        """Switch between the native kernels ("auto": where they apply, with every projection
        packed for them; "ops": the same, never the whole-stack call) and the pure-torch path
        ("torch": weights unpacked, fp16/int8 then dequantised per call)."""
        if backend not in ("auto", "ops", "torch"):
            raise ValueError(f"unknown backend {backend!r}; use 'auto', 'ops' or 'torch'")
        self.backend = backend
        kernels = self._kernels()
        self._pack(kernels is not None and kernels.has_linear)

    def _pack(self, packed: bool) -> None:
        self._stack = None
        for mm in self.linears():
            if packed and mm.weight is self.embed:
                self.head_mm = mm = Linear(self.embed.detach())  # a copy: the lookup stays
            if packed:
                mm.pack()
            else:
                mm.unpack()
        if self.lm_head is None and not packed and self.head_mm.mode == "none":
            self.head_mm = Linear(self.embed)  # tied and dense: share the embedding again
        for layer in self.decoder_layers:
            layer.sync_parameters()
        if self.lm_head is not None:
            self.lm_head = _adopt(self.head_mm)
        self._stackable = all(
            mm.packed for layer in self.decoder_layers for mm in layer.linears().values()
        )

    def linears(self) -> list[Linear]:
        return [mm for layer in self.decoder_layers for mm in layer.linears().values()] + [
            self.head_mm
        ]

    def weight_bytes(self) -> int:
        """Bytes the weights take now: the embedding and norms plus every stored projection
        (a packed copy of a tied LM head counts on its own)."""
        linears = self.linears()
        held = {id(mm.weight) for mm in linears}
        params = sum(p.numel() * p.element_size() for p in self.parameters() if id(p) not in held)
        return params + sum(mm.nbytes for mm in linears)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from HF-named tensors; every parameter must be covered exactly."""
        cfg = self.cfg
        hd = cfg.head_dim
        q_rows, kv_rows = cfg.num_heads * hd, cfg.num_kv_heads * hd
        layer_slices = {
            "self_attn.q_proj": ("qkv", 0, q_rows),
            "self_attn.k_proj": ("qkv", q_rows, q_rows + kv_rows),
            "self_attn.v_proj": ("qkv", q_rows + kv_rows, q_rows + 2 * kv_rows),
            "self_attn.o_proj": ("o_proj", None, None),
            "mlp.gate_proj": ("gate_up", 0, cfg.intermediate_size),
            "mlp.up_proj": ("gate_up", cfg.intermediate_size, 2 * cfg.intermediate_size),
            "mlp.down_proj": ("down", None, None),
            "input_layernorm": ("input_norm", None, None),
            "post_attention_layernorm": ("post_norm", None, None),
        }
        layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
        expected = 2 + 9 * cfg.num_layers + (0 if self.lm_head is None else 1)
        seen: set[str] = set()
        for name, tensor in weights:
            target: torch.Tensor
            if name == "model.embed_tokens.weight":
                target = self.embed
            elif name == "model.norm.weight":
                target = self.norm
            elif name == "lm_head.weight":
                if self.lm_head is None:
                    continue  # tied: some checkpoints still ship a copy
                target = self.lm_head
            elif name.endswith("rotary_emb.inv_freq"):
                continue
            else:
                m = layer_re.match(name)
                if m is None or m.group(2) not in layer_slices or int(m.group(1)) >= cfg.num_layers:
                    raise ModelLoadError(f"unexpected weight {name!r} for a Llama decoder")
                attr, lo, hi = layer_slices[m.group(2)]
                target = getattr(self.layers[int(m.group(1))], attr)
                if lo is not None:
                    target = target[lo:hi]
            if tuple(target.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
            seen.add(name)
        if len(seen) != expected:
            raise ModelLoadError(
                f"checkpoint covers {len(seen)} of {expected} weight tensors "
                f"(e.g. layer 0 has: {sorted(n for n in seen if '.layers.0.' in n)})"
            )
