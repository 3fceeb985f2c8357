"""How conversations with tools are rendered, per template family (no model needed)."""

from __future__ import annotations

import json

from phiserve.models.loader import resolve_model
from phiserve.tokenizer.chat_template import PHI4_CHAT_TEMPLATE, ChatTemplate
from phiserve.tokenizer.tokenizer import read_gguf_metadata
from phiserve.tools.formats import BARE, TAGGED
from phiserve.tools.native_family import NativeToolFamily
from phiserve.tools.prompt import FunctionSpec, ToolSetup, family_for
from phiserve.tools.text_family import TextToolFamily, tool_section

WEATHER = FunctionSpec(
    "get_weather",
    "Current weather of a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
SETUP = ToolSetup((WEATHER,), "auto")
ROUND_TRIP = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "Thanks!"},
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
RESULT = '<tool_response name="get_weather">\n{"temperature": 21}\n</tool_response>'


def embedded_template() -> ChatTemplate:
    meta = read_gguf_metadata(resolve_model(None).path, prefix="tokenizer.chat_template")
    return ChatTemplate(meta["tokenizer.chat_template"])


def test_family_is_chosen_from_the_template():
    assert isinstance(family_for(ChatTemplate(PHI4_CHAT_TEMPLATE)), TextToolFamily)
    assert isinstance(family_for(embedded_template()), TextToolFamily)
    native = family_for(ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tools }}"))
    assert isinstance(native, NativeToolFamily) and native.call_format == BARE
    hermes = family_for(ChatTemplate("{% if tools %}<tools></tools> use <tool_call>{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    assert hermes.call_format == TAGGED


def test_round_trip_phi4():
    text = family_for(ChatTemplate(PHI4_CHAT_TEMPLATE)).render(ROUND_TRIP, SETUP)
    assert text == (
        f"<|im_start|>system<|im_sep|>{tool_section(SETUP)}<|im_end|>"
        "<|im_start|>user<|im_sep|>What's the weather in Paris?<|im_end|>"
        f"<|im_start|>assistant<|im_sep|>{CALL}<|im_end|>"
        f"<|im_start|>user<|im_sep|>{RESULT}<|im_end|>"
        "<|im_start|>assistant<|im_sep|>It is 21 °C in Paris.<|im_end|>"
        "<|im_start|>user<|im_sep|>Thanks!<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )


def test_round_trip_embedded_smollm2_template():
    text = family_for(embedded_template()).render(ROUND_TRIP, SETUP)
    assert text == (
        f"<|im_start|>system\n{tool_section(SETUP)}<|im_end|>\n"
        "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        f"<|im_start|>user\n{RESULT}<|im_end|>\n"
        "<|im_start|>assistant\nIt is 21 °C in Paris.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tool_section_lists_tools_and_rules():
    section = tool_section(SETUP)
    assert json.dumps({"name": "get_weather", "description": "Current weather of a city.", "parameters": WEATHER.parameters}) in section
    assert "<tool_call>" in section and "If no function is needed" in section
    assert "at most one function" in tool_section(ToolSetup((WEATHER,), "auto", parallel=False))
    assert "You must call at least one function" in tool_section(ToolSetup((WEATHER,), "required"))
    assert "You must call the function get_weather" in tool_section(ToolSetup((WEATHER,), "named", "get_weather"))


def test_system_message_is_extended_and_results_merge_into_one_user_turn():
    family = TextToolFamily(ChatTemplate(PHI4_CHAT_TEMPLATE))
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "21"},
        {"role": "tool", "tool_call_id": "b", "content": "25"},
        {"role": "user", "content": "And in Oslo?"},
    ]
    out = family.messages(messages, SETUP)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + tool_section(SETUP)
    assert out[2]["content"] == (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert out[3]["content"] == (
        '<tool_response name="get_weather">\n21\n</tool_response>\n'
        '<tool_response name="get_weather">\n25\n</tool_response>\n\nAnd in Oslo?'
    )


def test_tool_choice_none_renders_history_without_tool_section():
    out = TextToolFamily(ChatTemplate(PHI4_CHAT_TEMPLATE)).messages(ROUND_TRIP[:3], ToolSetup((WEATHER,), "none"))
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[1]["content"] == CALL


def test_native_family_passes_tools_calls_and_results():
    source = (
        "{% for t in tools or [] %}TOOL {{ t['function']['name'] }}\n{% endfor %}"
        "{% for m in messages %}[{{ m['role'] }}]"
        "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}CALL {{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}{% endfor %}"
        "{% elif m['role'] == 'tool' %}RESULT {{ m['name'] }} {{ m['tool_call_id'] }}: {{ m['content'] }}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    text = NativeToolFamily(ChatTemplate(source)).render(ROUND_TRIP[:3], SETUP)
    assert text == (
        "TOOL get_weather\n"
        "[user]What's the weather in Paris?\n"
        '[assistant]CALL get_weather {"city": "Paris"}\n'
        '[tool]RESULT get_weather call_1: {"temperature": 21}\n'
        "[assistant]"
    )
    assert "TOOL" not in NativeToolFamily(ChatTemplate(source)).render(ROUND_TRIP[:1], ToolSetup((WEATHER,), "none"))
