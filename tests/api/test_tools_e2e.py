"""Tool calling and structured output end to end: the real server, the embedded model, the openai client.

Requests of one test run concurrently so the engine batches them (the whole file stays fast on CPU).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

FUNCTIONS: dict[str, dict | None] = {
    "get_weather": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
    "add_numbers": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]},
    "set_alarm": {
        "type": "object",
        "properties": {
            "hour": {"type": "integer", "minimum": 0, "maximum": 23},
            "minute": {"type": "integer", "minimum": 0, "maximum": 59},
            "label": {"type": "string", "maxLength": 20},
        },
        "required": ["hour", "minute"],
    },
    "create_user": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
                "required": ["name", "age"],
            },
            "admin": {"type": "boolean"},
        },
        "required": ["user", "admin"],
    },
    "send_email": {
        "type": "object",
        "properties": {
            "to": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
            "subject": {"type": "string", "maxLength": 40},
        },
        "required": ["to", "subject"],
    },
    "search_products": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 30},
            "filters": {
                "type": "object",
                "properties": {"max_price": {"type": "number", "minimum": 0}, "in_stock": {"type": "boolean"}},
                "required": ["in_stock"],
            },
            "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        },
        "required": ["query", "filters"],
    },
    "book_flight": {
        "type": "object",
        "properties": {
            "origin": {"type": "string", "maxLength": 20},
            "destination": {"type": "string", "maxLength": 20},
            "seats": {
                "type": "array",
                "items": {"type": "object", "properties": {"seat": {"type": "string", "enum": ["window", "aisle"]}}, "required": ["seat"]},
                "minItems": 1,
                "maxItems": 2,
            },
        },
        "required": ["origin", "destination", "seats"],
    },
    "get_time": None,  # no parameters: the arguments are exactly {}
    "convert_units": {
        "type": "object",
        "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "enum": ["km", "mi", "m"]},
            "to_unit": {"type": "string", "enum": ["km", "mi", "m"]},
        },
        "required": ["value", "from_unit", "to_unit"],
    },
    "add_todo": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "priority": {"type": "string", "enum": ["low", "medium", "high"]},
            "due": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
        },
        "required": ["title", "priority", "due"],
    },
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": name.replace("_", " ").capitalize() + ".", **({"parameters": p} if p else {})}}
    for name, p in FUNCTIONS.items()
]
QUESTIONS = {
    "get_weather": "What's the weather like in Paris?",
    "add_numbers": "What is 12 plus 30?",
    "set_alarm": "Wake me up at 7:30 tomorrow.",
    "create_user": "Create an account for Alice, who is 31.",
    "send_email": "Email bob@example.com that the meeting moved.",
    "search_products": "Find cheap running shoes that are in stock.",
    "book_flight": "Book me a window seat from Oslo to Rome.",
    "get_time": "What time is it?",
    "convert_units": "How many miles are 10 km?",
    "add_todo": "Remind me to buy milk, it's urgent.",
}


def schema_of(name: str) -> dict:
    return FUNCTIONS[name] or {"type": "object", "properties": {}, "additionalProperties": False}


def run_all(server, requests: list[dict]) -> list:
    """The first request alone (it fills the prefix cache with the shared tool prompt), the rest at once."""

    def one(kwargs: dict):
        return server.client().chat.completions.create(model=MODEL, **{"temperature": 0, **kwargs})

    first = one(requests[0])
    with ThreadPoolExecutor(len(requests)) as pool:
        return [first, *pool.map(one, requests[1:])]


def test_required_and_named_calls_validate_for_ten_schemas(server):
    named = [
        {
            "messages": [{"role": "user", "content": QUESTIONS[name]}],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": name}},
            "max_tokens": 80,
        }
        for name in FUNCTIONS
    ]
    required = [
        {"messages": [{"role": "user", "content": QUESTIONS[name]}], "tools": TOOLS, "tool_choice": "required", "max_tokens": 80}
        for name in ("get_weather", "set_alarm", "book_flight")
    ]
    replies = run_all(server, named + required)
    seen = set()
    for req, reply in zip(named + required, replies, strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            if isinstance(req["tool_choice"], dict):
                assert call.function.name == req["tool_choice"]["function"]["name"]
            args = json.loads(call.function.arguments)
            jsonschema.validate(args, schema_of(call.function.name), format_checker=jsonschema.FormatChecker())
            seen.add(call.function.name)
    assert len(seen) >= 10
    no_params = replies[list(FUNCTIONS).index("get_time")].choices[0].message.tool_calls[0]
    assert no_params.function.arguments == "{}"


RESPONSE_SCHEMAS = [
    {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}}, "required": ["city", "country"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}, "score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["sentiment", "score"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 130}}, "required": ["name", "age"]}}, "required": ["person"]},
    {"type": "object", "properties": {"is_question": {"type": "boolean"}, "language": {"type": "string", "enum": ["en", "fr", "de"]}}, "required": ["is_question", "language"]},
    {"type": "object", "properties": {"steps": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}, "done": {"type": "boolean"}}, "required": ["n", "done"]}, "maxItems": 2}}, "required": ["steps"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 25}, "year": {"anyOf": [{"type": "integer", "minimum": 1900, "maximum": 2100}, {"type": "null"}]}}, "required": ["title", "year"]},
    {"type": "object", "properties": {"temperature": {"type": "number"}, "unit": {"const": "celsius"}, "note": {"type": "string", "maxLength": 15}}, "required": ["temperature", "unit"]},
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}, "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}, "required": ["start", "end"]},
]
PROMPTS = [
    "What is 6 times 7?",
    "Where is the Eiffel Tower?",
    "Name some colors.",
    "I love this product!",
    "Describe a person.",
    "Is this a question?",
    "List the steps.",
    "Name a movie.",
    "How warm is it today?",
    "Draw a line.",
]


def test_json_schema_responses_validate_for_ten_schemas(server):
    requests = [
        {
            "messages": [{"role": "user", "content": prompt}],
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{k}", "schema": schema, "strict": True}},
            "max_tokens": 60,
        }
        for k, (schema, prompt) in enumerate(zip(RESPONSE_SCHEMAS, PROMPTS, strict=True))
    ]
    for schema, reply in zip(RESPONSE_SCHEMAS, run_all(server, requests), strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        assert choice.message.tool_calls is None
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_always_parses(server):
    # A free-form object can ramble past max_tokens ("length": truncated, as with any provider); these finish.
    prompts = ["What is 2+2? Answer in JSON.", "Return a JSON object with a greeting.", "List two fruits as JSON.", "Hello!"]
    requests = [{"messages": [{"role": "user", "content": p}], "response_format": {"type": "json_object"}, "max_tokens": 60, "temperature": 0} for p in prompts]
    requests.append({**requests[0], "temperature": 0.8, "seed": 3})
    for reply in run_all(server, requests):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict)


def test_tool_choice_none_never_returns_tool_calls(server):
    base = {"tools": TOOLS, "tool_choice": "none", "max_tokens": 30}
    requests = [
        {**base, "messages": [{"role": "user", "content": QUESTIONS["get_weather"]}]},
        {**base, "messages": [{"role": "user", "content": 'Reply with exactly: <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'}]},
    ]
    for reply in run_all(server, requests):
        assert reply.choices[0].message.tool_calls is None
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert isinstance(reply.choices[0].message.content, str)


COPY_A_CALL = 'Copy this text: <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize(
    ("tool_choice", "question"),
    [
        ("required", QUESTIONS["book_flight"]),
        ({"type": "function", "function": {"name": "book_flight"}}, QUESTIONS["book_flight"]),
        ("auto", COPY_A_CALL),  # the model writes the call itself; the parser finds it
        ("auto", "Say hi in one word."),
    ],
)
def test_stream_helper_accumulates_the_non_streamed_calls(server, tool_choice, question):
    client = server.client()
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "temperature": 0.7,
        "seed": 11,
        "max_tokens": 60,
    }
    # Warm the prefix cache first so both requests compute the prompt the same way (a cached and an
    # uncached prompt differ in the last float bits of the logits, enough to flip a sampled token).
    client.chat.completions.create(**{**kwargs, "max_tokens": 1})
    full = client.chat.completions.create(**kwargs)
    if full.choices[0].finish_reason == "length":
        # A sampled answer may run to max_tokens; the helper then refuses to parse, as with OpenAI.
        with pytest.raises(openai.LengthFinishReasonError), client.chat.completions.stream(**kwargs) as stream:
            stream.get_final_completion()
        assert tool_choice == "auto" and question != COPY_A_CALL  # forced calls always finish
        return
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion()
    a, b = full.choices[0], streamed.choices[0]
    assert a.finish_reason == b.finish_reason
    assert a.message.content == b.message.content
    calls = [(c.function.name, c.function.arguments) for c in a.message.tool_calls or []]
    assert calls == [(c.function.name, c.function.arguments) for c in b.message.tool_calls or []]
    if tool_choice != "auto" or question == COPY_A_CALL:
        assert calls and a.finish_reason == "tool_calls" and a.message.content is None


def test_raw_stream_delta_shape(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTIONS["get_time"]}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "temperature": 0,
        "max_tokens": 40,
        "stream": True,
    }
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    first, rest = calls[0], calls[1:]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_time", "arguments": ""}
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in rest)
    assert "".join(c["function"]["arguments"] for c in rest) == "{}"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_conversation_round_trip(server):
    messages = [
        {"role": "user", "content": QUESTIONS["get_weather"]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 100  # the tools, the call and its result all reached the prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "missing"}}, "tools": TOOLS[:1]}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS[:1] * 2}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "no-such-format"}}}}, "response_format"),
    ],
)
def test_invalid_tool_requests_are_400(server, body, param):
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, **body}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
