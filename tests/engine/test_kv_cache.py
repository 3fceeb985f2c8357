import random

from phiserve.engine.kv_cache import BlockManager
from phiserve.engine.sampling_params import SamplingParams
from phiserve.engine.sequence import Sequence


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.register_computed(seq)


def test_allocate_exact_ids_and_free_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(10)))
    bm.match_prefix(a)
    assert a.num_computed_tokens == 0
    compute(bm, a, 10)
    assert a.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in range(3)] == [1, 1, 1]
    assert bm.free_queue() == [3, 4, 5, 6, 7]
    # two full blocks are published, the partial third is not
    assert bm.blocks[0].hash is not None and bm.blocks[1].hash is not None and bm.blocks[2].hash is None
    bm.free(a)
    # tail first: freed in reverse so the shared head is evicted last
    assert bm.free_queue() == [3, 4, 5, 6, 7, 2, 1, 0]


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(12)) + [99])
    bm.match_prefix(a)
    compute(bm, a, 13)
    b = seq_of(list(range(12)) + [7, 8])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:3]
    assert b.num_computed_tokens == b.num_cached_tokens == 12
    assert [bm.blocks[i].ref_count for i in a.block_table[:3]] == [2, 2, 2]
    compute(bm, b, 2)
    assert b.block_table[3] not in a.block_table
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:3]] == [1, 1, 1]


def test_whole_prompt_cached_still_computes_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq_of(list(range(8)))
    bm.match_prefix(a)
    compute(bm, a, 8)
    bm.free(a)
    b = seq_of(list(range(8)))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4  # the last block is recomputed: the prompt's end is a prefill chunk


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq_of([1, 2, 3, 4, 5])
    bm.match_prefix(a)
    compute(bm, a, 5)
    bm.free(a)
    b = seq_of([1, 2, 3, 4, 9, 10])
    bm.match_prefix(b)
    assert b.num_cached_tokens == 4  # revived from the free queue
    assert bm.num_free_blocks == 2
    bm.free(b)
    # fill the pool with other data: cached blocks get evicted and the hash map forgets them
    c = seq_of(list(range(100, 108)))
    bm.match_prefix(c)
    compute(bm, c, 8)
    d = seq_of([1, 2, 3, 4, 9])
    bm.match_prefix(d)
    assert d.num_cached_tokens == 0
    bm.free(c)


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = seq_of(list(range(20)))
    bm.match_prefix(a)
    assert not bm.allocate(a, 20)
    assert a.block_table == [] and bm.num_free_blocks == 2


def test_random_workload_never_leaks():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=64, block_size=4)
    live: list[Sequence] = []
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    for _ in range(1000):
        action = rng.random()
        if action < 0.5 or not live:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
            s = seq_of(tokens)
            bm.match_prefix(s)
            if bm.allocate(s, s.num_tokens - s.num_computed_tokens):
                s.num_computed_tokens = s.num_tokens
                bm.register_computed(s)
                live.append(s)
            else:
                bm.free(s)  # could not admit: release the prefix hits (as the scheduler does)
        elif action < 0.8:
            s = live[rng.randrange(len(live))]
            s.token_ids.append(rng.randrange(50))  # decode one token
            if bm.allocate(s, 1):
                s.num_computed_tokens += 1
                bm.register_computed(s)
            else:  # preempt: free and forget progress
                bm.free(s)
                live.remove(s)
        else:
            s = live.pop(rng.randrange(len(live)))  # finish or cancel
            bm.free(s)
        in_use = sum(len(s.block_table) for s in live)
        refs = sum(b.ref_count for b in bm.blocks)
        assert refs == in_use
        assert bm.num_free_blocks == bm.num_blocks - sum(1 for b in bm.blocks if b.ref_count > 0)
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == 64
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_a_huge_pool_costs_nothing_up_front() -> None:
    """90% of a large GPU for a tiny model is ~10^8 blocks: blocks are made on first use, in queue order."""
    bm = BlockManager(num_blocks=10**9, block_size=16)
    seq = Sequence("a", list(range(40)), SamplingParams())
    assert bm.allocate(seq, 40) and seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 10**9 - 3 and len(bm.blocks) == 3
    bm.free(seq)
    assert bm.num_free_blocks == 10**9
