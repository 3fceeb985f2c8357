"""Grammar-constrained decoding with llguidance: a matcher per constrained sequence, token masks per step.

A request asks for constrained output by carrying an llguidance grammar (the JSON spec produced by
`llguidance.LLMatcher.grammar_from_*`) in `SamplingParams.grammar`. The engine gives each such
sequence its own `GrammarMatcher`; before a step samples, `GrammarBackend.submit_masks` computes the
allowed-token masks of the constrained rows in a worker thread, so the work overlaps the model's
forward pass (llguidance drops the GIL while it computes). Unconstrained rows pay nothing: when no
row of a step is constrained no mask is built at all.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import numpy as np
import torch

from phiserve.tokenizer.tokenizer import Tokenizer


class _TokenizerView:
    """What `llguidance.TokenizerWrapper` reads: raw token bytes, special ids and an encode callable.

    Built from our own Tokenizer so the grammar sees exactly the bytes the detokenizer emits.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_token_ids)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, lltokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "grammar error"

    def advance(self, token_id: int) -> bool:
        """Consume a sampled token; False means the matcher rejected it (it is then in an error state)."""
        return self._matcher.consume_token(token_id)

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows as the only continuation from here (may be empty)."""
        return self._matcher.compute_ff_tokens()

    @property
    def is_done(self) -> bool:
        """No further token can extend the output: the sequence should finish now."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def raw(self) -> llguidance.LLMatcher:
        return self._matcher


class GrammarBackend:
    """The model's llguidance tokenizer (built lazily, ~0.3 s) and the mask worker of one engine."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    @property
    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # the API thread (validation) and the engine thread may both ask first
            if self._lltokenizer is None:
                eos = self.tokenizer.eos_token_id
                self._lltokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(_TokenizerView(self.tokenizer)),
                    n_vocab=self.vocab_size,
                    eos_token=eos if eos is not None else None,
                )
            return self._lltokenizer

    def validate(self, grammar: str) -> str | None:
        """None if the grammar compiles for this model, else the error message."""
        try:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        except (ValueError, RuntimeError) as exc:
            return str(exc)
        return messages[0] if is_error else None

    def matcher(self, grammar: str) -> GrammarMatcher:
        return GrammarMatcher(self.lltokenizer, grammar)

    # ---- masks ----------------------------------------------------------------------------------
    def submit_masks(self, rows: Sequence[tuple[GrammarMatcher, Collection[int]]]) -> Future[torch.Tensor]:
        """Start computing the bool [len(rows), vocab] allowed-token masks in the worker thread.

        `rows` holds (matcher, the sequence's stop token ids) per constrained row. The matchers must
        not be advanced until the future is done.
        """
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="phiserve-grammar")
        return self._pool.submit(self.compute_masks, rows)

    def compute_masks(self, rows: Sequence[tuple[GrammarMatcher, Collection[int]]]) -> torch.Tensor:
        v = self.vocab_size
        words = (v + 31) // 32
        bitmask = torch.zeros(len(rows), words, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) // 2)))
        pairs: list[tuple[Any, int]] = [(m.raw, k) for k, (m, _) in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(rows))
        # Bit i of 32-bit word w is token 32*w + i; little-endian bytes keep that order. The row fixes
        # run in numpy: on a busy CPU a torch reduction over one vocab row can cost milliseconds.
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=v, bitorder="little").view(np.bool_)
        for mask, (matcher, stop_ids) in zip(allowed, rows, strict=True):
            # The model's end-of-turn tokens may differ from the tokenizer's EOS that llguidance knows.
            if stop_ids and (matcher.is_accepting or not mask.any()):
                mask[list(stop_ids)] = True
            if not mask.any():  # error state and no stop token: let the row finish somehow
                mask[:] = True
        return torch.from_numpy(allowed)


def batch_mask(num_rows: int, masks: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The sampler's [num_rows, vocab] mask: `masks[k]` at row `rows[k]`, everything allowed elsewhere.

    Built in numpy: small torch fills wake the intra-op thread pool, which on a busy CPU costs more
    than the work itself.
    """
    allowed = np.ones((num_rows, masks.shape[1]), dtype=np.bool_)
    allowed[list(rows)] = masks.numpy()
    return torch.from_numpy(allowed)
