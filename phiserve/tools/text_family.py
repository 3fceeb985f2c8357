"""Tool prompting for templates that know nothing of tools (Phi-4, SmolLM2, most ChatML templates).

The tools go into a system section (appended to the system message, or a new one); the model is
told to answer with `<tool_call>` blocks holding `{"name": ..., "arguments": {...}}`. Earlier calls
are written into the assistant turn in that same format, and tool results become a user turn of
`<tool_response name="...">` blocks (templates rarely know a "tool" role, and some insist that
user and assistant turns alternate, so consecutive results and a following user message share
one turn). The exact text is documented in docs/tools.md.
"""

from __future__ import annotations

import json
from typing import Any

from phiserve.tokenizer.chat_template import ChatTemplate
from phiserve.tools.formats import TAGGED, CallFormat
from phiserve.tools.prompt import ToolSetup, call_names_by_id, content_text


def tool_section(setup: ToolSetup) -> str:
    """The system-prompt section that describes the tools and the call format."""
    lines = [
        "# Tools",
        "",
        "You can call functions to help with the user's request. The functions are listed below, one JSON object per line:",
        "<tools>",
        *(json.dumps(spec.as_openai()["function"], ensure_ascii=False) for spec in setup.tools),
        "</tools>",
        "",
        "To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> tags:",
        "<tool_call>",
        '{"name": "<function name>", "arguments": {"<argument name>": <argument value>}}',
        "</tool_call>",
        "Write one <tool_call> block per call." if setup.parallel else "Call at most one function per reply.",
        "The results come back inside <tool_response></tool_response> tags.",
    ]
    if setup.mode == "required":
        lines.append("You must call at least one function in your reply.")
    elif setup.mode == "named":
        lines.append(f"You must call the function {setup.forced_name} in your reply.")
    else:
        lines.append("If no function is needed, answer the user directly.")
    return "\n".join(lines)


class TextToolFamily:
    name = "text"
    call_format: CallFormat = TAGGED

    def __init__(self, template: ChatTemplate) -> None:
        self.template = template

    def messages(self, messages: list[dict[str, Any]], setup: ToolSetup | None) -> list[dict[str, Any]]:
        """The conversation as plain role/content messages the template can render."""
        names = call_names_by_id(messages)
        out: list[dict[str, Any]] = []
        merge_next_user = False  # the last message is a user turn made from tool results
        for m in messages:
            role = "system" if m["role"] == "developer" else m["role"]
            text = content_text(m)
            if role == "assistant" and m.get("tool_calls"):
                calls = [self.call_format.render(c["function"]["name"], c["function"].get("arguments") or "{}") for c in m["tool_calls"]]
                blocks = self.call_format.sep.join(calls)
                out.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
            elif role == "tool":
                name = names.get(m.get("tool_call_id") or "") or m.get("name")
                opening = f'<tool_response name="{name}">' if name else "<tool_response>"
                block = f"{opening}\n{text}\n</tool_response>"
                if merge_next_user:
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block})
                merge_next_user = True
                continue
            elif role == "user" and merge_next_user:
                out[-1]["content"] += "\n\n" + text
            else:
                out.append({"role": role, "content": text})
            merge_next_user = False
        if setup is not None and setup.offered:
            section = tool_section(setup)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}" if out[0]["content"] else section}
            else:
                out.insert(0, {"role": "system", "content": section})
        return out

    def render(self, messages: list[dict[str, Any]], setup: ToolSetup | None) -> str:
        return self.template.render(self.messages(messages, setup), add_generation_prompt=True)
