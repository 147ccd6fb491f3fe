"""Who holds which block of the paged KV cache (cache.PagedKVCache), and which blocks hold which prompt prefix.

A block is `block_size` token slots of keys and values, every layer. A sequence holds the blocks of its block
table; a block is free when no sequence holds it. Automatic prefix caching (vLLM's): a *full* block is named by
a hash chained over its tokens and every token before it (its prefix), so equal names mean equal keys and values
(the keys of a token depend on it and on everything before it, nothing else). A new sequence looks its prompt's
full blocks up one by one and takes the longest run found, adding itself to their holders; it prefills only the
rest. A block nobody holds keeps its contents and its name until the pool needs it: such blocks are evicted least
recently released first, and a sequence's blocks are released tail first, so that a prompt's shared head
outlives its private tail. A partly filled block is never named, so never shared: every sequence writes only into
blocks it alone holds.

Block 0 is never given out: block tables name it past a sequence's own blocks (cache.PagedKVCache).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def chain_hashes(tokens: list[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """The names of the full blocks of `tokens` (a sequence from position 0), each chained over the one before:
    blake2b-128 of the parent's name and the block's token ids, as vLLM chains sha256 (a collision would serve one
    prompt another's keys, so not Python's 64-bit hash)."""
    names = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hashlib.blake2b(parent + array("q", tokens[start:start + block_size]).tobytes(),
                                 digest_size=16).digest()
        names.append(parent)
    return names


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (block 0 is reserved), got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        # Never-named free blocks, taken from the end: the ones freed last are reused first, so the pool's memory
        # (taken page by page as it is written, on a CPU) stays as small as the traffic allows.
        self.free = list(range(num_blocks - 1, 0, -1))
        self.holders = [0] * num_blocks  # how many sequences hold each block
        self.name_of: dict[int, bytes] = {}  # named (full, cached) blocks
        self.block_named: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, least recent first
        self.queries = self.hits = 0  # blocks looked up by new sequences, and found

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    def num_free(self) -> int:
        """Blocks that can be given out now (free, or cached and held by nobody)."""
        return len(self.free) + len(self.evictable)

    def usage(self) -> float:
        """Fraction of the usable blocks held by some sequence."""
        return 1.0 - self.num_free() / self.usable

    def cached_prefix(self, names: list[bytes]) -> list[int]:
        """The blocks of the longest run of `names` (from the first) that the pool holds, without taking them."""
        found = []
        if self.prefix_caching:
            for name in names:
                block = self.block_named.get(name)
                if block is None:
                    break
                found.append(block)
        return found

    def can_take(self, cached: list[int], new: int, reserve: int = 0) -> bool:
        """Whether a sequence can take the `cached` blocks and `new` fresh ones and leave `reserve` free."""
        idle = sum(1 for block in cached if block in self.evictable)  # counted free now, no longer once taken
        return new + idle + reserve <= self.num_free()

    def take_cached(self, blocks: list[int], looked_up: int) -> None:
        """Hold `blocks` (a run cached_prefix found among `looked_up` names)."""
        for block in blocks:
            self.evictable.pop(block, None)
            self.holders[block] += 1
        self.queries += looked_up
        self.hits += len(blocks)

    def allocate(self) -> int | None:
        """A block for a sequence to write into (held once), or None when the pool is full of held blocks."""
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # the least recently released named block
            del self.block_named[self.name_of.pop(block)]
        else:
            return None
        self.holders[block] = 1
        return block

    def name(self, block: int, name: bytes) -> None:
        """`block` is now full and holds the tokens `name` names: later sequences may share it. If another block
        already has that name (two equal prompts prefilled together), that one stays the cached copy."""
        if self.prefix_caching and name not in self.block_named and block not in self.name_of:
            self.block_named[name] = block
            self.name_of[block] = name

    def release(self, blocks: list[int]) -> None:
        """A sequence lets go of its blocks (tail first: the end of a prompt is evicted before its shared head)."""
        for block in reversed(blocks):
            self.holders[block] -= 1
            if self.holders[block] == 0:
                if block in self.name_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
