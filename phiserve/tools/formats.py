"""How a model writes one tool call as text: shared by the prompt, the forced-call grammar and the parser."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class CallFormat:
    """A call is `open + {"name": "<name>", "arguments": <JSON object>} + close`; calls are joined by `sep`."""

    open: str
    close: str
    sep: str = "\n"

    @property
    def head(self) -> str:
        """Text before the function name."""
        return self.open + '{"name": "'

    # Between the name and the arguments object.
    name_end = '", "arguments": '

    @property
    def tail(self) -> str:
        """Text after the arguments object."""
        return "}" + self.close

    def render(self, name: str, arguments: str) -> str:
        """One call as the model should write it; `arguments` is the JSON text of an object."""
        return f"{self.head}{name}{self.name_end}{canonical_arguments(arguments)}{self.tail}"


def canonical_arguments(arguments: str) -> str:
    """Arguments of an earlier call as compact one-line JSON (a non-JSON string is kept as a JSON string)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return json.dumps(arguments, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)


# Hermes/Qwen style, used by the injected prompt of templates without tool support. Blocks follow
# each other directly: right after "</tool_call>" a model that is done prefers ending its turn to
# starting another block, whereas after a newline a small model keeps adding (repeated) calls.
TAGGED = CallFormat("<tool_call>\n", "\n</tool_call>", sep="")
# Plain JSON objects, one per line (Llama-3.1 style templates).
BARE = CallFormat("", "")
