"""Rendering a conversation with tools: the family is chosen from the chat template.

Templates that read the `tools` variable get the tools, earlier calls and tool results in Hugging
Face's conventions (`native_family.py`); any other template gets a tool-use system section and
calls/results written as text (`text_family.py`). Messages come in as OpenAI-shaped dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tools.formats import CallFormat

ToolChoiceMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def as_openai(self) -> dict[str, Any]:
        """{"type": "function", "function": {...}}, as templates and clients expect tools."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        if self.parameters is not None:
            fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolSetup:
    """What the request asks about tools, resolved: mode, the tools, the forced name, parallel calls."""

    tools: tuple[FunctionSpec, ...]
    mode: ToolChoiceMode = "auto"
    forced_name: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> bool:
        """Whether the tools are put in front of the model."""
        return bool(self.tools) and self.mode != "none"


class ToolFamily(Protocol):
    name: str
    call_format: CallFormat

    def render(self, messages: list[dict[str, Any]], setup: ToolSetup | None) -> str:
        """The prompt text, ending with the assistant generation prompt."""
        ...


def family_for(template: ChatTemplate) -> ToolFamily:
    from phiserve.tools.native_family import NativeToolFamily
    from phiserve.tools.text_family import TextToolFamily

    return NativeToolFamily(template) if template.supports_tools else TextToolFamily(template)


def call_names_by_id(messages: list[dict[str, Any]]) -> dict[str, str]:
    """tool_call_id -> function name, from the assistant messages' tool_calls (tool results name no function)."""
    names: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            if call.get("id") and fn.get("name"):
                names[call["id"]] = fn["name"]
    return names


def content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
