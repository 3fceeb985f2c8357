"""Session-wide test settings."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels (models/triton_kernels.py) run in Triton's CPU interpreter. Triton
# reads this when it defines kernels, its own library's included, so it is set before anything
# imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
