"""The KV block pool's bookkeeping (serve/blocks.py): allocation, holders, release, LRU eviction of cached
blocks, exhaustion, and the chained block names of automatic prefix caching."""

import pytest

from glmtorch.serve.blocks import BlockPool, chain_hashes


def test_allocate_release_and_exhaustion():
    pool = BlockPool(5, 4)
    assert pool.usable == 4 and pool.num_free() == 4
    got = [pool.allocate() for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4]  # block 0 is never given out
    assert pool.allocate() is None and pool.usage() == 1.0
    pool.release(got[:2])
    assert pool.num_free() == 2
    assert pool.allocate() == got[0]  # the last freed (tail first: got[0]) is reused first
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1, 4)


def test_names_chain_over_the_prefix_and_skip_a_partial_block():
    a = chain_hashes(list(range(10)), 4)
    assert len(a) == 2  # 8 of 10 tokens are whole blocks; the last 2 are not named
    assert chain_hashes(list(range(8)), 4) == a
    b = chain_hashes([99] + list(range(1, 10)), 4)
    assert b[0] != a[0] and b[1] != a[1]  # the same second block after a different first one: another name
    assert chain_hashes(list(range(4, 8)), 4, parent=a[0]) == a[1:]  # built on in pieces, the same names


def test_shared_blocks_are_held_by_many_and_cached_until_needed():
    pool = BlockPool(6, 4)
    names = chain_hashes(list(range(8)), 4)
    first = [pool.allocate(), pool.allocate()]
    for block, name in zip(first, names):
        pool.name(block, name)
    found = pool.cached_prefix(names + [b"unknown"])
    assert found == first
    assert pool.can_take(found, 3) and not pool.can_take(found, 4)
    pool.take_cached(found, 3)
    assert pool.holders[first[0]] == 2 and (pool.queries, pool.hits) == (3, 2)
    pool.release(first)
    pool.release(first)  # both holders gone: cached, idle, still found
    assert pool.num_free() == 5 and pool.cached_prefix(names) == first
    assert pool.can_take(first, 3) and not pool.can_take(first, 4)  # taking them makes them no longer free
    # the pool runs out of never-named blocks: idle cached blocks are evicted, the tail's before the head's
    fresh = [pool.allocate() for _ in range(3)]
    assert first[0] not in fresh and first[1] not in fresh
    assert pool.allocate() == first[1]
    assert pool.cached_prefix(names) == [first[0]]
    assert pool.allocate() == first[0] and pool.cached_prefix(names) == []
    assert pool.allocate() is None


def test_an_equal_block_named_twice_keeps_the_first_and_disabled_caching_names_nothing():
    pool = BlockPool(4, 2)
    name = chain_hashes([1, 2], 2)[0]
    a, b = pool.allocate(), pool.allocate()
    pool.name(a, name)
    pool.name(b, name)  # two equal prompts prefilled together: one copy is the cached one
    assert pool.cached_prefix([name]) == [a]
    pool.release([b])
    assert b in pool.free  # not named: plainly free
    off = BlockPool(4, 2, prefix_caching=False)
    block = off.allocate()
    off.name(block, name)
    assert off.cached_prefix([name]) == [] and not off.block_named
