"""Weight-only quantized formats for CPU matmuls, and exact conversion from GGUF Q4_1 blocks.

torch's CPU int4 kernel computes ``w = (q - 8) * scale + zero`` per group of 32 input columns; a Q4_1
block stores ``w = m + d * q``, so ``scale = d`` and ``zero = m + 8d`` reproduce the file's weights
exactly (up to the kernel's activation dtype).
"""

from __future__ import annotations

import numpy as np
import torch

INT4_GROUP = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


def q4_1_to_int4(blocks: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 rows ``[N, K/32*20]`` uint8 -> (q int32 [N, K] in 0..15, scale [N, K/32], zero [N, K/32]) fp32."""
    n, k = shape
    raw = np.ascontiguousarray(blocks).reshape(n, k // INT4_GROUP, Q4_1_BLOCK_BYTES)
    d = raw[:, :, 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    m = raw[:, :, 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    nibbles = raw[:, :, 4:]
    # Low nibbles hold elements 0..15 of a block, high nibbles 16..31.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k).astype(np.int32)
    d_t, m_t = torch.from_numpy(d), torch.from_numpy(m)
    return torch.from_numpy(q), d_t, m_t + 8 * d_t


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max group-32 quantization of a float weight [N, K] (for non-Q4_1 sources)."""
    n, k = w.shape
    g = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo + 8 * scale


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(act_dtype)  # [K/32, N, 2]
    return packed, scales_and_zeros


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [N, K], scale [N])."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale
