"""The FastAPI application: routes, auth, health, metrics. The model loads in the background so
/health can answer 503 while loading."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from phiserve.api.chat import create_chat_completion
from phiserve.api.completions import create_completion
from phiserve.api.errors import OpenAIError, install_error_handlers
from phiserve.api.protocol import ChatCompletionRequest, CompletionRequest
from phiserve.api.usage import usage_dict
from phiserve.host import ModelHost, ServeOptions

log = logging.getLogger(__name__)


class AppState:
    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.host: ModelHost | None = None
        self.load_error: str | None = None
        self.registry = CollectorRegistry()
        self._stopping = threading.Event()

    def load_and_run(self) -> None:
        """Load the model, then drive its engine until stop(), both on the calling thread.

        One thread on purpose: torch's OpenMP keeps a thread pool per thread that runs parallel ops,
        and a pool left behind by a separate loader thread made libgomp throttle its spin-wait (it then
        manages more threads than there are CPUs): the engine's workers slept and were woken at nearly
        every kernel (~170 times a token), and a one-user step took ~1.6x its time alone.
        """
        try:
            host = ModelHost(self.options, self.registry)
        except Exception as exc:  # reported by /health; the process keeps answering
            # A server that cannot serve its one model should not linger: say why in one line and exit.
            self.load_error = str(exc)
            log.error("model failed to load: %s", exc)
            log.debug("load failure", exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.host = host
        if not self._stopping.is_set():  # stop() may have come during the load
            host.engine.run_forever()

    def stop(self) -> None:
        """Make load_and_run return (from any thread): at once if loaded, else right after the load."""
        self._stopping.set()
        if self.host is not None:
            self.host.shutdown()


def create_app(options: ServeOptions) -> FastAPI:
    """With ``options.engine_on_caller_thread`` the caller runs ``app.state.phiserve.load_and_run()``
    itself (the CLI, on its main thread); otherwise the app starts a thread for it."""
    state = AppState(options)

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # noqa: ANN202
        engine_thread = None
        if not options.engine_on_caller_thread:
            engine_thread = threading.Thread(target=state.load_and_run, name="phiserve-engine", daemon=True)
            engine_thread.start()
        yield
        state.stop()
        if engine_thread is not None:
            await asyncio.to_thread(engine_thread.join, 10)

    app = FastAPI(title="phiserve", lifespan=lifespan)
    app.state.phiserve = state  # the CLI loads the model and drives the engine through it
    install_error_handlers(app)
    engine_gauges = Gauge("phiserve_engine", "Engine state", ["stat"], registry=state.registry)

    def ready_host(request: Request) -> ModelHost:
        if options.api_key is not None:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not given:
                raise OpenAIError(401, "You didn't provide an API key. Provide it in an Authorization header (Bearer auth).", code="invalid_api_key")
            if not hmac.compare_digest(given, options.api_key):
                raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        if state.host is None:
            raise OpenAIError(503, "The model is still loading." if state.load_error is None else f"The model failed to load: {state.load_error}", type="server_error", code="model_not_ready")
        return state.host

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.host is None:
            status = "loading" if state.load_error is None else "failed"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        if state.host.engine.error is not None:
            return JSONResponse({"status": "engine_dead", "error": str(state.host.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.host.name})

    @app.get("/v1/models")
    @app.get("/v1/openai/models")
    async def models(host: ModelHost = Depends(ready_host)) -> JSONResponse:
        card = {"id": host.name, "object": "model", "created": 0, "owned_by": "phiserve", "max_model_len": host.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    @app.post("/v1/openai/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request, host: ModelHost = Depends(ready_host)) -> Response:
        return await create_chat_completion(req, request, host)

    @app.post("/v1/completions")
    @app.post("/v1/openai/completions")
    async def completions(req: CompletionRequest, request: Request, host: ModelHost = Depends(ready_host)) -> Response:
        return await create_completion(req, request, host)

    @app.get("/stats")
    async def stats(host: ModelHost = Depends(ready_host)) -> JSONResponse:
        usage = host.ledger.snapshot()
        cost = usage_dict(usage["prompt_tokens"], usage["completion_tokens"], host.prices)["estimated_cost"]
        return JSONResponse({"engine": host.engine.stats(), "usage": {**usage, "estimated_cost": cost}})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.host is not None:
            for key, value in state.host.engine.stats().items():
                engine_gauges.labels(key).set(value)
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    return app
