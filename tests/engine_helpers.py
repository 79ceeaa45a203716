"""Helpers of the engine's tests: dense caches as the engine's paged blocks."""

from __future__ import annotations

import torch

from llmbatch.engine.blocks import BLOCK_SIZE, blocks_for


def paged(dense: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense cache [slots, length, kv_heads, dim] as engine blocks [blocks + 1, BLOCK_SIZE, kv_heads,
    dim] in a shuffled order (the last block is the dummy), and the block tables [slots, blocks a slot]
    int32 that read it back."""
    slots, length, *rest = dense.shape
    per_slot = blocks_for(length)
    padded = torch.zeros(slots, per_slot * BLOCK_SIZE, *rest, dtype=dense.dtype)
    padded[:, :length] = dense
    order = torch.randperm(slots * per_slot, generator=torch.Generator().manual_seed(seed))
    blocks = torch.zeros(slots * per_slot + 1, BLOCK_SIZE, *rest, dtype=dense.dtype)
    blocks[order] = padded.view(slots * per_slot, BLOCK_SIZE, *rest)
    return blocks, order.view(slots, per_slot).to(torch.int32)
