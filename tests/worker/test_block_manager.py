"""BlockManager: allocation, prefix cache (hash chain + salt + LRU survival), copy-on-write.

Unit tests pin single behaviours; a hypothesis test drives random admit/grow/fork/free programs
and checks the pool invariants after every operation. Pure Python, well under a second.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llmos_worker.engine import BlockManager, SamplingParams, Sequence

BS = 4


def seq(tokens: list[int], salt: str = "") -> Sequence:
    return Sequence(
        request_id="r",
        index=0,
        token_ids=list(tokens),
        num_prompt_tokens=len(tokens),
        params=SamplingParams(),
        cache_salt=salt,
    )


def admit(bm: BlockManager, s: Sequence) -> list[tuple[int, int]]:
    computed = bm.get_computed_blocks(s)
    n = s.num_tokens - len(computed) * BS
    assert bm.can_allocate(s, n, computed)
    copies = bm.allocate(s, n, computed)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)
    return copies


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            refs[b] += 1
    assert refs == bm.ref_counts
    assert bm.num_free_blocks + sum(1 for r in refs if r > 0) == bm.num_blocks
    assert set(bm.free_blocks) == {b for b, r in enumerate(refs) if r == 0}
    for h, b in bm.hash_to_block.items():
        assert bm.block_hash[b] == h
    # a block shared by live sequences holds the same tokens at the same position for each of
    # them (prefix-cache hit or fork); writes into it go through copy-on-write (checked in grow)
    owners: dict[int, list[tuple[int, list[int]]]] = {}
    for s in live:
        for i, b in enumerate(s.block_table):
            filled = s.token_ids[i * BS : min((i + 1) * BS, s.num_computed_tokens)]
            owners.setdefault(b, []).append((i, filled))
    for shared in owners.values():
        if len(shared) > 1:
            assert len({i for i, _ in shared}) == 1
            shortest = min(len(f) for _, f in shared)
            assert len({tuple(f[:shortest]) for _, f in shared}) == 1


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, BS)
    s = seq(list(range(10)))
    admit(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_prefix_hit_shares_full_blocks_and_counts_tokens() -> None:
    bm = BlockManager(16, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    admit(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[a.block_table[0]] == 2
    assert (bm.prefix_queries, bm.prefix_hits) == (19, 8)


def test_full_prompt_hit_still_computes_last_token() -> None:
    bm = BlockManager(16, BS)
    a = seq(list(range(8)))
    admit(bm, a)
    b = seq(list(range(8)))
    assert bm.get_computed_blocks(b) == a.block_table[:1]  # 7 tokens max -> one full block


def test_salt_isolates_tenants() -> None:
    bm = BlockManager(16, BS)
    admit(bm, seq(list(range(9)), salt="tenant-a"))
    assert bm.get_computed_blocks(seq(list(range(9)), salt="tenant-b")) == []
    assert len(bm.get_computed_blocks(seq(list(range(9)), salt="tenant-a"))) == 2


def test_freed_prefix_survives_until_memory_is_needed() -> None:
    bm = BlockManager(4, BS)
    a = seq(list(range(9)))  # 3 blocks, 2 full and hashed
    admit(bm, a)
    bm.free(a)
    b = seq(list(range(9)))
    assert len(bm.get_computed_blocks(b)) == 2  # still cached while free
    c = seq([50 + i for i in range(13)])  # needs all 4 blocks: evicts the cached prefix
    admit(bm, c)
    bm.free(c)
    assert bm.get_computed_blocks(seq(list(range(9)))) == []


def test_unhashed_tail_is_evicted_before_cached_prefix() -> None:
    bm = BlockManager(4, BS)
    a = seq(list(range(9)))  # blocks: full, full, partial (unhashed)
    admit(bm, a)
    partial = a.block_table[2]
    bm.free(a)
    assert next(iter(bm.free_blocks)) in (partial, 3)
    d = seq([99, 98])  # one block: must not evict the cached prefix
    admit(bm, d)
    assert len(bm.get_computed_blocks(seq(list(range(9))))) == 2


def test_fork_copies_shared_partial_block_on_write() -> None:
    bm = BlockManager(8, BS)
    parent = seq([1, 2, 3, 4, 5, 6])
    admit(bm, parent)
    parent.token_ids.append(7)
    child = parent.fork(1)
    bm.fork(parent, child)
    child.token_ids[-1] = 8
    last = parent.block_table[1]
    assert bm.ref_counts[last] == 2
    assert bm.can_allocate(parent, 1)
    copies = bm.allocate(parent, 1)
    assert copies == [(last, parent.block_table[1])] and parent.block_table[1] != last
    assert bm.allocate(child, 1) == []  # last holder writes in place
    assert child.block_table[1] == last and bm.ref_counts[last] == 1
    assert parent.block_table[0] == child.block_table[0]  # full block stays shared


ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "grow", "fork", "free"]), st.integers(0, 50), st.integers(1, 12)
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.booleans())
def test_random_programs_keep_the_pool_consistent(
    program: list[tuple[str, int, int]], caching: bool
) -> None:
    bm = BlockManager(12, BS, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for op, pick, size in program:
        if op == "add":
            # small alphabet and shared stems so that prefix hits happen
            s = seq([(pick % 3) for _ in range(4)] + [pick % 5] * size)
            computed = bm.get_computed_blocks(s)
            n = s.num_tokens - len(computed) * BS
            if bm.can_allocate(s, n, computed):
                bm.allocate(s, n, computed)
                s.num_computed_tokens += n
                bm.cache_full_blocks(s)
                live.append(s)
        elif op == "grow" and live:
            s = live[pick % len(live)]
            s.token_ids += [pick % 7] * min(size, 3)
            n = s.num_tokens - s.num_computed_tokens
            if bm.can_allocate(s, n):
                copies = bm.allocate(s, n)
                for src, dst in copies:
                    assert bm.ref_counts[dst] == 1 and src != dst
                # every slot written now belongs to this sequence alone
                for p in range(s.num_computed_tokens, s.num_tokens):
                    assert bm.ref_counts[s.block_table[p // BS]] == 1
                s.num_computed_tokens += n
                bm.cache_full_blocks(s)
            else:
                s.token_ids = s.token_ids[: s.num_computed_tokens]
        elif op == "fork" and live:
            parent = live[pick % len(live)]
            child = parent.fork(1)
            bm.fork(parent, child)
            live.append(child)
        elif op == "free" and live:
            bm.free(live.pop(pick % len(live)))
        check_invariants(bm, live)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
