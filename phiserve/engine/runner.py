"""Model runner: owns the KV cache tensors and turns a scheduled batch into one forward pass.

The whole batch (ragged prefill chunks and decodes) is flattened into one row per new token; logits
are computed only for the rows that sample (the last new token of a sequence that has then computed
all its tokens). On CUDA, decode-only steps replay captured CUDA graphs (``cuda_graphs.py``).
"""

from __future__ import annotations

import torch

from phiserve.engine.cuda_graphs import DecodeGraphs
from phiserve.engine.scheduler import ScheduledBatch
from phiserve.engine.sequence import Sequence
from phiserve.models.attention import AttentionMetadata, DecodeRows, PrefillSpan
from phiserve.models.decoder import Decoder


def kv_bytes_per_token(model: Decoder, dtype: torch.dtype) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    def __init__(
        self,
        model: Decoder,
        num_blocks: int,
        block_size: int,
        kv_dtype: torch.dtype,
        device: torch.device,
        cuda_graphs_for: tuple[int, int] | None = None,
    ) -> None:
        """``cuda_graphs_for``: (max_num_seqs, max_model_len) to capture decode steps as CUDA graphs
        (on a CUDA device only)."""
        self.model = model
        self.block_size = block_size
        self.device = device
        cfg = model.config
        graphs = cuda_graphs_for is not None and device.type == "cuda"
        # With graphs, one block more than the pool: the scratch block of padding rows (cuda_graphs.py).
        shape = ((num_blocks + graphs) * block_size, cfg.num_kv_heads, cfg.head_dim)
        # torch.empty: the pool's pages become resident only as blocks are first used. Only slot 0 must
        # hold finite values: padded decode columns point at it (masked, but 0 * NaN would be NaN).
        self.kv_caches = []
        for _ in range(cfg.num_layers):
            k, v = torch.empty(shape, dtype=kv_dtype, device=device), torch.empty(shape, dtype=kv_dtype, device=device)
            k[0].zero_()
            v[0].zero_()
            self.kv_caches.append((k, v))
        self.graphs: DecodeGraphs | None = None
        self.graph_steps = 0  # decode steps served by a graph replay
        if graphs:
            max_num_seqs, max_model_len = cuda_graphs_for
            self.graphs = DecodeGraphs(model, self.kv_caches, block_size, -(-max_model_len // block_size), max_num_seqs, num_blocks)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Returns logits [S, vocab] for the sequences that sample this step, and those sequences."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        logits_rows: list[int] = []
        samplers: list[Sequence] = []
        bs = self.block_size
        # Prefill chunks first, then single-token decodes: the first `dense_rows` rows take the
        # linears' compute-bound path, the rest the packed decode kernels (see models/linear.py).
        work = sorted(zip(batch.seqs, batch.num_new_tokens, strict=True), key=lambda item: item[1] == 1)
        dense_rows = sum(n for _, n in work if n > 1)
        for seq, n in work:
            start, row = seq.num_computed_tokens, len(input_ids)
            end = start + n
            table = seq.block_table
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            elif start == 0:
                prefills.append(PrefillSpan(row, n, None))
            else:
                prefills.append(PrefillSpan(row, n, self._slots(table, end).to(self.device)))
            if end == seq.num_tokens:
                logits_rows.append(row + n - 1)
                samplers.append(seq)
        if self.graphs is not None and dense_rows == 0 and len(samplers) == len(work) and self.graphs.fits(decode_tables):
            # a decode-only step in which every row samples: the captured graph over these rows
            self.graph_steps += 1
            return self.graphs.run(input_ids, positions, slots, decode_tables, decode_lens), samplers
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=self.device), prefills=tuple(prefills))
        if decode_lens:
            meta.decodes = self._decode_rows(dense_rows, decode_tables, decode_lens)
        logits = self.model(
            torch.tensor(input_ids, device=self.device),
            torch.tensor(positions, device=self.device),
            self.kv_caches,
            meta,
            torch.tensor(logits_rows, dtype=torch.long, device=self.device),  # may be empty: a prefill chunk that does not finish its prompt
            dense_rows,
        )
        return logits, samplers

    def _decode_rows(self, start: int, tables: list[list[int]], lengths: list[int]) -> DecodeRows:
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        return DecodeRows(start, padded.to(self.device), torch.tensor(lengths, dtype=torch.int32, device=self.device), self.block_size)

    def _slots(self, table: list[int], length: int) -> torch.Tensor:
        """Cache slots of the first `length` tokens of a sequence with this block table."""
        bs = self.block_size
        blocks = torch.tensor(table[: -(-length // bs)], dtype=torch.long)
        return (blocks[:, None] * bs + torch.arange(bs)).flatten()[:length]
