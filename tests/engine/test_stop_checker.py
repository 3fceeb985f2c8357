"""StopChecker: stops across piece boundaries, minimal hold-back, flush semantics."""

from __future__ import annotations

import random

import pytest

from phiserve.engine.stop_checker import StopChecker


def _stream(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    """Feed pieces until stopped; return (emitted text incl. flush if not stopped, stopped, emissions)."""
    sc = StopChecker(stops)
    emitted: list[str] = []
    for piece in pieces:
        out, stopped = sc.feed(piece)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True, emitted
    emitted.append(sc.flush())
    return "".join(emitted), False, emitted


def _expected(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    # Generation halts at the first piece that completes any stop; the cut is at the earliest start
    # among the stops complete by then (a longer stop that started earlier never gets to finish).
    text = ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stops if s) if i != -1]
        if hits:
            return text[: min(hits)], True
    return text, False


def test_no_stops_is_pass_through() -> None:
    sc = StopChecker([])
    for piece in ["Hel", "lo", "", " wor", "ld"]:
        assert sc.feed(piece) == (piece, False)
        assert sc.held == ""
    assert sc.flush() == ""


@pytest.mark.parametrize(
    "pieces",
    [["Hello wor", "ld. END", " more"], ["Hello world. E", "N", "D more"], ["Hello world. EN", "D"]],
)
def test_stop_spanning_pieces(pieces: list[str]) -> None:
    text, stopped, _ = _stream(["END"], pieces)
    assert stopped and text == "Hello world. "


def test_stop_inside_single_piece_cuts_rest() -> None:
    sc = StopChecker(["\n\n"])
    assert sc.feed("a\n\nb") == ("a", True)
    assert sc.stop_reason == "\n\n"
    assert sc.feed("more") == ("", True)  # nothing after a stop is ever emitted
    assert sc.flush() == ""


def test_overlapping_prefix() -> None:
    # "ab" is held as a possible start of "abc", then "abab" shows only the second "ab" can be.
    sc = StopChecker(["abc"])
    assert sc.feed("ab") == ("", False)
    assert sc.feed("ab") == ("ab", False)
    assert sc.held == "ab"
    assert sc.feed("c") == ("", True)
    assert _stream(["abc"], list("ababc"))[:2] == ("ab", True)
    assert _stream(["aab"], list("aaab"))[:2] == ("a", True)


def test_multiple_stops_earliest_wins() -> None:
    sc = StopChecker(["world", "lo w"])
    assert sc.feed("hello world") == ("hel", True)
    assert sc.stop_reason == "lo w"
    # Across pieces, with one stop a prefix of another: the cut is at the earliest start.
    assert _stream(["xyz", "yz!", "y"], ["ab x", "y", "z"])[:2] == ("ab x", True)
    assert _stream(["STOP", "TOP"], ["a S", "TO", "P"])[:2] == ("a ", True)


def test_multibyte_characters() -> None:
    sc = StopChecker(["日本"])
    assert sc.feed("こんにちは日") == ("こんにちは", False)
    assert sc.held == "日"
    assert sc.feed("本語") == ("", True)
    assert _stream(["日本"], ["日", "曜日", "本"])[:2] == ("日曜", True)
    assert _stream(["🙂x"], ["a🙂", "🙂", "y"])[:2] == ("a🙂🙂y", False)


def test_hold_back_is_minimal() -> None:
    sc = StopChecker(["</answer>", "###"])
    assert sc.feed("The answer is 4") == ("The answer is 4", False)  # nothing could start a stop
    assert sc.feed(" <") == (" ", False)
    assert sc.held == "<"
    assert sc.feed("/ans") == ("", False)
    assert sc.held == "</ans"
    assert sc.feed("x") == ("</ansx", False)  # the prefix broke: release all of it at once
    assert sc.held == ""
    assert sc.feed("##") == ("", False)
    assert sc.feed(" #") == ("## ", False)
    assert sc.held == "#"


def test_flush_releases_held_text_once() -> None:
    sc = StopChecker(["STOP"])
    assert sc.feed("almost ST") == ("almost ", False)
    assert sc.flush() == "ST"
    assert sc.flush() == ""


def test_shorter_stop_completing_first_wins() -> None:
    # "abcc" started earlier, but "c" completes first; generation stops there.
    assert _stream(["c", "abcc"], ["a", "ab", "c", "c"])[:2] == ("aab", True)


def test_empty_stop_strings_ignored() -> None:
    assert _stream(["", "z"], ["abc"])[:2] == ("abc", False)


def test_random_streams_match_whole_text_search() -> None:
    # Random splits of random text over a tiny alphabet (lots of partial matches) must emit exactly
    # what a search of the whole text so far after every piece gives, holding back only the
    # longest suffix that is a proper prefix of a stop.
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        sc = StopChecker(stops)
        out = []
        stopped = False
        for piece in pieces:
            o, stopped = sc.feed(piece)
            out.append(o)
            if stopped:
                break
            seen = "".join(out) + sc.held
            longest = max(
                (n for s in stops for n in range(len(s)) if seen.endswith(s[:n])), default=0
            )
            assert len(sc.held) == longest, (stops, pieces)
        if not stopped:
            out.append(sc.flush())
        assert ("".join(out), stopped) == _expected(stops, pieces), (stops, pieces)
