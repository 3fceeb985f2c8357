"""CUDA graphs of decode-only steps: the whole forward pass replayed as one launch.

A decode step of a large model on a GPU is a few hundred small kernels; launching them one by one from
Python costs more than running them. We capture the model's forward pass once per padded batch size
(1, 2, 4, 8, then multiples of 8 up to ``max_num_seqs``, as vLLM does) over static input buffers, and a
decode-only step copies its inputs in and replays the smallest graph that holds it. Rows past the
batch are padding: token 0 at position 0, writing its key and value into a scratch slot that no
sequence owns (the runner allocates one block more than the pool) and attending only to it.
Everything captured has fixed shapes and reads lengths and block tables on the device (our Triton
decode attention), so no step needs a host synchronisation. Mixed steps (prefill chunks) run eagerly.
"""

from __future__ import annotations

import logging

import torch

from phiserve.models.attention import AttentionMetadata, DecodeRows
from phiserve.models.decoder import Decoder

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to the first that holds max_num_seqs."""
    sizes = [1, 2, 4, 8]
    while sizes[-1] < max_num_seqs:
        sizes.append(sizes[-1] + 8)
    return [s for s in sizes if s < max_num_seqs] + [next(s for s in sizes if s >= max_num_seqs)]


class DecodeGraphs:
    def __init__(
        self,
        model: Decoder,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_blocks_per_seq: int,
        max_num_seqs: int,
        scratch_block: int,
    ) -> None:
        device = kv_caches[0][0].device
        self.sizes = capture_sizes(max_num_seqs)
        rows = self.sizes[-1]
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), scratch_block * block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((rows, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                meta = AttentionMetadata(
                    self.slot_mapping[:size], DecodeRows(0, self.block_tables[:size], self.context_lens[:size], block_size)
                )

                def forward(size: int = size, meta: AttentionMetadata = meta) -> torch.Tensor:
                    return model(self.input_ids[:size], self.positions[:size], kv_caches, meta, None, 0, graph=True)

                forward()  # compiles kernels and picks cuBLAS algorithms outside the capture
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[size] = forward()
                pool = graph.pool()
                self.graphs[size] = graph
        torch.cuda.synchronize(device)
        log.info("captured CUDA graphs of decode steps for batch sizes %s", self.sizes)

    def fits(self, tables: list[list[int]]) -> bool:
        """Whether a decode step with these block tables fits the graphs' buffers."""
        return len(tables) <= self.sizes[-1] and max(len(t) for t in tables) <= self.block_tables.shape[1]

    def run(
        self, input_ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]], lengths: list[int]
    ) -> torch.Tensor:
        """One decode step of len(input_ids) rows (each samples; tables and context lengths as
        DecodeRows holds them). Returns logits [rows, vocab], valid until the next replay."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        scratch_slot = self.scratch_block * self.block_size
        # one host-to-device copy per buffer; padding rows get the scratch row. Block tables only up
        # to the batch's widest row: the kernel never reads a column past a row's length (filling all
        # max_model_len / block_size columns from Python cost milliseconds at 64 rows).
        self.input_ids[:size].copy_(torch.tensor(input_ids + [0] * pad))
        self.positions[:size].copy_(torch.tensor(positions + [0] * pad))
        self.slot_mapping[:size].copy_(torch.tensor(slots + [scratch_slot] * pad))
        self.context_lens[:size].copy_(torch.tensor(lengths + [1] * pad, dtype=torch.int32))
        width = max(len(t) for t in tables)
        table_rows = [t + [self.scratch_block] * (width - len(t)) for t in tables] + [[self.scratch_block] * width] * pad
        self.block_tables[:size, :width].copy_(torch.tensor(table_rows, dtype=torch.int32))
        self.graphs[size].replay()
        return self.logits[size][:n]
