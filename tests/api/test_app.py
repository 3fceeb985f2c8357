"""The app's threads: the model loads on the thread that then drives the engine (torch's OpenMP pool
belongs to the thread that runs parallel ops; a second pool left by a loader thread made every
kernel's workers sleep and wake, see AppState.load_and_run), and /health answers while it loads."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from phiserve.api import app as app_module
from phiserve.host import ServeOptions


def test_model_loads_and_engine_runs_on_one_thread_while_http_answers(monkeypatch):
    threads: dict[str, int] = {}
    loading, stopped = threading.Event(), threading.Event()

    class Engine:
        error = None

        def run_forever(self) -> None:
            threads["engine"] = threading.get_ident()
            stopped.wait(10)

    class Host:
        name = "fake"

        def __init__(self, options: ServeOptions, registry: object) -> None:
            threads["load"] = threading.get_ident()
            assert loading.wait(10)  # held until /health has answered 503 below
            self.engine = Engine()

        def shutdown(self) -> None:
            stopped.set()

    monkeypatch.setattr(app_module, "ModelHost", Host)
    with TestClient(app_module.create_app(ServeOptions())) as client:
        assert client.get("/health").json()["status"] == "loading"
        loading.set()
        for _ in range(200):
            if "engine" in threads:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").json() == {"status": "ok", "model": "fake"}
    assert threads["load"] == threads["engine"] != threading.get_ident()
    assert stopped.is_set()  # leaving the app stopped the engine
