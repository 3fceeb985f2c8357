"""Tool calling and structured output: prompting per template family, parsing and grammars.

- `prompt.py` picks the template family and holds what the families share;
  `native_family.py` (templates that take `tools`) and `text_family.py` (all others) render
  tool definitions, earlier calls and tool results for the model.
- `parser.py` finds tool calls in free model text (tool_choice "auto").
- `stream.py` turns a choice's text deltas into content / tool-call deltas, streamed or not.
- `grammars.py` builds the llguidance grammars that force calls and JSON output.

See docs/tools.md for the prompt formats and what is guaranteed.
"""
