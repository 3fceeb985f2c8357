"""Linear layer whose weight is held in the formats that are fastest for each batch shape.

Formats: dense ``float32`` / ``bfloat16`` (GEMM; activations cast at the boundary), and weight-only
``int8`` (per channel, torch's kernel) or ``int4`` (group-32: our kernel ``torch.ops.phiserve.int4_linear``
when it builds on this machine, see ``cpu_kernels.py``; torch's packed CPU kernel otherwise). With our
kernels every row takes one op: it picks its inner loop by the number of rows (small batches stream
the packed weights, from 12 rows (int4; 24 for int8) they are unpacked a panel at a time) with the
same bits either way; on CPUs with AMX the prefill rows of an int4 layer take a tile kernel instead
(its own bits, the same for a row whatever the batch). With torch's packed formats, rows of prefill chunks (many rows, compute-bound)
and single-token decode rows (memory-bound) take different paths: a layer may hold a dense weight
("hybrid") for the prefill rows' GEMM. Which rows are which is decided by the runner per sequence, so
a row's numerics never depend on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phiserve.models import cpu_kernels, quant

WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
MIN_GEMM_ROWS = 8


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.packed_format: str | None = None  # "int4" | "int8" | "q8" (group int8, our kernel) when packed
        self.packed: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.mins: torch.Tensor | None = None  # set when the int4 copy is in our kernel's layout
        self.has_dense = True
        self.approx: Linear | None = None  # fast copy that ranks the vocabulary for the "rescored" head
        self.rescore_top = 0

    def forward(self, x: torch.Tensor, dense_rows: int | None = None) -> torch.Tensor:
        """``dense_rows``: leading rows (prefill) that take the dense weight when the layer keeps one
        beside its packed weight; the other rows (decode) take the packed kernel. Without a dense
        copy every row takes the packed kernel in one call (ours picks its inner loop by the row
        count, same bits either way). None: every row packed."""
        if self.approx is not None:
            return self._rescored(x)
        if self.packed_format is None:
            return self._dense(x)
        if not self.has_dense or dense_rows is None or dense_rows == 0:
            return self._packed(x, min(dense_rows or 0, x.shape[0]))
        if dense_rows >= x.shape[0]:
            return self._dense(x)
        return torch.cat([self._dense(x[:dense_rows]), self._packed(x[dense_rows:])])

    @property
    def in_our_format(self) -> bool:
        """Packed for our CPU kernels: int4 with mins (our layout) or group-32 int8 ("q8")."""
        return self.mins is not None or self.packed_format == "q8"

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != x.dtype:
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        rows = x.shape[0]
        if w.dtype == torch.float32 and rows < MIN_GEMM_ROWS and x.device.type == "cpu":
            # fp32 GEMM takes a GEMV path below 8 rows whose rounding differs: pad so a row's result
            # never depends on how many rows share the step (batch invariance).
            return F.linear(F.pad(x, (0, 0, 0, MIN_GEMM_ROWS - rows)), w)[:rows]
        return F.linear(x, w)

    def _packed(self, x: torch.Tensor, prefill_rows: int = 0) -> torch.Tensor:
        if self.in_our_format:
            # our kernels take fp32 rows; the decoder's are already (skip the no-op casts: ~1 us each, 240 a step)
            x32 = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
            if self.mins is not None:
                # the leading prefill rows take the AMX kernel on CPUs that have one (cpu_kernels.py)
                y = torch.ops.phiserve.int4_linear(x32, self.packed, self.scales, self.mins, prefill_rows)
            else:
                y = torch.ops.phiserve.int8_linear(x32, self.packed, self.scales)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if self.packed_format == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(self.scales.dtype), self.packed, quant.INT4_GROUP, self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x.to(self.scales.dtype), self.packed, self.scales)
        return y.to(x.dtype)

    def _rescored(self, x: torch.Tensor) -> torch.Tensor:
        # Rank the whole vocabulary with a fast copy: group-32 int8 through our kernel (exact for a
        # GGUF Q8_0 embedding; an int4 copy measured KL 0.01, its tail too coarse), else bf16. Then
        # recompute the top candidates exactly in fp32 (elementwise, so a row's values never depend
        # on the batch): greedy choices and the probability mass that sampling sees are fp32-exact;
        # only the far tail keeps the copy's rounding.
        logits = self.approx(x).float()
        if cpu_kernels.usable(logits, self.weight):  # one selection scan per row: torch.topk took ~0.4 ms a row after a decode step
            top = torch.ops.phiserve.top_k_indices(logits.contiguous(), self.rescore_top)  # [M, k]
            exact = torch.ops.phiserve.rows_dot(x.float().contiguous(), self.weight, top)
        else:
            top = logits.topk(self.rescore_top, dim=-1).indices
            exact = (x.float()[:, None, :] * self.weight[top].float()).sum(-1)
        return logits.scatter_(1, top, exact).to(x.dtype)

    def set_rescored(self, top: int = 64) -> None:
        """Output head: fp32 weight kept (tied models share it with the embedding) plus a ranking copy."""
        self.set_dense(torch.float32)
        approx = Linear(self.in_features, self.out_features)
        approx.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        if self.weight.device.type == "cpu" and self.out_features % 8 == 0 and self.in_features % 32 == 0 and cpu_kernels.available():
            approx.set_q8()
        else:
            approx.set_dense(torch.bfloat16)
        self.approx = approx
        self.rescore_top = min(top, self.out_features)

    def set_dense(self, dtype: torch.dtype) -> None:
        self.weight = nn.Parameter(self.weight.detach().to(dtype), requires_grad=False)

    def set_int4(self, q: torch.Tensor, scale: torch.Tensor, min_: torch.Tensor, keep_dense: bool, act_dtype: torch.dtype = torch.float32) -> None:
        """Add a packed int4 copy (q in 0..15, w = q * scale + min per group of 32). ``act_dtype``: the
        activations of torch's kernel (no compiler): fp32, since its bf16 rows (error ~4e-3 of the
        largest output against ~3e-7) flipped a greedy near-tie on an AVX-512 CPU."""
        if q.device.type == "cpu" and q.shape[0] % 8 == 0 and cpu_kernels.available():
            self.packed, self.scales, self.mins = quant.pack_q4(q, scale, min_)
        else:
            self.packed, self.scales = quant.pack_int4(q, scale, min_, act_dtype)
        self.packed_format = "int4"
        self._keep_dense(keep_dense)

    def set_q8(self) -> None:
        """Replace the weight by a group-32 int8 copy for our int8 kernel (exact for GGUF Q8_0 values)."""
        # in row chunks: the int64 packing temporaries of a whole vocabulary would be ~0.5 GB
        chunks = [quant.pack_q8(*quant.quantize_q8(rows)) for rows in self.weight.detach().split(4096)]
        self.packed, self.scales = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        self.packed_format = "q8"
        self._keep_dense(False)

    def set_int8(self, keep_dense: bool, act_dtype: torch.dtype = torch.bfloat16) -> None:
        q, scale = quant.quantize_int8(self.weight.detach())
        self.packed, self.scales = q, scale.to(act_dtype)
        self.packed_format = "int8"
        self._keep_dense(keep_dense)

    def _keep_dense(self, keep: bool) -> None:
        self.has_dense = keep
        if not keep:  # free the dense copy; the parameter slot stays so the module still lists it
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)


def convert_linear(
    name: str,
    module: Linear,
    fmt: str,
    q4_1_blocks: dict[str, tuple[object, tuple[int, int]]] | None = None,
    lm_head_format: str | None = None,
    keep_dense: bool = False,
) -> None:
    """Put one Linear (``name`` in the model) in format ``fmt`` (``lm_head`` in ``lm_head_format`` if given).

    For int4, layers whose checkpoint tensor was GGUF Q4_1 (``q4_1_blocks``: parameter name -> raw
    blocks and shape) are converted exactly; other layers are quantized from their float weights.
    ``keep_dense`` keeps the dense weight beside a packed one, for the hybrid prefill/decode split.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    target = lm_head_format if (name == "lm_head" and lm_head_format) else fmt
    if target == "rescored":
        module.set_rescored()
    elif target in ("float32", "bfloat16", "float16"):
        module.set_dense(getattr(torch, target))
    elif target == "int8":
        module.set_int8(keep_dense)
    else:
        raw = (q4_1_blocks or {}).get(f"{name}.weight")
        q, scale, min_ = quant.q4_1_to_int4(*raw) if raw is not None else quant.quantize_int4(module.weight.detach())
        module.set_int4(q, scale, min_, keep_dense)
