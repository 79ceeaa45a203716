"""The engine's KV cache: one preallocated tensor per keys and values, in fixed-size slots.

    keys[layer, slot, position, kv_head, head_dim]     (values alike)

A sequence owns one slot from its prefill to its last token; its keys and values are written in place
at their positions, never copied or concatenated. The last slot is a dummy that padding rows of a
graph bucket write to and read from, so a bucket never touches a live sequence's slot.

Slots are as long as the longest prompt of the rank's share plus the new tokens, so memory follows
the longest input (pages would follow each input; not built). How many slots: as many as the share
has inputs, within the memory left after the model and the headroom, capped by
`generation.kv_cache_gb` and by `generation.batch_tokens` (slots x slot length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def count_slots(
    shape: CacheShape, slot_len: int, sequences: int, free_bytes: int, cap_gb: float | None, batch_tokens: int | None
) -> int:
    """Slots to allocate: enough for every sequence if they fit, at least one."""
    budget = free_bytes if cap_gb is None else min(free_bytes, int(cap_gb * 2**30))
    slots = min(sequences, budget // (shape.bytes_per_position * slot_len))
    if batch_tokens is not None:
        slots = min(slots, batch_tokens // slot_len)
    return max(1, slots)


def free_cache_bytes(device: torch.device, cap_gb: float | None, reserve_bytes: int) -> int:
    """Bytes the cache may take on `device`: free GPU memory less the reserve, or CPU_CACHE_GB."""
    if device.type != "cuda":
        return int((cap_gb or CPU_CACHE_GB) * 2**30)
    free, _ = torch.cuda.mem_get_info(device)
    return max(0, free - reserve_bytes - GPU_HEADROOM_BYTES)


class KVCache:
    def __init__(self, shape: CacheShape, slots: int, slot_len: int, device: torch.device):
        self.shape, self.slots, self.slot_len = shape, slots, slot_len
        self.dummy_slot = slots
        size = (shape.layers, slots + 1, slot_len, shape.kv_heads, shape.head_dim)
        self.keys = torch.zeros(size, dtype=shape.dtype, device=device)
        self.values = torch.zeros(size, dtype=shape.dtype, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()
