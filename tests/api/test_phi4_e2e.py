"""The miniature Phi-4 served end to end (real server, official openai client), shipped as Phi-4's
first release was: config.json and tokenizer_config.json name only <|endoftext|> as EOS, and the
template always appends the assistant header. The server must still render Phi-4's exact prompt,
end the turn at <|im_end|> and never show <|im_end|>, <|im_start|> or <|im_sep|> as text."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from tokenizers import Tokenizer as HFTokenizer

from tests.api.conftest import LiveServer, start_server, stop_server
from tests.models import phi4_miniature as mini

NAME = "phi-4-mini"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello world, what is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "Tell me a joke about the sea."},
]
PROMPT = mini.expected_phi4_prompt(MESSAGES)
MARKERS = ("<|im_end|>", "<|im_start|>", "<|im_sep|>", "<|endoftext|>")


@pytest.fixture(scope="module")
def phi4(tmp_path_factory) -> Iterator[tuple[LiveServer, list[int], HFTokenizer]]:
    """The server, transformers' greedy continuation of PROMPT (ending in <|im_end|>), the tokenizer."""
    model = mini.make_model(seed=0, im_end_gain=8.0)  # <|im_end|> wins within a few tokens
    folder = mini.write_checkpoint(tmp_path_factory.mktemp("phi4") / NAME, model, release="first")
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == mini.ENDOFTEXT
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    server = start_server("--model", str(folder), "--kv-cache-memory", "0.02", "--threads", "1")
    try:
        tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        reference = mini.greedy_reference(model, tokenizer.encode(PROMPT).ids, max_new=32)
        assert 2 <= len(reference) <= 16 and reference[-1] == mini.IM_END, reference  # fixture sanity
        yield server, reference, tokenizer
    finally:
        stop_server(server)


def test_template_renders_phi4_prompt_exactly(phi4) -> None:
    """The chat endpoint's prompt is exactly PROMPT: as many tokens as encoding PROMPT, and the same
    greedy continuation as /v1/completions given PROMPT as raw text (and as transformers, below)."""
    server, _, tokenizer = phi4
    client = server.client()
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=32)
    raw = client.completions.create(model=NAME, prompt=PROMPT, temperature=0, max_tokens=32)
    assert chat.usage.prompt_tokens == raw.usage.prompt_tokens == len(tokenizer.encode(PROMPT).ids)
    assert chat.choices[0].message.content == raw.choices[0].text
    assert chat.usage.completion_tokens == raw.usage.completion_tokens


def test_im_end_ends_the_turn_and_is_never_text(phi4) -> None:
    server, reference, tokenizer = phi4
    client = server.client()
    reply = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=32)
    choice = reply.choices[0]
    # Stopped by <|im_end|> (not named EOS anywhere in the files), exactly where transformers does.
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens == len(reference)
    assert choice.message.content == tokenizer.decode(reference[:-1])
    assert not any(m in choice.message.content for m in MARKERS)

    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, temperature=0, max_tokens=32, stream=True
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_forced_im_end_stops_at_once(phi4) -> None:
    server = phi4[0]
    reply = server.client().chat.completions.create(
        model=NAME, messages=MESSAGES[-1:], max_tokens=10, logit_bias={str(mini.IM_END): 100}
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == ""
    assert reply.usage.completion_tokens == 1


def test_endoftext_also_stops(phi4) -> None:
    server = phi4[0]
    reply = server.client().chat.completions.create(
        model=NAME, messages=MESSAGES[-1:], max_tokens=10, logit_bias={str(mini.ENDOFTEXT): 100}
    )
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 1


@pytest.mark.parametrize("marker", [mini.IM_START, mini.IM_SEP])
def test_turn_markers_are_never_text(phi4, marker) -> None:
    """<|im_start|>/<|im_sep|> do not end a turn; when forced they are generated but never shown."""
    server = phi4[0]
    reply = server.client().chat.completions.create(
        model=NAME, messages=MESSAGES[-1:], max_tokens=3, logit_bias={str(marker): 100}
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == ""
