"""A real server in a subprocess on a free port, serving the embedded model, shared by the API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen

    def client(self, prefix: str = "/v1", **kwargs):  # noqa: ANN201
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + prefix, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout: float = 180.0) -> LiveServer:
    port = free_port()
    cmd = [sys.executable, "-m", "phiserve", "serve", "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return LiveServer(base, proc)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy in time")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    s = start_server()
    yield s
    stop_server(s)
