"""llguidance grammars for forced tool calls and JSON response formats.

JSON is generated on one line with `", "` and `": "` separators (what models mostly saw in
training); flexible whitespace would let a small model wander into endless blank space.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import llguidance

from phiserve.tools.formats import CallFormat

JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where plain object schemas that list `properties` allow no other keys.

    Output valid under the result is valid under the original; it only stops a small model from
    inventing extra keys. Objects that say anything about additional or pattern properties, or
    require keys they do not list, are left alone.
    """
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        props = node.get("properties")
        if (
            isinstance(props, dict)
            and "additionalProperties" not in node
            and "patternProperties" not in node
            and "unevaluatedProperties" not in node
            and set(node.get("required") or []) <= set(props)
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions", "patternProperties"):
                if isinstance(value, dict):
                    for sub in value.values():
                        visit(sub)
            elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties", "not"):
                visit(value)

    visit(schema)
    return schema


def _styled(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """Output must be one JSON value valid against `schema`."""
    return llguidance.LLMatcher.grammar_from_json_schema(_styled(closed_objects(schema)))


def json_object_grammar() -> str:
    """Output must be one JSON object (response_format json_object)."""
    return json_schema_grammar({"type": "object"})


def _lark_str(text: str) -> str:
    return json.dumps(text)  # JSON string escapes are valid Lark string-literal escapes


def forced_calls_grammar(functions: Sequence[tuple[str, dict[str, Any] | None]], fmt: CallFormat, many: bool) -> str:
    """Output must be one call (or, with many, one or more calls) of these functions in `fmt`.

    Each call is `head NAME name_end ARGUMENTS tail`, its arguments valid against that function's
    parameters (a function without parameters takes exactly `{}`).
    """
    lines = [f"start: call ({_lark_str(fmt.sep)} call)*" if many else "start: call"]
    lines.append("call: " + " | ".join(f"call_{k}" for k in range(len(functions))))
    for k, (name, parameters) in enumerate(functions):
        schema = _styled(closed_objects(parameters) if parameters else NO_PARAMETERS)
        head = _lark_str(fmt.head + name + fmt.name_end)
        lines.append(f"call_{k}: {head} args_{k} {_lark_str(fmt.tail)}")
        lines.append(f"args_{k}: %json {json.dumps(schema)}")
    return llguidance.LLMatcher.grammar_from_lark("\n".join(lines))
