"""OpenAI `stop` strings over streamed text.

Text arrives in detokenized pieces, so a stop string can span several pieces. The checker keeps
back only the longest suffix of the text seen so far that is a proper prefix of some stop string:
everything before that suffix can never become part of a stop, so it is safe to emit at once.
Any stop occurrence must start inside the held-back suffix or the new piece, so each feed only
searches held + new text (held is shorter than the longest stop): O(len(piece) + max stop length).
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, stop: list[str]) -> None:
        self.stops = [s for s in dict.fromkeys(stop) if s]  # drop empties and duplicates, keep order
        self._held = ""
        self._stopped = False
        self.stop_reason: str | None = None  # the stop string that matched, once stopped

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def held(self) -> str:
        """Text received but not yet emitted."""
        return self._held

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add a piece of text; return (text safe to emit now, whether a stop string was hit)."""
        if self._stopped:
            return "", True
        if not self.stops:
            return new_text, False
        text = self._held + new_text
        best = -1
        for s in self.stops:
            idx = text.find(s)
            if idx != -1 and (best == -1 or idx < best):  # the earliest stop wins
                best, self.stop_reason = idx, s
        if best != -1:
            self._stopped = True
            self._held = ""
            return text[:best], True
        keep = self._partial_suffix_len(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (length, EOS)."""
        out, self._held = self._held, ""
        return out

    def _partial_suffix_len(self, text: str) -> int:
        # Longest suffix of text that is a proper prefix of some stop string.
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
