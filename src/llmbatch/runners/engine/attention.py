"""Attention over the engine's KV cache, reading the key/value heads directly (never repeated).

- Decode (one new token a row): on CUDA, a Triton kernel with one program per (row, KV head); it
  loads the group of query heads that share that KV head once, walks the row's slot up to its
  length in blocks with an online softmax, and writes the group's outputs. Rows of any length share
  one launch, so the step can be captured in a CUDA graph. Elsewhere, the same maths in torch.
- Prefill (whole prompts): causal scaled_dot_product_attention with grouped-query heads
  (`enable_gqa`), prompts right-padded to the longest of the chunk: a causal row never looks right,
  so padding changes no valid position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path runs
    triton = None


PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Not cuDNN's: it plans anew for every shape, and prefill chunks come in many shapes."""


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [rows, len, q_heads, dim], k/v [rows, len, kv_heads, dim] -> [rows, len, q_heads, dim]."""
    with sdpa_kernel(PREFILL_BACKENDS):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q [rows, q_heads, dim]; keys/values [slots, slot_len, kv_heads, dim] of one layer; row r attends
    to positions 0 .. lengths[r]-1 of slot slots[r]. -> [rows, q_heads, dim]."""
    if q.is_cuda and triton is not None:
        return _decode_triton(q, keys, values, slots, lengths, scale)
    return _decode_torch(q, keys, values, slots, lengths, scale)


def _decode_torch(q, keys, values, slots, lengths, scale):
    rows, q_heads, dim = q.shape
    kv_heads = keys.shape[2]
    longest = int(lengths.max())  # a host sync, which is fine off the GPU
    k, v = keys[slots, :longest], values[slots, :longest]  # [rows, len, kv_heads, dim]
    grouped = q.view(rows, kv_heads, q_heads // kv_heads, dim)
    scores = torch.einsum("bhgd,blhd->bhgl", grouped, k).float() * scale
    outside = torch.arange(longest, device=q.device)[None, :] >= lengths[:, None]  # [rows, len]
    scores.masked_fill_(outside[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhgl,blhd->bhgd", weights, v).reshape(rows, q_heads, dim)


def _decode_triton(q, keys, values, slots, lengths, scale):
    rows, q_heads, dim = q.shape
    kv_heads = keys.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    _decode_kernel[(rows, kv_heads)](
        q, keys, values, out, slots, lengths, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, BLOCK=64,
        # fp32 models get fp32 products (Triton's default for fp32 is tf32, which rounds inputs).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2)
    return out


if triton is not None:
    @triton.jit
    def _decode_kernel(Q, K, V, Out, Slots, Lengths, scale,
                       stride_qb, stride_qh, stride_ks, stride_kt, stride_kh, stride_ob, stride_oh,
                       GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
                       PRECISION: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(Slots + row).to(tl.int64)
        length = tl.load(Lengths + row)
        heads = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM)
        in_group = heads < GROUP
        # The group's query heads, padded to 16 rows for the tensor-core dot (padding rows are zeros).
        q_ptrs = Q + row * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=in_group[:, None], other=0.0)
        base = slot * stride_ks + kv_head * stride_kh
        running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        for start in range(0, length, BLOCK):
            positions = start + tl.arange(0, BLOCK)
            valid = positions < length
            offsets = base + positions[:, None].to(tl.int64) * stride_kt + dims[None, :]
            k = tl.load(K + offsets, mask=valid[:, None], other=0.0)
            v = tl.load(V + offsets, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [GROUP_PAD, BLOCK], fp32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            p = tl.exp2(scores - new_max[:, None])
            alpha = tl.exp2(running_max - new_max)
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            running_max = new_max
        out = acc / total[:, None]
        o_ptrs = Out + row * stride_ob + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_group[:, None])
