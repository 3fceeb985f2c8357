"""Decode attention over the paged KV cache on CUDA: one Triton kernel.

One program per (decode row, KV head) scores the row's query heads of that KV head (GQA: the key
and value blocks are read once for the whole group) against the row's context, ``BLOCK_N`` tokens at
a time, looking each token's slot up in the row's block table, with an online softmax in fp32. A
row's result depends only on its own query, table and length, never on the batch: the same bits
alone or batched. No host synchronisation and fixed launch shapes, so CUDA graphs capture it
(``engine/cuda_graphs.py``).

Imported only where it runs (CUDA tensors, or Triton's CPU interpreter in the tests): torch's CPU
wheels do not ship Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32  # context tokens per iteration


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale,
    q_row_stride, q_head_stride, kv_slot_stride, kv_head_stride, table_stride, block_size,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q_offsets = row.to(tl.int64) * q_row_stride + heads[:, None] * q_head_stride + d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(k_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    table = tables_ptr + row.to(tl.int64) * table_stride
    for start in range(0, length, BLOCK):
        n = start + tl.arange(0, BLOCK)
        n_ok = n < length
        block = tl.load(table + n // block_size, mask=n_ok, other=0)
        slot = block.to(tl.int64) * block_size + n % block_size
        kv_offsets = slot[:, None] * kv_slot_stride + kv_head * kv_head_stride + d[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK]
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q: [B, H, D]; caches [slots, KVH, D]; block_tables [B, width] int32; context_lens [B] int32
    (every length >= 1). Returns [B, H, D] in q's dtype."""
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    if heads % kv_heads or k_cache.shape[2] != dim or k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}")
    q = q.contiguous()
    out = torch.empty_like(q)
    if rows == 0:
        return out
    group = heads // kv_heads
    # tl.dot takes tiles of at least 16 in every dimension; fp32 caches are multiplied in full fp32
    # (not TF32), as the torch path does.
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    _paged_decode_kernel[(rows, kv_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), block_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
        DIM_PAD=max(16, triton.next_power_of_2(dim)), BLOCK=BLOCK_N, PRECISION=precision,
    )  # fmt: skip
    return out
