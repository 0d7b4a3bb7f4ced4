"""LoRA adapters an engine serves: registered by name, cached in host memory, held in slots.

Three tiers, as in vLLM: *registered* adapters (a name and the path it was loaded from, at
start-up with `lora_modules` or at run time) are what requests may name; at most `max_cpu_loras`
of them stay parsed in host memory (least recently used first out; an evicted one is read again
from its path, and checked against the digest it was registered with, when a request names it);
at most `max_loras` sit in the model's `LoRAStack` slots, which is what one forward can mix.

A request gets its adapter's parsed weights when it is added (`resolve`), so nothing can fail
later: admission only has to find a slot. A running sequence pins the slot holding its adapter
(`admit`, `share` for a fork, `leave` when it is preempted or ends); a slot nobody pins is reused
for another adapter, least recently used first. Slots are keyed by the adapter's digest, so an
adapter unloaded and loaded again with the same files finds its slot still filled. Reading an
adapter (`read`) touches no engine state, so the server does it off the engine thread; the
registry and the host-memory cache (`register`, `unregister`, `resolve`) are guarded by a lock,
as the server changes them from its event loop; the slots belong to the engine thread. `listing`
is a snapshot other threads may read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmos_worker.errors import InvalidRequestError
from llmos_worker.model.config import ModelConfig
from llmos_worker.model.lora import AdapterError, LoRAAdapter, LoRAStack, read_adapter

if TYPE_CHECKING:
    from llmos_worker.engine.config import EngineConfig
    from llmos_worker.engine.sequence import Sequence
    from llmos_worker.model.loader import LoadedModel

log = logging.getLogger(__name__)

MAX_REGISTERED = 1024  # names a server keeps; each costs a path and a digest


class AdapterNotFoundError(InvalidRequestError):
    """A request or an unload names no registered adapter (HTTP 404, `model_not_found`)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"The model `{name}` does not exist.", param="model", code="model_not_found"
        )
        self.name = name


@dataclass(frozen=True)
class AdapterInfo:
    """What `/v1/models` shows of a registered adapter."""

    name: str
    path: str
    rank: int
    digest: str
    created: int


@contextlib.contextmanager
def adapter_directory(path: str, key_file: str | None) -> Iterator[str]:
    """The plaintext directory of an adapter: a `fetch-model` directory is verified against its
    manifest and, when encrypted, decrypted into memory with `key_file`; else `path` itself."""
    from llmos_worker.errors import StorageError
    from llmos_worker.storage.plaintext import open_model_source

    try:
        with open_model_source(path, key_file=key_file) as plain:
            yield plain
    except StorageError as exc:
        raise AdapterError(f"cannot open the adapter at {path!r}: {exc}") from exc


