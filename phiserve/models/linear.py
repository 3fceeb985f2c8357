"""Linear layer whose weight can be held in the format that is fastest for the device.

Formats: ``float32``, ``bfloat16``/``float16`` (plain GEMM) and weight-only quantized ``int8``
(per output channel) or ``int4`` (group-wise, torch's packed layout), see ``quant.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype:
            x = x.to(w.dtype)
        return F.linear(x, w)
