"""Jinja chat-template rendering compatible with Hugging Face `apply_chat_template`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template failed to compile or render (bad template or bad messages)."""


# Phi-4: every turn is <|im_start|>{role}<|im_sep|>{content}<|im_end|>, no newlines between turns.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Tokens that close an assistant turn in common template families; the engine stops on them.
_END_OF_TURN_CANDIDATES = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_turn|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|endofturn|>",
)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's builtin tojson HTML-escapes <, >, & and ' which would corrupt prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(Extension):
    """Accept HF's `{% generation %}...{% endgeneration %}` markers (used for assistant masks) as no-ops."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _normalize_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten OpenAI text-part lists into strings: most templates concatenate content as a string."""
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if isinstance(content, list) and all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            msg = {**msg, "content": "".join(p["text"] for p in content)}
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template plus what the engine needs to know about it."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = _make_env()
        try:
            self._template = env.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateError as exc:
            raise TemplateError(f"invalid chat template: {exc}") from exc
        self._supports_tools = "tools" in variables
        found = [(source.find(tok), tok) for tok in _END_OF_TURN_CANDIDATES if tok in source]
        self.end_of_turn_tokens: list[str] = [tok for _, tok in sorted(found)]

    @property
    def supports_tools(self) -> bool:
        """Whether the template reads the `tools` variable (so tool definitions reach the prompt)."""
        return self._supports_tools

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render the prompt text; raises TemplateError for template errors or unusable messages."""
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": _normalize_content(messages),
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
        }
        try:
            return self._template.render(**context)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError) as exc:
            # SecurityError/UndefinedError or e.g. `'str' + None`: the request can't be rendered.
            raise TemplateError(f"chat template rendering failed: {exc}") from exc
