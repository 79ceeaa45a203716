"""Which blocks of the paged KV cache hold what: the free list, reference counts and the prefix cache.
Pure bookkeeping, no tensors (the tensors are cache.py's).

Prefix caching: a full block of a prompt is named by a key, (its parent's key, its token ids), so a
key names the whole prefix up to the block's end and two prompts with equal keys have equal keys and
values there (a per-prompt root goes first where the model computes them differently: LongRoPE). The
keys are nested tuples, compared exactly, never just by a hash. A block enters the cache when a
sequence allocates it for a full prompt block and is `ready` once its prefill has written it; only
ready blocks are shared. A block nobody refers to any longer stays cached, in a least-recently-used
order, and is taken for new work only when the free list is empty (its key is then forgotten).
"""

from __future__ import annotations

from collections import OrderedDict

BLOCK_SIZE = 16
"""Positions a block holds: small enough that a prefix is shared to within 15 tokens and a sequence
wastes at most 15 positions, big enough that a block table stays short."""


def blocks_for(positions: int) -> int:
    return -(-positions // BLOCK_SIZE)


def prefix_keys(tokens: list[int], root=None) -> list[tuple]:
    """The keys of the prompt's full blocks, first to last."""
    keys, parent = [], root
    for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = (parent, tuple(tokens[start : start + BLOCK_SIZE]))
        keys.append(parent)
    return keys


class BlockPool:
    def __init__(self, blocks: int, caching: bool = True):
        self.blocks, self.caching = blocks, caching
        self.free = list(range(blocks - 1, -1, -1))  # popped from the end: lowest block first
        self.refs = [0] * blocks
        self.cached: dict[tuple, int] = {}  # key -> block
        self.key_of: dict[int, tuple] = {}  # block -> key, for cached blocks
        self.ready: set[int] = set()
        self.unused: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first

    @property
    def available(self) -> int:
        return len(self.free) + len(self.unused)

    @property
    def held(self) -> int:
        """Blocks some sequence refers to."""
        return self.blocks - self.available

    def match(self, keys: list[tuple]) -> tuple[list[int], bool]:
        """(the cached blocks of the longest run of leading keys, whether the run stopped at a block
        still being prefilled: worth waiting for)."""
        found = []
        for key in keys if self.caching else ():
            block = self.cached.get(key)
            if block is None:
                return found, False
            if block not in self.ready:
                return found, True
            found.append(block)
        return found, False

    def can_take(self, shared: list[int], new: int) -> bool:
        return self.available - sum(b in self.unused for b in shared) >= new

    def take(self, shared: list[int], new: int) -> list[int]:
        """Refer to the `shared` cached blocks and to `new` fresh ones (check can_take first); returns
        all of them, shared first."""
        for block in shared:
            self.unused.pop(block, None)
            self.refs[block] += 1
        fresh = []
        for _ in range(new):
            if self.free:
                block = self.free.pop()
            else:  # evict the least recently used cached block
                block, _ = self.unused.popitem(last=False)
                del self.cached[self.key_of.pop(block)]
                self.ready.discard(block)
            self.refs[block] = 1
            fresh.append(block)
        return shared + fresh

    def register(self, block: int, key: tuple) -> None:
        """Name a fresh block by its key, to be shared once `mark_ready`. A key already cached (a block
        of it was allocated while the block before it had been evicted) keeps its block."""
        if self.caching and key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key

    def mark_ready(self, block: int) -> None:
        if block in self.key_of:
            self.ready.add(block)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, last block first, so a prefix's later blocks are evicted
        before its earlier ones."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            if block in self.ready:
                self.unused[block] = None
            else:  # never cached, or never written (a sequence stopped mid-prefill)
                key = self.key_of.pop(block, None)
                if key is not None:
                    del self.cached[key]
                self.free.append(block)
