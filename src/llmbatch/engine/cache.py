"""The engine's paged KV cache: one pool of fixed-size blocks per keys and values, and a block table.

    keys[layer, block, position in block, kv_head, head_dim]     (values alike)
    tables[slot, i] = the block holding positions i*BLOCK_SIZE .. (i+1)*BLOCK_SIZE-1 of the slot's sequence

A running sequence holds a slot (a row of the block table) and the blocks blocks.py gave it; its
keys and values are written in place at their positions, never copied or concatenated, and blocks of
a cached prefix are shared. The last block is a dummy, and so is the last slot, whose row is all the
dummy block: padding rows of a graph bucket write to and read from it, never a live sequence's block.
The table is one static int32 tensor, [slots + 1, most blocks a sequence can need], written when a
sequence is admitted, so the decode step reads it with no host sync and no change of shape.

How many blocks: enough for every sequence of the rank's share at once if they fit, within the
memory left after the model and the headroom, capped by `generation.kv_cache_gb` and by
`generation.batch_tokens` (positions: blocks x BLOCK_SIZE), and at least the blocks of the longest
sequence. Slots: one per sequence of the share, up to the engine's most rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmbatch.engine.blocks import BLOCK_SIZE

CPU_CACHE_GB = 1.0
"""Cache size on CPU unless generation.kv_cache_gb sets one: CPUs run small models, in tests."""

GPU_HEADROOM_BYTES = 2 << 30
"""Kept free on a GPU beyond the prefill and logits estimate: allocator slack, cuBLAS workspaces,
CUDA graph pools."""


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_position(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


def count_blocks(
    shape: CacheShape, needed: int, longest: int, free_bytes: int, cap_gb: float | None, batch_tokens: int | None
) -> int:
    """Blocks to allocate: `needed` (every sequence at once) if they fit, at least `longest` (the
    longest sequence's), so that every sequence can run."""
    budget = free_bytes if cap_gb is None else min(free_bytes, int(cap_gb * 2**30))
    blocks = min(needed, budget // (shape.bytes_per_position * BLOCK_SIZE))
    if batch_tokens is not None:
        blocks = min(blocks, batch_tokens // BLOCK_SIZE)
    return max(longest, blocks)


def free_cache_bytes(device: torch.device, cap_gb: float | None, reserve_bytes: int) -> int:
    """Bytes the cache may take on `device`: free GPU memory less the reserve, or CPU_CACHE_GB."""
    if device.type != "cuda":
        return int((cap_gb or CPU_CACHE_GB) * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - reserve_bytes - GPU_HEADROOM_BYTES)


class KVCache:
    def __init__(self, shape: CacheShape, blocks: int, slots: int, table_width: int, device: torch.device):
        """`table_width`: the most blocks one sequence can need."""
        self.shape, self.blocks, self.slots = shape, blocks, slots
        self.dummy_block, self.dummy_slot = blocks, slots
        size = (shape.layers, blocks + 1, BLOCK_SIZE, shape.kv_heads, shape.head_dim)
        self.keys = torch.zeros(size, dtype=shape.dtype, device=device)
        self.values = torch.zeros(size, dtype=shape.dtype, device=device)
        self.tables = torch.full((slots + 1, table_width), blocks, dtype=torch.int32, device=device)

    def assign(self, slots: list[int], tables: list[list[int]]) -> None:
        """Write the block tables of newly admitted sequences (one copy), padded with the dummy block."""
        rows = torch.full((len(slots), self.tables.shape[1]), self.dummy_block, dtype=torch.int32)
        for row, blocks in enumerate(tables):
            rows[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.tables[torch.tensor(slots, device=self.tables.device)] = rows.to(self.tables.device)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
