"""Token-budget scheduler: each step packs decode tokens first, then prefill chunks.

Every sequence has ``num_computed_tokens`` and ``num_tokens``; a step gives each scheduled sequence
some of its uncomputed tokens, under ``max_num_batched_tokens`` and ``max_num_seqs``. Long prompts
are therefore prefilled in chunks while running streams keep decoding. When the KV pool runs out,
the newest running sequence is preempted (blocks freed, recomputed later) instead of failing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from phiserve.engine.kv_cache import BlockManager
from phiserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        scheduled: dict[int, int] = {}
        # Decodes (one token left) before chunks of prefill, so a long prompt never stalls running streams.
        order = sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = chunk_size(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:
                continue
            while not self.block_manager.allocate(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                scheduled.pop(victim.seq_id, None)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                scheduled[seq.seq_id] = n
                budget -= n
        budget = self.max_num_batched_tokens - sum(scheduled.values())
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.leader is not None and not _prompt_done(seq.leader):
                skipped.append(seq)  # sibling choice: wait for the shared prompt to be cached
                continue
            seq.leader = None
            self.block_manager.match_prefix(seq)
            n = chunk_size(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0 or not self.block_manager.allocate(seq, n):
                self.block_manager.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                self.waiting.appendleft(seq)
                break
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = n
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        seqs = [s for s in self.running if s.seq_id in scheduled]
        return ScheduledBatch(seqs, [scheduled[s.seq_id] for s in seqs])

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark seq finished (stop, length, abort) and return its blocks to the pool."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)


def chunk_size(remaining: int, budget: int) -> int:
    """Tokens to compute this step (0 = wait). A multi-token remainder is never cut into a 1-token
    piece: single-token rows take the decode kernels, so a prompt token must not land in one
    depending on how busy the step is."""
    n = min(remaining, budget)
    if remaining == 1:
        return n
    if remaining - n == 1:
        n -= 1
    return n if n >= 2 else 0


def _prompt_done(seq: Sequence) -> bool:
    return seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens
