"""Tool prompting for templates that read `tools` (Qwen2.5/Hermes, Llama-3.1, Mistral, ...).

The template decides the prompt; we only pass things in Hugging Face's conventions: `tools` as
OpenAI-shaped function definitions, assistant `tool_calls` with arguments as a dict, and "tool"
messages with `tool_call_id` and the function's `name`. Forced calls use `<tool_call>` blocks
when the template mentions that tag, bare JSON objects otherwise.
"""

from __future__ import annotations

import json
from typing import Any

from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tools.formats import BARE, TAGGED, CallFormat
from phiserve.tools.prompt import ToolSetup, call_names_by_id, content_text


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments  # templates then print the string as given


class NativeToolFamily:
    name = "native"

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template
        self.call_format: CallFormat = TAGGED if "<tool_call>" in template.source else BARE

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = call_names_by_id(messages)
        out: list[dict[str, Any]] = []
        for m in messages:
            role = "system" if m["role"] == "developer" else m["role"]
            msg: dict[str, Any] = {"role": role, "content": content_text(m)}
            if role == "assistant" and m.get("tool_calls"):
                msg["tool_calls"] = [
                    {
                        "id": c.get("id", ""),
                        "type": "function",
                        "function": {"name": c["function"]["name"], "arguments": _arguments_value(c["function"].get("arguments") or "")},
                    }
                    for c in m["tool_calls"]
                ]
            elif role == "tool":
                msg["tool_call_id"] = m.get("tool_call_id")
                name = names.get(m.get("tool_call_id") or "") or m.get("name")
                if name:
                    msg["name"] = name
            out.append(msg)
        return out

    def render(self, messages: list[dict[str, Any]], setup: ToolSetup | None) -> str:
        tools = [spec.as_openai() for spec in setup.tools] if setup is not None and setup.offered else None
        return self.template.render(self.messages(messages), add_generation_prompt=True, tools=tools)
