"""Tool-call parsing and stream shaping on recorded model-like outputs (no model needed)."""

from __future__ import annotations

import json
import random

import pytest

from phiserve.api.chat_tools import ChatPlan, ChoiceShaper, openai_delta
from phiserve.tools.formats import BARE, TAGGED
from phiserve.tools.parser import scan
from phiserve.tools.prompt import FunctionSpec, ToolSetup
from phiserve.tools.stream import AutoCallStream, ForcedCallStream, MessageDelta, collect

NAMES = {"get_weather", "get_time", "noop"}


def parse(text: str, names=NAMES):
    s = AutoCallStream(names)
    return collect(s.feed(text) + s.finish())


def calls(msg):
    return [(c.name, json.loads(c.arguments)) for c in msg.calls]


def test_bare_json_call():
    msg = parse('{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert calls(msg) == [("get_weather", {"city": "Paris"})]
    assert msg.content is None


def test_fenced_json_block_with_junk_around():
    text = 'Sure! Let me check.\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n```\nOne moment.'
    msg = parse(text)
    assert calls(msg) == [("get_weather", {"city": "Oslo", "unit": "c"})]
    assert msg.content == "Sure! Let me check.\nOne moment."


def test_tool_call_tags_several_calls():
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
    )
    msg = parse(text)
    assert calls(msg) == [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]
    assert msg.content is None


def test_list_of_calls_and_parameters_key_and_string_arguments():
    text = '[{"name": "get_weather", "parameters": {"city": "Lima"}}, {"type": "function", "function": {"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}}]'
    assert calls(parse(text)) == [("get_weather", {"city": "Lima"}), ("get_time", {"tz": "UTC"})]


def test_unclosed_tag_at_end_and_missing_arguments():
    msg = parse('<tool_call>\n{"name": "noop"}')
    assert calls(msg) == [("noop", {})]
    assert msg.calls[0].arguments == "{}"


def test_tool_calls_wrapper_object():
    assert calls(parse('{"tool_calls": [{"name": "noop", "arguments": {}}]}')) == [("noop", {})]


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"',  # cut off
        '{"name": "get_weather", "arguments": {"city": Paris}}',  # invalid JSON
        '{"name": "launch_rockets", "arguments": {}}',  # not a tool of the request
        '{"city": "Paris", "temperature": 21}',  # JSON, not a call
        '[{"name": "get_weather", "arguments": {}}, 5]',  # a list that is not all calls
        '{"name": "get_weather", "arguments": [1, 2]}',  # arguments not an object
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>",  # not JSON inside the tags
        "Use a dict like {x} or a list [1, 2] and `code`.",
        "```python\nprint({'name': 'get_weather'})\n```",
        "",
    ],
)
def test_not_calls_stay_content_exactly(text):
    msg = parse(text)
    assert msg.calls == []
    assert msg.content == text


def test_calls_nested_in_non_call_json_are_not_calls():
    text = '{"result": {"name": "get_weather", "arguments": {"city": "Paris"}}}'
    assert parse(text).calls == []


def test_unknown_names_are_not_calls_but_known_ones_are():
    text = '{"name": "nope", "arguments": {}}\n{"name": "noop", "arguments": {}}'
    msg = parse(text)
    assert calls(msg) == [("noop", {})]
    assert msg.content == '{"name": "nope", "arguments": {}}'


def test_single_call_when_parallel_calls_are_off():
    s = AutoCallStream(NAMES, max_calls=1)
    text = '<tool_call>{"name": "noop", "arguments": {}}</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    msg = collect(s.feed(text) + s.finish())
    assert calls(msg) == [("noop", {})] and msg.content is None


def test_text_around_calls_is_joined():
    text = 'First. <tool_call>{"name": "noop", "arguments": {}}</tool_call>  Then.  '
    msg = parse(text)
    assert msg.content == "First.\nThen."


