"""Attention over the engine's KV cache, reading the key/value heads directly (never repeated).

- Decode (one new token a row): on CUDA, a Triton kernel with one program per (row, KV head); it
  loads the group of query heads that share that KV head once, walks the row's slot up to its
  length in blocks with an online softmax, and writes the group's outputs. Rows of any length share
  one launch, so the step can be captured in a CUDA graph. Elsewhere, the same maths in torch.
- Prefill (whole prompts): causal scaled_dot_product_attention with grouped-query heads
  (`enable_gqa`), prompts right-padded to the longest of the chunk: a causal row never looks right,
  so padding changes no valid position.

Per layer, two options of the model's: a sliding window (a position sees itself and the window - 1
before it, as transformers' sliding-window mask says) and a soft cap on the scores (Gemma 2:
cap * tanh(scores / cap), before the mask). The decode kernel starts its walk at the window's first
block, so a windowed layer reads only its window.
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


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [rows, len, q_heads, dim], k/v [rows, len, kv_heads, dim] -> [rows, len, q_heads, dim]."""
    width = q.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window is not None and window >= width:
        window = None  # the window covers the whole chunk: plain causal attention
    if window is None and softcap is None:
        with sdpa_kernel(PREFILL_BACKENDS):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)
    positions = torch.arange(width, device=q.device)
    seen = positions[None, :] <= positions[:, None]  # [query, key]: causal
    if window is not None:
        seen &= positions[None, :] > positions[:, None] - window
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if softcap is None:
        with sdpa_kernel(PREFILL_BACKENDS):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)
        return out.transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scale  # sdpa has no soft cap
    scores = softcap * torch.tanh(scores / softcap)
    weights = scores.masked_fill(~seen, float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.matmul(weights, v).transpose(1, 2)


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [rows, q_heads, dim]; keys/values [slots, slot_len, kv_heads, dim] of one layer; row r attends
    to positions max(0, lengths[r] - window) .. lengths[r]-1 of slot slots[r]. -> [rows, q_heads, dim]."""
    if q.is_cuda and triton is not None:
        return _decode_triton(q, keys, values, slots, lengths, scale, window, softcap)
    return _decode_torch(q, keys, values, slots, lengths, scale, window, softcap)


def _decode_torch(q, keys, values, slots, lengths, scale, window, softcap):
    rows, q_heads, dim = q.shape
    kv_heads = keys.shape[2]
    longest = int(lengths.max())  # a host sync, which is fine off the GPU
    k, v = keys[slots, :longest], values[slots, :longest]  # [rows, len, kv_heads, dim]
    grouped = q.view(rows, kv_heads, q_heads // kv_heads, dim)
    scores = torch.einsum("bhgd,blhd->bhgl", grouped, k).float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    positions = torch.arange(longest, device=q.device)[None, :]
    outside = positions >= lengths[:, None]  # [rows, len]
    if window is not None:
        outside |= positions < lengths[:, None] - window
    scores.masked_fill_(outside[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhgl,blhd->bhgd", weights, v).reshape(rows, q_heads, dim)


def _decode_triton(q, keys, values, slots, lengths, scale, window, softcap):
    rows, q_heads, dim = q.shape
    kv_heads = keys.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    _decode_kernel[(rows, kv_heads)](
        q,
        keys,
        values,
        out,
        slots,
        lengths,
        scale,
        window or 0,
        softcap or 0.0,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        BLOCK=64 if dim <= 128 else 32,  # a head dim of 256 (Gemma) halves the block: registers
        WINDOWED=window is not None,
        SOFTCAPPED=softcap is not None,
        # fp32 models get fp32 products (Triton's default for fp32 is tf32, which rounds inputs).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    return out


if triton is not None:

    @triton.jit
    def _decode_kernel(
        Q,
        K,
        V,
        Out,
        Slots,
        Lengths,
        scale,
        window,
        softcap,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kt,
        stride_kh,
        stride_ob,
        stride_oh,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        WINDOWED: tl.constexpr,
        SOFTCAPPED: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
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
        log2e = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        first = 0
        if WINDOWED:
            first = tl.maximum(length - window, 0)
        for start in range(first - first % BLOCK, length, BLOCK):
            positions = start + tl.arange(0, BLOCK)
            valid = (positions < length) & (positions >= first)
            offsets = base + positions[:, None].to(tl.int64) * stride_kt + dims[None, :]
            k = tl.load(K + offsets, mask=valid[:, None], other=0.0)
            v = tl.load(V + offsets, mask=valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK], fp32
            if SOFTCAPPED:  # cap * tanh(s / cap), tanh(x) = 2 sigmoid(2x) - 1
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
            scores = scores * log2e
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
