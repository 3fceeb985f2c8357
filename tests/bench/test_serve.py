"""bench/serve.py's load generator: what it reads from a streamed /v1/completions response."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).resolve().parents[2] / "bench" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = serve  # dataclasses look their module up by name
_spec.loader.exec_module(serve)


def _event(text: str, finish: str | None = None, usage: dict | None = None) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice], "usage": usage}).encode() + b"\n\n"


async def _serve(writes: list[bytes | float], status: str = "200 OK", chunked: bool = True, linger: float = 0.0) -> tuple[int, list[dict], asyncio.AbstractServer]:
    """An HTTP/1.1 server answering one request per connection: records the JSON body it gets, then
    sends `writes` (bytes as HTTP chunks, floats as pauses). Like llama-server it does not say it
    will close the connection, and closes it `linger` seconds after the response."""
    bodies: list[dict] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        bodies.append(json.loads(await reader.readexactly(length)))
        if chunked:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            for w in writes:
                if isinstance(w, float):
                    await writer.drain()
                    await asyncio.sleep(w)
                else:
                    writer.write(b"%x\r\n%s\r\n" % (len(w), w))
            writer.write(b"0\r\n\r\n")
        else:
            payload = b"".join(w for w in writes if isinstance(w, bytes))
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await writer.drain()
        await asyncio.sleep(linger)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], bodies, server


async def _requests(writes: list[bytes | float], count: int = 1, **kwargs: object) -> tuple[list, list[dict]]:
    """`count` requests one after the other through one client session, as a benchmark worker sends them."""
    port, bodies, server = await _serve(writes, **kwargs)
    async with server, serve.client_session(concurrency=1, timeout=30.0) as session:
        body = serve.request_body("m", "a prompt", 4, seed=7, temperature=0.8)
        results = [await serve.one_request(session, f"http://127.0.0.1:{port}/v1/completions", body) for _ in range(count)]
    return results, bodies


async def _request(writes: list[bytes | float], **kwargs: object) -> tuple[object, list[dict]]:
    results, bodies = await _requests(writes, **kwargs)
    return results[0], bodies


def test_a_streamed_completion_gives_its_tokens_and_timings():
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    two = _event(" b") + _event(" c")
    split = _event(" d", "length", usage)
    writes = [_event("a"), 0.02, two, 0.02, split[:10], split[10:], b"data: [DONE]\n\n"]
    result, bodies = asyncio.run(_request(writes))
    assert result.ok, result.error
    assert (result.tokens, result.token_source, result.chunks, result.prompt_tokens) == (4, "usage", 4, 9)
    assert result.finish_reason == "length"
    assert 0 < result.ttft < result.latency
    assert result.tpot >= 0.04 / 3  # two 20 ms pauses between the first and the last of 4 tokens
    assert bodies == [serve.request_body("m", "a prompt", 4, seed=7, temperature=0.8)]
    assert bodies[0]["stream"] is True and bodies[0]["logit_bias"] == {"0": -100, "1": -100, "2": -100}


def test_errors_fail_the_request_not_the_run():
    result, _ = asyncio.run(_request([b'{"error": {"message": "bad"}}'], status="400 Bad Request", chunked=False))
    assert not result.ok and result.error.startswith("HTTP 400") and "bad" in result.error
    error = b"data: " + json.dumps({"error": {"message": "engine died"}}).encode() + b"\n\n"
    result, _ = asyncio.run(_request([_event("a"), error]))
    assert not result.ok and "engine died" in result.error
    result, _ = asyncio.run(_request([b"data: [DONE]\n\n"]))
    assert not result.ok and result.error == "no text in the stream"


def test_each_request_gets_its_own_connection():
    """A kept-alive connection the server closes just after a response must not fail the next request
    (it failed 24 of 64 llama-server requests when the client reused connections)."""
    writes = [_event("a", "length", {"prompt_tokens": 2, "completion_tokens": 1}), b"data: [DONE]\n\n"]
    results, bodies = asyncio.run(_requests(writes, count=3, linger=0.2))
    assert [r.ok for r in results] == [True, True, True], [r.error for r in results]
    assert len(bodies) == 3
