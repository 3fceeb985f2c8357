"""Linear layer whose weight is held in the format that is fastest for the device.

Formats: ``float32`` (plain GEMM in the activation dtype), ``bfloat16`` (weights and matmul in bf16,
activations cast at the boundary), ``int8`` (per-channel weight-only) and ``int4`` (group-32
weight-only, torch's packed CPU layout). The residual stream keeps the model's activation dtype;
only the matmul inputs are cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phiserve.models import quant

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.format = "dense"
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.scales.dtype), self.packed, quant.INT4_GROUP, self.scales)
            return y.to(x.dtype)
        if self.format == "int8":
            return torch.ops.aten._weight_int8pack_mm(x.to(self.scales.dtype), self.packed, self.scales).to(x.dtype)
        w = self.weight
        if w.dtype != x.dtype:
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)

    def to_dense(self, dtype: torch.dtype) -> None:
        self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=False)
        self.format = "dense"

    def to_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, act_dtype: torch.dtype = torch.bfloat16) -> None:
        """Hold the weight as packed int4 (q in 0..15, w = (q - 8) * scale + zero per group of 32)."""
        self.packed, self.scales = quant.pack_int4(q, scale, zero, act_dtype)
        self._drop_dense()
        self.format = "int4"

    def to_int8(self, act_dtype: torch.dtype = torch.bfloat16) -> None:
        q, scale = quant.quantize_int8(self.weight.detach())
        self.packed, self.scales = q, scale.to(act_dtype)
        self._drop_dense()
        self.format = "int8"

    def _drop_dense(self) -> None:
        # Keep the (shape-only) parameter slot so state_dict/loader code still sees the layer.
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)


def convert_linears(
    model: nn.Module,
    fmt: str,
    q4_1_blocks: dict[str, tuple[object, tuple[int, int]]] | None = None,
    lm_head_format: str | None = None,
) -> None:
    """Put every Linear of ``model`` in format ``fmt`` (``lm_head`` in ``lm_head_format`` if given).

    For int4, layers whose checkpoint tensor was GGUF Q4_1 (``q4_1_blocks``: parameter name -> raw
    blocks and shape) are converted exactly; other layers are quantized from their float weights.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        target = lm_head_format if (name == "lm_head" and lm_head_format) else fmt
        if target in ("float32", "bfloat16"):
            module.to_dense(getattr(torch, target))
        elif target == "int8":
            module.to_int8()
        else:
            raw = (q4_1_blocks or {}).get(f"{name}.weight")
            q, scale, zero = quant.q4_1_to_int4(*raw) if raw is not None else quant.quantize_int4(module.weight.detach())
            module.to_int4(q, scale, zero)
