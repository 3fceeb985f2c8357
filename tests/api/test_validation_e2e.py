"""Issue 4, the error paths: every out-of-range parameter is an OpenAI-shaped 400 naming the parameter,
prompts that do not fit are context_length_exceeded, and a server run with --api-key answers 401."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import start_server, stop_server

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]


def post(server, body: dict, headers: dict | None = None, path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = None, type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# Each case: (body fields, the param the error must name). One case per bound of each range.
OUT_OF_RANGE = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.01}, "min_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1000}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1_000_001}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"max_completion_tokens": 1_000_001}, "max_completion_tokens"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"presence_penalty": 2.01}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": 2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 5.01}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"logprobs": "maybe"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # OpenAI: top_logprobs needs logprobs=true
    ({"logit_bias": {"42": 100.5}}, "logit_bias"),
    ({"logit_bias": {"42": -101}}, "logit_bias"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"49152": 1}}, "logit_bias"),  # one past the vocabulary
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"stream_options": {"include_usage": "often"}}, "stream_options.include_usage"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"user": 7}, "user"),
]


@pytest.mark.parametrize(("fields", "param"), OUT_OF_RANGE, ids=[f"{p}={list(f.values())[-1]!r}"[:40] for f, p in OUT_OF_RANGE])
def test_out_of_range_parameter_is_400_naming_it(server, fields, param):
    err = assert_error(post(server, {"model": MODEL, "messages": HI, "max_tokens": 1, **fields}), 400, param)
    if "max_tokens" not in fields:
        assert param.split(".")[0] in err["message"]


BAD_MESSAGES = [
    ([], "messages"),
    ("Hi", "messages"),
    ([{"role": "robot", "content": "Hi"}], "messages[0].role"),
    ([{"content": "Hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0]"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
    ([{"role": "system", "content": "a"}], "messages"),
    ([{"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, {"role": "user", "content": "c"}], "messages"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}], "messages[0].content"),
]


@pytest.mark.parametrize(("messages", "param"), BAD_MESSAGES)
def test_bad_conversation_is_400(server, messages, param):
    assert_error(post(server, {"model": MODEL, "messages": messages, "max_tokens": 1}), 400, param)


def test_a_non_text_content_part_is_named(server):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    err = assert_error(post(server, {"model": MODEL, "messages": messages, "max_tokens": 1}), 400, "messages[0].content")
    assert "'image_url'" in err["message"] and "text only" in err["message"]


def test_missing_required_fields(server):
    assert_error(post(server, {"model": MODEL}), 400, "messages", "missing_required_parameter")
    assert_error(post(server, {"messages": HI}), 400, "model", "missing_required_parameter")


def test_the_openai_client_sees_the_param(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=3)
    assert exc.value.status_code == 400
    assert exc.value.param == "temperature"
    assert exc.value.type == "invalid_request_error"
    assert exc.value.code == "invalid_value"


def test_context_length_exceeded_names_the_numbers(server):
    limit = httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    prompt = post(server, {"model": MODEL, "messages": HI, "max_tokens": 0}).json()["usage"]["prompt_tokens"]
    for field in ("max_tokens", "max_completion_tokens"):
        err = assert_error(post(server, {"model": MODEL, "messages": HI, field: limit}), 400, "messages", "context_length_exceeded")
        assert err["message"] == (
            f"This model's maximum context length is {limit} tokens. However, you requested {prompt + limit} tokens "
            f"({prompt} in the messages, {limit} in the completion). Please reduce the length of the messages or completion."
        )
    # Without max_tokens the completion may use the rest of the context; a prompt that fills it is refused.
    long = [{"role": "user", "content": "hi " * (limit + 16)}]
    err = assert_error(post(server, {"model": MODEL, "messages": long}), 400, "messages", "context_length_exceeded")
    assert err["message"].startswith(f"This model's maximum context length is {limit} tokens. However, your messages resulted in ")
    # The same checks through the openai client.
    with pytest.raises(openai.BadRequestError) as exc:
        server.client().chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=limit)
    assert exc.value.code == "context_length_exceeded"


def test_stream_errors_come_before_the_stream(server):
    r = post(server, {"model": MODEL, "messages": HI, "stream": True, "n": 99})
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r, 400, "n")


# ---- --api-key ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server():
    s = start_server("--api-key", "sk-test")
    yield s
    stop_server(s)


def test_missing_or_wrong_api_key_is_401(auth_server):
    body = {"model": MODEL, "messages": HI, "max_tokens": 1}
    assert_error(post(auth_server, body), 401, None, "invalid_api_key")
    assert_error(post(auth_server, body, {"Authorization": "Bearer sk-wrong"}), 401, None, "invalid_api_key")
    assert_error(post(auth_server, body, {"Authorization": "sk-test"}), 401, None, "invalid_api_key")  # not Bearer
    # Authentication comes first: an unauthenticated bad request is still a 401.
    assert_error(post(auth_server, {**body, "temperature": 9}, {"Authorization": "Bearer nope"}), 401, None, "invalid_api_key")
    r = httpx.get(auth_server.base_url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert_error(r, 401, None, "invalid_api_key")
    assert httpx.get(auth_server.base_url + "/health").status_code == 200  # probes need no key


def test_openai_client_with_and_without_the_key(auth_server):
    with pytest.raises(openai.AuthenticationError) as exc:
        auth_server.client(api_key="sk-wrong").chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"
    client = auth_server.client(api_key="sk-test")
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, user="alice")
    assert reply.usage.completion_tokens == 1
    # A valid key does not excuse a bad parameter.
    assert_error(post(auth_server, {**{"model": MODEL, "messages": HI}, "top_k": -5}, {"Authorization": "Bearer sk-test"}), 400, "top_k")
