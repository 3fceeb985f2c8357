"""Attention over the paged KV cache.

The cache of one layer is a flat tensor of slots ``[num_blocks * block_size, num_kv_heads, head_dim]``;
a slot index is ``block_id * block_size + offset``. The runner builds one ``AttentionMetadata`` per
step, shared by every layer. Decode rows go through our CPU kernel, which reads the paged cache in
place (``cpu_kernels.py``), our Triton kernel on CUDA (``triton_kernels.py``), or torch's matmuls
over gathered slots; prefill chunks through our causal kernel over the cache (``prefill_attention``),
or torch's SDPA (flash attention on CUDA) elsewhere.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from phiserve.models import cpu_kernels


@dataclass
class PrefillSpan:
    """One sequence's chunk of new tokens inside the flattened batch."""

    start: int  # first row of the chunk in the flattened batch
    length: int  # number of new tokens
    context_slots: torch.Tensor | None  # [context_len] cache slots incl. the chunk; None = no cached prefix

    @cached_property
    def mask(self) -> torch.Tensor:
        """[length, context_len] bool, True = attend (for torch's SDPA over a cached prefix; our kernel
        takes the causal limit from the slot count)."""
        assert self.context_slots is not None
        end = self.context_slots.numel()
        device = self.context_slots.device
        return torch.arange(end, device=device)[None, :] <= torch.arange(end - self.length, end, device=device)[:, None]


@dataclass
class DecodeRows:
    """The batch's single-token decode rows: its last ``len(context_lens)`` rows."""

    start: int  # first decode row
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor  # [B] int32, context length including the new token
    block_size: int

    @cached_property
    def width_groups(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For torch's kernels: (rows, slots [b, width], mask [b, 1, 1, width]) per padded width.

        The width is a row's own context length rounded up to ``DECODE_WIDTH_QUANTUM``, never the
        batch's longest: the result depends on the padded width, and a row's output must not depend
        on what else is in the batch (seeded requests give the same tokens alone or batched).
        Built once per step; every layer shares it.
        """
        lens = self.context_lens.long()
        widths = (lens + DECODE_WIDTH_QUANTUM - 1) // DECODE_WIDTH_QUANTUM * DECODE_WIDTH_QUANTUM
        bs = self.block_size
        all_slots = (self.block_tables.long()[:, :, None] * bs + torch.arange(bs, device=lens.device)).flatten(1)
        all_slots = F.pad(all_slots, (0, max(0, int(widths.max()) - all_slots.shape[1])))
        groups = []
        for width in widths.unique().tolist():
            members = (widths == width).nonzero().flatten()
            mask = torch.arange(width, device=lens.device)[None, :] < lens[members, None]
            slots = torch.where(mask, all_slots[members, :width], 0)  # padding reads slot 0 (finite, masked)
            groups.append((members + self.start, slots, mask.view(len(members), 1, 1, width)))
        return groups


DECODE_WIDTH_QUANTUM = 128


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    decodes: DecodeRows | None = None
    prefills: tuple[PrefillSpan, ...] = ()

    def for_rows(self, rows: list[int]) -> AttentionMetadata | None:
        """The metadata of the batch cut down to ``rows`` (ascending, distinct), for attention only
        (their K/V are already in the cache): every decode row and, of each prefill chunk, a suffix
        (the rows that sample). None where the rows are not of that form."""
        spans = []
        for span in self.prefills:
            end = span.start + span.length
            first, stop = bisect_left(rows, span.start), bisect_left(rows, end)
            n = stop - first
            if n and rows[first] != end - n:
                return None  # not a suffix
            if n:
                # a chunk's queries sit at the end of its context: the suffix keeps its own positions
                context = self.slot_mapping[span.start : end] if span.context_slots is None else span.context_slots
                spans.append(PrefillSpan(first, n, context))
        dec = self.decodes
        decodes, count = None, 0
        if dec is not None:
            count = dec.context_lens.numel()
            if rows[len(rows) - count :] != list(range(dec.start, dec.start + count)):
                return None
            decodes = DecodeRows(len(rows) - count, dec.block_tables, dec.context_lens, dec.block_size)
        if sum(span.length for span in spans) + count != len(rows):
            return None  # a row in neither
        return AttentionMetadata(self.slot_mapping[rows], decodes, tuple(spans))

    @classmethod
    def single_decode(cls, position: int) -> AttentionMetadata:
        """One sequence decoding its token at ``position``, its cache held in slots 0..position."""
        table = torch.arange(position + 1, dtype=torch.int32)[None, :]  # block size 1: block i = slot i
        return cls(torch.tensor([position]), DecodeRows(0, table, torch.tensor([position + 1], dtype=torch.int32), 1))


def kv_cache_dtype(act_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """float16 where our CPU kernels run attention (they convert on read, as llama.cpp's default f16
    cache: half the memory and half the bytes read per decode step); otherwise the activation dtype."""
    if device.type == "cpu" and act_dtype == torch.float32 and cpu_kernels.available():
        return torch.float16
    return act_dtype


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values (torch path; our kernel path does it in rope_and_cache)."""
    k_cache[slot_mapping] = k.to(k_cache.dtype)
    v_cache[slot_mapping] = v.to(v_cache.dtype)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    meta: AttentionMetadata | None,
    scale: float,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D], already written to the cache at ``meta.slot_mapping``.
    Returns [T, H, D].

    Without a cache (``meta`` None) the whole input is one causal sequence: the reference path.
    """
    if meta is None or k_cache is None:
        return _causal(q, k, v, scale)
    dec = meta.decodes
    ours = cpu_kernels.usable(q, kv_cache=k_cache)
    decode = None  # a kernel that reads the paged cache in place
    if dec is not None and ours:
        decode = torch.ops.phiserve.paged_decode_attention
    elif dec is not None and q.is_cuda:
        from phiserve.models import triton_kernels  # CUDA builds of torch ship Triton; CPU ones need not

        decode = triton_kernels.paged_decode_attention
    decoded = None if decode is None else decode(
        q[dec.start :].contiguous(), k_cache, v_cache, dec.block_tables, dec.context_lens, dec.block_size, scale
    )
    if decoded is not None and dec.start == 0:  # a decode-only step (most steps): the kernel's output is the whole result
        return decoded
    out = torch.empty_like(q)
    if decoded is not None:
        out[dec.start :] = decoded
    elif dec is not None:
        for rows, slots, mask in dec.width_groups:
            # Contiguous operands: on strided ones matmul picks batch-size-dependent kernels.
            qd = q[rows].unsqueeze(2).contiguous()  # [B, H, 1, D]
            kd = k_cache[slots].to(q.dtype).transpose(1, 2).contiguous()  # [B, KVH, width, D]
            vd = v_cache[slots].to(q.dtype).transpose(1, 2).contiguous()
            out[rows] = _decode_attention(qd, kd, vd, mask, scale).squeeze(2)
    prefill_kernel = ours and q.shape[-1] % 16 == 0
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if prefill_kernel:
            # keys and values as the cache holds them (as decode reads them): a row's result does not
            # depend on how its prompt was chunked
            slots = meta.slot_mapping[rows] if span.context_slots is None else span.context_slots
            start = slots.numel() - span.length
            out[rows] = torch.ops.phiserve.prefill_attention(q[rows].contiguous(), k_cache, v_cache, slots, start, scale)
        elif span.context_slots is None:
            out[rows] = _causal(q[rows], k[rows], v[rows], scale)
        else:
            qs = q[rows].transpose(0, 1).unsqueeze(0)
            ks = k_cache[span.context_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
            vs = v_cache[span.context_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
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
