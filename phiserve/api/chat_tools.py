"""Tools and response formats of /v1/chat/completions: the request's prompt and grammar, and the
OpenAI shapes (message, stream deltas, finish_reason) of what the model wrote.

What is guaranteed (docs/tools.md): tool_choice "required" or a named function, and
response_format json_object / json_schema, are enforced by a grammar during decoding, so a
response that finishes with "tool_calls"/"stop" always holds schema-valid JSON. Under "auto" the
model writes freely and `tools.parser` picks out the calls it made (best effort).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from phiserve.api.errors import OpenAIError
from phiserve.api.protocol import ChatCompletionRequest, NamedToolChoice
from phiserve.host import ModelHost
from phiserve.tokenizer.chat_template import TemplateError
from phiserve.tools.formats import TAGGED, CallFormat
from phiserve.tools.grammars import forced_calls_grammar, json_object_grammar, json_schema_grammar
from phiserve.tools.prompt import FunctionSpec, ToolSetup, family_for
from phiserve.tools.stream import AutoCallStream, CallStream, ForcedCallStream, MessageDelta, collect


@dataclass
class ChatPlan:
    """How one chat request is prompted, constrained and shaped."""

    prompt: str | None = None  # None: no tool involvement, the plain template path renders it
    grammar: str | None = None
    setup: ToolSetup | None = None
    forced: bool = False  # calls are grammar-forced (required / named)
    parse_calls: bool = False  # look for calls in free text (auto)
    call_format: CallFormat = TAGGED

    @property
    def initial_content(self) -> str | None:
        """Content of the role chunk: None when the message may turn out to be only tool calls."""
        return None if self.forced or self.parse_calls else ""

    def shaper(self) -> ChoiceShaper:
        stream: CallStream | None = None
        if self.forced:
            stream = ForcedCallStream(self.call_format)
        elif self.parse_calls and self.setup is not None:
            stream = AutoCallStream([t.name for t in self.setup.tools], None if self.setup.parallel else 1)
        return ChoiceShaper(stream)


@dataclass
class ChoiceShaper:
    """One choice: engine text deltas in, OpenAI message deltas out (and the whole message at the end)."""

    stream: CallStream | None
    deltas: list[MessageDelta] = field(default_factory=list)

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.stream is None:
            new = [MessageDelta(content=text)] if text else []
        else:
            new = self.stream.feed(text) if text else []
        self.deltas.extend(new)
        return [openai_delta(d) for d in new]

    def finish(self) -> list[dict[str, Any]]:
        new = self.stream.finish() if self.stream is not None else []
        self.deltas.extend(new)
        return [openai_delta(d) for d in new]

    def finish_reason(self, reason: str) -> str:
        has_calls = self.stream is not None and self.stream.num_calls > 0
        return "tool_calls" if has_calls and reason == "stop" else reason

    def message(self) -> dict[str, Any]:
        msg = collect(self.deltas)
        out: dict[str, Any] = {"role": "assistant", "content": msg.content, "refusal": None}
        if msg.calls:
            out["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for call_id, c in zip(msg.call_ids, msg.calls, strict=True)
            ]
        return out


def openai_delta(d: MessageDelta) -> dict[str, Any]:
    if d.call is None:
        return {"content": d.content}
    call: dict[str, Any] = {"index": d.call.index}
    if d.call.name is not None:  # a call's first delta: id, type, name and empty arguments
        call.update(id=d.call.id, type="function", function={"name": d.call.name, "arguments": d.call.arguments})
    else:
        call["function"] = {"arguments": d.call.arguments}
    return {"tool_calls": [call]}


def _setup(req: ChatCompletionRequest) -> ToolSetup | None:
    tools = tuple(FunctionSpec(t.function.name, t.function.description, t.function.parameters) for t in req.tools or [])
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise OpenAIError(400, "Tool function names must be unique.", param="tools", code="invalid_value")
    for spec in tools:
        params = spec.parameters
        if params is not None and params.get("type", "object") != "object":
            raise OpenAIError(400, f"The parameters of function '{spec.name}' must be a JSON schema of type 'object'.", param="tools", code="invalid_value")
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise OpenAIError(400, f"tool_choice names function '{choice.function.name}', which is not in tools.", param="tool_choice", code="invalid_value")
        return ToolSetup(tools, "named", choice.function.name, req.parallel_tool_calls)
    if choice == "required" and not tools:
        raise OpenAIError(400, "tool_choice 'required' needs at least one tool in tools.", param="tool_choice", code="invalid_value")
    if not tools:
        return None
    return ToolSetup(tools, choice or "auto", None, req.parallel_tool_calls)


def _uses_tools(req: ChatCompletionRequest) -> bool:
    return bool(req.tools) or any(m.role == "tool" or m.tool_calls for m in req.messages)


async def plan_chat(req: ChatCompletionRequest, host: ModelHost) -> ChatPlan:
    """Validate tools / tool_choice / response_format and decide prompt, grammar and parsing."""
    setup = _setup(req)
    plan = ChatPlan(setup=setup)
    family = family_for(host.template)
    plan.call_format = family.call_format
    if _uses_tools(req):
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            plan.prompt = family.render(messages, setup)
        except TemplateError as exc:
            raise OpenAIError(400, f"The chat template rejected the messages: {exc}", param="messages") from exc
    fmt = req.response_format.type if req.response_format is not None else "text"
    param = "response_format"
    if setup is not None and setup.mode in ("required", "named"):
        chosen = [t for t in setup.tools if setup.mode == "required" or t.name == setup.forced_name]
        many = setup.mode == "required" and setup.parallel
        plan.grammar = forced_calls_grammar([(t.name, t.parameters) for t in chosen], family.call_format, many)
        plan.forced = True
        param = "tools"
    elif fmt == "json_object":
        plan.grammar = json_object_grammar()
    elif fmt == "json_schema":
        schema = req.response_format.json_schema.schema_ if req.response_format and req.response_format.json_schema else None
        if not isinstance(schema, dict):
            raise OpenAIError(400, "response_format json_schema needs a 'schema' object.", param="response_format", code="invalid_value")
        plan.grammar = json_schema_grammar(schema)
    else:
        # Free text: under "auto" the calls the model writes are picked out of it.
        plan.parse_calls = setup is not None and setup.mode == "auto"
    if plan.grammar is not None:
        error = await run_in_threadpool(host.grammars.validate, plan.grammar)
        if error:
            raise OpenAIError(400, f"The schema cannot be enforced: {error}", param=param, code="invalid_value")
    return plan
