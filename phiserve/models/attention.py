"""Attention over the paged KV cache.

The cache of one layer is a flat tensor of slots ``[num_blocks * block_size, num_kv_heads, head_dim]``;
a slot index is ``block_id * block_size + offset``. The runner builds one ``AttentionMetadata`` per
step, shared by every layer, so per-layer work is only the cache write, one gather and SDPA calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens inside the flattened batch."""

    start: int  # first row of the chunk in the flattened batch
    length: int  # number of new tokens
    context_slots: torch.Tensor | None  # [context_len] cache slots incl. the chunk; None = no cached prefix
    mask: torch.Tensor | None  # [length, context_len] bool, True = attend; None when context_slots is None


@dataclass
class DecodeGroup:
    """Single-token decode rows whose contexts are padded to one width.

    The width is the row's own context length rounded up to ``DECODE_WIDTH_QUANTUM``, never the batch's
    longest: SDPA's result depends on the padded width, and a row's output must not depend on what
    else is in the batch (seeded and greedy requests give the same tokens alone or batched).
    """

    rows: torch.Tensor  # [B] rows of the batch
    slots: torch.Tensor  # [B, width] cache slots of each row's context (padding points at slot 0)
    mask: torch.Tensor  # [B, 1, 1, width] bool, True = attend


DECODE_WIDTH_QUANTUM = 128


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    decodes: tuple[DecodeGroup, ...] = ()
    prefills: tuple[PrefillSpan, ...] = ()


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    meta: AttentionMetadata | None,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]. Returns [T, H, D].

    Without a cache (``meta`` None) the whole input is one causal sequence: the reference path.
    """
    if meta is None or k_cache is None:
        return _causal(q, k, v, scale)
    k_cache[meta.slot_mapping] = k
    v_cache[meta.slot_mapping] = v
    out = torch.empty_like(q)
    for group in meta.decodes:
        # Contiguous operands: on strided ones matmul picks batch-size-dependent kernels.
        qd = q[group.rows].unsqueeze(2).contiguous()  # [B, H, 1, D]
        kd = k_cache[group.slots].transpose(1, 2).contiguous()  # [B, KVH, width, D]
        vd = v_cache[group.slots].transpose(1, 2).contiguous()
        out[group.rows] = _decode_attention(qd, kd, vd, group.mask, scale).squeeze(2)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if span.context_slots is None:
            out[rows] = _causal(q[rows], k[rows], v[rows], scale)
        else:
            qs = q[rows].transpose(0, 1).unsqueeze(0)
            ks = k_cache[span.context_slots].transpose(0, 1).unsqueeze(0)
            vs = v_cache[span.context_slots].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, scale=scale, enable_gqa=True)
            out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain matmul-softmax-matmul for single-token rows. SDPA's CPU kernel splits small batches
    across threads along the context, so a row's result would depend on how many rows share the
    call; these batched matmuls compute every row the same way whatever the batch size."""
    b, h, _, d = q.shape
    kvh = k.shape[1]
    scores = torch.matmul(q.view(b, kvh, h // kvh, d), k.transpose(-1, -2)) * scale  # [B, KVH, G, W]
    probs = torch.softmax(scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf")), dim=-1)
    return torch.matmul(probs, v).view(b, h, 1, d)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        is_causal=True,
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(0).transpose(0, 1)
