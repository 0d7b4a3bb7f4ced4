"""LoRA adapters in PEFT's format, and the stacked slots that let one forward mix them.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`, as PEFT's
`save_pretrained` writes it. `read_adapter` parses and checks one against the base model's shape:
LoRA (not DoRA, no bias, no `modules_to_save`), on any of q/k/v/o and gate/up/down, every rank at
most `max_rank`, tensors finite and of the right shapes; anything else is an `AdapterError` (HTTP
400) that says what is wrong, and nothing of it reaches the model. PEFT computes
`y = W x + B (A x) * s` with `s = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`); the
scale is folded into B once, here.

`LoRAStack` holds `slots` adapters on the model's device, per layer and per fused projection
(qkv, o, gate_up, down): A as (slots, R, in) and B transposed as (slots, R, out), where R is the
projection's part count times `max_rank`; each part (q, k, v; gate, up) owns its own R/parts rows
of A and columns of B, zero where an adapter has no such module or a smaller rank, so a fused
projection takes one low-rank product per adapter. A forward gets each token's slot
(`ForwardBatch.lora_slots`, -1 for the base model); `LoRARows` groups them into runs of one slot
(the engine orders a batch by slot, so each adapter is one run) and adds
`(x[run] @ A[slot].T) @ Bt[slot]` to each projection's output: one pair of small matmuls per
adapter present, whatever the number of requests, and nothing at all for base rows. Steps of at
most `DENSE_ROWS` rows (decode) instead take every slot's A at once, `x @ A_all.T`, zero the
columns of other slots with a per-step row-by-slot mask, and add `(...) @ Bt_all`: three ops per
projection whatever the number of adapters, where the runs cost a handful of dispatches each
(4 adapters x 4 projections x 30 layers of them made the products a sixth of a decode step).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmos_worker.errors import InvalidRequestError
from llmos_worker.model.config import ModelConfig
from llmos_worker.model.kernels import STACK_LORA_MAX_RANK, StackLoRA

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20

# PEFT module name -> (fused projection, part within it)
MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}
PROJECTIONS = ("qkv", "o", "gate_up", "down")
# why 64: up to here a step is dispatch-bound and the dense products (every slot's columns for
# every row) cost less than the runs' dispatches; longer prefill steps are compute-bound and
# the runs compute only each row's own adapter
DENSE_ROWS = 64
PARTS = {"qkv": 3, "o": 1, "gate_up": 2, "down": 1}

_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AdapterError(InvalidRequestError):
    """An adapter that cannot be served: missing, malformed, oversized or of another shape."""

    def __init__(self, message: str, *, code: str = "invalid_lora_adapter") -> None:
        super().__init__(message, param="lora_path", code=code)


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable module of one decoder layer."""
    hd, hidden, inter = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (hidden, cfg.num_heads * hd),
        "k_proj": (hidden, cfg.num_kv_heads * hd),
        "v_proj": (hidden, cfg.num_kv_heads * hd),
        "o_proj": (cfg.num_heads * hd, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def max_adapter_bytes(cfg: ModelConfig, max_rank: int) -> int:
    """The largest weights file an adapter of rank `max_rank` on every module can need (fp32),
    plus room for the safetensors header; anything bigger is refused unread."""
    per_layer = sum(max_rank * (i + o) for i, o in module_shapes(cfg).values())
    return 4 * per_layer * cfg.num_layers + (1 << 20)


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """One parsed adapter: per (layer, module) its A (r, in) and scaled B (out, r), fp32 CPU."""

    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    digest: str  # sha256 over the config and weights files: the adapter's identity

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * 4 + b.numel() * 4 for a, b in self.weights.values())

    @property
    def modules(self) -> list[str]:
        return sorted({m for _, m in self.weights})


def _config(path: Path) -> dict[str, object]:
    file = path / CONFIG_NAME
    try:
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise AdapterError(f"{file} is larger than {MAX_CONFIG_BYTES} bytes")
        raw = json.loads(file.read_bytes())
    except FileNotFoundError as exc:
        raise AdapterError(f"{path} has no {CONFIG_NAME}; is it a PEFT LoRA adapter?") from exc
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {file}: {exc}") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{file} is not a JSON object")
    return raw


def _check_config(raw: dict[str, object], max_rank: int) -> tuple[int, float, float]:
    """(rank, alpha, scaling) of a LoRA config that this server can apply exactly."""
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"peft_type {peft_type!r} is not supported; only LORA adapters are")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layers) are not supported",
        "modules_to_save": "adapters with modules_to_save (full copies of layers) are not "
        "supported",
        "rank_pattern": "per-module ranks (rank_pattern) are not supported",
        "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
        "layer_replication": "layer_replication is not supported",
        "lora_bias": "LoRA bias terms are not supported",
    }
    for key, why in refused.items():
        if raw.get(key):
            raise AdapterError(why)
    if raw.get("bias", "none") != "none":
        raise AdapterError(f"bias {raw.get('bias')!r} is not supported; only 'none'")
    r, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"r must be a positive integer, got {r!r}")
    if r > max_rank:
        raise AdapterError(
            f"the adapter's rank {r} exceeds the server's max LoRA rank {max_rank}",
            code="lora_rank_too_large",
        )
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(r) if raw.get("use_rslora") else alpha / r
    return r, float(alpha), scaling


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
    return h.hexdigest()


