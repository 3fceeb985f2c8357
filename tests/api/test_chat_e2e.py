"""The first slice end to end: the real server, the embedded model, the official openai client."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("prefix", ["/v1", "/v1/openai"])
def test_greedy_answer_contains_expected_word(server, prefix):
    client = server.client(prefix)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0, max_tokens=40)
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "4" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = reply.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.model_extra["estimated_cost"] >= 0


def test_colors(server):
    reply = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colors."}], temperature=0, max_tokens=60
    )
    assert "red" in reply.choices[0].message.content.lower()


def test_stream_concatenates_to_non_stream(server):
    client = server.client("/v1/openai")
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/openai/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_multi_turn_with_system_message(server):
    reply = server.client().chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "My name is Alice."},
            {"role": "assistant", "content": "Nice to meet you, Alice."},
            {"role": "user", "content": "What is my name?"},
        ],
        temperature=0,
        max_tokens=30,
    )
    assert "Alice" in reply.choices[0].message.content


def test_max_tokens_gives_length_and_exact_count(server):
    reply = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story about dragons."}], temperature=0, max_tokens=7
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 7


def test_prompt_tokens_equal_rendered_prompt_count(server):
    from phiserve.models.loader import resolve_model
    from phiserve.tokenizer.chat_template import ChatTemplate
    from phiserve.tokenizer.tokenizer import Tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    tok = Tokenizer.from_gguf(resolve_model(None).path)
    rendered = ChatTemplate(tok.chat_template, tok.bos_token or "", tok.eos_token or "").render(messages, add_generation_prompt=True)
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=5)
    assert reply.usage.prompt_tokens == len(tok.encode(rendered))


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as err:
        server.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    body = err.value.response.json()
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "model"


def test_malformed_json_is_400(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.base_url + "/health").status_code == 200
