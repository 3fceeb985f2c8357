"""Request models of the OpenAI Chat Completions and Completions APIs, with the hosted API's ranges.

Unknown fields are ignored (OpenAI's clients add new ones over time). Range violations become HTTP 400
`invalid_request_error` naming the parameter (see errors.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_SEED = 2**63 - 1


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Lenient):
    name: str
    arguments: str = ""


class ToolCall(_Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Lenient):
    type: Literal["text"]
    text: str


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        # Name the unsupported part; the union's own error would only say "should be a valid string".
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported: this model reads text only (type 'text')")
        return content

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _content_present(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"messages with role '{self.role}' must have content")
        return self


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoiceFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' requires 'json_schema'")
        return self


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(_Lenient):
    """Parameters shared by /v1/chat/completions and /v1/completions."""

    model: str
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=999)] | None = None
    max_tokens: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=5.0)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    logit_bias: dict[str, float] | None = None  # ranges checked below so errors name `logit_bias`
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys_are_token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= v[key] <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {v[key]} for token {key}")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @field_validator("messages")
    @classmethod
    def _conversation_shape(cls, messages: list[Message]) -> list[Message]:
        roles = [m.role for m in messages]
        if sum(r in ("system", "developer") for r in roles) > 1:
            raise ValueError("at most one system message is allowed")
        rest = [r for r in roles if r not in ("system", "developer")]
        if not rest or rest[0] != "user":
            raise ValueError("the conversation must start with a user message (after an optional system message)")
        if rest[-1] not in ("user", "tool"):
            raise ValueError("the last message must have role 'user' or 'tool'")
        return messages

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False

    @property
    def requested_max_tokens(self) -> int | None:
        # /v1/completions defaults to 16 tokens in OpenAI's API.
        return 16 if self.max_tokens is None else self.max_tokens
