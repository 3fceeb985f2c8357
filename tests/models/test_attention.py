"""Paged attention: matches plain causal attention, and a decode row's result never depends on the batch."""

from __future__ import annotations

import torch

from phiserve.models.attention import DECODE_WIDTH_QUANTUM, AttentionMetadata, DecodeGroup, paged_attention


def _decode_meta(rows: list[int], lengths: list[int], starts: list[int]) -> AttentionMetadata:
    width = DECODE_WIDTH_QUANTUM
    slots = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        slots[i, :n] = torch.arange(s, s + n)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).view(len(rows), 1, 1, width)
    last = torch.tensor([s + n - 1 for n, s in zip(lengths, starts, strict=True)])
    return AttentionMetadata(slot_mapping=last, decodes=(DecodeGroup(torch.tensor(rows), slots, mask),))


def test_decode_matches_causal_reference_and_is_batch_invariant():
    torch.manual_seed(0)
    heads, kv_heads, dim = 9, 3, 64
    lengths, starts = [37, 5, 90, 64], [0, 100, 200, 400]
    k_cache = torch.randn(512, kv_heads, dim)
    v_cache = torch.randn(512, kv_heads, dim)
    q = torch.randn(len(lengths), heads, dim)
    k_new = torch.stack([k_cache[s + n - 1] for n, s in zip(lengths, starts, strict=True)])
    v_new = torch.stack([v_cache[s + n - 1] for n, s in zip(lengths, starts, strict=True)])
    batched = paged_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), _decode_meta([0, 1, 2, 3], lengths, starts), 0.125)
    for i, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        alone = paged_attention(q[i : i + 1], k_new[i : i + 1], v_new[i : i + 1], k_cache.clone(), v_cache.clone(), _decode_meta([0], [n], [s]), 0.125)
        assert torch.equal(alone[0], batched[i])  # bitwise: seeded sampling must not see the batch
        ks, vs = k_cache[s : s + n], v_cache[s : s + n]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i][None, :, None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], scale=0.125, enable_gqa=True
        )
        torch.testing.assert_close(batched[i], ref[0, :, 0], rtol=1e-5, atol=1e-5)
