"""Our CUDA kernels (Triton): decode attention over the paged KV cache, rope + KV cache write, the
residual add + RMSNorm, and SiLU-and-multiply.

Decode attention (flash-decoding): a row's context is cut into ``SPLITS`` equal ranges (multiples of
``BLOCK_N`` tokens, so the cut depends only on the row's own length); one program per (row, KV head,
range) scores the row's query heads of that KV head (GQA: each key and value block is read once for
the group) with an online softmax in fp32, looking each token's slot up in the row's block table; a
second kernel merges the ranges. A row's result depends only on its own query, table and length,
never on the batch. Launch shapes are fixed by the tensors' shapes and lengths are read on the
device: no host synchronisation, so CUDA graphs capture both (``engine/cuda_graphs.py``).

Rope + cache: one program per (token, head) rotates q and k (NeoX halves) in fp32, writes the
rotated k and the v head into their cache slot; one launch instead of the ~16 small ones of the
torch expression.

Add + RMSNorm and SiLU-and-multiply: one launch each where torch runs two or three tiny ones (at one
row, Phi-4's 81 norms and 40 MLPs are kernels of a few microseconds each, bound by launch latency
even inside a CUDA graph). Both compute in fp32 and round once. The decoder uses them in CUDA graphs
only (``Decoder.forward``'s ``graph``): eagerly, their host-side launch cost outweighs the gain.

Imported only where it runs (CUDA tensors, or Triton's CPU interpreter in the tests): torch's CPU
wheels do not ship Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # context tokens per iteration
SPLITS = 8  # context ranges per (row, KV head): B x KVH x 8 programs keep the GPU busy at one row


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, tables_ptr, lens_ptr, scale,
    q_row_stride, q_head_stride, kv_slot_stride, kv_head_stride, table_stride, block_size,
    HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + row)
    per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK) * BLOCK
    begin = split * per_split
    end = tl.minimum(begin + per_split, length)
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
    for start in range(begin, end, BLOCK):
        n = start + tl.arange(0, BLOCK)
        n_ok = n < end
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
    # partials of this range ([row, head, split]); an empty range leaves m = -inf, l = 0, acc = 0
    part = (row.to(tl.int64) * HEADS + heads) * NUM_SPLITS + split
    tl.store(m_ptr + part, m_i, mask=g_ok)
    tl.store(l_ptr + part, l_i, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * DIM_PAD + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def _decode_merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, out_row_stride, out_head_stride,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, DIM_PAD)
    part = (row.to(tl.int64) * HEADS + head) * NUM_SPLITS + s
    m = tl.load(m_ptr + part)
    weight = tl.exp(m - tl.max(m, axis=0))  # the first range is never empty: the max is finite
    total = tl.sum(weight * tl.load(l_ptr + part), axis=0)
    acc = tl.load(acc_ptr + part[:, None] * DIM_PAD + d[None, :])
    out = tl.sum(weight[:, None] * acc, axis=0) / total
    offsets = row.to(tl.int64) * out_row_stride + head * out_head_stride + d
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


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
    dim_pad = max(16, triton.next_power_of_2(dim))  # tl.dot takes tiles of at least 16 in every dimension
    m = torch.empty(rows, heads, SPLITS, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)  # noqa: E741
    acc = torch.empty(rows, heads, SPLITS, dim_pad, dtype=torch.float32, device=q.device)
    # fp32 caches are multiplied in full fp32 (not TF32), as the torch path does
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    _decode_split_kernel[(rows, kv_heads, SPLITS)](
        q, k_cache, v_cache, m, l, acc, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), block_size,
        HEADS=heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, DIM_PAD=dim_pad,
        BLOCK=BLOCK_N, NUM_SPLITS=SPLITS, PRECISION=precision,
    )  # fmt: skip
    _decode_merge_kernel[(rows, heads)](
        m, l, acc, out, out.stride(0), out.stride(1), HEADS=heads, HEAD_DIM=dim, DIM_PAD=dim_pad, NUM_SPLITS=SPLITS
    )
    return out


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    qkv_row_stride, trig_row_stride, kv_slot_stride, kv_head_stride,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # [0, H): q heads, [H, H + KVH): k heads, then v heads
    half = HEAD_DIM // 2
    i = tl.arange(0, HALF_PAD)
    ok = i < half
    x = qkv_ptr + token * qkv_row_stride + head * HEAD_DIM
    slot = tl.load(slots_ptr + token)
    if head < HEADS + KV_HEADS:
        x1 = tl.load(x + i, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x + half + i, mask=ok, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + token * trig_row_stride + i, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + token * trig_row_stride + i, mask=ok, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        if head < HEADS:
            out = q_out_ptr + (token * HEADS + head) * HEAD_DIM
            tl.store(out + i, y1.to(q_out_ptr.dtype.element_ty), mask=ok)
            tl.store(out + half + i, y2.to(q_out_ptr.dtype.element_ty), mask=ok)
        else:
            kv_head = head - HEADS
            out = k_out_ptr + (token * KV_HEADS + kv_head) * HEAD_DIM
            tl.store(out + i, y1.to(k_out_ptr.dtype.element_ty), mask=ok)
            tl.store(out + half + i, y2.to(k_out_ptr.dtype.element_ty), mask=ok)
            cache = k_cache_ptr + slot * kv_slot_stride + kv_head * kv_head_stride
            tl.store(cache + i, y1.to(k_cache_ptr.dtype.element_ty), mask=ok)
            tl.store(cache + half + i, y2.to(k_cache_ptr.dtype.element_ty), mask=ok)
    else:
        kv_head = head - HEADS - KV_HEADS
        cache = v_cache_ptr + slot * kv_slot_stride + kv_head * kv_head_stride
        for part in tl.static_range(2):  # the two halves, as above: one tile shape for every head
            value = tl.load(x + part * half + i, mask=ok, other=0.0)
            tl.store(cache + part * half + i, value.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv: [T, (H + 2 KVH) D]; cos, sin: [T, D/2]. Rotates q and k, writes k and v at their slots.
    Returns q [T, H, D], k [T, KVH, D] (rotated) and v [T, KVH, D] (a view of qkv)."""
    tokens = qkv.shape[0]
    dim = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride() or k_cache.stride() != v_cache.stride() or k_cache.stride(2) != 1:
        raise ValueError("rope_and_cache: qkv, cos/sin and the caches must be contiguous in their last dimension")
    q = torch.empty(tokens, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(tokens, num_kv_heads, dim, dtype=qkv.dtype, device=qkv.device)
    v = qkv[:, (num_heads + num_kv_heads) * dim :].view(tokens, num_kv_heads, dim)
    if tokens:
        _rope_and_cache_kernel[(tokens, num_heads + 2 * num_kv_heads)](
            qkv, cos, sin, q, k, k_cache, v_cache, slot_mapping,
            qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
            HEADS=num_heads, KV_HEADS=num_kv_heads, HEAD_DIM=dim, HALF_PAD=triton.next_power_of_2(dim // 2),
        )  # fmt: skip
    return q, k, v


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, x_row_stride, residual_row_stride, out_row_stride, n, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < n
    x = tl.load(x_ptr + row * x_row_stride + i, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_row_stride + i, mask=ok, other=0.0).to(tl.float32)
        # the residual stream is held in x's dtype: round the sum before normalising it, as torch's add_ does
        x = (x + r).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + row * x_row_stride + i, x, mask=ok)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(weight_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + i, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, N]. With ``residual`` ([T, N]), first ``x += residual`` in place. Returns rms_norm(x) * weight
    in x's dtype."""
    if x.dim() != 2 or x.stride(1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError("add_rms_norm: x and residual must be [T, N] and contiguous in their last dimension")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rows, n = x.shape
    if rows:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](
            x, x if residual is None else residual, weight, out, x.stride(0), 0 if residual is None else residual.stride(0),
            out.stride(0), n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return out


SILU_BLOCK = 1024  # columns per program


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, gate_up_row_stride, out_row_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    gate = tl.load(gate_up_ptr + row * gate_up_row_stride + i, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * gate_up_row_stride + n + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + i, (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2N] (gate, then up). Returns silu(gate) * up, [T, N], in gate_up's dtype."""
    if gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2:
        raise ValueError("silu_mul: gate_up must be [T, 2N] and contiguous in its last dimension")
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(n, SILU_BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=SILU_BLOCK)
    return out