def read_adapter(
    name: str, path: str | os.PathLike[str], cfg: ModelConfig, max_rank: int
) -> LoRAAdapter:
    """Parse and check the PEFT LoRA adapter in directory `path` for a model shaped `cfg`."""
    from safetensors import safe_open

    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"LoRA adapter path {str(path)!r} is not a directory")
    rank, alpha, scaling = _check_config(_config(directory), max_rank)
    file = directory / WEIGHTS_NAME
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise AdapterError(f"{directory} has no readable {WEIGHTS_NAME}: {exc}") from exc
    limit = max_adapter_bytes(cfg, max_rank)
    if size > limit:
        raise AdapterError(
            f"{file} is {size} bytes; an adapter of rank {max_rank} on this model takes at most "
            f"{limit}",
            code="lora_adapter_too_large",
        )
    shapes = module_shapes(cfg)
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                m = _KEY_RE.match(key)
                if m is None:
                    raise AdapterError(
                        f"tensor {key!r} is not a LoRA A/B weight of a Llama q/k/v/o or "
                        "gate/up/down projection"
                    )
                layer, module, which = int(m.group(1)), m.group(2), m.group(3)
                if layer >= cfg.num_layers:
                    raise AdapterError(
                        f"tensor {key!r} is for layer {layer}; the model has {cfg.num_layers}"
                    )
                found.setdefault((layer, module), {})[which] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as exc:  # why: safetensors raises its own error types on a corrupt file
        raise AdapterError(f"cannot read {file}: {exc}") from exc
    if not found:
        raise AdapterError(f"{file} holds no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), pair in sorted(found.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = shapes[module]
        if a.dtype not in _FLOAT_DTYPES or b.dtype not in _FLOAT_DTYPES:
            raise AdapterError(f"{where}: weights must be float32, float16 or bfloat16")
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise AdapterError(
                f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit this "
                f"model at rank {rank} (expected {(rank, fan_in)} and {(fan_out, rank)})"
            )
        a, b = a.float(), b.float() * scaling
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{where}: weights are not all finite")
        weights[(layer, module)] = (a.contiguous(), b.contiguous())
    return LoRAAdapter(
        name=name,
        path=str(directory),
        rank=rank,
        alpha=alpha,
        scaling=scaling,
        weights=weights,
        digest=_digest(directory / CONFIG_NAME, file),
    )


class LoRAStack:
    """`slots` adapters' weights on the model's device, stacked per layer and projection."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError("a LoRA stack needs at least one slot of rank 1 or more")
        self.cfg = cfg
        self.slots = slots
        self.max_rank = max_rank
        self.dtype = dtype
        hd = cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        # projection -> (in, out, [(out offset, out size) per part])
        q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
        inter = cfg.intermediate_size
        self.layout: dict[str, tuple[int, int, list[tuple[int, int]]]] = {
            "qkv": (cfg.hidden_size, qkv_out, [(0, q), (q, kv), (q + kv, kv)]),
            "o": (q, cfg.hidden_size, [(0, cfg.hidden_size)]),
            "gate_up": (cfg.hidden_size, 2 * inter, [(0, inter), (inter, inter)]),
            "down": (inter, cfg.hidden_size, [(0, cfg.hidden_size)]),
        }
        # [layer][projection] -> A (slots, R, in), Bt (slots, R, out)
        self.a: list[dict[str, torch.Tensor]] = []
        self.bt: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.num_layers):
            a, bt = {}, {}
            for proj, (fan_in, fan_out, parts) in self.layout.items():
                rows = len(parts) * max_rank
                a[proj] = torch.zeros(slots, rows, fan_in, dtype=dtype, device=device)
                bt[proj] = torch.zeros(slots, rows, fan_out, dtype=dtype, device=device)
            self.a.append(a)
            self.bt.append(bt)
        # every slot at once, views of the same storage (so `set` shows through): A_all.T
        # (in, slots R) and Bt_all (slots R, out)
        self.a_all_t = [{p: t.view(-1, t.shape[-1]).t() for p, t in a.items()} for a in self.a]
        self.bt_all = [{p: t.view(-1, t.shape[-1]) for p, t in bt.items()} for bt in self.bt]
        # for the whole-stack native call: each slot's rank (0: empty) and, per layer, the
        # addresses of A and Bt of every projection (the tensors never move: `set` copies in)
        self.ranks = torch.zeros(slots, dtype=torch.int64)
        self.native_table: torch.Tensor | None = None
        if dtype is torch.float32 and torch.device(device).type == "cpu":
            self.native_table = torch.tensor(
                [
                    [t.data_ptr() for p in PROJECTIONS for t in (a[p], bt[p])]
                    for a, bt in zip(self.a, self.bt, strict=True)
                ],
                dtype=torch.int64,
            ).reshape(cfg.num_layers, 2 * len(PROJECTIONS))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (*self.a, *self.bt) for t in d.values())

    def set(self, slot: int, adapter: LoRAAdapter) -> None:
        """Write `adapter` into `slot` (whatever held it before is overwritten)."""
        if adapter.rank > self.max_rank:
            raise AdapterError(f"rank {adapter.rank} exceeds the stack's {self.max_rank}")
        self.clear(slot)
        r = adapter.rank
        with torch.no_grad():
            for (layer, module), (a, b) in adapter.weights.items():
                proj, part = MODULES[module]
                offset, size = self.layout[proj][2][part]
                lo = part * self.max_rank
                self.a[layer][proj][slot, lo : lo + r].copy_(a)
                self.bt[layer][proj][slot, lo : lo + r, offset : offset + size].copy_(b.T)
        self.ranks[slot] = r

    def clear(self, slot: int) -> None:
        self.ranks[slot] = 0
        with torch.no_grad():
            for layer in range(self.cfg.num_layers):
                for proj in PROJECTIONS:
                    self.a[layer][proj][slot].zero_()
                    self.bt[layer][proj][slot].zero_()


@dataclass(frozen=True)
class LoRARows:
    """One forward's adapter rows: runs `(slot, first row, end row)` of equal slot."""

    stack: LoRAStack
    runs: tuple[tuple[int, int, int], ...]
    # projection -> (rows, slots R) 1 where a column belongs to the row's slot; None: by runs
    masks: dict[str, torch.Tensor] | None = None
    slots: torch.Tensor | None = None  # (rows,) int64: each row's slot, -1 for the base model

    @classmethod
    def of(cls, stack: LoRAStack | None, slots: torch.Tensor | None) -> LoRARows | None:
        """Runs of the per-token `slots` (-1: base), or None when no row has an adapter."""
        if stack is None or slots is None:
            return None
        runs: list[tuple[int, int, int]] = []
        start, current = 0, -1
        values = slots.tolist()
        for i, slot in enumerate([*values, -1]):
            if slot != current:
                if current >= 0:
                    runs.append((current, start, i))
                start, current = i, slot
        if not runs:
            return None
        if any(not 0 <= s < stack.slots for s, _, _ in runs):
            raise ValueError(f"LoRA slot out of range [0, {stack.slots})")
        row_slots = slots.to(torch.int64).contiguous()
        if len(values) > DENSE_ROWS:
            return cls(stack, tuple(runs), slots=row_slots)
        row_slot = torch.tensor(values, device=stack.a_all_t[0]["o"].device).unsqueeze(1)
        masks = {}
        for proj, (_, _, parts) in stack.layout.items():
            per_slot = len(parts) * stack.max_rank
            column_slot = torch.arange(stack.slots * per_slot, device=row_slot.device) // per_slot
            masks[proj] = (row_slot == column_slot).to(stack.dtype)  # base rows (-1): all zero
        return cls(stack, tuple(runs), masks, row_slots)

    def add(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += B (A x) for each run's adapter, in place; returns y. x (T, in), y (T, out)."""
        if self.masks is not None:
            low = torch.mm(x, self.stack.a_all_t[layer][proj]).mul_(self.masks[proj])
            return y.addmm_(low, self.stack.bt_all[layer][proj])
        a, bt = self.stack.a[layer][proj], self.stack.bt[layer][proj]
        for slot, lo, hi in self.runs:
            y[lo:hi].addmm_(x[lo:hi] @ a[slot].T, bt[slot])
        return y

    def native(self) -> StackLoRA | None:
        """These rows' adapters for the whole-stack native call (None: an fp32 CPU stack only,
        of a rank the native kernel takes)."""
        table = self.stack.native_table
        if table is None or self.slots is None or self.stack.max_rank > STACK_LORA_MAX_RANK:
            return None
        return StackLoRA(table, self.stack.ranks, self.slots, self.stack.max_rank)

    def row_slots(self, num_rows: int) -> torch.Tensor:
        """(num_rows,) int64 slot of each row, -1 where the base model runs."""
        out = torch.full((num_rows,), -1, dtype=torch.int64)
        for slot, lo, hi in self.runs:
            out[lo:hi] = slot
        return out
