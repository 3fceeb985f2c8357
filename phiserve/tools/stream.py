"""A choice's text deltas -> message deltas (content pieces and tool-call pieces), streamed or not.

The non-streamed response is built by feeding the same deltas and concatenating what comes out
(`collect`), so both agree exactly. Two kinds:

- `AutoCallStream` (tool_choice "auto"): calls found by `parser.scan` are emitted whole once their
  markup is complete (first delta: id + name + arguments "", then the arguments). Content is the
  text around the calls: whitespace next to a call is dropped and text on both sides of a call is
  joined by a newline; with no call at all, content is the text exactly.
- `ForcedCallStream` (tool_choice "required" or a named function): the output is grammar-forced to
  `CallFormat` markup, so arguments are streamed as they are generated.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from phiserve.tools.formats import CallFormat
from phiserve.tools.parser import ParsedCall, Segment, json_end, scan


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class CallDelta:
    index: int
    arguments: str = ""
    id: str | None = None  # set, with name, on a call's first delta only
    name: str | None = None


@dataclass
class MessageDelta:
    content: str = ""
    call: CallDelta | None = None


@dataclass
class Message:
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)
    call_ids: list[str] = field(default_factory=list)


class CallStream:
    """Interface of the two kinds; `num_calls` counts calls begun so far."""

    num_calls: int = 0

    def feed(self, text: str) -> list[MessageDelta]:
        raise NotImplementedError

    def finish(self) -> list[MessageDelta]:
        raise NotImplementedError


class AutoCallStream(CallStream):
    """`max_calls` (1 when parallel_tool_calls is false): calls beyond it are dropped, not reported."""

    def __init__(self, names: Collection[str], max_calls: int | None = None) -> None:
        self.names = frozenset(names)
        self.max_calls = max_calls
        self.text = ""
        self._pos = 0  # text before this is decided
        self._pending_ws = ""  # trailing whitespace of the content so far: dropped if a call follows
        self._after_call = False  # no content since the last call
        self._has_content = False

    def feed(self, text: str) -> list[MessageDelta]:
        self.text += text
        segments, self._pos = scan(self.text, self.names, self._pos, final=False)
        return self._emit(segments)

    def finish(self) -> list[MessageDelta]:
        segments, self._pos = scan(self.text, self.names, self._pos, final=True)
        out = self._emit(segments)
        if self._pending_ws and not self.num_calls:
            out.append(MessageDelta(content=self._pending_ws))  # no calls: the text is returned exactly
        self._pending_ws = ""
        return out

    def _emit(self, segments: Iterable[Segment]) -> list[MessageDelta]:
        out: list[MessageDelta] = []
        for seg in segments:
            if seg.calls:
                self._pending_ws = ""
                self._after_call = True
                for call in seg.calls:
                    if self.max_calls is not None and self.num_calls >= self.max_calls:
                        break
                    index = self.num_calls
                    self.num_calls += 1
                    out.append(MessageDelta(call=CallDelta(index, "", new_call_id(), call.name)))
                    out.append(MessageDelta(call=CallDelta(index, call.arguments)))
                continue
            piece = self.text[seg.start : seg.end]
            if self._after_call:
                piece = piece.lstrip()
                if not piece:
                    continue
                self._after_call = False
                body = ("\n" if self._has_content else "") + piece
            else:
                body = self._pending_ws + piece
            core = body.rstrip()
            self._pending_ws = body[len(core) :]
            if core:
                out.append(MessageDelta(content=core))
                self._has_content = True
        return out


class ForcedCallStream(CallStream):
    """Follows `head NAME name_end ARGS tail (sep head ...)*` as the grammar produces it."""

    def __init__(self, fmt: CallFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self._pos = 0
        self._state = "head"  # head -> name -> name_end -> args -> tail -> sep -> head ...
        self._args_start = 0
        self._broken = False

    def feed(self, text: str) -> list[MessageDelta]:
        self.text += text
        out: list[MessageDelta] = []
        while not self._broken and self._step(out):
            pass
        return out

    def finish(self) -> list[MessageDelta]:
        # A cut-off call keeps its partial arguments (finish_reason "length"); unexpected text is kept as content.
        if self._broken or (self.num_calls == 0 and self.text.strip()):
            rest = self.text[self._pos :] if self.num_calls else self.text
            self._pos = len(self.text)
            return [MessageDelta(content=rest)] if rest else []
        return []

    def _literal(self, literal: str) -> bool | None:
        """Consume `literal` at the cursor: True done, None need more text, False mismatch."""
        have = self.text[self._pos : self._pos + len(literal)]
        if have == literal:
            self._pos += len(literal)
            return True
        if literal.startswith(have):
            return None
        self._broken = True
        return False

    def _step(self, out: list[MessageDelta]) -> bool:
        """Advance one state if the text allows; False when more text is needed (or it broke)."""
        state = self._state
        if state in ("head", "name_end", "tail", "sep"):
            literal = {"head": self.fmt.head, "name_end": self.fmt.name_end, "tail": self.fmt.tail, "sep": self.fmt.sep}[state]
            if self._literal(literal) is not True:
                return False
            self._state = {"head": "name", "name_end": "args", "tail": "sep", "sep": "head"}[state]
            if state == "name_end":
                self._args_start = self._pos
            return True
        if state == "name":
            end = self.text.find('"', self._pos)
            if end < 0:
                return False
            name = self.text[self._pos : end]
            out.append(MessageDelta(call=CallDelta(self.num_calls, "", new_call_id(), name)))
            self.num_calls += 1
            self._pos = end
            self._state = "name_end"
            return True
        # args: stream what has arrived; the object ends where its braces balance.
        end = json_end(self.text, self._args_start)
        stop = len(self.text) if end is None else end
        if stop > self._pos:
            out.append(MessageDelta(call=CallDelta(self.num_calls - 1, self.text[self._pos : stop])))
            self._pos = stop
        if end is None:
            return False
        self._state = "tail"
        return True


def collect(deltas: Iterable[MessageDelta]) -> Message:
    """The non-streamed message: concatenated content and calls (content None if only calls)."""
    content: list[str] = []
    names: list[str] = []
    ids: list[str] = []
    args: list[list[str]] = []
    for d in deltas:
        content.append(d.content)
        if d.call is not None:
            if d.call.name is not None:
                names.append(d.call.name)
                ids.append(d.call.id or new_call_id())
                args.append([])
            args[d.call.index].append(d.call.arguments)
    calls = [ParsedCall(n, "".join(a)) for n, a in zip(names, args, strict=True)]
    text = "".join(content)
    return Message(None if calls and not text else text, calls, ids)
