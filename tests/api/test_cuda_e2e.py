"""The server on a GPU (`--device cuda`, CUDA graphs on, as a user runs it), the official openai
client, the miniature Phi-4: answers match transformers' greedy continuation, alone, streamed and
with eight clients at once. Runs where there is a GPU (the CPU-only suite skips it)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from tests.api.conftest import LiveServer, start_server, stop_server
from tests.models import phi4_miniature as mini

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NAME = "phi-4-mini"


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[LiveServer, dict[int, str]]]:
    """The server in fp32 on the GPU, and transformers' greedy answer (text) to each question."""
    model = mini.make_model(seed=0, im_end_gain=8.0)  # <|im_end|> wins within a few tokens
    folder = mini.write_checkpoint(tmp_path_factory.mktemp("phi4") / NAME, model, release="fixed")
    tokenizer = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    answers = {}
    for i in range(8):
        reference = mini.greedy_reference(model, tokenizer.encode(mini.expected_phi4_prompt(question(i))).ids, max_new=24)
        answers[i] = tokenizer.decode([t for t in reference if t not in (mini.IM_END, mini.ENDOFTEXT)])
    server = start_server("--model", str(folder), "--device", "cuda", "--dtype", "float32", "--kv-cache-memory", "0.05")
    try:
        yield server, answers
    finally:
        stop_server(server)


def ask(server: LiveServer, i: int) -> str:
    reply = server.client().chat.completions.create(model=NAME, messages=question(i), temperature=0, max_tokens=24)
    return reply.choices[0].message.content


def test_answers_match_transformers(served) -> None:
    server, answers = served
    assert ask(server, 0) == answers[0]


def test_streamed_answer_matches(served) -> None:
    server, answers = served
    chunks = list(server.client().chat.completions.create(model=NAME, messages=question(1), temperature=0, max_tokens=24, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answers[1]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_eight_clients_at_once(served) -> None:
    server, answers = served
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: ask(server, i), range(8)))
    assert got == [answers[i] for i in range(8)]


def test_bfloat16_server_with_the_gpu_defaults(tmp_path) -> None:
    """As a user starts it on a GPU: bf16 weights and activations (Phi-4's dtype), the KV pool and
    step sizes left to their CUDA defaults, decode steps replayed as graphs."""
    folder = mini.write_checkpoint(tmp_path / NAME, mini.make_model(seed=1), release="fixed")
    server = start_server("--model", str(folder), "--device", "cuda")
    try:
        client = server.client()
        reply = client.chat.completions.create(model=NAME, messages=question(2), max_tokens=12, seed=7)
        assert 1 <= reply.usage.completion_tokens <= 12 and reply.choices[0].finish_reason in ("stop", "length")
        again = client.chat.completions.create(model=NAME, messages=question(2), max_tokens=12, seed=7)
        assert again.choices[0].message.content == reply.choices[0].message.content  # same seed, same text
        engine = httpx.get(server.base_url + "/stats").json()["engine"]
        per_token = 2 * mini.LAYERS * mini.KV_HEADS * mini.HEAD_DIM * 2
        assert engine["num_blocks"] * engine["block_size"] * per_token > 2**30  # most of the card, not the CPU's 0.5 GiB
        assert engine["cuda_graph_steps"] > 0
    finally:
        stop_server(server)
