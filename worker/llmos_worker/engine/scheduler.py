"""The scheduler: iteration-level continuous batching over a fixed token budget.

Each `schedule()` call decides what one model forward computes. Running sequences go first —
decodes (one token each) before unfinished prefill chunks — then waiting sequences are admitted
in policy order while the token budget (`max_num_batched_tokens`), the seat budget
(`max_num_seqs`) and free KV blocks allow; a long prompt gets whatever budget is left, so its
prefill is split over several steps (chunked prefill) while decodes keep flowing. When a running
sequence needs a block and none is free, the lowest-priority, latest-arrived running sequence is
preempted by recompute: its blocks are freed and it waits again with all its tokens as prompt.
Under `fcfs` the head of the waiting queue is never overtaken (no starvation); under `priority`
a waiting request may also preempt a running one of lower priority. With LoRA adapters, a
sequence also needs its adapter in one of the model's slots while it runs (`SlotPins`); when every
slot is pinned by other adapters' running sequences the head of the queue waits, like for blocks,
until one of them finishes (a preempted sequence gives its pin back).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos_worker.engine.block_manager import BlockManager
from llmos_worker.engine.config import SchedulingPolicy
from llmos_worker.engine.sequence import Sequence, SequenceStatus

SortKey = tuple[float, ...]


class SlotPins(Protocol):
    """Who holds the model's LoRA slots (`llmos_worker.engine.adapters.AdapterManager`)."""

    def admit(self, seq: Sequence) -> bool:
        """Pin a slot holding `seq`'s adapter (True at once for the base model); False while
        every slot is pinned by other adapters."""
        ...

    def share(self, seq: Sequence) -> None:
        """Pin the slot `seq` was forked with once more."""
        ...

    def leave(self, seq: Sequence) -> None:
        """Drop `seq`'s pin, if it holds one."""
        ...


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # (src, dst) KV block copies (copy-on-write) to do before the forward
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Waiting queue, running set and the per-step scheduling decision."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: SchedulingPolicy = "fcfs",
        slots: SlotPins | None = None,
    ):
        self.bm = block_manager
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.key: Callable[[Sequence], SortKey] = (
            (lambda s: (s.arrival_time, s.seq_id))
            if policy == "fcfs"
            else (lambda s: (s.priority, s.arrival_time, s.seq_id))
        )
        self.waiting: list[Sequence] = []  # kept sorted by self.key
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # cumulative
        # why: admitting into the very last free blocks makes the next decode preempt at once
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    # ---------------------------------------------------------------- queue
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.key)

    def add_running(self, seq: Sequence) -> None:
        """Insert an already-computed sequence (a fork of a running one)."""
        seq.status = SequenceStatus.RUNNING
        if self.slots is not None:
            self.slots.share(seq)
        self.running.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def seats_used(self) -> int:
        return sum(s.num_seats for s in self.running)

    # ---------------------------------------------------------------- the step decision
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: dict[Sequence, int] = {}
        copies: dict[Sequence, list[tuple[int, int]]] = {}

        def preempt(victim: Sequence) -> None:
            nonlocal budget
            if victim in scheduled:
                budget += scheduled.pop(victim)
                copies.pop(victim, None)
            self._preempt(victim)
            out.preempted.append(victim)

        # 1. running: decodes first, then unfinished prefills, each group in policy order
        for seq in sorted(self.running, key=lambda s: (s.is_prefill, *self.key(s))):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                continue
            while not self.bm.can_allocate(seq, n):
                victim = max(self.running, key=self.key)
                preempt(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                copies[seq] = self.bm.allocate(seq, n)
                scheduled[seq] = n
                budget -= n

        # 2. waiting, in policy order; the head is never skipped. why not after a preemption
        # above: the pool is short, a newcomer would only be preempted again
        short_of_blocks = bool(out.preempted)
        while self.waiting and budget > 0 and not short_of_blocks:
            seq = self.waiting[0]
            if self.seats_used() + seq.num_seats > self.max_num_seqs:
                if self._preempt_for(seq, preempt):
                    continue
                break
            computed = self.bm.get_computed_blocks(seq)
            n = min(seq.num_tokens - len(computed) * self.bm.block_size, budget)
            reserve = self.watermark_blocks if self.running else 0
            if not self._fits(seq, n, computed, reserve):
                if self._preempt_for(seq, preempt):
                    continue
                break
            if self.slots is not None and not self.slots.admit(seq):
                break  # why: every LoRA slot is pinned; running sequences will free one
            self.waiting.pop(0)
            copies[seq] = self.bm.allocate(seq, n, computed)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq] = n
            budget -= n

        out.scheduled = [ScheduledSeq(s, n) for s, n in scheduled.items()]
        out.copies = [pair for s in scheduled for pair in copies.get(s, [])]
        return out

    def _fits(self, seq: Sequence, n: int, computed: list[int], reserve: int) -> bool:
        if not self.bm.can_allocate(seq, n, computed):
            return False
        if reserve == 0:
            return True
        need = self.bm.blocks_for(len(computed) * self.bm.block_size + n) - len(computed)
        revived = sum(1 for b in computed if self.bm.ref_counts[b] == 0)
        return need + revived + reserve <= self.bm.num_free_blocks

    def _preempt_for(self, seq: Sequence, preempt: Callable[[Sequence], None]) -> bool:
        """Under `priority`, preempt a running sequence strictly behind waiting `seq`."""
        if self.policy != "priority" or not self.running:
            return False
        victim = max(self.running, key=self.key)
        if self.key(victim) <= self.key(seq):
            return False
        preempt(victim)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.slots is not None:
            self.slots.leave(seq)
        self.bm.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    # ---------------------------------------------------------------- after the forward
    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.bm.cache_full_blocks(item.seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from wherever it is and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            if self.slots is not None:
                self.slots.leave(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
