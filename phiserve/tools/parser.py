"""Lenient tool-call extraction from free model text (tool_choice "auto").

Small models write calls in many shapes; all of these are recognised:

- `<tool_call>{...}</tool_call>` (also `<function_call>`), the closing tag optional at the end,
- fenced blocks: ```` ```json\\n{...}\\n``` ```` (language json, tool_call(s) or none),
- bare JSON: `{"name": ..., "arguments": {...}}`, also `"parameters"` instead of `"arguments"`,
  `{"type": "function", "function": {...}}`, `{"tool_calls": [...]}`, arguments as a JSON string,
- a JSON list of any of these; several blocks or objects in one message.

A JSON value is a call only if every call in it names a function of the request and has object
arguments; anything else (invalid JSON, unknown names, other objects) stays text, whole.

`scan` works left to right and, given `final=False`, stops before the first construct that more
text could still complete (`hold`). Every decision before that point depends only on text that is
already there, so scanning a growing text from its last stable point gives the same segments as
scanning the finished text at once: streaming and non-streaming agree by construction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

TAGS = ("tool_call", "function_call")
_OPEN_TAGS = tuple(f"<{t}>" for t in TAGS)
_FENCE = "```"
_FENCE_LANGS = frozenset({"", "json", "tool_call", "tool_calls", "tool_code"})
_CANDIDATE = re.compile(r"[<`{\[]")
_CALL_KEYS = frozenset({"name", "arguments", "parameters", "type", "id"})
_WRAPPER_KEYS = frozenset({"function", "type", "id"})


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True)
class Segment:
    """text[start:end] is plain text (no calls) or exactly the markup of `calls`."""

    start: int
    end: int
    calls: tuple[ParsedCall, ...] = ()


class _Hold:
    pass


_HOLD = _Hold()
_Result = None | _Hold | tuple[int, list[ParsedCall]]  # not a construct | wait for more | (end, calls)


def scan(text: str, names: Collection[str], start: int = 0, final: bool = True) -> tuple[list[Segment], int]:
    """Split text[start:] into text and call segments; returns them and where they stop being final.

    With final=True everything is decided (the second value is len(text)).
    """
    segments: list[Segment] = []
    text_start = i = start
    while (m := _CANDIDATE.search(text, i)) is not None:
        j = m.start()
        res = _construct(text, j, names, final)
        if res is None:
            i = j + 1
            continue
        if isinstance(res, _Hold):
            if j > text_start:
                segments.append(Segment(text_start, j))
            return segments, j
        end, calls = res
        if calls:
            if j > text_start:
                segments.append(Segment(text_start, j))
            segments.append(Segment(j, end, tuple(calls)))
            text_start = end
        i = end  # not calls: the whole span stays text (no calls are looked for inside it)
    if len(text) > text_start:
        segments.append(Segment(text_start, len(text)))
    return segments, len(text)


def calls_from_json_text(body: str, names: Collection[str]) -> list[ParsedCall] | None:
    """Calls in a run of JSON values separated by whitespace or commas; None unless all are calls."""
    body = body.strip()
    if body.startswith(_FENCE):  # a fence inside a tag
        first_nl = body.find("\n")
        body = body[first_nl + 1 :] if first_nl >= 0 else ""
        body = body.removesuffix(_FENCE).strip()
    decoder = json.JSONDecoder()
    calls: list[ParsedCall] = []
    pos = 0
    while pos < len(body):
        try:
            value, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        found = calls_from_value(value, names)
        if found is None:
            return None
        calls.extend(found)
        while pos < len(body) and (body[pos].isspace() or body[pos] == ","):
            pos += 1
    return calls or None


def calls_from_value(value: Any, names: Collection[str]) -> list[ParsedCall] | None:
    if isinstance(value, dict) and set(value) == {"tool_calls"}:
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _call(obj: Any, names: Collection[str]) -> ParsedCall | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        if not set(obj) <= _WRAPPER_KEYS:
            return None
        obj = obj["function"]
    if not set(obj) <= _CALL_KEYS:
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(name, json.dumps(args, ensure_ascii=False))


def _construct(text: str, j: int, names: Collection[str], final: bool) -> _Result:
    c = text[j]
    if c == "<":
        return _tagged(text, j, names, final)
    if c == "`":
        return _fenced(text, j, names, final)
    return _bare(text, j, names, final)


def _tagged(text: str, j: int, names: Collection[str], final: bool) -> _Result:
    rest = text[j : j + 20]
    for tag, open_tag in zip(TAGS, _OPEN_TAGS, strict=True):
        if rest.startswith(open_tag):
            body_start = j + len(open_tag)
            close = text.find(f"</{tag}>", body_start)
            if close < 0:
                if not final:
                    return _HOLD
                return len(text), calls_from_json_text(text[body_start:], names) or []
            return close + len(tag) + 3, calls_from_json_text(text[body_start:close], names) or []
    if not final and any(t.startswith(rest) for t in _OPEN_TAGS):
        return _HOLD  # text ends inside what may become an opening tag
    return None


def _fenced(text: str, j: int, names: Collection[str], final: bool) -> _Result:
    if not text.startswith(_FENCE, j):
        return _HOLD if not final and _FENCE.startswith(text[j:]) else None
    nl = text.find("\n", j + 3)
    if nl < 0:
        return None if final else _HOLD
    if text[j + 3 : nl].strip().lower() not in _FENCE_LANGS:
        return None  # a code block in another language is just text
    close = text.find(_FENCE, nl + 1)
    if close < 0:
        if not final:
            return _HOLD
        return len(text), calls_from_json_text(text[nl + 1 :], names) or []
    return close + 3, calls_from_json_text(text[nl + 1 : close], names) or []


def _bare(text: str, j: int, names: Collection[str], final: bool) -> _Result:
    k = j + 1
    while k < len(text) and text[k].isspace():
        k += 1
    if k == len(text):
        return None if final else _HOLD
    # A call object starts with a key, a list of calls with an object: prose like "{x}" or "[1]" is text now.
    if text[k] not in ('"}' if text[j] == "{" else "{]"):
        return None
    end = json_end(text, j)
    if end is None:
        return (len(text), []) if final else _HOLD
    try:
        value = json.loads(text[j:end])
    except json.JSONDecodeError:
        return end, []
    return end, calls_from_value(value, names) or []


def json_end(text: str, start: int) -> int | None:
    """Index just past the bracket closing the one at `start` (strings respected), or None if open."""
    depth = 0
    in_string = escaped = False
    for k in range(start, len(text)):
        ch = text[k]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return k + 1
    return None