RECORDED = [
    'I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris, France", "unit": "celsius"}}\n</tool_call>',
    '```json\n[{"name": "get_time", "arguments": {"tz": "Europe/Berlin"}}, {"name": "get_weather", "arguments": {"city": "Berlin"}}]\n```',
    'The weather {is} nice [citation needed]. <tool_call>{"name": "noop", "arguments": {}}</tool_call> ```\n{"a": 1}\n``` done',
    'Answer: {"name": "get_weather", "arguments": {"city": "\\"Quoted\\" {braces} [x]"}} ok <tool',
    "plain text with < and ` and { but nothing else",
]


@pytest.mark.parametrize("text", RECORDED)
def test_any_chunking_gives_the_same_message(text):
    whole = parse(text)
    rng = random.Random(0)
    for _ in range(30):
        s = AutoCallStream(NAMES)
        deltas = []
        pos = 0
        while pos < len(text):
            step = rng.randint(1, 6)
            deltas += s.feed(text[pos : pos + step])
            pos += step
        deltas += s.finish()
        got = collect(deltas)
        assert got.content == whole.content
        assert got.calls == whole.calls


def test_scan_holds_undecided_text():
    segments, stable = scan('Hi {"name": "noop", "argu', NAMES, final=False)
    assert stable == 3 and segments[0].calls == ()
    segments, stable = scan("Hi <tool_c", NAMES, final=False)
    assert stable == 3
    segments, stable = scan("Hi <b>", NAMES, final=False)
    assert stable == len("Hi <b>")


@pytest.mark.parametrize("fmt", [TAGGED, BARE])
def test_forced_stream_streams_arguments(fmt):
    text = fmt.render("get_weather", '{"city": "Paris", "days": [1, 2]}') + fmt.sep + fmt.render("noop", "{}")
    s = ForcedCallStream(fmt)
    deltas = []
    for ch in text:
        deltas += s.feed(ch)
    deltas += s.finish()
    first = [d.call for d in deltas if d.call is not None and d.call.name is not None]
    assert [(c.index, c.name, c.arguments) for c in first] == [(0, "get_weather", ""), (1, "noop", "")]
    assert all(c.id.startswith("call_") for c in first)
    fragments = [d.call.arguments for d in deltas if d.call is not None and d.call.index == 0 and d.call.name is None]
    assert len(fragments) > 5  # arguments arrive as they are generated
    msg = collect(deltas)
    assert msg.content is None
    assert [(c.name, c.arguments) for c in msg.calls] == [("get_weather", '{"city": "Paris", "days": [1, 2]}'), ("noop", "{}")]


def test_forced_stream_cut_off_keeps_partial_call():
    s = ForcedCallStream(TAGGED)
    msg = collect(s.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa') + s.finish())
    assert msg.calls[0].arguments == '{"city": "Pa'


def test_shaper_openai_delta_shapes_and_finish_reason():
    setup = ToolSetup((FunctionSpec("noop"),), "auto")
    shaper = ChatPlan(setup=setup, parse_calls=True).shaper()
    deltas = shaper.feed('<tool_call>{"name": "noop"}</tool_call>') + shaper.finish()
    first, second = deltas
    call = first["tool_calls"][0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "noop", "arguments": ""}
    assert second == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert shaper.finish_reason("stop") == "tool_calls"
    assert shaper.finish_reason("length") == "length"
    message = shaper.message()
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "noop", "arguments": "{}"}
    assert message["tool_calls"][0]["id"] == call["id"]


def test_plain_shaper_passes_text_through():
    shaper = ChoiceShaper(None)
    assert shaper.feed("Hello") == [{"content": "Hello"}]
    assert shaper.feed("") == []
    assert shaper.finish() == []
    assert shaper.finish_reason("stop") == "stop"
    assert shaper.message()["content"] == "Hello"
    assert openai_delta(MessageDelta(content="x")) == {"content": "x"}
