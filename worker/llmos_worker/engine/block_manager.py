"""The KV block manager: a fixed pool of ref-counted blocks, block tables and the prefix cache.

The pool is `num_blocks` blocks of `block_size` token slots each, allocated once by the model
runner; this module only does the bookkeeping. A sequence's block table maps its logical blocks to
physical ones. Full blocks are identified by a hash chain `sha256(parent, salt, token ids)`, so a
later sequence with the same prefix (and the same tenant salt and LoRA adapter) reuses their KV
instead of recomputing it. Blocks whose ref count drops to zero go to the free list in LRU order
and keep their hash until they are handed out again, so cached prefixes survive until memory is
needed. Sequences forked from one parent share all its blocks; a shared, partially filled last
block is copied on write (the copy itself is done by the runner, from the `(src, dst)` pairs
returned here).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq

from llmos_worker.engine.sequence import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Seq[int], salt: str) -> BlockHash:
    """Hash of one full block, chained to its parent so equal blocks at different offsets differ."""
    h = hashlib.sha256(parent or b"")
    h.update(salt.encode())
    h.update(b"\x00")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Ref-counted block pool with an LRU free list and a hash-chain prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.hash_to_block: dict[BlockHash, int] = {}
        # free blocks, least recently freed first; values unused (OrderedDict = O(1) remove)
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # cumulative, tokens
        self.prefix_hits = 0  # cumulative, tokens

    # ---------------------------------------------------------------- accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- hashing
    def update_hashes(self, seq: Sequence) -> None:
        """Extend `seq.block_hashes` to cover every full block of its known token ids."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), seq.num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], seq.prefix_salt))

    # ---------------------------------------------------------------- admission
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache holding the longest cached prefix of `seq` (no side effects).

        At most `num_tokens - 1` tokens are taken from the cache: the last token must be computed
        so that the step yields its logits.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _blocks_needed(self, seq: Sequence, num_new_tokens: int, num_computed_blocks: int) -> int:
        """Free blocks needed to give `seq` KV room for `num_new_tokens` more tokens."""
        have = len(seq.block_table) + num_computed_blocks
        computed = seq.num_computed_tokens + num_computed_blocks * self.block_size
        need = max(0, self.blocks_for(computed + num_new_tokens) - have)
        # copy-on-write: the next write lands in a shared, partially filled block
        first = computed // self.block_size
        if (
            computed % self.block_size
            and first < len(seq.block_table)
            and self.ref_counts[seq.block_table[first]] > 1
        ):
            need += 1
        return need

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: Seq[int] = ()
    ) -> bool:
        """Whether `allocate(seq, num_new_tokens, computed_blocks)` would succeed."""
        need = self._blocks_needed(seq, num_new_tokens, len(computed_blocks))
        # cached blocks sitting in the free list stop being free once touched
        revived = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        return need + revived <= len(self.free_blocks)

    def allocate(
        self, seq: Sequence, num_new_tokens: int, computed_blocks: Seq[int] = ()
    ) -> list[tuple[int, int]]:
        """Give `seq` room for `num_new_tokens` more tokens; returns copy-on-write pairs.

        `computed_blocks` (from `get_computed_blocks`, only for a sequence holding no blocks yet)
        are shared into its table and count as computed tokens.
        """
        if not self.can_allocate(seq, num_new_tokens, computed_blocks):
            raise RuntimeError("allocate() called without room; check can_allocate() first")
        copies: list[tuple[int, int]] = []
        if not seq.block_table:  # a new admission: this is its prefix-cache lookup
            for b in computed_blocks:
                self._take(b)
            seq.block_table.extend(computed_blocks)
            seq.num_computed_tokens = len(computed_blocks) * self.block_size
            seq.num_cached_tokens = seq.num_computed_tokens
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += seq.num_cached_tokens
        elif computed_blocks:
            raise RuntimeError("computed blocks are only for a sequence without blocks")
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        if seq.num_computed_tokens % bs and self.ref_counts[seq.block_table[first]] > 1:
            src = seq.block_table[first]
            dst = self._pop_free()
            self.ref_counts[src] -= 1
            seq.block_table[first] = dst
            copies.append((src, dst))
        while len(seq.block_table) < self.blocks_for(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._pop_free())
        return copies

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:  # evict its cached prefix
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    # ---------------------------------------------------------------- after a step
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of `seq`'s blocks whose slots are now all computed."""
        if not self.enable_prefix_caching:
            return
        self.update_hashes(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for i in range(num_full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = seq.block_hashes[i]
            if h in self.hash_to_block:
                # an identical block computed concurrently: the first stays cached, this one private
                continue
            self.block_hash[block] = h
            self.hash_to_block[h] = block

    # ---------------------------------------------------------------- fork and free
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of `parent`'s blocks with `child` (copy-on-write on the next partial write)."""
        for b in parent.block_table:
            self.ref_counts[b] += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks reaching zero go to the free list, tail blocks first.

        why reverse order: a sequence's tail is the least shareable part, so it should be the
        first to be evicted; hashed blocks go to the back of the LRU list, unhashed to the front.
        """
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_hash[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks stay where they are)."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