class AdapterManager:
    """Registry, host-memory LRU and slot assignment of one engine's LoRA adapters."""

    def __init__(
        self,
        config: ModelConfig,
        stack: LoRAStack,
        *,
        max_cpu_loras: int,
        base_name: str,
        key_file: str | None = None,
        allow_runtime_updates: bool = False,
        runtime_dirs: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.allow_runtime_updates = allow_runtime_updates  # the HTTP load/unload routes
        # why resolved once: a run-time path is compared after its own symlinks are resolved
        self.runtime_dirs = tuple(os.path.realpath(d) for d in runtime_dirs)
        self._lock = threading.Lock()
        self.stack = stack
        self.max_rank = stack.max_rank
        self.max_cpu_loras = max_cpu_loras
        self.base_name = base_name
        self.key_file = key_file
        self._registered: dict[str, AdapterInfo] = {}
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._slot_digest: list[str | None] = [None] * stack.slots
        self._pins = [0] * stack.slots
        self._slot_used = [0.0] * stack.slots  # monotonic time of the last pin
        self.listing: tuple[AdapterInfo, ...] = ()
        self.slot_loads = 0  # adapters written into a slot (a measure of slot churn)

    @classmethod
    def attach(cls, loaded: LoadedModel, config: EngineConfig) -> AdapterManager:
        """Give `loaded.model` a stack of `config.max_loras` slots and register
        `config.lora_modules` (a bad one fails start-up with its reason)."""
        model = loaded.model
        stack = LoRAStack(
            loaded.config,
            slots=config.max_loras,
            max_rank=config.max_lora_rank,
            dtype=model.dtype,
            device=model.device,
        )
        model.lora = stack
        manager = cls(
            loaded.config,
            stack,
            max_cpu_loras=config.cpu_lora_capacity,
            base_name=loaded.name,
            key_file=config.lora_key_file,
            allow_runtime_updates=config.allow_runtime_lora_updating,
            runtime_dirs=config.lora_runtime_dirs,
        )
        for name, path in config.lora_modules.items():
            manager.register(manager.read(name, path))
        return manager

    # ---- any thread ----------------------------------------------------------------------

    def runtime_path_allowed(self, path: str) -> bool:
        """Whether a run-time load may read `path`: under one of `runtime_dirs` (symlinks
        resolved, so `..` and links cannot leave them), or anywhere when none are set."""
        if not self.runtime_dirs:
            return True
        real = os.path.realpath(path)
        return any(os.path.commonpath([real, d]) == d for d in self.runtime_dirs)

    def read(self, name: str, path: str) -> LoRAAdapter:
        """Parse and check the adapter at `path` (no engine state is touched)."""
        with adapter_directory(path, self.key_file) as plain:
            adapter = read_adapter(name, plain, self.config, self.max_rank)
        return LoRAAdapter(
            name=name,
            path=path,
            rank=adapter.rank,
            alpha=adapter.alpha,
            scaling=adapter.scaling,
            weights=adapter.weights,
            digest=adapter.digest,
        )

    @property
    def names(self) -> frozenset[str]:
        return frozenset(info.name for info in self.listing)

    # ---- any thread, under the lock: the registry ----------------------------------------

    def register(self, adapter: LoRAAdapter) -> AdapterInfo:
        """Make `adapter` servable under its name (refused if the name is taken)."""
        with self._lock:
            return self._register(adapter)

    def _register(self, adapter: LoRAAdapter) -> AdapterInfo:
        name = adapter.name
        if not name or name == self.base_name:
            raise AdapterError(
                f"an adapter cannot be named {name!r}: the base model has that name",
                code="invalid_lora_name",
            )
        if name in self._registered:
            raise AdapterError(
                f"an adapter named {name!r} is already loaded; unload it first",
                code="lora_already_loaded",
            )
        if len(self._registered) >= MAX_REGISTERED:
            raise AdapterError(
                f"{MAX_REGISTERED} adapters are loaded already; unload one first",
                code="too_many_loras",
            )
        info = AdapterInfo(name, adapter.path, adapter.rank, adapter.digest, int(time.time()))
        self._registered[name] = info
        self._cache(adapter)
        self._publish()
        log.info("LoRA adapter %s loaded from %s (rank %d)", name, adapter.path, adapter.rank)
        return info

    def unregister(self, name: str) -> None:
        """Forget `name`: new requests may not use it; requests that have it run to their end."""
        with self._lock:
            if self._registered.pop(name, None) is None:
                raise AdapterNotFoundError(name)
            self._cpu.pop(name, None)
            self._publish()
        log.info("LoRA adapter %s unloaded", name)

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self._registered.get(name)
        if info is None:
            raise AdapterNotFoundError(name)
        return info

    def resolve(self, name: str) -> LoRAAdapter:
        """The parsed adapter registered as `name`, read again from its path if it left host
        memory (and refused if its files changed since it was registered)."""
        info = self.info(name)
        with self._lock:
            adapter = self._cpu.get(name)
            if adapter is not None:
                self._cpu.move_to_end(name)
                return adapter
        adapter = self.read(name, info.path)
        if adapter.digest != info.digest:
            raise AdapterError(
                f"the adapter {name!r} at {info.path} changed on disk since it was loaded; "
                "unload and load it again",
                code="lora_changed",
            )
        with self._lock:
            self._cache(adapter)
        return adapter

    # ---- engine thread: slots (the scheduler's `SlotPins`) -------------------------------

    def admit(self, seq: Sequence) -> bool:
        if seq.lora is None:
            return True
        slot = self._acquire(seq.lora)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def share(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self._pins[seq.lora_slot] += 1

    def leave(self, seq: Sequence) -> None:
        slot = seq.lora_slot
        if slot < 0:
            return
        if self._pins[slot] <= 0:
            raise RuntimeError(f"LoRA slot {slot} released more often than pinned")
        self._pins[slot] -= 1
        seq.lora_slot = -1

    def pinned(self) -> int:
        """Slots some running sequence holds now."""
        return sum(1 for p in self._pins if p)

    def resident(self) -> list[str | None]:
        """The digest each slot holds (None: empty)."""
        return list(self._slot_digest)

    # ---- internals -----------------------------------------------------------------------

    def _acquire(self, adapter: LoRAAdapter) -> int | None:
        """Pin a slot holding `adapter`, writing it into the least recently used free slot if
        none does; None while every slot is pinned by other adapters."""
        slots = range(self.stack.slots)
        slot = next((s for s in slots if self._slot_digest[s] == adapter.digest), None)
        if slot is None:
            free = [s for s in slots if self._pins[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: (self._slot_digest[s] is not None, self._slot_used[s]))
            self.stack.set(slot, adapter)
            self._slot_digest[slot] = adapter.digest
            self.slot_loads += 1
        self._pins[slot] += 1
        self._slot_used[slot] = time.monotonic()
        return slot

    def _cache(self, adapter: LoRAAdapter) -> None:
        self._cpu[adapter.name] = adapter
        self._cpu.move_to_end(adapter.name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    def _publish(self) -> None:
        self.listing = tuple(self._registered.values())
