"""Paged attention: matches plain causal attention, and a decode row's result never depends on the batch."""

from __future__ import annotations

import pytest
import torch

from phiserve.models import attention, cpu_kernels
from phiserve.models.attention import AttentionMetadata, DecodeRows, paged_attention

BLOCK = 4


@pytest.fixture(params=["kernel-float32", "kernel-float16", "torch"])
def decode_path(request, monkeypatch):
    """Each decode implementation: our CPU kernel (when it builds here) over a float32 or float16
    cache, and torch's matmuls. Returns the cache dtype."""
    if request.param.startswith("kernel") and not cpu_kernels.available():
        pytest.skip("CPU kernels unavailable here")
    if request.param == "torch":
        monkeypatch.setattr(attention.cpu_kernels, "usable", lambda *tensors, **kwargs: False)
    return torch.float16 if request.param == "kernel-float16" else torch.float32


def _decode_meta(lengths: list[int], starts: list[int]) -> AttentionMetadata:
    """Each context is contiguous from slot `start` (a multiple of BLOCK), as blocks start//BLOCK, +1..."""
    tables = [list(range(s // BLOCK, -(-(s + n) // BLOCK))) for n, s in zip(lengths, starts, strict=True)]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    last = torch.tensor([s + n - 1 for n, s in zip(lengths, starts, strict=True)])
    return AttentionMetadata(slot_mapping=last, decodes=DecodeRows(0, padded, torch.tensor(lengths, dtype=torch.int32), BLOCK))


def test_decode_matches_causal_reference_and_is_batch_invariant(decode_path):
    torch.manual_seed(0)
    heads, kv_heads, dim = 9, 3, 64
    lengths, starts = [37, 5, 90, 64], [0, 100, 200, 400]
    k_cache = torch.randn(512, kv_heads, dim).to(decode_path)
    v_cache = torch.randn(512, kv_heads, dim).to(decode_path)
    q = torch.randn(len(lengths), heads, dim)
    k_new = torch.stack([k_cache[s + n - 1] for n, s in zip(lengths, starts, strict=True)])
    v_new = torch.stack([v_cache[s + n - 1] for n, s in zip(lengths, starts, strict=True)])
    batched = paged_attention(q, k_new, v_new, k_cache.clone(), v_cache.clone(), _decode_meta(lengths, starts), 0.125)
    for i, (n, s) in enumerate(zip(lengths, starts, strict=True)):
        alone = paged_attention(q[i : i + 1], k_new[i : i + 1], v_new[i : i + 1], k_cache.clone(), v_cache.clone(), _decode_meta([n], [s]), 0.125)
        assert torch.equal(alone[0], batched[i])  # bitwise: seeded sampling must not see the batch
        ks, vs = k_cache[s : s + n].float(), v_cache[s : s + n].float()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i][None, :, None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], scale=0.125, enable_gqa=True
        )
        torch.testing.assert_close(batched[i], ref[0, :, 0], rtol=1e-5, atol=1e-5)
