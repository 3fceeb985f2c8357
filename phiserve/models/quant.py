"""Weight-only quantized formats for CPU matmuls, and exact conversion from GGUF Q4_1 blocks.

int4 weights are held as ``w = q * scale + min`` per group of 32 input columns (q in 0..15), which is
exactly a Q4_1 block (``d``, ``m``). Two packings: ours (``pack_q4``: eight output features side by
side in a vector, fp16 scale and min, for ``torch.ops.phiserve.int4_linear``) and torch's (``pack_int4``: its CPU
int4 layout, which computes ``(q - 8) * scale + zero``, so ``zero = min + 8 * scale``).
"""

from __future__ import annotations

import numpy as np
import torch

INT4_GROUP = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


def q4_1_to_int4(blocks: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 rows ``[N, K/32*20]`` uint8 -> (q int32 [N, K] in 0..15, scale [N, K/32], min [N, K/32]) fp32."""
    n, k = shape
    raw = np.ascontiguousarray(blocks).reshape(n, k // INT4_GROUP, Q4_1_BLOCK_BYTES)
    d = raw[:, :, 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    m = raw[:, :, 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    nibbles = raw[:, :, 4:]
    # Low nibbles hold elements 0..15 of a block, high nibbles 16..31.
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k).astype(np.int32)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m)


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max group-32 quantization of a float weight [N, K] (for non-Q4_1 sources)."""
    n, k = w.shape
    g = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    # scale and min rounded to fp16, as Q4_1 stores them (our packing keeps fp16)
    lo = lo.to(torch.float16).float()
    scale = ((hi - lo) / 15).clamp(min=1e-7).to(torch.float16).float()
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scale, lo


def _pack_q4_words(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> int32 [N/8, K/8, 8] (see csrc/cpu_kernels.cpp): per block of 8 features
    and group of 32, four vectors of 16 int16 lanes; lane 2l + h of vector v holds, at bits 4j,
    feature l's value at k = 2(4v + j) + h of the group."""
    n, k = q.shape
    v = q.to(torch.int64).reshape(n // 8, 8, k // 32, 4, 4, 2)  # [nb, l, g, v, j, h]
    shifts = 4 * torch.arange(4)[:, None] + 16 * torch.arange(2)[None, :]
    words = (v << shifts).sum((-1, -2))  # [nb, l, g, v], < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.permute(0, 2, 3, 1).reshape(n // 8, k // 8, 8).contiguous()


def _pack_q8_bytes(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> int32 [N/8, K/4, 8]: per block of 8 features and group of 32, sixteen 16-byte
    chunks; byte 2l + h of chunk p is feature l's value at k = 2p + h of the group."""
    n, k = q.shape
    b = q.to(torch.int8).reshape(n // 8, 8, k // 32, 16, 2).permute(0, 2, 3, 1, 4)  # [nb, g, p, l, h]
    return b.reshape(n // 8, -1).contiguous().view(torch.int32).reshape(n // 8, k // 4, 8)


def _lane_scales(t: torch.Tensor) -> torch.Tensor:
    """Per-group [N, K/32] -> fp16 [N/8, K/32, 8]: eight features' values side by side."""
    n, groups = t.shape
    return t.to(torch.float16).reshape(n // 8, 8, groups).transpose(1, 2).contiguous()


def pack_q4(q: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our int4 kernel's layout, N a multiple of 8: (qweight int32 [N/8, K/8, 8], scales and mins fp16
    [N/8, K/32, 8]; exact for Q4_1, whose d and m are fp16)."""
    return _pack_q4_words(q), _lane_scales(scale), _lane_scales(min_)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor, act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout: (packed weight, scales_and_zeros [K/32, N, 2] in act_dtype)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales_and_zeros = torch.stack([scale.t(), (min_ + 8 * scale).t()], dim=-1).contiguous().to(act_dtype)
    return packed, scales_and_zeros


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [N, K], scale [N])."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-32 int8 (GGUF Q8_0): (q int8 [N, K], scale fp16-valued fp32 [N, K/32]).
    Exact for weights dequantized from Q8_0: the largest |w| of a group is 127 * d, so d and q come back."""
    n, k = w.shape
    g = w.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    scale = (g.abs().amax(-1) / 127).to(torch.float16).float()
    q = torch.where(scale[..., None] > 0, g / scale[..., None], 0).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), scale


def pack_q8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int8 kernel's layout, N a multiple of 8: (qweight int32 [N/8, K/4, 8], scales fp16 [N/8, K/32, 8])."""
    return _pack_q8_bytes(q), _lane_scales(scale)
