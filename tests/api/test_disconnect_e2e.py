"""Clients that go away free their sequence and KV blocks at once, and their usage is still counted."""

from __future__ import annotations

import json
import threading
import time

import httpx

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def stats(server) -> dict:
    return httpx.get(server.base_url + "/stats", timeout=10).json()


def wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats(server)
        engine = s["engine"]
        if engine["num_running"] == 0 and engine["num_waiting"] == 0:
            return s
        time.sleep(0.1)
    raise AssertionError(f"engine still busy: {stats(server)}")


def test_twenty_streaming_clients_disconnect_mid_generation(server):
    before = wait_idle(server)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        "max_tokens": 2000,
        "temperature": 1.0,
        "stream": True,
        "logit_bias": {"0": -100, "2": -100},  # no early end: every client disconnects mid-generation
    }
    got_tokens = threading.Barrier(21, timeout=120)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "seed": i}, timeout=120) as r:
                assert r.status_code == 200
                chunks = 0
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        chunks += 1  # a chunk with generated text (the role chunk's content is "")
                    if chunks >= 3:
                        break
            # leaving the with-block closes the connection mid-stream
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            got_tokens.wait()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    got_tokens.wait()
    for t in threads:
        t.join()
    assert not errors
    after = wait_idle(server)
    engine = after["engine"]
    assert engine["num_free_blocks"] == engine["num_blocks"]
    usage = after["usage"]
    assert usage["aborted_choices"] - before["usage"]["aborted_choices"] == 20
    assert usage["requests"] - before["usage"]["requests"] == 20
    # every aborted stream's generated tokens were counted (at least the 3 chunks each client read)
    assert usage["completion_tokens"] - before["usage"]["completion_tokens"] >= 20 * 3


def test_non_streaming_client_timeout_aborts(server):
    before = wait_idle(server)
    # The end-of-turn tokens are banned, so generation cannot end before the client gives up.
    no_end = {"0": -100, "2": -100}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count from one to one thousand in words."}], "max_tokens": 3000, "temperature": 1.0, "logit_bias": no_end}
    try:
        httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=1.5)
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("expected the request to outlive the client's timeout")
    after = wait_idle(server, timeout=10)
    assert after["engine"]["num_free_blocks"] == after["engine"]["num_blocks"]
    assert after["usage"]["aborted_choices"] - before["usage"]["aborted_choices"] == 1
