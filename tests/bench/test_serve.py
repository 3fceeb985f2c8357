"""bench/serve.py's load generator: what it reads from a streamed /v1/completions response."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import aiohttp

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).resolve().parents[2] / "bench" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = serve  # dataclasses look their module up by name
_spec.loader.exec_module(serve)


def _event(text: str, finish: str | None = None, usage: dict | None = None) -> bytes:
    choice = {"index": 0, "text": text, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice], "usage": usage}).encode() + b"\n\n"


async def _serve_once(writes: list[bytes | float], status: str = "200 OK", chunked: bool = True) -> tuple[int, list[dict], asyncio.AbstractServer]:
    """A one-request HTTP/1.1 server: records the JSON body it gets, then sends `writes` (bytes as
    HTTP chunks, floats as pauses)."""
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
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], bodies, server


async def _request(writes: list[bytes | float], **kwargs: object) -> tuple[object, list[dict]]:
    port, bodies, server = await _serve_once(writes, **kwargs)
    async with server, aiohttp.ClientSession() as session:
        body = serve.request_body("m", "a prompt", 4, seed=7, temperature=0.8)
        result = await serve.one_request(session, f"http://127.0.0.1:{port}/v1/completions", body)
    return result, bodies


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
