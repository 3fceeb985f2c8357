"""Streaming token -> text conversion that never splits a UTF-8 character."""

from __future__ import annotations

import codecs

from phiserve.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, one `push` per token.

    Works on raw token bytes through an incremental UTF-8 decoder, so each push costs O(bytes of
    that token) instead of re-decoding the sequence. The decoder holds back an incomplete but
    still-valid multi-byte prefix (at most 3 bytes) until the next byte completes it; a byte that
    makes the sequence invalid releases it as U+FFFD right away, so invalid output cannot stall.
    This is the same "maximal subpart" replacement a full `decode` does, so the pieces always
    concatenate to `tokenizer.decode(ids)` for byte-level vocabularies.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = frozenset(tokenizer.special_token_ids) if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._num_tokens = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._num_tokens += 1
        if token_id in self._skip:
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def push_many(self, token_ids: list[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: emit any held-back incomplete bytes (as U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending_bytes(self) -> int:
        """Bytes held back waiting for the rest of a multi-byte character."""
        return len(self._decoder.getstate()[0])

    @property
    def num_tokens(self) -> int:
        return self._num_tokens
